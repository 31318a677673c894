"""The launcher flags of ``autoep train`` (torch elastic): checked before anything starts.

Mistakes here would otherwise surface as nodes that wait for each other until
the rendezvous times out, or as a torch traceback per node.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from autoep.errors import AutoEPError

STATIC_PORT = 29500  # torchrun's --master-port default


def inside_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def planned_world(args: argparse.Namespace) -> tuple[int, int | None]:
    """(processes per node, world size if known in advance)."""
    import torch

    if inside_torchrun():
        return int(os.environ.get("LOCAL_WORLD_SIZE", 1)), int(os.environ["WORLD_SIZE"])
    nproc = args.nproc_per_node or (torch.cuda.device_count() if torch.cuda.is_available() else 4)
    if nproc < 1:
        raise AutoEPError(f"--nproc-per-node must be >= 1, got {nproc}")
    min_nodes, _, max_nodes = args.nnodes.partition(":")
    fixed = not max_nodes or max_nodes == min_nodes
    return nproc, nproc * int(min_nodes) if fixed else None


def _parse_nnodes(value: str) -> tuple[int, int]:
    low, _, high = value.partition(":")
    try:
        min_nodes, max_nodes = int(low), int(high or low)
    except ValueError:
        min_nodes = max_nodes = 0
    if not 1 <= min_nodes <= max_nodes:
        raise AutoEPError(f"--nnodes must be N or MIN:MAX with 1 <= MIN <= MAX, got {value!r}")
    return min_nodes, max_nodes


def _endpoint_port(endpoint: str) -> int:
    from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

    try:
        return parse_rendezvous_endpoint(endpoint, default_port=29400)[1]
    except ValueError:
        raise AutoEPError(f"--rdzv-endpoint must be HOST:PORT, got {endpoint!r}") from None


def _static_endpoint(args: argparse.Namespace, nodes: int) -> str:
    """The static backend's meeting point: node 0's address, and every other node's rank, named up front."""
    if args.rdzv_endpoint and (args.master_addr or args.master_port):
        raise AutoEPError("give the static backend's host once: --master-addr/--master-port or --rdzv-endpoint")
    if not args.rdzv_endpoint and not args.master_addr:
        raise AutoEPError("--rdzv-backend static needs --master-addr HOST, the node started with --node-rank 0")
    if nodes > 1 and args.node_rank is None:
        raise AutoEPError(f"--rdzv-backend static with --nnodes {nodes} needs --node-rank 0..{nodes - 1} on each node")
    if args.node_rank is not None and not 0 <= args.node_rank < nodes:
        raise AutoEPError(f"--node-rank must be in 0..{nodes - 1} for --nnodes {nodes}, got {args.node_rank}")
    return args.rdzv_endpoint or f"{args.master_addr}:{args.master_port or STATIC_PORT}"


def launcher_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Check the launcher flags before anything starts; ``run_local``'s keyword arguments.

    Mistakes here would otherwise surface as nodes that wait for each other
    until the rendezvous times out, or as a torch traceback per node.
    """
    min_nodes, max_nodes = _parse_nnodes(args.nnodes)
    if args.max_restarts < 0:
        raise AutoEPError(f"--max-restarts must be >= 0, got {args.max_restarts}")
    if args.rdzv_timeout < 1:
        raise AutoEPError(f"--rdzv-timeout must be >= 1 second, got {args.rdzv_timeout}")
    if args.master_port is not None and not 1 <= args.master_port <= 65535:
        raise AutoEPError(f"--master-port must be in 1..65535, got {args.master_port}")
    if args.rdzv_backend == "static":
        if args.max_restarts > 0:
            raise AutoEPError(
                "--max-restarts needs --rdzv-backend c10d: torch's static backend hands restarted workers the "
                "failed attempt's store, where their initialisation can hang"
            )
        if min_nodes != max_nodes:
            raise AutoEPError(f"--rdzv-backend static needs a fixed --nnodes N, got {args.nnodes!r}")
        endpoint = _static_endpoint(args, max_nodes)
    else:
        for flag, value in (("--node-rank", args.node_rank), ("--master-addr", args.master_addr)):
            if value is not None:
                raise AutoEPError(f"{flag} is only read by --rdzv-backend static; c10d meets at --rdzv-endpoint")
        if args.master_port is not None:
            raise AutoEPError("--master-port is only read by --rdzv-backend static; c10d meets at --rdzv-endpoint")
        endpoint = args.rdzv_endpoint or "localhost:0"
    if max_nodes > 1 and args.save_every and not args.output:
        raise AutoEPError(
            "a multi-node run that saves checkpoints needs the same --output on every node, in a directory all "
            "nodes share (the default name carries each node's own start time)"
        )
    if _endpoint_port(endpoint) == 0 and max_nodes > 1:
        raise AutoEPError(
            f"--nnodes {args.nnodes} needs --rdzv-endpoint HOST:PORT with a fixed port on a host every node can "
            f"reach (the first node's address); {endpoint} only works on one machine"
        )
    return {
        "nnodes": f"{min_nodes}:{max_nodes}",
        "rdzv_endpoint": endpoint,
        "rdzv_backend": args.rdzv_backend,
        "rdzv_id": args.rdzv_id,
        "node_rank": args.node_rank,
        "rdzv_timeout": args.rdzv_timeout,
        "max_restarts": args.max_restarts,
    }
