"""A world of N ranks inside this process: torch's ``fake`` process group plus fake tensors.

Collectives of the fake backend return at once and move no data; fake tensors
carry shapes, dtypes and devices but no storage. Together they let one process
run rank 0's side of a training step of a model far larger than its memory,
at the real world size, with every collective issued at its real size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.testing._internal.distributed.fake_pg import FakeStore

from autoep.errors import ConfigError


@contextlib.contextmanager
def fake_world(world_size: int, rank: int = 0) -> Iterator[FakeTensorMode]:
    """Initialise a fake default process group of ``world_size`` ranks (this process is ``rank``).

    Yields the fake-tensor mode to run the step under (not entered: device
    meshes must be built outside it, since building them reads real tensors).
    """
    if dist.is_initialized():
        raise ConfigError("autoep.plan simulates in a process of its own: torch.distributed is already initialised")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield FakeTensorMode(allow_non_fake_inputs=True)
    finally:
        dist.destroy_process_group()
