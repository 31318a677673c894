"""Family adapters: how to recognise a HF MoE block and describe it as a :class:`MoESpec`.

An adapter is declarative: the block class names it matches, the names of the
block's children, and a function that reads the routing rule from the model's
HF config. Adding a family (or a custom in-house block) is one
:func:`register_family` call; see ``docs/adding-a-family.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from autoep.moe.experts import ExpertLayout
from autoep.moe.router import RouterConfig
from autoep.moe.spec import MoESpec

RouterFromConfig = Callable[[Any, int], RouterConfig]
"""``(hf_text_config, num_experts) -> RouterConfig``."""


def _swiglu_layout(experts: nn.Module, config: Any) -> ExpertLayout:
    return ExpertLayout("swiglu")


@dataclass(frozen=True)
class FamilyAdapter:
    """Recognises one family's MoE block and turns it into a :class:`MoESpec`.

    The block must hold its experts as ``experts.gate_up_proj``/``experts.down_proj``
    (the transformers-5 fused layout) and its gate as a linear ``weight [E, D]``
    under ``router_attr``.
    """

    name: str
    block_classes: tuple[str, ...]
    router_config: RouterFromConfig
    model_types: tuple[str, ...] = ()
    router_attr: str = "gate"
    shared_attr: str | None = None
    shared_gate_attr: str | None = None
    returns_router_scores: bool = False
    layout: Callable[[nn.Module, Any], ExpertLayout] = field(default=_swiglu_layout)
    disk_experts: tuple[str, str, str] | None = None
    """Per-expert checkpoint names of (gate, up, down), e.g. ``("w1", "w3", "w2")``; ``None``: stored fused."""
    disk_block_name: str | None = None
    """The block's name in checkpoints when it differs from the module's (Mixtral: ``block_sparse_moe``)."""

    def matches(self, module: nn.Module) -> bool:
        return type(module).__name__ in self.block_classes

    def describe(self, block: nn.Module, config: Any) -> MoESpec:
        """Read the block's shapes from its tensors and its routing rule from ``config``."""
        experts = block.experts
        layout = self.layout(experts, config)
        num_experts = experts.gate_up_proj.shape[0]
        hidden = getattr(block, self.router_attr).weight.shape[1]
        gate_up_dim = 2 if layout.transposed else 1
        intermediate = experts.gate_up_proj.shape[gate_up_dim] // 2
        return MoESpec(
            family=self.name,
            router=self.router_config(config, num_experts),
            layout=layout,
            hidden_size=hidden,
            intermediate_size=intermediate,
            router_attr=self.router_attr,
            shared_attr=self.shared_attr,
            shared_gate_attr=self.shared_gate_attr,
            returns_router_scores=self.returns_router_scores,
            jitter_noise=float(getattr(config, "router_jitter_noise", 0.0) or 0.0),
        )


_REGISTRY: dict[str, FamilyAdapter] = {}


def register_family(adapter: FamilyAdapter) -> FamilyAdapter:
    """Add (or replace) a family adapter; later conversions will recognise its blocks."""
    _REGISTRY[adapter.name] = adapter
    return adapter


def unregister_family(name: str) -> None:
    """Remove a registered adapter (a no-op for an unknown name)."""
    _REGISTRY.pop(name, None)


def registered_families() -> dict[str, FamilyAdapter]:
    return dict(_REGISTRY)


def adapter_for(module: nn.Module) -> FamilyAdapter | None:
    for adapter in _REGISTRY.values():
        if adapter.matches(module):
            return adapter
    return None
