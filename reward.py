r"""Rewards: the numbers that GRPO turns into advantages (README.md, "The method").

Every prompt of a step ends up here after its rollouts:
- verifiable (math) prompts: `math_reward` / `math_rewards` check the final `\boxed{...}` answer
  of each completion against the gold answer with math-verify, every "equal" it finds confirmed
  exactly (`math_checks` has the rules, and tells a timed-out check from a wrong answer);
- preference prompts (the model as referee, ground truth known): `read_verdict` reads the
  referee's `<answer>[i] > [j] > ...</answer>` (`parse_ranking`) and undoes the random display
  order (`to_original`), `ranking_reward` scores it against the gold ranking; `format_verdict`
  writes the same format (the template's example, the cold start's targets);
- open prompts (the model judges its own answers): `balanced_self_rewards` keeps the complete
  balanced sets of the referee's verdicts (an order and its reverse, both valid) and
  `self_rewards` averages `rank_scores` over their rankings; pointwise, `parse_score` reads a
  1-10 score and `scored_self_rewards` averages complete rounds (`scored_preference_rewards`
  scores such verdicts on preference pairs); `agreement_rewards` pays a verdict on an open group
  for agreeing with the group's other verdicts (--open_verdict_reward consistency);
- order-balanced referee groups: `consistency_rewards` pays index-aligned verdicts of different
  presentations for naming the same candidate (PA-GRPO).

Everything here is a plain function of strings and lists; nothing of the project is imported.

math-verify can spend seconds, or hours, on adversarial LaTeX (`9^{9^{9^{9}}}`, a thousand
nested parentheses), and a time limit by signal works only on the main thread of the main
interpreter. A thread cannot be stopped from outside, so the checks run in one long-lived worker
process: this file run as a script (see `_serve` at the bottom), where one SIGALRM bounds each
whole check (`WORKER_DEADLINE_S`). The caller waits at most `MATH_TIMEOUT_S` per answer, then
kills the worker (a fresh one starts on the next call). Either way the check is TIMEOUT: scored
0.0 this time, counted (`timed_out_checks`), never cached. The worker is a plain
`python reward.py` child rather than a multiprocessing child, so it never re-imports the
training script (`spawn` and `forkserver` both run `__main__` again, which for a script-style
train.py means torch and a second training run) and it is safe to start from a process that
holds CUDA or NCCL state (no bare `fork`).
"""

import atexit
from fractions import Fraction
import functools
import itertools
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading

# ---------------------------------------------------------------------------------------------
# Referee rankings
# ---------------------------------------------------------------------------------------------

# A label is `[2]` or `2`; ASCII digits only (`\d` would accept other scripts' digits), no 0.
_LABEL = re.compile(r"\[([1-9][0-9]*)\]|([1-9][0-9]*)")


def parse_ranking(text: str, k: int) -> list[int] | None:
    r"""The referee's ranking of k candidates: 0-based shown positions, best first, or None.

    Only closed `<answer>...</answer>` blocks count and the last one decides. It must name every
    label 1..k exactly once, separated by `>`, each written `[2]` or `2`; whitespace around labels
    and `>` is ignored. Anything else (a tie `=`, a missing, repeated or out-of-range label, other
    words in the block, no closed block) is invalid.

    >>> parse_ranking("<think>[2] is right</think><answer>[2] > 3 >\n[1]</answer>", 3)
    [1, 2, 0]
    """
    if k < 2:
        raise ValueError(f"a ranking needs k >= 2 candidates, got k={k}")
    block = _answer_block(text)
    if block is None:
        return None
    labels = []
    for part in block.split(">"):
        match = _LABEL.fullmatch(part.strip())
        if match is None:
            return None
        labels.append(int(match.group(1) or match.group(2)))
    if sorted(labels) != list(range(1, k + 1)):
        return None
    return [label - 1 for label in labels]


def _answer_block(text: str) -> str | None:
    """What the last closed `<answer>...</answer>` block holds; None without one."""
    end = text.rfind("</answer>")
    start = text.rfind("<answer>", 0, end) if end != -1 else -1
    return None if start == -1 else text[start + len("<answer>"):end]


