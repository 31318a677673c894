"""The simulation against real gloo ranks (world 4): per-component peak memory and all-to-all bytes.

A representative subset (one spawn); the full matrix (3 models x ZeRO 1, 3 x ep 2, 4) is
benchmarks/plan_accuracy.py, with its output in benchmarks/results/plan_accuracy_cpu.txt.
"""

from __future__ import annotations

from autoep.plan.accuracy import compare
from autoep.plan.layouts import Layout
from autoep.plan.measure import Scenario
from autoep.plan.models import build_deepseek_v3_512, build_qwen3_moe_512


def test_simulation_matches_real_run():
    scenarios = [
        Scenario("qwen3-moe-512 ep2 z3", build_qwen3_moe_512, Layout(4, 2, 1, 3, 2, False, 1, True), 64),
        Scenario("deepseek-v3-512 ep4 z1", build_deepseek_v3_512, Layout(4, 4, 1, 1, 2, False, 1, True), 64),
    ]
    for c in compare(scenarios, world=4):
        errors = c.errors()
        assert max(errors.values()) <= 0.10, (c.scenario, c.rank, errors)
        # Equal in every case of benchmarks/plan_accuracy.py; these smaller runs have shown up to 72 bytes
        # (a few metadata rows, < 0.01%) more on the real side: open, see docs/plan.md "Known gaps".
        gap = abs(c.real.comm.all_to_all - c.sim.comm.all_to_all)
        assert gap <= 1e-4 * c.real.comm.all_to_all, (c.scenario, c.rank, gap)
