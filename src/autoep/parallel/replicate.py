"""ZeRO 0-2 without FSDP: replicated parameters, gradients reduced in buckets while backward runs.

FSDP2 can replicate (a ``(replicate, shard=1)`` mesh), but every unit then
copies its gradients into a fresh reduce buffer, divides them into a second
fresh buffer and views them back out, and wraps every parameter in a DTensor
the forward must unwrap. Replicated parameters need none of that, and this is
what DDP does instead (torch's ``replicate``/DDP reducer, which takes a single
process group and cannot hold expert-parallel DTensors):

* parameters stay as they are: plain tensors for the dense path, the
  expert-dimension DTensors of expert parallelism (and tensor-parallel
  DTensors) for the rest. Only their local tensors are reduced;
* each reduce group (the ``dp`` ranks for dense parameters, the ``edp`` ranks
  for experts) owns persistent flat buckets, filled in reverse registration
  order (the order backward produces gradients);
* a post-accumulate-grad hook copies a finished gradient into its bucket and
  frees it; a full bucket's all-reduce starts at once, asynchronously, so it
  overlaps the rest of backward. Buckets of a group start strictly in order,
  so every rank issues the same collectives in the same order;
* when backward ends, a queued callback starts the buckets still waiting
  (gradients a rank did not produce count as zeros), waits, divides by the
  divide factor (``dp``, DESIGN.md: expert gradients arrive summed over the EP
  group) and points each ``param.grad`` at its slice of the bucket. One extra
  element per parameter counts the ranks that produced a gradient, so a
  parameter no rank touched keeps ``grad = None``, exactly as in one process.

For ZeRO 1 and 2 the buckets are laid out in runs, one per rank
(:mod:`autoep.parallel.bucket_layout`). ZeRO 1 all-reduces them like ZeRO 0;
ZeRO 2 reduce-scatters them, so each rank receives only the gradients of the
parameters it owns (its run, into a persistent shard of ``1/size`` of the
bucket), the others keep ``grad = None``, and the bucket buffer is freed once
its reduction is done. Buffers are allocated on first use, on the device the
parameters have by then (a model built on the meta device is materialised
after sharding).

``set_requires_gradient_sync(False)`` (gradient accumulation, ``no_sync``)
leaves gradients to accumulate locally until a synchronised backward.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd import Variable
from torch.distributed.tensor import DTensor

from autoep.parallel.bucket_layout import BUCKET_BYTES, BucketLayout, cut_buckets, packed, runs

_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor  # newer name

# Set on a parameter whose gradient only its owner holds (ZeRO 2): the size of the group that splits them.
_GRAD_SPLIT = "_autoep_grad_split"


def grad_split(param: nn.Parameter) -> int:
    """Over how many ranks of its reduce group ``param``'s gradient is split, holder by holder (1: not split)."""
    return getattr(param, _GRAD_SPLIT, 1)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


def _local_grad(param: nn.Parameter) -> torch.Tensor:
    """This rank's part of ``param.grad`` in the parameter's own layout.

    A tensor-parallel gradient can arrive ``Partial`` over the tp lanes; like FSDP, it is first
    redistributed to the parameter's placements (a collective every lane issues in the same order)."""
    grad = param.grad
    if isinstance(grad, DTensor):
        if grad.placements != param.placements:
            grad = grad.redistribute(param.device_mesh, param.placements)
        return grad._local_tensor
    return grad


