"""Where each parameter's gradient, and its produced-flag, live in a flat reduce bucket.

``packed``: parameters back to back, then one flag per parameter (ZeRO 0's
all-reduce). ``runs``: the parameters split into contiguous runs of about
equal size, one per rank of the reduce group; run ``r`` holds its parameters
then their flags and starts at ``r * region``, padded to the largest run. A
reduce-scatter then hands rank ``r`` exactly its run, flags included (ZeRO 2),
and an all-gather of the runs exchanges the parameters their owners updated
(ZeRO 1 and 2, :mod:`autoep.parallel.ownership`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

BUCKET_BYTES = 25 * 2**20  # DDP's default: large enough for few collectives, small enough to overlap


@dataclass(frozen=True)
class BucketLayout:
    offsets: list[int]  # each parameter's first element
    flags: list[int]  # each parameter's produced-flag element
    owners: list[int]  # the run (rank of the reduce group) each parameter belongs to
    region: int  # elements per run; the buffer holds ``parts * region``
    parts: int

    @property
    def numel(self) -> int:
        return self.region * self.parts


def packed(numels: list[int]) -> BucketLayout:
    """One run: parameters back to back, then their flags."""
    offsets, total = [], 0
    for n in numels:
        offsets.append(total)
        total += n
    flags = list(range(total, total + len(numels)))
    return BucketLayout(offsets, flags, [0] * len(numels), total + len(numels), 1)


def split_runs(numels: list[int], parts: int) -> list[int]:
    """The owner of each parameter: ``parts`` contiguous runs of about equal size.

    A parameter goes to the run its midpoint falls in; every rank computes the same split."""
    total = sum(numels)
    owners, start = [], 0
    for n in numels:
        owners.append(min(parts - 1, (2 * start + n) * parts // (2 * total)) if total else 0)
        start += n
    return owners


def runs(numels: list[int], parts: int) -> BucketLayout:
    """``parts`` runs of ``[parameters | flags]``, each starting at ``r * region``."""
    owners = split_runs(numels, parts)
    sizes = [0] * parts
    for owner, n in zip(owners, numels, strict=True):
        sizes[owner] += n + 1
    region = max(sizes)
    offsets, flags, filled = [], [], [0] * parts
    for owner, n in zip(owners, numels, strict=True):
        offsets.append(owner * region + filled[owner])
        filled[owner] += n
    for owner in owners:  # flags after the run's parameters, in order
        flags.append(owner * region + filled[owner])
        filled[owner] += 1
    return BucketLayout(offsets, flags, owners, region, parts)


def cut_buckets(tensors: Sequence[torch.Tensor], cap: int = BUCKET_BYTES) -> list[range]:
    """Consecutive index ranges of ``tensors`` (local shards), in order, each of one dtype and closed once it
    holds ``cap`` bytes.

    The reducer's buckets; the plan re-derives ownership with the same cut."""
    cuts, start, size = [], 0, 0
    for index, tensor in enumerate(tensors):
        if index > start and (size >= cap or tensor.dtype != tensors[start].dtype):
            cuts.append(range(start, index))
            start, size = index, 0
        size += tensor.numel() * tensor.element_size()
    if len(tensors) > start:
        cuts.append(range(start, len(tensors)))
    return cuts


def owners_by_bucket(tensors: Sequence[torch.Tensor], parts: int, cap: int = BUCKET_BYTES) -> list[int]:
    """Each tensor's owner under the reducer's buckets: :func:`split_runs` within each bucket."""
    owners: list[int] = []
    for cut in cut_buckets(tensors, cap):
        owners += split_runs([tensors[i].numel() for i in cut], parts)
    return owners
