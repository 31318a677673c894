"""ZeRO 0 without FSDP: replicated parameters, gradients all-reduced in buckets while backward runs.

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

``set_requires_gradient_sync(False)`` (gradient accumulation, ``no_sync``)
leaves gradients to accumulate locally until a synchronised backward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd import Variable
from torch.distributed.tensor import DTensor

BUCKET_BYTES = 25 * 2**20  # DDP's default: large enough for few collectives, small enough to overlap


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
    """A flat buffer of one dtype holding the local gradients of ``params``, then one flag per parameter
    (1 where this rank produced its gradient; summed by the all-reduce)."""

    params: list[nn.Parameter]
    group: dist.ProcessGroup
    buffer: torch.Tensor
    views: list[torch.Tensor]
    arrived: list[bool]  # host copy of this rank's flags, for the current backward
    missing: int = 0  # parameters not arrived yet in this backward (the hook's O(1) readiness test)
    work: dist.Work | None = None

    def __post_init__(self) -> None:
        self.missing = len(self.params)

    @property
    def numel(self) -> int:
        return self.buffer.numel() - len(self.params)

    def take(self, index: int, param: nn.Parameter) -> None:
        """Move ``param``'s local gradient into its slice (unless it accumulated there in place) and free it."""
        view, grad = self.views[index], _local_grad(param)
        if grad.data_ptr() != view.data_ptr():
            view.copy_(grad)
        self.arrived[index] = True
        self.missing -= 1
        param.grad = None


@dataclass
class _Group:
    """The buckets reduced over one process group, started strictly in this order on every rank."""

    buckets: list[_Bucket] = field(default_factory=list)
    next_to_start: int = 0


class ReplicatedGradients:
    """Bucketed, overlapped gradient all-reduce for replicated parameters (see the module docstring)."""

    def __init__(
        self,
        reduce_groups: Sequence[tuple[Sequence[nn.Parameter], dist.ProcessGroup]],
        divide_factor: int,
        bucket_bytes: int = BUCKET_BYTES,
    ) -> None:
        self.divide_factor = divide_factor
        self.requires_gradient_sync = True
        self._groups: list[_Group] = []
        self._where: dict[nn.Parameter, tuple[_Group, _Bucket, int]] = {}
        self._in_backward = False
        for params, group in reduce_groups:
            trainable = [p for p in params if p.requires_grad]
            if trainable:
                self._groups.append(self._bucketize(list(reversed(trainable)), group, bucket_bytes))
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self._where]

    def set_requires_gradient_sync(self, sync: bool) -> None:
        self.requires_gradient_sync = sync

    def _bucketize(self, params: list[nn.Parameter], group: dist.ProcessGroup, bucket_bytes: int) -> _Group:
        """Consecutive runs of one dtype, cut at ``bucket_bytes``."""
        result, current, size = _Group(), [], 0
        for param in params:
            local = _local(param)
            if current and (size >= bucket_bytes or local.dtype != _local(current[0]).dtype):
                result.buckets.append(self._bucket(current, group))
                current, size = [], 0
            current.append(param)
            size += local.numel() * local.element_size()
        if current:
            result.buckets.append(self._bucket(current, group))
        for bucket in result.buckets:
            for index, param in enumerate(bucket.params):
                self._where[param] = (result, bucket, index)
        return result

    @staticmethod
    def _bucket(params: list[nn.Parameter], group: dist.ProcessGroup) -> _Bucket:
        locals_ = [_local(p) for p in params]
        numel = sum(t.numel() for t in locals_)
        buffer = torch.zeros(numel + len(params), dtype=locals_[0].dtype, device=locals_[0].device)
        views, offset = [], 0
        for t in locals_:
            views.append(buffer[offset : offset + t.numel()].view(t.shape))
            offset += t.numel()
        return _Bucket(params, group, buffer, views, [False] * len(params))

    # -- backward -----------------------------------------------------------------------------------
    def _on_grad(self, param: nn.Parameter) -> None:
        if not self.requires_gradient_sync:
            return
        if not self._in_backward:
            self._in_backward = True
            Variable._execution_engine.queue_callback(self._finish)
        group, bucket, index = self._where[param]
        if not bucket.arrived[index]:
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

    def _start_ready(self, group: _Group) -> None:
        while group.next_to_start < len(group.buckets) and group.buckets[group.next_to_start].missing == 0:
            self._start(group.buckets[group.next_to_start])
            group.next_to_start += 1

    @staticmethod
    def _start(bucket: _Bucket) -> None:
        flags = torch.tensor(bucket.arrived, dtype=bucket.buffer.dtype)
        bucket.buffer[bucket.numel :].copy_(flags, non_blocking=True)
        if dist.get_world_size(bucket.group) > 1:  # e.g. experts at ep = world: nothing to reduce with
            bucket.work = dist.all_reduce(bucket.buffer, group=bucket.group, async_op=True)

    def _finish(self) -> None:
        """End of backward: start what is left (missing gradients are zeros), wait, divide, hand out grads."""
        self._in_backward = False
        for group in self._groups:
            for bucket in group.buckets[group.next_to_start :]:
                for index, param in enumerate(bucket.params):
                    if bucket.arrived[index]:
                        continue
                    # Not reached by this backward: a gradient from earlier unsynchronised micro-batches
                    # is this rank's contribution; none at all counts as zeros.
                    if param.grad is None:
                        bucket.views[index].zero_()
                    else:
                        bucket.take(index, param)
                self._start(bucket)
            group.next_to_start = 0
        for group in self._groups:
            for bucket in group.buckets:
                if bucket.work is not None:
                    bucket.work.wait()
                    bucket.work = None
                bucket.buffer[: bucket.numel].div_(self.divide_factor)
                self._hand_out(bucket)

    @staticmethod
    def _hand_out(bucket: _Bucket) -> None:
        """``param.grad`` = its slice of the bucket, or ``None`` where no rank produced one.

        Only parameters this rank did not produce need the summed flag: a host read, skipped when
        every gradient arrived here (the common case, no device sync)."""
        counts = None if bucket.missing == 0 else bucket.buffer[bucket.numel :].tolist()
        for index, (param, view) in enumerate(zip(bucket.params, bucket.views, strict=True)):
            if bucket.arrived[index] or counts[index] > 0:
                param.grad = _as_grad(param, view)
            bucket.arrived[index] = False
        bucket.missing = len(bucket.params)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


def _as_grad(param: nn.Parameter, local: torch.Tensor) -> torch.Tensor:
    """``local`` shaped as ``param``'s gradient: a DTensor of the same layout for a DTensor parameter."""
    if not isinstance(param, DTensor):
        return local
    return DTensor.from_local(
        local, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
    )
