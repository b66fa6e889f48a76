"""URPO training: one model, one GRPO loop, two roles (player and referee).

Each step draws a batch mixing three kinds of prompts (README.md, "The method"):
  verifiable  the player answers a math problem; rule-checked reward (reward.math_rewards)
  preference  the referee ranks K given answers, shown in --referee_group_orders orders (one
              group); reward = agreement with the gold ranking
  open        the player answers an instruction; the same model then ranks the group of answers
              in M orders (the self-referee pass), and those rankings are the rewards
and runs them through one GRPO update. Reading order: Config and its presets; the step's
functions in the order `main` calls them (sample, roll out, reward, self-referee, advantage,
update, sync, evaluate; the cold start before the first step); `main`, one banner per phase.
Below the line "Plumbing" nothing is URPO: flags, input checks, models, checkpoints, logging.

Run:
  python train.py                                        # CPU default: SmolLM2-135M, minutes
  torchrun --nproc_per_node=8 train.py --preset paper    # Qwen2.5-7B-Instruct on one 8-GPU node
  torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
      train.py --preset paper                            # multi-node: same command on each node
  python train.py --help                                 # every flag, with its default
  python train.py export RUN/checkpoints/step_0000100 OUT  # any checkpoint as an HF folder
                                                         # (--replace: over an earlier export)
  python train.py plot RUN [OUT.png]                     # any run's curves from its metrics.jsonl
  python train.py compare OUT.png A=RUN_A B=RUN_B        # arms of an ablation: the referee side

Everything a run writes lands in --out_dir: config.json, metrics.jsonl (one line per step),
samples.jsonl (every --samples_every steps), checkpoints/, curves.png and final/ (an HF folder).
One run at a time per --out_dir (out_dir/.lock); a fresh run refuses one that holds an earlier
run (--resume or --overwrite). The last step always saves a checkpoint: --resume continues it.
"""
from __future__ import annotations  # annotations name classes defined further down

import argparse
import atexit
import contextlib
import dataclasses
import fcntl
import importlib.util
import json
import math
import os
import random
import shutil
import signal
import socket
import sys
import time
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import eval as evaluation
import model as model_lib
import rollout
from grpo import (AGGREGATIONS, ESTIMATORS, Sample, advantages, grpo_loss, micro_batches, rows_of,
                  truncated_is_weights)
from data import PROTOCOLS, TASKS
from model import all_reduce, init_distributed
from reward import agreement_rewards, consistency_rewards, math_rewards, timed_out_checks


def option(default, help: str):
    """A Config field: its default, and the help line that `--help` prints."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass
class Config:
    """Every setting of a run; each field is a flag (parse_config), its help in its metadata."""
    preset: str = option("cpu", "overrides applied before the flags: " + ", ".join(
        ["cpu", "cpu_long", "cpu_referee_cold", "cpu_referee", "paper", "baseline_referee",
         "baseline_player"]))
    # model and data
    model: str = option(model_lib.DEFAULT_MODEL, "hub id or HF folder: player and referee")
    trust_remote_code: bool = option(False, "allow model code from the hub")
    verifiable_data: str = option("gsm8k:samples/gsm8k/train.first200.jsonl",
                                  "data.py spec: registry key or KEY:PATH")
    preference_data: str = option("hh_rlhf:samples/hh_rlhf/helpful-base/test.rows101-1000."
                                  "jsonl.gz", "referee training pairs (not the held-out rows)")
    open_data: str = option("ultrafeedback_prompts:samples/ultrafeedback_binarized/train_prefs."
                            "first200.jsonl", "open instructions (the self-referee pass)")
    data_limit: int = option(0, "read at most this many records per source (0: all)")
    task_weights: str = option("verifiable=1,preference=1,open=1", "each task's share")
    # rollout
    rollout: str = option("auto", "engine: vllm, hf or auto (vllm where installed)")
    prompts_per_step: int = option(3, "prompts per step, all ranks; each a group")
    group_size: int = option(4, "G: completions sampled per prompt")
    temperature: float = option(1.0, "the player's sampling temperature (log-probs taken at it)")
    max_prompt_tokens: int = option(384, "longer prompts are skipped and counted, never cut")
    max_new_tokens: int = option(64, "the player's answer budget (verifiable and open prompts)")
    self_reward: str = option("listwise", "the self-reward protocol (data.PROTOCOLS): listwise "
                              "(URPO: the group ranked), pairwise (SERL: every pair in both "
                              "orders, win rate) or pointwise (each answer scored 1-10 alone)")
    referee_orders: int = option(2, "M: listwise, orders per self-refereed group, even: each "
                                 "order with its reverse (a balanced set); pointwise, rounds "
                                 "scoring each answer once; pairwise: unused")
    open_verdict_reward: str = option("none", "none, or consistency: also train the referee's "
                                      "verdicts on open groups, rewarded for agreeing with the "
                                      "group's other verdicts (SERL's judge)")
    referee_max_new_tokens: int = option(32, "budget of every referee verdict: trained "
                                         "(preference), used (self-referee) and evaluated")
    referee_temperature: float = option(1.0, "sampling temperature of trained and used verdicts "
                                        "(held-out evaluation is greedy)")
    referee_think: bool = option(False, "verdicts open with reasoning in <think></think>")
    referee_model: str = option("", "baseline arm: a frozen referee for open groups")
    max_model_len: int = option(0, "engines' context, prompt + generation (0: the model's)")
    is_cap: float = option(2.0, "vllm: cap of the truncated IS weight")
    vllm_memory: float = option(0.3, "vllm on GPU: the engine's share of GPU memory")
    vllm_sleep: bool = option(True, "vllm on GPU: free its memory while the trainer runs")
    referee_vllm_memory: float = option(0.25, "vllm on GPU: the baseline referee's share")
    logprob_gap_max: float = option(0.25, "stop above this mean engine-trainer log-prob gap "
                                    "(bf16 noise: ~0.05; the weights are checked exactly)")
    # the referee's groups on preference data (README.md, "Order-balanced referee groups")
    referee_group_orders: int = option(2, "L: orders each pair is shown in, G / L samples each, "
                                       "one group (1: one random order, plain GRPO)")
    referee_advantage: str = option("group", "group: one z-score over the G samples of all "
                                    "orders (J4R's EIS-GRPO); group+order: plus a z-score within "
                                    "each order, rescaled (ours)")
    consistency_coef: float = option(0.0, "lambda: +/- reward when aligned samples of two orders "
                                     "name the same / another candidate (PA-GRPO; 0: off)")
    invalid_reward: float = option(0.0, "reward of an unparsable verdict on preference data")
    # loss
    loss_agg: str = option("token-mean", "token-mean, seq-mean or seq-sum-norm")
    advantage: str = option("grpo", "estimator of every group: grpo (z-score) or rloo "
                            "(leave-one-out mean baseline; with --no-scale_advantages)")
    scale_advantages: bool = option(True, "grpo: divide by the group std (off: Dr. GRPO)")
    clip_low: float = option(0.2, "ratio clip below 1 - clip_low")
    clip_high: float = option(0.28, "ratio clip above 1 + clip_high (clip-higher)")
    kl_coef: float = option(0.0, "k3 KL weight to a frozen reference (0: none loaded)")
    skip_zero_advantage: bool = option(True, "leave all-zero-advantage groups out (KL too)")
    # optimisation
    steps: int = option(10, "training steps: one rollout batch each (0: the cold start alone)")
    updates_per_batch: int = option(1, "mu: optimizer steps per rollout batch")
    lr: float = option(1e-5, "AdamW learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup_steps: int = option(0, "linear LR warm-up, in optimizer steps")
    max_grad_norm: float = option(1.0, "gradient clipping")
    micro_batch_tokens: int = option(4096, "padded tokens per forward/backward")
    share_prompt: bool = option(True, "score a group's prompt once, completions packed behind")
    activation_checkpointing: bool = option(False, "recompute decoder layers in backward")
    bf16: bool = option(True, "CUDA: bf16 compute, fp32 master weights (CPU: fp32)")
    max_bad_steps: int = option(3, "stop after this many non-finite steps in a row")
    cold_start_steps: int = option(9, "supervised steps on gold targets first (ours; 0: off)")
    cold_start_lr: float = option(5e-5, "AdamW learning rate of the cold start")
    cold_start_batch: int = option(4, "examples per cold-start step, all ranks")
    cold_start_group_every: int = option(3, "every Nth cold-start verdict ranks group_size "
                                         "candidates (0: pairs only)")
    dist_timeout_min: int = option(60, "collective timeout in minutes")
    # run folder, logging, checkpoints, eval
    out_dir: str = option("runs/urpo", "where the run writes everything")
    seed: int = option(0, "one seed for data order, shuffles and sampling")
    samples_every: int = option(5, "write prompts, completions, rewards every N steps")
    save_every: int = option(0, "checkpoint every N steps (0: none between; the last step and "
                             "a stop by signal always save one)")
    keep_checkpoints: int = option(2, "keep the newest N checkpoints")
    resume: bool = option(False, "continue from the newest intact checkpoint in out_dir, with "
                          "its config.json's settings; flags given are checked against them "
                          "(none yet: start the run)")
    overwrite: bool = option(False, "start afresh in an out_dir that holds an earlier run (its "
                             "metrics, samples, checkpoints and final/ are deleted)")
    eval_every: int = option(0, "held-out evaluation every N steps (0: never)")
    eval_data: str = option("gsm8k:samples/gsm8k/test.first100.jsonl,hh_rlhf:samples/hh_rlhf/"
                            "helpful-base/test.first100.jsonl.gz", "held-out sets, comma-separated")
    eval_limit: int = option(8, "records per held-out player set (the first that fit)")
    eval_pairs: int = option(8, "pairs per held-out referee set, each judged in both orders")
    eval_max_new_tokens: int = option(96, "budget of an answer during evaluation")
    eval_samples: int = option(1, "answers per held-out aime24/amc23 problem (1: greedy; k: "
                               "avg@k at --temperature); other sets greedy")
    eval_start_end: bool = option(True, "also evaluate before the first step and after the last")
    eval_after_cold_start: bool = option(False, "step 0's evaluation after the cold start, not "
                                         "before it")
    plot: bool = option(True, "draw curves.png at the end")
    wandb: str = option("", "wandb project (logs there too when installed)")


PRESETS = {
    "cpu": {},
    "paper": dict(
        model="Qwen/Qwen2.5-7B-Instruct", rollout="vllm", verifiable_data="math",
        preference_data="ultrafeedback", open_data="ultrafeedback_prompts",
        prompts_per_step=384, group_size=8, max_prompt_tokens=2048, max_new_tokens=2048,
        referee_max_new_tokens=1024, lr=1e-6, warmup_steps=10, steps=1000, referee_think=True,
        cold_start_steps=0, micro_batch_tokens=32768, activation_checkpointing=True,
        save_every=50, eval_every=50, eval_limit=1319, eval_max_new_tokens=2048, samples_every=10,
        # held-out: the whole GSM8K test split (1319) and MATH-500, all 2985 RewardBench pairs:
        # 95% intervals of +-0.01 to +-0.045 (+-0.34 on 8 items), for about two steps' generation;
        # and the paper's AIME claim, as avg@16 at the sampling temperature (30 problems: a greedy
        # score moves in steps of 3.3 points)
        eval_data="gsm8k,math500,aime24,rewardbench", eval_pairs=2985, eval_samples=16,
        # 8 long completions behind one prompt: the masked attention costs more than it saves
        share_prompt=False,
    ),
    # The CPU default, run for about an hour on 2 cores: does anything move beyond the start?
    "cpu_long": dict(steps=80, eval_every=20, eval_limit=16, out_dir="runs/urpo_cpu_long"),
    # The referee's arms (README, "The referee's arms"; benchmarks/arms/): first one shared cold
    # start (`--preset cpu_referee_cold`, steps 0: 40 supervised steps, then the held-out
    # evaluation), then each arm from its final/ with one flag changed against cpu_referee:
    # preference data twice as often, 100 held-out pairs in both orders at the middle and end.
    "cpu_referee_cold": dict(
        steps=0, cold_start_steps=40, task_weights="verifiable=1,preference=2,open=1",
        eval_after_cold_start=True, eval_limit=16, eval_pairs=100,
        eval_data="gsm8k:samples/gsm8k/test.first100.jsonl,hh_rlhf:samples/hh_rlhf/helpful-base/"
                  "test.rows1001-1600.jsonl.gz", out_dir="runs/referee_cold"),
    "cpu_referee": dict(
        model="runs/referee_cold/final", cold_start_steps=0, steps=12, prompts_per_step=4,
        task_weights="verifiable=1,preference=2,open=1", eval_every=6, eval_start_end=False,
        eval_limit=16, eval_pairs=100,
        eval_data="gsm8k:samples/gsm8k/test.first100.jsonl,hh_rlhf:samples/hh_rlhf/helpful-base/"
                  "test.rows1001-1600.jsonl.gz", out_dir="runs/urpo_cpu_referee"),
    # Baseline arm, stage 1: a separate referee trained on preference data alone.
    "baseline_referee": dict(task_weights="verifiable=0,preference=1,open=0",
                             out_dir="runs/baseline_referee"),
    # Baseline arm, stage 2: the player trained with that referee frozen (pass --referee_model).
    "baseline_player": dict(task_weights="verifiable=1,preference=0,open=1",
                            referee_model="runs/baseline_referee/final",
                            out_dir="runs/baseline_player"),
}
RENAMED = {"--judge_max_new_tokens": "--referee_max_new_tokens"}  # old flag -> its new name
REFEREE_ADVANTAGES = ("group", "group+order")



# ==============================================================================================
# One URPO step: its functions in the order main calls them
# ==============================================================================================


# ---- 1. sample -----------------------------------------------------------------------------------

# Each kind of group, as data: whose completions they are (a player's answers or a referee's
# verdicts: the template, and the temperature and budget they are sampled and scored at), and
# whether a rule knows their rewards (else the self-referee pass, or agreement, gives them).
GROUP_KINDS = {
    "verifiable": dict(role="player", rewarded_by="math_rewards"),
    "preference": dict(role="referee", rewarded_by="the gold ranking"),
    "open": dict(role="player", rewarded_by="the self-referee pass"),
    # --open_verdict_reward consistency: the self-referee pass's own verdicts on one open group
    "open_verdicts": dict(role="referee", rewarded_by="agreement among the group's verdicts"),
}


@dataclass
class Group:
    """Completions in one role: G of one prompt, or (a preference record) of L prompts that show
    its candidates in L presentations, G / L completions each (--referee_group_orders), or (an
    open_verdicts group) one verdict per prompt. Its size is len(completions), never assumed."""
    record: dict  # the unified record (data.py)
    prompts: list[list[int]]  # the rendered prompt(s) the completions continue, one per order
    orders: list[list[int]] | None = None  # referee groups: orders[l][j] shown as [j+1] in prompt l
    completions: list = dataclasses.field(default_factory=list)  # rollout.Completion, by prompt
    rewards: list[float] | None = None  # None: an open group no verdict could rank (dropped)
    advantages: list[float] | None = None
    kind: str = ""  # a key of GROUP_KINDS; "" = the record's task

    def __post_init__(self):
        self.kind = self.kind or self.record["task"]

    def prompt_of(self, i: int) -> int:
        """The prompt (presentation) that completion i continues."""
        return i * len(self.prompts) // len(self.completions)


def render_prompt(record: dict, tokenizer, order: list[int] | None = None,
                  think: bool = True, protocol: data.Protocol = PROTOCOLS["listwise"]) -> list[int]:
    """Token ids of a record's prompt: for preference records the protocol's referee prompt
    showing candidates `order` (None: all, in their order), the player template otherwise."""
    if record["task"] == "preference":
        order = order if order is not None else list(range(len(record["responses"])))
        shown = [record["responses"][i] for i in order]
        return model_lib.chat_ids(tokenizer, protocol.render(record["messages"], shown, think))
    return model_lib.chat_ids(tokenizer, data.player_prompt(record))


def build_prompts(batch: list[dict], tokenizer, cfg: Config, rng: random.Random,
                  tally: Tally) -> list[Group]:
    """Player prompts for verifiable and open records; for preference records the referee
    prompt in the --self_reward protocol's presentations, one group (ranked protocols:
    --referee_group_orders orders from data.shown_orders, with 2 a random order and its reverse;
    pointwise: each candidate alone). Why: under one shown order per group, a referee that always
    names [1] gets the same reward on all G samples, advantage 0: position bias is never
    unlearnt. A group whose presentations do not split --group_size evenly is skipped and
    counted."""
    protocol, groups = PROTOCOLS[cfg.self_reward], []
    for record in batch:
        orders = None
        if GROUP_KINDS[record["task"]]["role"] == "referee":
            orders = protocol.presentations(len(record["responses"]), cfg.referee_group_orders,
                                            rng)
            if cfg.group_size % len(orders):
                tally.add(f"count/skipped_uneven_groups/{record['task']}", 1)
                continue
        prompts = [render_prompt(record, tokenizer, order, cfg.referee_think, protocol)
                   for order in orders or [None]]
        if max(map(len, prompts)) > cfg.max_prompt_tokens:  # another order can be a token longer
            tally.add(f"count/skipped_long_prompts/{record['task']}", 1)
            continue
        groups.append(Group(record, prompts, orders))
    return groups


# ---- 2. roll out ----------------------------------------------------------------------------------

def sampling(group: Group, cfg: Config) -> tuple[float, int]:
    """(temperature, token budget) of a group's completions: the referee's for referee kinds,
    whose completions are verdicts (trained as the self-referee pass uses them), the player's
    otherwise."""
    if GROUP_KINDS[group.kind]["role"] == "referee":
        return cfg.referee_temperature, cfg.referee_max_new_tokens
    return cfg.temperature, cfg.max_new_tokens


def roll_out(engine, groups: list[Group], cfg: Config) -> None:
    """G completions per group (rollout.sample_groups): one engine call per role's sampling
    settings, player answers at theirs, referee verdicts at the referee's."""
    by_setting = defaultdict(list)
    for g in groups:
        by_setting[sampling(g, cfg)].append(g)
    for (temperature, budget), same in by_setting.items():
        for g, completions in zip(same, rollout.sample_groups(
                engine, [g.prompts for g in same], cfg.group_size, temperature, budget)):
            g.completions = completions


