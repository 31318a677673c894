"""Start local worker processes through torch's elastic launcher.

``run_local(fn, n)`` runs ``fn`` on ``n`` local ranks with the default process
group already initialised (gloo on CPU, NCCL with one GPU per rank on CUDA)
and returns each rank's return value. Being the elastic launcher, the same
machinery reaches many machines through ``--nnodes``/``--rdzv-*``.

Launchers meet when they share the rendezvous endpoint *and* the run id. A
job on one machine with an ephemeral endpoint (port 0) gets a random id, so
parallel local jobs never collide; any other endpoint defaults to the fixed id
``autoep`` (see :func:`default_run_id`), so the same command typed on every
machine meets. Restarts after a worker failure (``max_restarts``) tell the
workers which attempt they are through ``TORCHELASTIC_RESTART_COUNT``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed.elastic.rendezvous import RendezvousConnectionError, RendezvousTimeoutError

from autoep.errors import AutoEPError
from autoep.teardown import end_process_group

if TYPE_CHECKING:
    from torch.distributed.launcher.api import LaunchConfig

DEFAULT_RDZV_TIMEOUT = 900  # seconds, torchrun's default join timeout
SHARED_RUN_ID = "autoep"


class RendezvousTimeout(AutoEPError):
    """Not every node joined the rendezvous in time (or its endpoint could not be reached)."""


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _worker(fn: Callable[..., Any], backend: str, args: tuple[Any, ...]) -> Any:
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    # Intra-op threads are shared by all local ranks; oversubscription makes CPU runs crawl.
    if backend == "gloo":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
    dist.init_process_group(backend, timeout=collective_timeout())
    # No teardown when fn raises: a peer may be gone, and destroying the group can wait for it forever.
    result = fn(*args)
    # Pickled here, into bytes that own their data (no shared-memory handles that die with this process):
    # a result that cannot be pickled fails before the exit is armed, and torch elastic sends the bytes
    # back as they are, with no second walk over the result.
    payload = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
    end_process_group()  # and leave without the exit-time gloo abort (autoep.teardown)
    return payload


COLLECTIVE_TIMEOUT_ENV = "AUTOEP_COLLECTIVE_TIMEOUT"


def collective_timeout() -> timedelta | None:
    """How long a collective may wait (``--collective-timeout``, passed to workers in the environment);
    ``None``: torch's default (10 min for NCCL, 30 min for gloo)."""
    value = os.environ.get(COLLECTIVE_TIMEOUT_ENV)
    return timedelta(seconds=float(value)) if value else None


def default_run_id(rdzv_endpoint: str) -> str:
    """The run id launchers use when none is given.

    Port 0 means "any free port on this machine": no other machine can reach
    such a rendezvous, so a random id keeps parallel local jobs apart. A real
    endpoint is shared on purpose, and every node must derive the same id
    from nothing but its own flags: a constant does that (torchrun's default,
    ``none``, is one too). Jobs sharing one endpoint at the same time need
    distinct ``--rdzv-id`` values.
    """
    _, _, port = rdzv_endpoint.rpartition(":")
    return f"autoep-{uuid.uuid4().hex[:8]}" if port == "0" else SHARED_RUN_ID


def rendezvous_configs(rdzv_backend: str, timeout: int, node_rank: int | None) -> dict[str, Any]:
    """Backend options: one timeout for joining, whichever backend reads it.

    c10d reads ``join_timeout`` (its own default is 600 s) and connects to the
    store host with ``read_timeout``, raised to the join timeout so a node
    started before the host waits for it instead of failing after 60 s; the
    static backend reads ``timeout`` and its node ``rank``.
    """
    configs: dict[str, Any] = {"timeout": timeout}
    if rdzv_backend == "static":
        configs["rank"] = node_rank or 0
    else:
        configs.update(join_timeout=timeout, read_timeout=_connect_timeout(rdzv_backend, timeout))
    return configs


def _connect_timeout(rdzv_backend: str, timeout: int) -> int:
    """How long a node tries to reach the rendezvous host (c10d never below its own 60 s default)."""
    return timeout if rdzv_backend == "static" else max(60, timeout)


