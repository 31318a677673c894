"""`autoep plan MODEL --gpus N`: which layouts fit, what each uses and sends, ranked (see docs/plan.md)."""

from __future__ import annotations

import argparse


def _ints(value: str) -> tuple[int, ...]:
    return tuple(int(v) for v in value.split(",") if v)


def _bools(value: str) -> tuple[bool, ...]:
    table = {"on": True, "true": True, "1": True, "off": False, "false": False, "0": False}
    try:
        return tuple(table[v.strip().lower()] for v in value.split(",") if v)
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected on/off values, got {value!r}") from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="simulate a training step at cluster scale: which layouts fit, memory and network per GPU",
        description="For each candidate layout (ep, tp, ZeRO stage, micro-batch, activation checkpointing) simulate "
        "one training step of the converted, parallelized MODEL in a fake world of N ranks (fake process group, "
        "fake tensors: no GPU, no weights) and report peak memory per GPU by component, all-to-all and dense "
        "collective bytes, and whether it fits; layouts that fit are ranked by bytes sent per token.",
    )
    p.add_argument("model", help="built-in name (tiny-mixtral, zoo:TYPE), a local HF directory or a config.json")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs (the world size)")
    p.add_argument("--gpu-memory", default="80GiB", help="memory per GPU (default: 80GiB)")
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence (default: 4096)")
    p.add_argument("--micro-batch", type=_ints, default=(1,), help="sequences per GPU, comma list (default: 1)")
    p.add_argument("--ep", type=_ints, help="expert-parallel sizes to try, comma list (default: all valid)")
    p.add_argument("--tp", type=_ints, help="tensor-parallel sizes to try (default: all valid up to 8)")
    p.add_argument("--zero", type=_ints, help="ZeRO stages to try (default: 1,3)")
    p.add_argument(
        "--activation-checkpointing", type=_bools, default=(False, True), help="on, off or on,off (default: both)"
    )
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 compute (default: on)")
    p.add_argument("--imbalance", type=float, default=2.0, help="load of the busiest expert / mean (default: 2)")
    p.add_argument("--all-layers", action="store_true", help="simulate every layer instead of one per kind")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from autoep.plan.api import plan
    from autoep.plan.report import print_plan

    result = plan(
        args.model,
        args.gpus,
        gpu_memory=args.gpu_memory,
        seq_len=args.seq_len,
        micro_batch=args.micro_batch,
        ep=args.ep,
        tp=args.tp,
        zero=args.zero,
        activation_checkpointing=args.activation_checkpointing,
        bf16=args.bf16,
        imbalance=args.imbalance,
        full=True if args.all_layers else None,
    )
    if args.json:
        print(result.to_json())
    else:
        print_plan(result)
    return 0 if result.ranked() else 1
