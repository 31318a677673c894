"""Bytes each collective of a step sends from this rank, counted as the ops run (real or fake).

A ``TorchDispatchMode`` sees every c10d and functional collective with its
tensors, split sizes and process group, whether the backend is gloo, NCCL or
the fake one, so the same counter measures a real run and its simulation.
Conventions (per rank, ring algorithms for the dense collectives):

* all-to-all: the rows sent to other ranks (rows a rank keeps are not sent);
* all-gather: (n - 1) x the input; reduce-scatter: (n - 1)/n x the input;
  all-reduce: 2 (n - 1)/n x the tensor; groups of one rank send nothing.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

try:
    from torch._C._distributed_c10d import _resolve_process_group
except ImportError:  # pragma: no cover - torch without distributed
    _resolve_process_group = None

KINDS = ("all_to_all", "all_gather", "reduce_scatter", "all_reduce", "broadcast")

_c10d = torch.ops.c10d
_func = torch.ops._c10d_functional
_func_ag = torch.ops._c10d_functional_autograd


def _op_kinds() -> dict[Any, str]:
    table: dict[Any, str] = {}
    for name, kind in (
        ("alltoall_base_", "all_to_all"),
        ("_allgather_base_", "all_gather"),
        ("allgather_", "all_gather"),
        ("allgather_into_tensor_coalesced_", "all_gather"),
        ("_reduce_scatter_base_", "reduce_scatter"),
        ("reduce_scatter_tensor_coalesced_", "reduce_scatter"),
        ("allreduce_", "all_reduce"),
        ("allreduce_coalesced_", "all_reduce"),
        ("broadcast_", "broadcast"),
    ):
        if hasattr(_c10d, name):
            table[getattr(_c10d, name).default] = kind
    for ns in (_func, _func_ag):
        for name, kind in (
            ("all_to_all_single", "all_to_all"),
            ("all_gather_into_tensor", "all_gather"),
            ("reduce_scatter_tensor", "reduce_scatter"),
            ("all_reduce", "all_reduce"),
            ("all_reduce_", "all_reduce"),
        ):
            if hasattr(ns, name):
                table[getattr(ns, name).default] = kind
    return table


_KINDS = _op_kinds()
_FUNCTIONAL_ALL_TO_ALL = {ns.all_to_all_single.default for ns in (_func, _func_ag) if hasattr(ns, "all_to_all_single")}


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _group_of(args: tuple, kwargs: dict) -> tuple[int, int]:
    """(size, rank) of the op's process group (an object for c10d ops, a name for functional ones)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.ScriptObject):  # c10d ops see the group boxed
            value = dist.ProcessGroup.unbox(value)
        if isinstance(value, dist.ProcessGroup):
            return value.size(), value.rank()
        if isinstance(value, str) and _resolve_process_group is not None:
            try:
                group = _resolve_process_group(value)
            except (RuntimeError, ValueError):
                continue
            return group.size(), group.rank()
    return dist.get_world_size(), dist.get_rank()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _all_to_all_bytes(func: Any, args: tuple, size: int, rank: int) -> int:
    """Bytes sent to other ranks by an all-to-all (equal splits when none are given)."""
    if func in _FUNCTIONAL_ALL_TO_ALL:
        source, splits = args[0], args[2]
    else:  # c10d.alltoall_base_(output, input, output_split_sizes, input_split_sizes, group, ...)
        source, splits = args[1], args[3]
    total = _nbytes(source)
    if size <= 1 or source.numel() == 0:
        return 0
    if not splits:
        return total * (size - 1) // size
    row = total // max(source.shape[0], 1)
    return row * (sum(splits) - splits[rank])


def collective_bytes(func: Any, args: tuple, kwargs: dict) -> tuple[str, int] | None:
    """(kind, bytes this rank sends) of a collective op, or ``None`` for any other op."""
    kind = _KINDS.get(func)
    if kind is None:
        return None
    size, rank = _group_of(args, kwargs)
    if kind == "all_to_all":
        return kind, _all_to_all_bytes(func, args, size, rank)
    if size <= 1:
        return kind, 0
    if func._schema.name.startswith("c10d::"):
        # c10d ops take (outputs, inputs, ...) except all-reduce and broadcast (tensors, ...).
        inputs = _tensors(args[0]) if kind in ("all_reduce", "broadcast") else _tensors(args[1])
    else:
        inputs = _tensors(args[0])
    nbytes = sum(_nbytes(t) for t in inputs)
    if kind == "all_gather":
        return kind, nbytes * (size - 1)
    if kind == "reduce_scatter":
        return kind, nbytes * (size - 1) // size
    if kind == "all_reduce":
        return kind, 2 * nbytes * (size - 1) // size
    return kind, nbytes


@dataclass
class CommCounts:
    """Bytes sent by this rank per collective kind, and how many calls."""

    bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    @property
    def all_to_all(self) -> int:
        return self.bytes.get("all_to_all", 0)

    @property
    def dense(self) -> int:
        """Everything that is not the expert all-to-all: FSDP, TP, folding, norms."""
        return sum(v for k, v in self.bytes.items() if k != "all_to_all")

    def as_dict(self) -> dict[str, int]:
        return {k: int(self.bytes.get(k, 0)) for k in KINDS}


class CommCounter(TorchDispatchMode):
    """Counts collective bytes while active; ``counts`` holds the totals."""

    def __init__(self) -> None:
        super().__init__()
        self.counts = CommCounts()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        found = collective_bytes(func, args, kwargs)
        if found is not None:
            kind, nbytes = found
            self.counts.bytes[kind] += nbytes
            self.counts.calls[kind] += 1
        return func(*args, **kwargs)
