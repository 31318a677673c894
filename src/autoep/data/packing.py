"""Rows of ``--seq-len`` tokens cut from a token store, with document boundaries respected.

Every row is a contiguous range of the store's token stream, so a row index
is at most two integers per row, memory-mapped from the store directory:

* text, packed (default): consecutive windows of ``seq_len`` tokens; a
  document crossing a window's end continues in the next window. Nothing is
  padded and the index is implicit (no file). One long document (the built-in
  corpus) gives exactly the fixed windows of earlier autoep versions.
* chat / prompt-completion, packed: whole samples, greedily in order, as many
  as fit; the rest of a row is padding. A sample longer than ``seq_len`` is an
  error naming its file and line.
* ``--no-packing``: one document (a text document's ``seq_len`` chunks one by
  one) per row, padded.

Inside a row, positions restart at every document start and the first token
of each document gets label -100 (it is not predicted from the previous
document). Rows that hold more than one document carry ``position_ids``;
transformers then builds a block-diagonal causal mask (eager, sdpa, flex) or
runs varlen kernels (flash attention), so a token never attends to another
document, provided the model is called without a cache (``use_cache=False``)
and without an ``attention_mask``. Padding follows the last document and is
never a label; being after every real token, it cannot change them under a
causal mask.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np

from autoep.errors import ConfigError

BLOCK_DOCS = 1 << 20


class Windows:
    """Consecutive full windows of the stream (one partial row if the stream is shorter than one)."""

    def __init__(self, num_tokens: int, seq_len: int) -> None:
        self.num_tokens, self.seq_len = num_tokens, seq_len
        self.num_rows = max(1, num_tokens // seq_len)

    def bounds(self, row: int) -> tuple[int, int]:
        start = row * self.seq_len
        return start, min(start + self.seq_len, self.num_tokens)


class StoredRows:
    """``[R, 2]`` (start, end) pairs in a file or an array."""

    def __init__(self, table: np.ndarray) -> None:
        self.table = table
        self.num_rows = int(table.shape[0])

    def bounds(self, row: int) -> tuple[int, int]:
        start, end = self.table[row]
        return int(start), int(end)


def _doc_lengths(store, first: int, end: int) -> np.ndarray:
    starts = np.asarray(store.doc_starts[first:end], dtype=np.int64)
    nxt = store.doc_starts[end] if end < store.num_docs else store.num_tokens
    return np.diff(np.append(starts, nxt)), starts


def _too_long(store, doc: int, length: int, seq_len: int, describe: Callable[[tuple[int, int]], str]) -> ConfigError:
    return ConfigError(
        f"{describe(store.where(doc))}: a sample of {length} tokens is longer than --seq-len {seq_len} "
        "(samples are never cut; raise --seq-len or drop the sample)"
    )


def _write_rows(store, seq_len: int, packing: bool, out, describe) -> None:
    """Stream the row table of a store into the open binary file ``out``."""
    row_start = row_end = None  # the row being filled (packed samples)
    for first in range(0, store.num_docs, BLOCK_DOCS):
        end = min(first + BLOCK_DOCS, store.num_docs)
        lengths, starts = _doc_lengths(store, first, end)
        if store.masked:
            longest = int(np.argmax(lengths))
            if lengths[longest] > seq_len:
                raise _too_long(store, first + longest, int(lengths[longest]), seq_len, describe)
        if not packing:
            chunks = -(-lengths // seq_len)
            offsets = np.arange(int(chunks.sum())) - np.repeat(np.cumsum(chunks) - chunks, chunks)
            begin = np.repeat(starts, chunks) + offsets * seq_len
            stop = np.minimum(begin + seq_len, np.repeat(starts + lengths, chunks))
            out.write(np.stack([begin, stop], axis=1).astype(np.int64).tobytes())
            continue
        rows = []
        for start, length in zip(starts.tolist(), lengths.tolist(), strict=True):
            if row_start is not None and start + length - row_start <= seq_len:
                row_end = start + length
                continue
            if row_start is not None:
                rows.append((row_start, row_end))
            row_start, row_end = start, start + length
        if rows:
            out.write(np.asarray(rows, dtype=np.int64).tobytes())
    if row_start is not None:
        out.write(np.asarray([(row_start, row_end)], dtype=np.int64).tobytes())


def row_index(store, seq_len: int, packing: bool, *, builder: bool, describe) -> Windows | StoredRows:
    """The rows of ``store`` at ``seq_len``; for stored indices, ``builder`` writes the file, others wait for it."""
    if (packing and not store.masked) or store.directory is None:  # in memory: the one built-in document
        return Windows(store.num_tokens, seq_len)
    name = f"rows-{'packed' if packing else 'padded'}-{seq_len}.bin"
    path = store.directory / name
    failed = path.with_name(f"{name}.error")
    if not path.is_file() and builder and not failed.is_file():
        tmp = path.with_name(f"{name}.tmp-{os.getpid()}")
        try:
            with tmp.open("wb") as out:
                _write_rows(store, seq_len, packing, out, describe)
            os.replace(tmp, path)
        except ConfigError as err:  # the same data and --seq-len always fail the same way: remember it
            failed.write_text(str(err))
        finally:
            tmp.unlink(missing_ok=True)
    while not path.is_file():
        if failed.is_file():
            raise ConfigError(failed.read_text())
        time.sleep(0.05)
    table = np.memmap(path, dtype=np.int64, mode="r").reshape(-1, 2) if path.stat().st_size else np.zeros((0, 2))
    return StoredRows(table)


def make_row(store, rows, row: int, seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """``(input_ids, labels, position_ids, packed)`` of one row, padded to ``seq_len``.

    ``packed`` says whether the row holds more than one document.
    """
    start, end = rows.bounds(row)
    ids = store.tokens(start, end)
    length = ids.size
    docs = store.doc_starts
    first = int(np.searchsorted(docs, start, side="right"))
    last = int(np.searchsorted(docs, end, side="left"))
    inner = np.asarray(docs[first:last], dtype=np.int64) - start  # documents starting inside the row
    segment = np.zeros(length, dtype=np.int64)
    segment[inner] = 1
    segment = np.cumsum(segment)
    seg_starts = np.concatenate([[0], inner])
    positions = np.arange(length) - seg_starts[segment]
    labels = ids.copy()
    labels[seg_starts] = -100
    mask = store.mask(start, end)
    if mask is not None:
        labels[mask == 0] = -100
    if length < seq_len:
        pad = seq_len - length
        ids = np.concatenate([ids, np.full(pad, pad_id, dtype=np.int64)])
        labels = np.concatenate([labels, np.full(pad, -100, dtype=np.int64)])
        positions = np.concatenate([positions, positions[-1] + 1 + np.arange(pad)])
    return ids, labels, positions, inner.size > 0
