"""Wall time of the README's first command, `python train.py`, on this machine.

    python benchmarks/bench_default_run.py            # ~10 min on 2 CPU cores: two runs
    python benchmarks/bench_default_run.py --runs 3 -- --steps 4   # flags after -- go to train.py

The first run starts from an empty model cache (a fresh $URPO_CACHE), so it includes the one-time
conversion of the default model from its GGUF; the later runs find the converted model. Each run
is its own process with its own --out_dir. Prints every run's wall time and peak RSS, and the
phases of the last run from its metrics.jsonl (step 0: held-out evaluation and cold start).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_once(cache: str, out_dir: str, extra: list[str]) -> tuple[float, float]:
    """Seconds and peak RSS (GB) of one `python train.py` process."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "train.py", "--out_dir", out_dir, *extra], cwd=ROOT, check=True,
                   env=os.environ | {"URPO_CACHE": cache}, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    return seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6  # KiB -> GB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=2,
                        help="runs in all; the first converts the model")
    parser.add_argument("train_args", nargs="*", help="flags passed to train.py (after --)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "cache")
        results = [run_once(cache, os.path.join(tmp, f"run{i}"), args.train_args)
                   for i in range(args.runs)]
        with open(os.path.join(tmp, f"run{args.runs - 1}", "metrics.jsonl")) as f:
            lines = [json.loads(line) for line in f]
    print(f"python train.py {' '.join(args.train_args)} on {os.cpu_count()} cores "
          f"(peak RSS: the largest child so far)")
    print("| run | wall time | peak RSS GB |\n|---|---|---|")
    for i, (seconds, rss) in enumerate(results):
        label = "first (model conversion included)" if i == 0 else f"later ({i})"
        print(f"| {label} | {seconds / 60:.1f} min ({seconds:.0f} s) | {rss:.2f} |")
    steps = [line for line in lines if line["step"] > 0]
    start = lines[0] if lines and lines[0]["step"] == 0 else {}
    print(f"last run: held-out evaluation at start {start.get('time/eval', 0):.0f} s, cold start "
          f"{start.get('time/cold_start', 0):.0f} s, {len(steps)} steps of median "
          f"{statistics.median(line['time/step'] for line in steps):.1f} s "
          f"(rollout {statistics.median(line['time/rollout'] for line in steps):.1f} s, "
          f"rewards {statistics.median(line['time/reward'] for line in steps):.1f} s, self-referee "
          f"pass {statistics.median(line['time/self_referee'] for line in steps):.1f} s, "
          f"train {statistics.median(line['time/train'] for line in steps):.1f} s)")


if __name__ == "__main__":
    main()
