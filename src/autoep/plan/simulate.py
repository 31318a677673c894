"""One training step of a converted, parallelized model, tracked: real (gloo ranks) or simulated (fake world).

The same code runs both: :func:`autoep.parallelize.shard` (parallelize up to the point
where memory would be allocated), :func:`run_step` (forward and backward of
every micro-batch, the global gradient norm, clipping, the optimizer step) and
the trackers of :mod:`autoep.plan.memory` and :mod:`autoep.plan.comm`. In the
fake world the dispatchers get a routing planner, since no token ids exist.
A warm-up step comes first, so that the measured step starts with the
optimizer state allocated, as every step of a run after the first does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from autoep.config import AutoEPConfig
from autoep.moe.dispatch import PlannedCounts, RoutingPlanner
from autoep.moe.sites import moe_sites
from autoep.optim import build_optimizer
from autoep.parallel.bucket_layout import owners_by_bucket
from autoep.parallel.clip import clip_grad_norm_
from autoep.parallel.data_parallel import set_gradient_sync, uses_bucketed_replicas
from autoep.parallel.materialize import materialize
from autoep.parallelize import shard
from autoep.plan.comm import CommCounter, CommCounts
from autoep.plan.fake_world import fake_world
from autoep.plan.layouts import Layout
from autoep.plan.memory import MemoryBreakdown, RoutedRegion, StepMemoryTracker

PlannerFor = Callable[[int], RoutingPlanner]  # MoE layer index (model order) -> its planner


@dataclass
class StepMeasurement:
    """What one tracked step used on one rank."""

    peak: MemoryBreakdown  # at the moment of the peak
    component_peaks: MemoryBreakdown  # each component's own maximum
    comm: CommCounts
    seconds: float = 0.0
    routing: list[PlannedCounts] = field(default_factory=list)  # per MoE layer, as dispatched (real runs)
    raw_peak: dict[str, int] = field(default_factory=dict)  # the tracker's own categories at the peak

    def as_dict(self) -> dict[str, Any]:
        return {
            "peak": self.peak.as_dict(),
            "component_peaks": self.component_peaks.as_dict(),
            "comm_bytes": self.comm.as_dict(),
            "seconds": round(self.seconds, 3),
        }


def run_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: Sequence[torch.Tensor]) -> None:
    """What `autoep.train.step.train_step` does to memory and the network, with no host reads of values."""
    count = len(micro_batches)
    for index, input_ids in enumerate(micro_batches):
        set_gradient_sync(model, index == count - 1)
        output = model(input_ids=input_ids, labels=input_ids)
        (output.loss / count).backward()
    clip_grad_norm_(model, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def tracked_step(
    model: nn.Module,
    config: AutoEPConfig,
    seq_len: int,
    vocab_size: int,
    *,
    seed: int = 0,
    record_routing: bool = False,
    fake: bool = False,
) -> StepMeasurement:
    """A warm-up step, then one measured step of ``model`` (parallelized, materialised, in train mode).

    ``record_routing`` (real runs only): keep each MoE layer's dispatch counts, to replay in a simulation.
    """
    optimizer = build_optimizer(model, config)
    if fake and config.zero_stage in (1, 2) and uses_bucketed_replicas(config, model):
        _state_for_owned_only(model, optimizer)
    generator = torch.Generator().manual_seed(seed)
    batches = [
        torch.randint(0, vocab_size, (config.micro_batch_size, seq_len), generator=generator)
        for _ in range(config.gradient_accumulation_steps)
    ]
    tracker = StepMemoryTracker(model, optimizer)
    sites = [site for _, site in moe_sites(model)]
    inner = [site.dispatcher for site in sites]
    for site in sites:
        site.dispatcher = RoutedRegion(site.dispatcher, tracker)
    tracker.track_inputs(tuple(batches))
    counter = CommCounter()
    start = time.perf_counter()
    try:
        with tracker:
            run_step(model, optimizer, batches)
            tracker.reset_peak()
            with counter:
                run_step(model, optimizer, batches)
    finally:
        for site, dispatcher in zip(sites, inner, strict=True):
            site.dispatcher = dispatcher
    routing = [_dispatched(site) for site in sites] if record_routing else []
    seconds = time.perf_counter() - start
    peak = tracker.peak()
    if fake and tracker.peak_phase == "backward":
        peak.grads += in_flight_reduce_scatter_bytes(model)
    return StepMeasurement(peak, tracker.component_peaks(), counter.counts, seconds, routing, tracker.raw_peak())


def _state_for_owned_only(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """ZeRO 1/2 with owned updates, simulated on FSDP's replicate mesh (:func:`autoep.parallelize.shard`):
    before each step drop the gradients of the parameters another rank owns, so that this rank's optimizer
    state is its own share, as :mod:`autoep.parallel.ownership` does, with the reducer's buckets and split.
    ZeRO 2's gradients are left whole, so its plan errs high by ``(size - 1) / size`` of the gradients."""
    state = model.autoep
    experts = {id(p) for _, site in moe_sites(model) for p in site.experts_module.parameters()}
    unowned = []
    for is_expert, mesh in ((False, state.meshes.dense_fsdp), (True, state.meshes.expert_fsdp)):
        params = [p for p in reversed(list(model.parameters())) if p.requires_grad and (id(p) in experts) == is_expert]
        size, rank = mesh.size(0), mesh.get_local_rank(0)
        owners = owners_by_bucket([p.to_local() if isinstance(p, DTensor) else p for p in params], size)
        unowned += [p for p, owner in zip(params, owners, strict=True) if owner != rank]

    def drop(*_: Any) -> None:
        for param in unowned:
            param.grad = None

    optimizer.register_step_pre_hook(drop)


