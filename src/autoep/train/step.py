"""One optimizer step with gradient accumulation, global-norm clipping and load balancing.

Micro-batches accumulate locally; gradients are reduced once, during the last
micro-batch's backward (``set_requires_gradient_sync``), so N micro-batches of
b give the update of one batch of N·b, last micro-batch included. A step whose
all-reduced loss or global gradient norm is not finite is skipped on every
rank alike (:mod:`autoep.train.nonfinite`).

The language-model objective is the sum of token losses over the whole global
step divided by the number of label tokens in it (all micro-batches, all
data-parallel ranks; counted and all-reduced before the first forward). With
labels of -100 (padding, prompts, user turns) a mean per micro-batch would
weight a token by the size of the micro-batch it landed in; this way training
at any layout and accumulation equals one process on the global batch. Each
micro-batch hands transformers' loss ``num_items_in_batch``, the count it
divides the summed token losses by; when every micro-batch has the same count
(full rows) that is the plain mean, computed exactly as before. Balancing
losses keep their per-micro-batch mean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from autoep.load_balance import StepLoadStats, collect_load_stats, step_load_balancing
from autoep.parallel.clip import clip_grad_norm_, global_grad_norm
from autoep.parallel.data_parallel import set_gradient_sync
from autoep.parallel.groups import local_device
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


def _fields(micro: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(input_ids, labels, position_ids) of a ``[B, S]`` token tensor, a mapping, or a batch object."""
    if isinstance(micro, torch.Tensor):
        return micro, micro, None
    get = micro.get if isinstance(micro, Mapping) else lambda key: getattr(micro, key, None)
    ids = get("input_ids")
    labels = get("labels")
    return ids, ids if labels is None else labels, get("position_ids")


def _label_tokens(labels: torch.Tensor, masked: bool) -> int:
    """Label tokens of a micro-batch; from its shape when nothing is masked (no device-to-host copy)."""
    return int((labels[:, 1:] != -100).sum()) if masked else labels.shape[0] * (labels.shape[1] - 1)


def _dp_size(model: nn.Module) -> int:
    state = getattr(model, "autoep", None)
    if state is not None:
        return state.dims.dp
    return dist.get_world_size() if dist.is_initialized() else 1


def global_label_tokens(model: nn.Module, local: int) -> tuple[int, int]:
    """(label tokens of the global step, data-parallel size): summed over the ranks holding different data.

    Tensor-parallel peers hold the same tokens, so the sum runs over the data group, not the world.
    """
    if not dist.is_initialized():
        return local, 1
    state = getattr(model, "autoep", None)
    group = state.meshes.stats_group if state is not None else None
    count = torch.tensor([float(local)], dtype=torch.float64, device=local_device())
    dist.all_reduce(count, group=group)
    return int(count.item()), _dp_size(model)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[torch.Tensor | Mapping[str, torch.Tensor] | Any],
    *,
    max_grad_norm: float | None = None,
) -> StepResult:
    """Forward/backward every micro-batch (LM loss), clip, step, zero the gradients.

    A micro-batch is a ``[B, S]`` tensor of token ids (labels = the ids), or
    carries ``input_ids``, ``labels`` (-100: no loss) and optionally
    ``position_ids`` (packed rows: positions restart per document).
    If the loss or the global gradient norm is NaN/Inf (the same verdict on every
    rank: both are all-reduced), no update is applied and ``skipped`` is set.
    """
    totals: torch.Tensor | None = None  # objective, balancing part; on the device until the step's one read
    count = len(micro_batches)
    fields = [_fields(micro) for micro in micro_batches]
    # Plain token tensors are full rows: every label counts and every rank's batch has the same shape,
    # so the global count needs neither a host sync nor a collective.
    masked = not all(isinstance(micro, torch.Tensor) for micro in micro_batches)
    counts = [_label_tokens(labels, masked) for _, labels, _ in fields]
    mark("counting label tokens")
    if masked:
        total, dp = global_label_tokens(model, sum(counts))
    else:
        dp = _dp_size(model)
        total = sum(counts) * dp
    per_micro = max(total, 1) / (dp * count)  # what each micro-batch's summed token loss is divided by
    for index, (input_ids, labels, position_ids) in enumerate(fields):
        set_gradient_sync(model, index == count - 1)
        mark(f"forward of micro-batch {index + 1}/{count}")
        kwargs: dict[str, Any] = {}
        if position_ids is not None:  # packed rows; a cache would switch transformers' packed masks off
            kwargs.update(position_ids=position_ids, use_cache=False)
        if counts[index] != per_micro:
            kwargs["num_items_in_batch"] = per_micro
        output = model(input_ids=input_ids, labels=labels, **kwargs)
        mark(f"backward of micro-batch {index + 1}/{count}")
        (output.loss / count).backward()
        loss_part = output.loss.detach().float()
        balance_part = output.get("balance_loss")
        part = torch.stack([loss_part, loss_part.new_zeros(()) if balance_part is None else balance_part.float()])
        totals = part if totals is None else totals + part
    set_gradient_sync(model, True)
    mark("global gradient norm")
    norm = global_grad_norm(model.parameters())
    means = totals.to(norm.device) / count
    if dist.is_initialized():
        dist.all_reduce(means)
        means = means / dist.get_world_size()
    loss, balance, norm_value = torch.cat([means, norm.reshape(1).float()]).tolist()  # the step's host sync
    state = getattr(model, "autoep", None)  # set by autoep.parallelize
    stats_group = state.meshes.stats_group if state is not None else None
    if not is_finite(loss, norm_value):
        modules = nonfinite_modules(model)
        optimizer.zero_grad(set_to_none=True)
        load = collect_load_stats(model, stats_group)  # reset the step's counts; no bias update
        return StepResult(loss, norm_value, loss - balance, load, skipped=True, nonfinite=modules)
    if max_grad_norm:
        clip_grad_norm_(model, max_grad_norm, norm=norm)
    mark("optimizer step")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    mark("load-balancing statistics")
    load = step_load_balancing(model, stats_group)
    return StepResult(loss=loss, grad_norm=norm_value, lm_loss=loss - balance, load=load)
