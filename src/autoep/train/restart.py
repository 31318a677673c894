"""Automatic restarts: when a restarted attempt continues from the latest checkpoint by itself.

torch elastic (``autoep train --max-restarts N``, or ``torchrun --max-restarts
N``) restarts every worker of the job after one fails, with the same
arguments, and tells them how many restarts came before in
``TORCHELASTIC_RESTART_COUNT`` (see :func:`restart_count`). Those arguments
describe a fresh start, so a restarted job would otherwise train from step 0
again and append a second copy of every record to ``metrics.jsonl``. The policy:

* restart count 0 (a fresh start): resume only when asked (``--resume``);
* restart count K > 0: resume from ``OUTPUT/checkpoints/latest`` when it
  exists, which makes it this run's: ``autoep train`` refuses a fresh start
  with restarts into a directory that already holds checkpoints unless
  ``--resume`` (under ``torchrun``, give each run its own ``--output``); when
  the failed attempt saved none, start again from step 0 and drop its
  ``metrics.jsonl`` records, as ``--resume`` drops the records after the
  step it resumes from.

Elastic starts the new workers only once every worker of the failed attempt is
gone, and checkpoints live in a directory all ranks share, so every rank reads
the same ``latest`` and decides the same.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from autoep.checkpoint.manager import LATEST, read_metadata, resolve_checkpoint
from autoep.parallel.groups import local_device

if TYPE_CHECKING:
    from autoep.train.loop import TrainJob


def local_restart_count() -> int:
    """The restarts this process's torch elastic agent made (always 0 outside torch elastic)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)


def restart_count() -> int:
    """Which attempt this is, the same on every rank: the largest local count; collective once initialised.

    Each node's agent counts only the restarts its own failed workers caused:
    when a worker on node A dies, node B's agent may restart its healthy
    workers as a membership change and tell them 0 (pytorch/pytorch#135712).
    Without the maximum, B's ranks would start over while A's resume.
    """
    local = local_restart_count()
    if not dist.is_initialized():
        return local
    count = torch.tensor([local], dtype=torch.int64, device=local_device())
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count.item())


def has_checkpoint(output: str | os.PathLike | None) -> bool:
    """Whether the run directory ``output`` holds a ``checkpoints/latest`` pointer."""
    return output is not None and (Path(output) / "checkpoints" / LATEST).is_file()


def saved_step(job: TrainJob) -> int | None:
    """The step ``latest`` resumes at (its data position), or None when the run saved no checkpoint yet."""
    if not has_checkpoint(job.output):
        return None
    meta = read_metadata(resolve_checkpoint(job.checkpoint_root))
    return int(meta.get("data_position", meta["step"]))


def should_resume(job: TrainJob) -> bool:
    """Whether this attempt continues from ``OUTPUT/checkpoints/latest`` (see the module docstring).

    Call on every rank (it agrees on the attempt with one all-reduce). On a
    restart, rank 0 also says what happens, and clears the failed attempt's
    metrics when it starts over, so ``metrics.jsonl`` holds each step once
    whichever way the attempt begins.
    """
    attempt = restart_count()
    if attempt == 0:
        return job.resume
    step = saved_step(job)
    if (dist.get_rank() if dist.is_initialized() else 0) == 0:
        _announce(job, attempt, step)
    return job.resume or step is not None


def _announce(job: TrainJob, attempt: int, step: int | None) -> None:
    if step is not None:
        print(f"restart {attempt}: resuming from step {step}", flush=True)
        return
    print(f"restart {attempt}: no checkpoint saved yet, starting again from step 0", flush=True)
    if job.output is not None:
        from autoep.train.loop import _truncate_metrics  # the loop imports this module

        _truncate_metrics(Path(job.output) / "metrics.jsonl", keep_through=0)
