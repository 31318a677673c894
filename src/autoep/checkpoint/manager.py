"""Sharded, atomic, layout-independent training checkpoints on torch.distributed.checkpoint.

A checkpoint root holds one directory per saved step and a ``latest`` pointer::

    ROOT/step_00000300/   .metadata, *.distcp (DCP: model + optimizer, every rank its own shards)
                          autoep.json (step, data position, config, layout, model fingerprint, extra)
                          rng/rank_00003.pt (each rank's RNG states)
    ROOT/latest           "step_00000300"

Writes go to ``ROOT/.step_00000300.partial`` first; only when every rank has
finished does rank 0 rename it into place, then update ``latest`` (atomically,
by ``os.replace``), then prune old steps. A save that dies midway leaves the
previous checkpoint and ``latest`` untouched; the next save clears the debris.
A save that fails (disk full, permissions) raises the same
:class:`CheckpointError` on every rank, with the previous checkpoint intact.
Every file carries a CRC-32 taken while it was written
(:mod:`autoep.checkpoint.integrity`), verified before a load touches any tensor.

Expert weights and their optimizer states are DTensors of the global
``[E, ...]`` shape, so DCP reshards on load: the world size, ep_size and ZeRO
stage may all differ between save and load.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from autoep.checkpoint.integrity import (
    ChecksumWriter,
    file_checksum,
    verify_checkpoint,
    write_manifest,
    written_checksums,
)
from autoep.errors import CheckpointError
from autoep.parallel.data_parallel import settle_parameters

LATEST = "latest"
META_FILE = "autoep.json"
FORMAT_VERSION = 1


@dataclass
class CheckpointState:
    """What `load_checkpoint` restored besides the tensors."""

    step: int
    data_position: int
    path: Path
    extra: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    layout: dict[str, Any] | None = None


@contextlib.contextmanager
def _single_process_is_fine() -> Iterator[None]:
    """DCP warns when used without a process group; for autoep that is a supported case."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Model type and the global shape of every tensor in the state dict (what must match to load)."""
    config = getattr(model, "config", None)
    shapes = {name: list(t.shape) for name, t in model.state_dict().items() if isinstance(t, torch.Tensor)}
    return {"model_type": getattr(config, "model_type", type(model).__name__), "shapes": shapes}


def _layout(model: nn.Module) -> dict[str, Any]:
    state = getattr(model, "autoep", None)
    layout: dict[str, Any] = {"world_size": _world()}
    if state is not None:
        layout.update(ep_size=state.config.ep_size, zero_stage=state.config.zero_stage, tp_size=state.config.tp_size)
    return layout


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _prune(root: Path, keep_last: int, protect: str) -> None:
    steps = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for old in steps[: max(0, len(steps) - keep_last)]:
        if old.name != protect:
            shutil.rmtree(old, ignore_errors=True)


def _first_line(err: BaseException) -> str:
    """DCP's exception text holds every failing rank's traceback: keep each rank's final error line."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        return "; ".join(f"rank {rank}: {type(e).__name__}: {e}" for rank, e in sorted(failures.items()))
    return f"{type(err).__name__}: {err}"


def _attempt(action, *args) -> str | None:
    """Run ``action``; the error as one line if it fails (to be agreed on by every rank)."""
    try:
        action(*args)
    except Exception as err:  # disk full, permissions, a path that is in the way...
        return f"{type(err).__name__}: {err}"
    return None


def _agree(error: str | None, what: str, root: Path) -> None:
    """Every rank learns every rank's error and raises the same :class:`CheckpointError`."""
    errors = [error]
    if dist.is_initialized():
        errors = [None] * _world()
        dist.all_gather_object(errors, error)
    failed = [f"rank {rank}: {e}" for rank, e in enumerate(errors) if e is not None]
    if failed:
        raise CheckpointError(
            f"saving a checkpoint to {root} failed while {what} ({'; '.join(failed[:3])}); "
            "the previous checkpoint and 'latest' are untouched"
        )


