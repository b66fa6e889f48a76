"""URPO training: one model, one GRPO loop, two roles (player and referee).

Each step draws a batch mixing three kinds of prompts (URPO.md):
  verifiable  the player answers a math problem; rule-checked reward (math_reward)
  preference  the referee ranks K given answers; reward = agreement with the gold ranking
  open        the player answers an instruction; the same model then judges the group of
              answers in M shuffled orders, and those self-judgements are the player's reward
and runs them through one GRPO update. The loop in `main` is the algorithm; every phase has a
banner (sample, roll out, judge, reward, advantage, loss, step, sync, eval, log, checkpoint).
The pieces it calls sit above it in the same order.

Run:
  python train.py                                        # CPU default: SmolLM2-135M, minutes
  torchrun --nproc_per_node=8 train.py --preset paper    # Qwen2.5-7B-Instruct on one 8-GPU node
  torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
      train.py --preset paper                            # multi-node: same command on each node
  python train.py --help                                 # every flag, with its default
  python train.py export RUN/checkpoints/step_0000100 OUT  # any checkpoint as an HF folder
  python train.py plot RUN [OUT.png]                     # any run's curves from its metrics.jsonl

Everything a run writes lands in --out_dir: config.json, metrics.jsonl (one line per step),
samples.jsonl (every --samples_every steps), checkpoints/, and final/ (a plain HF folder).
"""
import argparse
import dataclasses
import datetime
import importlib.util
import inspect
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from tqdm import tqdm

import data
import eval as evaluation
import model as model_lib
import rollout
from grpo import group_advantages, grpo_loss, truncated_is_weights
from data import TASKS
from reward import math_rewards, parse_ranking, ranking_reward, timed_out_checks, to_original

@dataclass
class Config:
    preset: str = "cpu"  # named set of overrides applied before the flags: cpu, cpu_long, paper, baseline_referee, baseline_player
    # model and data
    model: str = model_lib.DEFAULT_MODEL  # hub id or local HF folder of the policy (player and referee)
    trust_remote_code: bool = False  # allow model code from the hub (only for models that need it)
    verifiable_data: str = "gsm8k:samples/gsm8k/train.first200.jsonl"  # data.py spec: registry key or KEY:PATH
    preference_data: str = "hh_rlhf:samples/hh_rlhf/helpful-base/test.rows101-1000.jsonl.gz"  # referee training data (disjoint from the held-out rows 1-100)
    open_data: str = "ultrafeedback_prompts:samples/ultrafeedback_binarized/train_prefs.first200.jsonl"  # open instructions, self-judged
    data_limit: int = 0  # read at most this many records per source (0: all)
    task_weights: str = "verifiable=1,preference=1,open=1"  # share of each task in a batch
    # rollout
    rollout: str = "auto"  # rollout engine: vllm, hf (a sampling loop over the transformers model), or auto (vllm where installed)
    prompts_per_step: int = 3  # prompts per step across all ranks, each a group of group_size completions
    group_size: int = 4  # G: completions sampled per prompt
    temperature: float = 1.0  # sampling temperature; log-probabilities are taken at the same one
    max_prompt_tokens: int = 384  # longer prompts are skipped and counted, never truncated
    max_new_tokens: int = 64  # generation budget of trained completions
    referee_orders: int = 2  # M: shuffled orders in which the referee sees each open group
    judge_max_new_tokens: int = 32  # generation budget of a referee verdict (self-judging and evaluation)
    referee_think: bool = False  # verdicts open with brief reasoning in <think></think> (off: the ranking alone, for small budgets)
    referee_model: str = ""  # baseline arm: judge open groups with this frozen model instead of the policy
    max_model_len: int = 0  # context of the rollout engines, prompt + generation (0: the model's own); longer referee and eval prompts are skipped and counted
    is_cap: float = 2.0  # vllm rollouts: cap of the truncated importance weight exp(old - sampler logp)
    vllm_memory: float = 0.3  # vllm on GPU: the engine's share of GPU memory (weights + KV cache)
    vllm_sleep: bool = True  # vllm on GPU: free the engine's memory while the trainer runs
    referee_vllm_memory: float = 0.25  # vllm on GPU, baseline arm: the frozen referee engine's share of GPU memory (it never sleeps)
    logprob_gap_max: float = 1e-3  # vllm: stop when engine and trainer log-probs differ more (mean |gap|)
    # loss
    loss_agg: str = "token-mean"  # token-mean (DAPO), seq-mean (GRPO), seq-sum-norm (Dr. GRPO)
    scale_advantages: bool = True  # divide advantages by the group std (off: Dr. GRPO)
    clip_low: float = 0.2  # ratio clip below 1 - clip_low
    clip_high: float = 0.28  # ratio clip above 1 + clip_high (clip-higher)
    kl_coef: float = 0.0  # k3 KL weight to a frozen reference model (0: none is loaded)
    skip_zero_advantage: bool = True  # leave groups with all-zero advantages out of the update (needs kl_coef=0)
    # optimisation
    steps: int = 10  # training steps: one rollout batch each, then updates_per_batch optimizer steps
    updates_per_batch: int = 1  # mu: optimizer steps per rollout batch (old log-probs taken once)
    lr: float = 1e-5  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 0  # linear LR warm-up over this many optimizer steps
    max_grad_norm: float = 1.0  # gradient clipping
    micro_batch_tokens: int = 4096  # token budget of one forward/backward (padded length x sequences)
    share_prompt: bool = True  # run a group's prompt once, its completions packed behind it in one sequence
    activation_checkpointing: bool = False  # recompute decoder layers in backward to save memory
    bf16: bool = True  # on CUDA: bf16 compute with fp32 master weights (CPU always runs fp32)
    max_bad_steps: int = 3  # stop after this many non-finite steps in a row
    cold_start_steps: int = 6  # supervised steps on gold-formatted targets before GRPO (ours, not the paper's; 0: off)
    cold_start_lr: float = 5e-5  # AdamW learning rate of the cold start (its own optimizer, dropped after)
    cold_start_batch: int = 4  # examples per cold-start step, all ranks
    dist_timeout_min: int = 60  # collective timeout in minutes: rank 0 alone may download the model or export it, and ranks wait for the slowest rollout
    # run folder, logging, checkpoints, eval
    out_dir: str = "runs/urpo"  # where the run writes everything
    seed: int = 0  # one seed for data order, shuffles and sampling
    samples_every: int = 5  # write prompts, completions and rewards every N steps (0: never)
    save_every: int = 0  # checkpoint every N steps (0: only at the end and on SIGTERM)
    keep_checkpoints: int = 2  # keep the newest N checkpoints
    resume: bool = False  # continue from the newest checkpoint in out_dir
    eval_every: int = 0  # evaluate on held-out sets every N steps (0: never)
    eval_data: str = "gsm8k:samples/gsm8k/test.first100.jsonl,hh_rlhf:samples/hh_rlhf/helpful-base/test.first100.jsonl.gz"  # held-out sets, comma-separated data.py specs
    eval_limit: int = 8  # examples per held-out set (the first ones whose prompt fits in max_prompt_tokens)
    eval_max_new_tokens: int = 96  # token budget of an answer during evaluation (a verdict's: judge_max_new_tokens)
    eval_start_end: bool = True  # also evaluate before the cold start and the first step, and after the last
    plot: bool = True  # draw curves.png from metrics.jsonl at the end (python train.py plot RUN draws any run's)
    wandb: str = ""  # wandb project name (logs there too when set and installed)