# ---- 3. reward -----------------------------------------------------------------------------------

def rule_rewards(groups: list[Group], cfg: Config, tally: Tally) -> None:
    """Rewards with a ground truth: math answers checked against the gold answer, and referee
    verdicts on preference records scored against the gold ranking in the --self_reward
    protocol's way (protocol.preference_rewards: ranked, ranking_reward; pointwise, scores
    ordered as the gold ranking)."""
    protocol = PROTOCOLS[cfg.self_reward]
    verifiable = [g for g in groups if g.kind == "verifiable"]
    texts = [c.text for g in verifiable for c in g.completions]
    timed_out = timed_out_checks()
    flat = iter(math_rewards(texts, [g.record["answer"] for g in verifiable
                                     for _ in g.completions]))
    if texts:  # a machine too busy for math-verify shows here before it shows as a lower reward
        tally.add("count/math_timeouts/verifiable", timed_out_checks() - timed_out)
    for g in verifiable:
        g.rewards = [next(flat) for _ in g.completions]
    for g in (g for g in groups if g.kind == "preference"):
        verdicts = [read(protocol, c, g.orders[g.prompt_of(i)])
                    for i, c in enumerate(g.completions)]
        g.rewards = protocol.preference_rewards(verdicts, g.orders, g.record["ranking"],
                                                cfg.invalid_reward)
        bests = [None if v.ranking is None else v.ranking[0] for v in verdicts]  # candidates
        if cfg.consistency_coef:
            bonus = consistency_rewards(bests, len(g.orders), cfg.consistency_coef)
            g.rewards = [r + b for r, b in zip(g.rewards, bonus)]
        tally_verdicts(tally, "preference", verdicts,
                       [len(text) for text in g.record["responses"]], g.record["ranking"][0])
        if protocol.shows == 1:  # one candidate per verdict: no best to agree on
            continue
        per = len(g.completions) // len(g.orders)  # aligned samples of two orders: same verdict?
        for i in range(per, len(bests)):
            for j in range(i % per, i, per):
                same = bests[i] is not None and bests[i] == bests[j]
                tally.add("referee/position_consistency/preference", float(same))


def read(protocol: data.Protocol, completion, order: list[int]) -> rollout.Verdict:
    """A referee group's completion as a verdict on the candidates shown in `order`."""
    ranking, score = protocol.read(completion.text, order)
    return rollout.Verdict(order, completion.text, ranking, completion.finish_reason,
                           len(completion.token_ids), score=score)


