"""Checkpoint integrity: per-file checksums computed while writing, verified before loading.

DCP stores no checksums, so a byte flipped on disk loads silently. autoep's
checkpoint writer wraps DCP's file system so every byte a rank writes also
goes through a CRC-32 on its way out (no second read of the data); each rank
then records ``{file: [size, crc32]}`` for the files it wrote in
``checksums/rank_XXXXX.json`` (rank 0 also covers ``.metadata`` and
``autoep.json``). Loading verifies every listed file first, the files split
between the ranks, and raises the same :class:`CheckpointError` on every rank,
naming the damaged files. ``autoep check CKPT`` runs the same verification in
one process, offline.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem

from autoep.errors import CheckpointError

CHECKSUM_DIR = "checksums"
_CHUNK = 8 << 20


class _HashingStream(io.RawIOBase):
    """A write stream that forwards to ``raw`` and folds every byte into a CRC-32."""

    def __init__(self, raw: io.IOBase) -> None:
        super().__init__()
        self.raw = raw
        self.crc = 0
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.crc = zlib.crc32(view, self.crc)
        self.size += view.nbytes
        return self.raw.write(view)

    def tell(self) -> int:
        return self.raw.tell()

    def flush(self) -> None:
        self.raw.flush()

    def fileno(self) -> int:
        return self.raw.fileno()


class _HashingFileSystem(FileSystem):
    """DCP's local file system, recording ``(size, crc32)`` of every file opened for writing."""

    def __init__(self) -> None:
        super().__init__()
        self.written: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()  # DCP may write files from several threads

    @contextlib.contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[io.IOBase]:
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with super().create_stream(path, mode) as raw:
            stream = _HashingStream(raw)
            yield stream
        with self._lock:
            self.written[str(Path(path).resolve())] = (stream.size, stream.crc)

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        super().rename(path, new_path)
        with self._lock:
            entry = self.written.pop(str(Path(path).resolve()), None)
            if entry is not None:
                self.written[str(Path(new_path).resolve())] = entry


class ChecksumWriter(FileSystemWriter):
    """DCP's ``FileSystemWriter`` that checksums what it writes (see :func:`written_checksums`)."""

    def __init__(self, path: str | os.PathLike, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self.fs = _HashingFileSystem()
        self.path = self.fs.init_path(path)


def written_checksums(writer: ChecksumWriter, root: Path) -> dict[str, list[int]]:
    """``{path relative to root: [size, crc32]}`` of the files ``writer`` wrote under ``root``."""
    base = root.resolve()
    return {
        str(Path(path).relative_to(base)): [size, crc]
        for path, (size, crc) in writer.fs.written.items()
        if Path(path).is_relative_to(base)
    }


def file_checksum(path: Path) -> list[int]:
    """``[size, crc32]`` of a file, read in chunks."""
    crc, size = 0, 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return [size, crc]


def write_manifest(step_dir: Path, rank: int, entries: dict[str, list[int]]) -> None:
    """Record this rank's files (merging with what it recorded earlier in the same save)."""
    folder = step_dir / CHECKSUM_DIR
    folder.mkdir(exist_ok=True)
    target = folder / f"rank_{rank:05d}.json"
    merged = json.loads(target.read_text()) if target.is_file() else {}
    merged.update(entries)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(merged, indent=0, sort_keys=True))
    os.replace(tmp, target)


def read_manifests(step_dir: Path) -> dict[str, list[int]]:
    """Every checksummed file of a checkpoint; empty for checkpoints saved before checksums existed."""
    folder = step_dir / CHECKSUM_DIR
    entries: dict[str, list[int]] = {}
    for manifest in sorted(folder.glob("rank_*.json")) if folder.is_dir() else []:
        try:
            entries.update(json.loads(manifest.read_text()))
        except (OSError, json.JSONDecodeError) as err:
            message = f"checkpoint {step_dir}: checksum manifest {manifest.name} is unreadable: {err}"
            raise CheckpointError(message) from None
    return entries


def verify_entries(step_dir: Path, entries: dict[str, list[int]]) -> list[str]:
    """One line per file that is missing, has another size, or another CRC-32 than recorded."""
    problems = []
    for relative, (size, crc) in sorted(entries.items()):
        file = step_dir / relative
        if not file.is_file():
            problems.append(f"{relative}: missing")
            continue
        actual_size, actual_crc = file_checksum(file)
        if actual_size != size:
            problems.append(f"{relative}: {actual_size} bytes, {size} were written")
        elif actual_crc != crc:
            problems.append(f"{relative}: checksum mismatch (crc32 {actual_crc:08x}, {crc:08x} was written)")
    return problems


def verify_checkpoint(step_dir: Path) -> None:
    """Check every recorded file before loading; on every rank the same :class:`CheckpointError` if any is bad.

    The files are split between the ranks (each reads ~1/world of the
    checkpoint) and the verdicts are gathered, so a damaged file is named
    everywhere and no rank goes on to a collective the others skip.
    """
    entries = read_manifests(step_dir)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = {name: value for i, (name, value) in enumerate(sorted(entries.items())) if i % world == rank}
    problems = verify_entries(step_dir, mine)
    if world > 1:
        gathered: list[list[str]] = [[] for _ in range(world)]
        dist.all_gather_object(gathered, problems)
        problems = sorted(p for part in gathered for p in part)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems) - 5} more)" if len(problems) > 5 else "")
        raise CheckpointError(f"checkpoint {step_dir} is damaged: {shown}")
