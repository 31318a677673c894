"""From ``autoep train``'s data flags to deterministic train and eval batches.

Called on every rank before the model is built, so a bad input fails before
the first collective but one: ranks agree on a build id with one broadcast.
Every error is a one-line :class:`ConfigError`, raised identically on every
rank (the token store's builders share their errors through the file system).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import torch.distributed as dist

from autoep.data.batches import DataBatches
from autoep.data.builtin import builtin_corpus
from autoep.data.formats import FORMATS, detect_format, load_tokenizer, make_encoder
from autoep.data.packing import row_index
from autoep.data.sources import DataSpec, LocalFiles, Source, cache_root, open_source
from autoep.data.token_store import MemoryStore, build_or_open, store_key, token_dtype
from autoep.errors import ConfigError


@dataclass(frozen=True)
class DataOptions:
    """The data flags of ``autoep train`` (``None``: the default)."""

    data: str | None = None
    text_field: str | None = None
    split: str = "train"
    data_config: str | None = None
    format: str | None = None
    tokenizer: str | None = None
    packing: bool = True
    eval_data: str | None = None
    eval_split: str | None = None
    eval_every: int | None = None
    eval_rows: int | None = None
    cache_dir: str | None = None

    @property
    def has_eval(self) -> bool:
        return self.eval_data is not None or self.eval_split is not None


@dataclass
class PreparedData:
    train: DataBatches
    eval: DataBatches | None
    description: str


class RowRange:
    """Rows ``[first, first + num_rows)`` of another row index (a held-out share, or the rest)."""

    def __init__(self, rows, first: int, num_rows: int) -> None:
        self.rows, self.first, self.num_rows = rows, first, num_rows

    def bounds(self, row: int) -> tuple[int, int]:
        return self.rows.bounds(self.first + row)


def holdout_percent(split: str | None) -> float | None:
    """``5%`` -> 5.0; ``None`` for a split name."""
    if split is None or not split.endswith("%"):
        return None
    try:
        value = float(split[:-1])
    except ValueError:
        value = -1.0
    if not 0 < value < 100:
        raise ConfigError(f"--eval-split {split!r}: a held-out share must be between 0% and 100%")
    return value


def _build_id() -> str:
    """One id for this attempt, the same on every rank (a fresh one per start, so stale builds are never reused)."""
    token = [uuid.uuid4().hex[:12]]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(token, src=0)
    return f"{token[0]}-n{os.environ.get('GROUP_RANK', '0')}"


def _first_fields(source: Source) -> list[str]:
    fields = source.fields()
    if fields is not None:
        return fields
    if isinstance(source, LocalFiles) and source.kind == "txt":
        return ["text"]
    for cell in range(source.num_cells()):
        for piece in source.pieces(cell, cell + 1):
            return sorted(piece.value) if isinstance(piece.value, dict) else ["text"]
    raise ConfigError(f"{source.description}: the data is empty")


def _store(spec: DataSpec, options: DataOptions, tokenizer, build_id: str, log: Callable[[str], None]):
    source = open_source(spec)
    fields = _first_fields(source)
    fmt = options.format or detect_format(fields, options.text_field)
    if options.format is None:
        why = {"chat": "field 'messages'", "prompt-completion": "fields 'prompt' and 'completion'"}
        log(f"data: {source.description}: format {fmt} (detected from {why.get(fmt, 'its fields')})")
    encoder = make_encoder(fmt, tokenizer, options.text_field, source.description)
    text_field = (options.text_field or "text") if fmt == "text" else ""
    key = store_key(source.fingerprint(), tokenizer.fingerprint(), fmt, text_field)
    meta = {"format": fmt, "dtype": token_dtype(tokenizer.vocab_size).name, "masked": encoder.masked}
    meta.update(source=source.description, tokenizer=tokenizer.name)
    store = build_or_open(
        source,
        encoder,
        cache_root(options.cache_dir) / key,
        meta,
        local_index=int(os.environ.get("LOCAL_RANK", 0)),
        local_count=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
        attempt=build_id,
        log=log,
        progress=bool(int(os.environ.get("RANK", 0)) == 0),
    )
    if store.num_tokens == 0:
        raise ConfigError(f"{source.description}: the data is empty (no tokens)")
    return store, source


def prepare_data(
    options: DataOptions,
    *,
    model: str,
    builtin_model: bool,
    vocab_size: int,
    seq_len: int,
    micro_batch: int,
    dp_size: int,
    seed: int = 0,
    log: Callable[[str], None] = lambda _: None,
) -> PreparedData:
    """Tokenize (or reuse) the training and evaluation data and index its rows."""
    if options.format is not None and options.format not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {options.format!r}")
    tokenizer = load_tokenizer(options.tokenizer or (None if builtin_model else model), vocab_size)
    local_builder = int(os.environ.get("LOCAL_RANK", 0)) == 0
    build_id = _build_id()

    def batches_of(spec: DataSpec | None):
        if spec is None:
            text = builtin_corpus(seed=seed)
            ids = tokenizer.encode_batch([text])[0]
            store, describe = MemoryStore(ids.astype(token_dtype(tokenizer.vocab_size))), lambda w: "built-in corpus"
        else:
            store, source = _store(spec, options, tokenizer, build_id, log)
            describe = source.where
        rows = row_index(store, seq_len, options.packing, builder=local_builder, describe=describe)
        return store, rows

    spec = DataSpec(options.data, options.split, options.data_config) if options.data else None
    store, rows = batches_of(spec)
    share = holdout_percent(options.eval_split) if options.eval_data is None else None
    eval_batches = None
    if share is not None:
        held = max(1, int(rows.num_rows * share / 100))
        if held >= rows.num_rows:
            raise ConfigError(f"--eval-split {options.eval_split} leaves no training rows ({rows.num_rows} rows)")
        eval_batches = DataBatches(
            store, RowRange(rows, rows.num_rows - held, held), seq_len, micro_batch, dp_size, tokenizer.pad_id, seed
        )
        rows = RowRange(rows, 0, rows.num_rows - held)
    elif options.has_eval:
        if options.eval_data is None and spec is None:
            raise ConfigError("--eval-split NAME needs --data with named splits; use --eval-split N% or --eval-data")
        if options.eval_data is not None:
            eval_spec = DataSpec(options.eval_data, options.eval_split or "train", options.data_config)
        else:
            eval_spec = DataSpec(options.data, options.eval_split, options.data_config)
        eval_store, eval_rows = batches_of(eval_spec)
        eval_batches = DataBatches(eval_store, eval_rows, seq_len, micro_batch, dp_size, tokenizer.pad_id, seed)
    train = DataBatches(store, rows, seq_len, micro_batch, dp_size, tokenizer.pad_id, seed)
    how = "packed" if options.packing else "padded"
    description = (
        f"{options.data or 'built-in corpus'}: {train.num_rows:,} rows of {seq_len} tokens ({how}), "
        f"tokenizer {tokenizer.name}" + (f"; eval: {eval_batches.num_rows:,} rows" if eval_batches is not None else "")
    )
    log(f"data: {description}")
    return PreparedData(train, eval_batches, description)
