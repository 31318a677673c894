"""Tokenize once into memory-mapped files on disk; every rank and every later run maps them.

Layout of a store directory (named by a key over the data, the tokenizer, the
format and its fields, so a change to any of them makes a new store):

* ``tokens-NNNNN.bin`` (and ``mask-NNNNN.bin`` for chat / prompt-completion):
  token ids (uint8/16/32) of builder NNNNN's contiguous share of the data;
* ``docs.bin``: int64 start of every document in the concatenated stream;
  ``origins.bin``: int64 ``(file, byte offset or row)`` of each, for errors;
* ``meta.json``, written last; ``rows-*.bin``: row indices (:mod:`packing`).

The local ranks of a node split the source's cells between them, each
writing its part into a build directory private to this attempt; they wait for
each other through the file system (a long build must not run into a
collective timeout), then local rank 0 writes ``docs.bin`` and ``meta.json``
and renames the directory into place, so readers only ever see complete
stores. A bad record makes its builder write the error; every local rank
raises the error of the lowest-numbered failing builder, so all ranks raise
the same line. Memory per process stays at one cell of input plus buffers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from autoep.data.formats import Encoder, RecordError
from autoep.data.sources import Source
from autoep.errors import ConfigError

VERSION = 1
FLUSH_PIECES = 256
POLL_S = 0.05


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned type that holds every id."""
    return np.dtype(np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.uint32)


def store_key(*parts: str) -> str:
    return hashlib.sha256(json.dumps([VERSION, *parts]).encode()).hexdigest()[:24]


class MemoryStore:
    """A store held in memory (the small built-in corpus): no cache directory."""

    directory: Path | None = None
    masked = False

    def __init__(self, tokens: np.ndarray) -> None:
        self._tokens = tokens
        self.num_tokens = int(tokens.size)
        self.doc_starts = np.zeros(1, dtype=np.int64)
        self.num_docs = 1

    def tokens(self, start: int, end: int) -> np.ndarray:
        return self._tokens[start:end].astype(np.int64)

    def mask(self, start: int, end: int) -> np.ndarray | None:
        return None

    def where(self, doc: int) -> tuple[int, int]:
        return (0, 0)


def _map(path: Path, dtype, shape=None) -> np.ndarray:
    """A read-only memory map; empty files (numpy cannot map them) become empty arrays."""
    if path.stat().st_size == 0:
        return np.zeros(0 if shape is None else (0, *shape[1:]), dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=shape)


class TokenStore:
    """A finished store directory, memory-mapped."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.meta = json.loads((directory / "meta.json").read_text())
        dtype = np.dtype(self.meta["dtype"])
        self.masked = bool(self.meta["masked"])
        self.num_tokens = int(self.meta["num_tokens"])
        self.num_docs = int(self.meta["num_docs"])
        counts = self.meta["part_tokens"]
        self._parts = [_map(directory / f"tokens-{i:05d}.bin", dtype) for i in range(len(counts))]
        self._masks = (
            [_map(directory / f"mask-{i:05d}.bin", np.uint8) for i in range(len(counts))] if self.masked else []
        )
        self._bounds = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self.doc_starts = _map(directory / "docs.bin", np.int64)
        self._origins = _map(directory / "origins.bin", np.int64, shape=(self.num_docs, 2))

    def _gather(self, arrays: list[np.ndarray], start: int, end: int) -> np.ndarray:
        first = int(np.searchsorted(self._bounds, start, side="right")) - 1
        pieces = []
        part = first
        while start < end:
            lo = start - int(self._bounds[part])
            take = min(end, int(self._bounds[part + 1])) - start
            pieces.append(np.asarray(arrays[part][lo : lo + take]))
            start += take
            part += 1
        return np.concatenate(pieces) if len(pieces) != 1 else pieces[0]

    def tokens(self, start: int, end: int) -> np.ndarray:
        return self._gather(self._parts, start, end).astype(np.int64)

    def mask(self, start: int, end: int) -> np.ndarray | None:
        return self._gather(self._masks, start, end) if self.masked else None

    def where(self, doc: int) -> tuple[int, int]:
        file, offset = self._origins[doc]
        return int(file), int(offset)


def _build_part(source: Source, encoder: Encoder, index: int, count: int, tmp: Path, dtype, progress: bool) -> dict:
    """Tokenize builder ``index``'s share of the cells into ``tmp``; returns its counts."""
    cells = source.num_cells()
    first, end = index * cells // count, (index + 1) * cells // count
    names = ("tokens", "mask", "docs", "origins")
    files = {n: (tmp / f"{n}-{index:05d}.bin").open("wb") for n in names}
    position = docs = 0
    batch = []
    bar = None
    if progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=end - first, desc="tokenizing", unit="MiB" if cells else "cell", dynamic_ncols=True)

    def flush() -> None:
        nonlocal position, docs
        try:
            encoded = encoder.encode(batch)
        except RecordError as err:
            bad, message = err.args
            raise ConfigError(f"{source.where(batch[bad].where)}: {message}") from None
        for piece, (ids, mask, starts) in zip(batch, encoded, strict=True):
            if ids.size == 0:
                continue
            if starts:
                files["docs"].write(np.int64(position).tobytes())
                files["origins"].write(np.asarray(piece.where, dtype=np.int64).tobytes())
                docs += 1
            files["tokens"].write(ids.astype(dtype).tobytes())
            if encoder.masked:
                files["mask"].write(mask.astype(np.uint8).tobytes())
            position += ids.size
        batch.clear()

    try:
        for cell in range(first, end):
            for piece in source.pieces(cell, cell + 1):
                batch.append(piece)
                if len(batch) >= FLUSH_PIECES:
                    flush()
            if bar is not None:
                bar.update(1)
            if any(tmp.glob("error-*")):
                return {"tokens": position, "docs": docs, "aborted": True}
        flush()
    finally:
        for f in files.values():
            f.close()
        if bar is not None:
            bar.close()
    return {"tokens": position, "docs": docs}


