"""One optimizer step with gradient accumulation, global-norm clipping and load balancing.

Micro-batches accumulate locally; gradients are reduced once, during the last
micro-batch's backward (``set_requires_gradient_sync``), so N micro-batches of
b give the update of one batch of N·b, last micro-batch included. A step whose
all-reduced loss or global gradient norm is not finite is skipped on every
rank alike (:mod:`autoep.train.nonfinite`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

from autoep.load_balance import StepLoadStats, collect_load_stats, step_load_balancing
from autoep.parallel.clip import clip_grad_norm_, global_grad_norm
from autoep.train.heartbeat import mark
from autoep.train.nonfinite import is_finite, nonfinite_modules


@dataclass
class StepResult:
    loss: float  # training objective (LM + weighted balancing losses), mean over micro-batches and ranks
    grad_norm: float  # global norm before clipping
    lm_loss: float | None = None  # the language-model part alone
    load: StepLoadStats | None = None  # routing of this step, summed over micro-batches and ranks
    skipped: bool = False  # non-finite loss or gradient norm: no update was applied
    nonfinite: list[str] = field(default_factory=list)  # modules with non-finite gradients (skipped steps)


def _set_sync(model: nn.Module, sync: bool) -> None:
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[torch.Tensor],
    *,
    max_grad_norm: float | None = None,
) -> StepResult:
    """Forward/backward every micro-batch of token ids (LM loss), clip, step, zero the gradients.

    If the loss or the global gradient norm is NaN/Inf (the same verdict on every
    rank: both are all-reduced), no update is applied and ``skipped`` is set.
    """
    totals = torch.zeros(2, dtype=torch.float32)  # objective, balancing part
    count = len(micro_batches)
    for index, input_ids in enumerate(micro_batches):
        _set_sync(model, index == count - 1)
        mark(f"forward of micro-batch {index + 1}/{count}")
        output = model(input_ids=input_ids, labels=input_ids)
        mark(f"backward of micro-batch {index + 1}/{count}")
        (output.loss / count).backward()
        totals[0] += output.loss.detach().float().cpu()
        if output.get("balance_loss") is not None:
            totals[1] += output["balance_loss"].float().cpu()
    _set_sync(model, True)
    mark("global gradient norm")
    norm = global_grad_norm(model.parameters())
    means = totals / count
    if dist.is_initialized():
        means = means.to(norm.device)
        dist.all_reduce(means)
        means = means.cpu() / dist.get_world_size()
    loss, balance = means.tolist()
    state = getattr(model, "autoep", None)  # set by autoep.parallelize
    stats_group = state.meshes.stats_group if state is not None else None
    if not is_finite(loss, float(norm)):
        modules = nonfinite_modules(model)
        optimizer.zero_grad(set_to_none=True)
        load = collect_load_stats(model, stats_group)  # reset the step's counts; no bias update
        return StepResult(loss, float(norm), loss - balance, load, skipped=True, nonfinite=modules)
    if max_grad_norm:
        clip_grad_norm_(model, max_grad_norm, norm=norm)
    mark("optimizer step")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    mark("load-balancing statistics")
    load = step_load_balancing(model, stats_group)
    return StepResult(loss=loss, grad_norm=float(norm), lm_loss=loss - balance, load=load)
