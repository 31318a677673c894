"""Token dispatch: move each token to the ranks that own its chosen experts, and back.

Both dispatchers hand the expert stage the same thing: rows ``x_ND``, and per
row the local expert id and combine weight of each of its k choices
(``local_ids_NK``, ``weights_NK``; a choice owned by another rank, or dropped
by capacity (global id ``E``), carries the sentinel id ``E_local`` and weight 0).

With expert parallelism a token is sent to a rank once, however many of its k
experts live there: the receiving rank applies and sums them locally and sends
back one row. This cuts all-to-all volume by up to k on clustered routing.

Each exchange is split into named steps a schedule can interleave with other
work (:class:`autoep.moe.layer.MoELayer` computes its shared experts while
the token exchange is in flight): ``start_dispatch`` (count exchange, the
forward's one host sync, token exchange started) / ``finish_dispatch``, and
``start_combine`` (combine exchange started) / ``finish_combine``.
``dispatch`` and ``combine`` run both steps back to back.

Simulation hook: a dispatcher's ``planner`` (``None`` in training) supplies the
routing counts instead of the routing itself. Under a fake process group and
fake tensors (:mod:`autoep.plan`) neither the counts exchange nor the token ids
hold data, so the planner says how many rows go to and come from each peer and
how many assignments each local expert gets; the dispatcher builds tensors of
exactly those shapes and every later op (collectives included) sees the sizes
a real run with that routing would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist

from autoep.moe.grouping import count_ids, sum_rows
from autoep.moe.row_message import RowLayout
from autoep.parallel.all_to_all import all_to_all_rows, exchange_counts, wait_rows


@dataclass
class DispatchState:
    """What ``combine`` needs to bring rows home (and, planned, the assignments per local expert)."""

    num_tokens: int
    token_N: torch.Tensor | None = None
    send_counts: list[int] | None = None
    recv_counts: list[int] | None = None
    expert_rows: list[int] | None = None
    num_assignments: int | None = None  # valid (row, choice) pairs received, when the host knows it


@dataclass(frozen=True)
class PlannedCounts:
    """One dispatch's routing counts as a simulation plans them, from this rank's point of view.

    send_rows[r]: rows sent to EP peer r; recv_rows[r]: rows received from it
    (one row per token and destination, however many of its choices live there);
    expert_rows[e]: (row, choice) assignments of local expert e.
    """

    send_rows: tuple[int, ...]
    recv_rows: tuple[int, ...]
    expert_rows: tuple[int, ...]


class RoutingPlanner(Protocol):
    """Supplies :class:`PlannedCounts` for a dispatch of ``num_tokens`` tokens with ``top_k`` choices each."""

    def __call__(
        self, num_tokens: int, top_k: int, ep_size: int, ep_rank: int, num_local_experts: int
    ) -> PlannedCounts: ...


@dataclass
class Pending:
    """An exchange in flight: its (not yet waited) received tensors and what finishing it needs."""

    rows: torch.Tensor
    state: DispatchState
    meta: Any = None  # how to read ``rows`` (all-to-all: a RowLayout; locally: the weights and ids themselves)
    top_k: int = 0


def _planned_token_ids(send_rows: tuple[int, ...], num_tokens: int, device: torch.device) -> torch.Tensor:
    """Stand-in token ids for planned rows: per destination, the first ``send_rows[r]`` tokens."""
    parts = [torch.arange(n, device=device) % max(num_tokens, 1) for n in send_rows]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)


class Dispatcher:
    """The four steps every dispatcher implements, and their back-to-back composition."""

    def start_dispatch(self, x_TD: torch.Tensor, weights_TK: torch.Tensor, indices_TK: torch.Tensor) -> Pending:
        raise NotImplementedError

    def finish_dispatch(self, pending: Pending) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, DispatchState]:
        raise NotImplementedError

    def start_combine(self, y_ND: torch.Tensor, state: DispatchState) -> Pending:
        raise NotImplementedError

    def finish_combine(self, pending: Pending) -> torch.Tensor:
        raise NotImplementedError

    def dispatch(
        self, x_TD: torch.Tensor, weights_TK: torch.Tensor, indices_TK: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, DispatchState]:
        return self.finish_dispatch(self.start_dispatch(x_TD, weights_TK, indices_TK))

    def combine(self, y_ND: torch.Tensor, state: DispatchState) -> torch.Tensor:
        return self.finish_combine(self.start_combine(y_ND, state))


def assignments_known(state: DispatchState, local_NK: torch.Tensor, all_routed: bool) -> int | None:
    """How many valid (row, choice) pairs ``local_NK`` holds, when the host knows without reading it back:
    from the counts exchange (ep > 1), or at ep = 1 with every choice routed, all of them."""
    if state.num_assignments is not None:
        return state.num_assignments
    return local_NK.numel() if all_routed and state.token_N is None else None


class LocalDispatcher(Dispatcher):
    """ep = 1: every expert is local, rows are the tokens themselves."""

    def __init__(self, num_local_experts: int) -> None:
        self.num_local_experts = num_local_experts
        self.planner: RoutingPlanner | None = None

    def start_dispatch(self, x_TD: torch.Tensor, weights_TK: torch.Tensor, indices_TK: torch.Tensor) -> Pending:
        state = DispatchState(num_tokens=x_TD.shape[0])
        if self.planner is not None:
            plan = self.planner(x_TD.shape[0], indices_TK.shape[1], 1, 0, self.num_local_experts)
            state.expert_rows = list(plan.expert_rows)
        return Pending(x_TD, state, meta=(weights_TK, indices_TK))

    def finish_dispatch(self, pending: Pending) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, DispatchState]:
        weights_TK, indices_TK = pending.meta
        return pending.rows, indices_TK, weights_TK, pending.state

    def start_combine(self, y_ND: torch.Tensor, state: DispatchState) -> Pending:
        return Pending(y_ND, state)

    def finish_combine(self, pending: Pending) -> torch.Tensor:
        return pending.rows


class AllToAllDispatcher(Dispatcher):
    """ep > 1: experts ``[r * E_local, (r + 1) * E_local)`` live on EP rank ``r``."""

    def __init__(self, num_local_experts: int, group: dist.ProcessGroup) -> None:
        self.num_local_experts = num_local_experts
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.planner: RoutingPlanner | None = None
        self.last_counts: tuple[list[int], list[int]] | None = None  # (send, recv) rows of the latest dispatch

    def start_dispatch(self, x_TD: torch.Tensor, weights_TK: torch.Tensor, indices_TK: torch.Tensor) -> Pending:
        """Count exchange (the host learns the sizes: one sync), then start the token exchange."""
        E_local, R = self.num_local_experts, self.ep_size
        T, K = x_TD.shape[0], indices_TK.shape[1]
        expert_rows = None
        if self.planner is not None:
            plan = self.planner(T, K, R, dist.get_rank(self.group), E_local)
            planned_R2 = torch.tensor([[n, 0] for n in plan.send_rows], device=x_TD.device)
            exchange_counts(planned_R2, self.group)  # the same collectives, of the same sizes
            token_N = _planned_token_ids(plan.send_rows, T, x_TD.device)
            local_NK = torch.zeros(token_N.shape[0], K, dtype=torch.long, device=x_TD.device)
            weights_NK = weights_TK[token_N]
            send_counts, recv_counts = list(plan.send_rows), list(plan.recv_rows)
            expert_rows = list(plan.expert_rows)
            num_assignments = None
        else:
            token_N, local_NK, weights_NK, send_counts, recv_counts, num_assignments = self._route(
                x_TD, weights_TK, indices_TK
            )
        self.last_counts = (send_counts, recv_counts)
        # One message per row: the token with its weights and local ids (autoep.moe.row_message).
        layout = RowLayout(x_TD.shape[1], K, x_TD.dtype)
        layout.check_ids(E_local)
        rows_NC = layout.pack(x_TD, token_N, weights_NK, local_NK)
        recv_NC = all_to_all_rows(rows_NC, recv_counts, send_counts, self.group, wait=False)
        state = DispatchState(T, token_N, send_counts, recv_counts, expert_rows, num_assignments)
        return Pending(recv_NC, state, meta=layout, top_k=K)

    def finish_dispatch(self, pending: Pending) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, DispatchState]:
        """Wait for the token exchange: rows, their local expert ids and weights, and the state to combine."""
        x_recv, weights_recv, local_recv = pending.meta.unpack(wait_rows(pending.rows))
        return x_recv, local_recv, weights_recv, pending.state

    def _route(
        self, x_TD: torch.Tensor, weights_TK: torch.Tensor, indices_TK: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int], list[int], int]:
        """Rows to send (token ids, local expert ids, weights), the row counts, and how many (row, choice)
        assignments this rank will receive, from the routing, with one device-to-host copy."""
        E_local, R = self.num_local_experts, self.ep_size
        T = x_TD.shape[0]
        with torch.no_grad():
            # Dropped choices (id E, past the last expert) map to a phantom rank R that is never sent to.
            rank_TK = torch.div(indices_TK, E_local, rounding_mode="floor")
            hit_TR = torch.zeros(T, R + 1, dtype=torch.bool, device=x_TD.device)
            hit_TR.scatter_(1, rank_TK, True)
            hit_TR = hit_TR[:, :R]
            # Per peer: rows (one per token that has a choice there) and assignments (choices there).
            send_R2 = torch.stack([hit_TR.sum(dim=0), count_ids(rank_TK, R)], 1)
            recv_R2 = exchange_counts(send_R2, self.group)
            counts = torch.cat([send_R2[:, 0], recv_R2.flatten()]).tolist()  # the forward's one host sync
            send_counts, recv_counts, num_assignments = counts[:R], counts[R::2], sum(counts[R + 1 :: 2])
            # One row per (destination rank, token), ordered by rank then token; sized without a sync.
            rank_N, token_N = torch.nonzero_static(hit_TR.t(), size=sum(send_counts)).unbind(1)
            match_NK = rank_TK[token_N] == rank_N.unsqueeze(1)
            local_NK = torch.where(match_NK, indices_TK[token_N] - rank_N.unsqueeze(1) * E_local, E_local)
        weights_NK = torch.where(match_NK, weights_TK[token_N], 0.0)
        return token_N, local_NK, weights_NK, send_counts, recv_counts, num_assignments

    def start_combine(self, y_ND: torch.Tensor, state: DispatchState) -> Pending:
        """Start sending the expert outputs back to the ranks their tokens came from."""
        return Pending(all_to_all_rows(y_ND, state.send_counts, state.recv_counts, self.group, wait=False), state)

    def finish_combine(self, pending: Pending) -> torch.Tensor:
        """Wait for the combine exchange; sum each token's rows, ``[T, D]``."""
        state = pending.state
        return sum_rows(wait_rows(pending.rows), state.token_N, state.num_tokens)
