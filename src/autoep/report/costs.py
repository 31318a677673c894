"""Count what a piece of training costs beyond FLOPs, exactly and without timing.

Three counters, each a context manager, usable on any device (they count on
CPU what would stall or move data on a GPU):

* :class:`HostSyncCounter`: operations that need a device-to-host copy before
  the host can go on: ``.item()`` / ``bool()`` / ``int()`` of a tensor
  (``aten._local_scalar_dense``), ``.tolist()``, ``nonzero``, boolean-mask
  indexing, ``masked_select``, ``repeat_interleave`` without ``output_size``,
  ``unique``. ``nonzero_static`` and ``repeat_interleave(..., output_size=n)``
  do not sync and are not counted.
* :class:`CollectiveCounter`: collectives by name, and the bytes each rank
  sends through all-to-all (functional and c10d).
* :class:`SavedBytes`: bytes autograd keeps for backward (saved-tensor hooks),
  each storage counted once and parameters not at all.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_SYNC_OPS = {
    "aten._local_scalar_dense.default",
    "aten.nonzero.default",
    "aten.masked_select.default",
    "aten._unique2.default",
    "aten.unique_dim.default",
    "aten.unique_consecutive.default",
    "aten.bincount.default",  # sizes its output from the ids' maximum: a read-back on CUDA (not on CPU)
}


def _is_bool_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype == torch.bool


class _SyncDispatch(TorchDispatchMode):
    def __init__(self, counts: Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if name in _SYNC_OPS:
            self.counts[name.split(".")[1]] += 1
        elif name == "aten.index.Tensor" and any(_is_bool_tensor(i) for i in (args[1] or [])):
            self.counts["boolean indexing"] += 1
        elif name == "aten.repeat_interleave.Tensor" and kwargs.get("output_size") is None:
            self.counts["repeat_interleave"] += 1
        return func(*args, **kwargs)


class _SyncFunction(TorchFunctionMode):
    """``tolist`` copies to the host without an aten op on CPU: catch it at the Python level."""

    def __init__(self, counts: Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") == "tolist":
            self.counts["tolist"] += 1
        return func(*args, **(kwargs or {}))


class HostSyncCounter:
    """``with HostSyncCounter() as syncs: ...``; then ``syncs.total`` and ``syncs.counts`` by kind."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self._modes = (_SyncFunction(self.counts), _SyncDispatch(self.counts))

    def __enter__(self) -> HostSyncCounter:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class CollectiveCounter(TorchDispatchMode):
    """Collectives by op name, and all-to-all bytes sent by this rank (every destination, itself included)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()
        self.all_to_all_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith(("_c10d_functional.", "c10d.")) and "wait" not in name:
            op = name.split(".")[1]
            self.counts[op] += 1
            if "alltoall" in op or "all_to_all" in op:
                sent = args[1] if op.startswith("alltoall_base") else args[0]
                if isinstance(sent, torch.Tensor):
                    self.all_to_all_bytes += sent.numel() * sent.element_size()
        return func(*args, **(kwargs or {}))


class SavedBytes:
    """Bytes saved for backward inside the block, each storage once, parameters excluded."""

    def __init__(self, module: nn.Module | None = None) -> None:
        self.bytes = 0
        self._seen: set[int] = set()
        self._params: set[int] = set()
        if module is not None:
            for p in module.parameters():
                local = p.to_local() if hasattr(p, "to_local") else p
                self._params.add(local.untyped_storage().data_ptr())
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda x: x)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        local = t.to_local() if hasattr(t, "to_local") else t
        try:
            storage = local.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without storage (fake, nested)
            return t
        key = storage.data_ptr()
        if key not in self._seen and key not in self._params:
            self._seen.add(key)
            self.bytes += storage.nbytes()
        return t

    def __enter__(self) -> SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
