"""Model-FLOPs utilisation (MFU) of the trainer's training phase, on random-init models.

    python benchmarks/bench_mfu.py --shape qwen2.5-1.5b                       # one GPU,
                                                                              # checkpointing off
    python benchmarks/bench_mfu.py --shape qwen2.5-1.5b --activation_checkpointing
    torchrun --nproc_per_node=8 benchmarks/bench_mfu.py --shape qwen2.5-0.5b  # per-GPU MFU
                                                                              # under FSDP2
    python benchmarks/bench_mfu.py --shape tiny --steps 2                     # CPU smoke run

What one step is: the trainer's own code path. model.shard_model (FSDP2: every decoder layer, then
the root; bf16 compute with fp32 master weights on CUDA), model.completion_logprobs over every
position after the first (a completion of seq - 1 tokens), a sum of log-probs as the loss,
backward, and a fused AdamW step. Random token ids, random weights: nothing is downloaded.

    MFU = 6 x parameters x tokens / seconds / peak

with parameters counted once (a tied embedding is the output layer's matmul), tokens = batch x seq
per rank, seconds the median step, and peak = 989e12 FLOP/s (H100 SXM dense bf16; --peak to
change). Attention's own FLOPs are left out of the numerator, as in the usual 6N rule.
"""
import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, Qwen2Config  # noqa: E402

import model as model_lib  # noqa: E402
import train  # noqa: E402

# The published configs of Qwen2.5-0.5B and -1.5B (hidden size, MLP width, layers, heads, KV heads).
SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=1000),  # CPU smoke runs
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-1.5b",
                   help="model shape (random init)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step and rank")
    p.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--activation_checkpointing", action="store_true",
                   help="recompute decoder layers in backward")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured steps")
    p.add_argument("--steps", type=int, default=10, help="measured steps")
    p.add_argument("--peak", type=float, default=989e12,
                   help="peak FLOP/s of one device (H100 dense bf16)")
    return p.parse_args(argv)


def main(argv=None) -> float:
    args = parse_args(argv)
    rank, world, device = train.init_distributed()
    config = Qwen2Config(**{"vocab_size": 151936, "tie_word_embeddings": True,
                            "max_position_embeddings": 32768, "rope_theta": 1e6,
                            **SHAPES[args.shape]})
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # fp32 master weights
    params = sum(p.numel() for p in policy.parameters())  # tied weights once
    model_lib.shard_model(policy, device, bf16=device.type == "cuda",
                          activation_checkpointing=args.activation_checkpointing)
    policy.train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6, fused=True)
    input_ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)  # [B, T]
    attention_mask = torch.ones_like(input_ids)
    completion_mask = torch.ones_like(input_ids)
    completion_mask[:, 0] = 0  # every position but the first is scored

    seconds = []
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        logprobs, _ = model_lib.completion_logprobs(policy, input_ids, attention_mask,
                                                    completion_mask)  # [B, T]
        logprobs.sum().div(completion_mask.sum()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    tokens = args.batch * args.seq
    mfu = 6 * params * tokens / median / args.peak
    if rank == 0:
        memory = (f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
                  if device.type == "cuda" else "")
        print(f"{args.shape}: {params / 1e9:.3f}B parameters, "
              f"batch {args.batch} x seq {args.seq} per rank, "
              f"{world} rank(s) on {device.type}, activation checkpointing "
              f"{'on' if args.activation_checkpointing else 'off'}: {median:.3f} s/step "
              f"(median of {args.steps}), "
              f"{tokens / median:.0f} tokens/s per rank, MFU {mfu:.1%} of {args.peak:.3g} "
              f"FLOP/s{memory}", flush=True)
    return mfu


if __name__ == "__main__":
    main()
