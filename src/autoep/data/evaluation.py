"""Evaluation loss and perplexity, data-parallel and exact at any layout.

Every eval row is used once, in order: global micro-batch g holds rows
``[g·b·dp, (g+1)·b·dp)``, dealt to the data-parallel ranks in blocks of b. Ranks
whose share runs out take all-padding rows without labels, so every rank runs
the same number of forwards (the MoE all-to-alls and the FSDP gathers are
collectives). Each rank sums its token losses in float64 and counts its label
tokens; one all-reduce of (sum, count) over the data group gives
loss = sum / count, the number one process would get on the whole set,
whatever the world size. Sums, not means, are what make that true with
padding and masked labels.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from autoep.data.batches import DataBatches


def _token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropies (float64) and how many tokens carry a label."""
    shift = labels[:, 1:].reshape(-1)
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    losses = nn.functional.cross_entropy(flat, shift.to(flat.device), ignore_index=-100, reduction="none")
    return losses.double().sum().cpu(), int((shift != -100).sum())


@torch.no_grad()
def evaluate(model: nn.Module, rows: DataBatches, *, dp_rank: int = 0, max_rows: int | None = None) -> dict[str, Any]:
    """``{"eval_loss", "eval_ppl", "eval_tokens"}`` over the eval rows (every rank calls it with its dp rank)."""
    total = rows.num_rows if max_rows is None else min(rows.num_rows, max_rows)
    per_global = rows.micro_batch * rows.dp_size
    steps = -(-total // per_global)
    device = next(iter(model.parameters())).device
    was_training = model.training
    model.eval()  # no router jitter, no balancing losses, no routing statistics
    sums = torch.zeros(2, dtype=torch.float64)
    try:
        for g in range(steps):
            first = g * per_global + dp_rank * rows.micro_batch
            picked = [r if r < total else None for r in range(first, first + rows.micro_batch)]
            batch = rows.rows_batch(picked).to(device)
            kwargs = {"use_cache": False}
            if batch.position_ids is not None:
                kwargs["position_ids"] = batch.position_ids
            logits = model(input_ids=batch.input_ids, **kwargs).logits
            loss_sum, count = _token_loss_sum(logits, batch.labels)
            sums += torch.stack([loss_sum, torch.tensor(float(count), dtype=torch.float64)])
    finally:
        model.train(was_training)
    if dist.is_initialized():
        state = getattr(model, "autoep", None)
        group = state.meshes.stats_group if state is not None else None
        reduced = sums.to(device) if dist.get_backend() == "nccl" else sums
        dist.all_reduce(reduced, group=group)
        sums = reduced.cpu()
    loss_sum, count = sums.tolist()
    loss = loss_sum / count if count else float("nan")
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0)), "eval_tokens": int(count)}
