"""Key mapping between autoep's in-memory layout and Hugging Face checkpoint files.

In memory every family uses the transformers-5 fused layout (``experts.gate_up_proj
[E, 2I, H]``, ``experts.down_proj [E, H, I]``). On disk most checkpoints, and
what transformers' own ``save_pretrained`` writes, keep one module per expert:
``mlp.experts.N.{gate,up,down}_proj.weight`` (Qwen, DeepSeek, OLMoE, GLM) or
``block_sparse_moe.experts.N.w1/w3/w2.weight`` (Mixtral). GPT-OSS is fused on
disk too. The family adapter says which (``disk_experts``, ``disk_block_name``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from autoep.convert import find_moe_blocks
from autoep.models import registered_families
from autoep.moe.layer import MoELayer


@dataclass(frozen=True)
class BlockLayout:
    """Where one MoE block's tensors live in memory and on disk."""

    path: str  # in memory, e.g. "model.layers.1.mlp"
    disk_path: str  # on disk, e.g. "model.layers.1.block_sparse_moe"
    per_expert: tuple[str, str, str] | None  # (gate, up, down) names on disk; None: fused

    def expert_keys(self, expert: int) -> tuple[str, str, str]:
        gate, up, down = self.per_expert
        base = f"{self.disk_path}.experts.{expert}"
        return f"{base}.{gate}.weight", f"{base}.{up}.weight", f"{base}.{down}.weight"


def block_layouts(model: nn.Module) -> list[BlockLayout]:
    """The MoE blocks of a converted (or unconverted) model with their checkpoint layout."""
    families = registered_families()
    found: list[tuple[str, str]] = [
        (path, module.spec.family) for path, module in model.named_modules() if isinstance(module, MoELayer)
    ]
    if not found:
        found = [(path, adapter.name) for path, _, adapter in find_moe_blocks(model)]
    layouts = []
    for path, family in found:
        adapter = families[family]
        parent, _, name = path.rpartition(".")
        disk_name = adapter.disk_block_name or name
        layouts.append(BlockLayout(path, f"{parent}.{disk_name}" if parent else disk_name, adapter.disk_experts))
    return layouts


def _owner(key: str, layouts: list[BlockLayout]) -> BlockLayout | None:
    for layout in layouts:
        if key.startswith(layout.path + "."):
            return layout
    return None


def disk_key(key: str, layouts: list[BlockLayout]) -> str:
    """The on-disk name of a non-expert tensor (only the block's own name may differ)."""
    layout = _owner(key, layouts)
    return key if layout is None else layout.disk_path + key[len(layout.path) :]


def split_for_disk(key: str, full: torch.Tensor, layouts: list[BlockLayout]) -> Iterator[tuple[str, torch.Tensor]]:
    """(disk key, tensor) pairs that store the in-memory tensor ``key`` in the HF layout."""
    layout = _owner(key, layouts)
    suffix = key[len(layout.path) + 1 :] if layout is not None else ""
    if layout is None or layout.per_expert is None or suffix not in ("experts.gate_up_proj", "experts.down_proj"):
        yield disk_key(key, layouts), full
        return
    for expert in range(full.shape[0]):
        gate_key, up_key, down_key = layout.expert_keys(expert)
        if suffix == "experts.down_proj":
            yield down_key, full[expert]
        else:
            gate, up = full[expert].chunk(2, dim=0)
            yield gate_key, gate
            yield up_key, up


def read_from_disk(key: str, index: tuple[slice, ...], source, layouts: list[BlockLayout]) -> torch.Tensor:
    """The ``index`` slice of the in-memory tensor ``key``, read from whichever layout ``source`` holds.

    Fused keys are sliced directly (only the bytes of the slice are read); a
    per-expert checkpoint is assembled from the experts the slice covers.
    """
    if source.has(key):
        return source.read(key, index)
    layout = _owner(key, layouts)
    suffix = key[len(layout.path) + 1 :] if layout is not None else ""
    if layout is not None and layout.per_expert is not None and suffix in ("experts.gate_up_proj", "experts.down_proj"):
        experts = range(*index[0].indices(_num_experts(layout, source)))
        rows = []
        for expert in experts:
            gate_key, up_key, down_key = layout.expert_keys(expert)
            if suffix == "experts.down_proj":
                rows.append(source.read(down_key, index[1:]))
            else:  # gate rows then up rows, as in the fused tensor
                gate_up = torch.cat([source.read(gate_key, ()), source.read(up_key, ())], dim=0)
                rows.append(gate_up[index[1:]])
        first = source.shape(layout.expert_keys(0)[2 if suffix == "experts.down_proj" else 0])
        empty_shape = (0, *first) if not rows else None
        return torch.stack(rows) if rows else torch.empty(empty_shape)
    return source.read(disk_key(key, layouts), index)


def disk_shape(key: str, source, layouts: list[BlockLayout]) -> tuple[int, ...] | None:
    """The global shape ``key`` has in ``source`` (either layout), or ``None`` if it is absent."""
    if source.has(key):
        return source.shape(key)
    layout = _owner(key, layouts)
    suffix = key[len(layout.path) + 1 :] if layout is not None else ""
    if layout is not None and layout.per_expert is not None and suffix in ("experts.gate_up_proj", "experts.down_proj"):
        num = _num_experts(layout, source)
        if num == 0:
            return None
        gate_key, _, down_key = layout.expert_keys(0)
        if suffix == "experts.down_proj":
            return (num, *source.shape(down_key))
        rows, cols = source.shape(gate_key)
        return (num, 2 * rows, cols)
    name = disk_key(key, layouts)
    return source.shape(name) if source.has(name) else None


def _num_experts(layout: BlockLayout, source) -> int:
    count = 0
    while source.has(layout.expert_keys(count)[2]):
        count += 1
    return count
