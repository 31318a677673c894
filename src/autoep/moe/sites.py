"""Every converted MoE site of a model, whichever path converted it.

A site is either an :class:`~autoep.moe.layer.MoELayer` (block path) or the
:class:`~autoep.moe.ep_experts.ExpertsSite` attached to a family's standard
experts module (experts path). Both expose the same interface, which is all
that model-level code (balancing, sharding, optimizers, checkpoints) uses:
``num_experts``, ``family``, ``balance``, ``load_stats``, ``balance_losses``,
``experts_module``, ``selection_bias`` / ``selection_bias_name`` /
``added_selection_bias``, ``gate_names``, ``tokens_per_expert``, and the layout
(``ep_size``, ``ep_rank``, ``expert_start``/``expert_end``, ``dispatcher``).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from autoep.moe import balance as bal
from autoep.moe.dispatch import AllToAllDispatcher, LocalDispatcher
from autoep.moe.ep_experts import SITE_ATTR
from autoep.moe.layer import MoELayer
from autoep.moe.load_stats import LayerLoadStats


class MoESite(Protocol):
    num_experts: int
    family: str
    balance: bal.BalanceConfig
    load_stats: LayerLoadStats
    balance_losses: dict[str, torch.Tensor]
    added_selection_bias: bool
    tokens_per_expert: torch.Tensor | None
    ep_size: int
    ep_rank: int
    expert_start: int
    expert_end: int
    dispatcher: LocalDispatcher | AllToAllDispatcher

    @property
    def experts_module(self) -> nn.Module: ...

    @property
    def selection_bias(self) -> torch.Tensor | None: ...

    @property
    def selection_bias_name(self) -> str: ...

    @property
    def gate_names(self) -> tuple[str, ...]: ...


def moe_sites(model: nn.Module) -> list[tuple[str, MoESite]]:
    """``(block path, site)`` for every converted MoE block, in module order."""
    found: list[tuple[str, MoESite]] = []
    for path, module in model.named_modules():
        if isinstance(module, MoELayer):
            found.append((path, module))
            continue
        site = getattr(module, SITE_ATTR, None)
        if site is not None:
            found.append((path.rpartition(".")[0], site))
    return found


def owned_rows(site: MoESite, param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """The rows of ``full`` (a global expert tensor or its gradient) that this rank's shard of ``param`` holds.

    Experts ``[expert_start, expert_end)`` own ``rows`` consecutive rows each: one for stacked ``[E, ...]``
    tensors, F for flattened ``[E*F, ...]`` ones (DBRX). Rows past the real experts (LongCat's unread
    zero-expert rows) belong to nobody.
    """
    from autoep.moe.experts import local_tensor

    rows = local_tensor(param).shape[0] // (site.expert_end - site.expert_start)
    return full[site.expert_start * rows : site.expert_end * rows]
