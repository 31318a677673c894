"""Data-parallel sharding for loops that autoep does not drive (Trainer, accelerate, plain torch).

accelerate shards a dataloader by world rank. With tensor parallelism
(``tp > 1``) that is wrong: the ``tp`` ranks of one data shard compute one
forward together and must see the same rows. These helpers shard by the
model's data-parallel rank instead; every rank gets the same number of
batches, so expert-parallel all-to-alls never wait on a rank that ran out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from transformers import TrainerCallback


def _state(model: nn.Module):
    state = getattr(model, "autoep", None)
    if state is None:
        raise ValueError("the model is not parallelized by autoep (call autoep.parallelize or autoep.from_pretrained)")
    return state


def data_parallel_sampler(
    dataset: Dataset, model: nn.Module, *, shuffle: bool = True, seed: int = 0, drop_last: bool = False
) -> DistributedSampler:
    """A ``DistributedSampler`` over the ``dp`` data shards of ``model``'s layout (tp peers share one)."""
    state = _state(model)
    return DistributedSampler(
        dataset, num_replicas=state.dims.dp, rank=state.dp_rank, shuffle=shuffle, seed=seed, drop_last=drop_last
    )


class ShardedDataLoader(DataLoader):
    """A ``DataLoader`` whose ``set_epoch`` reaches its ``DistributedSampler`` (Trainer calls it per epoch)."""

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


def data_parallel_loader(
    dataset: Dataset,
    model: nn.Module,
    *,
    batch_size: int,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
    **loader_kwargs: Any,
) -> ShardedDataLoader:
    """This rank's ``DataLoader`` of ``dataset``: rows of its data shard, ``batch_size`` per batch."""
    sampler = data_parallel_sampler(dataset, model, shuffle=shuffle, seed=seed, drop_last=drop_last)
    return ShardedDataLoader(
        dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn, drop_last=drop_last, **loader_kwargs
    )


class EpochCallback(TrainerCallback):
    """Sets the training sampler's epoch at each epoch's start, also after a resume mid-epoch
    (Trainer's batch-skipping wrapper hides the sampler from its own ``set_epoch`` call)."""

    def __init__(self) -> None:
        self.sampler: DistributedSampler | None = None

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self.sampler is not None:
            self.sampler.set_epoch(int(state.epoch or 0))
