"""One command for the first GPU a session is lent: train.py's own path on CUDA, checked.

    python benchmarks/gpu_check.py                              # one H100/H200: <= 8 min
    python benchmarks/gpu_check.py --device cpu --shape tiny    # the CI dry run (a test runs it)

Nothing is downloaded: the model is a random-init Qwen2.5 shape (bench_mfu.SHAPES) with the SmolLM2
tokenizer bundled in samples/smollm2_tokenizer/, the data the excerpts in samples/. Checked, each a
row of the table printed at the end (exit status 1 when any row fails):

  urpo steps      `python train.py` itself (HF engine, bf16 compute under FSDP2 at world size 1
                  on CUDA): a few URPO steps with every task, a checkpoint, finite losses. The
                  verifiable reward is replaced by the share of letters before "m" (a random model
                  never boxes a right answer, so without it no group would vary and nothing would
                  train).
  resume          the same run continued with --resume: the step after the checkpoint runs.
  export          `python train.py export` of the checkpoint: an HF folder that loads.
  log-prob gap    engine (bf16 copy) vs trainer (FSDP2, bf16 compute) on sampled completions, the
                  mean |difference| of log p_T (bound: train.py's --logprob_gap_max default).
  weight check    train.check_engine, the guard after every sync, on that engine: it passes when
                  synced, and stops a one-step-stale (AdamW, lr 1e-6, not synced) and a half-loaded
                  engine; its cost per call.
  output grad     the output layer's weight gradient under bf16 compute against float32's, relative
                  error (model._OutputLayerLogprobs sums it in float32).
  peak memory     torch.cuda.max_memory_allocated over the in-process checks.
  MFU             benchmarks/bench_mfu.py for each shape of --mfu_shapes.
"""
import argparse
import gzip
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

TOKENIZER = os.path.join(ROOT, "samples", "smollm2_tokenizer")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--shape", default="qwen2.5-0.5b", help="bench_mfu.SHAPES key of the URPO run")
    p.add_argument("--mfu_shapes", default=None,
                   help="comma-separated shapes for MFU (default: qwen2.5-0.5b,qwen2.5-1.5b on "
                        "cuda, tiny on cpu)")
    p.add_argument("--gap_max", type=float, default=None,
                   help="bound of the mean log-prob gap (default: train.py's --logprob_gap_max)")
    p.add_argument("--grad_error_max", type=float, default=0.05,
                   help="bound of the bf16 output-layer gradient's relative error")
    p.add_argument("--out", default=None, help="working folder (default: a temporary one)")
    return p.parse_args(argv)


