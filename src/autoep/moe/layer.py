"""The expert-parallel MoE layer that replaces a Hugging Face MoE block."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from autoep.moe import balance as bal
from autoep.moe.capacity import apply_capacity
from autoep.moe.dispatch import AllToAllDispatcher, LocalDispatcher, Pending, assignments_known
from autoep.moe.experts import GemmBackend, GroupedExperts
from autoep.moe.grouping import combine_rows, group_by_expert, sum_rows
from autoep.moe.load_stats import LayerLoadStats
from autoep.moe.router import SIGMOID_SCORINGS, RouterOutput, TopKRouter
from autoep.moe.spec import MoESpec
from autoep.parallel.fold import gather_lane_rows, take_lane_rows


class MoELayer(nn.Module):
    """Router → dispatch → grouped experts → combine (+ shared experts).

    Holds the experts ``[expert_start, expert_end)`` of ``spec.num_experts``;
    with an ``ep_mesh`` of size > 1 tokens travel to their experts' owners by
    all-to-all, and the expert weights are DTensors sharded along the expert
    dimension over that mesh (global shape ``[E, ...]``, local ``[E/ep, ...]``).
    Child modules are registered under the original block's names (``gate``/
    ``router``, ``experts``, ``shared_experts``...), so the state dict keys of a
    converted model equal the original's.

    In training mode the layer also computes its balancing losses
    (``balance_losses``, consumed by :func:`autoep.load_balance.balancing_loss`)
    and accumulates routed/dropped counts in ``load_stats``. The global aux loss
    sums counts over ``stats_group`` (default: the whole world, which is the
    data-parallel group while tp = 1).

    Family semantics the spec declares: zero-computation experts (computed
    where the token lives, never dispatched), routing weights that scale the
    expert input instead of its output, and what the block returns.

    With a ``fold_group`` (the tensor-parallel peers, which hold the same
    tokens) the layer is folded: routing, balancing and shared experts run on
    all tokens on every peer, but each peer dispatches only its share of the
    tokens to the routed experts, and the shares are gathered back
    (:mod:`autoep.parallel.fold`).
    """

    def __init__(
        self,
        spec: MoESpec,
        *,
        ep_mesh: DeviceMesh | None = None,
        shared: nn.Module | None = None,
        shared_gate: nn.Module | None = None,
        act_fn: nn.Module | None = None,
        backend: GemmBackend = "auto",
        balance: bal.BalanceConfig | None = None,
        stats_group: dist.ProcessGroup | None = None,
        fold_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.balance = balance or bal.BalanceConfig()
        self.stats_group = stats_group
        self.fold_group = fold_group if fold_group is not None and dist.get_world_size(fold_group) > 1 else None
        ep_size = 1 if ep_mesh is None else ep_mesh.size()
        ep_rank = 0 if ep_mesh is None else ep_mesh.get_local_rank()
        self.ep_mesh = ep_mesh if ep_size > 1 else None
        self.ep_size, self.ep_rank = ep_size, ep_rank
        self.num_local_experts = spec.num_experts // ep_size
        self.expert_start = ep_rank * self.num_local_experts
        self.expert_end = self.expert_start + self.num_local_experts
        self._router_attr = spec.router_attr
        router = TopKRouter(spec.router, spec.hidden_size, spec.router_linear, spec.router_linear_bias)
        self.add_module(spec.router_attr, router)
        self.experts = GroupedExperts(
            self.num_local_experts, spec.hidden_size, spec.intermediate_size, spec.layout, act_fn, backend
        )
        self._shared_attr = spec.shared_attr
        self._shared_gate_attr = spec.shared_gate_attr
        if spec.shared_attr is not None:
            self.add_module(spec.shared_attr, shared)
        if spec.shared_gate_attr is not None:
            self.add_module(spec.shared_gate_attr, shared_gate)
        if ep_size > 1:
            self.dispatcher: LocalDispatcher | AllToAllDispatcher = AllToAllDispatcher(
                self.num_local_experts, ep_mesh.get_group()
            )
        else:
            self.dispatcher = LocalDispatcher(self.num_local_experts)
        self.set_overlap(True)
        self.tokens_per_expert: torch.Tensor | None = None
        self.added_selection_bias = False  # set by convert: the family has no e_score_correction_bias of its own
        self.load_stats = LayerLoadStats(spec.num_experts)
        self.balance_losses: dict[str, torch.Tensor] = {}

    # Accessors under fixed names: the children themselves carry the family's names.
    @property
    def router_module(self) -> TopKRouter:
        return self._modules[self._router_attr]

    @property
    def shared_module(self) -> nn.Module | None:
        return None if self._shared_attr is None else self._modules[self._shared_attr]

    @property
    def shared_gate_module(self) -> nn.Module | None:
        return None if self._shared_gate_attr is None else self._modules[self._shared_gate_attr]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        shape = hidden_states.shape
        x_TD = hidden_states.reshape(-1, shape[-1])
        if self.training and self.spec.jitter_noise > 0:
            noise = self.spec.jitter_noise
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - noise, 1.0 + noise)
        routed = self.router_module(x_TD)
        indices_TK, weights_TK, dropped_E, zero_TD = routed.indices_TK, routed.weights_TK, None, None
        if self.spec.zero_experts:
            indices_TK, weights_TK, zero_TD = self._zero_experts(x_TD, indices_TK, weights_TK)
        if self.balance.capacity_factor is not None:
            indices_TK, weights_TK, dropped_E = apply_capacity(
                indices_TK,
                weights_TK,
                self._priority(routed),
                self.spec.num_experts,
                self.balance.capacity_factor,
                self.balance.drop_policy,
            )
            dropped_E = dropped_E[: self.spec.num_experts]  # zero-expert choices arrive as the sentinel id E
        self.balance_losses = {}
        out_TD, shared_TD = self._schedule(x_TD, weights_TK, indices_TK, routed, shape, dropped_E)
        if zero_TD is not None:
            out_TD = out_TD + zero_TD
        if shared_TD is not None:
            out_TD = out_TD + shared_TD
        out = out_TD if self.spec.flat_output else out_TD.reshape(shape)
        if self.spec.returns_router_scores:
            return out, routed.weights_TK.to(hidden_states.dtype)
        if self.spec.returns_router_logits:
            return out, routed.logits_TE.to(hidden_states.dtype)
        return out

    def _zero_experts(
        self, x_TD: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Take the zero-computation experts' choices out of the routing and compute them here.

        They cost nothing and hold no weights, so they are never dispatched:
        every rank computes them for its own tokens. Their choices leave the
        routing as the dropped sentinel (id ``E``, weight 0), which the
        dispatchers never send. Returns the routing left for the real experts
        and the zero experts' summed output (``None`` when it is zero).
        """
        E = self.spec.num_experts
        zero_TK = indices_TK >= E
        zero_TD = None
        if self.spec.zero_expert_output == "identity":
            weight_T1 = torch.where(zero_TK, weights_TK, 0.0).sum(dim=-1, keepdim=True)
            zero_TD = (x_TD * weight_T1).to(x_TD.dtype)  # product in the weights' fp32, as the HF experts do
        return torch.where(zero_TK, E, indices_TK), torch.where(zero_TK, 0.0, weights_TK), zero_TD

    @property
    def recompute_activation(self) -> bool:
        """Recompute the experts' activation (and down projection) in backward instead of keeping it."""
        return self.experts.recompute_activation

    @recompute_activation.setter
    def recompute_activation(self, value: bool) -> None:
        self.experts.recompute_activation = value

    def set_overlap(self, overlap: bool) -> None:
        """Compute the shared experts and the balancing bookkeeping while the token exchange is in flight
        (the default), or after the routed experts (``False``: the sequential order, for comparison)."""
        self._schedule = self._overlapped if overlap else self._sequential

    def _overlapped(self, x_TD, weights_TK, indices_TK, routed, shape, dropped_E):
        """Start dispatch; meanwhile balance and shared experts; then experts, combine."""
        pending = self.dispatcher.start_dispatch(*self._lane(x_TD, weights_TK, indices_TK))
        if self.training:
            self._balance(routed, shape, dropped_E)
        shared_TD = self._shared_experts(x_TD)
        return self._finish_routed(pending, x_TD, self._all_routed(dropped_E)), shared_TD

    def _sequential(self, x_TD, weights_TK, indices_TK, routed, shape, dropped_E):
        if self.training:
            self._balance(routed, shape, dropped_E)
        pending = self.dispatcher.start_dispatch(*self._lane(x_TD, weights_TK, indices_TK))
        return self._finish_routed(pending, x_TD, self._all_routed(dropped_E)), self._shared_experts(x_TD)

    def _all_routed(self, dropped_E: torch.Tensor | None) -> bool:
        """Whether every (token, choice) goes to a routed expert: no capacity drops, no zero experts."""
        return dropped_E is None and not self.spec.zero_experts

    def _finish_routed(self, pending: Pending, x_TD: torch.Tensor, all_routed: bool) -> torch.Tensor:
        """Wait for the token exchange, run the local experts, combine (and gather the tp lanes back)."""
        x_ND, local_NK, weights_NK, state = self.dispatcher.finish_dispatch(pending)
        num_assignments = assignments_known(state, local_NK, all_routed)
        y_ND = self._apply_local_experts(x_ND, local_NK, weights_NK, state.expert_rows, num_assignments)
        return self._unlane(self.dispatcher.combine(y_ND, state), x_TD)

    def _lane(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Folded over tp: this lane's share of the rows (dispatch and experts run on it only)."""
        group = self.fold_group
        return tensors if group is None else tuple(take_lane_rows(t, group) for t in tensors)

    def _unlane(self, out_TD: torch.Tensor, x_TD: torch.Tensor) -> torch.Tensor:
        group = self.fold_group
        return out_TD if group is None else gather_lane_rows(out_TD, x_TD.shape[0], group)

    def _shared_experts(self, x_TD: torch.Tensor) -> torch.Tensor | None:
        shared = self.shared_module
        if shared is None:
            return None
        shared_TD = shared(x_TD)
        gate = self.shared_gate_module
        return shared_TD if gate is None else torch.sigmoid(gate(x_TD)) * shared_TD

    def _priority(self, routed: RouterOutput) -> torch.Tensor:
        """Routing probability of each choice, the order the ``probs`` drop policy keeps."""
        logits_TE = routed.logits_TE.detach()
        scores_TE = torch.sigmoid(logits_TE) if self._sigmoid_scores else logits_TE.softmax(-1)
        return scores_TE.gather(1, routed.indices_TK)

    @property
    def _sigmoid_scores(self) -> bool:
        return self.spec.router.scoring in SIGMOID_SCORINGS

    def _balance(self, routed: RouterOutput, shape: torch.Size, dropped_E: torch.Tensor | None) -> None:
        """Balancing losses of this forward (with autograd when their coefficient is set) and load counts.

        The switch aux loss and the z-loss are always measured (for metrics);
        autograd records them only when some balancing loss is on.
        """
        cfg = self.balance
        batch = shape[0] if len(shape) == 3 else 1
        with torch.set_grad_enabled(torch.is_grad_enabled() and bool(cfg.enabled_losses)):
            scoring = "sigmoid" if self._sigmoid_scores else self.spec.router.scoring
            losses = bal.measure_losses(cfg, routed.logits_TE, routed.indices_TK, scoring, batch, self.stats_group)
        self.balance_losses = {name: value for name, value in losses.items() if cfg.coef(name) > 0}
        self.load_stats.record(bal.expert_counts(routed.indices_TK, self.spec.num_experts), dropped_E, losses)

    def _apply_local_experts(
        self,
        x_ND: torch.Tensor,
        local_NK: torch.Tensor,
        weights_NK: torch.Tensor,
        planned_counts: list[int] | None = None,
        num_assignments: int | None = None,
    ) -> torch.Tensor:
        """Run each (row, choice) on its local expert and sum the weighted results per row.

        The weight scales the expert's output, or (``weights_scale_input``) its
        input row, whose outputs are then summed as they are. A row carries the
        weights of all its choices owned here, so either way each assignment
        gets exactly its own weight.
        """
        a = group_by_expert(local_NK, self.num_local_experts, planned_counts, num_assignments)
        counts_E = a.counts_E
        self.tokens_per_expert = counts_E  # routed (token, expert) pairs each local expert got, for load metrics
        counts_list = a.counts_list(self.experts.uses_loop(x_ND))
        x_AD = x_ND[a.row_A]
        if self.spec.weights_scale_input:
            x_AD = x_AD * weights_NK[a.row_A, a.slot_A].to(x_AD.dtype).unsqueeze(-1)
        y_AD = self.experts(x_AD, counts_E, counts_list, a.expert_A)
        if self.spec.weights_scale_input:
            return sum_rows(y_AD, a.row_A, x_ND.shape[0])
        return combine_rows(y_AD, weights_NK, a, x_ND.shape[0])

    # The MoE-site interface shared with the experts path (autoep.moe.sites).
    @property
    def num_experts(self) -> int:
        return self.spec.num_experts

    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def experts_module(self) -> nn.Module:
        return self.experts

    @property
    def selection_bias(self) -> torch.Tensor | None:
        return self.router_module.e_score_correction_bias

    @property
    def selection_bias_name(self) -> str:
        return f"{self.spec.router_attr}.e_score_correction_bias"

    @property
    def gate_names(self) -> tuple[str, ...]:
        """Child names of the router and shared-expert gate (AdamW under Muon)."""
        return tuple(a for a in (self.spec.router_attr, self.spec.shared_gate_attr) if a)

    def extra_repr(self) -> str:
        return (
            f"family={self.spec.family}, experts={self.expert_start}..{self.expert_end - 1} "
            f"of {self.spec.num_experts}, top_k={self.spec.router.top_k}, ep={self.ep_rank}/{self.ep_size}"
        )
