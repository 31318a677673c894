"""What load balancing costs: forward + backward of one converted MoE layer per setting (ep = 1).

Every case runs the same layer (same weights, input and output gradient) in
training mode; only the :class:`~autoep.moe.balance.BalanceConfig` differs.
The reference is the layer with its balancing bookkeeping switched off
entirely (no counts, no aux/z-loss measurement), which autoep never does in
training: it is the floor the other cases are measured against.

    python benchmarks/balancing.py
    python benchmarks/balancing.py --tokens 8192 --experts 64 --json out.json

Cases: ``metrics only`` (the default: dropless, aux and z-loss measured for the
metrics, no gradient), ``aux``, ``all losses`` (switch, sequence, global and
z-loss), ``capacity 1.25`` under each drop policy, and ``bias update`` (the
per-step statistics reduction and bias update, timed inside the step).
Ratios are against the floor, measured in the same run; ``floor again`` (a
second copy of the floor) shows how far noise alone moves a ratio.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from torch import nn

import autoep
from autoep.load_balance import balancing_loss, step_load_balancing
from autoep.moe.balance import BalanceConfig
from moe_layer import build_block  # this folder's layer benchmark: the same Qwen3-MoE block

CASES: dict[str, dict] = {
    "metrics only": {},
    "aux": {"aux_loss_coef": 1e-2},
    "all losses": {"aux_loss_coef": 1e-2, "seq_aux_loss_coef": 1e-3, "global_aux_loss_coef": 1e-2, "z_loss_coef": 1e-3},
    "capacity 1.25 probs": {"capacity_factor": 1.25, "drop_policy": "probs"},
    "capacity 1.25 position": {"capacity_factor": 1.25, "drop_policy": "position"},
    "bias update": {"bias_update_rate": 1e-3},
}


def one_step(model: nn.Module, x: torch.Tensor, grad: torch.Tensor, bias: bool) -> float:
    """Seconds of forward, balancing loss, backward (and the bias update when on)."""
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    out = model.mlp(x)
    out = out[0] if isinstance(out, tuple) else out
    loss = (out * grad).sum()
    extra = balancing_loss(model)
    if extra is not None:
        loss = loss + extra
    loss.backward()
    if bias:
        step_load_balancing(model)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_case(tokens: int, experts: int, args: argparse.Namespace, dtype: torch.dtype) -> dict:
    """Cases run round-robin, one step each per round in a rotating order, so machine noise hits them alike."""
    device = torch.device(args.device)
    base = build_block(args.hidden, args.inter, experts, args.top_k, "eager", dtype, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, tokens // args.batch, args.hidden, generator=gen).to(device, dtype)
    grad = torch.randn(args.batch, tokens // args.batch, args.hidden, generator=gen).to(device, dtype)

    models: dict[str, nn.Module] = {}
    for name in ("floor", "floor again"):  # the second copy shows the run's noise
        floor = copy.deepcopy(base)
        autoep.convert(floor)
        floor.mlp._balance = lambda *a, **k: None  # benchmark-only: bookkeeping off
        models[name] = floor
    for name, knobs in CASES.items():
        model = copy.deepcopy(base)
        autoep.convert(model, balance=BalanceConfig(**knobs))
        models[name] = model
    samples: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for i in range(args.warmup + args.iters):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            model = models[name]
            seconds = one_step(model.to(device).train(), x, grad, bias=name == "bias update")
            if i >= args.warmup:
                samples[name].append(seconds)
    times = {name: statistics.median(values) for name, values in samples.items()}
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "tokens": tokens,
        "experts": experts,
        "top_k": args.top_k,
        "ms": {k: round(v * 1e3, 3) for k, v in times.items()},
        "ratio_vs_floor": {k: round(v / times["floor"], 3) for k, v in times.items() if k != "floor"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--batch", type=int, default=4, help="sequences the tokens are split into")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--inter", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=14)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    names = ["floor again", *CASES]
    print(
        f"MoE layer fwd+bwd with load balancing, hidden={args.hidden} inter={args.inter} "
        f"top_k={args.top_k}, {args.dtype}, device={args.device}; ratio to the floor (no bookkeeping)"
    )
    print(f"{'tokens':>6} {'E':>3} {'floor ms':>9} " + " ".join(f"{n:>{max(len(n), 6)}}" for n in names))
    rows = []
    for tokens in args.tokens:
        for experts in args.experts:
            row = run_case(tokens, experts, args, dtype)
            rows.append(row)
            ratios = " ".join(f"{row['ratio_vs_floor'][n]:>{max(len(n), 6)}.3f}" for n in names)
            print(f"{tokens:>6} {experts:>3} {row['ms']['floor']:>9.2f} {ratios}", flush=True)
    for n in names:
        mean = statistics.geometric_mean([r["ratio_vs_floor"][n] for r in rows])
        print(f"geometric-mean ratio {n}: {mean:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
