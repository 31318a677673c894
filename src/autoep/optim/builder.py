"""`build_optimizer`: AdamW or Muon, with weight-decay groups, safe for mixed DTensor meshes.

Parameters are grouped by (weight decay or not, device mesh): biases and
norm weights (fewer than 2 dims) get no weight decay, and dense and expert
parameters, which live on different meshes, never share a foreach kernel.
The grouping uses names and shapes only, so applying it to the unconverted
model gives the same groups as on the converted, sharded one.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from autoep.config import AutoEPConfig, torch_dtype
from autoep.errors import ConfigError
from autoep.moe.sites import moe_sites
from autoep.optim.muon import Muon, check_muon_placements
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


def _gate_prefixes(model: nn.Module) -> list[str]:
    """Name prefixes of router gates and shared-expert gates, converted or not."""
    from autoep.convert import find_convertible_blocks
    from autoep.moe.spec import ExpertsSpec

    prefixes = [f"{path}.{name}." for path, site in moe_sites(model) for name in site.gate_names]
    if prefixes:
        return prefixes
    for path, block, spec in find_convertible_blocks(model)[0]:
        if isinstance(spec, ExpertsSpec):
            names = spec.gate_names(block)
        else:
            names = [a for a in (spec.router_attr, spec.shared_gate_attr) if a and hasattr(block, a)]
        prefixes += [f"{path}.{name}." for name in names]
    return prefixes


def muon_split(model: nn.Module, adamw_patterns: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """Names of the parameters Muon updates, and of those AdamW updates.

    AdamW: fewer than 2 dims (norms, biases), input and output embeddings, router
    and shared-expert gates, and names matching ``adamw_patterns`` (globs).
    Everything else must be a matrix or an ``[E, A, B]`` expert stack with dim-0
    sharding; anything else raises a :class:`ConfigError` that lists it.
    """
    embeddings = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if module is not None:
            embeddings |= {id(p) for p in module.parameters()}
    gates = _gate_prefixes(model)
    muon, adamw, problems = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if (
            param.ndim < 2
            or id(param) in embeddings
            or any(name.startswith(prefix) for prefix in gates)
            or any(fnmatch.fnmatch(name, pattern) for pattern in adamw_patterns)
        ):
            adamw.append(name)
            continue
        problem = check_muon_placements(param)
        if problem is not None:
            problems.append(f"{name}: {problem}")
        muon.append(name)
    if problems:
        raise ConfigError(
            "Muon cannot update these parameters as configured: "
            + "; ".join(problems)
            + ". Route them to AdamW with optimizer.params.adamw_params (glob patterns)."
        )
    return muon, adamw


def _build_muon(model: nn.Module, params: dict[str, Any]) -> Muon:
    params = dict(params)
    patterns = tuple(params.pop("adamw_params", ()))
    muon_names, adamw_names = muon_split(model, patterns)
    named = dict(model.named_parameters())
    if "ns_dtype" in params:
        params["ns_dtype"] = torch_dtype(params["ns_dtype"])
    if "adamw_betas" in params:
        params["adamw_betas"] = tuple(params["adamw_betas"])
    params.setdefault("adamw_lr", params.get("lr", 0.02))
    groups = [{"params": [named[n] for n in muon_names], "use_muon": True}]
    groups.append({"params": [named[n] for n in adamw_names], "use_muon": False})
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(
            f"autoep: Muon updates {len(muon_names)} tensors "
            f"({sum(named[n].numel() for n in muon_names):,} parameters); AdamW updates "
            f"{len(adamw_names)} ({sum(named[n].numel() for n in adamw_names):,}): embeddings, head, norms, "
            "biases, router gates",
            flush=True,
        )
    return Muon(groups, **params)


def build_optimizer(model: nn.Module, config: AutoEPConfig) -> torch.optim.Optimizer:
    """The optimizer ``config.optimizer`` describes: AdamW (torch's fused kernel) or Muon.

    Fused AdamW is one kernel per tensor on CUDA and on CPU alike; on CPU it steps
    about 7x faster than the foreach implementation (benchmarks/results/peer_compare_cpu*.txt)."""
    reshard_all(model)  # the optimizer must hold the sharded parameters
    if config.optimizer.type == "Muon":
        return _build_muon(model, config.optimizer.params)
    params = dict(config.optimizer.params)
    weight_decay = float(params.pop("weight_decay", 0.0))
    if "betas" in params:
        params["betas"] = tuple(params["betas"])
    return torch.optim.AdamW(param_groups(model, weight_decay), **params, fused=True)