def to_original(shown: list[int] | None, order: list[int]) -> list[int] | None:
    """Map a ranking of shown positions back to original candidate indices (None stays None).

    The referee saw `responses[order[j]]` under label `[j+1]`, so shown position j is candidate
    order[j]: with order = [2, 0, 1], the shown ranking [0, 2, 1] is [2, 1, 0] in the original.
    """
    if shown is None:
        return None
    return [order[position] for position in shown]


def format_verdict(shown_ranking: list[int], thinking: str | None = None) -> str:
    """A verdict in the format that `parse_ranking` reads: `shown_ranking` holds 0-based shown
    positions, best first; [1, 0] gives "<answer>[2] > [1]</answer>", preceded by
    "<think>thinking</think>\n" when given. The referee template's example and the cold
    start's targets are written with it, so the verdict format lives in these two functions."""
    answer = "<answer>" + " > ".join(f"[{j + 1}]" for j in shown_ranking) + "</answer>"
    return answer if thinking is None else f"<think>{thinking}</think>\n{answer}"


def read_verdict(text: str, order: list[int]) -> list[int] | None:
    """The ranking a referee wrote for candidates shown in `order`, as original candidate indices,
    best first; None if the verdict is invalid. `parse_ranking`, then `to_original`: every
    verdict of training and evaluation is read here."""
    return to_original(parse_ranking(text, len(order)), order)


def ranking_reward(pred: list[int] | None, gold: list[int]) -> float:
    """Fraction of the gold ranking's pairs that `pred` orders the same way; None -> 0.0.

    Both rankings are original candidate indices, best first. For K = 2 this is 1.0 (right) or
    0.0 (wrong); gold [0, 1, 2] against pred [0, 2, 1] agrees on (0,1) and (0,2), not (1,2): 2/3.
    """
    if pred is None:
        return 0.0
    if len(gold) < 2 or sorted(pred) != sorted(gold):
        raise ValueError(
            f"pred {pred} must rank the same >= 2 candidates as gold {gold}; map shown positions "
            f"to original indices with to_original first"
        )
    position = {candidate: rank for rank, candidate in enumerate(pred)}
    pairs = list(itertools.combinations(gold, 2))  # (better, worse) under the gold order
    agreed = sum(position[better] < position[worse] for better, worse in pairs)
    return agreed / len(pairs)


def rank_scores(ranking: list[int], k: int) -> list[float]:
    """Score of each original candidate under one ranking: best 1.0, worst 0.0, linear between.

    The candidate at position p gets (k - 1 - p) / (k - 1): ranking [2, 0, 1] gives
    [0.5, 0.0, 1.0].
    """
    if k < 2 or sorted(ranking) != list(range(k)):
        raise ValueError(f"ranking {ranking} must be a permutation of range({k}) with k >= 2")
    scores = [0.0] * k
    for position, candidate in enumerate(ranking):
        scores[candidate] = (k - 1 - position) / (k - 1)
    return scores


def self_rewards(rankings: list[list[int] | None], k: int) -> list[float] | None:
    """Self-assessed rewards of a group of k answers from the referee's rankings of them.

    `rankings` holds the verdicts, already mapped to answer indices, best first (None where the
    referee's output did not parse); a ranking may show all k answers (URPO's listwise pass) or
    some (a pairwise tournament). In a ranking of n answers, position p scores (n - 1 - p) /
    (n - 1) (`rank_scores`); an answer's reward is its mean score over the valid rankings that
    show it, 0.5 if none does. None when no ranking is valid: the group is dropped.
    """
    valid = [ranking for ranking in rankings if ranking is not None]
    if not valid:
        return None
    scores = [[] for _ in range(k)]
    for ranking in valid:  # exact fractions: rewards a position-blind set makes equal are equal
        for position, answer in enumerate(ranking):
            scores[answer].append(Fraction(len(ranking) - 1 - position, len(ranking) - 1))
    return [float(sum(s) / len(s)) if s else 0.5 for s in scores]


