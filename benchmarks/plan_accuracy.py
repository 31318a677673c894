"""`autoep plan` accuracy: simulated vs measured peak memory per component and all-to-all bytes.

Three models (hidden 512, 16 experts, 4 layers: Mixtral, Qwen3-MoE and
DeepSeek-V3 shapes) at ZeRO 1 and 3, ep 2 and 4, bf16 compute, world 4 (real
gloo ranks, one spawn). Writes benchmarks/results/plan_accuracy_cpu.txt.

    python benchmarks/plan_accuracy.py
"""

from __future__ import annotations

import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from autoep.plan.accuracy import compare
from autoep.plan.layouts import Layout
from autoep.plan.measure import Scenario
from autoep.plan.memory import COMPONENTS
from autoep.plan.models import ACCURACY_BUILDERS

WORLD, SEQ, MICRO_BATCH = 4, 64, 2


def scenarios() -> list[Scenario]:
    out = []
    for name, build in ACCURACY_BUILDERS.items():
        for zero in (1, 3):
            for ep in (2, 4):
                layout = Layout(WORLD, ep, 1, zero, MICRO_BATCH, False, 1, True)
                out.append(Scenario(f"{name} ep{ep} z{zero}", build, layout, SEQ))
    return out


def main() -> None:
    start = time.perf_counter()
    comparisons = compare(scenarios(), WORLD)
    lines = [
        f"autoep plan accuracy, world {WORLD} (gloo, CPU), seq {SEQ}, micro-batch {MICRO_BATCH}, bf16 compute; "
        "relative error of the simulated peak per component (MiB real -> sim)",
    ]
    worst = 0.0
    for c in comparisons:
        errors = c.errors()
        worst = max(worst, max(errors.values()))
        cells = [
            f"{n} {getattr(c.real.peak, n) / 2**20:.1f}->{getattr(c.sim.peak, n) / 2**20:.1f} ({errors[n]:.1%})"
            for n in COMPONENTS
        ]
        lines.append(
            f"{c.scenario:24s} rank {c.rank}: total {c.real.peak.total / 2**20:.1f}->{c.sim.peak.total / 2**20:.1f} "
            f"MiB ({errors['total']:.2%}); "
            + "; ".join(cells)
            + f"; dispatch own peak {errors['dispatch_own_peak']:.1%}; all-to-all bytes real {c.real.comm.all_to_all} "
            f"sim {c.sim.comm.all_to_all} ({'equal' if c.all_to_all_equal else 'DIFFERENT'})"
        )
    lines.append(f"worst relative error {worst:.2%}; all-to-all equal: {all(c.all_to_all_equal for c in comparisons)}")
    lines.append(f"wall time {time.perf_counter() - start:.0f} s on {os.cpu_count()} cores")
    text = "\n".join(lines)
    print(text)
    out = Path(__file__).parent / "results" / "plan_accuracy_cpu.txt"
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
