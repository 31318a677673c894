"""Muon costs: Gram vs standard Newton-Schulz, and a Muon step vs an AdamW step.

    python benchmarks/muon.py

Part 1 times ``orthogonalize`` on wide matrices (and stacks of experts) with
both methods and reports their agreement. Part 2 trains tiny-deepseek-v3 on 4
CPU ranks (ep 2, ZeRO 3) and reports the median step time of Muon and AdamW
measured in the same run (see benchmarks/train_step.py for the method).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

import autoep
from autoep.launch import run_local
from autoep.models.tiny import build_tiny_model
from autoep.optim.newton_schulz import orthogonalize
from autoep.train import train_step


def _median_ms(fn, repeats: int = 7) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def newton_schulz_table() -> None:
    print(f"{'shape':>18} {'standard ms':>12} {'gram ms':>9} {'gram/std':>9} {'max rel diff':>13}")
    for shape in [(256, 1024), (256, 4096), (128, 8192), (8, 256, 1024), (32, 128, 512), (512, 512)]:
        g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        standard = _median_ms(lambda g=g: orthogonalize(g, method="standard"))
        gram = _median_ms(lambda g=g: orthogonalize(g, method="gram"))
        a, b = orthogonalize(g, method="standard"), orthogonalize(g, method="gram")
        rel = ((a - b).abs().max() / a.abs().max()).item()
        print(f"{shape!s:>18} {standard:>12.2f} {gram:>9.2f} {gram / standard:>9.2f} {rel:>13.1e}")


def _worker(kind: str, steps: int) -> float:
    params = {"lr": 1e-3} if kind == "AdamW" else {"lr": 1e-3, "update_scale": "moonlight"}
    model = build_tiny_model("tiny-deepseek-v3", seed=0)
    config = autoep.AutoEPConfig(ep_size=2, zero_stage=3, optimizer={"type": kind, "params": params})
    autoep.parallelize(model, config)
    optimizer = autoep.build_optimizer(model, config)
    gen = torch.Generator().manual_seed(dist.get_rank())
    times = []
    for step in range(steps + 3):
        ids = torch.randint(0, 256, (4, 64), generator=gen)
        start = time.perf_counter()
        train_step(model, optimizer, [ids], max_grad_norm=1.0)
        if step >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def step_table(steps: int = 20) -> None:
    adamw = max(run_local(_worker, 4, "AdamW", steps).values())
    muon = max(run_local(_worker, 4, "Muon", steps).values())
    print(
        f"tiny-deepseek-v3, 4 ranks, ep 2, ZeRO 3: AdamW {adamw:.1f} ms/step, Muon {muon:.1f} ms/step, "
        f"Muon/AdamW {muon / adamw:.2f}"
    )


if __name__ == "__main__":
    torch.set_num_threads(2)
    newton_schulz_table()
    step_table()
