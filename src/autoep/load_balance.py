"""Model-level load balancing: the loss term, step statistics, and bias updates.

The MoE layers compute their own balancing losses and counts (see
:mod:`autoep.moe.balance`); this module adds them up across layers and ranks:

* :func:`install_loss_hook` makes the model's ``loss`` include the weighted
  balancing losses (``output.balance_loss`` holds that part), so any training
  loop that calls ``model(..., labels=...).loss.backward()`` trains with them;
  :func:`balancing_loss` gives the same term to loops that compute their own loss.
* :func:`collect_load_stats` reduces one optimizer step's counts and loss
  values over all ranks in a single all-reduce.
* :func:`update_expert_bias` applies the aux-loss-free rule from those counts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from autoep.moe import balance as bal
from autoep.moe.sites import MoESite, moe_sites
from autoep.parallel.groups import local_device


def moe_layers(model: nn.Module) -> list[tuple[str, MoESite]]:
    """``(path, site)`` for every converted MoE block (either conversion path), in module order."""
    return moe_sites(model)


def balancing_loss(model: nn.Module) -> torch.Tensor | None:
    """``Σ_loss coef · mean over layers`` of the last training forward's balancing losses, or ``None``.

    Consumes the layers' losses: a second call before the next forward returns ``None``.
    """
    layers = [layer for _, layer in moe_layers(model)]
    total = None
    for name in bal.LOSS_NAMES:
        values = [layer.balance_losses[name] for layer in layers if name in layer.balance_losses]
        if values:
            term = layers[0].balance.coef(name) * torch.stack(values).mean()
            total = term if total is None else total + term
    for layer in layers:
        layer.balance_losses = {}
    return total


def install_loss_hook(model: nn.Module) -> None:
    """Add the balancing losses to ``output.loss`` whenever the model computes a loss."""
    if getattr(model, "_autoep_loss_hook", None) is not None:
        return

    def add_balancing_loss(module: nn.Module, args, output):
        if getattr(module, "_autoep_balance_outside", False):
            return output  # the caller adds `balancing_loss` itself, with its own scale
        extra = balancing_loss(module)
        loss = getattr(output, "loss", None)
        if extra is None or loss is None:
            return output
        output.loss = loss + extra.to(loss.dtype)
        output["balance_loss"] = extra.detach()
        return output

    model._autoep_loss_hook = model.register_forward_hook(add_balancing_loss)


@contextlib.contextmanager
def balancing_loss_outside(model: nn.Module) -> Iterator[None]:
    """Keep the balancing losses out of ``output.loss`` inside the block; take them with :func:`balancing_loss`.

    For trainers that rescale the language-model loss (e.g. by a global token
    count) and must scale the balancing part differently.
    """
    previous = getattr(model, "_autoep_balance_outside", False)
    model._autoep_balance_outside = True
    try:
        yield
    finally:
        model._autoep_balance_outside = previous


@dataclass
class StepLoadStats:
    """One optimizer step's routing, summed over micro-batches and all ranks.

    routed_LE: assignments each expert was chosen for (before capacity drops).
    dropped_LE: assignments dropped by capacity (zeros when dropless).
    losses: per balancing loss, ``[L]`` values averaged over micro-batches and ranks.
    """

    layer_names: list[str]
    routed_LE: torch.Tensor
    dropped_LE: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def imbalance_L(self) -> torch.Tensor:
        """Max/mean routed load per layer (1.0 is perfect balance)."""
        mean = self.routed_LE.mean(dim=1).clamp(min=1e-9)
        return self.routed_LE.max(dim=1).values / mean

    @property
    def imbalance(self) -> float:
        """The worst layer's max/mean load."""
        return float(self.imbalance_L.max()) if self.routed_LE.numel() else 1.0

    @property
    def dropped_fraction_L(self) -> torch.Tensor:
        return self.dropped_LE.sum(dim=1) / self.routed_LE.sum(dim=1).clamp(min=1)

    @property
    def dropped_fraction(self) -> float:
        return float(self.dropped_LE.sum() / self.routed_LE.sum().clamp(min=1))

    def mean_losses(self) -> dict[str, float]:
        """Each loss averaged over layers (the quantity its coefficient multiplies)."""
        return {name: float(values.mean()) for name, values in self.losses.items()}


