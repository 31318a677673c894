"""One optimizer step with gradient accumulation, global-norm clipping and load balancing.

Micro-batches accumulate locally; gradients are reduced once, during the last
micro-batch's backward (``set_requires_gradient_sync``), so N micro-batches of
b give the update of one batch of N·b, last micro-batch included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

from autoep.load_balance import StepLoadStats, step_load_balancing
from autoep.parallel.clip import clip_grad_norm_, global_grad_norm


@dataclass
class StepResult:
    loss: float  # training objective (LM + weighted balancing losses), mean over micro-batches and ranks
    grad_norm: float  # global norm before clipping
    lm_loss: float | None = None  # the language-model part alone
    load: StepLoadStats | None = None  # routing of this step, summed over micro-batches and ranks


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
    """Forward/backward every micro-batch of token ids (LM loss), clip, step, zero the gradients."""
    totals = torch.zeros(2, dtype=torch.float32)  # objective, balancing part
    count = len(micro_batches)
    for index, input_ids in enumerate(micro_batches):
        _set_sync(model, index == count - 1)
        output = model(input_ids=input_ids, labels=input_ids)
        (output.loss / count).backward()
        totals[0] += output.loss.detach().float().cpu()
        if output.get("balance_loss") is not None:
            totals[1] += output["balance_loss"].float().cpu()
    _set_sync(model, True)
    norm = clip_grad_norm_(model, max_grad_norm) if max_grad_norm else global_grad_norm(model.parameters())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state = getattr(model, "autoep", None)  # set by autoep.parallelize
    load = step_load_balancing(model, state.meshes.stats_group if state is not None else None)
    means = totals / count
    if dist.is_initialized():
        means = means.to(norm.device)
        dist.all_reduce(means)
        means = means.cpu() / dist.get_world_size()
    loss, balance = means.tolist()
    return StepResult(loss=loss, grad_norm=float(norm), lm_loss=loss - balance, load=load)
