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
import sys
from collections.abc import Iterator

from torch import nn

from autoep.errors import ConfigError
from autoep.parallel.data_parallel import set_gradient_sync


@contextlib.contextmanager
def no_sync(model: nn.Module) -> Iterator[None]:
    """Accumulate gradients locally: nothing is reduced until the context exits."""
    set_gradient_sync(model, False)
    try:
        yield
    finally:
        set_gradient_sync(model, True)


def mark_distributed(model: nn.Module) -> None:
    """Tell wrapping trainers that ``model`` is distributed already and how to skip a gradient sync."""
    model._is_accelerate_prepared = True  # accelerate's own marker: prepare() returns the model as is
    model.no_sync = functools.partial(no_sync, model)


def check_accelerate_state(param_dtype: str) -> None:
    """Refuse accelerate settings an autoep model would silently skip (its ``prepare`` leaves the model alone).

    Reads the process's ``AcceleratorState`` if an ``Accelerator`` exists already (same on every rank,
    no collective); does nothing when accelerate is not in use.
    """
    if "accelerate" not in sys.modules:
        return
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    if not AcceleratorState._shared_state:  # no Accelerator built yet: nothing to reconcile
        return
    state = AcceleratorState()
    if state.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        raise ConfigError(
            f"the Accelerator is set up for {state.distributed_type.value}: autoep shards the model itself; "
            "use a plain Accelerator and AutoEPConfig(zero_stage=..., ep_size=..., tp_size=...)"
        )
    precision = str(state.mixed_precision)
    if precision == "fp16":
        raise ConfigError("Accelerator(mixed_precision='fp16') is not supported; use AutoEPConfig bf16 instead")
    if precision == "bf16" and param_dtype != "bfloat16":
        raise ConfigError(
            "Accelerator(mixed_precision='bf16') does not reach an autoep model (accelerate leaves it unwrapped): "
            "set AutoEPConfig(mixed_precision={'param_dtype': 'bfloat16'}) instead"
        )