PRESETS = {
    "cpu": {},
    "paper": dict(
        model="Qwen/Qwen2.5-7B-Instruct", rollout="vllm", verifiable_data="math",
        preference_data="ultrafeedback", open_data="ultrafeedback_prompts",
        prompts_per_step=384, group_size=8, max_prompt_tokens=2048, max_new_tokens=2048,
        logprob_gap_max=0.05,  # bf16 engines differ from the fp32 trainer by rounding
        judge_max_new_tokens=1024, lr=1e-6, warmup_steps=10, steps=1000, referee_think=True, cold_start_steps=0,
        micro_batch_tokens=32768, activation_checkpointing=True, save_every=50,
        share_prompt=False,  # 8 long completions behind one prompt: the masked attention would cost more than the prompt saves
        eval_every=50, eval_limit=256, eval_max_new_tokens=2048, samples_every=10,
    ),
    # The CPU default, run for about an hour on 2 cores: does anything move beyond the start?
    "cpu_long": dict(steps=80, eval_every=20, eval_limit=16, out_dir="runs/urpo_cpu_long"),
    # Baseline arm, stage 1: a separate referee trained on preference data alone.
    "baseline_referee": dict(task_weights="verifiable=0,preference=1,open=0", out_dir="runs/baseline_referee"),
    # Baseline arm, stage 2: the player trained with that referee frozen (pass --referee_model).
    "baseline_player": dict(task_weights="verifiable=1,preference=0,open=1",
                            referee_model="runs/baseline_referee/final", out_dir="runs/baseline_player"),
}


def parse_config(argv=None) -> Config:
    """Config from the command line: the preset's overrides first, then explicit flags."""
    helps = _field_help()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="cpu")
    preset = pre.parse_known_args(argv)[0].preset
    if preset not in PRESETS:
        raise SystemExit(f"unknown --preset {preset!r}; known presets: {', '.join(PRESETS)}")
    defaults = {**dataclasses.asdict(Config()), **PRESETS[preset], "preset": preset}
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        default = defaults[f.name]
        kwargs = dict(default=default, help=f"{helps[f.name]} (default: {default!r})")
        if isinstance(default, bool):
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, **kwargs)
        else:
            parser.add_argument(f"--{f.name}", type=type(default), **kwargs)
    cfg = Config(**vars(parser.parse_args(argv)))
    check_config(cfg)
    return cfg


def _field_help() -> dict[str, str]:
    """The one-line comment after each Config field, so the dataclass is the only place to document a flag."""
    pattern = re.compile(r"^\s+(\w+): [^=]+=.*#\s*(.*)$")
    return {m[1]: m[2] for m in map(pattern.match, inspect.getsource(Config).splitlines()) if m}


def check_config(cfg: Config) -> None:
    """Reject settings that cannot work before any model is loaded."""
    problems = []
    if cfg.loss_agg not in ("token-mean", "seq-mean", "seq-sum-norm"):
        problems.append(f"--loss_agg {cfg.loss_agg!r}: use token-mean, seq-mean or seq-sum-norm")
    if cfg.rollout == "auto":
        cfg.rollout = "vllm" if importlib.util.find_spec("vllm") else "hf"
    if cfg.rollout not in ("hf", "vllm"):
        problems.append(f"--rollout {cfg.rollout!r}: use vllm, hf or auto")
    if cfg.group_size < 2:
        problems.append(f"--group_size {cfg.group_size}: GRPO needs at least 2 samples per prompt")
    if cfg.temperature <= 0:
        problems.append("--temperature must be > 0 (log-probabilities are taken at the sampling temperature)")
    if cfg.referee_orders < 1:
        problems.append("--referee_orders must be >= 1")
    if cfg.updates_per_batch < 1 or cfg.steps < 1:
        problems.append("--steps and --updates_per_batch must be >= 1")
    if cfg.cold_start_steps < 0:
        problems.append(f"--cold_start_steps {cfg.cold_start_steps}: use 0 (no cold start) or more")
    if cfg.cold_start_batch < 1:
        problems.append(f"--cold_start_batch {cfg.cold_start_batch}: needs at least 1 example per step")
    if cfg.max_model_len < 0:
        problems.append(f"--max_model_len {cfg.max_model_len}: use 0 (the model's own context) or more")
    if cfg.dist_timeout_min <= 0:
        problems.append(f"--dist_timeout_min {cfg.dist_timeout_min}: a collective needs a timeout > 0 minutes")
    try:
        weights = task_weights(cfg)
        if sum(weights.values()) <= 0:
            problems.append("--task_weights: at least one task needs a positive weight")
    except ValueError as e:
        problems.append(str(e))
    if problems:
        raise SystemExit("invalid configuration:\n  " + "\n  ".join(problems))


def engine_options(cfg: Config, role: str) -> dict:
    """make_engine's options for the policy's engine (role "policy") or the baseline arm's frozen
    referee ("referee"). Only the policy's engine syncs, so only it sleeps while the trainer runs:
    vLLM allows one sleep-mode allocator per process, and a second engine asking for it fails at
    its first weight load. The referee stays resident on its own, smaller share of the GPU."""
    if role not in ("policy", "referee"):
        raise ValueError(f"unknown engine role {role!r}: policy or referee")
    options = dict(context_len=cfg.max_model_len or None, trust_remote_code=cfg.trust_remote_code)
    if cfg.rollout != "vllm":
        return options
    if role == "policy":
        return options | dict(gpu_memory_utilization=cfg.vllm_memory, enable_sleep=cfg.vllm_sleep)
    return options | dict(gpu_memory_utilization=cfg.referee_vllm_memory, enable_sleep=False)


def task_weights(cfg: Config) -> dict[str, float]:
    weights = {}
    for item in filter(None, cfg.task_weights.split(",")):
        name, _, value = item.partition("=")
        if name.strip() not in TASKS or not value:
            raise ValueError(f"--task_weights {cfg.task_weights!r}: expected e.g. verifiable=1,preference=1,open=1")
        weights[name.strip()] = float(value)
    return weights


# ----------------------------------------------------------------------------------------------
# Distributed plumbing: every rank runs this same script; rank 0 also prints and writes.


