"""ZeRO 1 and 2 as the ZeRO paper defines them: replicated parameters, optimizer state split by parameter.

Gradients are reduced in buckets (:mod:`autoep.parallel.replicate`) whose
parameters are split into contiguous runs of about equal size, one run per
rank of the reduce group (:mod:`autoep.parallel.bucket_layout`). ZeRO 1
all-reduces the buckets, so every rank holds the whole mean gradient; ZeRO 2
reduce-scatters them, so each rank holds only its run's. Either way a rank's
optimizer keeps state for, and updates, only the parameters of its runs.
After the step every bucket is all-gathered in place: each rank copies its
updated parameters into its run of the bucket buffer (whose gradients the
step has consumed; under ZeRO 2 a buffer allocated for the exchange), one
all-gather per bucket fills in the other runs, and the other ranks'
parameters are copied out of it.

Against FSDP's ZeRO 1/2 (sharded parameters, one blocking all-gather per unit
in every forward and a reduce-scatter per unit in backward) this holds whole
parameters at rest, as DeepSpeed's ZeRO 1/2 do, for one parameter exchange
per step. Because a parameter has a single owner, its
update needs nothing from other ranks (Muon orthogonalises whole matrices)
and its optimizer state is an ordinary tensor under the parameter's name (an
expert-dimension DTensor for experts), which a checkpoint stores like any
other and any layout can load.

The optimizer holds every parameter, so ``zero_grad`` and learning-rate
schedules see the whole model. Global optimizer-step hooks (torch's
``register_optimizer_step_pre_hook``/``_post_hook``) make this work for any
optimizer over the model's parameters, `build_optimizer`'s or the user's: before
a step they drop the gradients of the parameters this rank does not own, so
the optimizer skips them and creates no state for them; after it, if a
synchronised backward has happened since the last exchange, they run the
exchange. (A step with no backward before it, such as the zero-learning-rate
step a checkpoint load runs to create optimizer state, exchanges nothing.)
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from autoep.parallel.replicate import ReplicatedGradients, _Bucket, _local

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # newer torch's name


class _OwnedBucket:
    """One bucket's split: which of its parameters this rank updates, and its run of the buffer."""

    def __init__(self, bucket: _Bucket) -> None:
        self.bucket = bucket
        self.mine = [i for i, owner in enumerate(bucket.layout.owners) if owner == bucket.rank]
        self.others = [i for i, owner in enumerate(bucket.layout.owners) if owner != bucket.rank]

    def start(self) -> dist.Work | None:
        """Put this rank's updated parameters into its run and all-gather the runs (asynchronously)."""
        bucket = self.bucket
        if bucket.size == 1:
            return None
        buffer = bucket.allocate()
        if self.mine:
            torch._foreach_copy_([bucket.views[i] for i in self.mine], [_local(bucket.params[i]) for i in self.mine])
        region = bucket.layout.region
        mine = buffer[bucket.rank * region : (bucket.rank + 1) * region]
        return _all_gather_single(buffer, mine, group=bucket.group, async_op=True)

    def finish(self) -> None:
        """Copy the other ranks' parameters out; the buffer no longer holds gradients."""
        bucket = self.bucket
        if self.others:
            params = [_local(bucket.params[i]) for i in self.others]
            torch._foreach_copy_(params, [bucket.views[i] for i in self.others])
        for param in bucket.params:
            param.grad = None
        if bucket.scatter:
            bucket.release()


class OwnedUpdates:
    """Split the optimizer's work over the ranks of each reduce group (see the module docstring)."""

    def __init__(self, reducer: ReplicatedGradients) -> None:
        self.reducer = reducer
        self._buckets = [_OwnedBucket(bucket) for bucket in reducer.buckets()]
        self._unowned = [b.bucket.params[i] for b in self._buckets for i in b.others]
        self._param_ids = {id(p) for b in self._buckets for p in b.bucket.params}
        self._exchanged = reducer.reductions
        self._holds: weakref.WeakKeyDictionary[torch.optim.Optimizer, bool] = weakref.WeakKeyDictionary()
        # The hooks are global and outlive a model only as no-ops: they hold this object weakly.
        this = weakref.ref(self)
        pre = register_optimizer_step_pre_hook(lambda opt, *_: (o := this()) and o._before_step(opt))
        post = register_optimizer_step_post_hook(lambda opt, *_: (o := this()) and o._after_step(opt))
        self._handles = [pre, post]
        weakref.finalize(self, lambda handles=tuple(self._handles): [h.remove() for h in handles])

    @property
    def every_rank_owns(self) -> bool:
        """Whether every rank updates some parameter (the same answer on every rank).

        True when one reduce group's buckets give each of its ranks a run. Otherwise a rank with no
        optimizer state would, alone, run the state initialisation (a step) of a checkpoint, and its
        exchange would hang. (The expert groups are alike, so one group stands for its kind.)"""
        covered: dict[tuple[int, ...], set[int]] = {}
        for owned in self._buckets:
            ranks = tuple(dist.get_process_group_ranks(owned.bucket.group))
            covered.setdefault(ranks, set()).update(owned.bucket.layout.owners)
        return any(len(owners) == len(ranks) for ranks, owners in covered.items())

    @property
    def pending(self) -> bool:
        """Whether gradients were reduced since the last exchange (the same answer on every rank)."""
        return self.reducer.reductions != self._exchanged

    def _updates_model(self, optimizer: torch.optim.Optimizer) -> bool:
        holds = self._holds.get(optimizer)
        if holds is None:
            ids = (id(p) for group in optimizer.param_groups for p in group["params"])
            holds = self._holds[optimizer] = any(i in self._param_ids for i in ids)
        return holds

    def _before_step(self, optimizer: torch.optim.Optimizer) -> Any:
        if self._updates_model(optimizer):
            for param in self._unowned:
                param.grad = None

    def _after_step(self, optimizer: torch.optim.Optimizer) -> Any:
        if self._updates_model(optimizer) and self.pending:
            self.exchange()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    @torch.no_grad()
    def exchange(self) -> None:
        """Every rank ends with every updated parameter: one in-place all-gather per bucket (a collective)."""
        works = [(owned, owned.start()) for owned in self._buckets]
        for owned, work in works:
            if work is not None:
                work.wait()
            owned.finish()
        self._exchanged = self.reducer.reductions

    def sync_parameters(self) -> None:
        """Exchange now if a step may have left other ranks' parameters stale (before saving, exporting)."""
        if self.pending:
            self.exchange()