def _wait_for(condition: Callable[[], bool]) -> None:
    """Poll the file system (other local ranks are building; a collective could time out first)."""
    while not condition():
        time.sleep(POLL_S)


def _finalize(tmp: Path, final: Path, count: int, stats: list[dict], meta: dict) -> None:
    """Merge the builders' document indices, write meta.json, move the store into place."""
    offset = 0
    with (tmp / "docs.bin").open("wb") as docs, (tmp / "origins.bin").open("wb") as origins:
        for i in range(count):
            starts = np.fromfile(tmp / f"docs-{i:05d}.bin", dtype=np.int64)
            docs.write((starts + offset).tobytes())
            with (tmp / f"origins-{i:05d}.bin").open("rb") as src:
                shutil.copyfileobj(src, origins)
            offset += stats[i]["tokens"]
            for name in ("docs", "origins", "done"):
                (tmp / f"{name}-{i:05d}.{'json' if name == 'done' else 'bin'}").unlink()
            if not meta["masked"]:
                (tmp / f"mask-{i:05d}.bin").unlink()
    meta.update(
        num_tokens=offset,
        num_docs=sum(s["docs"] for s in stats),
        part_tokens=[s["tokens"] for s in stats],
    )
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
        os.rename(tmp, final)
    except OSError:  # another node finished first (shared file system): use its store
        shutil.rmtree(tmp, ignore_errors=True)


def build_or_open(
    source: Source,
    encoder: Encoder,
    final: Path,
    meta: dict,
    *,
    local_index: int = 0,
    local_count: int = 1,
    attempt: str = "0",
    log: Callable[[str], None] = lambda _: None,
    progress: bool = False,
) -> TokenStore:
    """The store at ``final``, built first by the ``local_count`` local ranks if it does not exist.

    Every local rank calls this with the same arguments; ``attempt`` names this
    node's try (the same on its local ranks, new after a restart).
    """
    if (final / "meta.json").is_file():
        store = TokenStore(final)
        log(f"data: reusing token cache {final} ({store.num_docs:,} documents, {store.num_tokens:,} tokens)")
        return store
    tmp = final.parent / f"{final.name}.build-{attempt}"
    tmp.mkdir(parents=True, exist_ok=True)
    log(f"data: tokenizing {source.description} with {local_count} local builder(s) into {final}")
    started = time.perf_counter()
    try:
        stats = _build_part(source, encoder, local_index, local_count, tmp, np.dtype(meta["dtype"]), progress)
        (tmp / f"done-{local_index:05d}.json").write_text(json.dumps(stats))
    except ConfigError as err:
        (tmp / f"error-{local_index:05d}.txt").write_text(str(err))

    def everyone_ended() -> bool:
        return all(
            (tmp / f"done-{i:05d}.json").exists() or (tmp / f"error-{i:05d}.txt").exists() for i in range(local_count)
        )

    _wait_for(lambda: everyone_ended() or (final / "meta.json").is_file())
    errors = sorted(tmp.glob("error-*.txt")) if tmp.exists() else []
    if errors:  # every local rank raises the lowest builder's error; the last one out removes the build
        message = errors[0].read_text()
        (tmp / f"seen-{local_index:05d}").touch()
        if local_index == 0:
            _wait_for(lambda: all((tmp / f"seen-{i:05d}").exists() for i in range(local_count)))
            shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(message)
    if local_index == 0 and not (final / "meta.json").is_file():
        stats = [json.loads((tmp / f"done-{i:05d}.json").read_text()) for i in range(local_count)]
        _finalize(tmp, final, local_count, stats, meta)
    _wait_for(lambda: (final / "meta.json").is_file())
    store = TokenStore(final)
    seconds = time.perf_counter() - started
    log(
        f"data: tokenized {store.num_docs:,} documents, {store.num_tokens:,} tokens in {seconds:.1f}s "
        f"({store.num_tokens / max(seconds, 1e-9):,.0f} tokens/s)"
    )
    return store
