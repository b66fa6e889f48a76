"""Rollouts: sample G completions per prompt (one GRPO group), and let a model judge answers.

HFEngine and VLLMEngine share one interface; each holds its own unsharded copy of the model,
so generation never runs inside FSDP's collectives:

    engine.generate(prompt_ids, n, temperature, max_new_tokens) -> per prompt, n Completions
    engine.load_weights(state_dict)   # after each optimizer step: sample from the current policy
    engine.sleep() / engine.wake_up() / engine.close()   # GPU memory (vLLM); no-ops for HF
    engine.context_len                # prompt + generated tokens one sequence may hold

`token_ids` end with EOS when the model stopped (finish_reason "eos"), so the trainer learns to
stop; no padding. `logprobs[i]` = log p_T(token_ids[i] | prompt, token_ids[:i]) under
softmax(logits / T), as model.completion_logprobs: pure temperature sampling (no top-k, top-p
or repetition penalty), so the two agree; None when greedy (T = 0). `referee` below is the one
referee call, for evaluation and the self-referee pass.
"""

import contextlib
import inspect
import logging
import math
import os
import random
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from data import PROTOCOLS, Protocol
from model import chat_ids, completion_logprobs, load_full_state_dict, load_model


@dataclass
class Completion:
    """One sampled continuation of a prompt."""
    token_ids: list[int]  # generated tokens, ending with EOS if finish_reason == "eos"
    text: str  # token_ids decoded by completion_text: every token but EOS and padding
    finish_reason: str  # "eos": the model stopped; "length": max_new_tokens ran out
    logprobs: list[float] | None  # log p_T of each token of token_ids; None for greedy


def completion_text(tokenizer, token_ids: list[int], stop_ids=()) -> str:
    """`token_ids` decoded without eos, pad and `stop_ids` (e.g. end-of-turn). Other special
    tokens stay: verdict tags (`<answer>`, `<think>`) may be special, and verdicts need them."""
    dropped = {tokenizer.eos_token_id, tokenizer.pad_token_id, *stop_ids} - {None}
    return tokenizer.decode([token for token in token_ids if token not in dropped],
                            skip_special_tokens=False)


def _decode_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The HF engine's attention: `_SharedPromptLayer` caches attend through the layer; other
    decoding steps (one query per row: no causal mask needed) share each key/value head among
    its query heads in torch's kernel (enable_gqa), where transformers' sdpa with padding copies
    them per query head (repeat_kv), which dominated CPU decoding. Else transformers' sdpa."""
    unsupported = dropout or kwargs.get("softcap") or kwargs.get("s_aux") is not None
    if isinstance(key, _SharedPromptLayer):  # the engine's decoding cache: see there
        if unsupported:
            raise NotImplementedError("HFEngine's shared-prompt decoding supports plain softmax "
                                      "attention only (no dropout, soft-capping or sinks)")
        return key.attend(query, module.scaling if scaling is None else scaling), None
    if query.shape[2] != 1 or key.shape[1] == query.shape[1] or unsupported:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :, :key.shape[-2]]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=True)  # [b, h, 1, d]
    return out.transpose(1, 2).contiguous(), None  # [b, 1, h, d], as transformers' sdpa returns


DECODE_ATTENTION = "urpo_decode_sdpa"
AttentionInterface.register(DECODE_ATTENTION, _decode_sdpa)
AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)  # masks built as for sdpa


