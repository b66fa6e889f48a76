"""Evaluation: URPO's three claims, measured for any checkpoint (README.md, "The method").

  referee       RewardBench v1 pairwise accuracy per subset and section, and the position bias
                (a second pass with every pair swapped)
  reasoning     math_reward accuracy on GSM8K, MATH-500 or sets in their schemas (greedy, or
                pass@1 over k samples), per subject and level where the data has them; AIME 2024
                and AMC 2023 as avg@k (16 samples by default) with pass@k; one reasoning average
                over the reasoning tasks that ran, naming them
  instructions  AlpacaEval answers as alpaca_eval's model_outputs.json, and a local win rate
                against the gpt4_1106_preview reference outputs, judged by a local referee

Verdicts come from rollout.referee, training's referee path; one that does not parse counts 0.5
and shows in `invalid_rate` (a referee that never follows the format scores 0.5, not a crash).
An item whose prompt and token budget exceed the engine's context is skipped and counted in
`skipped_long_prompts`. train.py's evaluate_during_training runs the same code on its engine.

Run:
  python eval.py --model runs/urpo/final --tasks rewardbench,gsm8k,math500,alpaca_eval
  # the paper's reasoning benchmarks, bundled whole in samples/ (offline): avg@16 each
  python eval.py --model runs/urpo/final --tasks aime24,amc23
  # offline, on the excerpts bundled in samples/ (hh-rlhf pairs stand in for RewardBench):
  python eval.py --tasks rewardbench,gsm8k,math500,alpaca_eval --limit 20 \\
      --rewardbench_data hh_rlhf:samples/hh_rlhf/helpful-base/test.first100.jsonl.gz \\
      --gsm8k_data gsm8k:samples/gsm8k/test.first100.jsonl \\
      --math500_data math500:samples/math500/test.first100.jsonl \\
      --alpaca_eval_data \\
      alpaca_eval:samples/alpaca_eval/results/gpt4_1106_preview/model_outputs.json
  # the win rate of an alpaca_eval annotation file, no model needed:
  A=samples/alpaca_eval/results/FuseChat-Qwen-2.5-7B-Instruct
  python eval.py --tasks alpaca_eval --out r.json \\
      --annotations $A/weighted_alpaca_eval_gpt4_turbo/annotations.json

A task's data is a data.py registry key (from the hub) or KEY:PATH (a local file in that source's
upstream schema). --out results.json gets each task's numbers when it finishes, items go to
results.items.jsonl as they are made, AlpacaEval answers to results.model_outputs.json; a rerun
with the same --out skips finished tasks and items.
"""
import argparse
import functools
import hashlib
import json
import math
import os
import random
import statistics
import sys
import time
from collections import defaultdict

import torch
from tqdm import tqdm

from data import DataError, load_with_counts, player_prompt
from model import (DEFAULT_MODEL, chat_ids, check_writable, is_path, load_tokenizer,
                   resolve_model)
from reward import RIGHT, TIMEOUT, last_boxed, math_checks
from rollout import fits, make_engine, referee

# RewardBench v1 sections (allenai/reward-bench, rewardbench/constants.py SUBSET_MAPPING).
SECTIONS = {
    "Chat": ["alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy",
             "mt-bench-med"],
    "Chat Hard": ["mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor",
                  "llmbar-adver-GPTInst", "llmbar-adver-GPTOut", "llmbar-adver-manual"],
    "Safety": ["refusals-dangerous", "refusals-offensive", "xstest-should-refuse",
               "xstest-should-respond", "donotanswer"],
    "Reasoning": ["math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"],
}
# task -> (record kind it needs, default data spec, split passed to data.load)
BENCHMARKS = {
    "rewardbench": ("preference", "rewardbench", None),
    "gsm8k": ("verifiable", "gsm8k", "test"),
    "math500": ("verifiable", "math500", None),
    "aime24": ("verifiable", "aime24:samples/aime24/test.jsonl", None),
    "amc23": ("verifiable", "amc23:samples/amc23/test.jsonl", None),
    "alpaca_eval": ("open", "alpaca_eval", None),
}


# answers per problem when --samples is not given: AIME has 30 problems, so a greedy score moves
# in steps of 3.3 points; the field reports the mean over 16 samples (avg@16) instead
DEFAULT_SAMPLES = {"aime24": 16, "amc23": 16}  # other tasks: 1 (greedy)


