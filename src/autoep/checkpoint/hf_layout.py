"""Key mapping between autoep's in-memory layout and Hugging Face checkpoint files.

In memory every family uses the transformers-5 fused layout (``experts.gate_up_proj
[E, 2I, H]``, ``experts.down_proj [E, H, I]``). On disk most checkpoints, and
what transformers' own ``save_pretrained`` writes, keep one module per expert:
``mlp.experts.N.{gate,up,down}_proj.weight`` (Qwen, DeepSeek, OLMoE, GLM) or
``block_sparse_moe.experts.N.w1/w3/w2.weight`` (Mixtral). GPT-OSS is fused on
disk too. For the block path the family adapter says which (``disk_experts``,
``disk_block_name``); for the experts path transformers' own conversion
mapping of the family does (:mod:`autoep.checkpoint.hf_mapping`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from autoep.checkpoint.hf_mapping import expert_disk_names
from autoep.convert import find_convertible_blocks
from autoep.models import registered_families
from autoep.moe.sites import moe_sites
from autoep.moe.spec import ExpertsSpec, MoESpec


@dataclass(frozen=True)
class BlockLayout:
    """Where one MoE block's tensors live in memory and on disk."""

    path: str  # in memory, e.g. "model.layers.1.mlp"
    disk_path: str  # on disk, e.g. "model.layers.1.block_sparse_moe"
    per_expert: tuple[str | None, str, str] | None  # (gate, up, down) names on disk (gate None: ungated); None: fused
    experts_name: str = "experts"  # the experts module's name in the block, in memory
    in_proj: str = "gate_up_proj"  # "up_proj" for ungated experts

    @property
    def fused_suffixes(self) -> tuple[str, str]:
        """In-memory names (relative to the block) of the stacked in- and out-projections."""
        return f"{self.experts_name}.{self.in_proj}", f"{self.experts_name}.down_proj"

    def expert_keys(self, expert: int) -> tuple[str | None, str, str]:
        gate, up, down = self.per_expert
        base = f"{self.disk_path}.experts.{expert}"
        return (f"{base}.{gate}.weight" if gate else None), f"{base}.{up}.weight", f"{base}.{down}.weight"


def _layout(path: str, spec: MoESpec | ExpertsSpec, model: nn.Module) -> BlockLayout:
    parent, _, name = path.rpartition(".")
    if isinstance(spec, ExpertsSpec):
        names = expert_disk_names(model, name, spec.experts.has_gate)
        disk_name = (names.block_name if names else None) or name
        per_expert = (names.gate, names.up, names.down) if names else None
        extra = {"experts_name": spec.experts_name, "in_proj": spec.experts.in_proj}
    else:
        adapter = registered_families()[spec.family]
        disk_name, per_expert, extra = adapter.disk_block_name or name, adapter.disk_experts, {}
    return BlockLayout(path, f"{parent}.{disk_name}" if parent else disk_name, per_expert, **extra)


def block_layouts(model: nn.Module) -> list[BlockLayout]:
    """The MoE blocks of a converted (or unconverted) model with their checkpoint layout."""
    sites = moe_sites(model)
    found = [(path, site.spec) for path, site in sites]
    if not found:
        found = [(path, spec) for path, _, spec in find_convertible_blocks(model)[0]]
    return [_layout(path, spec, model) for path, spec in found]


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
    layout, suffix = _expert_suffix(key, layouts)
    if suffix is None:
        yield disk_key(key, layouts), full
        return
    for expert in range(full.shape[0]):
        gate_key, up_key, down_key = layout.expert_keys(expert)
        if suffix == layout.fused_suffixes[1]:
            yield down_key, full[expert]
        elif gate_key is None:
            yield up_key, full[expert]
        else:
            gate, up = full[expert].chunk(2, dim=0)
            yield gate_key, gate
            yield up_key, up


def _expert_suffix(key: str, layouts: list[BlockLayout]) -> tuple[BlockLayout | None, str | None]:
    """The block owning ``key`` and, when ``key`` is a stacked expert weight stored per expert, its suffix."""
    layout = _owner(key, layouts)
    if layout is None or layout.per_expert is None:
        return layout, None
    suffix = key[len(layout.path) + 1 :]
    return layout, suffix if suffix in layout.fused_suffixes else None


def read_from_disk(key: str, index: tuple[slice, ...], source, layouts: list[BlockLayout]) -> torch.Tensor:
    """The ``index`` slice of the in-memory tensor ``key``, read from whichever layout ``source`` holds.

    Fused keys are sliced directly (only the bytes of the slice are read); a
    per-expert checkpoint is assembled from the experts the slice covers.
    """
    if source.has(key):
        return source.read(key, index)
    layout, suffix = _expert_suffix(key, layouts)
    if suffix is not None:
        down = suffix == layout.fused_suffixes[1]
        experts = range(*index[0].indices(_num_experts(layout, source)))
        rows = []
        for expert in experts:
            gate_key, up_key, down_key = layout.expert_keys(expert)
            if down:
                rows.append(source.read(down_key, index[1:]))
            elif gate_key is None:
                rows.append(source.read(up_key, index[1:]))
            else:  # gate rows then up rows, as in the fused tensor
                gate_up = torch.cat([source.read(gate_key, ()), source.read(up_key, ())], dim=0)
                rows.append(gate_up[index[1:]])
        if rows:
            return torch.stack(rows)
        return torch.empty((0, *_fused_row_shape(layout, source, down)))
    return source.read(disk_key(key, layouts), index)


def disk_shape(key: str, source, layouts: list[BlockLayout]) -> tuple[int, ...] | None:
    """The global shape ``key`` has in ``source`` (either layout), or ``None`` if it is absent."""
    if source.has(key):
        return source.shape(key)
    layout, suffix = _expert_suffix(key, layouts)
    if suffix is not None:
        num = _num_experts(layout, source)
        if num == 0:
            return None
        return (num, *_fused_row_shape(layout, source, suffix == layout.fused_suffixes[1]))
    name = disk_key(key, layouts)
    return source.shape(name) if source.has(name) else None


def _fused_row_shape(layout: BlockLayout, source, down: bool) -> tuple[int, ...]:
    """One expert's slice of the fused tensor, from expert 0's per-expert tensors."""
    gate_key, up_key, down_key = layout.expert_keys(0)
    if down:
        return tuple(source.shape(down_key))
    if gate_key is None:
        return tuple(source.shape(up_key))
    rows, cols = source.shape(gate_key)
    return (2 * rows, cols)


def _num_experts(layout: BlockLayout, source) -> int:
    count = 0
    while source.has(layout.expert_keys(count)[2]):
        count += 1
    return count
