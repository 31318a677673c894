"""Simulation against measurement: real gloo ranks and the fake world, same model, layout and routing.

Each scenario runs for real on ``world`` local ranks (one spawn for all of
them); then, for rank 0 and for the rank that received the most dispatched
rows, the simulation replays that rank's measured routing counts and the two
are compared component by component.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from autoep.plan.measure import Scenario, measure_rank
from autoep.plan.memory import COMPONENTS
from autoep.plan.routing import RecordedRouting
from autoep.plan.simulate import StepMeasurement, simulate_step


@dataclass
class Comparison:
    scenario: str
    rank: int
    real: StepMeasurement
    sim: StepMeasurement

    def errors(self) -> dict[str, float]:
        """Relative error per component at the peak (and the dispatch buffers' own peak), and of the total.

        A component under 1% of the peak is compared against 1% of the peak instead
        of itself (a few KiB of dispatch buffers left at the peak would otherwise dominate).
        """
        floor = 0.01 * self.real.peak.total
        out = {}
        for name in COMPONENTS:
            real, sim = getattr(self.real.peak, name), getattr(self.sim.peak, name)
            out[name] = abs(sim - real) / max(real, floor, 1)
        real_d, sim_d = self.real.component_peaks.dispatch, self.sim.component_peaks.dispatch
        out["dispatch_own_peak"] = abs(sim_d - real_d) / max(real_d, floor, 1)
        out["total"] = abs(self.sim.peak.total - self.real.peak.total) / self.real.peak.total
        return out

    @property
    def all_to_all_equal(self) -> bool:
        return self.real.comm.all_to_all == self.sim.comm.all_to_all


def busiest_rank(results: dict[int, list[StepMeasurement]], index: int) -> int:
    """The rank that received the most rows over all MoE layers in scenario ``index``."""
    return max(results, key=lambda r: sum(sum(c.recv_rows) for c in results[r][index].routing))


def compare(scenarios: Sequence[Scenario], world: int) -> list[Comparison]:
    from autoep.launch import run_local

    results = run_local(measure_rank, world, list(scenarios))
    comparisons = []
    for index, scenario in enumerate(scenarios):
        for rank in sorted({0, busiest_rank(results, index)}):
            real = results[rank][index]
            replay = RecordedRouting(real.routing).for_layer
            sim = simulate_step(scenario.build, scenario.layout, scenario.seq_len, replay, rank=rank)
            comparisons.append(Comparison(scenario.name, rank, real, sim))
    return comparisons
