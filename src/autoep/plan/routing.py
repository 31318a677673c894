"""Routing counts a simulation supplies to the dispatchers (:class:`autoep.moe.dispatch.RoutingPlanner`).

A fake process group carries no data, so the token-to-expert assignments a real
step would produce are planned instead:

* :class:`PlannedRouting`: every source rank routes alike; expert 0 (on EP rank
  0, the simulated rank) gets ``imbalance`` times the mean share of the
  assignments and the other experts split the rest evenly. ``imbalance=1`` is
  balanced routing.
* :class:`RecordedRouting`: the counts a real run measured, per layer, to check
  the simulation against that run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from autoep.moe.dispatch import PlannedCounts


def _rows_hitting(num_tokens: int, top_k: int, share: float, balanced_hit: float | None) -> int:
    """Tokens with at least one of their ``top_k`` choices in a set of experts holding ``share`` of them.

    A token goes once to a rank however many of its choices live there. Balanced,
    the exact probability for ``top_k`` distinct experts is used; otherwise choices are
    treated as independent draws (``1 - (1 - share)^k``).
    """
    hit = balanced_hit if balanced_hit is not None else 1.0 - (1.0 - min(share * 1.0, 1.0)) ** top_k
    return min(num_tokens, round(num_tokens * hit))


def _balanced_hit(num_experts: int, local: int, top_k: int) -> float:
    """P(a token's ``top_k`` distinct uniform experts include one of ``local`` given experts)."""
    if num_experts - local < top_k:
        return 1.0
    return 1.0 - math.comb(num_experts - local, top_k) / math.comb(num_experts, top_k)


@dataclass(frozen=True)
class PlannedRouting:
    """Uniform routing with expert 0 carrying ``imbalance`` x the mean load (1.0: balanced)."""

    imbalance: float = 1.0

    def shares(self, num_experts: int) -> list[float]:
        """Fraction of all assignments each expert receives."""
        hot = min(self.imbalance, float(num_experts)) / num_experts
        rest = (1.0 - hot) / max(num_experts - 1, 1)
        return [hot] + [rest] * (num_experts - 1)

    def __call__(
        self, num_tokens: int, top_k: int, ep_size: int, ep_rank: int, num_local_experts: int
    ) -> PlannedCounts:
        E = num_local_experts * ep_size
        shares = self.shares(E)
        balanced = self.imbalance == 1.0
        hit = _balanced_hit(E, num_local_experts, top_k) if balanced else None

        def rank_share(r: int) -> float:
            return sum(shares[r * num_local_experts : (r + 1) * num_local_experts])

        send = tuple(_rows_hitting(num_tokens, top_k, rank_share(r), hit) for r in range(ep_size))
        # Every source rank routes alike, so this rank receives from each what it sends to itself.
        recv = (send[ep_rank],) * ep_size
        mine = shares[ep_rank * num_local_experts : (ep_rank + 1) * num_local_experts]
        per_source = _split(num_tokens * top_k, mine, rank_share(ep_rank))
        experts = tuple(n * ep_size for n in per_source)
        return PlannedCounts(send, recv, experts)


def _split(total_assignments: int, shares: list[float], share_sum: float) -> list[int]:
    """Integer assignments per expert, proportional to ``shares`` of ``total_assignments`` overall."""
    wanted = total_assignments * share_sum
    counts = [math.floor(total_assignments * s) for s in shares]
    for i in range(round(wanted) - sum(counts)):
        counts[i % len(counts)] += 1
    return counts


@dataclass
class RecordedRouting:
    """Per-layer counts measured on one rank of a real run, replayed by the simulation.

    ``layers[i]`` holds the :class:`PlannedCounts` of the i-th MoE layer (model order).
    """

    layers: list[PlannedCounts] = field(default_factory=list)

    def for_layer(self, index: int) -> _Replay:
        return _Replay(self.layers[index])


@dataclass(frozen=True)
class _Replay:
    counts: PlannedCounts

    def __call__(self, num_tokens: int, top_k: int, ep_size: int, ep_rank: int, num_local_experts: int):
        return self.counts
