"""Tensor parallelism for the dense path of a HF MoE model, on torch's own TP (DTensor).

The plan comes from the model's ``config.base_model_tp_plan``, the same one
``transformers`` uses, so no per-family table lives here. Only the styles with
an unambiguous torch equivalent are applied ('colwise', 'rowwise',
'replicated_with_grad_allreduce'); a block (an attention module, an MLP, a
shared-expert MLP) that needs anything else stays replicated, which is always
correct, just not sharded. Routed experts are never touched: autoep's own
expert-parallel layer owns them.

Activations between blocks stay replicated on every tp rank (ColwiseParallel
takes a replicated input and all-reduces its gradient; RowwiseParallel
all-reduces its output), so every parameter outside the plan sees identical,
full gradients on every tp rank.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from autoep.errors import ConfigError

_COLWISE, _ROWWISE, _GRAD_ALLREDUCE = "colwise", "rowwise", "replicated_with_grad_allreduce"
SUPPORTED_STYLES = (_COLWISE, _ROWWISE, _GRAD_ALLREDUCE)


def _sum_partial_grad(grad: torch.Tensor) -> torch.Tensor:
    """Turn a ``Partial`` gradient (this rank's heads' share) into the replicated total."""
    if isinstance(grad, DTensor) and any(p.is_partial() for p in grad.placements):
        return grad.redistribute(placements=[Replicate()] * grad.device_mesh.ndim)
    return grad


class ReplicatedWithGradAllReduce(ParallelStyle):
    """A module with replicated weights that sees only this rank's heads (e.g. Qwen3's per-head q_norm).

    It sits between a colwise and a rowwise projection, so its input is the local
    ``[..., heads_local, head_dim]`` slice and its weight gradient is only this
    rank's share. Running it on a head-sharded DTensor with ``Replicate()`` weights
    makes DTensor autograd produce that share as a ``Partial`` gradient (as for
    torch's SequenceParallel); a gradient hook sums it over the tp group so that
    ``.grad`` is ``Replicate()`` like the weight, and optimizers and norms never
    see a pending reduction. (FSDP2 swaps in its own parameter objects, dropping
    the hook, and redistributes gradients to the parameter's placements itself.)
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh, self._replicate_params, self._prepare_input, self._prepare_output)

    @staticmethod
    def _replicate_params(name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
        for p_name, param in list(module.named_parameters(recurse=False)):
            replicated = nn.Parameter(
                distribute_tensor(param.detach(), device_mesh, [Replicate()]), requires_grad=param.requires_grad
            )
            if replicated.requires_grad:
                replicated.register_hook(_sum_partial_grad)
            module.register_parameter(p_name, replicated)

    @staticmethod
    def _prepare_input(module: nn.Module, inputs: tuple[Any, ...], device_mesh: DeviceMesh) -> tuple[Any, ...]:
        x, *rest = inputs
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, device_mesh, [Shard(x.dim() - 2)], run_check=False)
        return (x, *rest)

    @staticmethod
    def _prepare_output(module: nn.Module, outputs: Any, device_mesh: DeviceMesh) -> Any:
        return outputs.to_local() if isinstance(outputs, DTensor) else outputs


def _make_style(style: str) -> ParallelStyle:
    if style == _COLWISE:
        return ColwiseParallel()
    if style == _ROWWISE:
        return RowwiseParallel()
    return ReplicatedWithGradAllReduce()


@dataclass
class TPPlan:
    """Which modules get which tensor-parallel style, and which blocks stay replicated and why."""

    styles: dict[str, ParallelStyle] = field(default_factory=dict)
    style_names: dict[str, str] = field(default_factory=dict)  # module -> plan string, for reports
    replicated_blocks: dict[str, str] = field(default_factory=dict)  # block -> reason

    def blocks(self) -> list[str]:
        """The blocks that are sharded (parents of the planned modules), in model order."""
        return list(dict.fromkeys(name.rpartition(".")[0] for name in self.style_names))

    def __str__(self) -> str:
        def summarise(names: list[str]) -> str:
            # model.layers.0.self_attn, model.layers.1.self_attn -> model.layers.*.self_attn (x2)
            groups = defaultdict(list)
            for name in names:
                groups[re.sub(r"\.\d+(?=\.|$)", ".*", name)].append(name)
            return ", ".join(f"{pattern} (x{len(g)})" if len(g) > 1 else g[0] for pattern, g in groups.items())

        lines = [f"tensor parallel: {len(self.style_names)} modules sharded"]
        if self.style_names:
            lines.append(f"  sharded blocks: {summarise(self.blocks())}")
        reasons = defaultdict(list)
        for block, reason in self.replicated_blocks.items():
            reasons[reason].append(block)
        for reason, blocks in reasons.items():
            lines.append(f"  replicated: {summarise(blocks)}: {reason}")
        return "\n".join(lines)


def _base_prefix(model: nn.Module) -> str:
    """The attribute path of the base model the HF plan is relative to ('model' for *ForCausalLM)."""
    prefix = getattr(model, "base_model_prefix", "")
    return f"{prefix}." if prefix and isinstance(getattr(model, prefix, None), nn.Module) else ""


def _hf_plan(model: nn.Module) -> dict[str, str]:
    config = getattr(model, "config", None)
    return dict(getattr(config, "base_model_tp_plan", None) or {})


def _is_expert_path(name: str) -> bool:
    # Routed experts belong to autoep's expert-parallel layer ('shared_experts' is a different atom).
    return "experts" in name.split(".")


def _uncovered_params(block: nn.Module, planned: set[str]) -> str | None:
    """A child (or the block itself) holding parameters no plan entry accounts for, if any.

    Such a module would see this rank's local heads or features with plain weights
    and silently get a partial gradient (e.g. GLM4-MoE's optional q_norm, GPT-OSS sinks).
    """
    if next(block.parameters(recurse=False), None) is not None:
        return "the block's own parameters"
    for child_name, child in block.named_children():
        if child_name not in planned and next(child.parameters(), None) is not None:
            return child_name
    return None


def dense_tp_plan(model: nn.Module) -> TPPlan:
    """The tensor-parallel plan of ``model``'s dense path, from its HF ``base_model_tp_plan``.

    Keys are fully qualified module names of ``model``. Routed experts and plan
    entries naming absent modules are skipped; a block with any entry we do not
    support stays replicated as a whole (recorded with the reason), since sharding
    half a block would be wrong.
    """
    prefix = _base_prefix(model)
    modules = dict(model.named_modules())
    by_block: dict[str, dict[str, str]] = defaultdict(dict)  # block -> {child: style}
    for pattern, style in _hf_plan(model).items():
        if _is_expert_path(pattern):
            continue
        regex = re.compile(re.escape(prefix + pattern).replace(r"\*", r"[^.]+"))
        for name in modules:
            if regex.fullmatch(name) and not _is_expert_path(name):
                block, _, child = name.rpartition(".")
                by_block[block][child] = style

    plan = TPPlan()
    order = {name: i for i, name in enumerate(modules)}
    for block_name in sorted(by_block, key=order.__getitem__):
        entries = by_block[block_name]
        block = modules[block_name]
        reason = None
        unsupported = sorted({s for s in entries.values() if s not in SUPPORTED_STYLES})
        uncovered = _uncovered_params(block, set(entries))
        styles_used = set(entries.values())
        if unsupported:
            reason = f"unsupported tp style {', '.join(repr(s) for s in unsupported)}"
        elif uncovered is not None:
            reason = f"{uncovered} has parameters but no tp plan entry"
        elif not {_COLWISE, _ROWWISE} <= styles_used:
            reason = "needs both a colwise and a rowwise entry"
        else:
            for child, style in entries.items():
                if style in (_COLWISE, _ROWWISE) and not isinstance(getattr(block, child), nn.Linear):
                    reason = f"{style} on {child}, which is a {type(getattr(block, child)).__name__}, not nn.Linear"
                    break
        if reason is not None:
            plan.replicated_blocks[block_name] = reason
            continue
        for child, style in entries.items():
            plan.styles[f"{block_name}.{child}"] = _make_style(style)
            plan.style_names[f"{block_name}.{child}"] = style
    return plan


def _is_attention(block: nn.Module, name: str) -> bool:
    return hasattr(block, "head_dim") or "attn" in name.rpartition(".")[2] or "attention" in name.rpartition(".")[2]


def validate_tensor_parallel(model: nn.Module, tp_size: int) -> TPPlan:
    """Check that ``tp_size`` divides every dimension the plan shards; the plan, or ConfigError.

    Pure and rank-local (no collective), so every rank fails identically before
    any communication.
    """
    if tp_size < 1:
        raise ConfigError(f"tensor parallel size must be >= 1, got {tp_size}")
    plan = dense_tp_plan(model)
    if tp_size == 1:
        return plan
    config = model.config
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    for block_name in plan.blocks():
        block = model.get_submodule(block_name)
        if not _is_attention(block, block_name):
            continue
        for what, count in (("num_attention_heads", heads), ("num_key_value_heads", kv_heads)):
            if count is None or count % tp_size:
                raise ConfigError(
                    f"tp_size {tp_size} does not divide {what}={count} of {block_name}; "
                    "choose a tp_size that divides the number of heads"
                )
    for name, style in plan.style_names.items():
        linear = model.get_submodule(name)
        if style == _COLWISE and linear.out_features % tp_size:
            raise ConfigError(f"tp_size {tp_size} does not divide out_features={linear.out_features} of colwise {name}")
        if style == _ROWWISE and linear.in_features % tp_size:
            raise ConfigError(f"tp_size {tp_size} does not divide in_features={linear.in_features} of rowwise {name}")
    return plan


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> TPPlan:
    """Shard ``model``'s dense path over the 1-D ``tp_mesh`` in place (after `autoep.convert`).

    Validates first, then hands the plan to ``parallelize_module``. With a mesh
    of size 1 the model is left as it is.
    """
    if tp_mesh.ndim != 1:
        raise ConfigError(f"tensor parallelism needs a 1-D mesh, got {tp_mesh.ndim} dimensions")
    plan = validate_tensor_parallel(model, tp_mesh.size())
    if tp_mesh.size() == 1:
        return TPPlan()
    if plan.styles:
        parallelize_module(model, tp_mesh, plan.styles)
    return plan