class _SharedPromptLayer(DynamicLayer):
    """A full-attention layer's decoding cache for n samples of each of p prompts: the prefill's
    [p, kv_heads, P, head_dim] kept once (prompt i serves rows i*n .. i*n+n-1), new tokens in
    [b, kv_heads, capacity, head_dim] buffers written in place. Why: DynamicLayer reallocates by
    concatenation every step (on CPU, fresh pages faulted in), and n copies of a prompt's cache
    are read n times. `update` returns the layer itself; `_decode_sdpa` then calls `attend`."""

    def __init__(self, prompt_keys: torch.Tensor, prompt_values: torch.Tensor,
                 prompt_mask: torch.Tensor, repeats: int, capacity: int):
        super().__init__()
        p, kv_heads, _, dim = prompt_keys.shape  # [p, kv, P, d]
        self.prompt_keys, self.prompt_values = prompt_keys, prompt_values
        self.prompt_mask = prompt_mask.bool()[:, None, None, :]  # [p, 1, 1, P]: False on padding
        self.new_keys = prompt_keys.new_empty(p * repeats, kv_heads, capacity, dim)  # [b, kv, L, d]
        self.new_values = prompt_values.new_empty(p * repeats, kv_heads, capacity, dim)
        self.repeats, self.generated = repeats, 0
        self.keys, self.values = prompt_keys, prompt_values  # what DynamicLayer's methods look at
        self.dtype, self.device = prompt_keys.dtype, prompt_keys.device
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.prompt_keys.shape[2] + self.generated

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if key_states.shape[2] != 1:
            raise ValueError(f"a decoding step feeds one token per row, got {key_states.shape[2]}")
        if self.generated == self.new_keys.shape[2]:
            raise RuntimeError(f"KV cache full: {self.generated} generated tokens already")
        self.new_keys[:, :, self.generated] = key_states[:, :, 0]
        self.new_values[:, :, self.generated] = value_states[:, :, 0]
        self.generated += 1
        return self, self

    def attend(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """softmax(q k^T * scaling) v over [prompt, generated] for query [b, heads, 1, d]; returns
        [b, 1, heads, d]. Scores in the model's dtype, softmax in float32 (as eager attention)."""
        p, kv_heads, _, dim = self.prompt_keys.shape
        b, heads, n, t = query.shape[0], query.shape[1], self.repeats, self.generated
        group = heads // kv_heads  # query heads per key/value head
        q = query.reshape(p, n, kv_heads, group, dim)  # row i*n + j, head h*group + g
        q_prompt = q.transpose(1, 2).reshape(p, kv_heads, n * group, dim)  # a prompt's queries
        prompt_scores = q_prompt @ self.prompt_keys.transpose(2, 3) * scaling  # [p, kv, n*g, P]
        prompt_scores = prompt_scores.masked_fill(~self.prompt_mask, float("-inf"))
        new_keys = self.new_keys[:, :, :t].reshape(p, n, kv_heads, t, dim)
        new_scores = q @ new_keys.transpose(3, 4) * scaling  # [p, n, kv, g, t]
        new_scores = new_scores.transpose(1, 2).reshape(p, kv_heads, n * group, t)
        probs = torch.cat([prompt_scores, new_scores], dim=-1).softmax(-1, dtype=torch.float32)
        probs = probs.to(query.dtype)  # [p, kv, n*g, P + t]
        out = probs[..., :-t] @ self.prompt_values  # [p, kv, n*g, d]
        new_probs = probs[..., -t:].reshape(p, kv_heads, n, group, t).transpose(1, 2)
        new_values = self.new_values[:, :, :t].reshape(p, n, kv_heads, t, dim)
        out = out.reshape(p, kv_heads, n, group, dim).transpose(1, 2) + new_probs @ new_values
        return out.reshape(b, 1, heads, dim)  # [p, n, kv, g, d] -> [b, 1, h, d]


@contextlib.contextmanager
def _packed_linears(model, rows: int):
    """For the call, every nn.Linear of a float32 CPU `model` multiplies with its weight reordered
    into oneDNN's blocked layout (torch.ops.mkldnn, what torch.compile's CPU backend runs). Why:
    a decoding step multiplies a few rows by every weight, and MKL's plain sgemm streamed them at
    ~40% of memory bandwidth; packed, one SmolLM2-135M decoding step of 12 rows fell from ~115 to
    ~85 ms (README, "Figures behind the code's comments"). Packed per call (0.3-0.6 s, 135M), not
    kept: weights change in place between calls (use_policy_weights), and the copy,
    the size of the weights, is freed with the call. `rows` hints the layout at the batch size.
    Elsewhere (GPU, bf16, no oneDNN) the model is left as it is."""
    onednn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    linears = [module for module in model.modules() if onednn
               and type(module) is torch.nn.Linear  # not subclasses (e.g. quantized layers)
               and "forward" not in module.__dict__  # nor one whose forward was replaced (hooks)
               and module.weight.device.type == "cpu" and module.weight.dtype == torch.float32]
    try:
        for module in linears:
            packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), rows)

            def forward(x, packed=packed, bias=module.bias):  # x [..., in] -> [..., out]
                out = torch.ops.mkldnn._linear_pointwise(
                    x.reshape(-1, x.shape[-1]), packed, bias, "none", [], "")
                return out.reshape(*x.shape[:-1], out.shape[-1])
            module.forward = forward  # an instance attribute: shadows Linear.forward
        yield
    finally:
        for module in linears:
            module.__dict__.pop("forward", None)  # back to Linear.forward; the copy is freed


def _left_padded(tensors: list[torch.Tensor], width: int) -> torch.Tensor:
    """[1, kv, P_i, d] each -> [p, kv, width, d], zeros to the left (masked out by attention)."""
    out = tensors[0].new_zeros(len(tensors), tensors[0].shape[1], width, tensors[0].shape[3])
    for row, tensor in enumerate(tensors):
        out[row, :, width - tensor.shape[2]:] = tensor[0]
    return out