def random_model(shape: str, folder: str) -> str:
    """A random-init Qwen2 of `shape` over the bundled SmolLM2 tokenizer, saved as an HF folder."""
    from transformers import (AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast,
                              Qwen2Config)
    from bench_mfu import SHAPES
    with gzip.open(os.path.join(TOKENIZER, "tokenizer.json.gz"), "rt", encoding="utf-8") as f:
        tokenizer_json = os.path.join(folder, "tokenizer.json.src")
        os.makedirs(folder, exist_ok=True)
        with open(tokenizer_json, "w", encoding="utf-8") as out:
            out.write(f.read())
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=tokenizer_json, bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", pad_token="<|im_end|>",
                                        unk_token="<|endoftext|>")
    os.remove(tokenizer_json)
    with open(os.path.join(TOKENIZER, "chat_template.jinja")) as f:
        tokenizer.chat_template = f.read()
    shape = {key: value for key, value in SHAPES[shape].items() if key != "vocab_size"}
    config = Qwen2Config(vocab_size=len(tokenizer), tie_word_embeddings=True,
                         max_position_embeddings=4096, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def train_worker(*args) -> None:
    """train.main with the synthetic verifiable reward (see the module docstring)."""
    import train
    train.math_rewards = lambda texts, golds: [sum(ch < "m" for ch in t) / max(len(t), 1)
                                               for t in texts]
    sys.exit(train.main(list(args)))


def run(command: list[str], log: str) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    with open(log, "a") as f:
        f.write(f"$ {' '.join(command)}\n{result.stdout}\n{result.stderr}\n")
    return result


def urpo_rows(model_dir: str, work: str, log: str) -> list[tuple]:
    """The URPO run, its resume and its export, through train.py's command line."""
    run_dir = os.path.join(work, "run")
    flags = ["--model", model_dir, "--out_dir", run_dir, "--rollout", "hf", "--save_every", "2",
             "--prompts_per_step", "3", "--group_size", "4", "--max_new_tokens", "32",
             "--referee_max_new_tokens", "16", "--max_prompt_tokens", "384",
             "--cold_start_steps", "1", "--eval_limit", "2", "--eval_pairs", "2",
             "--eval_max_new_tokens", "16", "--lr", "1e-5", "--no-plot", "--samples_every", "0"]
    worker = [sys.executable, os.path.abspath(__file__), "--worker"]
    rows = []
    first = run(worker + flags + ["--steps", "2"], log)
    lines = ([json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
             if first.returncode == 0 else [])
    losses = [line["loss"] for line in lines if "loss" in line]
    rows.append(("urpo steps", f"{len(lines) - 1} steps, losses {[round(x, 4) for x in losses]}",
                 "exit 0, every loss finite, >= 1 update",
                 first.returncode == 0 and losses and all(map(math.isfinite, losses))))
    resumed = run(worker + flags + ["--steps", "3", "--resume"], log)
    steps = ([json.loads(line)["step"] for line in open(os.path.join(run_dir, "metrics.jsonl"))]
             if resumed.returncode == 0 else [])
    resumed_ok = resumed.returncode == 0 and "resumed from" in resumed.stdout and steps[-1:] == [3]
    rows.append(("resume", f"steps {steps}", "resumed at 2, step 3 run", resumed_ok))
    checkpoints = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
    exported = run([sys.executable, "train.py", "export",
                    os.path.join(run_dir, "checkpoints", checkpoints[-1]),
                    os.path.join(work, "exported")], log)
    loads = False
    if exported.returncode == 0:
        from transformers import AutoModelForCausalLM
        loads = AutoModelForCausalLM.from_pretrained(os.path.join(work, "exported")) is not None
    rows.append(("export", checkpoints[-1], "an HF folder that loads", loads))
    return rows


def precision_rows(model_dir: str, device: torch.device, gap_max: float,
                   grad_error_max: float) -> list[tuple]:
    """Engine vs trainer log-probs, and the output layer's bf16 weight gradient, in process."""
    import data
    import grpo
    import model as model_lib
    import rollout
    import train
    train.init_distributed()
    tokenizer = model_lib.load_tokenizer(model_dir)
    bf16 = torch.bfloat16
    policy = model_lib.shard_model(model_lib.load_model(model_dir), device, bf16=True)
    engine = rollout.HFEngine(model_dir, tokenizer, bf16, device, seed=0)
    engine.load_weights(policy.state_dict())
    records = data.load("gsm8k:samples/gsm8k/test.first100.jsonl", limit=4)
    prompts = [model_lib.chat_ids(tokenizer, data.player_prompt(r)) for r in records]
    samples = [grpo.Sample(prompt, c.token_ids, 1.0, c.logprobs)
               for prompt, group in zip(prompts, engine.generate(prompts, 2, 1.0, 32))
               for c in group]
    batch = model_lib.collate([[s] for s in samples], tokenizer.pad_token_id, device, False)
    with torch.no_grad():
        logp, _ = model_lib.batch_logprobs(policy, batch, 1.0)
    mask = batch["completion_mask"].bool()
    gap = (logp[mask] - batch["sampler_logprobs"][mask]).abs().mean().item()
    rows = [("log-prob gap", f"{gap:.2e} mean over {int(mask.sum())} tokens", f"<= {gap_max:g}",
             gap <= gap_max)]

    def output_gradient(model) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        logp, _ = model_lib.batch_logprobs(model, batch, 1.0)
        (logp * batch["completion_mask"]).sum().backward()
        grad = model.get_output_embeddings().weight.grad
        return (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).float()
    exact = model_lib.load_model(model_dir).to(device)
    reference = output_gradient(exact)
    error = ((output_gradient(policy) - reference).norm() / reference.norm()).item()
    rows.append(("output grad", f"{error:.2e} relative to float32", f"<= {grad_error_max:g}",
                 error <= grad_error_max))
    rows.append(weight_check_row(policy, engine, prompts))
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
        rows.append(("peak memory", f"{peak:.1f} GiB", "reported", True))
    return rows


def weight_check_row(policy, engine, prompts: list[list[int]]) -> tuple:
    """train.check_engine on `engine` (synced from `policy`): fresh, then one AdamW step (lr 1e-6)
    the engine never receives, then half the layers loaded."""
    import model as model_lib
    import rollout
    import train
    cfg = train.Config()

    def verdict(step: int) -> tuple[str, dict]:
        try:
            return "pass", train.check_engine(engine, policy, prompts, cfg, step)[0]
        except rollout.StaleWeightsError as error:
            return "stop" if "does not hold the trainer's weights" in str(error) else "gap", {}
    fresh, metrics = verdict(0)
    before = {name: t.clone() for name, t in model_lib.full_state_dict(policy).items()}
    policy.zero_grad(set_to_none=True)
    ids = torch.tensor([prompts[0]], device=next(policy.parameters()).device)  # [1, T]
    policy(input_ids=ids, labels=ids).loss.backward()
    torch.optim.AdamW(policy.parameters(), lr=1e-6).step()
    stale, _ = verdict(1)
    after = model_lib.full_state_dict(policy)
    layers = policy.config.num_hidden_layers
    late = tuple(f".layers.{i}." for i in range(layers // 2, layers))
    engine.load_weights({name: (before if any(k in name for k in late) else after)[name]
                         for name in after})
    half, _ = verdict(2)
    cost = f"{metrics['time/weight_check'] * 1e3:.0f} ms" if metrics else "-"
    return ("weight check", f"fresh {fresh}, one step stale {stale}, half loaded {half}; {cost}",
            "pass, stop, stop", (fresh, stale, half) == ("pass", "stop", "stop"))


def mfu_rows(shapes: list[str], device: str, log: str) -> list[tuple]:
    rows = []
    for shape in shapes:
        small = (["--batch", "2", "--seq", "32", "--warmup", "1", "--steps", "2"] if shape == "tiny"
                 else ["--batch", "4", "--seq", "2048", "--warmup", "2", "--steps", "5"])
        result = run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_mfu.py"),
                      "--shape", shape, *small], log)
        found = re.search(r"MFU ([0-9.]+)%", result.stdout)
        seconds = re.search(r"([0-9.]+) s/step", result.stdout)
        value = (f"{found.group(1)}% ({seconds.group(1)} s/step, batch {small[1]} x {small[3]})"
                 if found else "no result")
        rows.append((f"MFU {shape}", value, f"measured on {device}",
                     result.returncode == 0 and found is not None))
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py: no CUDA device here: run it on a GPU node, or pass "
                         "--device cpu --shape tiny for the dry run")
    if args.device == "cpu":  # the dry run: train.py picks the CPU wherever CUDA is not seen
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    shapes = (args.mfu_shapes.split(",") if args.mfu_shapes else
              ["qwen2.5-0.5b", "qwen2.5-1.5b"] if args.device == "cuda" else ["tiny"])
    work = args.out or tempfile.mkdtemp(prefix="gpu_check-")
    log = os.path.join(work, "gpu_check.log")
    os.makedirs(work, exist_ok=True)
    model_dir = random_model(args.shape, os.path.join(work, "model"))
    rows = urpo_rows(model_dir, work, log)
    if args.gap_max is None:
        from train import Config
        args.gap_max = Config.logprob_gap_max
    rows += precision_rows(model_dir, torch.device(args.device), args.gap_max,
                           args.grad_error_max)
    rows += mfu_rows(shapes, args.device, log)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"\ngpu_check on {name}, shape {args.shape}, torch {torch.__version__} (log: {log})")
    print(f"{'check':<20} {'measured':<58} {'bound':<32} ok")
    for check, value, bound, ok in rows:
        print(f"{check:<20} {value:<58} {bound:<32} {'yes' if ok else 'NO'}")
    if not args.out and all(ok for *_, ok in rows):
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(ok for *_, ok in rows) else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        train_worker(*sys.argv[2:])
    sys.exit(main())
