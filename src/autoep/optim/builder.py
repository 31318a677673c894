"""`build_optimizer`: AdamW with weight-decay groups, safe for mixed DTensor meshes.

Parameters are grouped by (weight decay or not, device mesh): biases and
norm weights (fewer than 2 dims) get no weight decay, and dense and expert
parameters, which live on different meshes, never share a foreach kernel.
The grouping uses names and shapes only, so applying it to the unconverted
model gives the same groups as on the converted, sharded one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from autoep.config import AutoEPConfig
from autoep.parallel.fsdp import reshard_all


def _no_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim < 2 or name.endswith(".bias")


def _mesh_key(param: nn.Parameter) -> Any:
    return id(param.device_mesh) if isinstance(param, DTensor) else None


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split into weight-decay groups, one per device mesh."""
    groups: dict[tuple[bool, Any], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault((_no_decay(name, param), _mesh_key(param)), []).append(param)
    return [
        {"params": params, "weight_decay": 0.0 if no_decay else weight_decay}
        for (no_decay, _), params in groups.items()
    ]


def build_optimizer(model: nn.Module, config: AutoEPConfig) -> torch.optim.Optimizer:
    """The optimizer ``config.optimizer`` describes (AdamW), fused on CUDA and foreach elsewhere."""
    reshard_all(model)  # the optimizer must hold the sharded parameters
    params = dict(config.optimizer.params)
    weight_decay = float(params.pop("weight_decay", 0.0))
    if "betas" in params:
        params["betas"] = tuple(params["betas"])
    on_cuda = any(p.is_cuda for p in model.parameters())
    implementation = {"fused": True} if on_cuda else {"foreach": True}
    return torch.optim.AdamW(param_groups(model, weight_decay), **params, **implementation)
