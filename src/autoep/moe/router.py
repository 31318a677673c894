"""Top-k router covering the scoring rules of the supported HF families.

Scores are computed in fp32 whatever the activation dtype, so routing
decisions do not flip between bf16 and fp32 runs of the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

Scoring = Literal["softmax", "sigmoid", "topk_softmax"]
GroupScore = Literal["max", "top2_sum"]


@dataclass(frozen=True)
class RouterConfig:
    """Routing rule of one MoE block, read from the model's own HF config.

    scoring:
        ``softmax`` (Mixtral, Qwen, OLMoE, DeepSeek-V2), ``sigmoid``
        (DeepSeek-V3, GLM-4-MoE) or ``topk_softmax`` (GPT-OSS: top-k on the
        raw logits, then a softmax over the k chosen logits).
    norm_topk_prob:
        Renormalise the k chosen weights to sum to one.
    n_group / topk_group / group_score:
        Group-limited routing: experts are split into ``n_group`` groups, each
        group is scored (``max`` score for DeepSeek-V2, sum of the two best for
        DeepSeek-V3), and only the best ``topk_group`` groups stay eligible.
    use_correction_bias:
        A per-expert bias (``e_score_correction_bias``) added to the scores (the
        logits for ``topk_softmax``) for expert *selection only*; the combine
        weights use the unbiased scores. Native in DeepSeek-V3 and GLM-4-MoE;
        added to any family when aux-loss-free balancing is on.
    routed_scaling_factor:
        Multiplies the final combine weights.
    """

    num_experts: int
    top_k: int
    scoring: Scoring = "softmax"
    norm_topk_prob: bool = False
    n_group: int = 1
    topk_group: int = 1
    group_score: GroupScore = "max"
    use_correction_bias: bool = False
    routed_scaling_factor: float = 1.0
    router_bias: bool = False
    norm_eps: float = 0.0

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
        if self.n_group < 1 or self.num_experts % self.n_group:
            raise ValueError(f"n_group={self.n_group} must divide num_experts={self.num_experts}")
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")

    @property
    def group_limited(self) -> bool:
        return self.n_group > 1 and self.topk_group < self.n_group


class RouterOutput(NamedTuple):
    """What the router hands to the dispatcher.

    logits_TE: raw router logits (fp32), kept for auxiliary losses.
    weights_TK: fp32 combine weight of each chosen expert.
    indices_TK: global expert index of each choice.
    """

    logits_TE: torch.Tensor
    weights_TK: torch.Tensor
    indices_TK: torch.Tensor


class TopKRouter(nn.Module):
    """Linear gate plus the family's top-k selection rule.

    Parameter names (``weight``, ``bias``, ``e_score_correction_bias``) match the
    HF router modules, so state dicts keep their keys after conversion.
    """

    def __init__(self, config: RouterConfig, hidden_size: int) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.num_experts, hidden_size))
        self.bias = nn.Parameter(torch.zeros(config.num_experts)) if config.router_bias else None
        if config.use_correction_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(config.num_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        cfg = self.config
        bias = None if self.bias is None else self.bias.float()
        logits_TE = F.linear(x_TD.float(), self.weight.float(), bias)
        if cfg.scoring == "topk_softmax":
            with torch.no_grad():
                bias_E = self.e_score_correction_bias
                choice_TE = logits_TE if bias_E is None else logits_TE + bias_E
                indices_TK = torch.topk(choice_TE, cfg.top_k, dim=-1).indices
            weights_TK = torch.softmax(logits_TE.gather(1, indices_TK), dim=-1)
        else:
            scores_TE = torch.softmax(logits_TE, dim=-1) if cfg.scoring == "softmax" else torch.sigmoid(logits_TE)
            indices_TK = self._select(scores_TE)
            weights_TK = scores_TE.gather(1, indices_TK)
        if cfg.norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + cfg.norm_eps)
        if cfg.routed_scaling_factor != 1.0:
            weights_TK = weights_TK * cfg.routed_scaling_factor
        return RouterOutput(logits_TE, weights_TK, indices_TK)

    @torch.no_grad()
    def _select(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """Indices of the chosen experts; selection is not differentiated."""
        cfg = self.config
        choice_TE = scores_TE
        if self.e_score_correction_bias is not None:
            choice_TE = scores_TE + self.e_score_correction_bias.float()
        if cfg.group_limited:
            num_tokens = choice_TE.shape[0]
            grouped_TGe = choice_TE.view(num_tokens, cfg.n_group, -1)
            if cfg.group_score == "max":
                group_TG = grouped_TGe.max(dim=-1).values
            else:
                group_TG = grouped_TGe.topk(min(2, grouped_TGe.shape[-1]), dim=-1).values.sum(dim=-1)
            keep_TG = torch.zeros_like(group_TG, dtype=torch.bool)
            keep_TG.scatter_(1, group_TG.topk(cfg.topk_group, dim=-1).indices, True)
            keep_TE = keep_TG.unsqueeze(-1).expand_as(grouped_TGe).reshape(num_tokens, -1)
            choice_TE = choice_TE.masked_fill(~keep_TE, float("-inf"))
        return torch.topk(choice_TE, cfg.top_k, dim=-1).indices
