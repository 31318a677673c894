"""Which data-parallel backend a ZeRO stage gets, chosen once when the model is sharded.

* ZeRO 3, ``zero_backend="fsdp"``, and ZeRO 0-2 when parameters must be cast for compute (bf16
  ``param_dtype`` over fp32 weights) or offloaded: FSDP2 (:mod:`autoep.parallel.fsdp`;
  ZeRO 0 there is a ``(replicate, shard=1)`` mesh).
* ZeRO 0 otherwise: replicated parameters and a bucketed, overlapped
  all-reduce (:mod:`autoep.parallel.replicate`). Same semantics, about half the
  gradient-reduction work (benchmarks/peer_compare.py).
* ZeRO 1 and 2 otherwise: each rank updates only the parameters it owns,
  then all exchange them (:mod:`autoep.parallel.ownership`); gradients are
  all-reduced (ZeRO 1) or reduce-scattered to their owners (ZeRO 2).
  Optimizer state is split over the ranks, parameters stay replicated. Where
  some rank would own nothing (a tiny model on many ranks), FSDP2.

:func:`set_gradient_sync` is the one switch for gradient accumulation on either.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

from autoep.config import AutoEPConfig, ParallelDims, torch_dtype
from autoep.moe.sites import moe_sites
from autoep.parallel.fsdp import apply_fsdp, reshard_all
from autoep.parallel.groups import Meshes
from autoep.parallel.ownership import OwnedUpdates
from autoep.parallel.replicate import ReplicatedGradients


def uses_bucketed_replicas(config: AutoEPConfig, model: nn.Module) -> bool:
    """ZeRO 0-2 whose parameters compute and reduce in their own dtype, on their own device, unless
    ``zero_backend="fsdp"`` asks for FSDP2."""
    if config.zero_stage > 2 or config.cpu_offload or config.zero_backend == "fsdp":
        return False
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    mp = config.mixed_precision
    return dtypes <= {torch_dtype(mp.param_dtype)} and mp.reduce_dtype == mp.param_dtype


def apply_data_parallel(
    model: nn.Module, config: AutoEPConfig, dims: ParallelDims, meshes: Meshes, *, bucketed: bool
) -> tuple[ReplicatedGradients | None, OwnedUpdates | None]:
    """Apply the backend (``bucketed``: :func:`uses_bucketed_replicas`, decided before the meshes were built).

    Returns the bucketed reducer and, for ZeRO 1/2, the owned updates; ``(None, None)`` when FSDP wraps the model."""
    if bucketed:
        reducer, owned = rebuild_bucketed(model, config, dims, meshes)
        if config.zero_stage == 0 or owned is not None:
            return reducer, owned
        reducer.remove()
    apply_fsdp(model, config, dims, meshes)
    return None, None


def rebuild_bucketed(
    model: nn.Module, config: AutoEPConfig, dims: ParallelDims, meshes: Meshes
) -> tuple[ReplicatedGradients, OwnedUpdates | None]:
    """The bucketed reducer on ``model``'s current parameter objects, and (ZeRO 1/2) the owned updates, or
    ``None`` where some rank would own nothing. Called again after a meta model is materialised."""
    reducer = _bucketed_reducer(model, config, dims, meshes)
    if config.zero_stage == 0:
        return reducer, None
    owned = OwnedUpdates(reducer)
    if owned.every_rank_owns:
        return reducer, owned
    owned.remove()
    return reducer, None


def _bucketed_reducer(
    model: nn.Module, config: AutoEPConfig, dims: ParallelDims, meshes: Meshes
) -> ReplicatedGradients:
    expert_params = {id(p) for _, site in moe_sites(model) for p in site.experts_module.parameters()}
    dense = [p for p in model.parameters() if id(p) not in expert_params]
    experts = [p for p in model.parameters() if id(p) in expert_params]
    dense_group, expert_group = meshes.dense_fsdp.get_group(), meshes.expert_fsdp.get_group()
    if dist.get_process_group_ranks(dense_group) == dist.get_process_group_ranks(expert_group):
        groups = [(dense + experts, dense_group)]  # ep = 1: one sequence of buckets, fewer collectives
    else:
        groups = [(dense, dense_group), (experts, expert_group)]
    # Both divide by dp: expert gradients arrive summed over the EP group (DESIGN.md, autoep.parallel.fsdp).
    zero = config.zero_stage
    return ReplicatedGradients(groups, divide_factor=dims.dp, runs=zero > 0, scatter=zero == 2)


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """Reduce gradients in the coming backward (``True``) or let them accumulate locally (``False``)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
    replicated = getattr(getattr(model, "autoep", None), "replicated", None)
    if replicated is not None:
        replicated.set_requires_gradient_sync(sync)


def settle_parameters(model: nn.Module) -> None:
    """Parameters in their state at rest, before they are read whole (a checkpoint, an export).

    FSDP units go back to their shards; under owned updates (ZeRO 1/2) a step the exchange has not followed
    yet is exchanged. A collective where either applies: every rank calls it."""
    reshard_all(model)
    owned = getattr(getattr(model, "autoep", None), "owned", None)
    if owned is not None:
        owned.sync_parameters()
