"""Restore an LR scheduler's state into an optimizer whose parameter groups follow another layout.

autoep groups parameters per device mesh, so the number of groups changes
with the layout (ep, tp, ZeRO stage). A scheduler's ``state_dict`` holds
per-group lists (``base_lrs``, ``_last_lr``, ``lr_lambdas``) in the saved
layout's grouping; the per-parameter hyperparameters come back with the
optimizer's state, so the lists are rebuilt from the restored groups and the
step count is taken from the saved run.
"""

from __future__ import annotations

from typing import Any

import torch


def scheduler_state_for(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> dict[str, Any]:
    """``saved`` scheduler state with its per-group lists rebuilt for ``optimizer``'s groups."""
    groups = optimizer.param_groups
    state = dict(saved)
    state["base_lrs"] = [g.get("initial_lr", g["lr"]) for g in groups]
    state["_last_lr"] = [g["lr"] for g in groups]
    lambdas = saved.get("lr_lambdas")
    if lambdas:  # one entry per group; autoep's and transformers' schedules use the same function for all
        state["lr_lambdas"] = [lambdas[0]] * len(groups)
    return state
