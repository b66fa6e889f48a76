"""The referee's arms (README, "The referee's arms"): each arm is one train.py command whose
config.json and metrics.jsonl are committed under benchmarks/arms/<arm>/; this prints their table
and checks that every comparison is between arms that differ in ONE flag.

usage:
  python benchmarks/arms.py commands            # the command of every arm, one per line
  python benchmarks/arms.py collect RUNS_DIR    # copy RUNS_DIR/<arm>/{config.json,metrics.jsonl}
  python benchmarks/arms.py table               # the table (middle and end of each arm), checked

Each comparison below names a base arm and an arm that changes one flag of it (seed, out_dir and
world_size aside); `table` refuses to print a comparison whose committed configs differ in more.
The paper's comparison (URPO's referee against the dedicated referee of the baseline arm) differs
by construction in what the run trains on; it is checked to see the same preference groups."""
import json
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import eval as evaluation  # noqa: E402  (the repository's eval.py)
ARMS_DIR = os.path.join(HERE, "arms")
BASE = "python train.py --preset cpu_referee"
# arm -> the flags it adds to BASE (every arm starts from the shared cold start's final/)
ARMS = {
    "a_one_order": "--referee_group_orders 1",
    "b_two_orders": "",
    "c_consistency": "--consistency_coef 0.5",
    "d_group_order": "--referee_advantage group+order",
    # the paper's comparison: a dedicated referee trained on the same preference groups alone
    # (2 per step, as b_two_orders gets from 4 prompts at weights 1:2:1), from the same model
    "baseline_referee": "--task_weights verifiable=0,preference=1,open=0 --prompts_per_step 2",
    # ... and its player: the verifiable and open groups b_two_orders trains (1 + 1 per step),
    # the open ones rewarded by that dedicated referee, frozen
    "baseline_player": "--task_weights verifiable=1,preference=0,open=1 --prompts_per_step 2 "
                       "--referee_model runs/arms/baseline_referee/final",
}
ONE_FLAG = [("a_one_order", "b_two_orders", "referee_group_orders"),
            ("b_two_orders", "c_consistency", "consistency_coef"),
            ("b_two_orders", "d_group_order", "referee_advantage")]
IGNORED = {"seed", "out_dir", "world_size", "resume", "overwrite"}


START = ("cold_start", "python train.py --preset cpu_referee_cold", "runs/referee_cold")


def command(arm: str) -> str:
    return f"{BASE} {ARMS[arm]} --out_dir runs/arms/{arm}".replace("  ", " ")


def load(arm: str) -> tuple[dict, list[dict]]:
    folder = os.path.join(ARMS_DIR, arm)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    return config, lines


def differences(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if k not in IGNORED and a.get(k) != b.get(k))


def interval(line: dict, key: str) -> str:
    """The mean and its 95% Clopper-Pearson interval over the set's items (eval.proportion_interval),
    recomputed from the mean and the item count, so that every arm's interval comes from one
    method whatever the code that ran it logged."""
    if key not in line:
        return "-"
    count = line.get("count/eval/{}/n".format(key.split("/")[1]))
    if not count:
        return f"{line[key]:.3f}"
    low, high = evaluation.proportion_interval([line[key]] * round(count))
    return f"{line[key]:.3f} ({low:.2f}-{high:.2f})"


def row(arm: str, line: dict) -> str:
    h, g = "eval/hh_rlhf/", "eval/gsm8k/"
    value = lambda key: f"{line[key]:.2f}" if key in line else "-"
    return (f"| {arm} | {line['step']} | {interval(line, h + 'accuracy_both_orders')} | "
            f"{value(h + 'position_consistency')} | {value(h + 'prefers_first_shown')} | "
            f"{value(h + 'prefers_longer')} / {value(h + 'length_rule_accuracy')} | "
            f"{value(h + 'invalid_rate')} | {value(g + 'boxed_rate')} | "
            f"{interval(line, g + 'accuracy')} |")


def table() -> str:
    arms = [arm for arm in (START[0], *ARMS) if os.path.isdir(os.path.join(ARMS_DIR, arm))]
    loaded = {arm: load(arm) for arm in arms}
    out = ["| arm | step | held-out accuracy, both orders (95% CI) | consistency | first shown | "
           "longer named / longer wins | invalid | GSM8K boxed | GSM8K accuracy (95% CI) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for arm, (config, lines) in loaded.items():
        for line in (line for line in lines if any(k.startswith("eval/") for k in line)):
            out.append(row(arm, line))
    out.append("")
    evaluated = {arm for arm, (_, lines) in loaded.items()
                 if any(k.startswith("eval/") for line in lines for k in line)}
    for base, arm, flag in ONE_FLAG:
        if not {base, arm} <= evaluated:
            out.append(f"{arm} against {base}: not evaluated yet (no rows to compare)")
        else:
            diff = differences(loaded[base][0], loaded[arm][0])
            if diff != [flag]:
                raise SystemExit(f"arms.py: {arm} against {base} differs in {diff}, not in "
                                 f"{flag} alone: not a one-factor comparison")
            out.append(f"{arm} against {base}: one flag, --{flag} "
                       f"{loaded[base][0][flag]!r} -> {loaded[arm][0][flag]!r}")
    if "baseline_referee" in loaded and "b_two_orders" in loaded:
        counts = {arm: sum(line.get("count/groups/preference", 0) for line in loaded[arm][1])
                  for arm in ("b_two_orders", "baseline_referee")}
        diff = differences(loaded["b_two_orders"][0], loaded["baseline_referee"][0])
        out.append(f"baseline_referee against b_two_orders: differs in {diff} (by design); "
                   f"preference groups trained: {counts['b_two_orders']:.0f} vs "
                   f"{counts['baseline_referee']:.0f}")
    if "baseline_player" in loaded and "b_two_orders" in loaded:
        counts = {arm: [sum(line.get(f"count/groups/{task}", 0) for line in loaded[arm][1])
                        for task in ("verifiable", "open")]
                  for arm in ("b_two_orders", "baseline_player")}
        out.append(f"baseline_player against b_two_orders: verifiable and open groups trained "
                   f"{counts['b_two_orders']} vs {counts['baseline_player']}; open rewards from "
                   f"{loaded['baseline_player'][0]['referee_model']} (frozen) vs the policy")
    return "\n".join(out)


if __name__ == "__main__":
    verb = sys.argv[1:2]
    if verb == ["commands"]:
        print(f"{START[1]}   # the shared cold start, first: every arm starts from its final/")
        print("\n".join(command(arm) for arm in ARMS))
    elif verb == ["collect"] and len(sys.argv) == 3:
        for arm in (START[0], *ARMS):
            source = START[2] if arm == START[0] else os.path.join(sys.argv[2], arm)
            if os.path.isfile(os.path.join(source, "metrics.jsonl")):
                os.makedirs(os.path.join(ARMS_DIR, arm), exist_ok=True)
                for name in ("config.json", "metrics.jsonl"):
                    shutil.copy(os.path.join(source, name), os.path.join(ARMS_DIR, arm, name))
                print(f"collected {arm}")
    elif verb == ["table"]:
        print(table())
    else:
        raise SystemExit(__doc__.split("\n\n")[1])
