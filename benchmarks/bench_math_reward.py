"""Agreement and speed of the math reward on the bundled GSM8K and MATH-500 gold answers.

Each gold answer is checked against itself and against reformatted equivalents a model might
write (`\\dfrac`, `\\left( \\right)`, spaces around operators, a trailing period after or
inside the box, digit groups `1\\,000`); every check should pay 1.0. Speed: checks per second
through the worker (wall clock, and per CPU second of the worker, which a busy machine does not
distort), cold cache (a fresh worker), every pair distinct.

    python benchmarks/bench_math_reward.py
"""

import glob
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import reward  # noqa: E402

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def golds() -> list[tuple[str, str]]:
    """(source, gold answer) of every bundled GSM8K and MATH-500 record."""
    pairs = []
    for source in ("gsm8k", "math500"):
        for path in sorted(glob.glob(os.path.join(HERE, "samples", source, "*.jsonl"))):
            pairs += [(source, r["answer"]) for r in data.load(f"{source}:{path}")]
    return pairs


def _left_right(gold: str) -> str:
    if "\\left" in gold or "\\right" in gold:
        return gold
    return gold.replace("(", "\\left(").replace(")", "\\right)")


def _thin_space(gold: str) -> str:
    # 1234567 -> 1\,234\,567, for whole numbers only
    return re.sub(r"(\d)(?=(?:\d{3})+$)", r"\1\\,", gold) if re.fullmatch(r"-?\d+", gold) else gold


def _spaced(gold: str) -> str:
    # spaces around operators and after commas that do not group digits, after closing braces
    spaced = re.sub(r"(?<!\\)([+=]|(?<![\^_{])-)", r" \1 ", gold)
    spaced = re.sub(r",(?!\d{3}(?!\d))", ", ", spaced)
    return " " + spaced.replace("}", "} ") + " "


# name -> (the gold rewritten, the completion around it); every one should pay 1.0
REFORMATS = {
    "itself": (lambda g: g, "The answer is \\boxed{%s}"),
    "dfrac": (lambda g: g.replace("\\frac", "\\dfrac"), "\\boxed{%s}"),
    "left_right": (_left_right, "\\boxed{%s}"),
    "spaces": (_spaced, "\\boxed{%s}"),
    "period_after": (lambda g: g, "So the answer is $\\boxed{%s}$."),
    "period_inside": (lambda g: g + ".", "\\boxed{%s}"),
    "thin_space": (_thin_space, "\\boxed{%s}"),
}


def main() -> None:
    pairs = golds()
    print(f"{len(pairs)} gold answers")
    checks = set()
    for name, (rewrite, template) in REFORMATS.items():
        for source in ("gsm8k", "math500"):
            items = [(template % rewrite(g), g) for s, g in pairs if s == source]
            same = sum(rewrite(g) == g for s, g in pairs if s == source)
            scores = reward.math_rewards([c for c, _ in items], [g for _, g in items])
            print(f"{name:14s} {source:8s} {sum(scores):3.0f}/{len(items)} paid"
                  + (f" ({same} left unchanged by the rewrite)" if name != "itself" else ""))
            for (completion, gold), score in zip(items, scores):
                if score != 1.0:
                    print(f"    miss: gold {gold!r}  completion {completion!r}")
            checks |= {(c, g) for c, g in items if rewrite(g) != g}

    # The worker itself on each gold against itself (the caller settles that by text first).
    for source in ("gsm8k", "math500"):
        sources = [g for s, g in pairs if s == source]
        with reward._worker_lock:
            verdicts = [reward._ask_worker(g, g, reward.MATH_TIMEOUT_S) for g in sources]
        paid = [v in (1.0, "right") for v in verdicts]
        print(f"{'worker_itself':14s} {source:8s} {sum(paid):3d}/{len(sources)} equal")
        for gold, ok in zip(sources, paid):
            if not ok:
                print(f"    miss: gold {gold!r}")

    # Wrong answers: each gold against the next gold of its set, where the two differ as text.
    wrong = []
    for source in ("gsm8k", "math500"):
        sources = [g for s, g in pairs if s == source]
        following = sources[1:] + sources[:1]
        items = [(f"\\boxed{{{other}}}", gold) for gold, other in zip(sources, following)
                 if "".join(other.split()) != "".join(gold.split())]
        scores = reward.math_rewards([c for c, _ in items], [g for _, g in items])
        print(f"{'next_gold':14s} {source:8s} {sum(scores):3.0f}/{len(items)} paid (should be 0 "
              f"unless two golds are equal values)")
        for (completion, gold), score in zip(items, scores):
            if score != 0.0:
                print(f"    paid: gold {gold!r}  completion {completion!r}")
        wrong += items

    # Speed: each rewritten pair that reaches the worker (its box is not the gold text up to
    # spaces) and each wrong pair, once, through a fresh worker: cold caches, as on a step's
    # new answers.
    items = sorted({(c, g) for c, g in checks
                    if "".join(reward.last_boxed(c).split()) != "".join(g.split())} | set(wrong))
    reward._stop_worker()
    reward.math_reward("\\boxed{1}", "2")  # start the worker outside the timed part
    start, cpu_start = time.perf_counter(), _cpu_seconds(reward._worker.pid)
    reward.math_rewards([c for c, _ in items], [g for _, g in items])
    seconds, cpu = time.perf_counter() - start, _cpu_seconds(reward._worker.pid) - cpu_start
    # the worker's own CPU time: on a shared machine the wall clock mostly measures the others
    print(f"speed: {len(items)} distinct worker checks in {seconds:.2f} s wall = "
          f"{len(items) / seconds:.1f} checks/s; worker CPU {cpu:.2f} s = "
          f"{len(items) / cpu:.1f} checks per CPU second (cold cache, one worker)")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

if __name__ == "__main__":
    main()
