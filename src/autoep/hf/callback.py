"""Load balancing under Trainer: statistics and bias updates after every optimizer step, metrics in the logs."""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import TrainerCallback

from autoep.load_balance import step_load_balancing
from autoep.train.metrics import load_scalars


class LoadBalancingCallback(TrainerCallback):
    """Runs :func:`autoep.load_balance.step_load_balancing` after each optimizer step (a collective, on
    every rank: it reduces the step's routing counts and applies aux-loss-free bias updates) and keeps
    the scalar metrics of the steps since the last log: expert imbalance, dropped fraction, balancing losses.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._sums: dict[str, float] = {}
        self._steps = 0

    def on_optimizer_step(self, args, state, control, **kwargs):
        stats = step_load_balancing(self.model, self.model.autoep.meshes.stats_group)
        if stats is None:
            return
        capacity = self.model.autoep.config.load_balancing.capacity_factor is not None
        for name, value in load_scalars(stats, capacity).items():
            self._sums[name] = self._sums.get(name, 0.0) + float(value)
        self._steps += 1

    def pop_metrics(self) -> dict[str, Any]:
        """Means over the optimizer steps since the last call."""
        if not self._steps:
            return {}
        metrics = {name: total / self._steps for name, total in self._sums.items()}
        self._sums, self._steps = {}, 0
        return metrics
