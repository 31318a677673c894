"""Forward + backward time of autoep's MoE layer against the original HF block (ep = 1).

All run in this process, on the same input and output gradient, with the same
weights. The HF block is timed with each experts implementation transformers
offers here ("eager": a Python loop over hit experts; "grouped_mm": its
grouped GEMM path), so the ratio is against the best HF baseline. autoep is
timed on both conversion paths: the block path (the dedicated Qwen3-MoE
adapter: autoep's router and experts) and the experts path (the family's own
block and router, only the experts module expert-parallel; forced here by
unregistering the adapter for the conversion).

    python benchmarks/moe_layer.py                      # default sweep, fp32 and bf16
    python benchmarks/moe_layer.py --tokens 4096 --experts 64 --dtype bfloat16 --json out.json

Ratios below 1 mean autoep is faster. Absolute times depend on the machine;
quote ratios measured in the same run.
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
from autoep.models.tiny import tiny_config


def build_block(hidden: int, inter: int, experts: int, top_k: int, impl: str, dtype: torch.dtype, seed: int):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    config = tiny_config(
        "tiny-qwen3-moe",
        hidden_size=hidden,
        moe_intermediate_size=inter,
        num_experts=experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=True,
    )
    config._experts_implementation = impl
    torch.manual_seed(seed)
    block = Qwen3MoeSparseMoeBlock(config)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
    holder = nn.Module()
    holder.config = config
    holder.mlp = block
    return holder.to(dtype)


def time_fwd_bwd(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, iters: int, warmup: int) -> float:
    """Median seconds of one forward + backward."""
    samples = []
    for i in range(warmup + iters):
        module.zero_grad(set_to_none=True)
        inp = x.detach().requires_grad_()
        start = time.perf_counter()
        out = module(inp)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(grad)
        if x.is_cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def run_case(tokens: int, experts: int, args: argparse.Namespace, dtype: torch.dtype) -> dict:
    device = torch.device(args.device)
    hf = {
        impl: build_block(args.hidden, args.inter, experts, args.top_k, impl, dtype, args.seed).to(device)
        for impl in ("eager", "grouped_mm")
    }
    ours = copy.deepcopy(hf["eager"])
    autoep.convert(ours)
    generic = copy.deepcopy(hf["grouped_mm"])
    convert_on_experts_path(generic)
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(1, tokens, args.hidden, generator=gen).to(device, dtype)
    grad = torch.randn(1, tokens, args.hidden, generator=gen).to(device, dtype)
    times = {f"hf_{impl}": time_fwd_bwd(block.mlp, x, grad, args.iters, args.warmup) for impl, block in hf.items()}
    times["autoep"] = time_fwd_bwd(ours.mlp, x, grad, args.iters, args.warmup)
    times["autoep_experts_path"] = time_fwd_bwd(generic.mlp, x, grad, args.iters, args.warmup)
    best_hf = min(times["hf_eager"], times["hf_grouped_mm"])
    backend = "loop" if ours.mlp.experts.uses_loop(x) else "grouped_mm"
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "tokens": tokens,
        "experts": experts,
        "top_k": args.top_k,
        "hidden": args.hidden,
        "inter": args.inter,
        "autoep_backend": backend,
        **{k: round(v * 1e3, 3) for k, v in times.items()},
        "ratio_vs_best_hf": round(times["autoep"] / best_hf, 3),
        "ratio_vs_hf_eager": round(times["autoep"] / times["hf_eager"], 3),
        "ratio_experts_path_vs_block_path": round(times["autoep_experts_path"] / times["autoep"], 3),
    }


def convert_on_experts_path(holder: nn.Module) -> None:
    """Convert with the Qwen3-MoE adapter out of the way, so the generic experts path takes the block."""
    adapter = autoep.models.registered_families()["qwen3_moe"]
    autoep.unregister_family("qwen3_moe")
    try:
        autoep.convert(holder)
    finally:
        autoep.register_family(adapter)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--inter", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()

    rows = []
    header = (
        f"{'dtype':9} {'tokens':>6} {'E':>3} {'hf eager ms':>11} {'hf grouped ms':>13} "
        f"{'autoep ms':>9} {'vs best HF':>10} {'experts-path ms':>15} {'vs block path':>13}"
    )
    print(f"MoE layer fwd+bwd, hidden={args.hidden} inter={args.inter} top_k={args.top_k}, device={args.device}")
    print(header)
    for dtype_name in args.dtype:
        for tokens in args.tokens:
            for experts in args.experts:
                row = run_case(tokens, experts, args, getattr(torch, dtype_name))
                rows.append(row)
                print(
                    f"{row['dtype']:9} {tokens:>6} {experts:>3} {row['hf_eager']:>11.2f} "
                    f"{row['hf_grouped_mm']:>13.2f} {row['autoep']:>9.2f} {row['ratio_vs_best_hf']:>10.2f} "
                    f"{row['autoep_experts_path']:>15.2f} {row['ratio_experts_path_vs_block_path']:>13.2f}",
                    flush=True,
                )
    ratios = [r["ratio_vs_best_hf"] for r in rows]
    print(f"geometric-mean ratio autoep / best HF: {statistics.geometric_mean(ratios):.2f} over {len(rows)} cases")
    generic = [r["ratio_experts_path_vs_block_path"] for r in rows]
    print(f"geometric-mean ratio experts path / block path: {statistics.geometric_mean(generic):.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
