"""Resolve ``--data`` into a source of records that several builders can split between them.

A source is read in *cells*: 1 MiB of whole lines of a local .jsonl/.txt file
(a line belongs to the cell its first byte is in), or 1,000 rows of a
``datasets`` table. Builders take contiguous ranges of cells, so what each
record becomes never depends on how many builders there were, and per-process
memory is one cell, whatever the size of the data.

Local ``.jsonl`` and ``.txt`` files are read here without ``datasets`` (the
core install has none), with errors that name the file and line. ``.json``,
``.parquet`` and ``.csv`` files, ``save_to_disk`` directories and dataset
names go through ``datasets`` (``pip install autoep[data]``), imported lazily.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoep.errors import ConfigError

CELL_BYTES = 1 << 20
CELL_ROWS = 1000
NATIVE = {".jsonl": "jsonl", ".txt": "txt"}
VIA_DATASETS = {".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass(frozen=True)
class DataSpec:
    """What the user asked for: ``--data`` and the options that qualify it."""

    data: str
    split: str = "train"
    config: str | None = None


@dataclass(frozen=True)
class Piece:
    """One unit handed to a format: a record (dict) or, for .txt files, a block of whole lines (str).

    ``where`` locates it for error messages: (file index, byte offset) or (-1, row).
    A .txt file is one document: its first block starts it, its last block ends it.
    """

    value: Any
    where: tuple[int, int]
    starts_doc: bool = True
    ends_doc: bool = True


def _has_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / n).is_file() for n in ("dataset_dict.json", "state.json"))


def looks_local(data: str) -> bool:
    """Whether ``data`` names local files (a path, a glob, a known extension) rather than a dataset name."""
    return _has_glob(data) or Path(data).exists() or Path(data).suffix in {**NATIVE, **VIA_DATASETS}


def local_files(data: str) -> list[Path]:
    """The files a local path or glob names, sorted; a ``ConfigError`` when there are none or they mix kinds."""
    if _has_glob(data):
        files = sorted(Path(p) for p in glob.glob(data, recursive=True) if Path(p).is_file())
        if not files:
            raise ConfigError(f"data glob {data!r} matches no file")
    elif Path(data).is_file():
        files = [Path(data)]
    else:
        raise ConfigError(f"data file {data!r} does not exist")
    kinds = {f.suffix for f in files}
    unknown = kinds - set(NATIVE) - set(VIA_DATASETS)
    if unknown:
        raise ConfigError(
            f"data {data!r}: unsupported file type {sorted(unknown)[0]!r} (use .jsonl, .json, .parquet, .csv or .txt)"
        )
    if len(kinds) > 1:
        raise ConfigError(f"data {data!r} mixes file types {sorted(kinds)}; give one kind per --data")
    return files


def check_spec(spec: DataSpec) -> None:
    """Cheap checks the launcher makes before starting workers (files exist, ``datasets`` is there if needed)."""
    if looks_local(spec.data) and not Path(spec.data).is_dir():
        files = local_files(spec.data)
        if files[0].suffix in NATIVE:
            return
    require_datasets(spec.data)


def require_datasets(data: str):
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            f"data {data!r} needs the datasets library: pip install 'autoep[data]' (local .jsonl and .txt files do not)"
        ) from None
    if not sys.stderr.isatty():  # progress bars in logs would bury the one-line errors
        datasets.disable_progress_bars()
    return datasets


class Source:
    """Records of one ``--data`` value, readable cell by cell."""

    description: str

    def fingerprint(self) -> str:
        """Changes whenever the data changes (part of the token cache key)."""
        raise NotImplementedError

    def num_cells(self) -> int:
        raise NotImplementedError

    def pieces(self, first_cell: int, end_cell: int) -> Iterator[Piece]:
        """Pieces of cells ``[first_cell, end_cell)``, in order."""
        raise NotImplementedError

    def where(self, where: tuple[int, int]) -> str:
        """``file:line`` (or ``data row N``) for an error message."""
        raise NotImplementedError

    def fields(self) -> list[str] | None:
        """Column names when known without reading records (``datasets`` tables)."""
        return None


class LocalFiles(Source):
    """.jsonl files (one record per line) or .txt files (one document per file), read natively."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self.kind = NATIVE[files[0].suffix]
        self.sizes = [f.stat().st_size for f in files]
        self._cells = [(i, start) for i, size in enumerate(self.sizes) for start in range(0, size, CELL_BYTES)]
        self.description = str(files[0]) if len(files) == 1 else f"{len(files)} {self.kind} files"

    def fingerprint(self) -> str:
        stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in self.files]
        return hashlib.sha256(json.dumps(stats).encode()).hexdigest()

    def num_cells(self) -> int:
        return len(self._cells)

    def where(self, where: tuple[int, int]) -> str:
        index, offset = where
        path = self.files[index]
        line = 1
        with path.open("rb") as f:
            remaining = offset
            while remaining > 0:
                chunk = f.read(min(remaining, CELL_BYTES))
                if not chunk:
                    break
                line += chunk.count(b"\n")
                remaining -= len(chunk)
        return f"{path}:{line}"

    def _lines(self, index: int, start: int) -> Iterator[tuple[int, bytes]]:
        """(offset, line) of the lines whose first byte lies in the cell at ``start``."""
        end = min(start + CELL_BYTES, self.sizes[index])
        with self.files[index].open("rb") as f:
            pos = start
            if start > 0:
                f.seek(start - 1)
                if f.read(1) != b"\n":
                    pos += len(f.readline())  # the line that began in the previous cell
            while pos < end:
                line = f.readline()
                if not line:
                    break
                yield pos, line
                pos += len(line)

    def _decode(self, raw: bytes, where: tuple[int, int]) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(f"{self.where(where)}: not valid UTF-8 (byte {err.start} of the line)") from None

    def pieces(self, first_cell: int, end_cell: int) -> Iterator[Piece]:
        for index, start in self._cells[first_cell:end_cell]:
            if self.kind == "txt":
                lines = list(self._lines(index, start))
                if not lines:
                    continue
                text = "".join(self._decode(raw, (index, pos)) for pos, raw in lines)
                last = lines[-1][0] + len(lines[-1][1]) >= self.sizes[index]
                yield Piece(text, (index, lines[0][0]), starts_doc=lines[0][0] == 0, ends_doc=last)
                continue
            for pos, raw in self._lines(index, start):
                if not raw.strip():
                    continue
                text = self._decode(raw, (index, pos))
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as err:
                    raise ConfigError(f"{self.where((index, pos))}: not valid JSON ({err.msg})") from None
                if not isinstance(record, dict):
                    raise ConfigError(f"{self.where((index, pos))}: each JSONL line must be a JSON object")
                yield Piece(record, (index, pos))