@dataclass
class _Bucket:
    """The local gradients of ``params`` in one flat buffer of one dtype, laid out by ``layout``, with one flag
    per parameter (1 where this rank produced its gradient; summed by the reduction)."""

    params: list[nn.Parameter]
    group: dist.ProcessGroup
    layout: BucketLayout
    scatter: bool  # reduce-scatter into ``shard`` (ZeRO 2) instead of all-reduce
    scatter_by_all_reduce: bool  # gloo's reduce-scatter costs more than its all-reduce: all-reduce, then slice
    arrived: list[bool]  # host copy of this rank's flags, for the current backward
    buffer: torch.Tensor | None = None
    views: list[torch.Tensor] = field(default_factory=list)
    shard: torch.Tensor | None = None  # this rank's run after a reduce-scatter
    missing: int = 0  # parameters not arrived yet in this backward (the hook's O(1) readiness test)
    work: dist.Work | None = None
    pending: bool = False  # started, not handed out yet

    def __post_init__(self) -> None:
        self.missing = len(self.params)
        self.size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group) if self.size > 1 else 0

    def allocate(self) -> torch.Tensor:
        """The buffer, on the parameters' current device; views of it for every parameter."""
        local = _local(self.params[0])
        if self.buffer is None or self.buffer.device != local.device:
            # Every element a reduction reads is written first (gradients, zeros for missing ones, flags), save
            # the padding, which is never read: a bucket allocated every backward (ZeRO 2) is not cleared.
            new = torch.empty if self.scatter else torch.zeros
            self.buffer = new(self.layout.numel, dtype=local.dtype, device=local.device)
            self.views = [self._view(self.buffer, p, o) for p, o in zip(self.params, self.layout.offsets, strict=True)]
            self._flag_index = torch.tensor(self.layout.flags, device=local.device)
        return self.buffer

    def release(self) -> None:
        self.buffer, self.views = None, []

    @staticmethod
    def _view(flat: torch.Tensor, param: nn.Parameter, offset: int) -> torch.Tensor:
        local = _local(param)
        return flat[offset : offset + local.numel()].view(local.shape)

    def take(self, index: int, param: nn.Parameter) -> None:
        """Move ``param``'s local gradient into its slice (unless it accumulated there in place) and free it."""
        view, grad = self.views[index], _local_grad(param)
        if grad.data_ptr() != view.data_ptr():
            view.copy_(grad)
        self.arrived[index] = True
        self.missing -= 1
        param.grad = None

    def start(self) -> None:
        flags = torch.tensor(self.arrived, dtype=self.buffer.dtype)
        self.buffer.index_copy_(0, self._flag_index, flags.to(self.buffer.device, non_blocking=True))
        self.pending = True
        if self.scatter:
            if self.shard is None or self.shard.device != self.buffer.device:
                self.shard = self.buffer.new_empty(self.layout.region)
            if not self.scatter_by_all_reduce:
                self.work = _reduce_scatter_single(self.shard, self.buffer, group=self.group, async_op=True)
                return
        if self.size > 1:  # e.g. experts at ep = world: nothing to reduce with
            self.work = dist.all_reduce(self.buffer, group=self.group, async_op=True)

    def hand_out(self, divide_factor: int) -> None:
        """Divide, and set ``param.grad`` to its reduced slice, or ``None`` where no rank produced one (or,
        after a reduce-scatter, another rank holds it).

        The summed flag needs a host read only for parameters this rank did not produce: skipped when every
        gradient arrived here (the common case, no device sync)."""
        if self.scatter and self.scatter_by_all_reduce:
            region = self.layout.region
            self.shard.copy_(self.buffer[self.rank * region : (self.rank + 1) * region])
        reduced = self.shard if self.scatter else self.buffer
        reduced.div_(divide_factor)  # the flags too: only whether they are above zero matters
        base = self.rank * self.layout.region if self.scatter else 0
        counts = None if self.missing == 0 else reduced[[f - base for f in self._mine(self.layout.flags)]].tolist()
        mine = iter(counts or [])
        for index, param in enumerate(self.params):
            owned = not self.scatter or self.layout.owners[index] == self.rank
            count = next(mine) if counts is not None and owned else 1
            if owned and (self.arrived[index] or count > 0):
                param.grad = _as_grad(param, self._view(reduced, param, self.layout.offsets[index] - base))
            elif self.scatter:
                param.grad = None
            self.arrived[index] = False
        self.missing = len(self.params)
        self.pending = False
        if self.scatter:
            self.release()

    def _mine(self, positions: list[int]) -> list[int]:
        if not self.scatter:
            return positions
        return [x for x, owner in zip(positions, self.layout.owners, strict=True) if owner == self.rank]


@dataclass
class _Group:
    """The buckets reduced over one process group, started strictly in this order on every rank."""

    buckets: list[_Bucket] = field(default_factory=list)
    next_to_start: int = 0


