"""Expert capacity: cap the assignments each expert takes from a rank's micro-batch.

A dropped assignment keeps its slot in ``indices_TK`` with the sentinel id
``E`` (one past the last expert) and weight 0: dispatchers never send it, and
the token keeps its other choices (and the residual path) untouched.
"""

from __future__ import annotations

import math

import torch

from autoep.moe.balance import DropPolicy
from autoep.moe.grouping import count_ids


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """``ceil(capacity_factor · T·K / E)``: the most assignments one expert may keep."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


@torch.no_grad()
def keep_mask(
    indices_TK: torch.Tensor, priority_TK: torch.Tensor, num_experts: int, capacity: int, policy: DropPolicy
) -> torch.Tensor:
    """Boolean ``[T, K]``: which assignments survive the capacity of their expert.

    ``probs`` keeps each expert's ``capacity`` assignments of highest
    ``priority_TK`` (routing probability); ``position`` keeps those of the
    earliest tokens. Ties in probability go to the earlier token.
    """
    T, K = indices_TK.shape
    if policy == "probs":
        key_TK = priority_TK.float()
    else:
        key_TK = -torch.arange(T, device=indices_TK.device, dtype=torch.float32).unsqueeze(1).expand(T, K)
    # Stable sort by expert, then by descending key: the rank inside each expert's run decides.
    flat_expert = indices_TK.reshape(-1)
    order = torch.argsort(-key_TK.reshape(-1), stable=True)
    order = order[torch.argsort(flat_expert[order], stable=True)]
    sorted_expert = flat_expert[order]
    counts_E = count_ids(sorted_expert, num_experts + 1)  # + the sentinel id E of zero-expert choices
    starts_E = torch.cumsum(counts_E, dim=0) - counts_E
    rank_in_expert = torch.arange(order.numel(), device=order.device) - starts_E[sorted_expert]
    keep = torch.empty_like(flat_expert, dtype=torch.bool)
    keep[order] = rank_in_expert < capacity
    return keep.view(T, K)


def apply_capacity(
    indices_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    priority_TK: torch.Tensor,
    num_experts: int,
    capacity_factor: float,
    policy: DropPolicy,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop over-capacity assignments; returns ``(indices_TK, weights_TK, dropped_E)``.

    Dropped slots get id ``num_experts`` and weight 0; ``dropped_E`` counts the
    drops per expert (int64).
    """
    T, K = indices_TK.shape
    capacity = expert_capacity(T, K, num_experts, capacity_factor)
    keep_TK = keep_mask(indices_TK, priority_TK, num_experts, capacity, policy)
    dropped_E = count_ids(torch.where(keep_TK, num_experts, indices_TK), num_experts)
    indices_TK = torch.where(keep_TK, indices_TK, num_experts)
    weights_TK = torch.where(keep_TK, weights_TK, torch.zeros_like(weights_TK))
    return indices_TK, weights_TK, dropped_E