# ==================================================================================== scoring
def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def confidence_interval(values: list[float], level: float = 0.95, resamples: int = 2000,
                        seed: int = 0) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of `values` (one score per item: a pair, a
    problem), resampling items with replacement `resamples` times from a fixed seed, so the same
    items always give the same interval (Efron & Tibshirani, An Introduction to the Bootstrap,
    ch. 13). (nan, nan) for no items. E.g. 200 pairs half right: about (0.43, 0.57). It covers
    too little on few items (8 of 8 right gives (1.0, 1.0); at p = 0.9 and n = 8 it covers 53%):
    proportions use `proportion_interval`; this serves only what has no closed form
    (`score_interval`)."""
    if not values:
        return float("nan"), float("nan")
    scores = torch.tensor(values, dtype=torch.float64)  # [n]
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(len(scores), (resamples, len(scores)), generator=generator)  # [R, n]
    means = scores[draws].mean(dim=1)  # [R]
    tail = (1 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64))
    return low.item(), high.item()


@functools.lru_cache(maxsize=4096)  # sets and subsets of one size share their counts
def _binomial_tail_bound(successes: int, n: int, tail: float, upper: bool) -> float:
    """The p at which P(X <= successes) (upper) or P(X >= successes) (lower) of X ~ Bin(n, p)
    equals `tail`, by bisection (both tails are monotone in p); one end of Clopper-Pearson."""
    k = torch.arange(n + 1, dtype=torch.float64)  # [n + 1]
    log_comb = torch.lgamma(torch.tensor(n + 1.0)) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)
    kept = k <= successes if upper else k >= successes
    low, high = 0.0, 1.0
    for _ in range(40):  # 2^-40: far below the printed precision
        p = (low + high) / 2
        log_pmf = log_comb + k * math.log(p) + (n - k) * math.log1p(-p)  # [n + 1]
        mass = log_pmf[kept].exp().sum().item()  # P(X <= s) falls with p; P(X >= s) rises
        if (mass > tail) == upper:
            low = p
        else:
            high = p
    return (low + high) / 2


def proportion_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """The Clopper-Pearson ("exact") interval of the mean of `values`, one score in [0, 1] per
    independent unit (a pair, a problem, an instruction): it inverts the binomial test, so it
    covers at least `level` for every n and p (Clopper & Pearson, Biometrika 1934); e.g. 8 of 8
    right: (0.631, 1.0); 4 of 8: (0.157, 0.843). Wilson's interval is narrower but covers 90% at
    n = 8, p = 0.07. A sum that is not whole (a coin-flip 0.5, pass@1 over k samples) takes the
    lower end at its floor and the upper end at its ceiling: wider, never narrower (a [0, 1]
    score with mean p varies less than a 0/1 one). (nan, nan) for no values."""
    if not values:
        return float("nan"), float("nan")
    n, total, tail = len(values), sum(values), (1 - level) / 2
    below, above = math.floor(total + 1e-9), math.ceil(total - 1e-9)  # 1e-9: float sums
    low = 0.0 if below == 0 else _binomial_tail_bound(below, n, tail, upper=False)
    high = 1.0 if above == n else _binomial_tail_bound(above, n, tail, upper=True)
    return low, high


def with_interval(metrics: dict, name: str, values: list[float], scale: float = 1.0) -> None:
    """metrics[name] = mean(values) x scale, and its 95% proportion_interval (x scale) as
    name_ci_low, name_ci_high: `values` are per-unit scores in [0, 1]."""
    metrics[name] = mean(values) * scale
    low, high = proportion_interval(values)
    metrics[f"{name}_ci_low"], metrics[f"{name}_ci_high"] = low * scale, high * scale


def length_rule_score(lengths: list[int], gold: list[int]) -> float:
    """The "longer answer wins" rule on one item: 1 when the gold best is the longest candidate,
    0 when it is not, 1 / t when it ties with t - 1 others for the longest (a coin flip)."""
    longest = [i for i, length in enumerate(lengths) if length == max(lengths)]
    return float(gold[0] in longest) / len(longest)


def verdict_score(ranking: list[int] | None, gold: list[int]) -> float:
    """1.0 when the verdict puts the gold-best candidate first, else 0.0, as RewardBench scores a
    pair (and RewardBench 2 its best-of-4 items); an invalid verdict (None) is a coin flip, 0.5,
    as RewardBench counts an unparsable judgement. Not the training reward, so ablating that
    reward leaves these numbers alone."""
    return 0.5 if ranking is None else float(ranking[0] == gold[0])


def section_scores(accuracy: dict[str, float], counts: dict[str, int]) -> dict[str, float]:
    """RewardBench v1 section scores from per-subset accuracies and item counts: a section is the
    count-weighted mean of its subsets present, except that math-prm weighs as much as all hep-*
    together (RewardBench's EXAMPLE_COUNTS lists it as 984 = 6 x 164, not its size), i.e.
    Reasoning = (math-prm + mean hep) / 2; `score` is the mean of the sections. Subsets outside
    RewardBench average into `other`, the score when no RewardBench subset is present.
    Example: {"alpacaeval-easy": 1.0, "mt-bench-med": 0.5}, counts {100, 40}: Chat = 0.857."""
    scores = {}
    for section, subsets in SECTIONS.items():
        weights = {s: counts[s] for s in subsets if s in accuracy}
        if "math-prm" in weights and len(weights) > 1:
            weights["math-prm"] = sum(w for s, w in weights.items() if s != "math-prm")
        if weights:
            total = sum(accuracy[subset] * weight for subset, weight in weights.items())
            scores[section] = total / sum(weights.values())
    known = {s for subsets in SECTIONS.values() for s in subsets}
    others = [acc for s, acc in accuracy.items() if s not in known]
    if others:
        scores["other"] = mean(others)
    sections = [scores[s] for s in SECTIONS if s in scores]
    scores["score"] = mean(sections) if sections else scores.get("other", float("nan"))
    return scores


def score_interval(first_pass: dict[str, list[float]], level: float = 0.95,
                   resamples: int = 2000, seed: int = 0) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals (confidence_interval's) of every section_scores key, from
    per-subset verdict scores: the RewardBench score weighs subsets, so no binomial interval
    fits it. Resampling unit: the pair, within its subset (each subset keeps its size, hence its
    weight), `resamples` times from a fixed seed. {} for no pairs."""
    subsets = {subset: scores for subset, scores in first_pass.items() if scores}
    if not subsets:
        return {}
    generator = torch.Generator().manual_seed(seed)
    means = {}
    for subset, scores in subsets.items():
        values = torch.tensor(scores, dtype=torch.float64)  # [n_s]
        draws = torch.randint(len(values), (resamples, len(values)), generator=generator)
        means[subset] = values[draws].mean(dim=1).tolist()  # [R]
    counts = {subset: len(scores) for subset, scores in subsets.items()}
    resampled = defaultdict(list)
    for r in range(resamples):
        for key, value in section_scores({s: m[r] for s, m in means.items()}, counts).items():
            resampled[key].append(value)
    tail = (1 - level) / 2
    quantiles = torch.tensor([tail, 1 - tail], dtype=torch.float64)
    return {key: tuple(torch.quantile(torch.tensor(values, dtype=torch.float64),
                                      quantiles).tolist()) for key, values in resampled.items()}


SKIPPED = "prompt and token budget over the engine's context"


def scored(items: list[dict]) -> tuple[list[dict], int]:
    """The items that were generated, and how many were skipped as too long for the context."""
    kept = [item for item in items if not item.get("skipped")]
    return kept, len(items) - len(kept)


def referee_metrics(items: list[dict]) -> dict[str, float]:
    """Metrics of judged pairs (items with `gold`, best first; `orders`, the shown orders of two
    passes, seeded random then reversed; `rankings`, their verdicts, None if invalid; `lengths`,
    the candidates' lengths in characters). The first pass is the headline, as RewardBench judges
    each pair once; both give the position bias: `position_consistency` (same verdict in both
    orders; never for an invalid one), `accuracy_chosen_first/second` (gold-best shown first /
    later), `prefers_first_shown` (share of valid verdicts picking the first shown: 0.5 for an
    unbiased referee on shuffled pairs). The length bias: `prefers_longer` (share of valid
    verdicts picking the longest candidate) beside `length_rule_accuracy`, what "the longer
    answer wins" scores on the same items. Every rate comes with its 95% interval (`*_ci_low`,
    `*_ci_high`): Clopper-Pearson (proportion_interval) over pairs, or over verdicts for the
    rates of verdicts (chosen first/second, prefers_*: a pair's two verdicts are not independent,
    so read those as a little too narrow); `score` and `section/*` by score_interval's bootstrap
    over pairs within subsets."""
    items, skipped = scored(items)
    first_pass = defaultdict(list)
    shown_first, shown_last, first_picked, longer_picked = [], [], [], []
    for item in items:
        first_pass[item["subset"]].append(verdict_score(item["rankings"][0], item["gold"]))
        for order, ranking in zip(item["orders"], item["rankings"]):
            score = verdict_score(ranking, item["gold"])
            (shown_first if order[0] == item["gold"][0] else shown_last).append(score)
            if ranking is not None:
                first_picked.append(ranking[0] == order[0])
                if "lengths" in item:  # absent from items of older results files
                    longer_picked.append(item["lengths"][ranking[0]] == max(item["lengths"]))
    accuracy = {subset: mean(scores) for subset, scores in first_pass.items()}
    sections = section_scores(accuracy, {subset: len(s) for subset, s in first_pass.items()})
    metrics = {"score": sections.pop("score")}
    for key, (low, high) in score_interval(first_pass).items():
        name = key if key == "score" else f"section/{key}"
        metrics[f"{name}_ci_low"], metrics[f"{name}_ci_high"] = low, high
    with_interval(metrics, "accuracy", [verdict_score(item["rankings"][0], item["gold"])
                                        for item in items])
    metrics.update({f"section/{name}": value for name, value in sections.items()})
    for name, scores in sorted(first_pass.items()):
        with_interval(metrics, f"subset/{name}", scores)
    with_interval(metrics, "accuracy_both_orders",  # per item: the mean of its two verdicts
                  [mean(verdict_score(r, item["gold"]) for r in item["rankings"])
                   for item in items])
    with_interval(metrics, "position_consistency", [r[0] is not None and r[0] == r[1] for r in
                                                    (item["rankings"] for item in items)])
    with_interval(metrics, "accuracy_chosen_first", shown_first)
    with_interval(metrics, "accuracy_chosen_second", shown_last)
    with_interval(metrics, "prefers_first_shown", first_picked)
    with_interval(metrics, "prefers_longer", longer_picked)
    with_interval(metrics, "invalid_rate",  # per item: the share of its two verdicts
                  [mean(r is None for r in item["rankings"]) for item in items])
    with_interval(metrics, "length_rule_accuracy", [length_rule_score(item["lengths"], item["gold"])
                                                    for item in items if "lengths" in item])
    metrics.update(n=len(items), skipped_long_prompts=skipped)
    return metrics


def reasoning_metrics(items: list[dict]) -> dict[str, float]:
    """Accuracy (pass@1: mean reward over each problem's samples, then over problems), also per
    subject and level, the shares of answers with a \\boxed{} and cut by the token limit, each
    with its 95% Clopper-Pearson interval over problems (a problem's share of its samples is its
    score), and `timeouts`: checks out of time (scored 0; absent from items older than this
    count)."""
    items, skipped = scored(items)
    metrics = {}
    with_interval(metrics, "accuracy", [mean(item["rewards"]) for item in items])
    for key in ("subject", "level"):
        groups = defaultdict(list)
        for item in items:
            if item.get(key) is not None:
                groups[item[key]].append(mean(item["rewards"]))
        for name, values in sorted(groups.items(), key=str):
            with_interval(metrics, f"{key}/{name}", values)
    with_interval(metrics, "boxed_rate", [mean(last_boxed(text) is not None
                                               for text in item["texts"]) for item in items])
    with_interval(metrics, "truncation_rate", [mean(item["truncated"]) for item in items])
    metrics.update(mean_tokens=mean(n for item in items for n in item["tokens"]),
                   timeouts=sum(sum(item.get("timeouts", [])) for item in items), n=len(items),
                   skipped_long_prompts=skipped)
    return metrics


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of pass@k from n samples of one problem, c of them right (Chen et
    al. 2021, "Evaluating Large Language Models Trained on Code", eq. 1): the chance that k
    samples drawn without replacement from the n hold a right one, 1 - C(n-c, k) / C(n, k).
    n = 4, c = 2: pass@1 = 0.5, pass@2 = 1 - 1/6 = 5/6, pass@4 = 1. ValueError unless
    0 <= c <= n and 1 <= k <= n (pass@k needs at least k samples)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@{k} needs 1 <= k <= n samples and 0 <= c <= n right ones; got "
                         f"n={n}, c={c}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def problem_interval(strata: list[list[float]], level: float = 0.95, resamples: int = 2000,
                     seed: int = 0) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean over strata (tasks) of each stratum's mean
    of per-problem values (e.g. pass rates over k samples). The resampling unit is the problem,
    drawn with replacement within its task: a problem's k samples are not independent draws (a
    problem the model can solve is solved often), so neither they nor the per-problem rates are
    Bernoulli trials, and a proportion's interval over all samples would be too narrow. One
    stratum: the interval of one task's mean. Seeded, so the same values give the same interval.
    All problems of a task alike (e.g. every AIME problem 0 of 16) give a zero-width interval:
    it measures the problems seen, nothing about others. (nan, nan) when a stratum is empty."""
    if not strata or not all(strata):
        return float("nan"), float("nan")
    generator = torch.Generator().manual_seed(seed)
    means = torch.zeros(resamples, dtype=torch.float64)  # [R] the statistic per resample
    for values in strata:
        scores = torch.tensor(values, dtype=torch.float64)  # [n] this task's problems
        draws = torch.randint(len(scores), (resamples, len(scores)), generator=generator)  # [R, n]
        means += scores[draws].mean(dim=1) / len(strata)
    tail = (1 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64))
    return low.item(), high.item()


def pass_rates(items: list[dict]) -> list[float]:
    """Each generated problem's share of right answers (its `rewards`' mean), in item order."""
    return [mean(item["rewards"]) for item in scored(items)[0]]


def sampled_reasoning_metrics(items: list[dict]) -> dict[str, float]:
    """AIME and AMC scoring: reasoning_metrics, with its accuracy named `avg@k` (k answers per
    problem: the mean over problems of each one's pass rate; = pass@1), and `pass@j` beside it
    (j = 2, 4, 8, ... below k, and k): the mean over problems of the unbiased estimator
    pass_at_k(k, right answers, j). Each carries a 95% problem_interval (bootstrap over
    problems). E.g. rewards [1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]: avg@4 = 0.5,
    pass@2 = (5/6 + 0 + 1) / 3, pass@4 = 2/3."""
    metrics = reasoning_metrics(items)
    for key in ("accuracy", "accuracy_ci_low", "accuracy_ci_high"):
        metrics.pop(key)
    rewards = [item["rewards"] for item in scored(items)[0]]
    k = min(map(len, rewards), default=1)
    per_problem = {f"avg@{k}": [mean(r) for r in rewards]}
    for j in [2 ** i for i in range(1, k.bit_length()) if 2 ** i < k] + ([k] if k > 1 else []):
        per_problem[f"pass@{j}"] = [pass_at_k(len(r), int(sum(r)), j) for r in rewards]
    headline = {}
    for name, values in per_problem.items():
        headline[name] = mean(values)
        headline[f"{name}_ci_low"], headline[f"{name}_ci_high"] = problem_interval([values])
    return headline | metrics


def reasoning_average(per_task: dict[str, list[float]]) -> dict | None:
    """One reasoning number, as the paper's "composite reasoning average": the mean over the
    given tasks of each task's mean per-problem pass rate (its accuracy, or avg@k), every task
    weighing the same (GSM8K's 1,319 problems do not drown AIME's 30), with `tasks`, the list
    it averages (averages over other lists are not comparable), each task's value, and its 95%
    problem_interval (problems resampled within each task). Tasks without a scored problem are
    left out; None when none is left."""
    tasks = [task for task, rates in per_task.items() if rates]
    if not tasks:
        return None
    low, high = problem_interval([per_task[task] for task in tasks])
    return {"tasks": tasks, "value": mean(mean(per_task[task]) for task in tasks),
            "ci_low": low, "ci_high": high,
            "per_task": {task: mean(per_task[task]) for task in tasks},
            "interval": "95% percentile bootstrap over problems, resampled within each task"}


def instruction_metrics(items: list[dict]) -> dict[str, float]:
    """Local AlpacaEval win rate: candidates [output, reference], judged in both orders; a verdict
    is 1 (the model wins: gold [0, 1]), 0, or 0.5 if invalid; win rate = mean over items of the
    two verdicts' mean x 100, raw (not length-controlled), with its 95% Clopper-Pearson interval
    over instructions (a draw's half counts as proportion_interval says: wider, never narrower).
    Lengths in characters, as alpaca_eval's `avg_length`."""
    items, skipped = scored(items)
    preferences = [mean(verdict_score(r, [0, 1]) for r in item["rankings"]) for item in items]
    metrics = {}
    with_interval(metrics, "win_rate", preferences, scale=100)
    with_interval(metrics, "invalid_rate", [mean(r is None for r in item["rankings"])
                                            for item in items])
    with_interval(metrics, "truncation_rate", [item["truncated"] for item in items])
    return metrics | dict(
        n_wins=sum(p > 0.5 for p in preferences),
        n_losses=sum(p < 0.5 for p in preferences),
        n_draws=sum(p == 0.5 for p in preferences),
        avg_length=int(mean(len(item["output"]) for item in items)) if items else 0,
        reference_avg_length=int(mean(len(item["reference"]) for item in items)) if items else 0,
        n=len(items), skipped_long_prompts=skipped)


def annotation_win_rate(annotations: list[dict]) -> dict[str, float]:
    """alpaca_eval's `get_winrate` (metrics/helpers.py, AbsoluteScoringRule) on annotations:
    `preference` in [1, 2] (2: output_2, the evaluated model, wins), 0 (old encoding of a draw)
    read as 1.5, anything else dropped. win_rate = mean(preference - 1) x 100; the discrete one
    counts wins (> 1.5) plus half the draws. Both raw (alpaca_eval's length-controlled rate
    needs its fitted model: not computed here), each with its 95% Clopper-Pearson interval over
    rows (fractional preferences as proportion_interval says). ValueError when no row has a
    usable preference."""
    preferences, n_draws = [], 0
    for row in annotations:
        value = row.get("preference")
        value = float("nan") if value is None else float(value)
        value = 1.5 if value == 0 else value
        n_draws += value == 1.5
        if 1 <= value <= 2:
            preferences.append(value - 1)
    if not preferences:
        raise ValueError("no annotation has a preference in [1, 2]: is this an alpaca_eval "
                         "annotations.json (rows with `preference`, `output_1`, `output_2`)?")
    n_wins = sum(p > 0.5 for p in preferences)
    n_total = len(preferences)
    sem = statistics.stdev(preferences) / math.sqrt(n_total) if n_total > 1 else 0.0
    metrics = {}
    with_interval(metrics, "win_rate", preferences, scale=100)
    with_interval(metrics, "discrete_win_rate", [1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0
                                                 for p in preferences], scale=100)
    return metrics | dict(
        standard_error=sem * 100,
        n_wins=n_wins, n_wins_base=sum(p < 0.5 for p in preferences), n_draws=n_draws,
        n_total=n_total, win_rate_kind="raw (not length-controlled)",
        avg_length=int(mean(len(row.get("output_2") or "") for row in annotations)),
        judge=", ".join(sorted({str(row.get("annotator")) for row in annotations})))


# =========================================================================== model-driven passes
def generate_fitting(engine, prompts: list[list[int]], n: int, temperature: float,
                     max_new_tokens: int) -> list:
    """engine.generate for the prompts that fit in the engine's context with max_new_tokens;
    None in place of the others (vLLM would reject them, and a cut answer is no answer)."""
    fitting = [fits(engine, ids, max_new_tokens) for ids in prompts]
    outputs = iter(engine.generate([ids for ids, ok in zip(prompts, fitting) if ok], n=n,
                                   temperature=temperature, max_new_tokens=max_new_tokens)
                   if any(fitting) else [])
    return [next(outputs) if ok else None for ok in fitting]


def verdict_fields(pair: list) -> dict:
    """An item's fields from its two verdicts, or its `skipped` mark when one did not fit."""
    if None in pair:
        return dict(skipped=SKIPPED)
    return dict(rankings=[v.ranking for v in pair], texts=[v.text for v in pair])


def referee_items(engine, tokenizer, records, max_new_tokens, seed, think=True) -> list[dict]:
    """Judge each preference record twice: in a random order seeded by (seed, record id), so it
    does not depend on batching or resumption, then in the reversed order."""
    orders = []
    for record in records:
        order = list(range(len(record["responses"])))
        random.Random(f"{seed}:{record['id']}").shuffle(order)
        orders += [order, order[::-1]]
    twice = [record for record in records for _ in range(2)]
    verdicts = referee(engine, tokenizer, [r["messages"] for r in twice],
                       [r["responses"] for r in twice], orders, 0.0, max_new_tokens, think)
    return [dict(id=r["id"], subset=r["meta"].get("subset") or r["source"], gold=r["ranking"],
                 orders=orders[2 * i:2 * i + 2], lengths=[len(text) for text in r["responses"]])
            | verdict_fields(verdicts[2 * i:2 * i + 2]) for i, r in enumerate(records)]


def reasoning_items(engine, tokenizer, records, max_new_tokens, samples=1, temperature=0.0):
    """Answer each problem with the player template (greedy, or `samples` draws at
    `temperature`) and check every answer with math_reward (reward.math_checks: a check that
    timed out scores 0 and is flagged in `timeouts`)."""
    prompts = [chat_ids(tokenizer, player_prompt(r)) for r in records]
    outputs = generate_fitting(engine, prompts, samples, temperature if samples > 1 else 0.0,
                               max_new_tokens)
    items = []
    for r, outs in zip(records, outputs):
        item = dict(id=r["id"], subject=r["meta"].get("subject"), level=r["meta"].get("level"),
                    answer=r["answer"])
        if outs is None:
            items.append(item | dict(skipped=SKIPPED))
            continue
        checks = math_checks([c.text for c in outs], [r["answer"]] * len(outs))
        items.append(item | dict(
            pass_rate=mean(check == RIGHT for check in checks),  # right answers / samples
            rewards=[float(check == RIGHT) for check in checks],
            timeouts=[check == TIMEOUT for check in checks],
            truncated=[c.finish_reason == "length" for c in outs],
            tokens=[len(c.token_ids) for c in outs], texts=[c.text for c in outs]))
    return items


def instruction_items(engine, tokenizer, records, max_new_tokens, referee_engine,
                      referee_tokenizer, referee_max_new_tokens, think=True) -> list[dict]:
    """Answer each instruction greedily, then let the referee compare the answer with the
    record's reference (meta["reference"]) in both orders."""
    prompts = [chat_ids(tokenizer, player_prompt(r)) for r in records]
    answers = [outs and outs[0]
               for outs in generate_fitting(engine, prompts, 1, 0.0, max_new_tokens)]
    answered = [(r, a) for r, a in zip(records, answers) if a is not None]
    twice = [(record, answer.text) for record, answer in answered for _ in range(2)]
    verdicts = iter(referee(
        referee_engine, referee_tokenizer, [r["messages"] for r, _ in twice],
        [[text, r["meta"]["reference"]] for r, text in twice], [[0, 1], [1, 0]] * len(answered),
        0.0, referee_max_new_tokens, think))
    items = []
    for r, a in zip(records, answers):
        item = dict(id=r["id"], instruction=r["messages"][-1]["content"],
                    dataset=r["meta"].get("subset"), reference=r["meta"]["reference"])
        pair = [next(verdicts), next(verdicts)] if a is not None else [None]
        if None in pair:
            items.append(item | dict(skipped=SKIPPED, output=a.text if a is not None else ""))
        else:
            items.append(item | dict(output=a.text, truncated=a.finish_reason == "length")
                         | verdict_fields(pair))
    return items


def evaluate_items(kind: str, engine, tokenizer, records, max_new_tokens: int,
                   referee_max_new_tokens: int, seed: int = 0, samples: int = 1,
                   temperature: float = 0.0, referee_pair=None, think: bool = True) -> list[dict]:
    """The items of one batch of records of one kind; `referee_pair` is the (engine, tokenizer)
    that judges open answers (default: the evaluated model); `think`: verdicts with reasoning."""
    if kind == "preference":
        return referee_items(engine, tokenizer, records, referee_max_new_tokens, seed, think)
    if kind == "verifiable":
        return reasoning_items(engine, tokenizer, records, max_new_tokens, samples, temperature)
    referee_engine, referee_tokenizer = referee_pair or (engine, tokenizer)
    return instruction_items(engine, tokenizer, records, max_new_tokens, referee_engine,
                             referee_tokenizer, referee_max_new_tokens, think)


METRICS = {"preference": referee_metrics, "verifiable": reasoning_metrics,
           "open": instruction_metrics}
TASK_METRICS = {"aime24": sampled_reasoning_metrics, "amc23": sampled_reasoning_metrics}
def _with_intervals(*names: str) -> list[str]:
    return [key for name in names for key in (name, f"{name}_ci_low", f"{name}_ci_high")]


# what evaluate_during_training reports per kind of held-out set (train.py's metrics line), and
# which of those are counts (train.py logs them as count/eval/...)
TRAINING_METRICS = {
    "preference": _with_intervals("accuracy", "accuracy_both_orders", "position_consistency",
                                  "prefers_first_shown", "accuracy_chosen_first",
                                  "accuracy_chosen_second", "prefers_longer",
                                  "length_rule_accuracy", "invalid_rate"),
    "verifiable": [*_with_intervals("accuracy", "boxed_rate", "truncation_rate"), "timeouts"],
    "open": [*_with_intervals("win_rate", "invalid_rate"), "avg_length"]}
TRAINING_COUNTS = ("n", "skipped_long_prompts", "timeouts")


def held_out_items(engine, tokenizer, sets: dict[str, list[dict]], max_new_tokens: int,
                   seed: int = 0, batch_size: int = 16, think: bool = True,
                   referee_max_new_tokens: int | None = None, samples: int = 1,
                   temperature: float = 0.0) -> dict[str, tuple[str, list]]:
    """Each held-out set's record kind and items (evaluate_items) with the live engine: verdicts
    and open answers greedy, problems greedy or `samples` answers each at `temperature` (their
    accuracy is then avg@k); `referee_max_new_tokens` None: max_new_tokens. The model judges
    open sets itself. ValueError for a set of mixed or no record kinds."""
    judged = {}
    for name, records in sets.items():
        kinds = {record["task"] for record in records}
        if len(kinds) != 1:
            raise ValueError(f"held-out set {name!r} holds record kinds {sorted(kinds)}: give "
                             "each set one kind (verifiable, preference or open) and >= 1 record")
        kind = kinds.pop()
        items = []
        for start in range(0, len(records), batch_size):
            items += evaluate_items(kind, engine, tokenizer, records[start:start + batch_size],
                                    max_new_tokens, referee_max_new_tokens or max_new_tokens, seed,
                                    samples, temperature, think=think)
        judged[name] = (kind, items)
    return judged


def held_out_metrics(judged: dict[str, tuple[str, list]]) -> dict[str, float]:
    """`<set>/<metric>` for train.py's metrics line (e.g. "gsm8k/accuracy"): TRAINING_METRICS of
    each set's kind, n and skipped_long_prompts, from `held_out_items`' output (of every rank)."""
    metrics = {}
    for name, (kind, items) in judged.items():
        values = METRICS[kind](items)
        keys = TRAINING_METRICS[kind] + ["n", "skipped_long_prompts"]
        metrics.update({f"{name}/{key}": float(values[key]) for key in keys})
    return metrics


def evaluate_during_training(engine, tokenizer, sets: dict[str, list[dict]], max_new_tokens: int,
                             seed: int = 0, batch_size: int = 16, think: bool = True,
                             referee_max_new_tokens: int | None = None, samples: int = 1,
                             temperature: float = 0.0) -> dict[str, float]:
    """held_out_metrics of held_out_items, in one process."""
    return held_out_metrics(held_out_items(engine, tokenizer, sets, max_new_tokens, seed,
                                           batch_size, think, referee_max_new_tokens, samples,
                                           temperature))


def held_out_sets(specs: str, limit: int, fits, pairs: int | None = None) -> dict[str, list[dict]]:
    """train.py's held-out sets: per comma-separated data.py spec, keyed by its registry key, the
    first `limit` records for which `fits(record)`, the first `pairs` of a preference set (None:
    `limit`); a benchmark eval.py knows is read in its test split (hub "gsm8k": test, not the
    natural train). Raises data.DataError on a bad file."""
    sets = {}
    for spec in filter(None, specs.split(",")):  # a benchmark's own split: GSM8K's is test
        key = spec.partition(":")[0]
        records, _ = load_with_counts(spec, split=BENCHMARKS[key][2] if key in BENCHMARKS else None)
        preference = bool(records) and records[0]["task"] == "preference"
        count = pairs if preference and pairs is not None else limit
        sets[spec.split(":")[0]] = [record for record in records if fits(record)][:count]
    return sets


def format_metrics(values: dict[str, float], prefix: str = "") -> dict[str, str]:
    """Metric name (less `prefix`) -> its value as text, with its 95% interval when it has one:
    {"accuracy": 0.55, "accuracy_ci_low": 0.48, "accuracy_ci_high": 0.62} -> {"accuracy":
    "0.550 [0.48, 0.62]"}. Integers print as integers."""
    texts = {}
    for key, value in values.items():
        if not key.startswith(prefix) or key.endswith(("_ci_low", "_ci_high")):
            continue
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        if f"{key}_ci_low" in values:
            text += f" [{values[key + '_ci_low']:.2f}, {values[key + '_ci_high']:.2f}]"
        texts[key.removeprefix(prefix)] = text
    return texts


def before_and_after(metrics_path: str) -> str:
    """The held-out metrics of the first and the last evaluation of a run, side by side; a
    metric one of them could not measure (no valid verdict to measure a bias on) shows "-"."""
    evaluated = [line for line in read_jsonl(metrics_path)
                 if any(k.startswith("eval/") for k in line)]
    if not evaluated:
        return "held-out: no evaluation in this run (--eval_start_end or --eval_every)"
    first, last = (format_metrics(line, "eval/") for line in (evaluated[0], evaluated[-1]))
    if len(evaluated) == 1:  # one evaluation (a --steps 0 run, say): one column
        rows = [f"{'held-out metric (95% interval)':<40}{'step ' + str(evaluated[0]['step']):>22}"]
        rows += [f"{key:<40}{first[key]:>22}" for key in sorted(first)]
        return "\n".join(rows + interval_widths(evaluated[-1]))
    rows = [f"{'held-out metric (95% interval)':<40}{'step ' + str(evaluated[0]['step']):>22}"
            f"{'step ' + str(evaluated[-1]['step']):>22}"]
    for key in sorted(first | last):
        rows.append(f"{key:<40}{first.get(key, '-'):>22}{last.get(key, '-'):>22}")
    return "\n".join(rows + interval_widths(evaluated[-1]))


def interval_widths(line: dict) -> list[str]:
    """One line per held-out set of a metrics line: its item count and how wide its widest 95%
    interval is (the smallest change that set can tell from noise), and what a win rate is."""
    sets = sorted({key.split("/")[1] for key in line if key.startswith("eval/")})
    rows = []
    for name in sets:
        widths = [line[key] - line[key.replace("_ci_high", "_ci_low")] for key in line
                  if key.startswith(f"eval/{name}/") and key.endswith("_ci_high")
                  and not key.startswith(f"eval/{name}/win_rate")]  # win rate: in %, below
        count = line.get(f"count/eval/{name}/n")
        if widths:
            rows.append(f"{name}: {'?' if count is None else round(count)} items, 95% intervals "
                        f"(Clopper-Pearson) up to {max(widths):.2f} wide: a smaller change is not "
                        "evidence (more items: --eval_limit, --eval_pairs)")
        if f"eval/{name}/win_rate" in line:
            rows.append(f"{name}/win_rate: raw (not length-controlled), % of instructions where "
                        "the model's answer beats the reference, judged by the model itself")
    return rows


# ====================================================================================== curves
CURVES = [  # (panel title, metrics.jsonl key prefixes drawn in it); "/" ends a prefix
    ("reward per task", ["reward/"]),
    ("referee invalid rate", ["referee/invalid_rate/"]),
    ("groups that carry a gradient", ["nonzero_adv_share/"]),
    ("loss", ["loss"]),
    ("referee in training: what it follows", ["referee/accuracy/preference",
                                              "referee/position_consistency/",
                                              "referee/first_shown_best/", "referee/longer_best/"]),
]
REFEREE_ACCURACY = ("accuracy", "accuracy_both_orders", "length_rule_accuracy",
                    "accuracy_chosen_first", "accuracy_chosen_second")
REFEREE_BIAS = ("position_consistency", "prefers_first_shown", "prefers_longer", "invalid_rate")


def read_jsonl(path: str) -> list[dict]:
    """The JSON objects of a .jsonl file this project writes (metrics.jsonl), one per line. A last
    line cut short by a killed writer (no newline at its end) is left out; any other line that
    is no JSON object raises ValueError naming the file and the line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}): is "
                         "it a file this project wrote?") from None
    rows = []
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as error:
            if number == len(lines) and not text.endswith("\n"):
                break  # torn by a kill mid-write
            raise ValueError(f"{path} line {number} is damaged ({error.msg} at column "
                             f"{error.colno}): delete or repair that line") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path} line {number} is a JSON {type(row).__name__}, not an "
                             "object: delete or repair that line")
        rows.append(row)
    return rows


def _read_metrics(metrics_path: str) -> list[dict]:
    lines = [line for line in read_jsonl(metrics_path) if "step" in line]
    if not lines:
        raise ValueError(f"{metrics_path} has no metrics line: is it a train.py run's "
                         "metrics.jsonl?")
    return lines


def _draw(axis, lines: list[dict], name: str, label: str, **style) -> None:
    """One metric against the step, its 95% interval shaded where the lines have one; a
    per-step training metric of 30 or more points as its 10-step running mean."""
    points = [(line["step"], line[name], line.get(f"{name}_ci_low"), line.get(f"{name}_ci_high"))
              for line in lines if isinstance(line.get(name), (int, float))
              and math.isfinite(line[name])]
    if not points:
        return
    steps, values, lows, highs = zip(*points)
    if len(points) >= 30 and not name.startswith("eval/"):
        values = [mean(values[max(0, i - 9):i + 1]) for i in range(len(values))]
        label += " (10-step mean)"
    line, = axis.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3,
                      label=label, **style)
    if None not in lows + highs:
        axis.fill_between(steps, lows, highs, color=line.get_color(), alpha=0.15, linewidth=0)


def _finish_axes(figure, axes, last_step: int) -> None:
    import matplotlib.ticker
    for axis in axes.flat:
        axis.set_xlabel("step")
        axis.tick_params(labelbottom=True)  # shared x axis: numbered in every panel
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        axis.set_xlim(0, max(1, last_step))
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=7)
        else:
            axis.text(0.5, 0.5, "no data", ha="center", va="center", transform=axis.transAxes)


def plot_run(metrics_path: str, out_path: str) -> str:
    """Draw a run's curves from its metrics.jsonl into one PNG and return its path: the CURVES
    panels, then the held-out referee's accuracy (95% intervals shaded, beside "the longer answer
    wins" on the same pairs) and biases, and the held-out player, against the step, where step 0
    is the evaluation before training. Raises ValueError when no line has a step."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    lines = _read_metrics(metrics_path)
    keys = sorted({key for line in lines for key in line})
    held_out = [key for key in keys  # means only: not the counts, not the interval ends
                if key.startswith("eval/") and key.split("/")[-1] not in TRAINING_COUNTS
                and not key.endswith(("_ci_low", "_ci_high"))]
    referee_sets = {key.split("/")[1] for key in held_out if key.endswith("/position_consistency")}
    def drawn(prefixes):
        return [k for k in keys
                if any(k == p or (p.endswith("/") and k.startswith(p)) for p in prefixes)]
    def referee(metrics):
        return [f"eval/{s}/{m}" for s in sorted(referee_sets) for m in metrics
                if f"eval/{s}/{m}" in held_out]
    panels = [(title, drawn(prefixes)) for title, prefixes in CURVES]
    panels += [("held-out referee accuracy (chance 0.5)", referee(REFEREE_ACCURACY)),
               ("held-out referee: position and length", referee(REFEREE_BIAS)),
               ("held-out player", [k for k in held_out if k.split("/")[1] not in referee_sets])]
    figure, axes = plt.subplots(2, 4, figsize=(20, 8), constrained_layout=True, sharex=True)
    for axis, (title, names) in zip(axes.flat, panels):
        for name in names:
            dashed = name.endswith("length_rule_accuracy")
            _draw(axis, lines, name, name.removeprefix("eval/"), linestyle="--" if dashed else "-")
        axis.set_title(title)
    _finish_axes(figure, axes, lines[-1]["step"])
    figure.suptitle(f"{os.path.basename(os.path.dirname(os.path.abspath(metrics_path)))}: "
                    f"step {lines[-1]['step']} (step 0: before training)")
    figure.savefig(out_path, dpi=100)
    plt.close(figure)
    return out_path


def plot_arms(runs: dict[str, str], out_path: str, referee_set: str = "hh_rlhf") -> str:
    """Two or more runs (label -> metrics.jsonl) in one PNG, for an ablation's arms: held-out
    referee accuracy over both orders (95% intervals shaded; dashed: the longer answer wins on
    the same pairs), position consistency, the share of verdicts naming the first shown, and
    in training the share naming the first shown. Returns its path; ValueError as plot_run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 4, figsize=(20, 4.5), constrained_layout=True, sharex=True)
    last = 0
    for index, (label, path) in enumerate(runs.items()):
        lines = _read_metrics(path)
        last, color = max(last, lines[-1]["step"]), f"C{index}"
        held_out = f"eval/{referee_set}/"
        _draw(axes[0], lines, held_out + "accuracy_both_orders", label, color=color)
        _draw(axes[0], lines, held_out + "length_rule_accuracy", f"{label}: longer wins",
              color=color, linestyle="--", alpha=0.5)
        _draw(axes[1], lines, held_out + "position_consistency", label, color=color)
        _draw(axes[2], lines, held_out + "prefers_first_shown", label, color=color)
        _draw(axes[3], lines, "referee/first_shown_best/preference", label, color=color)
    for axis, title in zip(axes, ["held-out referee accuracy, both orders (chance 0.5)",
                                  "held-out position consistency",
                                  "held-out: valid verdicts naming the first shown",
                                  "training: verdicts naming the first shown"]):
        axis.set_title(title)
    _finish_axes(figure, axes, last)
    figure.savefig(out_path, dpi=100)
    plt.close(figure)
    return out_path


def plot_command(argv: list[str]) -> str:
    """`python train.py plot RUN_DIR [OUT.png]` (a run's curves; default RUN_DIR/curves.png) and
    `python train.py compare OUT.png LABEL=RUN_DIR LABEL=RUN_DIR ...` (plot_arms): the PNG's
    path; SystemExit with one line on a bad argument or a run without metrics."""
    command, args = argv[0], argv[1:]
    if command == "plot":
        if len(args) not in (1, 2):
            raise SystemExit("usage: python train.py plot RUN_DIR [OUT.png]")
        runs, out = {"": args[0]}, args[1] if len(args) == 2 else os.path.join(args[0],
                                                                             "curves.png")
    else:
        runs = dict(arg.partition("=")[::2] for arg in args[1:])
        if len(args) < 3 or not all(runs) or not all(runs.values()):
            raise SystemExit("usage: python train.py compare OUT.png LABEL=RUN_DIR LABEL=RUN_DIR "
                             "...")
        out = args[0]
    for label, run_dir in runs.items():
        if not os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
            raise SystemExit(f"train.py {command}: no metrics.jsonl in {run_dir} "
                             f"({label or 'RUN_DIR'} holds a metrics.jsonl)")
    paths = {label: os.path.join(run_dir, "metrics.jsonl") for label, run_dir in runs.items()}
    try:  # an empty metrics file: a run still in its first evaluation
        return plot_run(paths[""], out) if command == "plot" else plot_arms(paths, out)
    except ValueError as error:
        raise SystemExit(f"train.py {command}: {error}") from None


# ======================================================================================== CLI
class Results:
    """--out (settings and metrics per task, rewritten atomically) and its items file (a JSON
    line per finished item, appended). A task rerun under other settings is an error naming the
    first difference (task_settings: the model's weights, engine, dtype, budgets, ...), unless
    `fresh` (--fresh) empties both files first; so are a folder that cannot be written and a
    file that is no eval.py results file (SystemExit, one line each; `fresh` never deletes one).
    """

    def __init__(self, path: str, fresh: bool = False):
        self.path, self.items_path = path, os.path.splitext(path)[0] + ".items.jsonl"
        self.data, self.items = {"tasks": {}}, defaultdict(list)
        try:
            check_writable(os.path.dirname(os.path.abspath(path)))
        except ValueError as error:
            raise SystemExit(f"eval.py: --out {path!r}: {error}") from None
        if os.path.exists(path):
            try:
                with open(path) as f:
                    self.data = json.load(f)
                problem = None if isinstance(self.data, dict) and isinstance(
                    self.data.get("tasks"), dict) else "no 'tasks' object in it"
            except (OSError, ValueError) as error:
                problem = f"{type(error).__name__}: {str(error).splitlines()[0]}"
            if problem:
                raise SystemExit(f"eval.py: --out {path!r} is not an eval.py results file "
                                 f"({problem}): choose another --out or delete that file")
            if fresh:
                self.data = {"tasks": {}}
                self.save()
                if os.path.exists(self.items_path):  # this results file's own items
                    os.remove(self.items_path)
        elif os.path.exists(self.items_path):  # not ours to delete: whose run wrote it?
            raise SystemExit(f"eval.py: --out {path!r}: {self.items_path} is there without "
                             f"{path}: choose another --out, or move that file away")
        if os.path.exists(self.items_path):
            with open(self.items_path) as f:
                lines = f.readlines()
            for kept, line in enumerate(lines):
                try:
                    item = json.loads(line) if line.endswith("\n") else None
                except json.JSONDecodeError:
                    item = None
                if item is None and kept + 1 < len(lines):  # damage, not an interruption
                    raise SystemExit(f"eval.py: {self.items_path} line {kept + 1} is damaged: "
                                     "repair it, or delete it and the lines after it (their "
                                     "items are made again)")
                if item is None:  # the last line, torn by an interruption: drop it, redo it
                    with open(self.items_path, "w") as f:
                        f.writelines(lines[:kept])
                    break
                self.items[item.pop("task")].append(item)

    def save(self):
        with open(self.path + ".tmp", "w") as f:
            json.dump(self.data, f, indent=1)
        os.replace(self.path + ".tmp", self.path)  # atomic: the old file or the new one, whole

    def finished(self, task: str, settings: dict) -> bool:
        entry = self.data["tasks"].get(task)
        used = entry and (entry["status"] == "done" or self.items[task])
        if used and entry["settings"] != settings:
            old = entry["settings"]
            key = next(k for k in [*settings, *old] if settings.get(k, "absent") != old.get(
                k, "absent"))
            raise SystemExit(f"eval.py: {self.path} holds '{task}' run with {key} "
                             f"{old.get(key, 'absent')!r}, now {settings.get(key, 'absent')!r} "
                             "(its first difference): pass --fresh to start that file afresh, "
                             "or choose another --out")
        return bool(entry) and entry["settings"] == settings and entry["status"] == "done"

    def start(self, task: str, settings: dict, sources: dict | None = None):
        """A task begins: its settings, and where each budget or format came from (`sources`,
        recorded, not compared: a flag and a run config that agree give the same numbers)."""
        self.data["tasks"][task] = {"status": "running", "settings": settings, "metrics": {},
                                    "settings_from": sources or {}}
        self.save()

    def add_items(self, task: str, items: list[dict]):
        with open(self.items_path, "a") as f:
            f.writelines(json.dumps({"task": task, **item}) + "\n" for item in items)
        self.items[task] += items

    def finish(self, task: str, metrics: dict):
        # NaN (e.g. no valid verdict to measure a bias on) is not JSON: it is written as null
        metrics = {key: None if isinstance(value, float) and math.isnan(value) else value
                   for key, value in metrics.items()}
        self.data["tasks"][task].update(status="done", metrics=metrics)
        self.save()


WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def model_fingerprint(path: str) -> str:
    """An identity of a model folder's weights: 16 hex digits of a SHA-256 over each weight
    file's name, size and modification time (not its bytes: 15 GB would take a minute to read),
    so a model retrained or re-exported in place gets another; the tokenizer and configs are left
    out (a results file written into the folder must not change it). Files are followed through
    symlinks (the HF cache's snapshots)."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if name.endswith(WEIGHT_FILES):
            stat = os.stat(os.path.join(path, name))
            digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def task_settings(args, task: str, fingerprints: dict[str, str] | None = None) -> dict:
    """What a task's numbers depend on: a rerun continues a task only under the same settings.
    `fingerprints`: flag -> model_fingerprint of the models the task uses ("model", and
    "referee_model" for a separate alpaca_eval referee)."""
    if task == "alpaca_eval" and args.annotations:
        return {"annotations": args.annotations}
    kind = BENCHMARKS[task][0]
    fingerprints = fingerprints or {}
    settings = dict(model=args.model, model_weights=fingerprints.get("model"),
                    engine=args.engine, dtype=args.dtype, device=args.device,
                    data=getattr(args, f"{task}_data"), limit=args.limit, seed=args.seed)
    if kind != "preference":
        settings.update(max_new_tokens=args.max_new_tokens)
    if kind != "verifiable":
        settings.update(referee_max_new_tokens=args.referee_max_new_tokens)
        if not args.referee_think:  # absent when True: older results files still match
            settings.update(think=False)
    if kind == "verifiable":
        samples = task_samples(args, task)
        settings.update(samples=samples, temperature=args.temperature if samples > 1 else 0.0)
    if kind == "open":
        settings.update(referee_model=args.referee_model or args.model,
                        referee_weights=fingerprints.get("referee_model",
                                                         fingerprints.get("model")))
    return settings


def task_samples(args, task: str) -> int:
    """Answers per problem of a reasoning task: --samples, else DEFAULT_SAMPLES (16 on aime24 and
    amc23), else 1 (greedy)."""
    return args.samples or DEFAULT_SAMPLES.get(task, 1)


def load_task_data(task: str, spec: str, limit: int | None) -> list[dict]:
    """A task's records, checked to be of the kind the task needs (SystemExit otherwise)."""
    kind, _, split = BENCHMARKS[task]
    try:
        records, skipped = load_with_counts(spec, split=split, limit=limit)
    except DataError as error:
        raise SystemExit(f"eval.py: --{task}_data: {error}") from error
    print(f"{task}: {spec}: {len(records)} records, skipped rows {skipped or 'none'}")
    if not records:
        raise SystemExit(f"eval.py: --{task}_data {spec} gave no usable records")
    if any(r["task"] != kind for r in records):
        raise SystemExit(f"eval.py: task '{task}' needs {kind} records, but {spec} gives "
                         f"{records[0]['task']} ones: pick a {kind} source")
    if task == "alpaca_eval" and not all(r["meta"].get("reference") for r in records):
        raise SystemExit(f"eval.py: --alpaca_eval_data {spec}: records lack the reference "
                         "outputs to compare with: use an alpaca_eval model_outputs.json")
    return records


def resolve(flag: str, name: str) -> str:
    """The local folder of a model flag's value, or one line saying what to fix."""
    try:
        return resolve_model(name)
    except (OSError, ValueError) as error:
        raise SystemExit(f"eval.py: {flag} {name!r}: {str(error).splitlines()[0]}") from None


def load_engine(args, flag: str, path: str):
    """Tokenizer and engine of a resolved model folder; a tokenizer that cannot serve ends in
    one line naming the flag (engine errors are bugs: their traceback is kept)."""
    try:
        tokenizer = load_tokenizer(path)
    except (OSError, ValueError) as error:
        raise SystemExit(f"eval.py: {flag} {path!r}: {str(error).splitlines()[0]}") from None
    return tokenizer, make_engine(args.engine, path, tokenizer, getattr(torch, args.dtype),
                                  args.device, args.seed)


def run_task(results: Results, task: str, records, make_items, summarize, batch_size) -> dict:
    """Make the task's missing items batch by batch, stored as they come, then its metrics."""
    done = results.items[task]
    if [item["id"] for item in done] != [r["id"] for r in records[:len(done)]]:
        raise SystemExit(f"eval.py: {results.items_path} holds '{task}' items of other records: "
                         "choose another --out or delete its files")
    started = time.time()
    with tqdm(total=len(records), initial=len(done), desc=task, unit="item") as progress:
        for start in range(len(done), len(records), batch_size):
            chunk = records[start:start + batch_size]
            results.add_items(task, make_items(chunk))
            progress.update(len(chunk))
    return {**summarize(results.items[task]), "seconds": round(time.time() - started, 1)}


def model_outputs_path(results: Results, args, todo: list[str]) -> str:
    """Where the alpaca_eval answers go (beside --out); SystemExit before any work when a file
    is there that no earlier run of this --out wrote (eval.py overwrites only its own)."""
    path = os.path.splitext(args.out)[0] + ".model_outputs.json"
    if ("alpaca_eval" in todo and not args.annotations and os.path.exists(path)
            and "alpaca_eval" not in results.data["tasks"]):
        raise SystemExit(f"eval.py: --out {args.out!r}: {path} is there, not written by a run "
                         "of this --out: choose another --out, or move that file away")
    return path


def write_model_outputs(results: Results, args):
    """The answers in alpaca_eval's model_outputs.json format, for its official evaluator."""
    generator = args.generator or os.path.basename(os.path.normpath(args.model))
    outputs = [dict(dataset=item["dataset"], instruction=item["instruction"],
                    output=item["output"], generator=generator)
               for item in results.items["alpaca_eval"]]
    path = model_outputs_path(results, args, [])
    with open(path, "w") as f:
        json.dump(outputs, f, indent=1)
    skipped = sum(bool(item.get("skipped")) for item in results.items["alpaca_eval"])
    print(f"alpaca_eval: {len(outputs)} answers written to {path}"
          + (f" ({skipped} not generated and written empty: prompt over the engine's context; "
             "alpaca_eval counts them as losses)" if skipped else ""))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--model", default=DEFAULT_MODEL, help="HF folder or hub id to evaluate")
    add("--tasks", default=",".join(BENCHMARKS), help="comma-separated tasks")
    for task, (kind, spec, _) in BENCHMARKS.items():
        add(f"--{task}_data", default=spec, help=f"{kind} data: a data.py registry key or KEY:PATH")
    add("--limit", type=int, default=None, help="first N records of each task")
    add("--engine", choices=["hf", "vllm"], default="hf", help="generation engine")
    add("--device", default="cpu", help="torch device of the engine")
    add("--dtype", choices=["float32", "bfloat16"], default="float32", help="engine dtype")
    add("--batch_size", type=int, default=8, help="prompts per generate call")
    add("--max_new_tokens", type=int, default=None,
        help=f"answer token budget (None: the run's eval_max_new_tokens, read from the model's "
             f"urpo_config.json or its run's config.json; else {DEFAULTS['max_new_tokens']})")
    add("--referee_max_new_tokens", type=int, default=None,
        help=f"token budget of a referee verdict (None: the run's, as --max_new_tokens; else "
             f"{DEFAULTS['referee_max_new_tokens']})")
    add("--samples", type=int, default=None,
        help="reasoning: answers per problem (1: greedy; k > 1: pass@1 over k, avg@k on aime24 "
             "and amc23; None: 16 on aime24 and amc23, 1 elsewhere)")
    add("--temperature", type=float, default=0.6,
        help="reasoning: sampling temperature when --samples > 1")
    add("--referee_model", help="the referee of alpaca_eval answers (None: the evaluated model)")
    add("--generator", help="generator name in model_outputs.json (default: the model's folder)")
    add("--annotations", help="alpaca_eval annotations.json to score instead of generating")
    add("--referee_think", action=argparse.BooleanOptionalAction, default=None,
        help="referee verdicts open with reasoning in <think></think> (None: as the model was "
             "trained, read from its urpo_config.json or its run's config.json; else on)")
    add("--seed", type=int, default=0, help="seed of the shown orders and sampling")
    add("--out", default="results.json", help="results file (resumable)")
    add("--fresh", action="store_true",
        help="start --out afresh (its finished tasks and items are dropped) instead of refusing "
             "a rerun whose settings differ")
    args = parser.parse_args(argv)
    counts = {flag: getattr(args, flag) for flag in  # checked before any data or model loads
              ("limit", "batch_size", "max_new_tokens", "referee_max_new_tokens", "samples")}
    problems = [f"--{flag} {value}: use 1 or more"
                for flag, value in counts.items() if value is not None and value < 1]
    samples = max(task_samples(args, task.strip()) for task in args.tasks.split(","))
    if samples > 1 and not 0 < args.temperature < math.inf:  # greedy (1) needs none
        problems.append(f"--temperature {args.temperature}: use a finite number > 0 to sample "
                        f"--samples {samples}, or --samples 1 (greedy, no temperature)")
    if problems:
        raise SystemExit("eval.py: " + "\neval.py: ".join(problems))
    return args


# eval.py's own budgets and format, for a model that is no train.py output
DEFAULTS = {"max_new_tokens": 512, "referee_max_new_tokens": 256, "referee_think": True}
# each setting -> the run config's field that gives it. The answer budget is the run's
# eval_max_new_tokens, not max_new_tokens: it is what the run chose to evaluate answers with (its
# own held-out numbers used it, so eval.py reproduces them; the paper preset sets both to 2048),
# while max_new_tokens bounds the sampled training groups; a config without it (older runs) gives
# max_new_tokens. referee_temperature is recorded only: every verdict here is greedy.
TRAINED = {"max_new_tokens": ("eval_max_new_tokens", "max_new_tokens"),
           "referee_max_new_tokens": ("referee_max_new_tokens",), "referee_think":
           ("referee_think",), "referee_temperature": ("referee_temperature",)}


def run_config(model: str) -> tuple[dict, str] | tuple[None, None]:
    """The train.py config `model` was trained with and its path: the urpo_config.json that
    train.py writes into final/ and into every export, or RUN/config.json beside RUN/final;
    (None, None) for any other model."""
    for path in (os.path.join(model, "urpo_config.json"),
                 os.path.join(os.path.dirname(os.path.abspath(model)), "config.json")):
        if os.path.isdir(model) and os.path.isfile(path):
            try:
                with open(path) as f:
                    config = json.load(f)
            except (OSError, ValueError) as error:
                raise SystemExit(f"eval.py: --model {model!r}: cannot read its run config "
                                 f"{path} ({str(error).splitlines()[0]}): fix that file or "
                                 "pass every budget as a flag") from None
            if isinstance(config, dict):
                return config, path
    return None, None


def trained_settings(args, say: bool = True) -> dict[str, dict]:
    """Fill args' budgets and verdict format left at None (--max_new_tokens,
    --referee_max_new_tokens, --referee_think) as the model was trained (TRAINED, from
    run_config), else DEFAULTS; returns each setting's {"value", "from"}: "flag", the run
    config's "PATH: FIELD", or "default". The run's referee_temperature is recorded when there
    is one. When a setting falls to its default and `say`, stderr says so (unless `model` is a
    path with nothing there: resolve() names that)."""
    config, path = run_config(args.model)
    used = {}
    for name, fields in TRAINED.items():
        flag = getattr(args, name, None)
        field = next((f for f in fields if config and config.get(f) is not None), None)
        if flag is not None:
            used[name] = {"value": flag, "from": "flag"}
        elif field:
            used[name] = {"value": config[field], "from": f"{path}: {field}"}
        elif name in DEFAULTS:
            used[name] = {"value": DEFAULTS[name], "from": "default"}
        if name in DEFAULTS:
            setattr(args, name, used[name]["value"])
    defaulted = [name for name, entry in used.items() if entry["from"] == "default"]
    if say and defaulted and (os.path.isdir(args.model) or not is_path(args.model)):
        where = f"{path} lacks them" if config else "no train.py run config"
        print(f"eval.py: {args.model}: {where}: eval.py's defaults for {', '.join(defaulted)} "
              "(verdicts with reasoning unless --no-referee_think)", file=sys.stderr)
    return used


def main(argv=None):
    args = parse_args(argv)
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    if not tasks or any(task not in BENCHMARKS for task in tasks):
        raise SystemExit(f"eval.py: unknown task in --tasks {args.tasks!r}: "
                         f"choose from {', '.join(BENCHMARKS)}")
    if args.annotations and "alpaca_eval" not in tasks:
        raise SystemExit("eval.py: --annotations scores the alpaca_eval task: add it to --tasks")

    needs_model = [task for task in tasks if not (task == "alpaca_eval" and args.annotations)]
    used = trained_settings(args, say=any(BENCHMARKS[task][0] != "verifiable"
                                          for task in needs_model))

    # ---- validate everything before the first generation: results file, models, data
    results = Results(args.out, args.fresh)
    paths = {}
    if needs_model:  # both models found before any data or either model loads
        paths["model"] = resolve("--model", args.model)
        if "alpaca_eval" in needs_model and args.referee_model not in (None, args.model):
            paths["referee_model"] = resolve("--referee_model", args.referee_model)
    fingerprints = {flag: model_fingerprint(path) for flag, path in paths.items()}
    settings = {task: task_settings(args, task, fingerprints) for task in tasks}
    todo = [task for task in tasks if not results.finished(task, settings[task])]
    model_outputs_path(results, args, todo)
    for task in (task for task in tasks if task not in todo):
        print(f"{task}: finished earlier in {args.out}, skipped")
    annotation_metrics = None
    if args.annotations and "alpaca_eval" in todo:
        try:
            with open(args.annotations) as f:
                annotation_metrics = annotation_win_rate(json.load(f))
        except (OSError, ValueError, TypeError, AttributeError) as error:
            raise SystemExit(f"eval.py: --annotations {args.annotations}: {error}") from error
    generate = [task for task in todo if not (task == "alpaca_eval" and annotation_metrics)]
    data = {}
    if generate:
        data = {task: load_task_data(task, getattr(args, f"{task}_data"), args.limit)
                for task in generate}
        tokenizer, engine = load_engine(args, "--model", paths["model"])
        referee_tokenizer, referee_engine = tokenizer, engine
        if "referee_model" in paths and "alpaca_eval" in generate:
            referee_tokenizer, referee_engine = load_engine(args, "--referee_model",
                                                            paths["referee_model"])

    # ---- run: finished items are kept, so an interrupted task continues where it stopped
    for task in todo:
        results.start(task, settings[task], used)
        if task not in data:
            results.finish(task, annotation_metrics)
            continue
        kind = BENCHMARKS[task][0]
        make_items = functools.partial(  # one batch of records -> their items
            evaluate_items, kind, engine, tokenizer, max_new_tokens=args.max_new_tokens,
            referee_max_new_tokens=args.referee_max_new_tokens, seed=args.seed,
            samples=task_samples(args, task), temperature=args.temperature,
            referee_pair=(referee_engine, referee_tokenizer), think=args.referee_think)
        metrics = run_task(results, task, data[task], make_items,
                           TASK_METRICS.get(task, METRICS[kind]), args.batch_size)
        if task == "alpaca_eval":
            write_model_outputs(results, args)
            metrics.update(win_rate_kind="raw (not length-controlled)", judge=(
                args.referee_model if "referee_model" in paths else
                f"{args.model} (the evaluated model judges itself)"))
        results.finish(task, metrics)

    if paths:  # what the numbers were made with (an annotation file needs none of it)
        print(f"\n{'setting':<24}{'value':>16}  from")
        for name, entry in used.items():
            note = " (recorded only: verdicts here are greedy)" * (name == "referee_temperature")
            print(f"{name:<24}{entry['value']!s:>16}  {entry['from']}{note}")
        print(f"{'model_weights':<24}{fingerprints['model']:>16}  {paths['model']}, --engine "
              f"{args.engine}, --dtype {args.dtype}, --device {args.device}")
    print(f"\n{'task':<14}{'metric':<36}{'value (95% interval)':>24}")
    for task in tasks:
        metrics = {key: float("nan") if value is None else value
                   for key, value in results.data["tasks"][task]["metrics"].items()}
        for metric, text in format_metrics(metrics).items():
            print(f"{task:<14}{metric:<36}{text:>24}")
    report_reasoning_average(results, [t for t in tasks if BENCHMARKS[t][0] == "verifiable"])


def report_reasoning_average(results: Results, tasks: list[str]) -> None:
    """The reasoning_average of the reasoning tasks of this run (finished now or earlier) into
    --out as `reasoning_average` (a rerun over other tasks replaces it) and as the table's last
    rows, with the tasks it averages."""
    average = reasoning_average({task: pass_rates(results.items[task]) for task in tasks})
    if average is None:
        return
    results.data["reasoning_average"] = average
    results.save()
    text = format_metrics({"average": average["value"], "average_ci_low": average["ci_low"],
                           "average_ci_high": average["ci_high"]})["average"]
    print(f"{'reasoning':<14}{'average of ' + str(len(average['tasks'])) + ' tasks':<36}"
          f"{text:>24}\n{'':<14}(the mean of {', '.join(average['tasks'])}, one weight each; "
          "interval: bootstrap over problems)")


if __name__ == "__main__":
    main()
