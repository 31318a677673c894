"""Expert-parallel process groups.

EP groups are blocks of ``ep_size`` consecutive ranks (the innermost mesh
dimension), so on multi-GPU nodes the all-to-all stays on the fast local links
whenever ``ep_size`` fits in a node.
"""

from __future__ import annotations

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


def mesh_device_type() -> str:
    """``cuda`` under NCCL, else ``cpu`` (gloo)."""
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def build_expert_mesh(ep_size: int) -> DeviceMesh:
    """A 2-D mesh ``(edp, ep)`` over the whole world; a collective call on every rank."""
    world = dist.get_world_size()
    return init_device_mesh(mesh_device_type(), (world // ep_size, ep_size), mesh_dim_names=("edp", "ep"))
