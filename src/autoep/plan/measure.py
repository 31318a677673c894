"""The reference for the simulation: the same tracked step on real gloo ranks, real tensors, real routing.

Used by the accuracy test and ``benchmarks/plan_accuracy.py``: every rank
builds the model, parallelizes it (deterministic weights), runs a warm-up and a
measured step under the same trackers as the simulation, and returns what it
used together with the routing counts its MoE layers dispatched, which the
simulation then replays for that rank.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from autoep.parallel.groups import local_device
from autoep.parallelize import parallelize
from autoep.plan.layouts import Layout
from autoep.plan.simulate import StepMeasurement, tracked_step


@dataclass(frozen=True)
class Scenario:
    """One model and layout to measure; ``build`` must be importable (it runs in spawned workers)."""

    name: str
    build: Callable[[], nn.Module]  # a fresh model on the meta device
    layout: Layout
    seq_len: int


def measure_rank(scenarios: Sequence[Scenario]) -> list[StepMeasurement]:
    """On this rank (inside ``autoep.launch.run_local``), each scenario's measured step."""
    results = []
    for scenario in scenarios:
        config = scenario.layout.config()
        if dist.get_world_size() != scenario.layout.gpus:
            world = dist.get_world_size()
            raise ValueError(f"{scenario.name}: layout for {scenario.layout.gpus} ranks, world is {world}")
        torch.manual_seed(0)
        model = scenario.build()
        parallelize(model, config)  # meta model: local shards allocated and initialised deterministically
        model.to(local_device()).train()
        vocab = model.config.get_text_config().vocab_size
        result = tracked_step(model, config, scenario.seq_len, vocab, seed=dist.get_rank(), record_routing=True)
        results.append(result)
        del model
    return results
