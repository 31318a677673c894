"""Memory-mapped reads and size-bounded sharded writes of safetensors files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from autoep.errors import CheckpointError

INDEX = "model.safetensors.index.json"


class SafetensorsSource:
    """All tensors of a HF model directory, read lazily: a slice reads only its bytes."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._shapes: dict[str, tuple[int, ...]] = {}
        index = self.directory / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{index} is corrupt: {err}") from None
        else:
            files = sorted(self.directory.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"no .safetensors weights in {str(self.directory)!r}")
            weight_map = {}
            for file in files:
                with self._open(file.name) as handle:
                    weight_map.update(dict.fromkeys(handle.keys(), file.name))
        self.weight_map: dict[str, str] = weight_map

    def _open(self, name: str):
        """A fresh handle per use: the file's mapping, and the pages a read touched, go away with it."""
        path = self.directory / name
        try:
            return safe_open(str(path), framework="pt")
        except Exception as err:
            raise CheckpointError(f"{path} is missing, truncated or not a safetensors file: {err}") from None

    def has(self, key: str) -> bool:
        return key in self.weight_map

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self._shapes:
            with self._open(self.weight_map[key]) as handle:
                self._shapes[key] = tuple(handle.get_slice(key).get_shape())
        return self._shapes[key]

    def read(self, key: str, index: tuple[slice, ...]) -> torch.Tensor:
        with self._open(self.weight_map[key]) as handle:
            view = handle.get_slice(key)
            try:
                return view[index] if index else view[:]  # an owned copy: valid after the handle closes
            except Exception as err:
                raise CheckpointError(f"could not read {key} from {self.weight_map[key]}: {err}") from None


class ShardWriter:
    """Collects tensors and writes ``model-0000i-of-0000n.safetensors`` shards of bounded size, plus the index."""

    def __init__(self, directory: str | Path, max_shard_bytes: int) -> None:
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self.flush()
        self.pending[key] = tensor.detach().to("cpu").contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"model-{len(self.written) + 1:05d}.safetensors"
        save_file(self.pending, str(self.directory / name), metadata={"format": "pt"})
        self.written.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard, give shards their final ``-of-N`` names and write the index."""
        self.flush()
        count = len(self.written)
        weight_map = {}
        names = []
        for number, (name, keys) in enumerate(self.written, start=1):
            final = "model.safetensors" if count == 1 else f"model-{number:05d}-of-{count:05d}.safetensors"
            (self.directory / name).rename(self.directory / final)
            names.append(final)
            weight_map.update(dict.fromkeys(keys, final))
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.directory / INDEX).write_text(json.dumps(index, indent=2))
        return names
