"""The weight sync after an optimizer step: time and extra peak memory per rank.

    torchrun --standalone --nproc_per_node=2 benchmarks/bench_sync.py  # ~1 min on 2 CPU cores
    torchrun --standalone --nproc_per_node=2 benchmarks/bench_sync.py --model PATH --rounds 5

Every rank holds an FSDP2 shard of the policy (as train.py's trainer) and its own rollout
engine (the HF engine here; vLLM's loader takes the same stream). Two ways of refreshing the
engine alternate, `--rounds` times each:

  host copy   gather the whole model as float32 CPU tensors on every rank
              (model.full_state_dict), then copy it into the engine: the sync before issue 13
  streamed    the policy's own sharded state dict, gathered one tensor at a time where it
              lives and copied into the engine at once (model.load_full_state_dict): the loop's sync

Extra peak RSS is the process's peak resident memory during the sync (VmHWM, reset before
each round through /proc/self/clear_refs) minus its resident memory just before; on GPUs the
same difference is device memory instead (here everything is host memory). Medians over the
rounds, per rank.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import model as model_lib  # noqa: E402
import rollout  # noqa: E402


def memory_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure(sync) -> tuple[float, float]:
    """Seconds and extra peak RSS (GB) of one call of `sync`."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    dist.barrier()
    before = memory_kib("VmRSS")
    start = time.perf_counter()
    sync()
    dist.barrier()
    seconds = time.perf_counter() - start
    return seconds, (memory_kib("VmHWM") - before) * 1024 / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=model_lib.DEFAULT_MODEL, help="hub id or HF folder")
    parser.add_argument("--rounds", type=int, default=3, help="measured syncs of each kind")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        model_lib.resolve_model(args.model)  # the default model may be converted once
    dist.barrier()
    path = model_lib.resolve_model(args.model)
    policy = model_lib.shard_model(model_lib.load_model(path), torch.device("cpu"))
    engine = rollout.HFEngine(path, model_lib.load_tokenizer(path))
    kinds = {
        "host copy": lambda: engine.load_weights(model_lib.full_state_dict(policy)),
        "streamed": lambda: engine.load_weights(policy.state_dict()),
    }
    for sync in kinds.values():  # warm-up: first-touch page faults, allocator pools
        sync()
    figures = {kind: [] for kind in kinds}
    for _ in range(args.rounds):
        for kind, sync in kinds.items():
            figures[kind].append(measure(sync))
    params = sum(p.numel() for p in engine.model.parameters())
    lines = [f"rank {rank}: {kind:<9}  {statistics.median(s for s, _ in runs):6.2f} s  "
             f"extra peak RSS {statistics.median(m for _, m in runs):5.2f} GB"
             for kind, runs in figures.items()]
    reports = [None] * world
    dist.all_gather_object(reports, lines)
    if rank == 0:
        print(f"weight sync, {world} ranks, {params / 1e6:.0f}M parameters "
              f"({params * 4 / 1e9:.2f} GB in float32), median of {args.rounds} rounds")
        print("\n".join(line for report in reports for line in report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
