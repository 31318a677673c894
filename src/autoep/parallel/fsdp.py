"""ZeRO stages 0-3 through FSDP2 ``fully_shard``, with expert-aware gradient scaling.

Wrapping order: each MoE layer's experts on the expert mesh, then every
decoder layer on the dense mesh, then the root. Nested wrapping keeps the
expert parameters out of the decoder layer's FSDP group.

Gradient scaling (DESIGN.md): the objective is the mean over the ``dp`` ranks
of each rank's mean loss. Dense gradients are therefore averaged over ``dp``.
An expert's gradient already arrives on its owner **summed** over the EP
group by the all-to-all backward, so the reduction over its ``edp`` replicas
must divide by ``dp`` as well, not by ``edp``; both FSDP groups get the
gradient divide factor ``dp``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

from autoep.config import AutoEPConfig, ParallelDims, torch_dtype
from autoep.moe.sites import moe_sites
from autoep.parallel.groups import Meshes


def reshard_all(model: nn.Module) -> None:
    """Put every FSDP unit back in its sharded state.

    With ``reshard_after_forward=False`` (ZeRO 0-2), a forward without backward
    (evaluation under ``no_grad``) leaves the unsharded parameters registered
    on the modules. Anything that captures parameter objects or reads the
    state dict (an optimizer, a checkpoint, an export) must see the sharded
    ones, or its updates and reads go to buffers FSDP discards.
    """
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a HF model (by ``_no_split_modules``), the unit of FSDP wrapping."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    return layers


def odd_dtype_modules(unit: nn.Module, ignored: set[nn.Parameter]) -> list[nn.Module]:
    """Submodules of ``unit`` whose own trainable parameters are not in the unit's main dtype (most elements).

    FSDP2 needs one dtype per unit, and HF keeps some tensors in fp32 in a bf16 model (DeepSeek's and
    GLM-4-MoE's router weight): such modules become units of their own. Modules already sharded are skipped."""
    own: list[tuple[nn.Module, list[nn.Parameter]]] = []

    def visit(module: nn.Module) -> None:
        if module is not unit and isinstance(module, FSDPModule):
            return
        params = [p for p in module.parameters(recurse=False) if p.requires_grad and p not in ignored]
        own.append((module, params))
        for child in module.children():
            visit(child)

    visit(unit)
    sizes: dict[torch.dtype, int] = {}
    for _, params in own:
        for param in params:
            sizes[param.dtype] = sizes.get(param.dtype, 0) + param.numel()
    if len(sizes) < 2:
        return []
    main = max(sizes, key=sizes.__getitem__)
    return [m for m, params in own if m is not unit and params and all(p.dtype != main for p in params)]


def _shard_group_size(mesh: DeviceMesh) -> int:
    return mesh.size(-1)


def _configure_reduction(module: FSDPModule, mesh: DeviceMesh, divide_factor: int) -> None:
    module.set_gradient_divide_factor(float(divide_factor))
    # gloo has no AVG / PREMUL_SUM: reduce with SUM and divide afterwards. (With a
    # shard group of one rank FSDP divides locally and only all-reduces with SUM.)
    if dist.get_backend(mesh.get_group(mesh.ndim - 1)) == "gloo" and _shard_group_size(mesh) > 1:
        module.set_force_sum_reduction_for_comms(True)


def apply_fsdp(model: nn.Module, config: AutoEPConfig, dims: ParallelDims, meshes: Meshes) -> nn.Module:
    """Shard ``model`` (already converted) according to ``config.zero_stage``."""
    mp = MixedPrecisionPolicy(
        param_dtype=torch_dtype(config.mixed_precision.param_dtype),
        reduce_dtype=torch_dtype(config.mixed_precision.reduce_dtype),
    )
    # Selection biases held as (frozen) parameters, e.g. ERNIE 4.5's, stay whole on every rank:
    # aux-loss-free balancing updates them in place from global counts, identically everywhere.
    ignored = {b for _, site in moe_sites(model) if isinstance(b := site.selection_bias, nn.Parameter)}
    common = dict(mp_policy=mp, reshard_after_forward=config.zero_stage == 3, ignored_params=ignored or None)
    if config.cpu_offload:
        common["offload_policy"] = CPUOffloadPolicy()
    for _, site in moe_sites(model):
        experts = site.experts_module
        fully_shard(experts, mesh=meshes.expert_fsdp, **common)
        _configure_reduction(experts, meshes.expert_fsdp, dims.dp)
    for block in decoder_layers(model):
        for odd in odd_dtype_modules(block, ignored):
            fully_shard(odd, mesh=meshes.dense_fsdp, **common)
            _configure_reduction(odd, meshes.dense_fsdp, dims.dp)
        fully_shard(block, mesh=meshes.dense_fsdp, **common)
        _configure_reduction(block, meshes.dense_fsdp, dims.dp)
    for odd in odd_dtype_modules(model, ignored):
        fully_shard(odd, mesh=meshes.dense_fsdp, **common)
        _configure_reduction(odd, meshes.dense_fsdp, dims.dp)
    fully_shard(model, mesh=meshes.dense_fsdp, **{**common, "reshard_after_forward": False})
    _configure_reduction(model, meshes.dense_fsdp, dims.dp)
    return model
