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

import re
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from torch import nn

from autoep.checkpoint.hf_mapping import expert_disk_names, key_renames
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
    unused_in_experts: int = 0  # in-projection experts HF allocates and never reads (LongCat): written as zeros

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
        disk_name, per_expert = adapter.disk_block_name or name, adapter.disk_experts
        extra = {"unused_in_experts": spec.unused_in_rows}
    return BlockLayout(path, f"{parent}.{disk_name}" if parent else disk_name, per_expert, **extra)


@dataclass(frozen=True)
class DiskLayout:
    """How a model's state dict maps onto its Hugging Face files: per-block expert layouts, and the
    family's other renames (``(in memory, on disk)`` substrings, e.g. ERNIE 4.5's selection bias)."""

    blocks: tuple[BlockLayout, ...] = ()
    renames: tuple[tuple[str, str], ...] = ()


def disk_layout(model: nn.Module, per_expert: bool = True) -> DiskLayout:
    """The layout transformers' ``save_pretrained`` writes for ``model`` (``per_expert=False``: the
    in-memory names, experts fused)."""
    if not per_expert:
        return DiskLayout()
    blocks = block_layouts(model)
    block_names = {b.path.rpartition(".")[2] for b in blocks}
    renames = tuple((mem, disk) for mem, disk in key_renames(model) if mem.strip(".") not in block_names)
    blocks = tuple(replace(b, disk_path=apply_renames(b.disk_path, renames)) for b in blocks)
    return DiskLayout(blocks, renames)


def apply_renames(key: str, renames: tuple[tuple[str, str], ...]) -> str:
    """``key`` with each in-memory substring replaced by its on-disk form, where it starts a name part
    (``model.`` renames ``model.layers...``, not ``language_model.layers...``)."""
    for in_memory, on_disk in renames:
        boundary = "" if in_memory.startswith(".") else r"(?:^|(?<=\.))"
        key = re.sub(boundary + re.escape(in_memory), lambda _, d=on_disk: d, key)
    return key


def block_layouts(model: nn.Module) -> list[BlockLayout]:
    """The MoE blocks of a converted (or unconverted) model with their checkpoint layout."""
    sites = moe_sites(model)
    found = [(path, site.spec) for path, site in sites]
    if not found:
        found = [(path, spec) for path, _, spec in find_convertible_blocks(model)[0]]
    return [_layout(path, spec, model) for path, spec in found]


def _owner(key: str, layout: DiskLayout) -> BlockLayout | None:
    for block in layout.blocks:
        if key.startswith(block.path + "."):
            return block
    return None


def disk_key(key: str, layout: DiskLayout) -> str:
    """The on-disk name of a non-expert tensor: the block's own disk name, then the family's renames."""
    block = _owner(key, layout)
    name = key if block is None else block.disk_path + key[len(block.path) :]
    return apply_renames(name, layout.renames)


def split_for_disk(key: str, full: torch.Tensor, layout: DiskLayout) -> Iterator[tuple[str, torch.Tensor]]:
    """(disk key, tensor) pairs that store the in-memory tensor ``key`` in the HF layout."""
    block, suffix = _expert_suffix(key, layout)
    if suffix is None:
        yield disk_key(key, layout), full
        return
    for expert in range(full.shape[0]):
        gate_key, up_key, down_key = block.expert_keys(expert)
        if suffix == block.fused_suffixes[1]:
            yield down_key, full[expert]
        elif gate_key is None:
            yield up_key, full[expert]
        else:
            gate, up = full[expert].chunk(2, dim=0)
            yield gate_key, gate
            yield up_key, up
    if suffix == block.fused_suffixes[0]:
        yield from _unused_in_experts(block, full)


def _unused_in_experts(block: BlockLayout, full: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Zeros for the in-projection experts the family allocates but never reads (LongCat's zero experts).

    The converted layer holds only the real experts; transformers still expects these keys.
    """
    for expert in range(full.shape[0], full.shape[0] + block.unused_in_experts):
        gate_key, up_key, _ = block.expert_keys(expert)
        if gate_key is None:
            yield up_key, full.new_zeros(full.shape[1:])
        else:  # one tensor per key: safetensors refuses tensors that share memory
            rows, cols = full.shape[1] // 2, full.shape[2]
            yield gate_key, full.new_zeros(rows, cols)
            yield up_key, full.new_zeros(rows, cols)


def _expert_suffix(key: str, layout: DiskLayout) -> tuple[BlockLayout | None, str | None]:
    """The block owning ``key`` and, when ``key`` is a stacked expert weight stored per expert, its suffix."""
    block = _owner(key, layout)
    if block is None or block.per_expert is None:
        return block, None
    suffix = key[len(block.path) + 1 :]
    return block, suffix if suffix in block.fused_suffixes else None


def read_from_disk(key: str, index: tuple[slice, ...], source, layout: DiskLayout) -> torch.Tensor:
    """The ``index`` slice of the in-memory tensor ``key``, read from whichever layout ``source`` holds.

    Fused keys are sliced directly (only the bytes of the slice are read); a
    per-expert checkpoint is assembled from the experts the slice covers.
    """
    if source.has(key):
        return source.read(key, index)
    block, suffix = _expert_suffix(key, layout)
    if suffix is not None:
        down = suffix == block.fused_suffixes[1]
        rows = []
        for expert in range(*index[0].indices(_num_experts(block, source))):
            gate_key, up_key, down_key = block.expert_keys(expert)
            if down:
                rows.append(source.read(down_key, index[1:]))
            elif gate_key is None:
                rows.append(source.read(up_key, index[1:]))
            else:  # gate rows then up rows, as in the fused tensor
                gate_up = torch.cat([source.read(gate_key, ()), source.read(up_key, ())], dim=0)
                rows.append(gate_up[index[1:]])
        if rows:
            return torch.stack(rows)
        return torch.empty((0, *_fused_row_shape(block, source, down)))
    return source.read(disk_key(key, layout), index)


def disk_shape(key: str, source, layout: DiskLayout) -> tuple[int, ...] | None:
    """The global shape ``key`` has in ``source`` (either layout), or ``None`` if it is absent."""
    if source.has(key):
        return source.shape(key)
    block, suffix = _expert_suffix(key, layout)
    if suffix is not None:
        num = _num_experts(block, source)
        if num == 0:
            return None
        return (num, *_fused_row_shape(block, source, suffix == block.fused_suffixes[1]))
    name = disk_key(key, layout)
    return source.shape(name) if source.has(name) else None


def _fused_row_shape(block: BlockLayout, source, down: bool) -> tuple[int, ...]:
    """One expert's slice of the fused tensor, from expert 0's per-expert tensors."""
    gate_key, up_key, down_key = block.expert_keys(0)
    if down:
        return tuple(source.shape(down_key))
    if gate_key is None:
        return tuple(source.shape(up_key))
    rows, cols = source.shape(gate_key)
    return (2 * rows, cols)


def _num_experts(block: BlockLayout, source) -> int:
    count = 0
    while source.has(block.expert_keys(count)[2]):
        count += 1
    return count
