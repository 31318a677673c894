"""The experts path: a family's own standard experts module, made expert-parallel in place.

The family's MoE block and router run unchanged; they call
``experts(hidden_states, top_k_index, top_k_weights)`` as always. autoep
registers an implementation named ``"autoep"`` in transformers' experts
interface (``ExpertsInterface``, the public hook behind
``set_experts_implementation``) and selects it for the converted modules.
Each converted module keeps its class, its flags, ``_apply_gate`` and
``act_fn``; its stacked weights become this rank's slice (a DTensor of the
global ``[E, ...]`` shape with ep > 1), and an :class:`ExpertsSite` attached
to it holds what the expert-parallel forward needs: the dispatcher, capacity,
counts, balancing losses from the family router's logits, and folding.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from autoep.moe import balance as bal
from autoep.moe.capacity import apply_capacity
from autoep.moe.dispatch import AllToAllDispatcher, LocalDispatcher, assignments_known
from autoep.moe.experts import GemmBackend, act_and_down, grouped_matmul, grouped_mm_supported, local_tensor
from autoep.moe.grouping import combine_rows, group_by_expert
from autoep.moe.load_stats import LayerLoadStats
from autoep.moe.spec import ExpertsSpec
from autoep.parallel.fold import gather_lane_rows, take_lane_rows

IMPLEMENTATION = "autoep"
SITE_ATTR = "_autoep_site"


class ExpertsSite:
    """Expert-parallel state of one converted standard experts module (the MoE-site interface).

    Holds experts ``[expert_start, expert_end)`` of ``spec.num_experts``. The
    router's logits are caught by a forward hook on the family's router (they
    feed the balancing losses and the ``probs`` drop policy); the block's input
    shape by a pre-hook (the sequence-wise loss needs the batch size).
    """

    def __init__(
        self,
        spec: ExpertsSpec,
        block: nn.Module,
        *,
        ep_mesh: DeviceMesh | None = None,
        backend: GemmBackend = "auto",
        balance: bal.BalanceConfig | None = None,
        stats_group: dist.ProcessGroup | None = None,
        fold_group: dist.ProcessGroup | None = None,
    ) -> None:
        self.spec = spec
        self.balance = balance or bal.BalanceConfig()
        self.backend: GemmBackend = backend
        self.recompute_activation = False  # see autoep.moe.experts.act_and_down
        self.stats_group = stats_group
        self.fold_group = fold_group if fold_group is not None and dist.get_world_size(fold_group) > 1 else None
        ep_size = 1 if ep_mesh is None else ep_mesh.size()
        ep_rank = 0 if ep_mesh is None else ep_mesh.get_local_rank()
        self.ep_mesh = ep_mesh if ep_size > 1 else None
        self.ep_size, self.ep_rank = ep_size, ep_rank
        self.num_local_experts = spec.num_experts // ep_size
        self.expert_start = ep_rank * self.num_local_experts
        self.expert_end = self.expert_start + self.num_local_experts
        if ep_size > 1:
            self.dispatcher: LocalDispatcher | AllToAllDispatcher = AllToAllDispatcher(
                self.num_local_experts, ep_mesh.get_group()
            )
        else:
            self.dispatcher = LocalDispatcher(self.num_local_experts)
        self.block = block
        self.load_stats = LayerLoadStats(spec.num_experts)
        self.balance_losses: dict[str, torch.Tensor] = {}
        self.tokens_per_expert: torch.Tensor | None = None
        self.added_selection_bias = False
        self._logits_TE: torch.Tensor | None = None
        self._batch_size = 1
        self._hooks = [block.register_forward_pre_hook(self._remember_batch, with_kwargs=True)]
        if spec.router_name is not None:
            router = block.get_submodule(spec.router_name)
            self._hooks.append(router.register_forward_hook(self._remember_logits))

    # -- the MoE-site interface (autoep.moe.sites) ------------------------------------------------
    @property
    def num_experts(self) -> int:
        return self.spec.num_experts

    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def experts_module(self) -> nn.Module:
        return self.block.get_submodule(self.spec.experts_name)

    @property
    def selection_bias(self) -> torch.Tensor | None:
        name = self.spec.selection_bias_name
        if name is None:
            return None
        owner, _, attr = name.rpartition(".")
        return getattr(self.block.get_submodule(owner) if owner else self.block, attr)

    @property
    def selection_bias_name(self) -> str:
        return self.spec.selection_bias_name or f"{self.spec.router_name}.e_score_correction_bias"

    @property
    def gate_names(self) -> tuple[str, ...]:
        return self.spec.gate_names(self.block)

    # -- hooks --------------------------------------------------------------------------------------
    def _remember_batch(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else next(iter(kwargs.values()), None)
        if isinstance(x, torch.Tensor):
            self._batch_size = x.shape[0] if x.ndim == 3 else 1

    def _remember_logits(self, module: nn.Module, args: tuple, output) -> None:
        logits = output[self.spec.logits_index] if isinstance(output, (tuple, list)) else output
        self._logits_TE = logits.reshape(-1, logits.shape[-1]) if isinstance(logits, torch.Tensor) else None

    # -- forward ------------------------------------------------------------------------------------
    def forward(
        self, experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        x_TD = hidden_states.reshape(-1, hidden_states.shape[-1])
        routed_TK = top_k_index.reshape(x_TD.shape[0], -1).long()  # the router's choices, before capacity
        indices_TK, weights_TK = routed_TK, top_k_weights.reshape(x_TD.shape[0], -1)
        logits_TE, self._logits_TE = self._logits_TE, None
        dropped_E = None
        if self.balance.capacity_factor is not None:
            indices_TK, weights_TK, dropped_E = apply_capacity(
                indices_TK,
                weights_TK,
                self._priority(logits_TE, routed_TK, weights_TK),
                self.num_experts,
                self.balance.capacity_factor,
                self.balance.drop_policy,
            )
        self.balance_losses = {}
        if experts.training:
            self._balance(logits_TE, routed_TK, dropped_E)
        out_TD = self._routed(experts, x_TD, weights_TK, indices_TK, all_routed=dropped_E is None)
        return out_TD.reshape(hidden_states.shape).to(hidden_states.dtype)

    def _routed(
        self,
        experts: nn.Module,
        x_TD: torch.Tensor,
        weights_TK: torch.Tensor,
        indices_TK: torch.Tensor,
        all_routed: bool,
    ) -> torch.Tensor:
        group = self.fold_group
        if group is not None:
            T = x_TD.shape[0]
            x_TD, weights_TK, indices_TK = (take_lane_rows(t, group) for t in (x_TD, weights_TK, indices_TK))
        x_ND, local_NK, weights_NK, state = self.dispatcher.dispatch(x_TD, weights_TK, indices_TK)
        num_assignments = assignments_known(state, local_NK, all_routed)
        y_ND = self._local_experts(experts, x_ND, local_NK, weights_NK, state.expert_rows, num_assignments)
        out_TD = self.dispatcher.combine(y_ND, state)
        return out_TD if group is None else gather_lane_rows(out_TD, T, group)

    def _local_experts(
        self,
        experts: nn.Module,
        x_ND: torch.Tensor,
        local_NK: torch.Tensor,
        weights_NK: torch.Tensor,
        planned_counts: list[int] | None = None,
        num_assignments: int | None = None,
    ) -> torch.Tensor:
        """The module's own layout and activation on its local weights, as one grouped GEMM per projection."""
        layout = self.spec.experts
        a = group_by_expert(local_NK, self.num_local_experts, planned_counts, num_assignments)
        self.tokens_per_expert = a.counts_E
        w_in = local_tensor(getattr(experts, layout.in_proj))
        w_out = local_tensor(experts.down_proj)
        if not layout.is_transposed:  # stored [E, out, in]: the GEMM wants [E, in, out] (a view)
            w_in, w_out = w_in.transpose(1, 2), w_out.transpose(1, 2)
        x_AD = x_ND[a.row_A].to(w_in.dtype)
        counts_list = a.counts_list(self._uses_loop(x_AD))
        h_AF = grouped_matmul(x_AD, w_in, a.counts_E, counts_list)
        if layout.has_bias:
            h_AF = h_AF + local_tensor(getattr(experts, f"{layout.in_proj}_bias"))[a.expert_A]
        activate = experts._apply_gate if layout.has_gate else experts.act_fn
        y_AD = act_and_down(activate, h_AF, w_out, a.counts_E, counts_list, self.recompute_activation)
        if layout.has_bias:
            y_AD = y_AD + local_tensor(experts.down_proj_bias)[a.expert_A]
        return combine_rows(y_AD, weights_NK, a, x_ND.shape[0]).to(x_ND.dtype)

    def _uses_loop(self, x: torch.Tensor) -> bool:
        if self.backend != "auto":
            return self.backend == "loop"
        layout = self.spec.experts
        return not grouped_mm_supported(x, layout.hidden_size, layout.intermediate_size)

    def _priority(
        self, logits_TE: torch.Tensor | None, indices_TK: torch.Tensor, weights_TK: torch.Tensor
    ) -> torch.Tensor:
        """What the ``probs`` drop policy keeps first: the routing probability of each choice where the
        router's logits are known, else the combine weight the block handed over."""
        if logits_TE is None:
            return weights_TK.detach().float()
        return bal.routing_probs(logits_TE.detach(), self.spec.scoring).gather(1, indices_TK)

    def _balance(
        self, logits_TE: torch.Tensor | None, indices_TK: torch.Tensor, dropped_E: torch.Tensor | None
    ) -> None:
        cfg = self.balance
        losses: dict[str, torch.Tensor] = {}
        if logits_TE is not None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and bool(cfg.enabled_losses)):
                losses = bal.measure_losses(
                    cfg, logits_TE, indices_TK, self.spec.scoring, self._batch_size, self.stats_group
                )
        self.balance_losses = {name: value for name, value in losses.items() if cfg.coef(name) > 0}
        self.load_stats.record(bal.expert_counts(indices_TK, self.num_experts), dropped_E, losses)

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def __repr__(self) -> str:
        return (
            f"ExpertsSite(family={self.family}, experts={self.expert_start}..{self.expert_end - 1} "
            f"of {self.num_experts}, ep={self.ep_rank}/{self.ep_size})"
        )


