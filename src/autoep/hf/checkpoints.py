"""autoep checkpoints inside Trainer's ``checkpoint-N`` folders.

Trainer names, rotates and finds its checkpoint folders; inside each, autoep
writes its own DCP checkpoint (``autoep/step_XXXXXXXX``: model and optimizer,
sharded, checksummed, resumable under another ep / ZeRO / tp layout) and the
LR scheduler's state (``scheduler.pt``, written by rank 0). Trainer's own
files (``trainer_state.json``, RNG states) sit beside them as usual.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from autoep.checkpoint.manager import CheckpointState, load_checkpoint, save_checkpoint
from autoep.errors import CheckpointError
from autoep.optim.schedule import scheduler_state_for

AUTOEP_DIR = "autoep"
SCHEDULER_FILE = "scheduler.pt"


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def save_model_state(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, step: int) -> Path:
    """Model (and optimizer, unless ``None``) as an autoep checkpoint under ``folder/autoep``; every rank."""
    return save_checkpoint(Path(folder) / AUTOEP_DIR, model, optimizer, step=step, keep_last=1)


def check_resumable(folder: str | Path) -> None:
    """Raise a one-line :class:`CheckpointError` unless ``folder`` holds an autoep checkpoint."""
    if not (Path(folder) / AUTOEP_DIR).is_dir():
        raise CheckpointError(
            f"{folder} has no autoep checkpoint ({AUTOEP_DIR}/): it was not written by autoep.hf.Trainer"
        )


def load_model_state(
    folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> CheckpointState:
    """Load ``folder/autoep`` into ``model`` (and ``optimizer``), at whatever layout they now have."""
    check_resumable(folder)
    return load_checkpoint(Path(folder) / AUTOEP_DIR, model, optimizer)


def save_scheduler(folder: str | Path, scheduler) -> None:
    if scheduler is not None and _is_main():
        torch.save(scheduler.state_dict(), Path(folder) / SCHEDULER_FILE)


def load_scheduler(folder: str | Path, scheduler, optimizer: torch.optim.Optimizer) -> None:
    """The saved schedule, its per-group lists rebuilt for this layout's parameter groups."""
    path = Path(folder) / SCHEDULER_FILE
    if scheduler is not None and path.is_file():
        saved = torch.load(path, weights_only=False)
        scheduler.load_state_dict(scheduler_state_for(optimizer, saved))
