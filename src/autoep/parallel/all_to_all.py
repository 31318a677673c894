"""Variable-size all-to-all of token rows, differentiable.

Built on ``torch.distributed._functional_collectives.all_to_all_single_autograd``:
its backward is the reverse all-to-all, so gradients of dispatched rows flow
back to the rank that sent them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol


def exchange_counts(send_counts_R: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Tell every peer how many rows it will receive from us; returns rows we will receive."""
    recv_counts_R = torch.empty_like(send_counts_R)
    dist.all_to_all_single(recv_counts_R, send_counts_R, group=group)
    return recv_counts_R


def all_to_all_rows(
    x_ND: torch.Tensor,
    recv_counts: list[int],
    send_counts: list[int],
    group: dist.ProcessGroup,
    *,
    wait: bool = True,
) -> torch.Tensor:
    """Send ``send_counts[r]`` consecutive rows to rank ``r``; receive ``recv_counts[r]`` from it.

    With ``wait=False`` the exchange is only started: compute on other tensors
    overlaps it, and :func:`wait_rows` (or the first use of the result) waits.
    """
    out = funcol.all_to_all_single_autograd(x_ND.contiguous(), recv_counts, send_counts, group)
    return wait_rows(out) if wait else out


def wait_rows(rows: torch.Tensor) -> torch.Tensor:
    """The rows of a started exchange, once it has completed."""
    return funcol.wait_tensor(rows) if isinstance(rows, funcol.AsyncCollectiveTensor) else rows