class HFEngine:
    """A hand-written sampling loop over a transformers model: each prompt prefilled once for
    its n samples, buffers of the call's final size (KV cache, tokens, log-probs), inverse-CDF
    draws keeping log p_T (no [batch, steps, vocab] scores). `max_batch` bounds rows decoded
    together (at least one prompt's n).
    `rng` is the whole random state (deterministic per seed, checkpointable; torch's untouched)."""

    def __init__(self, model_path: str, tokenizer, dtype: torch.dtype = torch.float32, device="cpu",
                 seed: int = 0, max_batch: int = 64, trust_remote_code: bool = False,
                 context_len: int | None = None):
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.max_batch = max_batch
        self.rng = random.Random(seed)
        self.uses_policy_weights = False
        self.model = load_model(model_path, dtype, trust_remote_code).to(self.device).eval()
        self.model.requires_grad_(False)
        self.vocab_size = self.model.get_input_embeddings().num_embeddings  # rows of embeddings
        self.context_len = (context_len  # else the positions the model was trained for
                            or getattr(self.model.config, "max_position_embeddings", None)
                            or 2**31)
        if self.model.config._attn_implementation == "sdpa":
            self.model.set_attn_implementation(DECODE_ATTENTION)  # see _decode_sdpa
        # transformers 5.2x renamed forward's `past_key_values` to `cache` (the old name warns)
        parameters = inspect.signature(self.model.forward).parameters
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"
        # Stop at the tokenizer's EOS and every generation-config EOS (a chat model's end-of-turn)
        configured = self.model.generation_config.eos_token_id
        configured = configured if isinstance(configured, list) else [configured]
        self.eos_ids = sorted({tokenizer.eos_token_id, *configured} - {None})
        if not self.eos_ids:
            raise ValueError(f"{model_path} defines no EOS token: generation could never stop "
                             "early; set eos_token_id in its generation_config.json or tokenizer")

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], n: int, temperature: float,
                 max_new_tokens: int) -> list[list[Completion]]:
        """n completions of each prompt (token ids); temperature 0 decodes greedily. ValueError
        on a bad request (check_request)."""
        check_request(prompt_ids, n, temperature, max_new_tokens, self.vocab_size)
        if not prompt_ids:
            return []
        per_batch = max(1, self.max_batch // n)  # prompts per decoding batch
        cuda = [] if self.device.type != "cuda" else [
            torch.cuda.current_device() if self.device.index is None else self.device.index]
        groups = []
        rows = min(len(prompt_ids), per_batch) * n  # rows decoded together
        with torch.random.fork_rng(devices=cuda), _packed_linears(self.model, rows):
            torch.manual_seed(self.rng.getrandbits(63))  # own stream: the trainer's RNG untouched
            for start in range(0, len(prompt_ids), per_batch):
                groups += self._generate_batch(prompt_ids[start:start + per_batch], n,
                                               temperature, max_new_tokens)
        # No heap trim (model.release_freed_memory): the next call would refault its same buffers
        return groups

    def _generate_batch(self, prompts: list[list[int]], n: int, temperature: float,
                        max_new_tokens: int) -> list[list[Completion]]:
        width = max(len(ids) for ids in prompts)
        input_ids = torch.full((len(prompts), width), self.tokenizer.pad_token_id,
                               dtype=torch.long)  # [p, P]
        attention_mask = torch.zeros(len(prompts), width, dtype=torch.long)  # [p, P]
        for row, ids in enumerate(prompts):  # left padding: every prompt ends at column P - 1
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        # Positions count real tokens only (as the trainer's), so left padding does not shift them.
        position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)  # [p, P]
        # 1. Prefill each prompt once; its cache, mask and last logits then serve its n rows.
        cache = DynamicCache(config=self.model.config)
        capacity = max_new_tokens - 1  # generated tokens fed back: the last one drawn never is
        if (self.model.config._attn_implementation == DECODE_ATTENTION
                and all(type(layer) is DynamicLayer for layer in cache.layers)):
            # Full attention in every layer: each prompt prefilled alone, its keys and values then
            # left-padded into one [p, kv, P, d] per layer. The padding is never computed: a
            # batched prefill of referee prompts of 530-790 tokens spent ~17% of its FLOPs on it.
            last, prompt_caches, prefilled = [], [], {}
            for ids in prompts:  # copies of one prompt (sample_groups) are prefilled once
                if tuple(ids) not in prefilled:
                    prompt_cache = DynamicCache(config=self.model.config)
                    out = self.model(input_ids=torch.tensor([ids], device=self.device),
                                     position_ids=torch.arange(len(ids), device=self.device)[None],
                                     use_cache=True, logits_to_keep=1,
                                     **{self._cache_argument: prompt_cache})
                    prefilled[tuple(ids)] = prompt_cache, out.logits[:, -1]  # [1, V]
                prompt_caches.append(prefilled[tuple(ids)][0])
                last.append(prefilled[tuple(ids)][1])
            for index in range(len(cache.layers)):
                layers = [c.layers[index] for c in prompt_caches]
                cache.layers[index] = _SharedPromptLayer(
                    _left_padded([layer.keys for layer in layers], width),
                    _left_padded([layer.values for layer in layers], width),
                    attention_mask, n, capacity)
            del prompt_caches, prefilled
            logits = torch.cat(last).repeat_interleave(n, dim=0)  # [b, V]
        else:  # sliding-window layers, or attention other than sdpa: transformers' cache
            out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids, use_cache=True, logits_to_keep=1,
                             **{self._cache_argument: cache})
            for layer in cache.layers:
                layer.batch_repeat_interleave(n)
            logits = out.logits[:, -1].repeat_interleave(n, dim=0)  # [b, V]
        del out
        # The mask (for layers on transformers' cache) is allocated once at its final width.
        full_mask = attention_mask.new_ones(len(prompts) * n, width + capacity)  # [b, P + L - 1]
        full_mask[:, :width] = attention_mask.repeat_interleave(n, dim=0)
        next_position = position_ids[:, -1:].repeat_interleave(n, dim=0) + 1  # [b, 1]
        # 2. Decode: draw a token per row and feed it back; stopped rows carry padding.
        eos = torch.tensor(self.eos_ids, device=self.device)
        stopped = torch.zeros(len(logits), dtype=torch.bool, device=self.device)  # [b]
        # Drawn tokens and their log-probs land in buffers of the call's final size: small
        # tensors kept per step would split the large freed blocks of the step's logits, and the
        # CPU heap would grow by about one logits buffer per step.
        tokens = torch.full((len(logits), max_new_tokens), self.tokenizer.pad_token_id,
                            device=self.device)  # [b, L]
        logprobs = torch.zeros(len(logits), max_new_tokens, device=self.device)  # [b, L]
        for step in range(max_new_tokens):
            token, logprob = self._draw(logits, temperature)  # [b], [b] or None
            token = token.masked_fill(stopped, self.tokenizer.pad_token_id)
            tokens[:, step] = token
            if logprob is not None:
                logprobs[:, step] = logprob
            stopped |= torch.isin(token, eos)
            if step == max_new_tokens - 1 or bool(stopped.all()):
                break
            out = self.model(input_ids=token[:, None], position_ids=next_position,
                             attention_mask=full_mask[:, :width + step + 1],  # [b, P + step + 1]
                             use_cache=True, **{self._cache_argument: cache})
            next_position = next_position + 1
            logits = out.logits[:, -1]  # [b, V]
        new_tokens = tokens[:, :step + 1].tolist()  # [b, L']
        new_logprobs = logprobs[:, :step + 1].tolist() if temperature > 0 else None  # [b, L']
        completions = []
        for row, row_tokens in enumerate(new_tokens):
            stop = next((i for i, token in enumerate(row_tokens) if token in self.eos_ids), None)
            length = len(row_tokens) if stop is None else stop + 1  # keep the EOS itself
            token_ids = row_tokens[:length]
            completions.append(Completion(
                token_ids=token_ids, text=completion_text(self.tokenizer, token_ids, self.eos_ids),
                finish_reason="length" if stop is None else "eos",
                logprobs=new_logprobs[row][:length] if new_logprobs is not None else None))
        return [completions[i * n:(i + 1) * n] for i in range(len(prompts))]

    @staticmethod
    def _draw(logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One token per row from softmax(logits / T), and its log p_T; argmax when T = 0."""
        if temperature == 0:
            return logits.argmax(dim=-1), None
        logp = (logits.float() / temperature).log_softmax(dim=-1)  # [b, V]
        # Inverse CDF: one uniform per row (torch.multinomial draws one per vocabulary entry)
        cdf = logp.exp().cumsum(dim=-1)  # [b, V]; cdf[:, -1] ~ 1 up to rounding
        uniform = torch.rand(len(logits), 1, device=logits.device) * cdf[:, -1:]  # [b, 1]
        token = torch.searchsorted(cdf, uniform, right=True).squeeze(1).clamp(
            max=logits.shape[-1] - 1)  # [b]
        return token, logp.gather(1, token[:, None]).squeeze(1)

    def use_policy_weights(self, model) -> bool:
        """Sample from `model`'s own parameters instead of a copy where exact: same names,
        shapes, dtype and device, and FSDP2 shards holding whole tensors (world size 1). Returns
        whether it did; then optimizer steps reach the engine at once, without `load_weights`."""
        theirs = {}
        for name, param in model.named_parameters():
            local = param.to_local() if hasattr(param, "to_local") else param  # FSDP2: own shard
            theirs[name] = local.detach()
        mine = dict(self.model.named_parameters())
        if set(mine) - set(theirs) or any(
                theirs[name].shape != p.shape or theirs[name].dtype != p.dtype
                or theirs[name].device != p.device for name, p in mine.items()):
            return False
        for name, param in mine.items():
            param.data = theirs[name]  # the same storage: no copy
        self.uses_policy_weights = True
        return True

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Copy in a full or FSDP2-sharded state dict (collective: every rank calls it). Strict."""
        load_full_state_dict(self.model, state_dict)

    @torch.no_grad()
    def weight_samples(self, shapes: dict[str, tuple], samples: int) -> dict:
        """The weight check's engine side (see compare_weights): {name: (dtype, strided_samples)}
        of each named tensor of the engine's model, None where it holds none of that shape."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        found = {name: engine_tensor(params, name, shapes, {}) for name in shapes}
        return {name: None if tensor is None else (tensor.dtype, strided_samples(tensor, samples))
                for name, tensor in found.items()}

    @torch.no_grad()
    def prompt_logprobs(self, token_ids_list: list[list[int]]) -> list[list[float]]:
        """log p_1(ids[t] | ids[:t]) for t >= 1 of each sequence, by the engine's model in its
        dtype (the log-prob gap's engine side, as VLLMEngine.prompt_logprobs)."""
        return trainer_prompt_logprobs(self.model, token_ids_list)

    def sleep(self) -> None:  # nothing to free or shut down: a plain model in this process
        pass

    def wake_up(self) -> None:
        pass

    def close(self) -> None:
        pass


def sample_groups(engine, prompts: list[list[list[int]]], group_size: int, temperature: float,
                  max_new_tokens: int) -> list[list[Completion]]:
    """group_size (G) completions for each group of prompts, in one engine call. A group of one
    prompt (a player's) gets all G; a group of L prompts (a referee group: one pair shown in L
    orders) gets G / L completions of each, presentation by presentation. An engine call samples
    one n per prompt, so each prompt is sent as copies asking the greatest common divisor of the
    counts (the HF engine prefills copies once, vLLM's prefix cache reuses them); with one
    prompt per group this is `engine.generate(prompts, G, ...)` itself. ValueError unless every
    group has >= 1 prompt and L divides G."""
    counts = []
    for index, group in enumerate(prompts):
        if not group or group_size % len(group):
            raise ValueError(f"group {index} has {len(group)} prompts: group_size {group_size} "
                             "must split evenly over 1 or more prompts")
        counts.append(group_size // len(group))
    n = math.gcd(*counts) if counts else group_size
    copies = [ids for group, count in zip(prompts, counts) for ids in group
              for _ in range(count // n)]
    outputs = iter(engine.generate(copies, n, temperature, max_new_tokens) if copies else [])
    return [[completion for _ in group for _ in range(count // n) for completion in next(outputs)]
            for group, count in zip(prompts, counts)]


def make_engine(kind: str, model_path: str, tokenizer, dtype: torch.dtype = torch.float32,
                device="cpu", seed: int = 0, context_len: int | None = None,
                trust_remote_code: bool = False, **vllm_options):
    """The engine named by --rollout; `context_len` (None: the model's) as vLLM's max_model_len."""
    if kind == "hf":
        return HFEngine(model_path, tokenizer, dtype, device, seed,
                        trust_remote_code=trust_remote_code, context_len=context_len)
    if kind == "vllm":
        return VLLMEngine(model_path, tokenizer, dtype, device, seed, max_model_len=context_len,
                          trust_remote_code=trust_remote_code, **vllm_options)
    raise ValueError(f"unknown rollout engine {kind!r}: use hf or vllm")


def check_request(prompt_ids: list[list[int]], n: int, temperature: float, max_new_tokens: int,
                  vocab_size: int) -> None:
    """ValueError, naming the prompt or the argument, unless every prompt is a non-empty list of
    token ids in [0, vocab_size), n and max_new_tokens are integers >= 1 and temperature is a
    finite number >= 0. Both engines check a request with it before any work."""
    if not (isinstance(n, int) and isinstance(max_new_tokens, int) and n >= 1
            and max_new_tokens >= 1 and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"need integers n >= 1 and max_new_tokens >= 1, and a finite temperature "
                         f">= 0; got n={n!r}, max_new_tokens={max_new_tokens!r}, "
                         f"temperature={temperature!r}")
    for index, ids in enumerate(prompt_ids):
        if not isinstance(ids, (list, tuple)) or not ids:
            raise ValueError(f"prompt {index} is {ids!r}: each prompt is a non-empty list of "
                             "token ids (model.chat_ids gives one)")
        outside = [token for token in ids if not 0 <= token < vocab_size]
        if outside:
            raise ValueError(f"prompt {index} holds token id {outside[0]}, outside the model's "
                             f"vocabulary [0, {vocab_size}): was it encoded with another model's "
                             "tokenizer?")


def fits(engine, prompt_ids: list[int], max_new_tokens: int) -> bool:
    """Whether prompt + generation budget fit the context. Callers skip and count the rest: vLLM
    rejects a prompt filling its context (killing the rank), and a cut verdict is no verdict."""
    return len(prompt_ids) + max_new_tokens <= engine.context_len


# --- The referee: one call for training's self-referee pass and for evaluation ---------------

@dataclass
class Verdict:
    """One referee generation, with what training needs: candidates shown in `order`, what the
    referee wrote and what it means (a ranking or a score: the protocol's `read`), and the
    prompt, tokens and sampler log-probs it came from."""
    order: list[int]  # the candidates shown, indices into the call's candidates: label [j+1]
    # (pointwise: the one candidate) shows candidate order[j]; one meaning everywhere
    text: str  # the referee's output
    ranking: list[int] | None  # candidate indices, best first; None: invalid, or a score
    finish_reason: str
    num_tokens: int  # generated tokens (for throughput)
    group: int = 0  # self_referee: index of the judged group in its input
    score: int | None = None  # pointwise protocol: the candidate's score; None: invalid
    prompt_ids: list[int] = field(default_factory=list)  # the rendered referee prompt
    token_ids: list[int] = field(default_factory=list)  # what the referee generated
    logprobs: list[float] | None = None  # the sampler's log p_T of token_ids (None: greedy)

    @property
    def valid(self) -> bool:
        """Whether the verdict parsed (a ranking, or a score)."""
        return self.ranking is not None or self.score is not None


def referee(engine, tokenizer, conversations: list[list[dict]], candidates: list[list[str]],
            orders: list[list[int]], temperature: float, max_new_tokens: int,
            think: bool = True, protocol: Protocol = PROTOCOLS["listwise"]) -> list[Verdict | None]:
    """Per (conversation, candidates, shown): the `protocol`'s referee prompt showing candidates
    [order[0], order[1], ...] (a permutation of them all, or some: a pair, one), one verdict,
    read back in candidate indices (protocol.read); None where prompt + budget do not fit."""
    prompts = [chat_ids(tokenizer, protocol.render(messages, [texts[i] for i in order], think))
               for messages, texts, order in zip(conversations, candidates, orders, strict=True)]
    fitting = [i for i, ids in enumerate(prompts) if fits(engine, ids, max_new_tokens)]
    outputs = engine.generate([prompts[i] for i in fitting], n=1, temperature=temperature,
                              max_new_tokens=max_new_tokens) if fitting else []
    verdicts = [None] * len(prompts)
    for i, (output,) in zip(fitting, outputs, strict=True):
        ranking, score = protocol.read(output.text, orders[i])
        verdicts[i] = Verdict(orders[i], output.text, ranking, output.finish_reason,
                              len(output.token_ids), score=score, prompt_ids=prompts[i],
                              token_ids=list(output.token_ids), logprobs=output.logprobs)
    return verdicts


@dataclass
class SelfRefereeResult:
    """Rewards of each group, and every referee verdict for metrics, samples and training."""
    rewards: list[list[float] | None]  # per group: one reward per answer; None if dropped
    dropped: int  # groups without a complete balanced set of valid verdicts (no gradient)
    verdicts: list[Verdict]  # group by group, as the protocol's jobs ask (those that fit)
    skipped_long: int = 0  # referee prompts that did not fit in the engine's context (not run)
    unbalanced: int = 0  # valid verdicts left out: their set's other verdict failed


def self_referee(engine, tokenizer, conversations: list[list[dict]], answers: list[list[str]],
                 num_orders: int, temperature: float, max_new_tokens: int,
                 rng: random.Random, think: bool = True,
                 protocol: Protocol = PROTOCOLS["listwise"]) -> SelfRefereeResult:
    """The self-referee pass (README.md, "The method"): `engine` (the policy's, or the baseline
    arm's frozen referee) judges answers[g] to conversations[g] in the verdicts the `protocol`'s
    jobs ask for (listwise: `num_orders` balanced orders of the whole group; data.PROTOCOLS),
    each sampled at `temperature` within `max_new_tokens` (the referee's own settings, as when
    it is trained). Rewards come from complete balanced sets only (protocol.self_rewards):
    listwise, an order and its reverse, both valid; in a ranking of n answers position p scores
    (n - 1 - p) / (n - 1), averaged per answer. A valid verdict whose set failed (did not parse,
    was cut by the budget, or did not fit the context) is left out and counted in `unbalanced`:
    alone it would pay shown position. A group with no complete set is dropped. E.g. orders
    [1, 0], [0, 1] both judged "[1] > [2]" give [0.5, 0.5]; the same with the second verdict
    invalid gives None, not [0.0, 1.0]. Each verdict's `order` holds answer indices of its
    group. ValueError on an odd num_orders (listwise)."""
    if len(conversations) != len(answers):
        raise ValueError(f"need one conversation per group of answers; got {len(conversations)} "
                         f"and {len(answers)}")
    jobs = protocol.jobs(answers, num_orders, rng)
    verdicts = referee(engine, tokenizer, [conversations[g] for g, _, _ in jobs],
                       [answers[g] for g, _, _ in jobs], [shown for _, shown, _ in jobs],
                       temperature, max_new_tokens, think, protocol)
    kept, sets = [], [defaultdict(list) for _ in answers]  # per group: set -> its verdicts
    for (group, _, unit), verdict in zip(jobs, verdicts):
        if verdict is not None:
            verdict.group = group
            kept.append(verdict)
        sets[group][unit].append(verdict if verdict is not None and verdict.valid else None)
    rewards, unbalanced = [], 0
    for group, group_answers in enumerate(answers):
        group_rewards, left_out = protocol.self_rewards(list(sets[group].values()),
                                                        len(group_answers))
        rewards.append(group_rewards)
        unbalanced += left_out
    return SelfRefereeResult(rewards, sum(r is None for r in rewards), kept,
                             len(verdicts) - len(kept), unbalanced)


# --- The vLLM engine and the log-prob gap guard ----------------------------------------------
# One in-process engine per rank (a full copy): the sync passes tensors by reference. After
# each sync the weight check (below) compares the engine's weights with the trainer's exactly,
# then engine and trainer score the same sequences: that gap is numerics (kernels, bf16), the
# sampler mismatch the IS weights correct; far above noise (a wrong dtype, a config the engine
# reads otherwise) it stops the run. CI runs CPU only: not sleep mode, CUDA graphs, NCCL.

log = logging.getLogger(__name__)
# vLLM warns at every sync that the rotary embedding got no weights: it has none to get
logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(
    lambda record: not record.getMessage().startswith("RotaryEmbedding: Failed to load"))

VLLM_VERSION = "0.32.0"  # the release whose weight-loading internals `_reload_weights` uses


def _reload_weights(worker, state_dict: dict[str, torch.Tensor]) -> None:
    """In vLLM's worker, the one use of vLLM internals: `Worker.reload_weights` takes HF names
    and copies in place (CUDA graphs stay valid), a decoder layer at a time as its tensors
    arrive in state-dict order, so at most one layer's extra copy is on the device."""
    def tensors():
        for name, tensor in state_dict.items():
            full_tensor = getattr(tensor, "full_tensor", None)  # DTensor: all-gather its shards
            yield name, (full_tensor() if callable(full_tensor) else tensor)
    worker.reload_weights(weights_iterator=tensors())


class VLLMEngine:
    """Rollouts with vLLM. `enable_sleep` frees weights and KV cache between rollouts (CUDA; one
    sleep-mode allocator per process, so a second engine there must not ask). `max_model_len`
    (None: the model's) becomes `context_len`. CPU: `cpu_kv_cache_gib` of KV cache, eager.
    `rng`, the whole random state, gives one seed per prompt per call (resumable)."""

    def __init__(self, model_path: str, tokenizer, dtype: torch.dtype = torch.float32, device="cpu",
                 seed: int = 0, gpu_memory_utilization: float = 0.3, enable_sleep: bool = False,
                 max_model_len: int | None = None, cpu_kv_cache_gib: float = 2.0,
                 trust_remote_code: bool = False):
        # In-process engine core (tensors by reference); set before vLLM reads its environment.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        try:
            import vllm
        except ImportError as error:
            raise ImportError(
                f"--rollout vllm needs vLLM ({error}). Install requirements-vllm-cuda.txt on GPU "
                f"nodes or requirements-vllm-cpu.txt on CPU machines, or use --rollout hf."
            ) from error
        if vllm.__version__.split("+")[0] != VLLM_VERSION:
            log.warning("vLLM %s is installed; the weight sync was written and tested for %s. The "
                        "log-prob guard will stop the run if weights stop arriving.",
                        vllm.__version__, VLLM_VERSION)
        self.tokenizer = tokenizer
        on_cpu = torch.device(device).type == "cpu"
        self.sleep_enabled = enable_sleep and not on_cpu
        if enable_sleep and on_cpu:
            log.warning("vLLM has no sleep mode on CPU: enable_sleep is ignored")
        distributed = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        self.rng = random.Random(seed)
        self.llm = vllm.LLM(
            model=model_path, dtype=dtype, seed=seed, trust_remote_code=trust_remote_code,
            max_model_len=max_model_len, tensor_parallel_size=1,
            distributed_executor_backend="external_launcher" if distributed else None,
            # sampled-token log-probs of softmax(logits / T), the distribution the trainer scores
            logprobs_mode="processed_logprobs",
            enable_prefix_caching=True,  # referee prompts repeat the player's conversation
            # EOS ids from the model's generation config (as HFEngine), not its top-k/p/penalty
            generation_config="vllm",
            gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=self.sleep_enabled,
            enforce_eager=on_cpu,  # no graph capture on CPU; CUDA graphs on GPU
            kv_cache_memory_bytes=int(cpu_kv_cache_gib * 2**30) if on_cpu else None)
        self.context_len = self.llm.llm_engine.model_config.max_model_len  # given, or the model's

    def generate(self, prompt_ids: list[list[int]], n: int, temperature: float,
                 max_new_tokens: int) -> list[list[Completion]]:
        """n completions of each prompt (token ids); temperature 0 decodes greedily. ValueError
        on a bad request (check_request)."""
        from vllm import SamplingParams
        check_request(prompt_ids, n, temperature, max_new_tokens,
                      self.llm.llm_engine.model_config.get_vocab_size())
        sampling = [SamplingParams(
            n=n, temperature=temperature, max_tokens=max_new_tokens,
            logprobs=0 if temperature > 0 else None,  # 0: only the sampled token's log-prob
            seed=self.rng.getrandbits(62),  # the n samples of a prompt use seed, seed + 1, ...
            detokenize=False, flat_logprobs=True,  # decoded below as HFEngine does; fewer objects
        ) for _ in prompt_ids]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], sampling,
                                    use_tqdm=False)
        results = []
        for output in outputs:
            completions = []
            for sample in output.outputs:
                if sample.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"vLLM ended a request with {sample.finish_reason!r}")
                token_ids = list(sample.token_ids)  # a stop token stays in: the trainer learns it
                completions.append(Completion(
                    token_ids=token_ids,
                    text=completion_text(self.tokenizer, token_ids,
                                         token_ids[-1:] if sample.finish_reason == "stop" else ()),
                    finish_reason="eos" if sample.finish_reason == "stop" else "length",
                    logprobs=list(sample.logprobs.logprobs) if temperature > 0 else None))
            results.append(completions)
        return results

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load full tensors or FSDP2 DTensors (every rank at once); drop the stale prefix cache."""
        self.llm.collective_rpc(_reload_weights, args=(state_dict,))
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache after a weight sync: "
                               "requests are still running; sync only between rollouts")

    def prompt_logprobs(self, token_ids_list: list[list[int]]) -> list[list[float]]:
        """log p_1(ids[t] | ids[:t]) for t >= 1 of each sequence (prompt tokens: raw logits)."""
        from vllm import SamplingParams
        scoring = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0,
                                 detokenize=False, flat_logprobs=True)
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in token_ids_list], scoring,
                                    use_tqdm=False)
        return [list(output.prompt_logprobs.logprobs) for output in outputs]

    def weight_samples(self, shapes: dict[str, tuple], samples: int) -> dict:
        """The weight check's engine side, read in vLLM's worker (as the sync writes there):
        {name: (dtype, strided_samples)} of the tensor holding each trainer tensor, fused ones
        sliced (engine_tensor); None where the engine holds none."""
        return self.llm.collective_rpc(_engine_weight_samples, args=(shapes, samples))[0]

    def sleep(self) -> None:
        """Free weights and KV cache (CUDA only); level 2 discards weights the sync overwrites."""
        if self.sleep_enabled:
            self.llm.sleep(level=2)

    def wake_up(self) -> None:
        """Take the memory back before the next sync and rollout (CUDA only)."""
        if self.sleep_enabled:
            self.llm.wake_up()

    def close(self) -> None:
        """Shut down; also destroys torchrun's process group: call after the last collective."""
        self.llm.llm_engine.engine_core.shutdown()


class StaleWeightsError(RuntimeError):
    """The rollout engine does not hold the trainer's weights, or computes another function of
    them."""


@torch.no_grad()
def trainer_prompt_logprobs(policy, token_ids_list: list[list[int]]) -> list[list[float]]:
    """The guard's trainer side: log p_1(ids[t] | ids[:t]), t >= 1; every FSDP rank calls it."""
    device = next(policy.parameters()).device
    width = max(len(ids) for ids in token_ids_list)
    input_ids = torch.zeros(len(token_ids_list), width, dtype=torch.long)  # [B, T], right-padded
    attention_mask = torch.zeros(len(token_ids_list), width, dtype=torch.long)  # [B, T]
    for row, ids in enumerate(token_ids_list):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention_mask[row, :len(ids)] = 1
    scored = attention_mask.clone()  # [B, T]
    scored[:, 0] = 0  # the first token has no prefix
    logprobs, _ = completion_logprobs(policy, input_ids.to(device), attention_mask.to(device),
                                      scored.to(device), temperature=1.0)  # [B, T]
    return [logprobs[row, 1:len(ids)].tolist() for row, ids in enumerate(token_ids_list)]


def logprob_gap(engine, trainer_logprob_fn, token_ids_list: list[list[int]]) -> tuple[float, float]:
    """Mean and max |engine - trainer| log-prob over tokens t >= 1, both at temperature 1 (vLLM
    does not scale prompt log-probs). A synced fp32 engine agrees up to rounding; bf16 less."""
    engine_side = engine.prompt_logprobs(token_ids_list)
    trainer_side = trainer_logprob_fn(token_ids_list)
    gaps = torch.cat([(torch.tensor(a, dtype=torch.float64)
                       - torch.tensor(b, dtype=torch.float64)).abs()
                      for a, b in zip(engine_side, trainer_side, strict=True)])  # [tokens]
    if len(gaps) == 0:
        raise ValueError("logprob_gap needs sequences of at least 2 tokens: "
                         "the first has no prefix")
    return gaps.mean().item(), gaps.max().item()


def check_logprob_gap(mean_gap: float, max_gap: float, threshold: float, step: int) -> None:
    """Stop the run when the mean gap is far above numeric noise (the weights are checked exactly
    before: check_weights), i.e. the engine computes another function of the same weights."""
    if not mean_gap <= threshold:  # also catches NaN
        raise StaleWeightsError(
            f"step {step}: the rollout engine's log-probabilities differ from the trainer's by "
            f"{mean_gap:.4g} on average (max {max_gap:.4g}; --logprob_gap_max {threshold:g}; "
            f"bf16 noise is ~0.05) although it holds the same weights: it computes another "
            f"function of them (a dtype, attention kernel, RoPE scaling or sliding window that "
            f"it reads otherwise from the model's config?). Raise --logprob_gap_max only if the "
            f"gap is rounding and stays flat over the steps.")


# --- The weight check: the sync verified exactly -----------------------------------------------
# After each sync the engine's weights are compared with the trainer's, element for element, on
# fixed strided samples of every tensor (WEIGHT_SAMPLES each), the trainer's cast to the dtype
# the engine holds the tensor in, so bf16 rounding is the same on both sides and "equal" means
# equal. One AdamW step at lr 1e-6 moves every fp32 weight and flips a few percent of bf16 ones
# (those near a rounding boundary): a stale or partly loaded engine differs in some sampled
# element of some tensor whatever the dtype, where the log-prob gap cannot tell it from noise.

WEIGHT_SAMPLES = 1024  # sampled elements per tensor (all of a smaller one)


def sample_stride(numel: int, samples: int = WEIGHT_SAMPLES) -> tuple[int, int]:
    """(stride, count): the flat positions 0, stride, ..., (count - 1) * stride of a tensor of
    `numel` elements. The stride is odd so that, with power-of-two rows, successive samples fall
    in different columns (an even stride that is a multiple of the row length samples column 0
    only)."""
    stride = max(1, numel // samples) | 1
    return stride, min(samples, -(-numel // stride))


def strided_samples(tensor: torch.Tensor, samples: int = WEIGHT_SAMPLES) -> torch.Tensor:
    """The elements of `tensor` (any shape, any float dtype, any device) at sample_stride's flat
    positions, as exact float64 values on the CPU: [count]."""
    stride, count = sample_stride(tensor.numel(), samples)
    positions = torch.arange(count, device=tensor.device) * stride  # [count]
    return tensor.reshape(-1)[positions].double().cpu()


def _local_part(tensor: torch.Tensor) -> tuple[torch.Tensor | None, int]:
    """(the flat elements this rank contributes, the global flat position of the first): an
    FSDP2 shard (Shard(0) over every rank) as it lies, rows split as torch.chunk splits them; a
    plain tensor, which every rank holds whole, from rank 0 only; anything else gathered."""
    distributed = torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    if not hasattr(tensor, "to_local"):
        return (tensor.reshape(-1) if rank == 0 else None), 0
    from torch.distributed.tensor import Shard
    mesh = tensor.device_mesh
    if (tuple(tensor.placements) == (Shard(0),) and mesh.ndim == 1
            and mesh.size() == torch.distributed.get_world_size()):
        rows = tensor.shape[0]
        first_row = min(mesh.get_local_rank() * -(-rows // mesh.size()), rows)
        return tensor.to_local().reshape(-1), first_row * (tensor.numel() // max(rows, 1))
    full = tensor.full_tensor()  # collective: every rank gathers
    return (full.reshape(-1) if rank == 0 else None), 0


@torch.no_grad()
def trainer_weight_samples(state_dict: dict[str, torch.Tensor], dtypes: dict[str, torch.dtype],
                           samples: int = WEIGHT_SAMPLES) -> dict[str, torch.Tensor]:
    """The check's trainer side: strided_samples of each tensor named in `dtypes`, cast to that
    dtype (the engine's), as if gathered, without gathering an FSDP2 shard: each rank fills the
    positions its shard holds and one all-reduce (sums with zeros: exact) joins them. Collective:
    every rank calls it with the same names. {name: [count] float64 on the CPU}."""
    parts, buffers = [], []
    for name, dtype in dtypes.items():
        tensor = state_dict[name]
        stride, count = sample_stride(tensor.numel(), samples)
        local, first = _local_part(tensor)
        buffer = torch.zeros(count, dtype=torch.float64, device=tensor.device)  # [count]
        if local is not None and local.numel():
            begin = -(-first // stride)  # the first sample at or after `first`
            end = min(count, -(-(first + local.numel()) // stride))
            positions = torch.arange(begin, end, device=local.device) * stride - first
            buffer[begin:end] = local[positions].to(dtype).double()
        parts.append(count)
        buffers.append(buffer)
    if not buffers:
        return {}
    joined = torch.cat([b.to(buffers[0].device) for b in buffers])  # [sum of counts]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(joined)
    return dict(zip(dtypes, joined.cpu().split(parts), strict=True))


def engine_tensor(params: dict[str, torch.Tensor], name: str, shapes: dict[str, tuple],
                  packed: dict[str, list[str]]) -> torch.Tensor | None:
    """The engine's tensor that holds the trainer's `name` (shape shapes[name]), None if none
    does: the same name, or its rows of a fused one (vLLM's packed_modules_mapping, e.g.
    qkv_proj = q_proj, k_proj, v_proj stacked by rows); rows beyond the trainer's (vLLM pads the
    vocabulary) are left out."""
    tensor = params.get(name)
    if tensor is None:
        for fused, parts in packed.items():
            part = next((p for p in parts if f".{p}." in name), None)
            if part is None or name.replace(f".{part}.", f".{fused}.") not in params:
                continue
            tensor = params[name.replace(f".{part}.", f".{fused}.")]
            start = sum(shapes[name.replace(f".{part}.", f".{p}.")][0]
                        for p in parts[:parts.index(part)])
            tensor = tensor[start:]
            break
    shape = tuple(shapes[name])
    if tensor is None or tuple(tensor.shape[1:]) != shape[1:] or tensor.shape[0] < shape[0]:
        return None
    return tensor[:shape[0]]


def _engine_weight_samples(worker, shapes: dict[str, tuple], samples: int) -> dict:
    """In vLLM's worker: {name: (dtype, strided_samples)} of the tensor holding each trainer
    tensor (engine_tensor), or None where the engine holds none."""
    model = worker.get_model()
    params = dict(model.named_parameters(remove_duplicate=False))
    packed = getattr(model, "packed_modules_mapping", {}) or {}
    found = {name: engine_tensor(params, name, shapes, packed) for name in shapes}
    return {name: None if tensor is None else (tensor.dtype, strided_samples(tensor, samples))
            for name, tensor in found.items()}


def compare_weights(engine_side: dict, trainer_side: dict[str, torch.Tensor]) -> str | None:
    """None when every sampled element is equal; else one line naming the first tensor that
    differs (state-dict order), how many of its samples differ and by how much at most, and how
    many other tensors differ. `engine_side`: {name: (dtype, samples) or None (not compared)}."""
    if not trainer_side:  # nothing to compare is no proof of a sync
        return (f"it holds none of the trainer's {len(engine_side)} tensors by name (e.g. "
                f"{next(iter(engine_side), 'none')}) and shape")
    differing = []
    for name, trainer_values in trainer_side.items():
        dtype, engine_values = engine_side[name]
        unequal = (engine_values != trainer_values) & ~(engine_values.isnan()
                                                        & trainer_values.isnan())
        if unequal.any():
            differing.append((name, int(unequal.sum()), len(unequal), (
                engine_values - trainer_values)[unequal].abs().max().item(), dtype))
    if not differing:
        return None
    name, count, total, largest, dtype = differing[0]
    more = f"; {len(differing) - 1} more tensors differ" if len(differing) > 1 else ""
    return (f"{name} differs in {count} of {total} sampled elements (largest by {largest:.3g}, "
            f"both in {str(dtype).removeprefix('torch.')}){more}")


def check_weights(difference: str | None, step: int) -> None:
    """Stop the run when the engine does not hold the weights the trainer has (compare_weights
    gave a difference)."""
    if difference is not None:
        raise StaleWeightsError(
            f"step {step}: the rollout engine does not hold the trainer's weights: {difference}. "
            f"The weight sync did not arrive, or arrived in part (vLLM version other than "
            f"{VLLM_VERSION}? parameter names the engine does not load?): fix the sync.")
