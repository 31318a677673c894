"""Forward + backward time of a MoE layer with shared experts, overlapped against sequential, same run.

The converted layer starts the token exchange and computes its shared experts
(and balancing bookkeeping) while the exchange is in flight
(`MoELayer.set_overlap(True)`, the default); `set_overlap(False)` runs the
same work in sequence. Both schedules are timed on the same layer, tensors and
ranks, interleaved, and the medians compared.

    python benchmarks/overlap.py                       # tiny-deepseek-v3 shape, ep 2, 4096 tokens per rank
    python benchmarks/overlap.py --tokens 8192 --ep 4 --hidden 512

On CPU (gloo) the exchange runs on gloo's own threads, so overlap is real but
small; on GPUs (NCCL streams) it is what hides the all-to-all.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

os.environ.setdefault("OMP_NUM_THREADS", "1")


def _measure(hidden: int, shared_inter: int, tokens: int, reps: int) -> dict:
    import autoep
    from autoep.models.tiny import tiny_config
    from autoep.moe.sites import moe_sites

    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    config = tiny_config(
        "tiny-deepseek-v3",
        hidden_size=hidden,
        moe_intermediate_size=hidden // 2,
        n_shared_experts=max(1, shared_inter // (hidden // 2)),
        num_hidden_layers=1,
        first_k_dense_replace=0,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    autoep.convert(model, ep_size=dist.get_world_size())
    _, layer = moe_sites(model)[0]
    x = torch.randn(1, tokens, hidden, generator=torch.Generator().manual_seed(dist.get_rank()))
    grad = torch.randn(1, tokens, hidden)
    times: dict[bool, list[float]] = {True: [], False: []}
    outputs = {}
    for rep in range(reps + 2):
        for overlap in (True, False) if rep % 2 else (False, True):
            layer.set_overlap(overlap)
            xx = x.clone().requires_grad_(True)
            dist.barrier()
            t0 = time.perf_counter()
            out = layer(xx)
            out = out[0] if isinstance(out, tuple) else out
            out.backward(grad)
            elapsed = torch.tensor(time.perf_counter() - t0)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the step waits for the slowest rank
            if rep >= 2:
                times[overlap].append(float(elapsed))
            outputs[overlap] = (out.detach(), xx.grad)
    same = torch.equal(outputs[True][0], outputs[False][0]) and torch.equal(outputs[True][1], outputs[False][1])
    return {"overlap": statistics.median(times[True]), "sequential": statistics.median(times[False]), "same": same}


def main() -> None:
    from autoep.launch import run_local

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ep", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--shared-intermediate", type=int, default=1024, help="shared experts' total width")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    r = run_local(_measure, args.ep, args.hidden, args.shared_intermediate, args.tokens, args.reps)[0]
    print(
        f"tiny-deepseek-v3 shape, hidden {args.hidden}, shared width {args.shared_intermediate}, ep {args.ep}, "
        f"{args.tokens} tokens/rank: forward+backward median overlapped {r['overlap'] * 1e3:.1f} ms, "
        f"sequential {r['sequential'] * 1e3:.1f} ms, ratio {r['overlap'] / r['sequential']:.3f}; "
        f"outputs and gradients identical: {r['same']}"
    )


if __name__ == "__main__":
    main()
