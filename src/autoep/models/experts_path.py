"""Find the MoE blocks that take the experts path, and describe each as an :class:`ExpertsSpec`.

A block takes the experts path when one of its children is a standard
transformers experts module (:mod:`autoep.models.hf_experts`) and no family
adapter claims the block. Everything else about the block is read from what
transformers itself declares: the router is the module the model class names
for ``router_logits`` in ``_can_record_outputs`` (with the output index of the
logits), and the selection bias is the router's ``e_score_correction_bias``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from autoep.models.hf_experts import describe_standard_experts, looks_like_experts, refusal_reason
from autoep.models.hf_outputs import router_logit_recorders
from autoep.moe.spec import ExpertsSpec, StandardExperts


def _inside(path: str, prefixes: list[str]) -> bool:
    return any(path == p or path.startswith(p + ".") for p in prefixes)


def _find_router(block_path: str, block: nn.Module, experts_name: str, recorders) -> tuple[str | None, int]:
    for name, module in block.named_modules():
        if name == experts_name or name.startswith(experts_name + "."):
            continue
        for spec in recorders:
            if not isinstance(module, spec.target_class):
                continue
            full = f"{block_path}.{name}" if name else block_path
            if spec.layer_name is not None and not full.endswith(spec.layer_name):
                continue
            return name, spec.index
    return None, 0


def _find_selection_bias(block: nn.Module, experts_name: str, num_experts: int) -> str | None:
    for name, tensor in [*block.named_buffers(), *block.named_parameters()]:
        if name.startswith(experts_name + "."):
            continue
        if name.rpartition(".")[2] == "e_score_correction_bias" and tensor.numel() == num_experts:
            return name
    return None


def _top_k(config: Any, block: nn.Module, router: nn.Module | None) -> int:
    for owner, attr in ((router, "top_k"), (block, "top_k"), (config, "num_experts_per_tok"), (config, "top_k")):
        value = getattr(owner, attr, None) if owner is not None else None
        if isinstance(value, int) and value > 0:
            return value
    return 0


def _scoring(config: Any, has_bias: bool) -> str:
    """The score function the balancing losses use: the config's ``scoring_func`` when it names one,
    sigmoid for routers with a selection bias (DeepSeek-V3 style), softmax otherwise (HF's own aux loss)."""
    declared = getattr(config, "scoring_func", None)
    if declared in ("softmax", "sigmoid"):
        return declared
    return "sigmoid" if has_bias else "softmax"


def describe_block(
    model: nn.Module, block_path: str, block: nn.Module, experts_name: str, layout: StandardExperts
) -> ExpertsSpec:
    experts = block.get_submodule(experts_name)
    config = getattr(experts, "config", None) or getattr(block, "config", None) or getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    router_name, index = _find_router(block_path, block, experts_name, router_logit_recorders(model))
    router = block.get_submodule(router_name) if router_name else None
    bias_name = _find_selection_bias(block, experts_name, layout.num_experts)
    return ExpertsSpec(
        family=str(getattr(config, "model_type", None) or type(block).__name__),
        experts=layout,
        experts_name=experts_name,
        router_name=router_name,
        logits_index=index,
        scoring=_scoring(config, bias_name is not None),
        selection_bias_name=bias_name,
        top_k=_top_k(config, block, router),
        jitter_noise=float(getattr(config, "router_jitter_noise", 0.0) or 0.0),
    )


def find_experts_path_blocks(
    model: nn.Module, claimed: list[str]
) -> tuple[list[tuple[str, nn.Module, ExpertsSpec]], list[tuple[str, str]]]:
    """Blocks outside ``claimed`` (paths of dedicated-adapter blocks) that hold routed experts.

    Returns ``(convertible, refused)``: ``(block path, block, spec)`` for each
    standard experts module, and ``(experts path, reason)`` for each module
    that looks like routed experts but cannot take the experts path.
    """
    convertible, refused = [], []
    for path, module in model.named_modules():
        if not path or _inside(path, claimed) or _inside(path, [p for p, _, _ in convertible]):
            continue
        layout = describe_standard_experts(module)
        if isinstance(layout, StandardExperts):
            block_path, _, name = path.rpartition(".")
            block = model.get_submodule(block_path)
            convertible.append((block_path, block, describe_block(model, block_path, block, name, layout)))
        elif layout is not None or looks_like_experts(path, module):
            if not _inside(path, [p for p, _ in refused]):
                block = type(model.get_submodule(path.rpartition(".")[0])).__name__
                refused.append((path, f"{refusal_reason(module)} (in {block})"))
    return convertible, refused
