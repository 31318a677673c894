"""Description of one MoE block, produced by a family adapter."""

from __future__ import annotations

from dataclasses import dataclass

from autoep.moe.experts import ExpertLayout
from autoep.moe.router import RouterConfig


@dataclass(frozen=True)
class MoESpec:
    """Everything needed to build an :class:`~autoep.moe.MoELayer` equal to a HF block.

    The ``*_attr`` fields are the block's own child names; the converted layer
    registers its children under the same names so parameter keys do not change.
    """

    family: str
    router: RouterConfig
    layout: ExpertLayout
    hidden_size: int
    intermediate_size: int
    router_attr: str = "gate"
    shared_attr: str | None = None
    shared_gate_attr: str | None = None
    returns_router_scores: bool = False
    jitter_noise: float = 0.0

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    @property
    def scoring_name(self) -> str:
        """Short human-readable routing rule, for reports."""
        r = self.router
        parts = [r.scoring]
        if r.group_limited:
            parts.append(f"group {r.topk_group}/{r.n_group}")
        if r.use_correction_bias:
            parts.append("bias")
        if r.norm_topk_prob:
            parts.append("norm")
        if r.routed_scaling_factor != 1.0:
            parts.append(f"x{r.routed_scaling_factor:g}")
        return ", ".join(parts)


@dataclass(frozen=True)
class StandardExperts:
    """The layout of one standard experts module, read from its flags and tensor shapes.

    ``weights`` are the stacked ``[E, ...]`` tensors, in-projection first:
    ``gate_up_proj`` (gated) or ``up_proj``, then ``down_proj``, then their
    biases when ``has_bias``.
    """

    num_experts: int
    hidden_size: int
    intermediate_size: int
    has_gate: bool
    has_bias: bool
    is_transposed: bool
    weights: tuple[str, ...]

    @property
    def in_proj(self) -> str:
        return "gate_up_proj" if self.has_gate else "up_proj"

    @property
    def activation(self) -> str:
        return "gated (_apply_gate)" if self.has_gate else "act_fn"


@dataclass(frozen=True)
class ExpertsSpec:
    """One MoE block converted on the experts path: the family's block and router stay,
    only its standard experts module becomes expert-parallel.

    ``router_name`` is the router's path inside the block (``""``: the block
    itself emits the logits; ``None``: no router logits are known, so the
    balancing losses are unavailable). ``selection_bias_name`` is the block-relative
    name of the router's ``e_score_correction_bias``, where it has one.
    """

    family: str
    experts: StandardExperts
    experts_name: str = "experts"
    router_name: str | None = None
    logits_index: int = 0
    scoring: str = "softmax"
    selection_bias_name: str | None = None
    top_k: int = 0
    jitter_noise: float = 0.0

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    def gate_names(self, block) -> tuple[str, ...]:
        """Block-relative names of the router and any shared-expert gate (AdamW under Muon)."""
        names = [self.router_name] if self.router_name else []
        names += [n for n, _ in block.named_children() if "gate" in n and n not in names and n != self.experts_name]
        return tuple(names)

    @property
    def scoring_name(self) -> str:
        parts = [f"{self.family} router", self.scoring]
        if self.selection_bias_name:
            parts.append("bias")
        return ", ".join(parts)
