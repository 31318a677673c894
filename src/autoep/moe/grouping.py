"""Group dispatched rows by local expert and sum the weighted expert outputs back into rows.

Both conversion paths (autoep's own layer and the HF experts module) receive
the same dispatcher output: rows ``x_ND`` and, per row, the local expert id
and combine weight of each of its k choices (sentinel ``E_local`` for choices
owned elsewhere or dropped). Every valid (row, choice) pair is an assignment.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Assignments:
    """Valid (row, choice) pairs sorted by local expert (stable), and rows per expert.

    ``planned_counts``: the host copy of ``counts_E`` when a simulation planned it.
    """

    row_A: torch.Tensor
    slot_A: torch.Tensor
    expert_A: torch.Tensor
    counts_E: torch.Tensor
    planned_counts: list[int] | None = None

    def counts_list(self, needed: bool) -> list[int] | None:
        """Host copy of ``counts_E`` (a device sync unless planned) when ``needed``, else ``None``."""
        if not needed:
            return None
        return self.planned_counts if self.planned_counts is not None else self.counts_E.tolist()


def count_ids(ids: torch.Tensor, n: int) -> torch.Tensor:
    """How many of ``ids`` equal each of ``0 .. n-1`` (int64 ``[n]``); ids >= n are not counted.

    A scatter-add, not ``bincount``: CUDA's ``bincount`` reads the ids' maximum back to the host to size its
    output (a sync per call), and a fixed output shape also runs on fake tensors (``autoep.plan``)."""
    flat = ids.reshape(-1).clamp(max=n)
    counts = torch.zeros(n + 1, dtype=torch.int64, device=flat.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int64))[:n]


@torch.no_grad()
def group_by_expert(
    local_NK: torch.Tensor,
    num_local_experts: int,
    planned_counts: list[int] | None = None,
    num_assignments: int | None = None,
) -> Assignments:
    """Sort the assignments by local expert; ``planned_counts`` (a simulation's, see
    :class:`autoep.moe.dispatch.PlannedCounts`) gives their number per expert instead of the ids.

    ``num_assignments``: how many valid (row, choice) pairs there are, when the host already knows
    (the dispatcher's counts exchange tells it): then finding them needs no device-to-host sync.
    """
    if planned_counts is not None:
        return _planned_assignments(local_NK, planned_counts)
    valid_NK = local_NK < num_local_experts
    if num_assignments is None:
        row_A, slot_A = valid_NK.nonzero(as_tuple=True)  # sizes its output: a host sync
    else:
        row_A, slot_A = torch.nonzero_static(valid_NK, size=num_assignments).unbind(1)
    expert_A = local_NK[row_A, slot_A]
    order_A = torch.argsort(expert_A, stable=True)
    row_A, slot_A, expert_A = row_A[order_A], slot_A[order_A], expert_A[order_A]
    counts_E = count_ids(expert_A, num_local_experts)
    return Assignments(row_A, slot_A, expert_A, counts_E)


class _SumRows(torch.autograd.Function):
    """``zeros(num_rows, D).index_add(0, index, rows)`` whose backward keeps only ``index``.

    torch's own ``index_add`` saves its source for backward although only its
    shape is needed: ``[A, D]`` activations kept for nothing.
    """

    @staticmethod
    def forward(ctx, rows_AD: torch.Tensor, index_A: torch.Tensor, num_rows: int) -> torch.Tensor:
        ctx.save_for_backward(index_A)
        return rows_AD.new_zeros((num_rows, rows_AD.shape[1])).index_add_(0, index_A, rows_AD)

    @staticmethod
    def backward(ctx, grad_ND: torch.Tensor):
        (index_A,) = ctx.saved_tensors
        return grad_ND.index_select(0, index_A), None, None


def sum_rows(rows_AD: torch.Tensor, index_A: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``out[n] = Σ rows[a]`` over the rows with ``index[a] == n``, ``[num_rows, D]``."""
    return _SumRows.apply(rows_AD, index_A, num_rows)


def combine_rows(y_AD: torch.Tensor, weights_NK: torch.Tensor, assignments: Assignments, num_rows: int) -> torch.Tensor:
    """``out[n] = Σ_k weight[n, k] · y[(n, k)]`` over the row's valid choices, ``[N, D]``."""
    # Weights are cast to the activation dtype first: a mixed bf16 x fp32 product is
    # several times slower on CPU and gains nothing once rounded back to bf16.
    a = assignments
    weighted_AD = y_AD * weights_NK[a.row_A, a.slot_A].to(y_AD.dtype).unsqueeze(-1)
    return sum_rows(weighted_AD, a.row_A, num_rows)


def _planned_assignments(local_NK: torch.Tensor, counts: list[int]) -> Assignments:
    """Assignments of the planned sizes (which rows they use does not matter to a simulation)."""
    device, (N, K) = local_NK.device, local_NK.shape
    total = sum(counts)
    expert_A = torch.cat([torch.full((n,), e, dtype=torch.long, device=device) for e, n in enumerate(counts)])
    index_A = torch.arange(total, device=device)
    row_A, slot_A = index_A % max(N, 1), (index_A // max(N, 1)) % max(K, 1)
    return Assignments(row_A, slot_A, expert_A, torch.tensor(counts, device=device), list(counts))