def balanced_self_rewards(verdict_sets: list[list[list[int] | None]],
                          k: int) -> tuple[list[float] | None, int]:
    """Self-assessed rewards of a group of k answers from balanced sets of verdicts, and how many
    valid verdicts were left out because their set was incomplete.

    `verdict_sets` holds the group's verdicts set by set: each set shows the answers in orders
    that together cancel shown position (URPO's listwise protocol: an order and its reverse, so
    the answer at position p in one is at k - 1 - p in the other and a referee that ranks by
    position alone gives every answer the same mean score), each verdict already mapped to
    answer indices, best first, None where it did not parse. Only COMPLETE sets count, every
    verdict of the set valid: a lone valid verdict whose partner failed pays its shown order,
    not content, so it is left out and counted. Returns (self_rewards of the complete sets'
    rankings, or None when no set is complete: the group is dropped; the count left out).

    >>> balanced_self_rewards([[[0, 1], [0, 1]], [[1, 0], None]], 2)
    ([1.0, 0.0], 1)
    """
    complete = [ranking for rankings in verdict_sets if all(r is not None for r in rankings)
                for ranking in rankings]
    left_out = sum(ranking is not None for rankings in verdict_sets if None in rankings
                   for ranking in rankings)
    return (self_rewards(complete, k) if complete else None), left_out


def parse_score(text: str, low: int = 1, high: int = 10) -> int | None:
    """A pointwise referee's score of one candidate: the whole number inside the last closed
    `<answer>...</answer>` block, from `low` to `high` (whitespace around it ignored), or None
    (no closed block, other words, a decimal, out of range).

    >>> parse_score("<think>fine</think><answer> 7 </answer>")
    7
    """
    content = (_answer_block(text) or "").strip()
    if not re.fullmatch(r"[0-9]{1,3}", content) or not low <= int(content) <= high:
        return None
    return int(content)


def format_score(score: int, thinking: str | None = None) -> str:
    """A pointwise verdict in the format that `parse_score` reads: "<answer>7</answer>", after
    "<think>thinking</think>\n" when given (the cold start's targets)."""
    answer = f"<answer>{score}</answer>"
    return answer if thinking is None else f"<think>{thinking}</think>\n{answer}"


def scored_self_rewards(rounds: list[list[tuple[int, int] | None]], k: int, low: int = 1,
                        high: int = 10) -> tuple[list[float] | None, int]:
    """Self-assessed rewards of a group of k answers from pointwise scores, and how many valid
    scores were left out, `balanced_self_rewards`' rule for the pointwise protocol.

    `rounds` holds the group's scores round by round: a round scores every answer once, each
    alone, as (answer, score), None where the verdict did not parse or fit. Only COMPLETE
    rounds count (every score valid): a referee whose scores are blind to the answer (one
    number for the whole round, or one that drifts from round to round) then pays every answer
    the same, while averaging the valid scores answer by answer would pay the answers whose
    partner scores happened to fail. An answer's reward is its mean over complete rounds of
    (score - low) / (high - low): 10 -> 1.0, 1 -> 0.0. None when no round is complete.

    >>> scored_self_rewards([[(0, 10), (1, 4)], [(0, 7), None]], 2)
    ([1.0, 0.3333333333333333], 1)
    """
    complete = [scores for scores in rounds if None not in scores]
    left_out = sum(score is not None for scores in rounds if None in scores for score in scores)
    if not complete:
        return None, left_out
    totals = [Fraction(0)] * k
    for scores in complete:
        if sorted(answer for answer, _ in scores) != list(range(k)):
            raise ValueError(f"a round must score each of the {k} answers once, got {scores}")
        for answer, score in scores:
            totals[answer] += Fraction(score - low, high - low)
    return [float(total / len(complete)) for total in totals], left_out