class TableSource(Source):
    """A ``datasets.Dataset`` (Arrow, memory-mapped): files via a builder, ``save_to_disk`` dirs, dataset names."""

    def __init__(self, dataset, description: str) -> None:
        self.dataset = dataset
        self.description = description

    def fingerprint(self) -> str:
        return str(getattr(self.dataset, "_fingerprint", "")) + f":{len(self.dataset)}"

    def num_cells(self) -> int:
        return -(-len(self.dataset) // CELL_ROWS)

    def fields(self) -> list[str] | None:
        return list(self.dataset.column_names)

    def where(self, where: tuple[int, int]) -> str:
        return f"{self.description} row {where[1]}"

    def pieces(self, first_cell: int, end_cell: int) -> Iterator[Piece]:
        total = len(self.dataset)
        for cell in range(first_cell, end_cell):
            start, end = cell * CELL_ROWS, min((cell + 1) * CELL_ROWS, total)
            columns = self.dataset[start:end]
            names = list(columns)
            for offset, values in enumerate(zip(*(columns[n] for n in names), strict=True)):
                yield Piece(dict(zip(names, values, strict=True)), (-1, start + offset))


def _pick_split(loaded, spec: DataSpec, what: str):
    if isinstance(loaded, dict):  # a DatasetDict
        if spec.split not in loaded:
            raise ConfigError(f"{what} has no split {spec.split!r} (splits: {', '.join(loaded)}); use --split")
        return loaded[spec.split]
    return loaded


def open_source(spec: DataSpec) -> Source:
    """The source ``spec`` names; a one-line ``ConfigError`` when it cannot be read."""
    path = Path(spec.data)
    if _is_saved_dataset(path):
        datasets = require_datasets(spec.data)
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as err:  # datasets raises many types; the user needs one line
            raise ConfigError(f"{spec.data}: cannot load the saved dataset ({_first_line(err)})") from None
        return TableSource(_pick_split(loaded, spec, spec.data), str(path))
    if looks_local(spec.data) and not path.is_dir():
        files = local_files(spec.data)
        if files[0].suffix in NATIVE:
            return LocalFiles(files)
        datasets = require_datasets(spec.data)
        builder = VIA_DATASETS[files[0].suffix]
        try:
            loaded = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
        except Exception as err:
            raise ConfigError(f"{files[0]}: cannot read it as {builder} ({_first_line(err)})") from None
        return TableSource(loaded, str(files[0]) if len(files) == 1 else f"{len(files)} {builder} files")
    datasets = require_datasets(spec.data)
    try:
        loaded = datasets.load_dataset(spec.data, spec.config, split=spec.split)
    except Exception as err:
        raise ConfigError(
            f"data {spec.data!r}: load_dataset failed ({_first_line(err)}); offline, a named dataset must "
            "already be in the datasets cache"
        ) from None
    return TableSource(loaded, spec.data)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def cache_root(explicit: str | None = None) -> Path:
    """Where token caches live: ``--data-cache``, ``$AUTOEP_DATA_CACHE``, or ``~/.cache/autoep/data``."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("AUTOEP_DATA_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "autoep" / "data"
