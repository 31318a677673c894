"""Start local worker processes through torch's elastic launcher.

``run_local(fn, n)`` runs ``fn`` on ``n`` local ranks with the default process
group already initialised (gloo on CPU, NCCL with one GPU per rank on CUDA)
and returns each rank's return value. Being the elastic launcher, the same
machinery reaches many machines through ``--nnodes``/``--rdzv-*``.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _worker(fn: Callable[..., Any], backend: str, args: tuple[Any, ...]) -> Any:
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    # Intra-op threads are shared by all local ranks; oversubscription makes CPU runs crawl.
    if backend == "gloo":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
    dist.init_process_group(backend)
    try:
        return fn(*args)
    finally:
        dist.destroy_process_group()


def run_local(
    fn: Callable[..., Any],
    nprocs: int,
    *args: Any,
    backend: str | None = None,
    nnodes: str = "1:1",
    rdzv_endpoint: str = "localhost:0",
    rdzv_backend: str = "c10d",
    quiet: bool = True,
) -> dict[int, Any]:
    """Run ``fn(*args)`` on ``nprocs`` local processes per node; ``{global rank: return value}``.

    ``fn`` must be importable (a module-level function): workers are spawned.
    A failing rank raises ``torch.distributed.elastic.multiprocessing.errors.ChildFailedError``.
    """
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if quiet:
        logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    min_nodes, _, max_nodes = nnodes.partition(":")
    config = LaunchConfig(
        min_nodes=int(min_nodes),
        max_nodes=int(max_nodes or min_nodes),
        nproc_per_node=nprocs,
        run_id=f"autoep-{uuid.uuid4().hex[:8]}",
        rdzv_backend=rdzv_backend,
        rdzv_endpoint=rdzv_endpoint,
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
    )
    return elastic_launch(config, _worker)(fn, backend or default_backend(), args)
