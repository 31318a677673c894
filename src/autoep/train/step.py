"""One optimizer step with gradient accumulation and global-norm clipping.

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

from autoep.parallel.clip import clip_grad_norm_, global_grad_norm


@dataclass
class StepResult:
    loss: float  # mean over micro-batches and over data-parallel ranks
    grad_norm: float  # global norm before clipping


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
    total = torch.zeros((), dtype=torch.float32)
    count = len(micro_batches)
    for index, input_ids in enumerate(micro_batches):
        _set_sync(model, index == count - 1)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        (loss / count).backward()
        total += loss.detach().float().cpu()
    _set_sync(model, True)
    norm = clip_grad_norm_(model, max_grad_norm) if max_grad_norm else global_grad_norm(model.parameters())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    mean_loss = total / count
    if dist.is_initialized():
        mean_loss = mean_loss.to(norm.device)
        dist.all_reduce(mean_loss)
        mean_loss = mean_loss / dist.get_world_size()
    return StepResult(loss=float(mean_loss), grad_norm=float(norm))