def _rendezvous_failed(err: Exception, config: LaunchConfig, timeout: int) -> RendezvousTimeout:
    """One line for the two ways nodes fail to meet: the host waited in vain, or a node never reached the host."""
    endpoint, low, high = config.rdzv_endpoint, config.min_nodes, config.max_nodes
    nnodes = str(low) if low == high else f"{low}:{high}"
    if isinstance(err, (RendezvousTimeoutError, dist.DistStoreError)):
        what = f"the nodes did not all join the rendezvous within {timeout} s"
    else:
        what = f"could not reach the rendezvous host within {_connect_timeout(config.rdzv_backend, timeout)} s"
    return RendezvousTimeout(
        f"{what} (endpoint {endpoint}, rdzv id {config.run_id!r}, nnodes {nnodes}): start autoep train on every "
        "node with the same --rdzv-endpoint, --rdzv-id and --nnodes, and check that the endpoint's host and port "
        "are reachable from every node (firewall)"
    )


@contextlib.contextmanager
def _fresh_store_per_attempt(restarts_possible: bool) -> Iterator[None]:
    """Give the workers of every attempt a store of their own (torch's c10d rendezvous shares one).

    By default torch elastic (2.5 and later, 2.13 included) hands the workers the
    store its c10d rendezvous created at the first attempt, and keeps it for
    every restart. Restarted workers then find the dead workers' addresses
    under the same keys, and gloo or NCCL initialisation can wait forever on
    them (pytorch/pytorch#135712; seen here: 1 of 6 restarts of a bare gloo job, the
    first restart of an autoep run).
    Sharing off, rank 0 of each attempt hosts a new store. Restarts happen
    after a failure (``max_restarts``) and, on several nodes, whenever a node
    (re)joins; a user's own setting of the variable wins.
    """
    key = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"
    if not restarts_possible or key in os.environ:
        yield
        return
    os.environ[key] = "1"
    try:
        yield
    finally:
        os.environ.pop(key, None)


def run_local(
    fn: Callable[..., Any],
    nprocs: int,
    *args: Any,
    backend: str | None = None,
    nnodes: str = "1:1",
    rdzv_endpoint: str = "localhost:0",
    rdzv_backend: str = "c10d",
    rdzv_id: str | None = None,
    node_rank: int | None = None,
    rdzv_timeout: int = DEFAULT_RDZV_TIMEOUT,
    max_restarts: int = 0,
    quiet: bool = True,
) -> dict[int, Any]:
    """Run ``fn(*args)`` on ``nprocs`` local processes per node; ``{global rank: return value}`` of this node.

    ``fn`` must be importable (a module-level function): workers are spawned.
    After a worker failure, all workers of every node are restarted up to
    ``max_restarts`` times; then a failing rank raises
    ``torch.distributed.elastic.multiprocessing.errors.ChildFailedError``.
    Nodes that do not all join within ``rdzv_timeout`` seconds raise
    :class:`RendezvousTimeout` with a one-line message.
    """
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if quiet:
        logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    min_nodes, _, max_nodes = nnodes.partition(":")
    run_id = rdzv_id or default_run_id(rdzv_endpoint)
    config = LaunchConfig(
        min_nodes=int(min_nodes),
        max_nodes=int(max_nodes or min_nodes),
        nproc_per_node=nprocs,
        run_id=run_id,
        rdzv_backend=rdzv_backend,
        rdzv_endpoint=rdzv_endpoint,
        rdzv_configs=rendezvous_configs(rdzv_backend, rdzv_timeout, node_rank),
        max_restarts=max_restarts,
        monitor_interval=0.1,
        start_method="spawn",
    )
    try:
        with _fresh_store_per_attempt(max_restarts > 0 or config.max_nodes > 1):
            payloads = elastic_launch(config, _worker)(fn, backend or default_backend(), args)
    except (RendezvousTimeoutError, RendezvousConnectionError, dist.DistStoreError, dist.DistNetworkError) as err:
        raise _rendezvous_failed(err, config, rdzv_timeout) from None
    return {rank: pickle.loads(payload) for rank, payload in payloads.items()}
