"""Non-finite steps: detect NaN/Inf, skip the update or stop, identically on every rank.

A bad batch or an overflowing expert can make the loss or a gradient
non-finite; one optimizer step with it would poison the weights (Adam's
moments keep the NaN forever). :func:`train_step` decides from the
all-reduced loss and global gradient norm, which every rank holds
identically, so every rank takes the same decision without an extra
collective: with the ``skip`` policy the step's gradients are dropped (no
optimizer step, no bias update; the weights and optimizer state stay as they
were), with ``stop`` training ends with :class:`NonFiniteError`.
:class:`NonFiniteGuard` counts skips across steps and stops after too many in
a row: a run that cannot produce a finite step is broken, not unlucky.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from autoep.errors import AutoEPError
from autoep.moe.experts import local_tensor

NonFinitePolicy = Literal["skip", "stop"]


class NonFiniteError(AutoEPError):
    """Training stopped on a non-finite loss or gradient norm."""


def is_finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


@torch.no_grad()
def nonfinite_modules(model: nn.Module, limit: int = 8) -> list[str]:
    """Modules with a non-finite gradient on any rank (same list everywhere; a collective).

    Named by the parameter's module path (``model.layers.3.mlp.experts``).
    Only called on a step already known to be non-finite.
    """
    mine = sorted(
        {
            name.rpartition(".")[0] or name
            for name, p in model.named_parameters()
            if p.grad is not None and not torch.isfinite(local_tensor(p.grad)).all()
        }
    )
    if dist.is_initialized():
        gathered: list[list[str]] = [[] for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, mine)
        mine = sorted({m for part in gathered for m in part})
    return mine[:limit] + ([f"... ({len(mine) - limit} more)"] if len(mine) > limit else [])


@dataclass
class NonFiniteGuard:
    """Counts skipped steps; raises on ``stop`` or after ``max_consecutive`` skips in a row."""

    policy: NonFinitePolicy = "skip"
    max_consecutive: int = 5
    skipped: int = 0
    consecutive: int = 0

    def __post_init__(self) -> None:
        if self.policy not in ("skip", "stop"):
            raise ValueError(f"non-finite policy must be 'skip' or 'stop', got {self.policy!r}")
        if self.max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {self.max_consecutive}")

    def observe(self, step: int, skipped: bool, loss: float, grad_norm: float, modules: list[str]) -> None:
        """Account for one step's outcome (``step`` is 1-based, for messages)."""
        if not skipped:
            self.consecutive = 0
            return
        self.skipped += 1
        self.consecutive += 1
        where = f" (non-finite gradients in {', '.join(modules)})" if modules else ""
        if self.policy == "stop":
            raise NonFiniteError(
                f"step {step}: loss {loss} / gradient norm {grad_norm} are not finite{where}; stopping "
                "(policy 'stop'; use 'skip' to drop such steps)"
            )
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"{self.consecutive} steps in a row up to step {step} had a non-finite loss or gradient norm{where}; "
                "stopping: lower the learning rate, check the data, or resume from an earlier checkpoint"
            )
