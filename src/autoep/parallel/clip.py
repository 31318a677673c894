"""Global gradient-norm clipping across the dense and the expert meshes.

Every parameter element must count once in the norm. Sharded placements
(FSDP's ``Shard``/``_StridedShard``, the expert dimension over EP) already
split elements between ranks; a ``Replicate`` placement (ZeRO-0) holds the
same elements on each rank of that mesh dimension (as does every rank for a
plain tensor, unless ZeRO 2 left its gradient on one owner), and a mesh that covers
only part of the world (one tensor-parallel lane) repeats on the other
lanes, so its local sum of squares is divided by the replication factor. One all-reduce over the world
then yields the exact global norm, whatever mixture of meshes the model uses.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate

from autoep.moe.experts import local_tensor
from autoep.parallel.groups import local_device
from autoep.parallel.replicate import grad_split


def _replication(t: torch.Tensor) -> int:
    """How many ranks of the world hold each of ``t``'s local elements."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if isinstance(t, DTensor):
        # A mesh smaller than the world (one tensor-parallel lane's dp mesh) repeats on the other lanes.
        mesh = t.device_mesh
        repeats = world // mesh.size()
        return repeats * math.prod(mesh.size(i) for i, p in enumerate(t.placements) if isinstance(p, Replicate))
    # A plain tensor in a distributed job is a full replica on every rank.
    return world


@torch.no_grad()
def global_grad_norm(parameters: Iterable[nn.Parameter]) -> torch.Tensor:
    """L2 norm of all gradients as if the model were in one process (fp32).

    A gradient that ZeRO 2's reduce-scatter left on its owner only (:func:`grad_split`) is held by that
    many times fewer ranks than its parameter."""
    with_grads = [p for p in parameters if p.grad is not None]
    device = local_tensor(with_grads[0].grad).device if with_grads else local_device()  # NCCL cannot reduce a CPU zero
    total_sq = torch.zeros((), dtype=torch.float32, device=device)
    for param in with_grads:
        grad = param.grad
        total_sq += local_tensor(grad).float().pow(2).sum() / (_replication(grad) // grad_split(param))
    if dist.is_initialized():
        dist.all_reduce(total_sq)
    return total_sq.sqrt()


@torch.no_grad()
def clip_grad_norm_(
    model_or_params: nn.Module | Iterable[nn.Parameter], max_norm: float, *, norm: torch.Tensor | None = None
) -> torch.Tensor:
    """Scale all gradients so their global norm is at most ``max_norm``; return the norm before clipping.

    Same rule as ``torch.nn.utils.clip_grad_norm_``: the scale is
    ``max_norm / (norm + 1e-6)``, applied only when it is below 1. ``norm``: the
    global norm if already computed (it is a collective; do it once).
    """
    params = list(model_or_params.parameters() if isinstance(model_or_params, nn.Module) else model_or_params)
    norm = global_grad_norm(params) if norm is None else norm
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    local_grads = [local_tensor(p.grad) for p in params if p.grad is not None]
    if local_grads:
        torch._foreach_mul_(local_grads, scale.to(local_grads[0].device))
    return norm
