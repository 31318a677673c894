"""Per-layer accumulation of what routing did during one optimizer step."""

from __future__ import annotations

import torch

from autoep.moe.balance import LOSS_NAMES


def in_backward_recompute() -> bool:
    """True while autograd runs a forward again (activation checkpointing).

    Side effects such as counting tokens must happen once per real forward.
    The check reads the autograd engine's current task id (-1 outside backward).
    """
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


class LayerLoadStats:
    """Sums over the micro-batches of a step, on this rank: routed and dropped
    assignments per expert (all E experts, counted where the token lives, before
    dispatch) and the balancing-loss values (detached)."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.reset()

    def reset(self) -> None:
        self.routed_E: torch.Tensor | None = None
        self.dropped_E: torch.Tensor | None = None
        self.loss_sums: dict[str, torch.Tensor] = {}  # tensors: no device sync per micro-batch
        self.micro_batches = 0

    @torch.no_grad()
    def record(self, routed_E: torch.Tensor, dropped_E: torch.Tensor | None, losses: dict[str, torch.Tensor]) -> None:
        if in_backward_recompute():
            return
        self.routed_E = routed_E.clone() if self.routed_E is None else self.routed_E + routed_E
        if dropped_E is not None:
            self.dropped_E = dropped_E.clone() if self.dropped_E is None else self.dropped_E + dropped_E
        for name, value in losses.items():
            value = value.detach().double()
            self.loss_sums[name] = value if name not in self.loss_sums else self.loss_sums[name] + value
        self.micro_batches += 1

    def as_row(self, loss_names: tuple[str, ...] = LOSS_NAMES) -> torch.Tensor:
        """``[2E + len(loss_names) + 1]`` float64: routed, dropped, loss sums, micro-batches.

        One flat row per layer lets the whole model's statistics travel in a
        single all-reduce.
        """
        E = self.num_experts
        device = self.routed_E.device if self.routed_E is not None else None  # built where the counts are
        row = torch.zeros(2 * E + len(loss_names) + 1, dtype=torch.float64, device=device)
        if self.routed_E is not None:
            row[:E] = self.routed_E
        if self.dropped_E is not None:
            row[E : 2 * E] = self.dropped_E
        for i, name in enumerate(loss_names):
            if name in self.loss_sums:
                row[2 * E + i] = self.loss_sums[name]
        row[-1] = self.micro_batches
        return row