def tally_verdicts(tally: Tally, task: str, verdicts: list[rollout.Verdict], lengths: list[int],
                   gold_best: int | None = None) -> None:
    """What the referee's verdicts show, per verdict: invalid; of a ranking, the first shown
    ranked best (position bias), the longest candidate ranked best (length bias), and with a
    gold best its accuracy, split by whether the gold best was shown first ("second": any later
    place). A score (pointwise) alone has no best: its validity only."""
    for verdict in verdicts:
        order, ranking = verdict.order, verdict.ranking
        tally.add(f"referee/invalid_rate/{task}", float(not verdict.valid))
        if len(order) < 2:
            continue
        if ranking is not None:
            tally.add(f"referee/first_shown_best/{task}", float(ranking[0] == order[0]))
            longest = max(lengths[i] for i in order)  # of the candidates this verdict saw
            tally.add(f"referee/longer_best/{task}", float(lengths[ranking[0]] == longest))
        if gold_best is not None:
            right = float(ranking is not None and ranking[0] == gold_best)
            tally.add(f"referee/accuracy/{task}", right)
            shown = "first" if order[0] == gold_best else "second"
            tally.add(f"referee/accuracy_chosen_{shown}/{task}", right)


# ---- 4. the self-referee pass --------------------------------------------------------------------

def self_referee_pass(groups: list[Group], referee_engine, cfg: Config, rng: random.Random,
                      tally: Tally) -> list[rollout.Verdict]:
    """URPO's own step: the referee (the policy itself, or the baseline arm's frozen referee)
    judges each open group in the --self_reward protocol's verdicts, at the referee's
    temperature and budget (as its verdicts on preference data are trained); the verdicts of
    complete balanced sets are the answers' rewards (rollout.self_referee). With
    --open_verdict_reward consistency, each open group's verdicts also become a referee group
    of their own (open_verdict_groups), appended to `groups`. Returns the verdicts, for
    metrics and samples."""
    open_groups = [g for g in groups if g.kind == "open"]
    if not open_groups:
        return []
    judged = rollout.self_referee(  # the referee's own tokenizer: the baseline's may differ
        referee_engine, referee_engine.tokenizer, [g.record["messages"] for g in open_groups],
        [[c.text for c in g.completions] for g in open_groups], cfg.referee_orders,
        cfg.referee_temperature, cfg.referee_max_new_tokens, rng, cfg.referee_think,
        PROTOCOLS[cfg.self_reward])
    for g, rewards in zip(open_groups, judged.rewards):
        g.rewards = rewards
    verdict_metrics(tally, judged, open_groups)
    if cfg.open_verdict_reward == "consistency":
        groups += open_verdict_groups(open_groups, judged.verdicts, cfg)
    return judged.verdicts


def verdict_metrics(tally: Tally, judged: rollout.SelfRefereeResult,
                    open_groups: list[Group]) -> None:
    """What the self-referee pass's verdicts show, apart from the rewards they give: groups
    dropped, verdicts left out or not run, per-verdict biases (tally_verdicts), and how often two
    valid verdicts on one group agree on its best answer."""
    tally.add("count/dropped_groups/open", judged.dropped)
    tally.add("count/unbalanced_verdicts/open", judged.unbalanced)
    tally.add("count/skipped_long_prompts/referee", judged.skipped_long)
    tops = defaultdict(list)  # the best answer of each valid ranking of the whole group
    for verdict in judged.verdicts:
        answers = [c.text for c in open_groups[verdict.group].completions]
        tally_verdicts(tally, "open", [verdict], list(map(len, answers)))
        if verdict.ranking is not None and len(verdict.order) == len(answers):
            tops[verdict.group].append(verdict.ranking[0])
    for best in tops.values():  # pairs of valid verdicts on one group that agree on the best
        for i, a in enumerate(best):
            for b in best[i + 1:]:
                tally.add("referee/order_agreement/open", float(a == b))


def open_verdict_groups(open_groups: list[Group], verdicts: list[rollout.Verdict],
                        cfg: Config) -> list[Group]:
    """--open_verdict_reward consistency: each open group's verdicts that ran, as one referee
    group (kind open_verdicts) trained like any other: the verdict's own prompt, tokens and
    sampler log-probs, reward = agreement with the group's other verdicts
    (reward.agreement_rewards; invalid: --invalid_reward). Its risk: a referee paid for agreeing
    with itself can learn to agree on something content-blind. Shown position cannot agree
    across an order and its reverse, but length, say, can: watch referee/longer_best/open and
    referee/first_shown_best/open. Refused where agreement is always symmetric (config_problems)."""
    by_group = defaultdict(list)
    for verdict in verdicts:
        by_group[verdict.group].append(verdict)
    groups = []
    for index, mine in sorted(by_group.items()):
        completions = [rollout.Completion(v.token_ids, v.text, v.finish_reason, v.logprobs)
                       for v in mine]
        rewards = agreement_rewards([v.ranking for v in mine], cfg.invalid_reward)
        groups.append(Group(open_groups[index].record, [v.prompt_ids for v in mine],
                            [v.order for v in mine], completions, rewards, kind="open_verdicts"))
    return groups


# ---- 5. advantage --------------------------------------------------------------------------------

def advantages_and_samples(groups: list[Group], cfg: Config, tally: Tally) -> list:
    """Advantages per group (grpo.advantages, the one entry point: --advantage, --scale_advantages,
    and for preference groups --referee_advantage), and the completions that carry a learning
    signal."""
    samples = []
    for g in groups:
        kind = g.kind
        tally.add(f"count/groups/{kind}", 1)
        lengths = [len(c.token_ids) for c in g.completions]
        tally.add(f"completion_len/{kind}", sum(lengths) / len(lengths), len(lengths))
        cut = sum(c.finish_reason == "length" for c in g.completions) / len(lengths)
        tally.add(f"truncated/{kind}", cut, len(lengths))
        if g.rewards is None:
            continue
        tally.add(f"reward/{kind}", sum(g.rewards) / len(g.rewards))
        within = cfg.referee_advantage == "group+order" and kind == "preference"
        adv = advantages(torch.tensor(g.rewards), len(g.prompts) if within else 1,
                         cfg.advantage, cfg.scale_advantages)  # [G]
        g.advantages = adv.tolist()
        has_signal = bool(adv.abs().max() > 0)
        tally.add(f"nonzero_adv_share/{kind}", float(has_signal))
        # A group of equal rewards has zero advantages: no policy gradient, only cost. Leaving it
        # out (as DAPO's dynamic sampling does) also keeps it out of the token-mean's denominator.
        if not has_signal and cfg.skip_zero_advantage:
            continue
        temperature = sampling(g, cfg)[0]  # log-probs at the one it was sampled at
        for i, (c, a) in enumerate(zip(g.completions, g.advantages)):
            if c.token_ids:  # the sampler's log-probs serve the IS correction of vLLM rollouts
                sampler = c.logprobs if cfg.rollout == "vllm" else None
                samples.append(Sample(g.prompts[g.prompt_of(i)], list(c.token_ids), a,
                                      sampler, temperature))
    return samples


# ---- 6. update: mu optimizer steps on one rollout batch, micro-batches by a token budget ---------

def update(policy, optimizer, scheduler, samples: list, cfg: Config, pad_id: int, tally: Tally,
           kl_reference=None) -> list[bool]:
    """The GRPO update of one rollout batch: cfg.updates_per_batch optimizer steps (mu), each
    over all micro-batches; returns whether each step was taken (False: non-finite, skipped)."""
    device = next(policy.parameters()).device
    batch = prepare_batch(policy, samples, cfg, pad_id, device, kl_reference)
    taken = []
    for mu in range(cfg.updates_per_batch):
        loss = backward(policy, batch, cfg, tally, first=mu == 0)
        grad_norm, ok = optimizer_step(policy, optimizer, scheduler, cfg, loss)
        if batch["num_seqs"]:  # a step with nothing to train on (no rank) logs no loss
            tally.add("loss", loss)
            tally.add("grad_norm", grad_norm if ok else float("nan"))
        tally.add("count/skipped_nonfinite_steps", float(not ok))
        taken.append(ok)
    return taken


def prepare_batch(policy, samples: list, cfg: Config, pad_id: int, device: torch.device,
                  kl_reference=None) -> dict:
    """The step's micro-batches as tensors (model.collate), and the global counts the loss is
    normalised by. Every rank gets the same number of micro-batches (FSDP's collectives must
    match): a rank short of data adds dummy ones whose loss weighs 0. Old log-probs (for more
    than one update per batch) and the KL reference's (kl_coef > 0) are taken here, once."""
    rows = rows_of(samples, cfg.share_prompt, cfg.micro_batch_tokens)
    batches = micro_batches(rows, cfg.micro_batch_tokens)
    num_tokens, num_seqs = all_reduce([sum(len(s.completion_ids) for s in samples), len(samples)])
    num_micro = int(all_reduce([len(batches)], dist.ReduceOp.MAX)[0])
    dummy = [[Sample([pad_id], [pad_id], 0.0, temperature=cfg.temperature)]]
    micro = [model_lib.collate(b, pad_id, device, cfg.share_prompt)
             for b in batches + [dummy] * (num_micro - len(batches))]
    with torch.no_grad():
        for mb in micro:
            # One update per batch: old log-probs equal the current ones, no forward needed.
            mb["old_logprobs"] = (model_lib.batch_logprobs(policy, mb, mb["temperature"])[0]
                                  if cfg.updates_per_batch > 1 else None)
            mb["reference_logprobs"] = (
                model_lib.batch_logprobs(kl_reference, mb, mb["temperature"])[0]
                if kl_reference is not None else None)
    weights = [1.0] * len(batches) + [0.0] * (num_micro - len(batches))
    return dict(micro=micro, weights=weights, num_tokens=num_tokens, num_seqs=num_seqs)


