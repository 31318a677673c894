"""Folding: an MoE layer on tensor-parallel ranks ("lanes").

TP peers hold identical tokens at the MoE input, so running the routed experts
on all of them would repeat the work ``tp`` times. Instead each lane dispatches
a disjoint, contiguous share of the tokens and the lanes' outputs are gathered
back. Everything around the MoE layer is replicated over the lanes, which
decides the backward of both steps (DESIGN.md, "Folding"):

* :func:`take_lane_rows` keeps this lane's rows; the gradient of the full input
  must be the same on every lane, so its backward all-gathers the lanes' row
  gradients (not the zero-padded local gradient a plain slice would give).
* :func:`gather_lane_rows` concatenates the lanes' rows; the gradient arriving
  from the replicated path is already complete on every lane, so its backward
  just keeps this lane's rows. The all-gather's textbook backward (reduce-
  scatter, a sum over lanes) would make every expert gradient ``tp`` times too
  large.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# torch 2.13 renames all_gather_into_tensor (deprecated) to all_gather_single.
_all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def lane_rows(num_rows: int, lane: int, lanes: int) -> tuple[int, int]:
    """``[start, end)`` of lane ``lane``'s rows: contiguous blocks of ``ceil(T / lanes)``, the last one short."""
    per_lane = -(-num_rows // lanes)
    start = min(lane * per_lane, num_rows)
    return start, min(start + per_lane, num_rows)


def _all_gather_rows(rows_ND: torch.Tensor, num_rows: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate every lane's rows in lane order (lanes may hold one row fewer: padded on the wire)."""
    lanes = dist.get_world_size(group)
    per_lane = -(-num_rows // lanes)
    padded = rows_ND.new_zeros((per_lane, *rows_ND.shape[1:]))
    padded[: rows_ND.shape[0]] = rows_ND
    out = rows_ND.new_empty((lanes * per_lane, *rows_ND.shape[1:]))
    _all_gather_into(out, padded.contiguous(), group=group)
    if lanes * per_lane == num_rows:
        return out
    keep = [out[i * per_lane : i * per_lane + (end - start)] for i, (start, end) in enumerate(_spans(num_rows, lanes))]
    return torch.cat(keep)


def _spans(num_rows: int, lanes: int) -> list[tuple[int, int]]:
    return [lane_rows(num_rows, lane, lanes) for lane in range(lanes)]


class _TakeLaneRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group, ctx.num_rows = group, x_TD.shape[0]
        start, end = lane_rows(x_TD.shape[0], dist.get_rank(group), dist.get_world_size(group))
        return x_TD[start:end]

    @staticmethod
    def backward(ctx, grad_ND: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_gather_rows(grad_ND, ctx.num_rows, ctx.group), None


class _GatherLaneRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_ND: torch.Tensor, num_rows: int, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _all_gather_rows(y_ND, num_rows, group)

    @staticmethod
    def backward(ctx, grad_TD: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        start, end = lane_rows(grad_TD.shape[0], dist.get_rank(ctx.group), dist.get_world_size(ctx.group))
        return grad_TD[start:end], None, None


def take_lane_rows(x_TD: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """This lane's share of rows of a lane-replicated tensor (backward: all-gather over the lanes)."""
    return _TakeLaneRows.apply(x_TD, group)


def gather_lane_rows(y_ND: torch.Tensor, num_rows: int, group: dist.ProcessGroup) -> torch.Tensor:
    """All lanes' rows, in lane order, on every lane (backward: keep this lane's rows)."""
    return _GatherLaneRows.apply(y_ND, num_rows, group)