def scored_preference_rewards(scores: list[int | None], shown: list[int], gold: list[int],
                              invalid_reward: float = 0.0) -> list[float]:
    """Rewards of a pointwise referee group on a preference record: presentation p shows
    candidate shown[p] alone, len(scores) / len(shown) consecutive samples each; sample t of a
    presentation is compared with sample t of every other one (its partners). A sample earns
    the share of its valid partners whose score orders the pair as the gold ranking does,
    strictly (a tie is wrong); with no valid partner, 0.5 (the format is right, the order
    unknown); an invalid score earns `invalid_reward`. For a pair: [1, 1] when chosen scored
    above rejected, [0, 0] otherwise.

    >>> scored_preference_rewards([8, 9, 3, 9], shown=[0, 1], gold=[0, 1])
    [1.0, 0.0, 1.0, 0.0]
    """
    if not shown or len(scores) % len(shown):
        raise ValueError(f"{len(scores)} scores do not split into {len(shown)} presentations")
    per, place = len(scores) // len(shown), {candidate: i for i, candidate in enumerate(gold)}
    rewards = []
    for i, score in enumerate(scores):
        if score is None:
            rewards.append(invalid_reward)
            continue
        mine = shown[i // per]
        right = [(score > scores[p * per + i % per]) == (place[mine] < place[shown[p]])
                 and score != scores[p * per + i % per]
                 for p in range(len(shown)) if p != i // per
                 and scores[p * per + i % per] is not None]
        rewards.append(sum(right) / len(right) if right else 0.5)
    return rewards


def agreement_rewards(rankings: list[list[int] | None],
                      invalid_reward: float = 0.0) -> list[float]:
    """Self-consistency rewards of the referee's verdicts on ONE open group, which has no ground
    truth (--open_verdict_reward consistency; SERL's judge reward, in this project's form):
    `rankings` in answer indices, best first (a verdict may show all answers or some), None
    where invalid. A valid verdict earns, over the answer pairs it orders that other valid
    verdicts order too, the mean share of those others that order the pair its way; 0.5 when
    no other verdict orders any of its pairs; an invalid one earns `invalid_reward`. Agreement
    is symmetric, so two verdicts alone always earn the same (listwise with M = 2: advantage 0).

    >>> agreement_rewards([[0, 1], [0, 1], [1, 2], [2, 1]])
    [1.0, 1.0, 0.0, 0.0]
    """
    before = [None if r is None else {a: p for p, a in enumerate(r)} for r in rankings]
    rewards = []
    for i, mine in enumerate(before):
        if mine is None:
            rewards.append(invalid_reward)
            continue
        shares = []
        for a, b in itertools.combinations(sorted(mine), 2):
            others = [(o[a] < o[b]) == (mine[a] < mine[b]) for j, o in enumerate(before)
                      if j != i and o is not None and a in o and b in o]
            if others:
                shares.append(sum(others) / len(others))
        rewards.append(sum(shares) / len(shares) if shares else 0.5)
    return rewards


def consistency_rewards(bests: list[int | None], presentations: int, coef: float) -> list[float]:
    """PA-GRPO's consistency reward (Zheng et al., arXiv 2603.21016) of one referee group.

    The group's samples come presentation by presentation (its candidates shown in a different
    order each), len(bests) / presentations samples each; `bests[i]` is the ORIGINAL candidate
    that sample i ranks best, None for an invalid verdict. Sample t of a presentation is aligned
    with sample t of every other one: an aligned pair earns +coef for both samples when both
    verdicts are valid and name the same candidate, -coef otherwise; each sample gets the mean
    over its partners. A single presentation has no partners: all 0. Raises ValueError when
    the samples do not split into equal presentations.

    >>> consistency_rewards([0, 1, 0, 0], presentations=2, coef=0.5)
    [0.5, -0.5, 0.5, -0.5]
    """
    if presentations < 1 or len(bests) % presentations:
        raise ValueError(f"{len(bests)} verdicts do not split into {presentations} presentations")
    per = len(bests) // presentations
    if presentations == 1:
        return [0.0] * len(bests)
    rewards = []
    for i, best in enumerate(bests):
        partners = [bests[p * per + i % per] for p in range(presentations) if p != i // per]
        agreed = [best is not None and best == other for other in partners]
        rewards.append(coef * sum(1.0 if same else -1.0 for same in agreed) / len(agreed))
    return rewards


# ---------------------------------------------------------------------------------------------
# Verifiable answers
# ---------------------------------------------------------------------------------------------

MATH_TIMEOUT_S = 5.0  # the longest the caller waits for one answer's check before killing it
# The worker's own limit for one whole check (normalise, parse, compare, confirm), by SIGALRM:
# under the caller's limit, so a slow check ends as "timeout" without losing the worker.
WORKER_DEADLINE_S = 3.0
_WORKER_START_TIMEOUT_S = 120.0  # importing sympy on a busy machine; not charged to an answer

# What one check found (`math_checks`); only RIGHT pays.
RIGHT = "right"  # the final answer equals the gold answer
WRONG = "wrong"  # it does not, or there is no final answer, or it does not parse
TIMEOUT = "timeout"  # the check ran out of time: unknown, scored 0.0 this time, never cached

_BOXED = re.compile(r"\\boxed\s*\{")
# What may stand between the boxes of one answer written box by box: commas, semicolons, "and",
# spaces and math-mode delimiters; a comma, a semicolon or "and" is required.
_BOX_LIST_SEPARATOR = re.compile(
    r"(?:\s|\$|\\[,;:! ]|\\quad|\\qquad|\\\(|\\\))*"
    r"(?:,|;|\band\b|\\text\s*\{\s*and\s*\})"
    r"(?:\s|\$|\\[,;:! ]|\\quad|\\qquad|\\\(|\\\)|\band\b|\\text\s*\{\s*and\s*\})*"
)

_worker: subprocess.Popen | None = None
_worker_owner_pid: int | None = None  # a forked child must not talk over its parent's pipes
_worker_lock = threading.Lock()  # one request at a time on the pipes, whatever the thread
_timed_out = 0  # checks that ended TIMEOUT in this process (timed_out_checks)


def _boxes(text: str) -> tuple[list[tuple[int, int, str]], bool]:
    """Top-level boxes of `text` as (start, end, content), and whether the last one is unclosed.

    `text[start:end]` is the whole `\\boxed{...}`. Escaped braces `\\{ \\}` do not count; a box
    nested in another box belongs to it; an unclosed box swallows the rest of the text.
    """
    boxes, start = [], 0
    while (match := _BOXED.search(text, start)) is not None:
        end = _closing_brace(text, match.end())
        if end is None:
            return boxes, True
        boxes.append((match.start(), end + 1, text[match.end() : end]))
        start = end + 1
    return boxes, False


def last_boxed(text: str) -> str | None:
    r"""Content of the last top-level `\boxed{...}`, braces matched; None if none or unclosed.

    Escaped braces `\{ \}` (LaTeX sets) do not count. A box nested in another box belongs to
    it, and an unclosed last box (a truncated completion) means there is no final answer.

    >>> last_boxed("so \\boxed{1} or rather \\boxed{\\frac{1}{2}}.")
    '\\frac{1}{2}'
    """
    boxes, unclosed = _boxes(text)
    if unclosed or not boxes:
        return None
    return boxes[-1][2]


def final_answer(text: str) -> str | None:
    r"""The answer a completion gives: its last box, with the boxes listed just before it.

    The parse rule: the last top-level `\boxed{}` is the final answer (an earlier box that the
    model went on to correct, `\boxed{2} hmm, no: \boxed{3}`, does not count), except that an
    answer written box by box, `\boxed{1}, \boxed{2}` or `$\boxed{1}$ and $\boxed{2}$`, is one
    answer: the boxes separated from the last one only by commas, semicolons, "and" and
    spaces are joined as the list `1, 2`. So a tuple or a set of solutions boxed part by part
    is read whole (it matches a gold `(1, 2)` or `1, 2`), and hedging over several boxes for a
    single-valued gold is read as the list it is and not paid. None: no box, or the last box is
    unclosed (a truncated completion).

    >>> final_answer(r"so \boxed{2} hmm, no: \boxed{3}, \boxed{4}")
    '3, 4'
    """
    boxes, unclosed = _boxes(text)
    if unclosed or not boxes:
        return None
    first = len(boxes) - 1
    while first > 0 and _BOX_LIST_SEPARATOR.fullmatch(text[boxes[first - 1][1] : boxes[first][0]]):
        first -= 1
    return ", ".join(content for _, _, content in boxes[first:])


def _closing_brace(text: str, start: int) -> int | None:
    """Index of the `}` closing the group whose `{` sits just before `start`, else None."""
    depth, i = 1, start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # `\{`, `\}` and `\\` are single tokens, not group braces
            continue
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return i
        i += 1
    return None


def math_reward(completion: str, gold: str) -> float:
    r"""1.0 if the final answer of `completion` equals `gold`, else 0.0 (see `math_checks`).

    The final answer is the last `\boxed{}` (boxes listed just before it join it: see
    `final_answer`). No box or an empty box is 0.0. Never raises on any strings and never hangs,
    on any thread: a check that runs past `MATH_TIMEOUT_S` counts as 0.0.
    """
    return math_rewards([completion], [gold])[0]


def math_rewards(
    completions: list[str], golds: list[str], timeout: float = MATH_TIMEOUT_S
) -> list[float]:
    """`math_reward` of each (completion, gold) pair, with at most `timeout` s spent on each.

    1.0 where `math_checks` finds RIGHT, else 0.0 (a timed-out check included: use
    `math_checks` to count those). Raises ValueError on lists of different lengths, TypeError
    on anything but strings.
    """
    return [float(status == RIGHT) for status in math_checks(completions, golds, timeout)]


def math_checks(
    completions: list[str], golds: list[str], timeout: float = MATH_TIMEOUT_S
) -> list[str]:
    r"""What checking each completion's final answer against its gold found: RIGHT, WRONG or
    TIMEOUT, with at most `timeout` s (caller's wall clock) spent on each.

    Equal means, after normalising both texts (below), that math-verify finds the two equal AND
    that every numeric comparison it accepted holds exactly: both values exact numbers ->
    exact arithmetic (rationals compared as fractions, other constants to 30 significant
    digits); a decimal involved -> agreement to 6 significant digits (within half a unit of
    the 6th), besides math-verify's own 6 decimal places, so `1e-30` and `2e-30` differ;
    expressions with variables -> their exact difference simplifies to 0. Only the LaTeX
    reading of the whole answer counts: an answer that does not parse as LaTeX (or parses
    only in part, like `4\sqrt(2)`) is WRONG unless it is the gold text up to spaces.

    Normalised before parsing, on both sides: a trailing period or spacing at the end
    (`\frac{14}{3}.`); digit groups written with a thin space, a backslash-space or a space
    (`1\,000`, `1\ 000`, `1 000` are 1000; `1,000`, `1{,}000` and `10,\!000` already are);
    upright constants `\mathrm{e}`, `\mathrm{i}`. A percent sign is notation: with one on
    both sides or on neither, numbers compare as written; with one on one side only, the
    other side may give the number or the fraction (`12.5\%` equals `12.5` and `0.125`).

    TIMEOUT: the worker's `WORKER_DEADLINE_S` or the caller's `timeout` ran out (a slow check,
    or a machine too busy to finish it). It is never cached, so the same pair is checked
    afresh next time. Raises ValueError on lists of different lengths, TypeError on anything
    but strings.
    """
    if len(completions) != len(golds):
        raise ValueError(f"{len(completions)} completions but {len(golds)} gold answers")
    for text in [*completions, *golds]:
        if not isinstance(text, str):
            raise TypeError(f"completions and gold answers must be str, got {type(text).__name__}")
    global _timed_out
    with _worker_lock:
        statuses = [_check(answer, gold, timeout) for answer, gold in zip(completions, golds)]
        _timed_out += statuses.count(TIMEOUT)
    return statuses


def timed_out_checks() -> int:
    """How many checks of `math_checks` (hence `math_reward(s)`) timed out in this process so far.

    A running total, so that a caller of `math_rewards` can count the timeouts of one batch as
    the difference before and after it.
    """
    return _timed_out


def _check(completion: str, gold: str, timeout: float) -> str:
    answer = final_answer(completion)
    if answer is None or not answer.strip():
        return WRONG
    if "".join(answer.split()) == "".join(gold.split()):
        return RIGHT
    return _ask_worker(gold, answer, timeout)


def _ask_worker(gold: str, answer: str, timeout: float) -> str:
    """Send one check to the worker and wait `timeout` s; kill the worker when it runs over."""
    worker = _running_worker()
    try:
        worker.stdin.write(json.dumps([gold, answer, WORKER_DEADLINE_S]) + "\n")
        worker.stdin.flush()
        readable, _, _ = select.select([worker.stdout], [], [], timeout)
        reply = worker.stdout.readline().strip() if readable else ""
    except OSError:  # a broken pipe: the worker died (out of memory, say)
        reply = ""
    except BaseException:  # interrupted mid-request: a late reply would answer the next one
        _stop_worker()
        raise
    if reply not in (RIGHT, WRONG, TIMEOUT):  # over time or dead: kill, and say it timed out
        _stop_worker()
        return TIMEOUT
    return reply


def _running_worker() -> subprocess.Popen:
    """The worker process, started (and waited for) when there is none alive in this process."""
    global _worker, _worker_owner_pid
    if _worker is not None and _worker.poll() is None and _worker_owner_pid == os.getpid():
        return _worker
    worker = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        encoding="utf-8",
    )
    readable, _, _ = select.select([worker.stdout], [], [], _WORKER_START_TIMEOUT_S)
    if not readable or worker.stdout.readline().strip() != "ready":
        worker.kill()
        worker.communicate()
        raise RuntimeError(
            "the math-verify worker process did not start (its error, if any, is printed above); "
            "check that `python -c 'import math_verify'` works, or `pip install math-verify`"
        )
    _worker, _worker_owner_pid = worker, os.getpid()
    return worker


def _stop_worker() -> None:
    global _worker
    if _worker is not None and _worker_owner_pid == os.getpid():
        _worker.kill()
        _worker.communicate()  # reaps it and closes its pipes
    _worker = None


atexit.register(_stop_worker)


# ---------------------------------------------------------------------------------------------
# The worker process: `python reward.py`, fed by _ask_worker
# ---------------------------------------------------------------------------------------------

# A period or spacing that ends the answer (a sentence's end, typed inside the box).
_TRAILING = re.compile(r"(?:\s|\\[,;:! ]|\\quad|\\qquad|(?<!\\)\.)+$")
# A digit-group separator: a thin, medium or thick space, a backslash-space, `~`, a plain or
# Unicode thin / no-break space, between a digit and exactly three digits. LaTeX math ignores
# spaces, so `1\,000` and `1 000` both print 1000; math-verify reads them as 1 x 000 = 0.
_DIGIT_GROUP = re.compile(
    r"(?<=\d)(?:\\[,;: ]|\\thinspace|~|[ \u00a0\u2009\u202f])+(?=\d{3}(?!\d))"
)
_UPRIGHT_CONSTANT = re.compile(r"\\mathrm\s*\{\s*([ei])\s*\}")  # math-verify drops `\mathrm{e}`
_PERCENT = re.compile(r"\\text\s*\{\s*\\?%\s*\}|\\?%")


class _Deadline(BaseException):
    """The worker's SIGALRM: a BaseException, so that math-verify's and sympy's `except
    Exception` handlers let it through instead of turning it into "not equal"."""


def _on_alarm(signum, frame):
    raise _Deadline


def _normalise(latex: str) -> str:
    latex = _TRAILING.sub("", latex.strip())
    latex = _DIGIT_GROUP.sub("", latex)
    return _UPRIGHT_CONSTANT.sub(r"\1", latex)


@functools.lru_cache(maxsize=4096)
def _parse(latex: str) -> list:
    """math-verify's LaTeX reading of the whole answer: sympy objects only, [] if none.

    Wrapped in $...$: a raw `\\left( 3, \\frac{\\pi}{2} \\right)` otherwise parses as 3. Only
    the LaTeX extractor: math-verify's plain-expression fallback reads a leading number of
    text it cannot parse (`4\\sqrt(2)` -> 4), and its text fallback compares normalised
    strings (`\\mathrm{e}` dropped), so neither can vouch for an answer. No internal timeout:
    the check's SIGALRM bounds it, and a _Deadline raised here is not cached.
    """
    import math_verify

    parsed = math_verify.parse(
        f"${latex}$",
        extraction_config=[math_verify.LatexExtractionConfig()],
        parsing_timeout=None,
    )
    return [item for item in parsed if not isinstance(item, str)]


@functools.lru_cache(maxsize=65536)
def _equivalent(gold: str, answer: str) -> bool:
    """Whether `answer` equals `gold` under the rules of `math_checks`; raises _Deadline."""
    import math_verify

    def equal(gold: str, answer: str) -> bool:
        parsed_gold, parsed_answer = _parse(_normalise(gold)), _parse(_normalise(answer))
        if not parsed_gold or not parsed_answer:
            return False
        try:  # gold first: math-verify's comparison is not symmetric
            return math_verify.verify(parsed_gold, parsed_answer, timeout_seconds=None)
        except Exception:  # math-verify failing on odd LaTeX is a wrong answer, not a crash
            return False

    gold_percent, answer_percent = bool(_PERCENT.search(gold)), bool(_PERCENT.search(answer))
    if equal(_PERCENT.sub("", gold), _PERCENT.sub("", answer)):
        return True
    if gold_percent == answer_percent:
        return False
    # A percent sign on one side only: its number may also stand for the fraction, 25% = 0.25.
    # (The replacement is a function so that its backslashes are taken literally.)
    fraction = r"\cdot\frac{1}{100}"
    return equal(_PERCENT.sub(lambda _: fraction, gold), _PERCENT.sub(lambda _: fraction, answer))


def _check_within(gold: str, answer: str, seconds: float) -> str:
    """RIGHT, WRONG or TIMEOUT for one pair, with a SIGALRM after `seconds` (main thread)."""
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return RIGHT if _equivalent(gold, answer) else WRONG
    except _Deadline:  # raised out of the lru_caches: neither the parse nor the verdict is kept
        return TIMEOUT
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


# ----- Confirming math-verify's numeric "equal" ----------------------------------------------
# math-verify's leaf test for two values (grader.sympy_numeric_eq) rounds decimals to 6 places
# and accepts any difference that evalf(chop=True) at 15 digits turns into 0. Both are absolute
# tolerances: 1/2004! = 1/2006!, 2^-98 = 2^-99, and 1/(3 2^2006) = (2^2005 + 1)/(3 2^2006)
# (the difference, 1/6, is chopped next to terms of size 2^2005). The library has no hook for
# it, so in this worker process its leaf test is wrapped: an "equal" from it must also pass
# _same_value. Sets, tuples, intervals, matrices and equations reach their values through the
# same leaf test, so they are confirmed element by element.


def _same_value(a, b) -> bool:
    """Whether two sympy values math-verify called equal are equal by the rules of math_checks."""
    import sympy

    if isinstance(a, sympy.MatrixBase) or isinstance(b, sympy.MatrixBase):
        if not (isinstance(a, sympy.MatrixBase) and isinstance(b, sympy.MatrixBase)):
            return False
        return a.shape == b.shape and all(_same_value(x, y) for x, y in zip(a, b))
    a, b = sympy.sympify(a).doit(), sympy.sympify(b).doit()  # 2^{10}, 4! and 25% evaluated
    if not (isinstance(a, sympy.Expr) and isinstance(b, sympy.Expr)):
        return True  # not a value (a boolean, say): math-verify's verdict stands
    decimal = a.has(sympy.Float) or b.has(sympy.Float)
    if a.free_symbols or b.free_symbols:  # expressions: decimals read as the fractions written
        difference = sympy.nsimplify(a - b, rational=True) if decimal else a - b
        return sympy.simplify(difference) == 0
    if not decimal and a.is_Rational and b.is_Rational:
        return a == b
    size = max(abs(sympy.N(a, 50)), abs(sympy.N(b, 50)))
    difference = abs(sympy.N(a - b, 50))  # evaluated as one: no cancellation between roundings
    if not (difference.is_number and size.is_number):
        return False
    if decimal:  # within half a unit of the 6th significant digit of the larger
        return bool(size == 0 or difference <= 5 * 10 ** (sympy.floor(sympy.log(size, 10)) - 6))
    return bool(difference <= size * sympy.Rational(1, 10**30))


def _confirm_numeric_comparisons() -> None:
    """Wrap math-verify's numeric leaf test with _same_value (see the comment above)."""
    from math_verify import grader

    loose = grader.sympy_numeric_eq

    def confirmed(a, b, float_rounding: int, numeric_precision: int) -> bool:
        return loose(a, b, float_rounding, numeric_precision) and _same_value(a, b)

    grader.sympy_numeric_eq = confirmed


def _serve() -> None:
    """Worker loop: one JSON `[gold, answer, deadline_s]` per stdin line, one status per stdout
    line (`right`, `wrong` or `timeout`).

    math-verify runs on the main thread with its own timeouts off; one SIGALRM per check
    bounds the whole check (a _Deadline out of any `except Exception`), and the caller's kill
    covers what a signal cannot interrupt (a long computation inside one C call).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's; we exit on EOF
    signal.signal(signal.SIGALRM, _on_alarm)
    replies, sys.stdout = sys.stdout, sys.stderr  # stray prints must not corrupt the replies
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout is disabled": we bound it
    _confirm_numeric_comparisons()
    _check_within("1", r"\frac{2}{2}", _WORKER_START_TIMEOUT_S)  # lazy imports, not charged
    print("ready", file=replies, flush=True)
    for line in sys.stdin:
        gold, answer, seconds = json.loads(line)
        try:
            status = _check_within(gold, answer, seconds)
        except _Deadline:  # the alarm went off between the check's end and its disarming
            status = TIMEOUT
        print(status, file=replies, flush=True)


if __name__ == "__main__":
    _serve()
