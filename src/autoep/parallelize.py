"""`autoep.parallelize`: convert a HF MoE model and shard it for training."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch import nn

from autoep.config import AutoEPConfig, ParallelDims
from autoep.convert import ConversionReport, convert, validate_conversion
from autoep.errors import ConfigError
from autoep.moe.sites import moe_sites
from autoep.parallel.data_parallel import apply_data_parallel, rebuild_bucketed, uses_bucketed_replicas
from autoep.parallel.groups import Meshes, build_meshes, local_device
from autoep.parallel.materialize import has_meta_parameters, init_deterministic_, materialize
from autoep.parallel.ownership import OwnedUpdates
from autoep.parallel.replicate import ReplicatedGradients
from autoep.parallel.tensor_parallel import TPPlan, apply_tensor_parallel, validate_tensor_parallel
from autoep.parallel.wrapping import check_accelerate_state, mark_distributed


@dataclass
class ParallelState:
    """What `parallelize` set up, kept on the model as ``model.autoep``."""

    config: AutoEPConfig
    dims: ParallelDims
    meshes: Meshes
    report: ConversionReport
    tp_plan: TPPlan
    replicated: ReplicatedGradients | None = None  # ZeRO 0-2's bucketed reduction, when it replaces FSDP
    owned: OwnedUpdates | None = None  # ZeRO 1/2's split of the optimizer's work, with ``replicated``

    @property
    def dp_rank(self) -> int:
        """Which data shard this rank trains on (tensor-parallel peers share one)."""
        return self.meshes.data.get_local_rank()


def validate(model: nn.Module, config: AutoEPConfig, world_size: int) -> ParallelDims:
    """Every check `parallelize` makes before its first collective (rank-local, identical everywhere)."""
    dims = config.parallel_dims(world_size)
    check_accelerate_state(config.mixed_precision.param_dtype)
    validate_conversion(model, config.ep_size, world_size, balance=config.load_balancing, folded=config.tp_size > 1)
    validate_tensor_parallel(model, config.tp_size)
    if config.cpu_offload and dist.is_initialized() and dist.get_backend() != "nccl":
        raise ConfigError("cpu_offload needs CUDA parameters; on a CPU-only job the parameters already live on CPU")
    return dims


def parallelize(model: nn.Module, config: AutoEPConfig, *, init_meta: bool = True) -> nn.Module:
    """Convert ``model``'s MoE blocks to expert parallelism, shard the dense path over
    ``tp`` and apply ZeRO (FSDP2; ZeRO 0-2 in fp32: bucketed reductions), in place.

    Needs an initialised default process group (``torchrun`` or `autoep train`).
    Builds the dense (``dp`` x ``tp``) and expert (``edp`` x ``ep``) meshes,
    converts (folding the MoE layers over ``tp``), applies the family's
    tensor-parallel plan (:mod:`autoep.parallel.tensor_parallel`), optionally
    enables activation checkpointing, and shards with the stage mapping of
    docs/training.md and expert gradients divided by ``dp``. Returns the same
    model object (an FSDP module unless ZeRO 0-2 is bucketed), with ``model.autoep`` describing the
    layout; accelerate's ``prepare`` leaves it as it is and its ``no_sync()``
    defers the gradient reduction (:mod:`autoep.parallel.wrapping`).

    A model built on the meta device is accepted: each rank then allocates only
    its own shards and, with ``init_meta``, initialises them deterministically
    (the same global weights for any layout; seed ``config.seed``).
    """
    if not dist.is_initialized():
        raise ConfigError("autoep.parallelize needs torch.distributed: launch with `autoep train` or torchrun")
    state = shard(model, config)
    if has_meta_parameters(model):
        materialize(model, local_device())
        if init_meta:
            init_deterministic_(model, seed=config.seed)
        if state.replicated is not None:  # materialising made new parameter objects: hook those
            state.replicated.remove()
            if state.owned is not None:
                state.owned.remove()
            state.replicated, state.owned = rebuild_bucketed(model, config, state.dims, state.meshes)
    mark_distributed(model)  # accelerate / Trainer must not wrap it again
    return model


def shard(model: nn.Module, config: AutoEPConfig, *, fsdp_only: bool = False) -> ParallelState:
    """`parallelize` up to materialisation: the model's tensors stay where they are (meta for a plan).

    Validate, build the meshes, convert (folding over tp), apply tensor
    parallelism, activation checkpointing and the data-parallel backend
    (:mod:`autoep.parallel.data_parallel`); sets ``model.autoep``. `autoep.plan`
    simulates exactly this on a fake world, with ``fsdp_only``: its memory
    tracker follows FSDP units, so a plan of the bucketed stages (fp32 ZeRO 0-2)
    runs on FSDP's replicate mesh, which holds the same whole parameters
    (ZeRO 1/2's split optimizer state: :func:`autoep.plan.simulate.tracked_step`).
    """
    dims = validate(model, config, dist.get_world_size())
    eligible = uses_bucketed_replicas(config, model)
    bucketed = eligible and not fsdp_only
    replicate = not bucketed and (config.zero_stage == 0 or (fsdp_only and eligible))
    meshes = build_meshes(dims, fsdp_replicate=replicate)
    # Tensor-parallel peers see the same tokens: their MoE layers fold, and routing statistics
    # reduce over one lane of every data shard (the world while tp = 1).
    report = convert(
        model,
        config.ep_size,
        ep_group=meshes.ep,
        balance=config.load_balancing,
        stats_group=meshes.stats_group,
        fold_group=meshes.tp_group,
    )
    tp_plan = apply_tensor_parallel(model, meshes.tp) if meshes.tp is not None else TPPlan()
    if config.activation_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ConfigError(f"{type(model).__name__} does not support activation checkpointing")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.recompute_expert_activation:
        for _, site in moe_sites(model):
            site.recompute_activation = True
    replicated, owned = apply_data_parallel(model, config, dims, meshes, bucketed=bucketed)
    model.autoep = ParallelState(config, dims, meshes, report, tp_plan, replicated, owned)
    return model.autoep
