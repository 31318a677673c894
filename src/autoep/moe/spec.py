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
