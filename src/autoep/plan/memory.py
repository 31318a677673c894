"""Peak memory of a step split by what holds it, from torch's FSDP-aware memory tracker.

``FSDPMemTracker`` (``torch.distributed._tools``) follows every tensor storage
a step creates, real or fake, and files it as sharded/unsharded parameter,
gradient, optimizer state, activation, temporary, or FSDP's all-gather and
reduce-scatter buffers. :class:`StepMemoryTracker` adds two things it lacks:
the largest value each category reaches during the step, and the share of the
activations that the MoE dispatch path created (the tokens sent, received and
run through the experts), tagged while a dispatcher is between ``dispatch``
and ``combine``.
"""

from __future__ import annotations

import weakref
from copy import deepcopy
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker, _FSDPRefType
from torch.distributed._tools.mem_tracker import _TOTAL_KEY

_ACTIVATION_KINDS = (_FSDPRefType.ACT, _FSDPRefType.TEMP)
COMPONENTS = ("params", "grads", "optimizer", "activations", "dispatch", "other")

_GROUPS = {
    "params": (_FSDPRefType.SHARDED_PARAM, _FSDPRefType.UNSHARDED_PARAM, _FSDPRefType.ALL_GATHER),
    "grads": (_FSDPRefType.SHARDED_GRAD, _FSDPRefType.UNSHARDED_GRAD, _FSDPRefType.REDUCE_SCATTER),
    "optimizer": (_FSDPRefType.OPT,),
    "activations": (_FSDPRefType.ACT, _FSDPRefType.TEMP, _FSDPRefType.INP),
}


@dataclass
class MemoryBreakdown:
    """Bytes per component. ``activations`` excludes ``dispatch`` (the MoE dispatch buffers)."""

    params: int = 0
    grads: int = 0
    optimizer: int = 0
    activations: int = 0
    dispatch: int = 0
    other: int = 0

    @property
    def total(self) -> int:
        return sum(getattr(self, c) for c in COMPONENTS)

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}

    def scaled(self, factor: float) -> MemoryBreakdown:
        return MemoryBreakdown(**{c: round(getattr(self, c) * factor) for c in COMPONENTS})

    def __add__(self, other: MemoryBreakdown) -> MemoryBreakdown:
        return MemoryBreakdown(**{c: getattr(self, c) + getattr(other, c) for c in COMPONENTS})

    def __sub__(self, other: MemoryBreakdown) -> MemoryBreakdown:
        return MemoryBreakdown(**{c: getattr(self, c) - getattr(other, c) for c in COMPONENTS})


def breakdown(snapshot: dict[Any, int], dispatch: int) -> MemoryBreakdown:
    """Group one device's tracker snapshot into :data:`COMPONENTS`."""
    grouped = {name: sum(snapshot.get(k, 0) for k in kinds) for name, kinds in _GROUPS.items()}
    known = sum(grouped.values())
    other = snapshot.get(_TOTAL_KEY, known) - known
    grouped["activations"] -= dispatch
    return MemoryBreakdown(**grouped, dispatch=dispatch, other=other)


