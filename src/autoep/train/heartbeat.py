"""Where each rank is: step and phase, so a stuck collective becomes an error that says where it stuck.

Every rank keeps one :class:`Heartbeat` (module-global: marking a phase is
two attribute writes, cheap enough for every step). The training step marks
forward / backward / gradient norm / optimizer / load balancing, the MoE
layers mark their dispatch (``forward: MoE dispatch of model.layers.3.mlp``)
through forward pre-hooks, the loop marks checkpoints. When a collective
times out (``--collective-timeout``), :func:`describe_timeout` turns the
backend's error into one line naming the rank, the step and the phase. With
``--heartbeat DIR`` every rank also rewrites ``DIR/rank_XXXXX.txt`` at each
phase, so ``cat DIR/*`` shows the last phase of every rank of a hung job.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from torch import nn


class Heartbeat:
    """This rank's current step and phase, and since when."""

    def __init__(self) -> None:
        self.rank = 0
        self.step = 0
        self.phase = "start-up"
        self.since = time.monotonic()
        self.file: Path | None = None

    def mark(self, phase: str, step: int | None = None) -> None:
        self.phase = phase
        self.since = time.monotonic()
        if step is not None:
            self.step = step
        if self.file is not None:
            self._write()

    def describe(self) -> str:
        return f"rank {self.rank}, step {self.step}, {self.phase} (for {time.monotonic() - self.since:.0f} s)"

    def write_to(self, directory: str | os.PathLike, rank: int) -> None:
        """Also keep ``directory/rank_XXXXX.txt`` up to date (a debugging aid: one small write per phase)."""
        self.rank = rank
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.file = folder / f"rank_{rank:05d}.txt"
        self._write()

    def _write(self) -> None:
        # Written aside, then renamed over: a rank frozen or killed mid-write still leaves its last whole line
        # (rewriting in place left an empty file when SIGSTOP landed between the truncation and the write).
        staged = self.file.with_name(self.file.name + ".tmp")
        staged.write_text(f"{time.strftime('%H:%M:%S')} step {self.step}: {self.phase}\n")
        os.replace(staged, self.file)


_HEARTBEAT = Heartbeat()


def heartbeat() -> Heartbeat:
    return _HEARTBEAT


def mark(phase: str, step: int | None = None) -> None:
    _HEARTBEAT.mark(phase, step)


def install_moe_phase_hooks(model: nn.Module) -> list:
    """Mark ``forward: MoE dispatch of PATH`` when each converted MoE block starts its forward."""
    from autoep.moe.sites import moe_sites

    handles = []
    for path, _ in moe_sites(model):
        block = model.get_submodule(path)

        def enter(module, args, _phase=f"forward: MoE dispatch of {path}"):
            _HEARTBEAT.mark(_phase)

        handles.append(block.register_forward_pre_hook(enter))
    return handles


_TIMEOUT_WORDS = ("timed out", "Timed out", "timeout", "Timeout", "time out")


def is_timeout(err: BaseException) -> bool:
    return any(word in str(err) for word in _TIMEOUT_WORDS)


def describe_timeout(err: BaseException, timeout_s: float | None) -> str:
    """One line: where this rank was stuck and what the backend said."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    limit = f" after {timeout_s:g} s" if timeout_s else ""
    return (
        f"a collective timed out{limit} on {_HEARTBEAT.describe()}: {first[:300]} "
        "(another rank stopped answering: look for a rank that crashed, hung or was killed)"
    )