@torch.no_grad()
def collect_load_stats(model: nn.Module, group: dist.ProcessGroup | None = None) -> StepLoadStats | None:
    """Reduce and reset every layer's step accumulators (a collective call on every rank of ``group``).

    Returns ``None`` for a model without MoE layers.
    """
    layers = moe_layers(model)
    if not layers:
        return None
    E = max(layer.num_experts for _, layer in layers)
    rows = torch.stack([_padded_row(layer, E).to(local_device()) for _, layer in layers])
    for _, layer in layers:
        layer.load_stats.reset()
    if dist.is_initialized():
        dist.all_reduce(rows, group=group)
    rows = rows.cpu()  # one read for the whole model
    micro_batches = rows[:, -1].clamp(min=1)
    enabled = set(layers[0][1].balance.enabled_losses) | {"aux_loss", "z_loss"}
    losses = {name: rows[:, 2 * E + i] / micro_batches for i, name in enumerate(bal.LOSS_NAMES) if name in enabled}
    return StepLoadStats([path for path, _ in layers], rows[:, :E], rows[:, E : 2 * E], losses)


def _padded_row(layer: MoESite, num_experts: int) -> torch.Tensor:
    """A layer's stats row with its per-expert parts padded to ``num_experts`` (layers may differ in E)."""
    row, E = layer.load_stats.as_row(), layer.num_experts
    if E == num_experts:
        return row
    pad = row.new_zeros(num_experts - E)
    return torch.cat([row[:E], pad, row[E : 2 * E], pad, row[2 * E :]])


@torch.no_grad()
def update_expert_bias(model: nn.Module, routed_LE: torch.Tensor, rate: float, rule: bal.BiasRule) -> None:
    """Move every layer's selection bias by the aux-loss-free rule (same on every rank: counts are global)."""
    for row, (path, layer) in enumerate(moe_layers(model)):
        bias = layer.selection_bias
        if bias is None:
            raise RuntimeError(f"the router of {path} ({layer.family}) has no selection bias to update")
        delta = bal.bias_update(routed_LE[row, : layer.num_experts], rate, rule)
        bias.add_(delta.to(bias.device, bias.dtype).view(bias.shape))


def step_load_balancing(model: nn.Module, group: dist.ProcessGroup | None = None) -> StepLoadStats | None:
    """Call after every ``optimizer.step()``: reduce the step's load statistics and, when
    aux-loss-free balancing is on, update the selection biases from them."""
    stats = collect_load_stats(model, group)
    layers = moe_layers(model)
    if stats is not None and layers[0][1].balance.updates_bias:
        cfg = layers[0][1].balance
        update_expert_bias(model, stats.routed_LE, cfg.bias_update_rate, cfg.bias_update_rule)
    return stats


def expert_bias(model: nn.Module) -> torch.Tensor | None:
    """``[L, E]`` selection biases of all layers (``None`` if the routers have none)."""
    biases = [layer.selection_bias for _, layer in moe_layers(model)]
    if not biases or any(b is None for b in biases):
        return None
    return torch.stack([b.detach().float().cpu().reshape(-1) for b in biases])


def added_bias_keys(model: nn.Module) -> set[str]:
    """State-dict keys of selection biases autoep added to families that have none.

    They live in autoep checkpoints but not in Hugging Face files: loading HF
    weights starts them at zero, exporting leaves them out.
    """
    return {f"{path}.{layer.selection_bias_name}" for path, layer in moe_layers(model) if layer.added_selection_bias}