def in_flight_reduce_scatter_bytes(model: nn.Module) -> int:
    """The largest reduce-scatter input of the model's FSDP units (bytes, in the reduce dtype).

    A real backend keeps the input of the reduce-scatter in flight alive until
    it completes, while FSDP2 goes on with the next layer's backward. Fake
    collectives complete at once, so a simulation whose peak falls in the
    backward adds it. Measured on gloo (benchmarks/plan_accuracy.py): one such
    buffer is alive at the backward peak, for units sharded over a group smaller
    than the world (the expert mesh), none for units sharded over the whole world;
    NCCL is not measured.
    """
    world = dist.get_world_size()
    largest = 0
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        group = module._get_fsdp_state()._fsdp_param_group
        if group is None or not 1 < group.mesh_info.shard_mesh_size < world:
            continue
        reduce_dtype = group.mp_policy.reduce_dtype or group.fsdp_params[0].orig_dtype
        numel = sum(p.sharded_param._local_tensor.numel() for p in group.fsdp_params)
        nbytes = numel * group.mesh_info.shard_mesh_size * torch.empty((), dtype=reduce_dtype).element_size()
        largest = max(largest, nbytes)
    return largest


def _dispatched(site: Any) -> PlannedCounts:
    """The counts of the site's latest dispatch (a real run's routing, to replay in a simulation)."""
    experts = site.tokens_per_expert
    expert_rows = tuple(int(n) for n in experts.tolist()) if experts is not None else ()
    last = getattr(site.dispatcher, "last_counts", None)
    send, recv = last if last is not None else ((), ())
    return PlannedCounts(tuple(send), tuple(recv), expert_rows)


def simulate_step(
    build: Callable[[], nn.Module],
    layout: Layout,
    seq_len: int,
    planner_for: PlannerFor,
    *,
    rank: int = 0,
) -> StepMeasurement:
    """Rank ``rank``'s side of a training step at ``layout``, in a fake world of ``layout.gpus`` ranks.

    ``build`` returns a fresh model on the meta device; ``planner_for(i)`` the
    routing counts of its i-th MoE layer.
    """
    config = layout.config()
    with fake_world(layout.gpus, rank) as mode:
        model = build()
        shard(model, config, fsdp_only=True)
        for index, (_, site) in enumerate(moe_sites(model)):
            site.dispatcher.planner = planner_for(index)
        with mode:
            materialize(model, torch.device("cpu"))
            model.train()
            vocab = model.config.get_text_config().vocab_size
            return tracked_step(model, config, seq_len, vocab, fake=True)