def _prepare(root: Path, partial: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for debris in root.glob(".*.partial"):  # left by an earlier save that died
        shutil.rmtree(debris, ignore_errors=True)
    partial.mkdir()


def _write_rank_files(partial: Path, writer: ChecksumWriter) -> None:
    """This rank's RNG states, and the checksums of everything it wrote."""
    rng_file = partial / "rng" / f"rank_{_rank():05d}.pt"
    rng_file.parent.mkdir(exist_ok=True)
    torch.save(_rng_state(), rng_file)
    entries = written_checksums(writer, partial)
    entries[str(rng_file.relative_to(partial))] = file_checksum(rng_file)
    write_manifest(partial, _rank(), entries)


def _finalize(root: Path, partial: Path, final: Path, meta: dict[str, Any], model: nn.Module, keep_last) -> None:
    """Rank 0: metadata files, then the atomic swap into place, ``latest``, pruning."""
    hf_config = getattr(model, "config", None)
    written = [META_FILE]
    if hf_config is not None and hasattr(hf_config, "to_json_string"):
        _write_text_atomic(partial / "hf_config.json", hf_config.to_json_string())
        written.append("hf_config.json")
    _write_text_atomic(partial / META_FILE, json.dumps(meta, indent=1))
    write_manifest(partial, 0, {name: file_checksum(partial / name) for name in written})
    name = final.name
    if final.exists():  # re-saving a step: swap only once the new one is complete
        stale = root / f".{name}.old"
        os.replace(final, stale)
        os.replace(partial, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(partial, final)
    _write_text_atomic(root / LATEST, name)
    if keep_last is not None:
        _prune(root, keep_last, protect=name)


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    *,
    step: int,
    extra: dict[str, Any] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Save model, optimizer, step, RNG and ``extra`` under ``path/step_XXXXXXXX``; call on every rank.

    ``extra`` must be JSON-serialisable (put the data position under
    ``"data_position"``; it defaults to ``step``). Returns the final directory.
    A failure on any rank raises :class:`CheckpointError` on every rank.
    """
    root = Path(path)
    name = step_dir_name(step)
    final, partial = root / name, root / f".{name}.partial"
    extra = dict(extra or {})
    _agree(_attempt(_prepare, root, partial) if _rank() == 0 else None, "preparing its directory", root)
    settle_parameters(model)
    model_sd, optim_sd = get_state_dict(model, optimizer if optimizer is not None else [], options=_OPTIONS)
    writer = ChecksumWriter(partial)
    try:
        with _single_process_is_fine():
            dcp.save(
                {"model": model_sd, "optim": optim_sd},
                checkpoint_id=str(partial),
                storage_writer=writer,
                no_dist=not dist.is_initialized(),
            )
    except (Exception, CheckpointException) as err:  # DCP gathers every rank's write errors, raises on all
        raise CheckpointError(
            f"saving step {step} to {root} failed while writing tensors: {_first_line(err)}; "
            "the previous checkpoint and 'latest' are untouched"
        ) from None
    _agree(_attempt(_write_rank_files, partial, writer), "writing RNG states and checksums", root)
    error = None
    if _rank() == 0:
        state = getattr(model, "autoep", None)
        meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "data_position": extra.pop("data_position", step),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "layout": _layout(model),
            "config": state.config.model_dump() if state is not None else None,
            "model": model_fingerprint(model),
            "extra": extra,
        }
        error = _attempt(_finalize, root, partial, final, meta, model, keep_last)
    _agree(error, "committing it", root)
    return final


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A step directory, or the one a root's ``latest`` pointer names."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    pointer = path / LATEST
    if pointer.is_file():
        target = path / pointer.read_text(encoding="utf-8").strip()
        if not (target / META_FILE).is_file():
            raise CheckpointError(f"{pointer} names {target.name}, which is missing or incomplete")
        return target
    raise CheckpointError(f"no autoep checkpoint at {str(path)!r} (neither a step directory nor a root with 'latest')")


def read_metadata(step_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((step_dir / META_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{step_dir / META_FILE} is unreadable or corrupt: {err}") from None


def check_compatible(model: nn.Module, saved: dict[str, Any], where: Path) -> None:
    """Raise a named error unless the checkpoint's tensors fit ``model`` exactly (names and global shapes)."""
    mine = model_fingerprint(model)
    theirs = saved.get("model") or {}
    if theirs.get("model_type") != mine["model_type"]:
        raise CheckpointError(
            f"checkpoint {where} is from a different model: it holds a {theirs.get('model_type')!r} model, "
            f"this is a {mine['model_type']!r} model"
        )
    saved_shapes, shapes = theirs.get("shapes", {}), mine["shapes"]
    missing = sorted(set(shapes) - set(saved_shapes))
    unexpected = sorted(set(saved_shapes) - set(shapes))
    mismatched = [
        f"{k}: checkpoint {saved_shapes[k]}, model {shapes[k]}"
        for k in sorted(set(shapes) & set(saved_shapes))
        if list(saved_shapes[k]) != list(shapes[k])
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_short(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch {_short(mismatched)}")
    if problems:
        raise CheckpointError(f"checkpoint {where} does not fit this model: " + "; ".join(problems))


def _short(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{f', ... ({len(items) - limit} more)' if len(items) > limit else ''}]"


def verify_files(step_dir: Path) -> Metadata:
    """Every byte range DCP's metadata promises must exist on disk: catches missing and truncated shards.

    Returns that metadata.
    """
    try:
        metadata = dcp.FileSystemReader(str(step_dir)).read_metadata()
    except Exception as err:
        raise CheckpointError(f"checkpoint {step_dir} has no readable DCP metadata: {err}") from None
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for relative, size in sorted(needed.items()):
        file = step_dir / relative
        if not file.is_file():
            raise CheckpointError(f"checkpoint {step_dir} is missing its shard file {relative}")
        if file.stat().st_size < size:
            raise CheckpointError(
                f"checkpoint {step_dir} is truncated: {relative} has {file.stat().st_size} bytes, needs {size}"
            )
    return metadata


# Optimizer hyperparameters are saved per parameter name, not per param group: groups
# depend on the layout (one per device mesh), so a different ep / tp / ZeRO regroups them.
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def _flat_optimizer_state(metadata: Metadata) -> bool:
    """Whether the checkpoint keys optimizer hyperparameters by parameter name (older ones: by group index)."""
    return not any(re.match(r"optim\.param_groups\.\d+\.", key) for key in metadata.state_dict_metadata)


def load_checkpoint(
    path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> CheckpointState:
    """Load a checkpoint (a step directory, or a root's ``latest``) into ``model`` and ``optimizer``; every rank.

    The model may be laid out differently from when it was saved (world size,
    ep_size, ZeRO stage). RNG states are restored when the world size matches.
    Names, global shapes, the model type, the presence and size of every
    shard file and every file's checksum are checked before any tensor is
    touched, so a checkpoint that does not fit, is truncated or was damaged on
    disk leaves the model as it was.
    """
    step_dir = resolve_checkpoint(path)
    saved = read_metadata(step_dir)
    check_compatible(model, saved, step_dir)
    metadata = verify_files(step_dir)
    verify_checkpoint(step_dir)
    settle_parameters(model)
    options = _OPTIONS if _flat_optimizer_state(metadata) else StateDictOptions()
    model_sd, optim_sd = get_state_dict(model, optimizer if optimizer is not None else [], options=options)
    state = {"model": model_sd, "optim": optim_sd} if optimizer is not None else {"model": model_sd}
    try:
        with _single_process_is_fine():
            dcp.load(state, checkpoint_id=str(step_dir), no_dist=not dist.is_initialized())
    except Exception as err:  # DCP reports truncation and corruption in many shapes
        raise CheckpointError(f"checkpoint {step_dir} could not be read (truncated or corrupt?): {err}") from None
    set_state_dict(
        model,
        optimizer if optimizer is not None else [],
        model_state_dict=model_sd,
        optim_state_dict=optim_sd,
        options=options,
    )
    rng_file = step_dir / "rng" / f"rank_{_rank():05d}.pt"
    if saved.get("layout", {}).get("world_size") == _world() and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return CheckpointState(
        step=int(saved["step"]),
        data_position=int(saved.get("data_position", saved["step"])),
        path=step_dir,
        extra=saved.get("extra") or {},
        config=saved.get("config"),
        layout=saved.get("layout"),
    )


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """Gather a DTensor to a full tensor on every rank (a plain tensor passes through).

    Expert tensors are 2-D sharded (edp, ep); torch logs a warning that their
    gather takes two all-gathers. That is expected here, so it is silenced.
    """
    if not isinstance(t, DTensor):
        return t
    logger = logging.getLogger("torch.distributed.tensor._redistribute")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return t.full_tensor()
    finally:
        logger.setLevel(level)
