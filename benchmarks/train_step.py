"""Median training-step time, tokens/s and peak memory per rank for a given autoep config.

    python benchmarks/train_step.py                         # tiny-mixtral, 4 ranks, ep 2, ZeRO 3
    python benchmarks/train_step.py --sweep                 # ZeRO 0-3 x ep 1/2/4 in one run
    python benchmarks/train_step.py --model tiny-deepseek-v3 --ep 4 --zero 1 --bf16

Each configuration runs in its own set of ranks (gloo on CPU, NCCL on GPUs),
times ``--steps`` optimizer steps after ``--warmup`` untimed ones, and reports
the median step time, global tokens/s, and per-rank peak memory: resident set
size above the process's baseline on CPU, ``max_memory_allocated`` on CUDA.
Compare configurations by ratios taken in the same run.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch
import torch.distributed as dist

import autoep
from autoep.launch import run_local
from autoep.models.loading import load_model
from autoep.train import train_step


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker(args: dict) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    cuda = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    baseline = _rss_mib()
    model = load_model(args["model"], seed=0).to(device)
    config = autoep.AutoEPConfig.create(
        ep_size=args["ep"],
        zero_stage=args["zero"],
        micro_batch_size=args["micro_batch"],
        gradient_clipping=1.0,
        mixed_precision={"param_dtype": "bfloat16" if args["bf16"] else "float32", "reduce_dtype": "float32"},
    )
    autoep.parallelize(model, config)
    optimizer = autoep.build_optimizer(model, config)
    vocab = model.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(rank)
    times = []
    for step in range(args["warmup"] + args["steps"]):
        ids = torch.randint(0, vocab, (args["micro_batch"], args["seq_len"]), generator=gen).to(device)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        train_step(model, optimizer, [ids], max_grad_norm=1.0)
        if cuda:
            torch.cuda.synchronize()
        if step >= args["warmup"]:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _rss_mib() - baseline
    return {"median_s": median, "peak_mib": peak, "world": world}


def run_config(args: argparse.Namespace, ep: int, zero: int) -> dict:
    spec = {
        "model": args.model,
        "ep": ep,
        "zero": zero,
        "micro_batch": args.micro_batch,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "warmup": args.warmup,
        "bf16": args.bf16,
    }
    per_rank = run_local(_worker, args.nproc, spec)
    median = max(r["median_s"] for r in per_rank.values())  # the step ends when the slowest rank does
    tokens = args.nproc * args.micro_batch * args.seq_len
    return {
        "model": args.model,
        "world": args.nproc,
        "ep": ep,
        "zero": zero,
        "dtype": "bf16" if args.bf16 else "fp32",
        "median_step_ms": round(median * 1e3, 2),
        "tokens_per_s": round(tokens / median),
        "peak_mib_per_rank": round(max(r["peak_mib"] for r in per_rank.values()), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-mixtral")
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--ep", type=int, default=2)
    parser.add_argument("--zero", type=int, default=3)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="ZeRO 0-3 x ep 1/2/4")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()

    cases = [(ep, zero) for zero in (0, 1, 2, 3) for ep in (1, 2, 4)] if args.sweep else [(args.ep, args.zero)]
    print(
        f"{'model':14} {'world':>5} {'ep':>3} {'zero':>4} {'dtype':>5} {'step ms':>8} {'tokens/s':>9} {'peak MiB':>9}"
    )
    rows = []
    for ep, zero in cases:
        row = run_config(args, ep, zero)
        rows.append(row)
        print(
            f"{row['model']:14} {row['world']:>5} {ep:>3} {zero:>4} {row['dtype']:>5} "
            f"{row['median_step_ms']:>8.1f} {row['tokens_per_s']:>9,} {row['peak_mib_per_rank']:>9.1f}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