def autoep_experts_forward(
    module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The ``"autoep"`` experts implementation: expert-parallel for converted modules.

    A standard experts module that autoep did not convert (none in a model that
    converted successfully) runs transformers' grouped-GEMM implementation.
    """
    site = getattr(module, SITE_ATTR, None)
    if site is None:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        return ALL_EXPERTS_FUNCTIONS["grouped_mm"](module, hidden_states, top_k_index, top_k_weights)
    return site.forward(module, hidden_states, top_k_index, top_k_weights)


def register_implementation() -> None:
    """Make ``"autoep"`` a valid ``experts_implementation`` (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, autoep_experts_forward)


def select_implementation(model: nn.Module, experts_modules: list[nn.Module]) -> None:
    """Route ``experts_modules`` to the ``"autoep"`` implementation.

    Through the model's public ``set_experts_implementation`` where it has one;
    any converted module whose config that did not reach (a sub-model transformers
    does not dispatch to) is set on its own config.
    """
    register_implementation()
    setter = getattr(model, "set_experts_implementation", None)
    if callable(setter):
        try:
            setter(IMPLEMENTATION)
        except (ValueError, RuntimeError, KeyError):
            pass
    for experts in experts_modules:
        config = experts.config
        if getattr(config, "_experts_implementation", None) != IMPLEMENTATION:
            config._experts_implementation = IMPLEMENTATION
