"""Device meshes for the dense and the expert view of the same ranks.

EP groups are blocks of ``ep`` consecutive ranks (the innermost mesh
dimension), so on multi-GPU nodes the all-to-all stays on the fast local links
whenever ``ep`` fits in a node. Expert FSDP and the EP shards of the expert
weights are dimensions of one root mesh, as FSDP2 requires to compose them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from autoep.config import ParallelDims


def mesh_device_type() -> str:
    """``cuda`` under NCCL, else ``cpu`` (gloo)."""
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def local_device() -> torch.device:
    """This rank's device: its GPU under NCCL, else the CPU (also with no process group)."""
    if dist.is_initialized() and mesh_device_type() == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def build_expert_mesh(ep_size: int) -> DeviceMesh:
    """A 2-D mesh ``(edp, ep)`` over the whole world; a collective call on every rank."""
    world = dist.get_world_size()
    return init_device_mesh(mesh_device_type(), (world // ep_size, ep_size), mesh_dim_names=("edp", "ep"))


@dataclass(frozen=True)
class Meshes:
    """The meshes one training job uses.

    dense_fsdp: what FSDP shards dense parameters over (all ``dp`` ranks).
    expert_fsdp: what FSDP shards expert parameters over (the ``edp`` ranks
    holding the same experts). ep: the expert-parallel mesh (``None`` at ep=1).
    tp: the tensor-parallel peers (``None`` at tp=1); they are consecutive
    ranks, like EP groups, and share one data shard. data: the 1-D ``dp`` mesh
    of ranks holding different data (this rank's lane of every data shard).
    For ZeRO 0 under FSDP the FSDP meshes are 2-D ``(replicate, shard=1)``:
    nothing is sharded and gradients are all-reduced. The bucketed ZeRO 0
    (:mod:`autoep.parallel.replicate`) all-reduces over the 1-D meshes' groups.
    """

    dense_fsdp: DeviceMesh
    expert_fsdp: DeviceMesh
    ep: DeviceMesh | None
    data: DeviceMesh
    tp: DeviceMesh | None = None

    @property
    def tp_group(self) -> dist.ProcessGroup | None:
        return self.tp.get_group() if self.tp is not None else None

    @property
    def stats_group(self) -> dist.ProcessGroup | None:
        """The ranks whose routing statistics add up to the global batch's (``None``: the world).

        Tensor-parallel peers count the same tokens: one lane of every data shard.
        """
        return self.data.get_group() if self.tp is not None else None


def build_meshes(dims: ParallelDims, fsdp_replicate: bool) -> Meshes:
    """Create the meshes (a collective call on every rank); ``fsdp_replicate``: ZeRO 0 under FSDP."""
    device = mesh_device_type()
    replicate = fsdp_replicate
    lanes = (dims.tp,) if dims.tp > 1 else ()
    lane_names = ("tp",) if dims.tp > 1 else ()
    if replicate:
        dense_root = init_device_mesh(
            device, (dims.dp, 1, *lanes), mesh_dim_names=("dp_replicate", "dp_shard", *lane_names)
        )
        dense, data = dense_root["dp_replicate", "dp_shard"], dense_root["dp_replicate"]
        root = init_device_mesh(device, (dims.edp, 1, dims.ep), mesh_dim_names=("edp_replicate", "edp_shard", "ep"))
        expert_fsdp = root["edp_replicate", "edp_shard"]
    else:
        dense_root = init_device_mesh(device, (dims.dp, *lanes), mesh_dim_names=("dp", *lane_names))
        dense = data = dense_root["dp"]
        root = init_device_mesh(device, (dims.edp, dims.ep), mesh_dim_names=("edp", "ep"))
        expert_fsdp = root["edp"]
    return Meshes(
        dense_fsdp=dense,
        expert_fsdp=expert_fsdp,
        ep=root["ep"] if dims.ep > 1 else None,
        data=data,
        tp=dense_root["tp"] if dims.tp > 1 else None,
    )


def apply_timeout_to_all_groups(timeout) -> int:
    """Give every process group of this rank the collective timeout of the default group.

    ``init_process_group(timeout=...)`` covers the world group only; the EP,
    expert-data-parallel and tensor-parallel groups that device meshes create
    get the backend's default (30 min on gloo, 10 on NCCL), so a peer stuck in
    an all-to-all would hang them far past ``--collective-timeout``. torch has
    no public setter for an existing group's timeout; ``_set_pg_timeout`` is
    the one it uses itself. Returns how many groups were set.
    """
    from torch.distributed import distributed_c10d as c10d

    count = 0
    for group in list(c10d._world.pg_map):
        if c10d._rank_not_in_group(group):
            continue
        c10d._set_pg_timeout(timeout, group)
        count += 1
    return count