def backward(policy, batch: dict, cfg: Config, tally: Tally, first: bool = True) -> float:
    """Gradients of the GRPO loss of this rank's micro-batches, summed into the parameters'
    .grad; returns the global loss. `first`: the batch's first update, whose metrics are kept."""
    device, world = next(policy.parameters()).device, dist.get_world_size()
    # Gradient buffers up front, one per parameter (FSDP then adds each micro-batch into them):
    # made inside the first backward, between its short-lived tensors, they fragment the CPU heap.
    # A step in which no rank has data leaves them None, so the optimizer step is a no-op.
    for param in policy.parameters():
        if batch["micro"] and param.requires_grad and param.grad is None:
            param.grad = torch.zeros_like(param)
    local_loss = 0.0
    for mb, weight in zip(batch["micro"], batch["weights"]):
        # [S, C]: column j of row s is token j of completion s (model.collate), either layout
        # at the temperature the micro-batch's samples were drawn at (player's or referee's)
        logp, entropy = model_lib.batch_logprobs(policy, mb, mb["temperature"],
                                                 with_entropy=first)  # [S, C]
        old = mb["old_logprobs"] if mb["old_logprobs"] is not None else logp.detach()  # [S, C]
        is_weights = None
        if cfg.rollout == "vllm" and mb["sampler_logprobs"] is not None:
            # Truncated IS: the sampler's numerics differ from the trainer's; reweight to ours.
            is_weights = truncated_is_weights(old, mb["sampler_logprobs"], cfg.is_cap)  # [S, C]
        loss, metrics = grpo_loss(
            logp, old, mb["advantages"], mb["completion_mask"], mb["reference_logprobs"],
            clip_low=cfg.clip_low,
            clip_high=cfg.clip_high, kl_coef=cfg.kl_coef, is_weights=is_weights, agg=cfg.loss_agg,
            num_tokens=batch["num_tokens"], num_seqs=batch["num_seqs"], max_len=cfg.max_new_tokens)
        # FSDP averages gradients over ranks; the loss is normalised by the global counts
        # already, so scale by the world size to turn that average back into the sum.
        (loss * weight * world).backward()
        model_lib.release_freed_memory(device)
        local_loss = local_loss + loss.detach() * weight
        if weight and first:  # 0-dim tensors: read back once per step, in Tally.reduce
            mask = mb["completion_mask"]
            n = mask.sum()
            for name, value in metrics.items():
                tally.add(name, value, n)
            tally.add("logprob_mean", (logp.detach() * mask).sum() / n, n)  # cold start: -NLL
            if entropy is not None:
                tally.add("entropy", (entropy * mask).sum() / n, n)
            if is_weights is not None:
                tally.add("is/weight_mean", (is_weights * mask).sum() / n, n)
                tally.add("is/capped_frac", ((is_weights >= cfg.is_cap) * mask).sum() / n, n)
    return all_reduce([local_loss])[0]


def optimizer_step(policy, optimizer, scheduler, cfg: Config, loss: float) -> tuple[float, bool]:
    """Clip, check, step. Returns the pre-clip gradient norm and whether the step was taken.
    Loss and norm are global (FSDP's clip reduces over all shards), so every rank decides the
    same: a non-finite loss or gradient skips the step everywhere."""
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    ok = math.isfinite(grad_norm) and math.isfinite(loss)
    if ok:
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, ok


# ---- 7. sync -------------------------------------------------------------------------------------

def sync(engine, policy, engine_is_policy: bool) -> None:
    """The engine samples the next batch from the policy's current weights: the sharded state
    dict itself, gathered tensor by tensor into the engine's copy (collective), unless the engine
    samples from the policy's own parameters. vLLM on GPU takes its memory back first."""
    engine.wake_up()
    if not engine_is_policy:
        engine.load_weights(policy.state_dict())


# ---- 8. held-out evaluation ----------------------------------------------------------------------

def evaluate_held_out(engine, tokenizer, eval_sets: dict[str, list[dict]],
                      cfg: Config) -> dict[str, float]:
    """Held-out metrics of every set for the metrics line: means as eval/<set>/<metric>, counts as
    count/eval/<set>/<count>; a metric with nothing to measure (NaN) is left out. Each rank judges
    its share of the items (eval.held_out_items), every rank gets them all, in the sets' order,
    and the metrics (and their 95% intervals) are computed from all of them. The engine's
    sampling state is restored afterwards: evaluating does not change the training run."""
    rank, world = dist.get_rank(), dist.get_world_size()
    shards = {name: records[rank::world] for name, records in eval_sets.items()
              if records[rank::world]}
    engine_rng = engine.rng.getstate()
    mine = {}
    for sampled in (False, True):  # AIME and AMC as avg@k (--eval_samples), every other greedy
        subset = {name: records for name, records in shards.items()
                  if (name in evaluation.DEFAULT_SAMPLES) == sampled}
        mine |= evaluation.held_out_items(
            engine, tokenizer, subset, cfg.eval_max_new_tokens, cfg.seed,
            think=cfg.referee_think,
            referee_max_new_tokens=cfg.referee_max_new_tokens,  # a verdict as long as in training
            samples=cfg.eval_samples if sampled else 1, temperature=cfg.temperature)
    engine.rng.setstate(engine_rng)
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    judged = {}
    for name, records in eval_sets.items():
        items = [None] * len(records)  # rank r judged records r, r + world, ...
        for r, theirs in enumerate(everyone):
            if name in theirs:
                kind, items[r::world] = theirs[name]
        if records:
            judged[name] = (kind, items)
    metrics = {}
    for name, value in evaluation.held_out_metrics(judged).items():
        count = name.split("/", 1)[1] in evaluation.TRAINING_COUNTS
        if math.isfinite(value):
            metrics[f"count/eval/{name}" if count else f"eval/{name}"] = value
    return metrics


# ---- Before the first step: the cold start (ours, not the paper's) -------------------------------

def cold_start(policy, sources: dict[str, list[dict]], tokenizer, cfg: Config,
               stop: StopSignal | None = None) -> dict | None:
    """Supervised steps on gold-formatted targets from the training data, before GRPO
    (data.cold_start_examples): the referee's gold rankings written as verdicts (a pair's in the
    --referee_group_orders orders GRPO shows it in, every --cold_start_group_every-th one
    ranking group_size candidates, the K of the self-referee pass) and worked solutions ending
    in \\boxed{}. Ours, not the paper's: the paper starts from a 7B model that already follows
    output formats; a small model that never writes a valid verdict or a box gives GRPO nothing
    to compare. Each step is `update` with advantage 1 and ratio 1 under token-mean aggregation,
    whatever the run's --loss_agg: the gradient of the token-mean NLL; its own AdamW at
    --cold_start_lr, dropped afterwards. Examples over --max_prompt_tokens or their role's
    budget (--max_new_tokens; a verdict --referee_max_new_tokens) are left out; the KL reference
    stays the model as loaded. Returns the step-0 metrics (NLL of the first and last step, time),
    or None when a signal (`stop`) ended it after a step."""
    started = time.perf_counter()

    def sample(example) -> Sample:
        prompt_ids = model_lib.chat_ids(tokenizer, example[0])
        target_ids = (tokenizer(example[1], add_special_tokens=False)["input_ids"]
                      + [tokenizer.eos_token_id])
        return Sample(prompt_ids, target_ids, advantage=1.0, temperature=cfg.temperature)

    def fits(example, role: str) -> bool:  # a verdict within the referee's budget, as in GRPO
        s = sample(example)
        budget = cfg.referee_max_new_tokens if role == "referee" else cfg.max_new_tokens
        return len(s.prompt_ids) <= cfg.max_prompt_tokens and len(s.completion_ids) <= budget
    examples, sizes = data.cold_start_examples(
        sources, cfg.cold_start_steps * cfg.cold_start_batch, cfg.group_size,
        cfg.cold_start_group_every, cfg.referee_group_orders, fits,
        random.Random(f"{cfg.seed}/cold_start"), cfg.referee_think, PROTOCOLS[cfg.self_reward])
    print0("cold start examples within the budgets: " + ", ".join(
        f"{size} {name}" for name, size in sizes.items()))
    if not examples:
        raise SystemExit("train.py: --cold_start_steps: no preference record or worked solution "
                         "fits in --max_prompt_tokens and --max_new_tokens; set the steps to 0 "
                         "or raise the budgets")
    samples = [sample(example) for example in examples]
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.cold_start_lr, fused=True)
    constant = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
    # One update of the token-mean NLL, whatever the run's --loss_agg (a seq-sum-norm cold start
    # would shrink by mean length / --max_new_tokens, a confound of that ablation)
    supervised = dataclasses.replace(cfg, updates_per_batch=1, loss_agg="token-mean")
    rank, world, nll = dist.get_rank(), dist.get_world_size(), []
    policy.train()
    for step in tqdm(range(cfg.cold_start_steps), desc="cold start", disable=rank != 0,
                     dynamic_ncols=True):
        size, tally = cfg.cold_start_batch, Tally()
        update(policy, optimizer, constant, samples[step * size:(step + 1) * size][rank::world],
               supervised, tokenizer.pad_token_id, tally)
        nll.append(-tally.reduce()["logprob_mean"])
        print0(f"cold start step {step + 1}: NLL {nll[-1]:.3f} per target token")
        if stop is not None and step + 1 < cfg.cold_start_steps and stop.agreed():
            return None
    return {"cold_start/nll_first": nll[0], "cold_start/nll_last": nll[-1],
            "time/cold_start": time.perf_counter() - started}


def before_training(cfg: Config, policy, engine, engine_is_policy: bool, tokenizer,
                    sources: dict, eval_sets: dict, stop: StopSignal,
                    evaluated: bool = False) -> tuple[dict, bool]:
    """Step 0: the cold start (--cold_start_steps, ours) and a sync, with the held-out evaluation
    (--eval_start_end) of the model as loaded, or with --eval_after_cold_start of the model GRPO
    starts from; `evaluated`: the evaluation before training is in metrics.jsonl already (a run
    stopped after it), not made again. Returns the step-0 metrics line and whether a signal
    (`stop`) ended step 0 before anything was trained: it stops after the phase under way, the
    evaluation or a cold-start step, and a cold start cut short is not kept."""
    line = {"step": 0}
    def evaluate(when: str):
        if cfg.eval_start_end and eval_sets:
            sampled = (f"aime24/amc23 avg@{cfg.eval_samples} at temperature {cfg.temperature}, "
                       "the rest greedy" if cfg.eval_samples > 1 else "greedy")
            print0(f"held-out evaluation {when} ({', '.join(eval_sets)}; {sampled})")
            t = time.perf_counter()
            line.update(evaluate_held_out(engine, tokenizer, eval_sets, cfg))
            line["time/eval"] = time.perf_counter() - t
            print0("  " + ", ".join(f"{name} {text}" for name, text
                                    in evaluation.format_metrics(line, "eval/").items()))
    if stop.agreed():  # signalled while the models loaded
        return line, True
    if evaluated:
        print0("held-out evaluation before training: kept from the stopped run (metrics.jsonl)")
    elif not cfg.eval_after_cold_start:
        evaluate("before training")
    if stop.agreed():
        return line, True
    if cfg.cold_start_steps:
        engine.sleep()  # vLLM on GPU: the engine's memory goes to the trainer, as in step 6
        summary = cold_start(policy, sources, tokenizer, cfg, stop)
        if summary is None:
            return line, True
        line.update(summary)
        sync(engine, policy, engine_is_policy)
    if cfg.eval_after_cold_start:
        evaluate("after the cold start")
    return line, False