class StepMemoryTracker(FSDPMemTracker):
    """``FSDPMemTracker`` plus per-category maxima and the live MoE dispatch buffers at the peak."""

    def __init__(self, mod: nn.Module, optm: torch.optim.Optimizer | None = None) -> None:
        super().__init__(mod, optm)
        self.routed_depth = 0
        self._dispatch_refs: dict[int, tuple[weakref.ref, Any]] = {}
        self.dispatch_at_peak = 0
        self.peak_phase = "forward"
        self.component_max = MemoryBreakdown()

    # -- MoE dispatch tagging ---------------------------------------------------------------------
    def _track(self, reftype, t: torch.Tensor) -> None:
        super()._track(reftype, t)
        if self.routed_depth <= 0:
            return
        for st in _storages(t):
            key = id(st)
            winfo, _ = self._WINFO.get(st, (None, None))
            if winfo is None or key in self._dispatch_refs:
                continue
            self._dispatch_refs[key] = (weakref.ref(st, lambda _, k=key: self._dispatch_refs.pop(k, None)), winfo)

    def _dispatch_live(self) -> int:
        """Bytes of live storages the dispatch path created that are still activations or temporaries.

        FSDP's all-gathers for the experts run inside that path too; the tracker
        re-files their outputs as parameters, so the category is read now, not at creation.
        """
        return sum(w.mem_consumed for _, w in self._dispatch_refs.values() if w.reftype in _ACTIVATION_KINDS)

    # -- peaks ----------------------------------------------------------------------------------------
    def _update_peak_stats(self, peak_state) -> None:
        before = dict(self._peak_mem)
        super()._update_peak_stats(peak_state)
        for dev, snap in self._curr_mem_snap.items():
            new_peak = self._peak_mem.get(dev, 0) > before.get(dev, 0)
            live = self._dispatch_live() if new_peak or self.routed_depth > 0 else None
            if new_peak:
                self.dispatch_at_peak = live
                self.peak_phase = "optimizer" if self._in_opt else "backward" if self._mod_tracker.is_bw else "forward"
            self._update_component_max(snap, live)

    def _update_component_max(self, snap: dict[Any, int], dispatch: int | None) -> None:
        now, best = breakdown(snap, dispatch or 0), self.component_max
        for name in COMPONENTS:
            if name == "dispatch" and dispatch is None:
                continue
            if getattr(now, name) > getattr(best, name):
                setattr(best, name, getattr(now, name))

    def reset_peak(self) -> None:
        """Start measuring afresh from the current state (e.g. after a warm-up step)."""
        self.reset_mod_stats()
        self._peak_mem_snap = deepcopy(self._curr_mem_snap)
        self._peak_mem = {dev: snap[_TOTAL_KEY] for dev, snap in self._curr_mem_snap.items()}
        self.dispatch_at_peak = self._dispatch_live()
        self.component_max = MemoryBreakdown()
        for snap in self._curr_mem_snap.values():
            self._update_component_max(snap, self.dispatch_at_peak)

    # -- results --------------------------------------------------------------------------------------
    def peak(self) -> MemoryBreakdown:
        """The breakdown at the moment of the peak (the components add up to the peak)."""
        snap = next(iter(self._peak_mem_snap.values()), {})
        return breakdown(snap, self.dispatch_at_peak)

    def raw_peak(self) -> dict[str, int]:
        """The tracker's own categories at the peak (for diagnosis)."""
        snap = next(iter(self._peak_mem_snap.values()), {})
        return {getattr(k, "value", str(k)): int(v) for k, v in snap.items()}

    def component_peaks(self) -> MemoryBreakdown:
        """Each component's own maximum during the step (not at one moment; ``total`` is not the peak)."""
        return deepcopy(self.component_max)


def _storages(t: torch.Tensor) -> list[torch.UntypedStorage]:
    from torch.distributed._tools.common_utils import get_untyped_storages

    return list(get_untyped_storages(t))


class RoutedRegion:
    """Wraps a dispatcher so the tracker knows when the MoE dispatch path runs (composition, no patching)."""

    def __init__(self, inner: Any, tracker: StepMemoryTracker) -> None:
        self.inner, self.tracker = inner, tracker

    def dispatch(self, *args: Any) -> Any:
        self.tracker.routed_depth += 1
        return self.inner.dispatch(*args)

    def combine(self, *args: Any) -> Any:
        try:
            return self.inner.combine(*args)
        finally:
            self.tracker.routed_depth -= 1

    # The same span when a layer drives the exchange in steps (overlapping other work with it).
    def start_dispatch(self, *args: Any, **kwargs: Any) -> Any:
        self.tracker.routed_depth += 1
        return self.inner.start_dispatch(*args, **kwargs)

    def finish_combine(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.inner.finish_combine(*args, **kwargs)
        finally:
            self.tracker.routed_depth -= 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
