"""Top-k router covering the scoring rules of the supported HF families.

The gate's logits are computed in the dtype the family's own router uses
(``RouterConfig.logits_dtype``): a bf16 Mixtral or Qwen3-MoE computes them in
bf16 and an equal logit pair then ties, exactly as in transformers, while
DeepSeek-V3 computes them in fp32. Scores, selection and combine weights are
fp32 from there on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

Scoring = Literal["softmax", "sigmoid", "topk_softmax", "topk_sigmoid"]
SIGMOID_SCORINGS = ("sigmoid", "topk_sigmoid")
"""Scorings whose per-expert probabilities are sigmoids (for the balancing losses and the ``probs`` drop policy)."""
GroupScore = Literal["max", "top2_sum"]
LogitsDtype = Literal["float32", "input"]


@dataclass(frozen=True)
class RouterConfig:
    """Routing rule of one MoE block, read from the model's own HF config.

    scoring:
        ``softmax`` (Mixtral, Qwen, OLMoE, DeepSeek-V2), ``sigmoid``
        (DeepSeek-V3, GLM-4-MoE), ``topk_softmax`` (GPT-OSS: top-k on
        the raw logits, then a softmax over the k chosen logits) or
        ``topk_sigmoid`` (Llama 4: top-k on the raw logits, then the sigmoid of
        each chosen logit).
    norm_topk_prob:
        Renormalise the k chosen weights to sum to one.
    norm_p:
        With ``norm_topk_prob``, divide by the ``p``-norm of the k weights
        instead of their sum (DBRX's ``moe_normalize_expert_weights``).
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
    logits_dtype:
        ``float32``: the gate runs on fp32 casts of its input and weight
        (DeepSeek, GLM-4-MoE, LongCat). ``input``: in the activation dtype, as
        ``F.linear(hidden_states, weight)`` does in Mixtral, Qwen, OLMoE,
        GPT-OSS, Llama 4 and DBRX; the logits are cast to fp32 afterwards. The
        two differ only below fp32, where a bf16 logit pair that rounds equal
        ties, and the tie must break as the family's own router breaks it.
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
    norm_p: float | None = None
    logits_dtype: LogitsDtype = "float32"

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
    HF router modules, so state dicts keep their keys after conversion. Routers
    whose gate is a child linear (DBRX's ``router.layer``, LongCat's
    ``router.classifier``) get the same child under ``linear_name``; its bias is
    kept when ``linear_bias`` (LongCat declares one) but only added to the
    logits when ``config.router_bias`` says the family uses it.
    """

    def __init__(
        self, config: RouterConfig, hidden_size: int, linear_name: str | None = None, linear_bias: bool = False
    ) -> None:
        super().__init__()
        self.config = config
        self._linear_name = linear_name
        has_bias = config.router_bias or linear_bias
        if linear_name is None:
            self.weight = nn.Parameter(torch.empty(config.num_experts, hidden_size))
            self.bias = nn.Parameter(torch.zeros(config.num_experts)) if has_bias else None
        else:
            self.add_module(linear_name, nn.Linear(hidden_size, config.num_experts, bias=has_bias))
        if config.use_correction_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(config.num_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    @property
    def gate_linear(self) -> nn.Module:
        """The module holding the gate's ``weight`` (and ``bias``): this router or its linear child."""
        return self if self._linear_name is None else self._modules[self._linear_name]

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        cfg = self.config
        linear = self.gate_linear
        dtype = torch.float32 if cfg.logits_dtype == "float32" else x_TD.dtype
        bias = linear.bias.to(dtype) if cfg.router_bias else None
        logits_TE = F.linear(x_TD.to(dtype), linear.weight.to(dtype), bias).float()
        if cfg.scoring in ("topk_softmax", "topk_sigmoid"):
            with torch.no_grad():
                bias_E = self.e_score_correction_bias
                choice_TE = logits_TE if bias_E is None else logits_TE + bias_E
                indices_TK = torch.topk(choice_TE, cfg.top_k, dim=-1).indices
            chosen_TK = logits_TE.gather(1, indices_TK)
            weights_TK = torch.softmax(chosen_TK, dim=-1) if cfg.scoring == "topk_softmax" else torch.sigmoid(chosen_TK)
        else:
            scores_TE = torch.softmax(logits_TE, dim=-1) if cfg.scoring == "softmax" else torch.sigmoid(logits_TE)
            indices_TK = self._select(scores_TE)
            weights_TK = scores_TE.gather(1, indices_TK)
        if cfg.norm_topk_prob:
            weights_TK = weights_TK / self._norm(weights_TK)
        if cfg.routed_scaling_factor != 1.0:
            weights_TK = weights_TK * cfg.routed_scaling_factor
        return RouterOutput(logits_TE, weights_TK, indices_TK)

    def _norm(self, weights_TK: torch.Tensor) -> torch.Tensor:
        """What the k weights are divided by: their sum (+ eps), or their p-norm."""
        cfg = self.config
        if cfg.norm_p is not None:
            return torch.norm(weights_TK, p=cfg.norm_p, dim=-1, keepdim=True)  # DBRX's own call
        return weights_TK.sum(dim=-1, keepdim=True) + cfg.norm_eps

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
