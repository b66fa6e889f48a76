"""Rollout engines on this machine: our HFEngine against the vLLM engine, on the same prompts.

    python benchmarks/bench_rollout.py          # defaults: referee prompts, as in a URPO step
    python benchmarks/bench_rollout.py --help   # every setting

What it runs, each in its own subprocess (peak RSS and page faults are per process), alternating
in --rounds (hf, [hf-trim,] vllm, hf, ...):
  hf    rollout.HFEngine in this python
  vllm  rollout.VLLMEngine (in-process engine core) in the vLLM virtualenv's python (--vllm_python,
        default .venv-vllm/bin/python, which .ci/run builds); without it, hf is measured alone
  hf-trim  (--trim) HFEngine with glibc's heap trimmed after every call, as it was before
The prompts are referee prompts (a preference record's conversation and its two answers, rendered
with data.referee_prompt and the chat template), the longest rollouts of a URPO step. Every call
gets prompts of its own (--prompts of them, n samples each), the same ones for both engines, so
vLLM's prefix cache cannot reuse an earlier call's prompts. Each process makes --warmup unmeasured
calls, then --calls measured ones; around each measured call it reads getrusage: user and system
CPU time, minor page faults. The table sums the measured calls of every round:
  tokens/s        generated tokens / wall seconds of generate()
  sys share       system CPU / (user + system CPU): time the kernel spent on the process's behalf
                  (mostly faulting in freshly mapped memory)
  faults/token    minor page faults / generated tokens
  peak RSS GB     the largest ru_maxrss over the engine's processes (model load included)
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VLLM_PYTHON = os.path.join(ROOT, ".venv-vllm", "bin", "python")


def parse_args(argv=None):
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass  # the docstring as written, and every option's default

    p = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    p.add_argument("--model", default="",
                   help="hub id or HF folder; empty: model.DEFAULT_MODEL, resolved offline")
    p.add_argument("--data", help="data.py spec of preference records: their referee prompts",
                   default="ultrafeedback_binarized:"
                           "samples/ultrafeedback_binarized/test_prefs.first100.jsonl")
    p.add_argument("--prompts", type=int, default=3, help="prompts per generate call")
    p.add_argument("--max_prompt_tokens", type=int, default=800,
                   help="only records whose referee prompt is at most this long")
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--max_new_tokens", type=int, default=64, help="generation budget per sample")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--rounds", type=int, default=2,
                   help="processes per engine, alternating (hf, vllm, hf, ...)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured calls per process")
    p.add_argument("--calls", type=int, default=2, help="measured calls per process")
    p.add_argument("--vllm_python", default=VLLM_PYTHON, help="python of the vLLM virtualenv")
    p.add_argument("--no_vllm", action="store_true", help="measure the HF engine alone")
    p.add_argument("--trim", action="store_true", help="also measure hf-trim: HFEngine with the "
                   "heap trimmed after every call (model.release_freed_memory), as it was before")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)  # internal: hf | vllm
    p.add_argument("--prompt_file", default="", help=argparse.SUPPRESS)  # internal: ids per call
    args = p.parse_args(argv)
    for name in ("prompts", "n", "max_new_tokens", "rounds", "calls"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    return args


def run_worker(args) -> dict:
    """Inside a subprocess: build one engine, make the calls, measure each measured one."""
    sys.path.insert(0, ROOT)
    import torch
    import model as model_lib
    import rollout

    calls = json.load(open(args.prompt_file))  # per call: its prompts' token ids
    tokenizer = model_lib.load_tokenizer(args.model)
    kind = rollout.VLLMEngine if args.worker == "vllm" else rollout.HFEngine
    engine = kind(args.model, tokenizer, torch.float32, "cpu", 0)
    if args.worker == "hf-trim":  # what trimming the heap after every call costs and saves
        generate = engine.generate

        def generate_and_trim(*a, **k):
            groups = generate(*a, **k)
            model_lib.release_freed_memory(torch.device("cpu"))
            return groups

        engine.generate = generate_and_trim
    measured = []
    for index, prompt_ids in enumerate(calls):
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        groups = engine.generate(prompt_ids, args.n, args.temperature, args.max_new_tokens)
        wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
        call = dict(wall=wall, tokens=sum(len(c.token_ids) for group in groups for c in group),
                    user=after.ru_utime - before.ru_utime, sys=after.ru_stime - before.ru_stime,
                    faults=after.ru_minflt - before.ru_minflt)
        print(f"{args.worker} call {index}{' (warm-up)' if index < args.warmup else ''}: "
              + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in call.items()), flush=True)
        if index >= args.warmup:
            measured.append(call)
    engine.close()
    peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return dict(calls=measured, rss_gb=peak_rss_gb)


def launch(python: str, args, worker: str, prompt_file: str) -> dict | None:
    command = [python, os.path.abspath(__file__), "--worker", worker, "--model", args.model,
               "--n", str(args.n), "--max_new_tokens", str(args.max_new_tokens),
               "--temperature", str(args.temperature), "--warmup", str(args.warmup),
               "--prompt_file", prompt_file]
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")  # vLLM's engine core in-process
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    result, tail = None, []
    for line in proc.stdout:
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
        elif " call " in line:
            print("   ", line.rstrip(), flush=True)
        tail = (tail + [line.rstrip()])[-20:]
    if proc.wait() != 0 or result is None:
        print(f"{worker} failed (exit {proc.returncode}):\n" + "\n".join(tail), flush=True)
        return None
    return result


def summary(result: dict) -> dict:
    calls = result["calls"]
    total = {key: sum(call[key] for call in calls)
             for key in ("wall", "tokens", "user", "sys", "faults")}
    cpu = total["user"] + total["sys"]
    return dict(tokens_per_s=total["tokens"] / total["wall"], wall=total["wall"] / len(calls),
                tokens=total["tokens"] / len(calls), sys_share=total["sys"] / cpu if cpu else 0.0,
                faults_per_token=total["faults"] / max(total["tokens"], 1), rss_gb=result["rss_gb"])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:  # inside a subprocess
        print("RESULT " + json.dumps(run_worker(args)), flush=True)
        return 0

    sys.path.insert(0, ROOT)
    import data
    import model as model_lib
    args.model = model_lib.resolve_model(args.model or model_lib.DEFAULT_MODEL)
    tokenizer = model_lib.load_tokenizer(args.model)
    records = data.load(args.data)
    prompt_ids = [model_lib.chat_ids(tokenizer, data.referee_prompt(
        r["messages"], r["responses"], list(range(len(r["responses"]))))) for r in records]
    prompt_ids = [ids for ids in prompt_ids if len(ids) <= args.max_prompt_tokens]
    per_process = args.warmup + args.calls
    if len(prompt_ids) < per_process * args.prompts:
        raise SystemExit(f"{args.data} has {len(prompt_ids)} referee prompts of <= "
                         f"{args.max_prompt_tokens} tokens; {per_process} calls x {args.prompts} "
                         f"prompts need {per_process * args.prompts}")
    calls = [prompt_ids[i * args.prompts:(i + 1) * args.prompts] for i in range(per_process)]
    descriptor, prompt_file = tempfile.mkstemp(prefix="bench_rollout_", suffix=".json")
    with os.fdopen(descriptor, "w") as f:
        json.dump(calls, f)

    engines = {"hf": sys.executable} | ({"hf-trim": sys.executable} if args.trim else {})
    if not args.no_vllm:
        if os.path.exists(args.vllm_python):
            engines["vllm"] = args.vllm_python
        else:
            print(f"no vLLM python at {args.vllm_python} (build .venv-vllm as .ci/run does): "
                  "measuring hf alone")
    results = {}
    try:
        for round_ in range(args.rounds):  # alternating: a slow spell hits all engines alike
            for name, python in engines.items():
                print(f"round {round_ + 1}/{args.rounds}: {name}", flush=True)
                r = launch(python, args, name, prompt_file)
                if r:
                    merged = results.setdefault(name, dict(calls=[], rss_gb=0.0))
                    merged["calls"] += r["calls"]
                    merged["rss_gb"] = max(merged["rss_gb"], r["rss_gb"])
    finally:  # also on Ctrl-C
        os.remove(prompt_file)
    lengths = [len(ids) for call in calls[args.warmup:] for ids in call]
    print(f"\nRollouts: {args.prompts} referee prompts ({min(lengths)}-{max(lengths)} tokens) x "
          f"{args.n} samples x <= {args.max_new_tokens} new tokens, T {args.temperature:g}, "
          f"float32, CPU; {args.calls} measured call(s) after {args.warmup} warm-up, in each of "
          f"{args.rounds} alternating rounds")
    print("| engine | tokens/s | s/call | tokens/call | sys share | faults/token | peak RSS GB |")
    print("|---|---|---|---|---|---|---|")
    table = {name: summary(r) for name, r in results.items()}
    for name, s in table.items():
        print(f"| {name} | {s['tokens_per_s']:.1f} | {s['wall']:.2f} | {s['tokens']:.0f} | "
              f"{s['sys_share']:.1%} | {s['faults_per_token']:.0f} | {s['rss_gb']:.2f} |")
    vllm = table.get("vllm")
    for name, hf in table.items():
        if name != "vllm" and vllm:
            print(f"{name} / vllm: tokens/s {hf['tokens_per_s'] / vllm['tokens_per_s']:.2f}x, "
                  f"faults/token {hf['faults_per_token'] / max(vllm['faults_per_token'], 1):.2f}x, "
                  f"peak RSS {hf['rss_gb'] / vllm['rss_gb']:.2f}x")
    return 0 if len(results) == len(engines) else 1


if __name__ == "__main__":
    sys.exit(main())
