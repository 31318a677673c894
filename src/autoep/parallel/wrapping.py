"""How other trainers see a parallelized model: already distributed, with a DDP-style ``no_sync``.

accelerate (and transformers' Trainer through it) wraps every model it
prepares in DDP unless the model says it was prepared already; DDP on top of
FSDP2 and DTensor parameters fails, and would reduce gradients a second time.
autoep's model owns its gradient reduction, so it carries accelerate's
"already prepared" marker and a ``no_sync()`` context manager, which
accelerate's ``no_sync`` / ``accumulate`` and Trainer's gradient accumulation
call on every micro-batch but the last.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

from torch import nn
from torch.distributed.fsdp import FSDPModule


@contextlib.contextmanager
def no_sync(model: nn.Module) -> Iterator[None]:
    """Accumulate gradients locally: FSDP reduces nothing until the context exits."""
    if not isinstance(model, FSDPModule):
        yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def mark_distributed(model: nn.Module) -> None:
    """Tell wrapping trainers that ``model`` is distributed already and how to skip a gradient sync."""
    model._is_accelerate_prepared = True  # accelerate's own marker: prepare() returns the model as is
    model.no_sync = functools.partial(no_sync, model)
