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

from autoep.errors import UnsupportedModelError
from autoep.moe.experts import ExpertLayout
from autoep.moe.router import RouterConfig
from autoep.moe.spec import MoESpec, ZeroExpertOutput

RouterFromConfig = Callable[[Any, int], RouterConfig]
"""``(hf_text_config, num_experts) -> RouterConfig``."""


def _swiglu_layout(experts: nn.Module, config: Any) -> ExpertLayout:
    return ExpertLayout("swiglu")


def _config_jitter(config: Any) -> float:
    return float(getattr(config, "router_jitter_noise", 0.0) or 0.0)


def _expert_sizes(experts: nn.Module, layout: ExpertLayout) -> tuple[int, int]:
    """``(real experts, intermediate size)`` from the expert tensors.

    The out-projection has one row block per real expert (LongCat sizes its
    in-projection for its zero experts too); DBRX's flattened tensors cannot
    say how many experts they hold, so its experts module does.
    """
    if layout.kind == "dbrx":
        num_experts = int(experts.num_experts)
        return num_experts, experts.mlp.w1.shape[0] // num_experts
    down = experts.down_proj
    return down.shape[0], down.shape[1] if layout.transposed else down.shape[2]


@dataclass(frozen=True)
class FamilyAdapter:
    """Recognises one family's MoE block and turns it into a :class:`MoESpec`.

    The block holds its experts under ``experts`` in one of the layouts of
    :class:`ExpertLayout` (by default the transformers-5 fused one,
    ``experts.gate_up_proj``/``experts.down_proj``) and its gate as a linear
    ``weight [E, D]`` under ``router_attr`` (or under ``router_attr.router_linear``).

    Optional behaviours, each the family's own semantics:

    * ``zero_expert_output``: the router scores more choices than there are
      real experts; the extra ones are zero-computation experts returning the
      input (``"identity"``) or nothing (``"zero"``), LongCat-Flash style.
    * ``weights_scale_input``: the routing weight scales the expert input, not
      its output (Llama 4).
    * ``returns_router_scores`` / ``returns_router_logits`` / ``flat_output``:
      what the block's forward returns (see :class:`MoESpec`).
    * ``jitter_noise``: reads the training-time multiplicative input noise from
      the config (``router_jitter_noise`` by default; 0 for blocks that ignore it).
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
    router_linear: str | None = None
    act_fn_attr: str = "experts.act_fn"
    zero_expert_output: ZeroExpertOutput | None = None
    weights_scale_input: bool = False
    returns_router_logits: bool = False
    flat_output: bool = False
    jitter_noise: Callable[[Any], float] = field(default=_config_jitter)

    def matches(self, module: nn.Module) -> bool:
        return type(module).__name__ in self.block_classes

    def gate_linear(self, block: nn.Module) -> nn.Module:
        """The module holding the block's gate ``weight [E (+ zero experts), D]``."""
        router = getattr(block, self.router_attr)
        return router if self.router_linear is None else getattr(router, self.router_linear)

    def describe(self, block: nn.Module, config: Any) -> MoESpec:
        """Read the block's shapes from its tensors and its routing rule from ``config``."""
        experts = block.experts
        layout = self.layout(experts, config)
        num_experts, intermediate = _expert_sizes(experts, layout)
        linear = self.gate_linear(block)
        choices, hidden = linear.weight.shape
        zero_experts = choices - num_experts
        if zero_experts and self.zero_expert_output is None:
            raise UnsupportedModelError(
                f"{self.name}: the router of {type(block).__name__} scores {choices} choices but it has "
                f"{num_experts} experts; set zero_expert_output if the extra ones are zero-computation experts"
            )
        in_rows = experts.get_parameter(layout.tensor_names[0]).shape[0] // layout.rows_per_expert(intermediate)
        return MoESpec(
            family=self.name,
            router=self.router_config(config, choices),
            layout=layout,
            hidden_size=hidden,
            intermediate_size=intermediate,
            router_attr=self.router_attr,
            shared_attr=self.shared_attr,
            shared_gate_attr=self.shared_gate_attr,
            returns_router_scores=self.returns_router_scores,
            jitter_noise=self.jitter_noise(config),
            router_linear=self.router_linear,
            router_linear_bias=self.router_linear is not None and getattr(linear, "bias", None) is not None,
            act_fn_attr=self.act_fn_attr,
            zero_experts=zero_experts,
            zero_expert_output=self.zero_expert_output or "identity",
            unused_in_rows=in_rows - num_experts,
            weights_scale_input=self.weights_scale_input,
            returns_router_logits=self.returns_router_logits,
            flat_output=self.flat_output,
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
