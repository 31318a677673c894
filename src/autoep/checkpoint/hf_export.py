"""Export to Hugging Face safetensors, streaming one tensor at a time.

From a live (sharded) model, `export_hf` gathers one tensor at a time on
every rank and rank 0 appends it to the current shard; from a checkpoint
directory, `export_checkpoint` reads one tensor at a time out of the DCP files
in a single process. Either way no process ever holds more than one shard and
one tensor, never the whole model.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from tqdm import tqdm

from autoep.checkpoint.hf_layout import DiskLayout, disk_layout, split_for_disk
from autoep.checkpoint.integrity import verify_checkpoint
from autoep.checkpoint.manager import full_tensor, read_metadata, resolve_checkpoint
from autoep.checkpoint.safetensors_io import ShardWriter
from autoep.errors import CheckpointError
from autoep.load_balance import added_bias_keys
from autoep.parallel.data_parallel import settle_parameters

HF_CONFIG = "hf_config.json"


def parse_size(size: int | str) -> int:
    """``"5GB"`` / ``"500MB"`` / bytes -> bytes."""
    if isinstance(size, int):
        return size
    units = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    text = size.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def _tied_keys(model: nn.Module) -> set[str]:
    config = getattr(model, "config", None)
    if config is None or not getattr(config.get_text_config(), "tie_word_embeddings", False):
        return set()
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied) if not isinstance(tied, dict) else set(tied.keys())


def _prepare_dir(out_dir: Path) -> Path:
    """Write into a sibling temporary directory; it replaces ``out_dir`` only when complete."""
    staging = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def _commit_dir(staging: Path, out_dir: Path) -> None:
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(staging, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out_dir)


_WEIGHT_FILES = ("model.safetensors", "model-*.safetensors", "model.safetensors.index.json")


def _merge_dir(staging: Path, out_dir: Path) -> None:
    """Move the staged model files into ``out_dir``, leaving its other files (checkpoints, logs) alone."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for pattern in _WEIGHT_FILES:  # weights of an earlier export must not mix with this one's
        for stale in out_dir.glob(pattern):
            stale.unlink()
    for item in staging.iterdir():
        os.replace(item, out_dir / item.name)
    staging.rmdir()


def _warn_dropped(keys: set[str] | list[str]) -> None:
    if keys:
        warnings.warn(
            f"not exported: {len(keys)} router selection bias(es) that autoep added for aux-loss-free balancing "
            f"(e.g. {sorted(keys)[0]}); this family's Hugging Face model has no such tensor, so the exported "
            "model routes without them",
            stacklevel=3,
        )


def _added_keys(model: nn.Module) -> set[str]:
    added = added_bias_keys(model)
    _warn_dropped(added)
    return added


def export_hf(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    max_shard_size: int | str = "5GB",
    per_expert: bool = True,
    into_existing: bool = False,
) -> Path:
    """Write ``model`` (converted and sharded or not) as a HF model directory; call on every rank.

    ``per_expert=True`` stores experts the way transformers' ``save_pretrained``
    does for the family (one module per expert); ``False`` keeps the fused
    transformers-5 tensors. Both load with ``AutoModelForCausalLM.from_pretrained``.
    ``out_dir`` is replaced when the export is complete; with ``into_existing``
    the model files are moved into it instead and its other contents stay
    (Trainer's output directory, which also holds its checkpoints).
    """
    out_dir = Path(out_dir)
    rank = dist.get_rank() if dist.is_initialized() else 0
    layouts = disk_layout(model, per_expert)
    skip = _tied_keys(model) | _added_keys(model)
    settle_parameters(model)
    staging = _prepare_dir(out_dir) if rank == 0 else None
    writer = ShardWriter(staging, parse_size(max_shard_size)) if rank == 0 else None
    items = [(k, v) for k, v in model.state_dict().items() if k not in skip]
    for key, value in tqdm(items, desc="export", unit="tensor", disable=rank != 0, leave=False):
        full = full_tensor(value)
        if writer is not None:
            for name, tensor in split_for_disk(key, full, layouts):
                writer.add(name, tensor)
        del full
    if rank == 0:
        writer.close()
        model.config.save_pretrained(staging)
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(staging)
        (_merge_dir if into_existing else _commit_dir)(staging, out_dir)
    if dist.is_initialized():
        dist.barrier()
    return out_dir


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    max_shard_size: int | str = "5GB",
    per_expert: bool = True,
    dtype: torch.dtype | None = None,
) -> Path:
    """Turn an autoep checkpoint into a HF model directory, in this process, one tensor at a time."""
    from transformers import AutoConfig

    from autoep.models.loading import auto_model_class

    step_dir = resolve_checkpoint(checkpoint)
    read_metadata(step_dir)
    verify_checkpoint(step_dir)
    config_file = step_dir / HF_CONFIG
    if not config_file.is_file():
        raise CheckpointError(f"{step_dir} has no {HF_CONFIG}: it was not saved from a Hugging Face model")
    hf_config = AutoConfig.for_model(**json.loads(config_file.read_text()))
    with torch.device("meta"):
        skeleton = auto_model_class(hf_config).from_config(hf_config)
    layouts: DiskLayout = disk_layout(skeleton, per_expert)
    skip = _tied_keys(skeleton)
    metadata = dcp.FileSystemReader(str(step_dir)).read_metadata()
    known = set(skeleton.state_dict())
    saved = [
        k[len("model.") :]
        for k, v in metadata.state_dict_metadata.items()
        if k.startswith("model.") and isinstance(v, TensorStorageMetadata)
    ]
    _warn_dropped([k for k in saved if k not in known and k.endswith("e_score_correction_bias")])
    keys = [f"model.{k}" for k in saved if k not in skip and (k in known or not k.endswith("e_score_correction_bias"))]
    out_dir = Path(out_dir)
    staging = _prepare_dir(out_dir)
    writer = ShardWriter(staging, parse_size(max_shard_size))
    for flat_key in tqdm(keys, desc="export", unit="tensor", leave=False):
        meta = metadata.state_dict_metadata[flat_key]
        tensor = torch.empty(meta.size, dtype=meta.properties.dtype)
        dcp.load({flat_key: tensor}, checkpoint_id=str(step_dir), no_dist=True)
        if dtype is not None:
            tensor = tensor.to(dtype)
        for name, part in split_for_disk(flat_key[len("model.") :], tensor, layouts):
            writer.add(name, part)
    writer.close()
    hf_config.save_pretrained(staging)
    _commit_dir(staging, out_dir)
    return out_dir
