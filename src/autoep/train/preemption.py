"""Preemption: on SIGTERM (or SIGUSR1), finish the current step, save, and exit with a distinct code.

Clusters warn a job before taking its machines away: SLURM and Kubernetes
send SIGTERM (SLURM's ``--signal=USR1@90`` sends SIGUSR1) and kill the job a
grace period later. Every worker installs a handler that only raises a flag;
at the end of each step the ranks agree on the flags with one tiny
all-reduce (MAX), so they all stop after the same step even if the signal
reached them at different moments, save a checkpoint there, and leave. The
launcher then exits with :data:`EXIT_PREEMPTED`, which a job script can read
as "requeue me"; the next run resumes with ``--resume`` exactly where this one
stopped.

Under ``autoep train`` the signal may go to the launcher (torch elastic
forwards SIGTERM to the workers and waits up to 30 s for them) or straight to
the workers (SLURM signals every process of the step); SIGUSR1 sent to the
launcher is forwarded to its workers by :func:`forward_to_children`.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import FrameType

import torch
import torch.distributed as dist

from autoep.parallel.groups import local_device

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: temporary failure, the job should be requeued
SIGNALS = ("SIGTERM", "SIGUSR1")


class PreemptionWatcher:
    """Flags the configured signal on this rank; :meth:`agreed` is the collective decision to stop."""

    def __init__(self, signal_name: str = "SIGTERM") -> None:
        if signal_name not in SIGNALS:
            raise ValueError(f"preemption signal must be one of {SIGNALS}, got {signal_name!r}")
        self.signal = getattr(signal, signal_name)
        self.received = False
        self._previous = signal.signal(self.signal, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = True

    def agreed(self) -> bool:
        """Whether any rank was signalled (same answer everywhere; one all-reduce per call)."""
        if not dist.is_initialized():
            return self.received
        flag = torch.tensor([1.0 if self.received else 0.0], device=local_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def close(self) -> None:
        signal.signal(self.signal, self._previous)


def _children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (from /proc; empty where there is none)."""
    found = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if fields and int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def forward_to_children(signal_name: str) -> None:
    """In the launcher: pass ``signal_name`` on to the worker processes instead of dying of it."""

    def forward(signum: int, frame: FrameType | None) -> None:
        for child in _children(os.getpid()):
            try:
                os.kill(child, signum)
            except ProcessLookupError:
                pass

    signal.signal(getattr(signal, signal_name), forward)
