"""Per-expert checkpoint names read from the family's own conversion mapping in transformers.

transformers 5 keeps, per model type, the transforms that turn checkpoints on
disk (one module per expert: ``experts.N.w1.weight``...) into its fused
in-memory layout, and ``save_pretrained`` applies them in reverse. For the
experts path autoep reads the expert part of that mapping instead of keeping a
table per family: which per-expert names merge into ``experts.gate_up_proj``
(gate then up) and ``experts.down_proj``, and whether the block has another
name on disk (Mixtral-style ``block_sparse_moe``). A family without such a
mapping stores its experts fused on disk, as in memory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

_PER_EXPERT = re.compile(r"experts\.\*\.(\w+)\.weight$")
_RENAME = re.compile(r"^\\?\.(\w+)\\?\.$")
_SIMPLE_OPS = {"MergeModulelist", "Concatenate"}


@dataclass(frozen=True)
class ExpertDiskNames:
    """``gate``/``up``/``down`` per-expert module names on disk (``gate`` is ``None`` for ungated experts)
    and the block's on-disk name when the mapping renames it."""

    gate: str | None
    up: str
    down: str
    block_name: str | None = None


def _transforms(model: nn.Module) -> list:
    """The family's own transforms (not transformers' legacy renames, which save_pretrained does not reverse)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:
        return []
    try:
        return list(get_model_conversion_mapping(model, add_legacy=False))
    except Exception:  # a model transformers cannot map (custom class): treat as fused on disk
        return []


def _literal(pattern: str) -> str | None:
    """A rename pattern as a plain substring, when it is one (only escaped dots allowed)."""
    text = pattern.replace("\\.", ".")
    return None if re.search(r"[\\^$*+?()\[\]{}|]", text) else text


def key_renames(model: nn.Module) -> list[tuple[str, str]]:
    """``(in memory, on disk)`` substrings of the family's plain key renames, e.g. ERNIE 4.5's
    ``mlp.gate.moe_statics.e_score_correction_bias`` stored as ``mlp.moe_statics.e_score_correction_bias``."""
    renames = []
    for transform in _transforms(model):
        if type(transform).__name__ != "WeightRenaming":
            continue
        sources, targets = transform.source_patterns, transform.target_patterns
        if len(sources) != 1 or len(targets) != 1:
            continue
        on_disk, in_memory = _literal(str(sources[0])), _literal(str(targets[0]))
        if on_disk and in_memory and on_disk != in_memory:
            renames.append((in_memory, on_disk))
    return renames


def _expert_names(transform, in_proj: str) -> tuple[str, list[str]] | None:
    """``(target, [per-expert names])`` of a merge of per-expert weights, else ``None``."""
    operations = {type(op).__name__ for op in getattr(transform, "operations", None) or []}
    if "MergeModulelist" not in operations or not operations <= _SIMPLE_OPS:
        return None  # transposes, splits, dequantisation...: not a plain per-expert merge
    targets = transform.target_patterns
    for suffix in (f"experts.{in_proj}", "experts.down_proj"):
        if any(str(t).endswith(suffix) for t in targets):
            names = [m.group(1) for m in (_PER_EXPERT.search(str(s)) for s in transform.source_patterns) if m]
            if len(names) == len(transform.source_patterns):
                return suffix, names
    return None


def expert_disk_names(model: nn.Module, block_name: str, has_gate: bool = True) -> ExpertDiskNames | None:
    """Per-expert names the family's checkpoints use, or ``None`` if they store experts fused."""
    in_proj = "gate_up_proj" if has_gate else "up_proj"
    found: dict[str, list[str]] = {}
    renamed = None
    for transform in _transforms(model):
        if type(transform).__name__ == "WeightRenaming":
            sources, targets = transform.source_patterns, transform.target_patterns
            if len(sources) == 1 and len(targets) == 1 and str(targets[0]) in (f".{block_name}.", rf"\.{block_name}\."):
                match = _RENAME.match(str(sources[0]))
                renamed = match.group(1) if match else renamed
            continue
        parsed = _expert_names(transform, in_proj)
        if parsed is not None:
            found.setdefault(parsed[0], parsed[1])
    up_names, down_names = found.get(f"experts.{in_proj}"), found.get("experts.down_proj")
    if not up_names or not down_names or len(down_names) != 1 or len(up_names) != (2 if has_gate else 1):
        return None
    gate, up = (up_names[0], up_names[1]) if has_gate else (None, up_names[0])
    return ExpertDiskNames(gate, up, down_names[0], renamed)
