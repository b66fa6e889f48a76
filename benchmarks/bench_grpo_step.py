"""One GRPO step, ours against TRL's GRPOTrainer, on this machine, at identical settings.

    python benchmarks/bench_grpo_step.py            # defaults: the README's CPU numbers
                                                    # (~25 min on 2 cores)
    python benchmarks/bench_grpo_step.py --help     # every setting

What it runs, each in its own subprocess (peak RSS is per process), alternating in --rounds:
  ours       generate (HFEngine) -> train.update, the loop's own update: log-probs + backward,
             AdamW (train.optimizer_step) -> sync (none when the engine shares the weights)
  trl-32     TRL GRPOTrainer, all prompts x G completions in one forward/backward
  trl-8      TRL GRPOTrainer, micro-batches of 8 (gradient accumulation over one generation batch)
  urpo       train.py's full URPO step: all three tasks and the self-referee pass (after the rounds)
Activation checkpointing is on for both frameworks by default (TRL's GRPOConfig default);
--no-activation_checkpointing turns it off for both.
The same prompts and the same reward feed ours and TRL. SmolLM2-135M never solves GSM8K, so a
rule reward would be 0 everywhere and both frameworks would skip the update; the benchmark reward
(the share of completion characters below "m") varies within every group, so every step trains.

TRL lives in its own virtualenv (.venv-trl, git-ignored), created here when missing; without it
the script says so and measures ours alone. Each config runs --warmup steps, then --steps measured
ones, per round; the table gives medians over every round's measured steps and the largest peak
RSS of a config's processes.
"""
import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRL_VENV = os.path.join(ROOT, ".venv-trl")
TRL_PYTHON = os.path.join(TRL_VENV, "bin", "python")
TRL_PACKAGES = ["torch==2.13.0", "trl==1.16.0", "transformers>=5.16.1,<5.20", "datasets",
                "accelerate", "math-verify"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="",
                   help="hub id or HF folder (default: model.DEFAULT_MODEL, resolved offline)")
    p.add_argument("--data", default="gsm8k:samples/gsm8k/train.first200.jsonl",
                   help="data.py spec of the prompts")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--group_size", type=int, default=4, help="G: completions per prompt")
    p.add_argument("--max_new_tokens", type=int, default=64,
                   help="generation budget per completion")
    p.add_argument("--micro_batch", type=int, default=8,
                   help="completions per forward/backward (ours: the token budget of "
                        "micro_batch / G of the longest groups, each packed behind its prompt)")
    p.add_argument("--lr", type=float, default=2e-6,
                   help="AdamW learning rate (beta = 0, one update per batch)")
    p.add_argument("--activation_checkpointing", action=argparse.BooleanOptionalAction,
                   default=True,
                   help="recompute decoder layers in backward, in both frameworks "
                        "(TRL's default is on)")
    p.add_argument("--rounds", type=int, default=2,
                   help="runs of every config, alternating (ours, trl-32, trl-8, ours, ...)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps per config and round")
    p.add_argument("--steps", type=int, default=1, help="measured steps per config and round")
    p.add_argument("--urpo_steps", type=int, default=2,
                   help="train.py steps for the full URPO table "
                        "(the first is the warm-up; 0: skip)")
    p.add_argument("--no_trl", action="store_true", help="measure ours alone")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)  # internal: ours | trl | urpo
    p.add_argument("--trl_batch", type=int, default=32,
                   help=argparse.SUPPRESS)  # internal: TRL's per-device batch
    p.add_argument("--prompt_file", default="",
                   help=argparse.SUPPRESS)  # internal: prompts as chat messages
    return p.parse_args(argv)


def reward_fn(text: str) -> float:
    """The benchmark reward: share of characters below "m". Varies within every group."""
    return sum(ch < "m" for ch in text) / max(len(text), 1)


def peak_rss_gb() -> float:
    # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ----------------------------------------------------------------------------------------------
# Workers: each runs in its own process and prints one JSON line prefixed "RESULT ".