def init_distributed(timeout_min: float = 60) -> tuple[int, int, torch.device]:
    """gloo on CPU, NCCL on GPU; a one-process group when not launched by torchrun.

    `timeout_min` bounds every collective. The backends' defaults (NCCL: 10 min) are shorter
    than a 15 GB model download on one rank, a final export, or a long rollout on a slow rank,
    while the others wait at the next collective."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(minutes=timeout_min)
    if "RANK" in os.environ:  # torchrun (single- or multi-node rendezvous) set the env
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=timeout)
    else:  # plain `python train.py`: the same code path with world size 1, no port needed
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        local_rank = 0
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def all_reduce(values: list, op=dist.ReduceOp.SUM) -> list[float]:
    """Reduce a few numbers across ranks in one collective (every rank must call it).

    Values may be floats or 0-dim tensors still on the GPU: they are stacked where they are and
    read back in one transfer, so a step's metrics cost one host sync, not one per value."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.stack([value.detach().to(device, torch.float64).reshape(()) if torch.is_tensor(value)
                     else torch.full((), float(value), dtype=torch.float64, device=device)
                     for value in values]) if values else torch.zeros(0, dtype=torch.float64, device=device)  # [n]
    dist.all_reduce(t, op=op)
    return t.tolist()


class Tally:
    """Per-step metric sums and counts, reduced across ranks in one all-reduce at log time."""

    def __init__(self):
        self.sums, self.counts = defaultdict(float), defaultdict(float)

    def add(self, name: str, value, count=1.0) -> None:
        """value and count: floats, or 0-dim tensors left on their device until reduce()."""
        self.sums[name] = self.sums[name] + value * count
        self.counts[name] = self.counts[name] + count

    def reduce(self) -> dict[str, float]:
        """Means across ranks; names starting with "count/" are totals instead."""
        names = [None] * dist.get_world_size()
        dist.all_gather_object(names, sorted(self.sums))  # ranks may have seen different tasks
        names = sorted(set().union(*names))
        totals = all_reduce([self.sums[n] for n in names] + [self.counts[n] for n in names])
        sums, counts = totals[: len(names)], totals[len(names):]
        return {n: s if n.startswith("count/") else s / c for n, s, c in zip(names, sums, counts) if c > 0}


def print0(*args) -> None:
    if dist.get_rank() == 0:
        tqdm.write(" ".join(str(a) for a in args))


# ----------------------------------------------------------------------------------------------
# One step's data: groups of completions, their rewards and advantages.


@dataclass
class Group:
    """G completions of one prompt, in one role."""
    record: dict  # the unified record (data.py)
    prompt_ids: list[int]  # the rendered prompt the G completions continue
    order: list[int] | None = None  # preference: order[j] is the response shown as [j+1]
    completions: list = dataclasses.field(default_factory=list)  # G rollout.Completion
    rewards: list[float] | None = None  # None: an open group no referee call could rank (dropped)
    advantages: list[float] | None = None


@dataclass
class Sample:
    """One completion to train on."""
    prompt_ids: list[int]
    completion_ids: list[int]
    advantage: float
    sampler_logprobs: list[float] | None = None  # the rollout engine's, for the IS correction


def render_prompt(record: dict, tokenizer, order: list[int] | None = None, think: bool = True) -> list[int]:
    """Token ids of a record's prompt: the referee template for preference records (candidates
    shown in `order`, a verdict with or without reasoning), the player template otherwise."""
    if record["task"] == "preference":
        order = order if order is not None else list(range(len(record["responses"])))
        return model_lib.chat_ids(tokenizer, data.referee_prompt(record["messages"], record["responses"], order, think))
    return model_lib.chat_ids(tokenizer, data.player_prompt(record))


def build_prompts(batch: list[dict], tokenizer, cfg: Config, rng: random.Random, tally: Tally) -> list[Group]:
    """Player prompts for verifiable and open records, referee prompts (candidates shuffled) for
    preference records."""
    groups = []
    for record in batch:
        order = rng.sample(range(len(record["responses"])), len(record["responses"])) if record["task"] == "preference" else None
        prompt_ids = render_prompt(record, tokenizer, order, cfg.referee_think)
        if len(prompt_ids) > cfg.max_prompt_tokens:  # another order can tokenize a little longer
            tally.add(f"count/skipped_long_prompts/{record['task']}", 1)
            continue
        groups.append(Group(record, prompt_ids, order))
    return groups


def score(groups: list[Group], judge_engine, cfg: Config, rng: random.Random, tally: Tally) -> list:
    """Fill in every group's rewards; returns the self-judging calls for the samples file."""
    by_task = {task: [g for g in groups if g.record["task"] == task] for task in TASKS}

    # Verifiable: math-verify on the last \boxed{} against the gold answer (a worker pool, bounded time).
    texts = [c.text for g in by_task["verifiable"] for c in g.completions]
    golds = [g.record["answer"] for g in by_task["verifiable"] for _ in g.completions]
    timed_out = timed_out_checks()
    flat = math_rewards(texts, golds)
    # A check that ran out of time scores 0 without the answer being wrong: count them, a
    # machine too busy for math-verify shows here before it shows as a lower reward.
    if texts:
        tally.add("count/math_timeouts/verifiable", timed_out_checks() - timed_out)
    for i, g in enumerate(by_task["verifiable"]):
        g.rewards = flat[i * cfg.group_size:(i + 1) * cfg.group_size]

    # Preference: the referee's ranking, mapped back to original indices, against the gold order.
    for g in by_task["preference"]:
        k = len(g.record["responses"])
        rankings = [to_original(parse_ranking(c.text, k), g.order) for c in g.completions]
        g.rewards = [ranking_reward(r, g.record["ranking"]) for r in rankings]
        for r in rankings:
            tally.add("referee/invalid_rate/preference", float(r is None))
            if r is not None:  # position bias: does the referee just pick the answer shown first?
                tally.add("referee/first_shown_best/preference", float(r[0] == g.order[0]))

    # Open: the referee (the policy itself, or the baseline's frozen referee) ranks each group.
    calls = []
    if by_task["open"]:
        judged = rollout.self_judge(  # the referee's own tokenizer: the baseline's may be another family
            judge_engine, judge_engine.tokenizer, [g.record["messages"] for g in by_task["open"]],
            [[c.text for c in g.completions] for g in by_task["open"]], cfg.referee_orders,
            cfg.temperature, cfg.judge_max_new_tokens, rng, cfg.referee_think)
        for g, rewards in zip(by_task["open"], judged.rewards):
            g.rewards = rewards
        tally.add("count/dropped_groups/open", judged.dropped)
        tally.add("count/skipped_long_prompts/referee", judged.skipped_long)
        calls = judged.calls
        judge_metrics(calls, tally)
    return calls


def judge_metrics(calls: list, tally: Tally) -> None:
    """Parse rate, first-position bias and agreement between the M orders of each open group."""
    tops = defaultdict(list)
    for call in calls:
        tally.add("referee/invalid_rate/open", float(call.ranking is None))
        if call.ranking is not None:
            tally.add("referee/first_shown_best/open", float(call.ranking[0] == call.order[0]))
            tops[call.group].append(call.ranking[0])
    for group_tops in tops.values():  # pairs of valid calls on the same group that agree on the best answer
        pairs = [(a, b) for i, a in enumerate(group_tops) for b in group_tops[i + 1:]]
        for a, b in pairs:
            tally.add("referee/order_agreement/open", float(a == b))


