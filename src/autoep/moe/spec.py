"""Description of one MoE block, produced by a family adapter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from autoep.moe.experts import ExpertLayout
from autoep.moe.router import RouterConfig

ZeroExpertOutput = Literal["identity", "zero"]
"""What a zero-computation expert returns for its rows: the input itself, or nothing."""


@dataclass(frozen=True)
class MoESpec:
    """Everything needed to build an :class:`~autoep.moe.MoELayer` equal to a HF block.

    The ``*_attr`` fields are the block's own child names; the converted layer
    registers its children under the same names so parameter keys do not change.

    ``router_linear``: the router's gate is a linear child of that name (DBRX
    ``layer``, LongCat ``classifier``) rather than the router's own ``weight``;
    ``router_linear_bias``: that linear holds a bias (kept for its key, used
    only if ``router.router_bias``). ``act_fn_attr``: where the experts'
    activation module lives in the block.

    ``zero_experts``: the router scores ``num_experts + zero_experts`` choices;
    the last ``zero_experts`` are zero-computation experts (LongCat-Flash) that
    return ``zero_expert_output`` for their rows, computed where the token
    lives on every rank, never dispatched. ``unused_in_rows``: rows the HF
    in-projection allocates past the real experts and never reads (LongCat
    sizes ``gate_up_proj`` for the zero experts too); the converted layer holds
    only the real experts' rows and exports these as zeros.

    ``weights_scale_input``: the routing weight multiplies the expert's *input*
    rows, and expert outputs are summed unweighted (Llama 4); otherwise it
    multiplies the output. ``returns_router_scores`` / ``returns_router_logits``:
    the block returns ``(out, weights)`` (GPT-OSS) / ``(out, router_logits)``
    (Llama 4); ``flat_output``: ``out`` is ``[T, D]`` rows, not the input's shape.
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
    router_linear: str | None = None
    router_linear_bias: bool = False
    act_fn_attr: str = "experts.act_fn"
    zero_experts: int = 0
    zero_expert_output: ZeroExpertOutput = "identity"
    unused_in_rows: int = 0
    weights_scale_input: bool = False
    returns_router_logits: bool = False
    flat_output: bool = False

    def __post_init__(self) -> None:
        if self.returns_router_scores and self.returns_router_logits:
            raise ValueError("a block returns either its router scores or its router logits, not both")
        if not 0 <= self.zero_experts < self.router.num_experts:
            raise ValueError(
                f"zero_experts={self.zero_experts} must leave some real experts among {self.router.num_experts}"
            )

    @property
    def num_experts(self) -> int:
        """Real (routed, expert-parallel) experts; zero-computation experts are not counted."""
        return self.router.num_experts - self.zero_experts

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
            parts.append("norm" if r.norm_p is None else f"norm p={r.norm_p:g}")
        if r.routed_scaling_factor != 1.0:
            parts.append(f"x{r.routed_scaling_factor:g}")
        if self.zero_experts:
            parts.append(f"+{self.zero_experts} zero experts")
        if self.weights_scale_input:
            parts.append("weights scale input")
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