class ReplicatedGradients:
    """Bucketed, overlapped gradient reduction for replicated parameters (see the module docstring).

    ``runs``: lay buckets out in per-rank runs (ZeRO 1/2); ``scatter``: reduce-scatter them (ZeRO 2)."""

    def __init__(
        self,
        reduce_groups: Sequence[tuple[Sequence[nn.Parameter], dist.ProcessGroup]],
        divide_factor: int,
        bucket_bytes: int = BUCKET_BYTES,
        *,
        runs: bool = False,
        scatter: bool = False,
    ) -> None:
        if scatter and not runs:
            raise ValueError("a reduce-scatter needs the per-rank run layout")
        self.divide_factor = divide_factor
        self.requires_gradient_sync = True
        self._runs, self._scatter = runs, scatter
        self._groups: list[_Group] = []
        self._where: dict[nn.Parameter, tuple[_Group, _Bucket, int]] = {}
        self._in_backward = False
        self.reductions = 0  # synchronised backwards so far
        for params, group in reduce_groups:
            trainable = [p for p in params if p.requires_grad]
            if trainable:
                self._groups.append(self._bucketize(list(reversed(trainable)), group, bucket_bytes))
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self._where]

    def set_requires_gradient_sync(self, sync: bool) -> None:
        self.requires_gradient_sync = sync

    def buckets(self) -> Iterator[_Bucket]:
        """Every bucket, group by group, in the order they are reduced."""
        for group in self._groups:
            yield from group.buckets

    def _bucketize(self, params: list[nn.Parameter], group: dist.ProcessGroup, bucket_bytes: int) -> _Group:
        """Consecutive runs of one dtype, cut at ``bucket_bytes``."""
        result = _Group()
        for cut in cut_buckets([_local(p) for p in params], bucket_bytes):
            result.buckets.append(self._bucket([params[i] for i in cut], group))
        for bucket in result.buckets:
            for index, param in enumerate(bucket.params):
                self._where[param] = (result, bucket, index)
        return result

    def _bucket(self, params: list[nn.Parameter], group: dist.ProcessGroup) -> _Bucket:
        numels = [_local(p).numel() for p in params]
        size = dist.get_world_size(group)
        layout = runs(numels, size) if self._runs else packed(numels)
        scatter = self._scatter and size > 1
        if scatter:
            for param in params:
                setattr(param, _GRAD_SPLIT, size)
        by_all_reduce = scatter and dist.get_backend(group) == "gloo"
        return _Bucket(params, group, layout, scatter, by_all_reduce, [False] * len(params))

    # -- backward -----------------------------------------------------------------------------------
    def _on_grad(self, param: nn.Parameter) -> None:
        if not self.requires_gradient_sync:
            return
        if not self._in_backward:
            self._begin_backward()
        group, bucket, index = self._where[param]
        if not bucket.arrived[index]:
            if bucket.missing == len(bucket.params):  # the bucket's first gradient of this backward
                bucket.allocate()
            bucket.take(index, param)  # freed now, before the rest of backward runs
            self._start_ready(group)
            return
        # A second gradient in one backward (re-entrant recomputation): add it, unless already sent.
        if group.buckets.index(bucket) < group.next_to_start:
            raise RuntimeError(
                "a gradient arrived after its bucket's all-reduce started (re-entrant activation "
                "checkpointing?); use gradient_checkpointing_kwargs={'use_reentrant': False}"
            )
        bucket.views[index].add_(_local_grad(param))
        param.grad = None

    def _begin_backward(self) -> None:
        self._in_backward = True
        Variable._execution_engine.queue_callback(self._finish)
        for bucket in self.buckets():
            if bucket.scatter and bucket.shard is not None:
                self._check_no_reduced_grads(bucket)

    @staticmethod
    def _check_no_reduced_grads(bucket: _Bucket) -> None:
        """A gradient handed out by the last reduce-scatter must be gone (``zero_grad`` or a step) before the
        next synchronised backward: this rank holds only its own part, so it cannot add into it."""
        storage = bucket.shard.untyped_storage().data_ptr()
        for param in bucket.params:
            if param.grad is not None and _local(param.grad).untyped_storage().data_ptr() == storage:
                raise RuntimeError(
                    "ZeRO 2 cannot add a synchronised backward's gradients to the previous one's: call "
                    "optimizer.zero_grad() after each step, and accumulate micro-batches with gradient sync "
                    "off (autoep.train.train_step, accelerate's no_sync) until the last one"
                )

    def _start_ready(self, group: _Group) -> None:
        while group.next_to_start < len(group.buckets) and group.buckets[group.next_to_start].missing == 0:
            group.buckets[group.next_to_start].start()
            group.next_to_start += 1
            self._release_reduced(group)

    def _release_reduced(self, group: _Group) -> None:
        """Hand out the reduce-scatters already done, freeing their buckets while backward goes on (ZeRO 2)."""
        for bucket in group.buckets[: group.next_to_start]:
            if bucket.scatter and bucket.pending and bucket.work.is_completed():
                bucket.work.wait()
                bucket.work = None
                bucket.hand_out(self.divide_factor)

    def _finish(self) -> None:
        """End of backward: start what is left (missing gradients are zeros), wait, divide, hand out grads."""
        self._in_backward = False
        for group in self._groups:
            for bucket in group.buckets[group.next_to_start :]:
                bucket.allocate()
                for index, param in enumerate(bucket.params):
                    if bucket.arrived[index]:
                        continue
                    # Not reached by this backward: a gradient from earlier unsynchronised micro-batches
                    # is this rank's contribution; none at all counts as zeros.
                    if param.grad is None:
                        bucket.views[index].zero_()
                    else:
                        bucket.take(index, param)
                bucket.start()
            group.next_to_start = 0
        for bucket in self.buckets():
            if bucket.work is not None:
                bucket.work.wait()
                bucket.work = None
            if bucket.pending:
                bucket.hand_out(self.divide_factor)
        self.reductions += 1

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        for param in self._where:
            if hasattr(param, _GRAD_SPLIT):
                delattr(param, _GRAD_SPLIT)


def _as_grad(param: nn.Parameter, local: torch.Tensor) -> torch.Tensor:
    """``local`` shaped as ``param``'s gradient: a DTensor of the same layout for a DTensor parameter."""
    if not isinstance(param, DTensor):
        return local
    return DTensor.from_local(
        local, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
    )
