"""Which data-parallel backend a ZeRO stage gets, chosen once when the model is sharded.

* ZeRO 1-3, and ZeRO 0 when parameters must be cast for compute (bf16
  ``param_dtype`` over fp32 weights) or offloaded: FSDP2 (:mod:`autoep.parallel.fsdp`;
  ZeRO 0 there is a ``(replicate, shard=1)`` mesh).
* ZeRO 0 otherwise: replicated parameters and a bucketed, overlapped
  all-reduce (:mod:`autoep.parallel.replicate`). Same semantics, about half the
  gradient-reduction work (benchmarks/peer_compare.py).

:func:`set_gradient_sync` is the one switch for gradient accumulation on either.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

from autoep.config import AutoEPConfig, ParallelDims, torch_dtype
from autoep.moe.sites import moe_sites
from autoep.parallel.fsdp import apply_fsdp
from autoep.parallel.groups import Meshes
from autoep.parallel.replicate import ReplicatedGradients


def uses_bucketed_replicas(config: AutoEPConfig, model: nn.Module) -> bool:
    """ZeRO 0 whose parameters compute and reduce in their own dtype, on their own device."""
    if config.zero_stage != 0 or config.cpu_offload:
        return False
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    mp = config.mixed_precision
    return dtypes <= {torch_dtype(mp.param_dtype)} and mp.reduce_dtype == mp.param_dtype


def apply_data_parallel(
    model: nn.Module, config: AutoEPConfig, dims: ParallelDims, meshes: Meshes, *, bucketed: bool
) -> ReplicatedGradients | None:
    """Apply the backend (``bucketed``: :func:`uses_bucketed_replicas`, decided before the meshes were built);
    returns the bucketed reducer, or ``None`` when FSDP wraps the model."""
    if not bucketed:
        apply_fsdp(model, config, dims, meshes)
        return None
    expert_params = {id(p) for _, site in moe_sites(model) for p in site.experts_module.parameters()}
    dense = [p for p in model.parameters() if id(p) not in expert_params]
    experts = [p for p in model.parameters() if id(p) in expert_params]
    dense_group, expert_group = meshes.dense_fsdp.get_group(), meshes.expert_fsdp.get_group()
    if dist.get_process_group_ranks(dense_group) == dist.get_process_group_ranks(expert_group):
        groups = [(dense + experts, dense_group)]  # ep = 1: one sequence of buckets, fewer collectives
    else:
        groups = [(dense, dense_group), (experts, expert_group)]
    # Both divide by dp: expert gradients arrive summed over the EP group (DESIGN.md, autoep.parallel.fsdp).
    return ReplicatedGradients(groups, divide_factor=dims.dp)


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """Reduce gradients in the coming backward (``True``) or let them accumulate locally (``False``)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
    replicated = getattr(getattr(model, "autoep", None), "replicated", None)
    if replicated is not None:
        replicated.set_requires_gradient_sync(sync)