def run_ours(args, prompts: list[list[dict]]) -> dict:
    sys.path.insert(0, ROOT)
    import torch
    import grpo
    import model as model_lib
    import rollout
    import train
    from grpo import group_advantages

    rank, world, device = train.init_distributed()
    path = model_lib.resolve_model(args.model)
    tokenizer = model_lib.load_tokenizer(path)
    policy = model_lib.load_model(path, torch.float32)
    model_lib.shard_model(policy, device, activation_checkpointing=args.activation_checkpointing)
    engine = rollout.HFEngine(path, tokenizer, torch.float32, device, seed=0)
    # as train.py does at world size 1: no second copy, no sync
    engine_is_policy = engine.use_policy_weights(policy)
    cfg = train.Config(rollout="hf", group_size=args.group_size,
                       max_new_tokens=args.max_new_tokens, lr=args.lr)
    # The log-probs and optimizer columns: the forward passes and the optimizer step inside
    # train.update, timed from outside.
    forward = {"seconds": 0.0, "optimizer": 0.0}

    def timed(function, key="seconds"):
        def wrapper(*a, **k):
            start = time.perf_counter()
            out = function(*a, **k)
            forward[key] += time.perf_counter() - start
            return out
        return wrapper

    model_lib.batch_logprobs = timed(model_lib.batch_logprobs)
    train.optimizer_step = timed(train.optimizer_step, "optimizer")
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=True)  # as train.py
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
    steps = []
    for step in range(args.warmup + args.steps):
        batch = prompts[step * args.prompts:(step + 1) * args.prompts]
        prompt_ids = [model_lib.chat_ids(tokenizer, messages) for messages in batch]
        forward["seconds"] = forward["optimizer"] = 0.0
        t0 = time.perf_counter()
        groups = engine.generate(prompt_ids, args.group_size, cfg.temperature, args.max_new_tokens)
        t1 = time.perf_counter()
        samples = []
        for ids, completions in zip(prompt_ids, groups):
            adv = group_advantages(torch.tensor([reward_fn(c.text) for c in completions]),
                                   args.group_size)  # [G]
            samples += [grpo.Sample(ids, list(c.token_ids), float(a))
                        for c, a in zip(completions, adv) if c.token_ids]
        # micro_batch completions per forward/backward, as TRL's micro-batches: the token budget of
        # micro_batch / G groups of the longest (a group is one packed row: model.rows_of).
        rows = grpo.rows_of(samples, cfg.share_prompt, token_budget=10**9)
        cfg.micro_batch_tokens = (max(1, args.micro_batch // args.group_size)
                                  * max(map(grpo.row_tokens, rows)))
        policy.train()
        train.update(policy, optimizer, scheduler, samples, cfg, tokenizer.pad_token_id,
                     train.Tally())
        t3 = time.perf_counter()
        t2 = t3 - forward["optimizer"]
        if not engine_is_policy:
            engine.load_weights(model_lib.full_state_dict(policy))
        t4 = time.perf_counter()
        tokens = sum(len(c.token_ids) for g in groups for c in g)
        steps.append(dict(generation=t1 - t0, logprobs=forward["seconds"],
                          backward=t2 - t1 - forward["seconds"],
                          optimizer=t3 - t2, sync=t4 - t3, step=t4 - t0, tokens=tokens))
        print(f"ours step {step}: " + ", ".join(f"{k} {v:.1f}" for k, v in steps[-1].items()),
              flush=True)
    return dict(steps=steps[args.warmup:], rss_gb=peak_rss_gb())


def run_trl(args, prompts: list[list[dict]]) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    total = args.warmup + args.steps
    micro = args.trl_batch
    per_step = args.prompts * args.group_size
    # TRL generates steps_per_generation x micro completions at once (one generation batch) and
    # then takes gradient_accumulation_steps backwards per optimizer step: setting both to
    # per_step / micro gives one generation and one optimizer step per batch, as ours does.
    accumulation = per_step // micro
    config = trl.GRPOConfig(
        output_dir=os.path.join(os.path.dirname(args.prompt_file), "trl"),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulation, steps_per_generation=accumulation,
        num_generations=args.group_size, max_completion_length=args.max_new_tokens,
        temperature=1.0, beta=0.0, num_iterations=1, learning_rate=args.lr,
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, use_vllm=False,
        use_cpu=True, bf16=False, max_steps=total,
        gradient_checkpointing=args.activation_checkpointing,
        logging_steps=1, report_to="none", save_strategy="no", shuffle_dataset=False, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    policy = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    dataset = Dataset.from_list([{"prompt": messages}
                                 for messages in prompts[:total * args.prompts]])

    def reward(completions, **kwargs):
        return [reward_fn(c[0]["content"] if isinstance(c, list) else c) for c in completions]

    trainer = trl.GRPOTrainer(model=policy, reward_funcs=reward, args=config, train_dataset=dataset,
                              processing_class=tokenizer)
    steps, pending = [], {"generation": 0.0, "tokens": 0}
    generate = trainer._generate_and_score_completions

    def timed_generate(*a, **k):  # generation + reward + advantages of one generation batch
        t = time.perf_counter()
        out = generate(*a, **k)
        pending["generation"] += time.perf_counter() - t
        pending["tokens"] += int(out["completion_mask"].sum())
        return out

    trainer._generate_and_score_completions = timed_generate

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.started = time.perf_counter()

        def on_step_end(self, *a, **k):
            steps.append(dict(generation=pending["generation"],
                              step=time.perf_counter() - self.started, tokens=pending["tokens"]))
            pending.update(generation=0.0, tokens=0)
            print(f"trl-{micro} step {len(steps) - 1}: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in steps[-1].items()), flush=True)

    trainer.add_callback(StepTimer())
    trainer.train()
    return dict(steps=steps[args.warmup:], rss_gb=peak_rss_gb(), trl_version=trl.__version__)


def run_urpo(args) -> dict:
    """train.py's own loop: its metrics.jsonl times every phase of a full URPO step."""
    sys.path.insert(0, ROOT)
    os.chdir(ROOT)
    import train
    out_dir = os.path.join(os.path.dirname(args.prompt_file), "urpo")
    train.main(["--rollout", "hf", "--steps", str(args.urpo_steps),
                "--prompts_per_step", str(args.prompts),
                "--group_size", str(args.group_size), "--max_new_tokens", str(args.max_new_tokens),
                "--lr", str(args.lr), "--samples_every", "0", "--out_dir", out_dir]
               + (["--activation_checkpointing"] if args.activation_checkpointing else [])
               + (["--model", args.model] if args.model else []))
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    return dict(steps=lines[1:] or lines, rss_gb=peak_rss_gb())


# ----------------------------------------------------------------------------------------------
# Driver: prompts once, then one subprocess per config, then the tables.


def ensure_trl_venv() -> bool:
    if os.path.exists(TRL_PYTHON):
        return True
    print(f"creating {TRL_VENV} with {' '.join(TRL_PACKAGES)} (minutes)", flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", TRL_VENV], check=True)
        subprocess.run([TRL_PYTHON, "-m", "pip", "install", "-q", *TRL_PACKAGES], check=True)
        return True
    except subprocess.CalledProcessError as error:
        print(f"could not build the TRL virtualenv ({error}); measuring ours alone", flush=True)
        return False


def launch(python: str, args, worker: str, extra: list[str]) -> dict | None:
    command = [python, os.path.abspath(__file__), "--worker", worker, "--model", args.model,
               "--prompts", str(args.prompts), "--group_size", str(args.group_size),
               "--max_new_tokens", str(args.max_new_tokens), "--micro_batch", str(args.micro_batch),
               "--lr", str(args.lr), "--warmup", str(args.warmup), "--steps", str(args.steps),
               "--urpo_steps", str(args.urpo_steps),
               "--activation_checkpointing" if args.activation_checkpointing
               else "--no-activation_checkpointing", *extra]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    result = None
    for line in proc.stdout:
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
        elif " step " in line or "Error" in line or "error" in line:
            print("   ", line.rstrip(), flush=True)
    if proc.wait() != 0 or result is None:
        print(f"{worker} {' '.join(extra)} failed (exit {proc.returncode})", flush=True)
    return result


def median(steps: list[dict], key: str) -> float:
    return statistics.median(s[key] for s in steps)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:  # inside a subprocess
        prompts = json.load(open(args.prompt_file)) if args.prompt_file else []
        result = {"ours": lambda: run_ours(args, prompts), "trl": lambda: run_trl(args, prompts),
                  "urpo": lambda: run_urpo(args)}[args.worker]()
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    sys.path.insert(0, ROOT)
    import data
    import model as model_lib
    args.model = model_lib.resolve_model(args.model or model_lib.DEFAULT_MODEL)
    records = data.load(args.data)[: (args.warmup + args.steps) * args.prompts]
    # Everything a run writes goes into its own folder: two runs at once must not share files.
    work_dir = tempfile.mkdtemp(prefix="bench_grpo_step_")
    prompt_file = os.path.join(work_dir, "prompts.json")
    with open(prompt_file, "w") as f:
        json.dump([data.player_prompt(r) for r in records], f)
    with_trl = not args.no_trl and ensure_trl_venv()
    if not with_trl and not args.no_trl:
        print("TRL is not available: measuring ours alone")

    configs = {"ours": (sys.executable, "ours", [])}
    if with_trl:
        per_step = args.prompts * args.group_size
        for micro in (per_step, args.micro_batch):
            configs[f"trl-{micro}"] = (TRL_PYTHON, "trl", ["--trl_batch", str(micro)])
    # Rounds alternate the configs, so that a slow spell of a shared machine hits all of them alike.
    results = {}
    for round_ in range(args.rounds):
        for name, (python, worker, extra) in configs.items():
            print(f"round {round_ + 1}/{args.rounds}: {name}", flush=True)
            r = launch(python, args, worker, ["--prompt_file", prompt_file, *extra])
            if r and r["steps"]:  # a worker that measured no step adds nothing to the table
                merged = results.setdefault(name, dict(r, steps=[]))
                merged["steps"] += r["steps"]
                merged["rss_gb"] = max(merged["rss_gb"], r["rss_gb"])
    if args.urpo_steps:
        results["urpo"] = launch(sys.executable, args, "urpo", ["--prompt_file", prompt_file])
    shutil.rmtree(work_dir, ignore_errors=True)

    print(f"\nGRPO step: {args.prompts} prompts x {args.group_size} samples x "
          f"<= {args.max_new_tokens} new tokens, float32, beta 0, HF generation, "
          f"activation checkpointing {'on' if args.activation_checkpointing else 'off'}; "
          f"median of {args.steps} step(s) after {args.warmup} warm-up, "
          f"in each of {args.rounds} alternating rounds"
          "\n(TRL's generation column also holds its reward and advantage computation)")
    print("| config | s/step | generation | log-probs | backward | optimizer | sync | peak RSS GB "
          "| tokens/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        if name == "urpo" or not r:
            continue
        cells = [f"{median(r['steps'], k):.1f}" if k in r["steps"][0] else "-"
                 for k in ("step", "generation", "logprobs", "backward", "optimizer", "sync")]
        tokens_per_s = sum(s["tokens"] for s in r["steps"]) / sum(s["step"] for s in r["steps"])
        print(f"| {name} | " + " | ".join(cells) + f" | {r['rss_gb']:.2f} | {tokens_per_s:.0f} |")
    ours = results.get("ours")
    for name, r in results.items():
        if name.startswith("trl") and r and ours:
            print(f"ours / {name}: time "
                  f"{median(ours['steps'], 'step') / median(r['steps'], 'step'):.2f}x, "
                  f"peak RSS {ours['rss_gb'] / r['rss_gb']:.2f}x (TRL {r['trl_version']})")

    urpo = results.get("urpo")
    if urpo:
        print(f"\nFull URPO step (train.py, all three tasks + self-referee pass, "
              f"{args.prompts} prompts x "
              f"{args.group_size}); median of {len(urpo['steps'])} step(s) after the first")
        phases = ["step", "rollout", "reward", "self_referee", "train", "sync"]
        print("| " + " | ".join(f"time/{p}" for p in phases)
              + " | referee share | peak RSS GB | tokens/s |")
        print("|" + "---|" * (len(phases) + 3))
        step = median(urpo["steps"], "time/step")
        print("| " + " | ".join(f"{median(urpo['steps'], f'time/{p}'):.1f}" for p in phases)
              + f" | {median(urpo['steps'], 'time/self_referee') / step:.0%} | {urpo['rss_gb']:.1f}"
              + f" | {median(urpo['steps'], 'tokens_per_s'):.0f} |")
        # rule rewards of 0 everywhere: every group skipped
        if median(urpo["steps"], "time/train") < 1:
            print("(time/train ~0: no group's rewards varied, so train.py skipped the update)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