def main(argv=None) -> int:
    cfg = parse_config(argv)
    rank, world, device = init_distributed(cfg.dist_timeout_min)
    stop = StopSignal()  # from here on, SIGTERM and Ctrl-C end the run cleanly (StopSignal)
    if cfg.prompts_per_step % world:
        raise SystemExit(f"train.py: --prompts_per_step {cfg.prompts_per_step} must be a multiple "
                         f"of the world size {world}")
    checkpoint = check_out_dir(cfg)  # with --resume, the newest intact checkpoint (or "")
    kept = kept_evaluation(cfg) if not checkpoint else False
    paths, tokenizers, sources, eval_sets = load_inputs(cfg)
    tokenizer = tokenizers["model"]

    # ---- the policy (FSDP2, fp32 master weights), its rollout engine, the referee's ----------
    policy, engine, referee_engine, kl_reference, compute_dtype, engine_is_policy = build_models(
        cfg, device, paths, tokenizers)
    mixture = data.Mixture(sources, {t: w for t, w in task_weights(cfg).items() if t in sources},
                           cfg.prompts_per_step, cfg.seed, rank, world)
    # fused: one kernel per step; the default foreach path holds a model-sized temporary
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / max(cfg.warmup_steps, 1)))
    # The guard (check_engine) scores one prompt of each source with engine and trainer after
    # every sync; an engine on the policy's own parameters has nothing to sync.
    guard_ids = [render_prompt(records[0], tokenizer)[:128] for records in sources.values()
                 ] if not engine_is_policy else []
    engines = {"engine": engine, "referee_engine": referee_engine}  # each RNG checkpointed
    step, bad_steps = resume(cfg, checkpoint, policy, optimizer, scheduler, mixture, engines,
                             engine_is_policy)
    log = RunLog(cfg, step, tokenizer, append=bool(checkpoint) or kept)
    saved_step = step if checkpoint else None

    # ---- 0. before the first step: held-out evaluation, then the cold start (ours) ------------
    if not checkpoint:  # a checkpoint, even step 0's, comes after step 0
        line, untrained = before_training(cfg, policy, engine, engine_is_policy, tokenizer,
                                          sources, eval_sets, stop, evaluated=kept)
        log.write(line)
        if untrained:
            evaluation_kept = kept or any(key.startswith("eval/") for key in line)
            print0("stopped by signal before training: nothing was trained yet"
                   + (", step 0's evaluation is kept in metrics.jsonl" if evaluation_kept else "")
                   + "; --resume starts the training from step 0"
                   + (" without evaluating again" if evaluation_kept else ""))
            return 0
    if guard_ids:
        checked, uncompared = check_engine(engine, policy, guard_ids, cfg, step)
        # e.g. vLLM's CPU build repacks linear weights into oneDNN's layout: those cannot be read
        skipped = (f"; {len(uncompared)} the engine does not hold as tensors are not compared, "
                   f"e.g. {uncompared[0]}" if uncompared else "")
        print0(f"engine vs trainer at start: sampled weights equal{skipped}; log-prob gap mean "
               f"{checked['logprob_gap/mean']:.2e}, max {checked['logprob_gap/max']:.2e}")
    if step == 0 and stop.agreed():  # signalled after the cold start: it is kept
        print0(f"saved {save(cfg, step, policy, optimizer, scheduler, mixture, engines, 0)}")
        print0("stopped by signal before the first URPO step; continue with --resume")
        return 0
    while step < cfg.steps:
        tally, seconds, started = Tally(), {}, time.perf_counter()
        # Every random choice of a step derives from (seed, step, rank): a resume replays it.
        step_seed = (cfg.seed * 1_000_003 + step) * 1_009 + rank
        rng = random.Random(step_seed)
        torch.manual_seed(step_seed)

        # ---- 1. sample: this rank's prompts of the step, mixed by task weight ------------------
        groups = build_prompts(mixture.next_batch(), tokenizer, cfg, rng, tally)

        # ---- 2. roll out: G completions per group, answers and verdicts each at their settings --
        with timed(seconds, "rollout"):
            roll_out(engine, groups, cfg)

        # ---- 3. reward: answers checked against gold answers, verdicts against gold rankings ----
        with timed(seconds, "reward"):
            rule_rewards(groups, cfg, tally)

        # ---- 4. self-referee pass: the referee ranks each open group; the ranks are rewards -----
        with timed(seconds, "self_referee"):
            verdicts = self_referee_pass(groups, referee_engine, cfg, rng, tally)

        # ---- 5. advantage: normalise rewards within each group -----------------------------------
        samples = advantages_and_samples(groups, cfg, tally)

        # ---- 6. update: the GRPO loss, backward, mu optimizer steps ------------------------------
        with timed(seconds, "train"):
            engine.sleep()  # vLLM on GPU: hand the engine's memory to the trainer until the sync
            policy.train()
            for ok in update(policy, optimizer, scheduler, samples, cfg, tokenizer.pad_token_id,
                             tally, kl_reference):
                bad_steps = 0 if ok else bad_steps + 1

        # ---- 7. sync: the engine samples the next batch from the new weights ---------------------
        with timed(seconds, "sync"):
            sync(engine, policy, engine_is_policy)
        step += 1
        if guard_ids:  # refuse to sample the next batch from weights that did not arrive
            for name, value in check_engine(engine, policy, guard_ids, cfg, step)[0].items():
                tally.add(name, value)

        # ---- 8. eval: held-out referee and player metrics with the live engine ------------------
        held_out = {}
        if (cfg.eval_every and step % cfg.eval_every == 0) or (
                cfg.eval_start_end and step == cfg.steps):
            with timed(seconds, "eval"):
                held_out = evaluate_held_out(engine, tokenizer, eval_sets, cfg)

        # ---- 9. log ------------------------------------------------------------------------------
        generated = all_reduce([sum(len(c.token_ids) for g in groups if g.kind != "open_verdicts"
                                    for c in g.completions)
                                + sum(v.num_tokens for v in verdicts)])[0]
        elapsed = time.perf_counter() - started
        log.write(tally.reduce() | held_out | {f"time/{k}": v for k, v in seconds.items()} | {
            "step": step, "lr": scheduler.get_last_lr()[0], "time/step": elapsed,
            "tokens_per_s": generated / elapsed}, groups, verdicts)
        if bad_steps >= cfg.max_bad_steps:
            last = model_lib.checkpoint_dirs(cfg.out_dir)
            print0(f"stopping: {bad_steps} non-finite steps in a row (lower --lr or check the "
                   f"data); the last good checkpoint is "
                   f"{last[-1] if last else 'none (set --save_every)'}")
            return 1

        # ---- 10. checkpoint ----------------------------------------------------------------------
        stopping = stop.agreed() and step < cfg.steps  # at the last step: finish as usual
        if stopping or (cfg.save_every and step % cfg.save_every == 0):
            saved = save(cfg, step, policy, optimizer, scheduler, mixture, engines, bad_steps)
            saved_step = step
            print0(f"saved {saved}")
        if stopping:
            print0("stopped by signal after a clean save; continue with --resume")
            return 0
    if saved_step != step:  # the last step always leaves a checkpoint: --resume --steps N goes on
        print0(f"saved {save(cfg, step, policy, optimizer, scheduler, mixture, engines, bad_steps)}")
    log.close()
    finish(cfg, policy, tokenizer, compute_dtype, log.metrics_path)
    dist.barrier()
    for e in {id(engine): engine, id(referee_engine): referee_engine}.values():
        e.close()  # after the last collective: vLLM's teardown also ends torchrun's group
    return 0


# ==============================================================================================
# Plumbing: flags, input checks, models, checkpoints, logging, distributed helpers;
# nothing below is URPO
# ==============================================================================================


