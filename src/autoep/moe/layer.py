"""The expert-parallel MoE layer that replaces a Hugging Face MoE block."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from autoep.moe import balance as bal
from autoep.moe.capacity import apply_capacity
from autoep.moe.dispatch import AllToAllDispatcher, LocalDispatcher
from autoep.moe.experts import GemmBackend, GroupedExperts
from autoep.moe.grouping import combine_rows, group_by_expert
from autoep.moe.load_stats import LayerLoadStats
from autoep.moe.router import RouterOutput, TopKRouter
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
        self.add_module(spec.router_attr, TopKRouter(spec.router, spec.hidden_size))
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
        indices_TK, weights_TK, dropped_E = routed.indices_TK, routed.weights_TK, None
        if self.balance.capacity_factor is not None:
            indices_TK, weights_TK, dropped_E = apply_capacity(
                indices_TK,
                weights_TK,
                self._priority(routed),
                self.spec.num_experts,
                self.balance.capacity_factor,
                self.balance.drop_policy,
            )
        self.balance_losses = {}
        if self.training:
            self._balance(routed, shape, dropped_E)
        out_TD = self._routed_experts(x_TD, weights_TK, indices_TK)
        shared = self.shared_module
        if shared is not None:
            shared_TD = shared(x_TD)
            gate = self.shared_gate_module
            if gate is not None:
                shared_TD = torch.sigmoid(gate(x_TD)) * shared_TD
            out_TD = out_TD + shared_TD
        out = out_TD.reshape(shape)
        if self.spec.returns_router_scores:
            return out, routed.weights_TK.to(hidden_states.dtype)
        return out

    def _routed_experts(self, x_TD: torch.Tensor, weights_TK: torch.Tensor, indices_TK: torch.Tensor) -> torch.Tensor:
        """Dispatch, run the experts, combine; folded, on this lane's rows only."""
        group = self.fold_group
        if group is not None:
            T = x_TD.shape[0]
            x_TD, weights_TK, indices_TK = (take_lane_rows(t, group) for t in (x_TD, weights_TK, indices_TK))
        x_ND, local_NK, weights_NK, state = self.dispatcher.dispatch(x_TD, weights_TK, indices_TK)
        y_ND = self._apply_local_experts(x_ND, local_NK, weights_NK)
        out_TD = self.dispatcher.combine(y_ND, state)
        return out_TD if group is None else gather_lane_rows(out_TD, T, group)

    def _priority(self, routed: RouterOutput) -> torch.Tensor:
        """Routing probability of each choice, the order the ``probs`` drop policy keeps."""
        logits_TE = routed.logits_TE.detach()
        scores_TE = torch.sigmoid(logits_TE) if self.spec.router.scoring == "sigmoid" else logits_TE.softmax(-1)
        return scores_TE.gather(1, routed.indices_TK)

    def _balance(self, routed: RouterOutput, shape: torch.Size, dropped_E: torch.Tensor | None) -> None:
        """Balancing losses of this forward (with autograd when their coefficient is set) and load counts.

        The switch aux loss and the z-loss are always measured (for metrics);
        autograd records them only when some balancing loss is on.
        """
        cfg = self.balance
        batch = shape[0] if len(shape) == 3 else 1
        with torch.set_grad_enabled(torch.is_grad_enabled() and bool(cfg.enabled_losses)):
            losses = bal.measure_losses(
                cfg, routed.logits_TE, routed.indices_TK, self.spec.router.scoring, batch, self.stats_group
            )
        self.balance_losses = {name: value for name, value in losses.items() if cfg.coef(name) > 0}
        self.load_stats.record(bal.expert_counts(routed.indices_TK, self.spec.num_experts), dropped_E, losses)

    def _apply_local_experts(
        self, x_ND: torch.Tensor, local_NK: torch.Tensor, weights_NK: torch.Tensor
    ) -> torch.Tensor:
        """Run each (row, choice) on its local expert and sum the weighted results per row."""
        assignments = group_by_expert(local_NK, self.num_local_experts)
        counts_E = assignments.counts_E
        self.tokens_per_expert = counts_E  # routed (token, expert) pairs each local expert got, for load metrics
        counts_list = counts_E.tolist() if self.experts.uses_loop(x_ND) else None
        y_AD = self.experts(x_ND[assignments.row_A], counts_E, counts_list, assignments.expert_A)
        return combine_rows(y_AD, weights_NK, assignments, x_ND.shape[0])

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