def advantages_and_samples(groups: list[Group], cfg: Config, tally: Tally) -> list[Sample]:
    """GRPO advantages per group, and the completions that carry a learning signal."""
    samples = []
    for g in groups:
        task = g.record["task"]
        lengths = [len(c.token_ids) for c in g.completions]
        tally.add(f"completion_len/{task}", sum(lengths) / len(lengths), len(lengths))
        tally.add(f"truncated/{task}", sum(c.finish_reason == "length" for c in g.completions) / len(lengths), len(lengths))
        if g.rewards is None:
            continue
        tally.add(f"reward/{task}", sum(g.rewards) / len(g.rewards))
        adv = group_advantages(torch.tensor(g.rewards), cfg.group_size, scale=cfg.scale_advantages)  # [G]
        g.advantages = adv.tolist()
        has_signal = bool(adv.abs().max() > 0)
        tally.add(f"nonzero_adv_share/{task}", float(has_signal))
        # A group of equal rewards has zero advantages: no policy gradient, only cost. Leaving it out
        # (as DAPO's dynamic sampling does) also keeps it out of the token-mean's denominator.
        if not has_signal and cfg.skip_zero_advantage and cfg.kl_coef == 0:
            continue
        for c, a in zip(g.completions, g.advantages):
            if c.token_ids:
                samples.append(Sample(g.prompt_ids, list(c.token_ids), a, c.logprobs))
    return samples


# ----------------------------------------------------------------------------------------------
# The update: micro-batches by a token budget, the GRPO loss, one optimizer step.


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