def parse_config(argv=None) -> Config:
    """Config from the command line: the preset's overrides first, then explicit flags.
    Raises SystemExit with one line per problem (config_problems)."""
    argv = sys.argv[1:] if argv is None else argv
    for arg in argv:
        if arg.split("=")[0] in RENAMED:
            raise SystemExit(f"train.py: {arg.split('=')[0]} is now {RENAMED[arg.split('=')[0]]}")
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="cpu")
    preset = pre.parse_known_args(argv)[0].preset
    if preset not in PRESETS:
        raise SystemExit(f"train.py: unknown --preset {preset!r}; known: {', '.join(PRESETS)}")
    defaults = {**dataclasses.asdict(Config()), **PRESETS[preset], "preset": preset}
    parser = argparse.ArgumentParser(  # a short usage: a misspelt flag's error stays in view
        prog="train.py",
        usage="train.py [--preset NAME] [--FLAG VALUE ...]  (every flag: train.py --help)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in dataclasses.fields(Config):
        default = defaults[field.name]
        kwargs = dict(default=default, help=f"{field.metadata['help']} (default: {default!r})")
        if isinstance(default, bool):
            parser.add_argument(f"--{field.name}", action=argparse.BooleanOptionalAction, **kwargs)
        else:
            parser.add_argument(f"--{field.name}", type=type(default), **kwargs)
    values = vars(parser.parse_args(argv))
    if values["resume"]:  # the run's own settings, then only the flags given on this command line
        ran = run_settings(values["out_dir"])
        unset = object()  # a namespace that holds an attribute keeps it: only given flags change
        given = {name: value for name, value in vars(parser.parse_args(
            argv, argparse.Namespace(**{name: unset for name in values}))).items()
            if value is not unset}
        check_resumed_config(ran, given, values["out_dir"])
        values |= {name: value for name, value in ran.items()  # not what this command asks
                   if name in values and name not in ("out_dir", "resume", "overwrite")} | given
    cfg = Config(**values)
    if cfg.rollout == "auto":
        cfg = dataclasses.replace(cfg, rollout="vllm" if importlib.util.find_spec("vllm") else "hf")
    problems = config_problems(cfg)
    if len(problems) == 1:
        raise SystemExit(f"train.py: {problems[0]}")
    if problems:
        raise SystemExit("train.py: invalid configuration:\n  " + "\n  ".join(problems))
    return cfg


def config_problems(cfg: Config) -> list[str]:
    """What makes a configuration unusable, one line per flag, found before any model loads."""
    problems = []
    def need(ok: bool, flag: str, value, fix: str):
        if not ok:
            problems.append(f"--{flag} {value!r}: {fix}")
    def at_least(minimum: int, *flags: str, meaning: str = ""):  # counts and token budgets
        for flag in flags:
            need(getattr(cfg, flag) >= minimum, flag, getattr(cfg, flag),
                 f"use {minimum}{meaning} or more")
    def positive(*flags: str, fix: str = "use a finite number > 0"):
        for flag in flags:
            need(0 < getattr(cfg, flag) < math.inf, flag, getattr(cfg, flag), fix)
    def finite(*flags: str, fix: str = "use a finite number >= 0"):
        for flag in flags:
            need(0 <= getattr(cfg, flag) < math.inf, flag, getattr(cfg, flag), fix)
    need(cfg.loss_agg in AGGREGATIONS, "loss_agg", cfg.loss_agg, f"use one of {AGGREGATIONS}")
    need(cfg.rollout in ("hf", "vllm"), "rollout", cfg.rollout, "use vllm, hf or auto")
    need(cfg.group_size >= 2, "group_size", cfg.group_size, "GRPO needs 2 or more samples")
    at_least(1, "prompts_per_step", "referee_orders", "updates_per_batch",
             "cold_start_batch", "max_prompt_tokens", "max_new_tokens", "referee_max_new_tokens",
             "eval_max_new_tokens", "eval_limit", "eval_pairs", "micro_batch_tokens",
             "keep_checkpoints", "max_bad_steps", "dist_timeout_min", "eval_samples")
    at_least(0, "cold_start_steps", "cold_start_group_every", "warmup_steps", meaning=" (off)")
    at_least(0, "steps", meaning=" (0: the cold start alone, exported to final/)")
    at_least(0, "data_limit", "max_model_len", meaning=" (none)")
    at_least(0, "samples_every", "save_every", "eval_every", meaning=" (never)")
    positive("temperature", "referee_temperature", fix="use > 0 (log-probabilities are taken "
             "at the sampling temperature)")
    positive("lr", "cold_start_lr", fix="use a rate > 0")
    positive("max_grad_norm", "is_cap", "logprob_gap_max")
    finite("clip_low", "clip_high", "kl_coef", "weight_decay")
    need(cfg.clip_low < 1, "clip_low", cfg.clip_low, "use a bound below 1 (the ratio stays > 0)")
    for flag in ("vllm_memory", "referee_vllm_memory"):
        need(0 < getattr(cfg, flag) <= 1, flag, getattr(cfg, flag), "use a share in (0, 1]")
    need(cfg.referee_group_orders >= 1 and (cfg.group_size < 2  # said above already
                                            or cfg.group_size % cfg.referee_group_orders == 0),
         "referee_group_orders", cfg.referee_group_orders,
         f"use a divisor of --group_size {cfg.group_size} (its samples split evenly)")
    need(cfg.referee_advantage in REFEREE_ADVANTAGES, "referee_advantage",
         cfg.referee_advantage, "use " + " or ".join(REFEREE_ADVANTAGES) + (
             " (eis, this project's variant, is now group+order; J4R's EIS-GRPO pools all "
             "orders in one z-score: group)" if cfg.referee_advantage == "eis" else ""))
    need(cfg.self_reward in PROTOCOLS, "self_reward", cfg.self_reward,
         "use " + ", ".join(PROTOCOLS))
    need(cfg.referee_orders % 2 == 0 or cfg.self_reward != "listwise", "referee_orders",
         cfg.referee_orders,
         "use an even number: each order is judged with its reverse, so shown position cancels")
    need(cfg.open_verdict_reward in ("none", "consistency"), "open_verdict_reward",
         cfg.open_verdict_reward, "use none or consistency")
    need(not (cfg.open_verdict_reward == "consistency" and cfg.self_reward == "listwise"
              and cfg.referee_orders == 2), "open_verdict_reward", cfg.open_verdict_reward,
         "with listwise --referee_orders 2 the two verdicts always agree equally (reward the "
         "same, advantage 0): use --referee_orders 4 or --self_reward pairwise")
    need(not (cfg.open_verdict_reward == "consistency" and cfg.self_reward == "pointwise"),
         "open_verdict_reward", cfg.open_verdict_reward,
         "pointwise scores order no pairs to agree on: use listwise (M >= 4) or pairwise")
    need(not (cfg.consistency_coef and cfg.self_reward == "pointwise"), "consistency_coef",
         cfg.consistency_coef, "pointwise verdicts name no best candidate: use 0")
    need(cfg.advantage in ESTIMATORS, "advantage", cfg.advantage, "use grpo or rloo")
    need(not (cfg.advantage == "rloo" and cfg.scale_advantages), "advantage", cfg.advantage,
         "RLOO's advantages have no std to divide by: add --no-scale_advantages")
    for flag in ("consistency_coef", "invalid_reward"):
        need(math.isfinite(getattr(cfg, flag)), flag, getattr(cfg, flag), "use a finite number")
    need(not (cfg.resume and cfg.overwrite), "overwrite", cfg.overwrite,
         "--resume continues the run in out_dir, --overwrite deletes it: pass one of them")
    try:
        need(sum(task_weights(cfg).values()) > 0, "task_weights", cfg.task_weights,
             "give at least one task a positive weight")
    except ValueError as error:
        problems.append(str(error))
    specs = {f"{task}_data": getattr(cfg, f"{task}_data") for task in TASKS}
    specs |= {"eval_data": spec for spec in cfg.eval_data.split(",") if spec}
    for flag, spec in specs.items():  # a misspelt data key, before any data or model loads
        problem = data.spec_problem(spec)
        need(problem is None, flag, spec, problem)
    return problems


def task_weights(cfg: Config) -> dict[str, float]:
    """--task_weights as {task: weight}; ValueError names the flag and the expected form."""
    weights = {}
    for item in filter(None, cfg.task_weights.split(",")):
        name, _, value = item.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            name = ""
        if name.strip() not in TASKS:
            raise ValueError(f"--task_weights {cfg.task_weights!r}: {item!r} is not TASK=WEIGHT "
                             f"with TASK one of {', '.join(TASKS)}")
    return weights


# A run's folder holds a run from the moment its config.json is written.
EARLIER_RUN = ("config.json", "metrics.jsonl", "samples.jsonl", "checkpoints", "final",
               "curves.png")
LOCK_FILE = ".lock"  # flock'ed by the run writing into the folder; its text names that run


def check_out_dir(cfg: Config) -> str:
    """Before any model loads: --out_dir must be writable and free (lock_out_dir: one run per
    folder), and a fresh run must not overwrite an earlier one's config, metrics, checkpoints or
    final/ unless told to (--overwrite deletes them first; --resume continues it). SystemExit
    with one line otherwise. Every rank checks; rank 0 locks and deletes. Returns the checkpoint
    --resume continues from: the newest intact one (model.checkpoint_problem; a damaged one is
    named and skipped), "" for none or a fresh run."""
    created = not os.path.exists(cfg.out_dir)
    try:
        model_lib.check_writable(cfg.out_dir)
    except ValueError as error:
        raise SystemExit(f"train.py: --out_dir {cfg.out_dir!r}: {error}") from None
    lock_out_dir(cfg.out_dir, created)
    def holds(name: str) -> bool:  # a non-empty file or folder
        path = os.path.join(cfg.out_dir, name)
        if os.path.isdir(path):
            return bool(os.listdir(path))
        return os.path.isfile(path) and os.path.getsize(path) > 0
    earlier = [name for name in EARLIER_RUN if holds(name)]
    checkpoints = model_lib.checkpoint_dirs(cfg.out_dir) if cfg.resume else []
    if cfg.overwrite:
        dist.barrier()
        for name in earlier if dist.get_rank() == 0 else []:
            path = os.path.join(cfg.out_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        dist.barrier()
    elif earlier and not cfg.resume:
        raise SystemExit(f"train.py: --out_dir {cfg.out_dir!r} holds an earlier run "
                         f"({', '.join(earlier)}): continue it with --resume, start afresh there "
                         "with --overwrite, or pick another --out_dir")
    final = os.path.join(cfg.out_dir, "final")
    trained = max((line["step"] for line in metrics_lines(cfg.out_dir)), default=0
                  ) if cfg.resume and not checkpoints else 0
    if trained:
        raise SystemExit(
            f"train.py: --resume: {cfg.out_dir!r} holds a run trained to step {trained} but no "
            "checkpoint to continue it from (it ran before the last step always saved one): "
            + (f"start a new run from its weights with --model {final} --out_dir OTHER, or "
               if os.path.isfile(os.path.join(final, "config.json")) else "")
            + "start afresh there with --overwrite")
    if cfg.resume and model_lib.export_problem(final, replace=True):  # found now, not at the end
        raise SystemExit(f"train.py: --resume: {model_lib.export_problem(final, replace=True)} "
                         "(the run writes its final/ there)")
    for path in reversed(checkpoints):
        problem = model_lib.checkpoint_problem(path)
        if problem is None:
            return path
        print0(f"--resume: {problem}; trying the one before it")
    if checkpoints:
        raise SystemExit(f"train.py: --resume: no intact checkpoint in {cfg.out_dir}/checkpoints "
                         f"(the {len(checkpoints)} there are named above): start afresh with "
                         "--overwrite, or in another --out_dir")
    if cfg.resume and "config.json" in earlier:  # stopped before its first step
        print0(f"--resume: no checkpoint in {cfg.out_dir}/checkpoints, starting from step 0 "
               "(the run there was stopped before anything was trained)")
    elif cfg.resume:  # a job script may always pass --resume: its first launch starts the run
        print0(f"--resume: no checkpoint in {cfg.out_dir}/checkpoints, starting from step 0 "
               "(a fresh run: check --out_dir if you meant to continue one)")
    return ""


def lock_out_dir(out_dir: str, created: bool) -> None:
    """One run per folder: rank 0 takes an exclusive flock on out_dir/.lock, held until the
    process ends (the kernel releases it on any death, kill -9 included: no stale lock), and
    writes its pid, host and start time into it; every rank learns the outcome. A folder locked
    by another run: SystemExit in one line naming that run. A folder this run `created` is
    removed at exit when it holds nothing but the lock (a run refused before it began)."""
    refusal = ""
    if dist.get_rank() == 0:
        path = os.path.join(out_dir, LOCK_FILE)
        lock = open(path, "a+")  # "a+": opening never erases the holder's text
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "one that is starting"
            lock.close()
            refusal = (f"train.py: --out_dir {out_dir!r} is in use by another run ({holder}): "
                       "wait for it to end (--resume continues it then), or pick another "
                       "--out_dir")
        except OSError as error:  # a file system without locks (some NFS mounts)
            print0(f"--out_dir: no file lock there ({error.strerror}): make sure no other run "
                   "writes into it")
        else:
            lock.seek(0)
            lock.truncate()
            lock.write(f"pid {os.getpid()} on {socket.gethostname()}, started "
                       f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            lock.flush()
            atexit.register(release_out_dir, lock, out_dir, created)  # holds the lock until exit
    outcome = [refusal]
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0]:
        raise SystemExit(outcome[0])


def release_out_dir(lock, out_dir: str, created: bool) -> None:
    """At exit: a folder this run created and left holding nothing but its lock file goes."""
    if created and os.listdir(out_dir) == [LOCK_FILE]:
        os.remove(os.path.join(out_dir, LOCK_FILE))
        os.rmdir(out_dir)
    lock.close()


def metrics_lines(out_dir: str) -> list[dict]:
    """out_dir/metrics.jsonl's lines ([] when there is none); SystemExit naming a damaged line."""
    path = os.path.join(out_dir, "metrics.jsonl")
    try:
        return evaluation.read_jsonl(path) if os.path.exists(path) else []
    except ValueError as error:
        raise SystemExit(f"train.py: {error}") from None


def kept_evaluation(cfg: Config) -> bool:
    """Whether a --resume that starts from step 0 (a run stopped before its first step) finds
    that run's evaluation before training in metrics.jsonl: it is kept, not made again (rank 0
    rewrites the file without a line cut short by a kill, which the run then appends to)."""
    kept = (cfg.resume and cfg.eval_start_end and not cfg.eval_after_cold_start
            and any(line["step"] == 0 and any(key.startswith("eval/") for key in line)
                    for line in metrics_lines(cfg.out_dir)))
    if kept and dist.get_rank() == 0:
        keep_metrics_until(os.path.join(cfg.out_dir, "metrics.jsonl"), 0)
    return kept


# What --resume may change: how long and how often, and where the work runs; not what it computes.
RESUME_MAY_CHANGE = {"steps", "out_dir", "resume", "overwrite", "preset", "save_every",
                     "keep_checkpoints", "samples_every", "eval_every", "plot", "wandb",
                     "max_bad_steps", "dist_timeout_min", "rollout", "vllm_memory", "vllm_sleep",
                     "referee_vllm_memory", "activation_checkpointing", "micro_batch_tokens"}


def run_settings(out_dir: str) -> dict:
    """The settings in out_dir/config.json, {} when there is none; SystemExit when it is
    damaged (--resume would not know what the run computed)."""
    path = os.path.join(out_dir, "config.json")
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            ran = json.load(f)
        if not isinstance(ran, dict):
            raise ValueError(f"a JSON {type(ran).__name__}, not an object of settings")
    except (OSError, ValueError) as error:
        raise SystemExit(f"train.py: --resume: {path} cannot be read ({error}): restore it, or "
                         "start afresh with --overwrite") from None
    return ran


def check_resumed_config(ran: dict, given: dict, out_dir: str) -> None:
    """SystemExit in one line when --resume is given flags (`given`: those on the command line)
    that differ from the run's settings (`ran`, its config.json) beyond RESUME_MAY_CHANGE: the
    steps already run would be recorded under settings they did not run with. Flags not given
    take the run's values."""
    changed = [f"--{name} {value!r} (the run's {ran[name]!r})"
               for name, value in sorted(given.items())
               if name in ran and name not in RESUME_MAY_CHANGE and ran[name] != value]
    if changed:
        shown = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if changed[6:] else "")
        verb = "differs" if len(changed) == 1 else "differ"
        raise SystemExit(f"train.py: --resume: {shown} {verb} from {out_dir}/config.json: "
                         "--resume takes the run's settings, so leave those flags out (or "
                         "start another --out_dir)")


def load_inputs(cfg: Config) -> tuple[dict, dict, dict, dict]:
    """What a user gives, each problem reported in one line (SystemExit) before any model loads:
    the model folders and tokenizers ({"model": ..., "referee_model": ...}: the policy's, and the
    baseline arm's frozen referee's if any), each task's records and the held-out sets. Prompts
    longer than --max_prompt_tokens are dropped and counted, never cut (a cut conversation or
    candidate would change what is being judged)."""
    flags = {"model": cfg.model} | ({"referee_model": cfg.referee_model} if cfg.referee_model
                                     else {})
    def checked(flag: str, load):
        try:
            return load(flags[flag])
        except (OSError, ValueError) as error:
            raise SystemExit(f"train.py: --{flag} {flags[flag]!r}: "
                             f"{str(error).splitlines()[0]}") from None
    # One process per node resolves first (the default model may be converted, a hub model
    # downloaded into the node's cache); every rank meets at the barrier, error or not.
    problem = None
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        try:
            for flag in flags:
                checked(flag, model_lib.resolve_model)
        except SystemExit as error:
            problem = error
    dist.barrier()
    if problem:
        raise problem
    paths = {flag: checked(flag, model_lib.resolve_model) for flag in flags}
    tokenizers = {flag: checked(flag, lambda name: model_lib.load_tokenizer(
        paths[flag], cfg.trust_remote_code)) for flag in flags}
    tokenizer = tokenizers["model"]
    def fits(record: dict) -> bool:
        prompt = render_prompt(record, tokenizer, think=cfg.referee_think)
        return len(prompt) <= cfg.max_prompt_tokens
    specs = {task: getattr(cfg, f"{task}_data") for task, weight in task_weights(cfg).items()
             if weight > 0}
    try:
        sources = data.load_sources(specs, fits, cfg.data_limit or None,
                                    f"--max_prompt_tokens {cfg.max_prompt_tokens}", print0)
    except data.DataError as error:
        raise SystemExit(f"train.py: {error}") from None
    eval_sets = {}
    if cfg.eval_every or cfg.eval_start_end:
        eval_sets = unseen_held_out_sets(cfg, sources, fits)
    return paths, tokenizers, sources, eval_sets


def unseen_held_out_sets(cfg: Config, sources: dict, fits) -> dict[str, list[dict]]:
    """--eval_data's held-out sets (eval.held_out_sets), unseen even by question: a held-out pair
    whose first user turn (data.question_key) a training pair asks too is passed over, and the
    log says how many were (hh-rlhf repeats questions across its rows: 35 of the 595 pairs of
    rows 1,001-1,600 share one with rows 101-1,000). SystemExit on a bad file."""
    asked = {data.question_key(r) for r in sources.get("preference", [])}
    sets = {}
    for spec in filter(None, cfg.eval_data.split(",")):
        seen = []
        def unseen(record: dict) -> bool:
            if record["task"] == "preference" and data.question_key(record) in asked:
                seen.append(record["id"])
                return False
            return fits(record)
        try:
            held_out = evaluation.held_out_sets(spec, cfg.eval_limit, unseen, pairs=cfg.eval_pairs)
        except data.DataError as error:
            raise SystemExit(f"train.py: --eval_data: {error}") from None
        for name, records in held_out.items():
            passed = (f"; {len(seen)} passed over: a training pair asks their question"
                      if seen else "")
            print0(f"held-out {name}: {len(records)} records (the first that fit{passed})")
        sets |= held_out
    return sets


def build_models(cfg: Config, device: torch.device, paths: dict, tokenizers: dict) -> tuple:
    """The policy (FSDP2-sharded, fp32 master weights), its rollout engine, the referee's engine
    (the policy's own, or the baseline arm's frozen one), the frozen KL reference (or None), the
    compute dtype, and whether the engine samples from the policy's own parameters (then there
    is nothing to sync)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    cuda = device.type == "cuda"
    model_path, tokenizer = paths["model"], tokenizers["model"]
    policy = model_lib.load_model(model_path, torch.float32, cfg.trust_remote_code)
    model_lib.shard_model(policy, device, bf16=cuda and cfg.bf16,
                          activation_checkpointing=cfg.activation_checkpointing)
    compute_dtype = torch.bfloat16 if cuda and cfg.bf16 else torch.float32  # engines, export
    if compute_dtype == torch.bfloat16:
        # The output layer sums its weight gradient in float32 (model._OutputLayerLogprobs):
        # let those float32 products run on TF32 tensor cores.
        torch.backends.cuda.matmul.allow_tf32 = True
    engine = rollout.make_engine(cfg.rollout, model_path, tokenizer, compute_dtype, device,
                                 cfg.seed + rank, **engine_options(cfg, "policy"))
    budget = max(("max_new_tokens", cfg.max_new_tokens),
                 ("referee_max_new_tokens", cfg.referee_max_new_tokens), key=lambda f: f[1])
    if cfg.max_prompt_tokens + budget[1] > engine.context_len:
        raise SystemExit(f"train.py: --max_prompt_tokens {cfg.max_prompt_tokens} + "
                         f"--{budget[0]} {budget[1]} exceed the rollout engine's "
                         f"context of {engine.context_len} tokens: lower them (or raise "
                         "--max_model_len, up to what the model supports)")
    # At world size 1 with an fp32 engine the HF engine samples from the policy's own
    # parameters: no second copy in memory, nothing to sync after a step.
    engine_is_policy = False
    if cfg.rollout == "hf":
        engine_is_policy = engine.use_policy_weights(policy)
    referee_engine = engine
    if "referee_model" in paths:  # the baseline arm: a frozen, separately trained referee
        referee_engine = rollout.make_engine(
            cfg.rollout, paths["referee_model"], tokenizers["referee_model"], compute_dtype, device,
            cfg.seed + world + rank, **engine_options(cfg, "referee"))
    kl_reference = None  # frozen; it never trains, so bf16 is fine on GPU
    if cfg.kl_coef > 0:
        kl_reference = model_lib.load_model(model_path, compute_dtype, cfg.trust_remote_code)
        kl_reference = kl_reference.to(device).eval()
    return policy, engine, referee_engine, kl_reference, compute_dtype, engine_is_policy


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


def resume(cfg: Config, path: str, policy, optimizer, scheduler, mixture, engines: dict,
           engine_is_policy: bool) -> tuple:
    """With --resume, restore checkpoint `path` (check_out_dir chose it: the newest intact one)
    and sync the engine; returns (step, bad_steps), (0, 0) for a fresh run. Metrics lines of
    steps after the checkpoint are dropped: those steps run again."""
    if not path:  # a fresh run (check_out_dir said so when --resume found no checkpoint)
        return 0, 0
    trainer = model_lib.load_checkpoint(path, policy, optimizer)
    step, bad_steps = restore_trainer_state(trainer, scheduler, mixture, engines)
    sync(engines["engine"], policy, engine_is_policy)
    newest = "" if path == model_lib.checkpoint_dirs(cfg.out_dir)[-1] else ", the newest intact one"
    print0(f"resumed from {path} at step {step}{newest}")
    if dist.get_rank() == 0:
        keep_metrics_until(os.path.join(cfg.out_dir, "metrics.jsonl"), step)
    return step, bad_steps


def save(cfg: Config, step: int, policy, optimizer, scheduler, mixture, engines: dict,
         bad_steps: int) -> str:
    """model.save_checkpoint with this rank's trainer state (collective); returns the folder."""
    return model_lib.save_checkpoint(
        cfg.out_dir, step, policy, optimizer,
        trainer_state(step, scheduler, mixture, engines, bad_steps), cfg.keep_checkpoints)


def trainer_state(step: int, scheduler, mixture, engines: dict, bad_steps: int) -> dict:
    """This rank's state beside the model and optimizer: a resume replays the run exactly. Every
    engine's sampling state is in it: the policy's ("engine") and the baseline arm's frozen
    referee's ("referee_engine"; the policy's own engine in URPO, then saved once)."""
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           **{name: e.rng.getstate() for name, e in engines.items()
              if name == "engine" or e is not engines["engine"]},
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    return {"step": step, "rng": rng, "mixture": mixture.state_dict(),
            "scheduler": scheduler.state_dict(), "bad_steps": bad_steps,
            "world_size": dist.get_world_size()}


def restore_trainer_state(trainer: dict, scheduler, mixture, engines: dict) -> tuple[int, int]:
    """trainer_state's inverse; returns (step, bad_steps)."""
    torch.set_rng_state(trainer["rng"]["torch"])
    random.setstate(trainer["rng"]["python"])
    for name, e in engines.items():
        if name in trainer["rng"]:
            e.rng.setstate(trainer["rng"][name])
    if trainer["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(trainer["rng"]["cuda"])
    mixture.load_state_dict(trainer["mixture"])
    scheduler.load_state_dict(trainer["scheduler"])
    return trainer["step"], trainer["bad_steps"]


def keep_metrics_until(path: str, step: int) -> None:
    """Drop the metrics lines of steps after `step` (a resumed run runs them again)."""
    if os.path.exists(path):
        lines = [line for line in metrics_lines(os.path.dirname(path)) if line["step"] <= step]
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
        os.replace(path + ".tmp", path)


class StopSignal:
    """SIGTERM/SIGINT, from the start of main: the first asks the run to finish the phase under
    way (a URPO step, the step-0 evaluation, a cold-start step), save what can be continued and
    exit 0 (main). A second one ends the process at once with one line, exit 128 + the signal's
    number: a save under way is abandoned, which leaves the checkpoints as they were (a save
    writes step_N.tmp and renames it whole), and the lock goes with the process."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested:  # a second signal: the user really wants out now
            if dist.get_rank() == 0:
                tqdm.write(f"train.py: second {name}: stopped at once, nothing more saved; "
                           "--resume continues from the newest intact checkpoint", sys.stderr)
                sys.stderr.flush()
            sys.stdout.flush()
            os._exit(128 + signum)  # no unwinding: no traceback, no half-run cleanup
        self.requested = True
        print0(f"{name}: finishing this phase (a step, the evaluation or a cold-start step), then "
               f"saving what can be continued; a second {name} stops at once")

    def agreed(self) -> bool:
        """True on every rank when any rank was signalled (one collective: no rank waits)."""
        return all_reduce([float(self.requested)], dist.ReduceOp.MAX)[0] > 0


class RunLog:
    """Rank 0's writers: metrics.jsonl (a line per step; appended to when `append`: a resume),
    wandb when asked, samples.jsonl every --samples_every steps, the progress bar. Also writes
    config.json."""

    def __init__(self, cfg: Config, start_step: int, tokenizer, append: bool = False):
        self.cfg, self.tokenizer, self.rank0 = cfg, tokenizer, dist.get_rank() == 0
        self.metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
        self.wandb = self.file = None
        self.bar = tqdm(total=cfg.steps, initial=start_step, desc="URPO", disable=not self.rank0,
                        dynamic_ncols=True)
        if not self.rank0:
            return
        config_path = os.path.join(cfg.out_dir, "config.json")
        with open(config_path + ".tmp", "w") as f:  # replaced whole: never half-written
            json.dump(dataclasses.asdict(cfg) | {"world_size": dist.get_world_size()}, f,
                      indent=2)
        os.replace(config_path + ".tmp", config_path)
        if cfg.wandb:
            try:
                import wandb
                self.wandb = wandb.init(project=cfg.wandb, config=dataclasses.asdict(cfg))
            except ImportError:
                print0("--wandb: wandb is not installed (pip install wandb); metrics.jsonl only")
        self.file = open(self.metrics_path, "a" if append else "w")

    def write(self, line: dict, groups: list | None = None, verdicts: list | None = None) -> None:
        """One metrics line; a step's line (with its groups) also moves the bar and the samples."""
        if not self.rank0 or len(line) <= 1:  # a line of its step alone says nothing
            return
        self.file.write(json.dumps(line) + "\n")
        self.file.flush()
        if self.wandb:
            self.wandb.log(line, step=line["step"])
        if groups is None:
            return
        step, every = line["step"], self.cfg.samples_every
        if every and (step % every == 0 or step == 1):
            write_samples(self.cfg, step, groups, verdicts, self.tokenizer)
        self.bar.set_postfix({t[:4]: f"{line[f'reward/{t}']:.2f}" for t in TASKS
                              if f"reward/{t}" in line} | {"tok/s": f"{line['tokens_per_s']:.0f}"})
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        if self.file:
            self.file.close()


@contextlib.contextmanager
def timed(seconds: dict, phase: str):
    """seconds[phase] = the wall time of the block (time/<phase> in the metrics line)."""
    start = time.perf_counter()
    yield
    seconds[phase] = time.perf_counter() - start


def check_engine(engine, policy, guard_ids: list[list[int]], cfg: Config,
                 step: int) -> tuple[dict[str, float], list[str]]:
    """The guard after every sync (and before the first step), every rank together: the engine's
    weights equal the trainer's, exactly, on strided samples of every tensor cast to the engine's
    dtype (rollout.compare_weights: a stale or partly loaded engine stops the run whatever the
    dtype); then the log-prob gap between engine and trainer on a few fixed prompts, numerics
    (kernels, bf16) that the IS weights correct, stops it only far above that noise
    (--logprob_gap_max). Returns the metrics, and the trainer's tensors the engine holds none
    of (not compared; named at the start)."""
    started = time.perf_counter()
    state_dict = policy.state_dict()
    shapes = {name: tuple(t.shape) for name, t in state_dict.items() if t.is_floating_point()}
    engine_side = engine.weight_samples(shapes, rollout.WEIGHT_SAMPLES)
    dtypes = {name: side[0] for name, side in engine_side.items() if side is not None}
    difference = rollout.compare_weights(
        engine_side, rollout.trainer_weight_samples(state_dict, dtypes))
    differs, = all_reduce([float(difference is not None)], dist.ReduceOp.MAX)
    if differs and difference is None:
        difference = "the engine of another rank differs (its error names the tensor)"
    rollout.check_weights(difference, step)
    checked = time.perf_counter() - started
    trainer = lambda ids: rollout.trainer_prompt_logprobs(policy, ids)
    mean_gap, max_gap = rollout.logprob_gap(engine, trainer, guard_ids)
    mean_gap, max_gap = all_reduce([mean_gap, max_gap], dist.ReduceOp.MAX)
    rollout.check_logprob_gap(mean_gap, max_gap, cfg.logprob_gap_max, step)
    return ({"logprob_gap/mean": mean_gap, "logprob_gap/max": max_gap,
             "time/weight_check": checked}, sorted(set(shapes) - set(dtypes)))


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
        return {n: s if n.startswith("count/") else s / c
                for n, s, c in zip(names, sums, counts) if c > 0}


def print0(*args) -> None:
    if dist.get_rank() == 0:
        tqdm.write(" ".join(str(a) for a in args))


def finish(cfg: Config, policy, tokenizer, compute_dtype: torch.dtype, metrics_path: str) -> None:
    """The trained model as an HF folder (RUN/final), the held-out before/after table, and the
    curves. The weights are gathered tensor by tensor, cast on the device and kept on rank 0
    only, in the compute dtype (bf16 on GPUs, like the original checkpoint)."""
    final_state = model_lib.full_state_dict(policy, compute_dtype, rank0_only=True)
    if dist.get_rank() != 0:
        return
    try:  # final/ replaces only this run's earlier final/ (a resumed run), nothing else
        model_lib.export_run(final_state, policy.config, tokenizer,
                             os.path.join(cfg.out_dir, "final"), policy.generation_config,
                             dataclasses.asdict(cfg))
    except ValueError as error:
        last = model_lib.checkpoint_dirs(cfg.out_dir)[-1]
        print0(f"final/ not written: {error}; the trained weights are in {last} "
               f"(python train.py export {last} OUT)")
    try:  # a report that fails must not keep the other ranks waiting at main's last barrier
        print0(evaluation.before_and_after(metrics_path))
        if cfg.plot:
            curves = os.path.join(cfg.out_dir, "curves.png")
            print0(f"curves: {evaluation.plot_run(metrics_path, curves)}")
    except Exception as error:
        print0(f"could not draw the run's report ({type(error).__name__}: {error}); "
               f"python train.py plot {cfg.out_dir} draws it again")
    print0(f"done: {cfg.out_dir}/final (HF folder), metrics in {metrics_path}")


def write_samples(cfg: Config, step: int, groups: list[Group], verdicts: list, tokenizer) -> None:
    """Prompts, completions, referee verdicts and rewards of rank 0's groups, one line each."""
    referee = defaultdict(list)  # self_referee numbers the open groups in batch order
    for v in verdicts:
        referee[v.group].append({"order": v.order, "text": v.text, "ranking": v.ranking}
                                | ({"score": v.score} if v.score is not None else {}))
    open_groups = iter(range(len(groups)))
    with open(os.path.join(cfg.out_dir, "samples.jsonl"), "a") as f:
        for g in groups:
            line = {"step": step, "task": g.kind, "id": g.record["id"],
                    "prompts": [tokenizer.decode(ids) for ids in g.prompts], "orders": g.orders,
                    "completions": [c.text for c in g.completions], "rewards": g.rewards,
                    "advantages": g.advantages}
            if g.kind == "open":
                line["referee"] = referee[next(open_groups)]
            f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["export"]:  # python train.py export RUN/checkpoints/step_0000100 OUT_DIR
        args = [arg for arg in sys.argv[2:] if arg != "--replace"]
        if len(args) != 2:
            raise SystemExit("usage: python train.py export CHECKPOINT_DIR OUT_DIR [--replace] "
                             "(--replace: OUT_DIR may hold an earlier export, which it replaces)")
        try:
            print(f"exported {args[0]} to "
                  f"{model_lib.export_checkpoint(*args, replace='--replace' in sys.argv)}")
        except ValueError as error:
            raise SystemExit(f"train.py export: {error}") from None
        sys.exit(0)
    if sys.argv[1:2] in (["plot"], ["compare"]):  # curves of a run, or the arms of an ablation
        sys.exit(print(evaluation.plot_command(sys.argv[1:])))
    try:
        code = main()
    except SystemExit as error:  # a user error (a message): said by rank 0, not once per rank
        if isinstance(error.code, str) and int(os.environ.get("RANK", 0)) != 0:
            code = 1
        else:
            raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    sys.exit(code)