def collate(rows: list[list[Sample]], pad_id: int, device: torch.device, share_prompt: bool) -> dict:
    """The tensors of one micro-batch; completion_mask marks the tokens the loss is taken on.

    share_prompt: the rows packed by model.pack_rows, and the loss layout is [S, C], completion
    tokens only, samples in row order (what model.shared_prompt_logprobs returns).
    Otherwise one right-padded full sequence per sample: input_ids etc. [B, T]."""
    samples = [s for row in rows for s in row]
    has_sampler = all(s.sampler_logprobs is not None for s in samples)
    if share_prompt:
        batch = model_lib.pack_rows([(row[0].prompt_ids, [s.completion_ids for s in row]) for row in rows], device)
        completion_mask = batch["completion_mask"]  # [S, C]
        sampler_logprobs = torch.zeros(completion_mask.shape, device=device)  # [S, C]
        if has_sampler:  # the scored tokens come in sample order, as the samples' log-probs
            sampler_logprobs[batch["dst_rows"], batch["dst_cols"]] = torch.tensor(
                [lp for s in samples for lp in s.sampler_logprobs], device=device)
    else:
        length = max(len(s.prompt_ids) + len(s.completion_ids) for s in samples)
        input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)  # [B, T]
        attention_mask = torch.zeros(len(samples), length, dtype=torch.long)  # [B, T]
        completion_mask = torch.zeros(len(samples), length)  # [B, T]
        sampler_logprobs = torch.zeros(len(samples), length)  # [B, T]
        for i, s in enumerate(samples):
            p, n = len(s.prompt_ids), len(s.prompt_ids) + len(s.completion_ids)
            input_ids[i, :n] = torch.tensor(s.prompt_ids + s.completion_ids)
            attention_mask[i, :n] = 1
            completion_mask[i, p:n] = 1
            if has_sampler:
                sampler_logprobs[i, p:n] = torch.tensor(s.sampler_logprobs)
        batch = dict(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
    return batch | dict(completion_mask=completion_mask.to(device),
                        advantages=torch.tensor([s.advantage for s in samples], device=device),  # [S]
                        sampler_logprobs=sampler_logprobs.to(device) if has_sampler else None)


def backward_on_batch(model, samples: list[Sample], cfg: Config, pad_id: int, device: torch.device,
                      tally: Tally, ref_model=None, updates: int = 1):
    """Loss and gradients of this rank's samples, normalised by the global counts of the step.

    Yields once per update (mu times) after the backward of all micro-batches, with the global loss;
    the caller takes the optimizer step in between. Every rank runs the same number of micro-batches
    (FSDP's collectives must match): a rank short of data runs a dummy one whose loss is scaled by 0.
    """
    world = dist.get_world_size()
    batches = micro_batches(rows_of(samples, cfg.share_prompt, cfg.micro_batch_tokens), cfg.micro_batch_tokens)
    num_tokens, num_seqs = all_reduce([sum(len(s.completion_ids) for s in samples), len(samples)])
    num_micro = int(all_reduce([len(batches)], dist.ReduceOp.MAX)[0])
    dummy = Sample([pad_id], [pad_id], 0.0)
    weights = [1.0] * len(batches) + [0.0] * (num_micro - len(batches))
    tensors = [collate(b, pad_id, device, cfg.share_prompt) for b in batches + [[[dummy]]] * (num_micro - len(batches))]

    def logprobs(net, mb, with_entropy=False):  # [S, C] or [B, T], as collate laid the micro-batch out
        if cfg.share_prompt:
            return model_lib.shared_prompt_logprobs(net, mb, cfg.temperature, with_entropy)
        return model_lib.completion_logprobs(net, mb["input_ids"], mb["attention_mask"], mb["completion_mask"],
                                             temperature=cfg.temperature, with_entropy=with_entropy)

    with torch.no_grad():
        for mb in tensors:
            # With one update per batch, old log-probs equal the current ones: no extra forward is needed.
            mb["old"] = logprobs(model, mb)[0] if updates > 1 else None  # [B, T]
            mb["ref"] = logprobs(ref_model, mb)[0] if ref_model is not None else None  # [B, T]

    for update in range(updates):
        # Gradient buffers up front, one per parameter (FSDP then adds each micro-batch into them):
        # allocated inside the first backward, between its short-lived tensors, they fragment the
        # CPU heap, and the benchmark step's peak RSS was 0.2-0.3 GB higher.
        for param in model.parameters():
            if num_micro and param.requires_grad and param.grad is None:  # no rank has data: stay None,
                param.grad = torch.zeros_like(param)  # so that the optimizer step leaves the weights alone
        local_loss = 0.0
        for mb, weight in zip(tensors, weights):
            logp, entropy = logprobs(model, mb, with_entropy=update == 0)  # [B, T], [B, T]
            old = mb["old"] if mb["old"] is not None else logp.detach()  # [B, T]
            is_weights = None
            if cfg.rollout == "vllm" and mb["sampler_logprobs"] is not None:
                # Truncated IS: the sampler's numerics differ from the trainer's; reweight towards the trainer.
                is_weights = truncated_is_weights(old, mb["sampler_logprobs"], cfg.is_cap)  # [B, T]
            loss, metrics = grpo_loss(
                logp, old, mb["advantages"], mb["completion_mask"], mb["ref"], clip_low=cfg.clip_low,
                clip_high=cfg.clip_high, kl_coef=cfg.kl_coef, is_weights=is_weights, agg=cfg.loss_agg,
                num_tokens=num_tokens, num_seqs=num_seqs, max_len=cfg.max_new_tokens)
            # FSDP averages gradients over ranks; our loss is already normalised by the global counts,
            # so scale by the world size to turn that average back into the sum.
            (loss * weight * world).backward()
            model_lib.release_freed_memory(device)
            local_loss = local_loss + loss.detach() * weight
            if weight and update == 0:  # 0-dim tensors: read back once per step, in Tally.reduce
                mask = mb["completion_mask"]
                n = mask.sum()
                for name, value in metrics.items():
                    tally.add(name, value, n)
                tally.add("logprob_mean", (logp.detach() * mask).sum() / n, n)  # cold start: minus the NLL
                if entropy is not None:
                    tally.add("entropy", (entropy * mask).sum() / n, n)
                if is_weights is not None:
                    tally.add("is/weight_mean", (is_weights * mask).sum() / n, n)
                    tally.add("is/capped_frac", ((is_weights >= cfg.is_cap) * mask).sum() / n, n)
        yield all_reduce([local_loss])[0]


def optimizer_step(model, optimizer, scheduler, cfg: Config, loss: float) -> tuple[float, bool]:
    """Clip, check, step. Returns the pre-clip gradient norm and whether the step was taken.

    The loss and the norm are global (FSDP's clip reduces over all shards), so every rank takes the
    same decision: a non-finite loss or gradient skips the step everywhere."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    ok = math.isfinite(grad_norm) and math.isfinite(loss)
    if ok:
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, ok


# ----------------------------------------------------------------------------------------------
# Checkpoints: model and optimizer sharded through torch.distributed.checkpoint (any world size can
# read them back), plus each rank's RNG states and data position. Written to step_N.tmp and renamed,
# so a crash during a save never spoils the newest good checkpoint.


def checkpoint_dirs(out_dir: str) -> list[str]:
    root = os.path.join(out_dir, "checkpoints")
    names = sorted(n for n in os.listdir(root) if n.startswith("step_") and not n.endswith(".tmp")) if os.path.isdir(root) else []
    return [os.path.join(root, n) for n in names]


def save_checkpoint(cfg: Config, step: int, model, optimizer, scheduler, mixture, engine, bad_steps: int) -> str:
    rank = dist.get_rank()
    final = os.path.join(cfg.out_dir, "checkpoints", f"step_{step:07d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "engine": engine.rng.getstate(),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    torch.save({"step": step, "rng": rng, "mixture": mixture.state_dict(), "scheduler": scheduler.state_dict(),
                "bad_steps": bad_steps, "world_size": dist.get_world_size()},
               os.path.join(tmp, f"trainer_rank{rank}.pt"))
    dist.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)  # atomic: the checkpoint exists whole or not at all
        for old in checkpoint_dirs(cfg.out_dir)[:-max(cfg.keep_checkpoints, 1)]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path: str, model, optimizer, scheduler, mixture, engine) -> tuple[int, int]:
    """Restore everything save_checkpoint wrote; returns (step, bad_steps)."""
    rank_file = os.path.join(path, f"trainer_rank{dist.get_rank()}.pt")
    if not os.path.exists(rank_file):
        raise SystemExit(f"{path} has no state for rank {dist.get_rank()}: resume with the world size "
                         "it was saved with, or export it (python train.py --export CKPT OUT) and start anew")
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    trainer = torch.load(rank_file, weights_only=False)
    torch.set_rng_state(trainer["rng"]["torch"])
    random.setstate(trainer["rng"]["python"])
    engine.rng.setstate(trainer["rng"]["engine"])
    if trainer["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(trainer["rng"]["cuda"])
    mixture.load_state_dict(trainer["mixture"])
    scheduler.load_state_dict(trainer["scheduler"])
    return trainer["step"], trainer["bad_steps"]


class StopSignal:
    """SIGTERM/SIGINT ask the run to finish its current step, save, and exit 0."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:  # a second signal: the user really wants out now
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write(f"[rank {dist.get_rank()}] signal {signum}: finishing this step, then saving and exiting")

    def agreed(self) -> bool:
        """True on every rank when any rank was signalled (one collective, so no rank is left waiting)."""
        return all_reduce([float(self.requested)], dist.ReduceOp.MAX)[0] > 0


# ----------------------------------------------------------------------------------------------
# The run.


def load_sources(cfg: Config, tokenizer) -> dict[str, list[dict]]:
    """Each task's records; prompts longer than --max_prompt_tokens are dropped here, and counted
    (never truncated: a cut conversation or candidate would change what is being judged)."""
    sources = {}
    for task, weight in task_weights(cfg).items():
        if weight <= 0:
            continue
        spec = getattr(cfg, f"{task}_data")
        records, skipped = data.load_with_counts(spec, limit=cfg.data_limit or None)
        wrong = {r["task"] for r in records} - {task}
        if wrong:
            raise SystemExit(f"--{task}_data {spec!r} holds {sorted(wrong)} records; pick a {task} source")
        fitting = [r for r in records if len(render_prompt(r, tokenizer, think=cfg.referee_think)) <= cfg.max_prompt_tokens]
        if len(fitting) < len(records):
            skipped["prompt over --max_prompt_tokens"] = len(records) - len(fitting)
        if not fitting:
            raise SystemExit(f"--{task}_data {spec!r}: no prompt fits in --max_prompt_tokens {cfg.max_prompt_tokens}")
        print0(f"data {task}: {len(fitting)} records from {spec}" + (f", skipped {dict(skipped)}" if skipped else ""))
        sources[task] = fitting
    return sources


def keep_metrics_until(path: str, step: int) -> None:
    if os.path.exists(path):
        with open(path) as f:
            lines = [line for line in f if json.loads(line)["step"] <= step]
        with open(path + ".tmp", "w") as f:
            f.writelines(lines)
        os.replace(path + ".tmp", path)


def guard_prompts(sources: dict[str, list[dict]], tokenizer) -> list[list[int]]:
    """A prompt of each source, rendered as the model sees it: the guard's fixed test text."""
    return [render_prompt(records[0], tokenizer) for records in sources.values()]


def check_engine(engine, policy, guard_ids: list[list[int]], cfg: Config, step: int) -> tuple[float, float]:
    """The log-prob gap between the rollout engine and the trainer; the run stops on every rank
    together when it says the engine is not sampling from the trained weights."""
    mean_gap, max_gap = rollout.logprob_gap(engine, lambda ids: rollout.trainer_prompt_logprobs(policy, ids), guard_ids)
    mean_gap, max_gap = all_reduce([mean_gap, max_gap], dist.ReduceOp.MAX)
    rollout.check_logprob_gap(mean_gap, max_gap, cfg.logprob_gap_max, step)
    return mean_gap, max_gap


def evaluate_held_out(engine, tokenizer, eval_sets: dict[str, list[dict]], cfg: Config, tally: Tally) -> None:
    """Held-out metrics of this rank's share of every set (eval.evaluate_during_training), into
    `tally`: means as eval/<set>/<metric>, weighted by the items each rank scored; counts (items
    scored, items over the engine's context, math checks out of time) summed as
    count/eval/<set>/<count>. The engine's sampling state is left as it was, so evaluating does
    not change the training run (evaluation is greedy, but every call draws a seed)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    shards = {name: records[rank::world] for name, records in eval_sets.items() if records[rank::world]}
    engine_rng = engine.rng.getstate()
    values = evaluation.evaluate_during_training(
        engine, tokenizer, shards, cfg.eval_max_new_tokens, cfg.seed, think=cfg.referee_think,
        referee_max_new_tokens=cfg.judge_max_new_tokens)  # a verdict is as long as in training
    engine.rng.setstate(engine_rng)
    for name, value in values.items():
        set_name, metric = name.split("/", 1)
        scored = values[f"{set_name}/n"]
        if metric in evaluation.TRAINING_COUNTS:
            tally.add(f"count/eval/{name}", value)
        elif scored > 0:  # a rank whose items were all over the context has no mean to add
            tally.add(f"eval/{name}", value, scored)


def cold_start(policy, sources: dict[str, list[dict]], tokenizer, cfg: Config, device: torch.device) -> dict:
    """Supervised steps on gold-formatted targets from the training data, before GRPO: the
    referee's gold rankings written as verdicts, and worked solutions ending in \\boxed{}
    (data.gold_target). Our addition, not the paper's: the paper starts from a 7B model that
    already follows output formats, and a small model that never writes a valid verdict or a box
    gives GRPO nothing to compare. The loss is the GRPO loss with advantage 1 and ratio 1, whose
    gradient is that of the token-mean negative log-likelihood, so the update is the loop's own
    (backward_on_batch); the optimizer is its own AdamW at --cold_start_lr, dropped afterwards.
    Tasks alternate within each batch; targets longer than --max_new_tokens are left out. The KL
    reference (--kl_coef > 0) stays the model as loaded, before the cold start (so a resumed run
    has the same one).
    Returns the summary for the step-0 metrics line (NLL of the first and last step, time)."""
    started = time.perf_counter()
    rng = random.Random(f"{cfg.seed}/cold_start")
    pools = []
    for task in ("preference", "verifiable"):
        pool = []
        for record in sources.get(task, []):
            example = data.gold_target(record, rng, cfg.referee_think)
            if example is None:
                continue
            prompt_ids = model_lib.chat_ids(tokenizer, example[0])
            target_ids = tokenizer(example[1], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            if len(prompt_ids) <= cfg.max_prompt_tokens and len(target_ids) <= cfg.max_new_tokens:
                pool.append(Sample(prompt_ids, target_ids, advantage=1.0))
        if pool:
            rng.shuffle(pool)
            pools.append(pool)
    if not pools:
        raise SystemExit("--cold_start_steps: no preference record or worked solution fits in --max_prompt_tokens "
                         "and --max_new_tokens; lower the steps to 0 or raise the budgets")
    examples = []  # tasks alternate, each pool cycles
    for i in range(cfg.cold_start_steps * cfg.cold_start_batch):
        pool = pools[i % len(pools)]
        examples.append(pool[i // len(pools) % len(pool)])
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.cold_start_lr, fused=True)
    constant = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
    rank, world = dist.get_rank(), dist.get_world_size()
    nll = []
    policy.train()
    for step in tqdm(range(cfg.cold_start_steps), desc="cold start", disable=rank != 0, dynamic_ncols=True):
        batch = examples[step * cfg.cold_start_batch:(step + 1) * cfg.cold_start_batch][rank::world]
        tally = Tally()
        for loss in backward_on_batch(policy, batch, cfg, tokenizer.pad_token_id, device, tally):
            optimizer_step(policy, optimizer, constant, cfg, loss)
        nll.append(-tally.reduce()["logprob_mean"])
        print0(f"cold start step {step + 1}: NLL {nll[-1]:.3f} per target token")
    return {"cold_start/nll_first": nll[0], "cold_start/nll_last": nll[-1], "time/cold_start": time.perf_counter() - started}


def before_and_after(metrics_path: str) -> str:
    """The held-out metrics of the first and the last evaluation of a run, side by side."""
    with open(metrics_path) as f:
        evaluated = [line for line in map(json.loads, f) if any(key.startswith("eval/") for key in line)]
    if not evaluated:
        return "held-out: no evaluation in this run (--eval_start_end or --eval_every)"
    first, last = evaluated[0], evaluated[-1]
    rows = [f"{'held-out metric':<40}{'step ' + str(first['step']):>12}{'step ' + str(last['step']):>12}"]
    for key in sorted(k for k in first if k.startswith("eval/")):
        rows.append(f"{key.removeprefix('eval/'):<40}{first[key]:>12.3f}{last.get(key, float('nan')):>12.3f}")
    return "\n".join(rows)


def main(argv=None) -> int:
    cfg = parse_config(argv)
    rank, world, device = init_distributed(cfg.dist_timeout_min)
    if cfg.prompts_per_step % world:
        raise SystemExit(f"--prompts_per_step {cfg.prompts_per_step} must be a multiple of the world size {world}")
    os.makedirs(cfg.out_dir, exist_ok=True)
    if rank == 0:
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg) | {"world_size": world}, f, indent=2)
    cuda = device.type == "cuda"

    # Model, tokenizer and engines. One process per node resolves first (the default model may be
    # converted, a hub model downloaded into the node's cache); the others then find it there.
    models = [cfg.model] + ([cfg.referee_model] if cfg.referee_model else [])
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        for name in models:
            model_lib.resolve_model(name)
    dist.barrier()
    model_path = model_lib.resolve_model(cfg.model)
    tokenizer = model_lib.load_tokenizer(model_path, cfg.trust_remote_code)
    policy = model_lib.load_model(model_path, torch.float32, cfg.trust_remote_code)  # fp32 master weights
    model_lib.shard_model(policy, device, bf16=cuda and cfg.bf16, activation_checkpointing=cfg.activation_checkpointing)
    compute_dtype = torch.bfloat16 if cuda and cfg.bf16 else torch.float32  # engines, reference, export
    if compute_dtype == torch.bfloat16:
        # The output layer sums its weight gradient in float32 (model._OutputLayerLogprobs): let
        # those float32 products run on TF32 tensor cores. Nothing else of a bf16 step is float32.
        torch.backends.cuda.matmul.allow_tf32 = True
    engine = rollout.make_engine(cfg.rollout, model_path, tokenizer, compute_dtype, device, cfg.seed + rank,
                                 **engine_options(cfg, "policy"))
    if cfg.max_prompt_tokens + cfg.max_new_tokens > engine.context_len:
        raise SystemExit(f"--max_prompt_tokens {cfg.max_prompt_tokens} + --max_new_tokens {cfg.max_new_tokens} "
                         f"exceed the rollout engine's context of {engine.context_len} tokens: lower them "
                         "(or raise --max_model_len, up to what the model supports)")
    # At world size 1 with an fp32 engine the HF engine samples from the policy's own parameters:
    # no second copy of the model in memory, and nothing to sync after a step. (Sharded or bf16
    # engines keep their own copy, refreshed in step 8.)
    shared = cfg.rollout == "hf" and engine.share_weights(policy)
    judge_engine = engine
    if cfg.referee_model:  # the baseline arm: a frozen, separately trained referee with its own engine
        referee_path = model_lib.resolve_model(cfg.referee_model)
        judge_engine = rollout.make_engine(
            cfg.rollout, referee_path, model_lib.load_tokenizer(referee_path, cfg.trust_remote_code),
            compute_dtype, device, cfg.seed + world + rank, **engine_options(cfg, "referee"))
    ref_model = None
    if cfg.kl_coef > 0:  # frozen reference for the KL term; it never trains, so bf16 is fine on GPU
        ref_model = model_lib.load_model(model_path, compute_dtype, cfg.trust_remote_code).to(device).eval()

    sources = load_sources(cfg, tokenizer)
    eval_sets = {}
    if cfg.eval_every or cfg.eval_start_end:  # the first eval_limit records whose prompt fits, as in training
        for spec in cfg.eval_data.split(","):
            records = [r for r in data.load(spec) if len(render_prompt(r, tokenizer, think=cfg.referee_think))
                       <= cfg.max_prompt_tokens]
            eval_sets[spec.split(":")[0]] = records[:cfg.eval_limit]
            print0(f"held-out {spec.split(':')[0]}: {len(eval_sets[spec.split(':')[0]])} records "
                   f"(the first whose prompt fits in --max_prompt_tokens)")
    mixture = data.Mixture(sources, {t: w for t, w in task_weights(cfg).items() if t in sources},
                           cfg.prompts_per_step, cfg.seed, rank, world)
    # fused: one kernel per step; the default foreach path holds a temporary the size of the model
    # (SmolLM2-135M on CPU: 0.10 s and no extra memory, against 0.36 s and +0.5 GB at peak).
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / max(cfg.warmup_steps, 1)))

    # The vLLM guard scores a few fixed prompts with engine and trainer after every sync.
    guard_ids = [ids[:128] for ids in (guard_prompts(sources, tokenizer) if cfg.rollout == "vllm" else [])]
    start_step, bad_steps = 0, 0
    if cfg.resume and checkpoint_dirs(cfg.out_dir):
        latest = checkpoint_dirs(cfg.out_dir)[-1]
        start_step, bad_steps = load_checkpoint(latest, policy, optimizer, scheduler, mixture, engine)
        if not shared:
            engine.load_weights(policy.state_dict())
        print0(f"resumed from {latest} at step {start_step}")
        if rank == 0:  # steps after the checkpoint are run again: drop their old metrics lines
            keep_metrics_until(os.path.join(cfg.out_dir, "metrics.jsonl"), start_step)
    elif cfg.resume:
        print0(f"--resume: no checkpoint in {cfg.out_dir}/checkpoints, starting from step 0")

    wandb_run = None
    if cfg.wandb and rank == 0:
        try:
            import wandb
            wandb_run = wandb.init(project=cfg.wandb, config=dataclasses.asdict(cfg))
        except ImportError:
            print0("--wandb: wandb is not installed (pip install wandb); logging to metrics.jsonl only")

    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    metrics_file = open(metrics_path, "a" if start_step else "w") if rank == 0 else None
    if start_step == 0:
        # ---- 0. before the first step: held-out evaluation, then the cold start (ours) ----------
        line = {"step": 0}
        if cfg.eval_start_end and eval_sets:
            print0(f"held-out evaluation before training ({', '.join(eval_sets)}; greedy, a few minutes on CPU)")
            tally, t = Tally(), time.perf_counter()
            evaluate_held_out(engine, tokenizer, eval_sets, cfg, tally)
            line |= tally.reduce() | {"time/eval": time.perf_counter() - t}
            print0("  " + ", ".join(f"{k.removeprefix('eval/')} {v:.2f}" for k, v in line.items() if k.startswith("eval/")))
        if cfg.cold_start_steps:
            engine.sleep()  # vLLM on GPU: the engine's memory goes to the trainer, as in step 6
            line |= cold_start(policy, sources, tokenizer, cfg, device)
            engine.wake_up()
            if not shared:
                engine.load_weights(policy.state_dict())
        if rank == 0 and len(line) > 1:
            metrics_file.write(json.dumps(line) + "\n")
            metrics_file.flush()
    if guard_ids:
        print0("log-prob gap engine vs trainer at start: mean {:.2e}, max {:.2e}".format(*check_engine(engine, policy, guard_ids, cfg, start_step)))
    stop = StopSignal()
    bar = tqdm(total=cfg.steps, initial=start_step, desc="URPO", disable=rank != 0, dynamic_ncols=True)
    step = start_step
    while step < cfg.steps:
        tally, seconds = Tally(), defaultdict(float)
        started = time.perf_counter()
        # Every random choice of a step derives from (seed, step, rank): a resumed run replays it exactly.
        step_seed = (cfg.seed * 1_000_003 + step) * 1_009 + rank
        rng = random.Random(step_seed)
        torch.manual_seed(step_seed)

        # ---- 1. sample: this rank's prompts of the step, mixed by task weight -------------------
        groups = build_prompts(mixture.next_batch(), tokenizer, cfg, rng, tally)

        # ---- 2. roll out: G completions per prompt, player and referee prompts alike -------------
        t = time.perf_counter()
        outputs = engine.generate([g.prompt_ids for g in groups], cfg.group_size, cfg.temperature, cfg.max_new_tokens) if groups else []
        for g, completions in zip(groups, outputs):
            g.completions = completions
        seconds["rollout"] = time.perf_counter() - t

        # ---- 3. judge and 4. reward: rule checks, gold rankings, and the self-referee pass -------
        t = time.perf_counter()
        calls = score(groups, judge_engine, cfg, rng, tally)
        seconds["judge_reward"] = time.perf_counter() - t

        # ---- 5. advantage: normalise rewards within each group --------------------------------
        samples = advantages_and_samples(groups, cfg, tally)

        # ---- 6. loss and 7. step: mu optimizer steps on this rollout batch ----------------------
        t = time.perf_counter()
        engine.sleep()  # vLLM on GPU: hand the engine's memory to the trainer until the sync
        policy.train()
        for loss in backward_on_batch(policy, samples, cfg, tokenizer.pad_token_id, device, tally, ref_model, cfg.updates_per_batch):
            grad_norm, ok = optimizer_step(policy, optimizer, scheduler, cfg, loss)
            tally.add("loss", loss)
            tally.add("grad_norm", grad_norm if ok else float("nan"))
            bad_steps = 0 if ok else bad_steps + 1
            tally.add("count/skipped_nonfinite_steps", float(not ok))
        seconds["train"] = time.perf_counter() - t

        # ---- 8. sync: the engine samples the next batch from the new weights --------------------
        t = time.perf_counter()
        engine.wake_up()
        if not shared:  # a shared engine already sees the updated parameters
            # The sharded state dict itself: each tensor is gathered on the device and copied
            # into the engine at once (cast there), never a full float32 copy on the host.
            engine.load_weights(policy.state_dict())
        seconds["sync"] = time.perf_counter() - t
        step += 1
        if guard_ids:  # refuse to sample the next batch from weights that did not arrive
            gap_mean, gap_max = check_engine(engine, policy, guard_ids, cfg, step)
            tally.add("logprob_gap/mean", gap_mean)
            tally.add("logprob_gap/max", gap_max)

        # ---- 9. eval: held-out referee accuracy and reasoning accuracy with the live engine ------
        if (cfg.eval_every and step % cfg.eval_every == 0) or (cfg.eval_start_end and step == cfg.steps):
            t = time.perf_counter()
            evaluate_held_out(engine, tokenizer, eval_sets, cfg, tally)
            seconds["eval"] = time.perf_counter() - t

        # ---- 10. log -------------------------------------------------------------------------------
        metrics = tally.reduce()
        generated = all_reduce([sum(len(c.token_ids) for g in groups for c in g.completions)
                                + sum(call.num_tokens for call in calls)])[0]
        elapsed = time.perf_counter() - started
        metrics |= {f"time/{k}": v for k, v in seconds.items()} | {
            "step": step, "lr": scheduler.get_last_lr()[0], "time/step": elapsed, "tokens_per_s": generated / elapsed}
        if rank == 0:
            metrics_file.write(json.dumps(metrics) + "\n")
            metrics_file.flush()
            if wandb_run:
                wandb_run.log(metrics, step=step)
            if cfg.samples_every and (step % cfg.samples_every == 0 or step == 1):
                write_samples(cfg, step, groups, calls, tokenizer)
            bar.set_postfix({t[:4]: f"{metrics[f'reward/{t}']:.2f}" for t in TASKS if f"reward/{t}" in metrics}
                            | {"tok/s": f"{metrics['tokens_per_s']:.0f}"})
            bar.update(1)
        if bad_steps >= cfg.max_bad_steps:
            last = checkpoint_dirs(cfg.out_dir)
            print0(f"stopping: {bad_steps} non-finite steps in a row (lower --lr or check the data); "
                   f"the last good checkpoint is {last[-1] if last else 'none (set --save_every)'}")
            return 1

        # ---- 11. checkpoint ------------------------------------------------------------------------
        stopping = stop.agreed()
        if stopping or (cfg.save_every and step % cfg.save_every == 0):
            path = save_checkpoint(cfg, step, policy, optimizer, scheduler, mixture, engine, bad_steps)
            print0(f"saved {path}")
        if stopping:
            print0("stopped by signal after a clean save; continue with --resume")
            return 0
    bar.close()
    if cfg.save_every and step % cfg.save_every:
        save_checkpoint(cfg, step, policy, optimizer, scheduler, mixture, engine, bad_steps)
    # Gathered tensor by tensor, cast on the device, kept on rank 0 only: written in the compute
    # dtype (bf16 on GPUs, like the original checkpoint), not twice its size in float32.
    final_state = model_lib.full_state_dict(policy, compute_dtype, rank0_only=True)
    if rank == 0:
        metrics_file.close()
        model_lib.export_hf(final_state, policy.config, tokenizer, os.path.join(cfg.out_dir, "final"), policy.generation_config)
        try:  # a report that fails must not keep the other ranks waiting at the barrier below
            print0(before_and_after(metrics_path))
            if cfg.plot:
                print0(f"curves: {evaluation.plot_run(metrics_path, os.path.join(cfg.out_dir, 'curves.png'))}")
        except Exception as error:
            print0(f"could not draw the run's report ({type(error).__name__}: {error}); "
                   f"python train.py plot {cfg.out_dir} draws it again")
        print0(f"done: {cfg.out_dir}/final (HF folder), metrics in {metrics_path}")
    dist.barrier()
    for e in {id(engine): engine, id(judge_engine): judge_engine}.values():
        e.close()  # after the last collective: vLLM's teardown also ends torchrun's process group
    return 0


def write_samples(cfg: Config, step: int, groups: list[Group], calls: list, tokenizer) -> None:
    """Prompts, completions, referee outputs and rewards of rank 0's groups, one JSON line per group."""
    referee = defaultdict(list)  # self_judge numbers the open groups in batch order
    for call in calls:
        referee[call.group].append({"order": call.order, "text": call.text, "ranking": call.ranking})
    open_groups = iter(range(len(groups)))
    with open(os.path.join(cfg.out_dir, "samples.jsonl"), "a") as f:
        for g in groups:
            line = {"step": step, "task": g.record["task"], "id": g.record["id"],
                    "prompt": tokenizer.decode(g.prompt_ids), "order": g.order,
                    "completions": [c.text for c in g.completions], "rewards": g.rewards, "advantages": g.advantages}
            if g.record["task"] == "open":
                line["referee"] = referee[next(open_groups)]
            f.write(json.dumps(line) + "\n")


def export_checkpoint(checkpoint: str, out_dir: str) -> None:
    """Write checkpoint CKPT of a run as a plain HF folder (no process group needed: DCP reads
    every shard into full tensors)."""
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))
    with open(os.path.join(run_dir, "config.json")) as f:
        run_cfg = json.load(f)
    model_path = model_lib.resolve_model(run_cfg["model"])
    policy = model_lib.load_model(model_path, torch.float32, run_cfg["trust_remote_code"])
    state = {"model": policy.state_dict()}
    dcp.load(state, checkpoint_id=checkpoint)
    model_lib.export_hf(state["model"], policy.config, model_lib.load_tokenizer(model_path, run_cfg["trust_remote_code"]),
                        out_dir, policy.generation_config)
    print(f"exported {checkpoint} to {out_dir}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["export"]:  # python train.py export RUN/checkpoints/step_0000100 OUT_DIR
        if len(sys.argv) != 4:
            raise SystemExit("usage: python train.py export CHECKPOINT_DIR OUT_DIR")
        sys.exit(export_checkpoint(sys.argv[2], sys.argv[3]))
    if sys.argv[1:2] == ["plot"]:  # python train.py plot RUN_DIR [OUT.png]
        if len(sys.argv) not in (3, 4) or not os.path.isfile(os.path.join(sys.argv[2], "metrics.jsonl")):
            raise SystemExit("usage: python train.py plot RUN_DIR [OUT.png]  (RUN_DIR holds a metrics.jsonl)")
        out = sys.argv[3] if len(sys.argv) == 4 else os.path.join(sys.argv[2], "curves.png")
        try:
            print(evaluation.plot_run(os.path.join(sys.argv[2], "metrics.jsonl"), out))
        except ValueError as error:  # an empty metrics file: a run still in its first evaluation
            raise SystemExit(f"train.py plot: {error}") from None
        sys.exit(0)
    try:
        code = main()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    sys.exit(code)
