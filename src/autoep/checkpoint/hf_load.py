"""`autoep.from_pretrained`: build on the meta device, shard, then read only this rank's slices.

Parameters are created on the meta device (buffers stay real: they are small
and some, like rotary frequencies, are computed at construction), the model is
converted and sharded by `parallelize`, each rank allocates only its own
shards, and fills them from memory-mapped safetensors: a rank reads its own
experts and its FSDP rows of every dense tensor, nothing else. Both the fused
transformers-5 layout and per-expert checkpoints load; dtypes are cast.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from autoep.checkpoint.hf_layout import disk_layout, disk_shape, read_from_disk
from autoep.checkpoint.safetensors_io import SafetensorsSource
from autoep.config import AutoEPConfig
from autoep.errors import CheckpointError
from autoep.load_balance import added_bias_keys
from autoep.parallel.materialize import local_index
from autoep.parallelize import parallelize


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create every ``nn.Parameter`` on the meta device (buffers stay where they are made)."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _tied_sources(model: nn.Module) -> dict[str, str]:
    tied = getattr(model, "_tied_weights_keys", None)
    config = model.config.get_text_config()
    if not getattr(config, "tie_word_embeddings", False) or not isinstance(tied, dict):
        return {}
    return dict(tied)


@torch.no_grad()
def load_hf_weights(model: nn.Module, directory: str | os.PathLike) -> None:
    """Fill every tensor of ``model``'s state dict (this rank's slice of it) from a HF directory."""
    source = SafetensorsSource(directory)
    layouts = disk_layout(model)
    tied = _tied_sources(model)
    state = model.state_dict()
    for key in added_bias_keys(model) & state.keys():  # autoep's own selection biases start at 0
        if not source.has(key):
            local = state.pop(key)
            (local.to_local() if isinstance(local, DTensor) else local).zero_()
    problems, missing = [], []
    for key, tensor in state.items():
        found = disk_shape(tied.get(key, key) if not source.has(key) else key, source, layouts)
        if found is None:
            missing.append(key)
        elif tuple(found) != tuple(tensor.shape):
            problems.append(f"{key}: file {list(found)}, model {list(tensor.shape)}")
    if missing or problems:
        parts = [f"missing keys {missing[:6]}{' ...' if len(missing) > 6 else ''}"] if missing else []
        parts += [f"shape mismatch {problems[:6]}"] if problems else []
        raise CheckpointError(f"{directory} does not fit the model: " + "; ".join(parts))
    for key, tensor in state.items():
        name = key if (source.has(key) or key not in tied) else tied[key]
        data = read_from_disk(name, local_index(tensor), source, layouts)
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        local.copy_(data.to(local.dtype))


def from_pretrained(path: str | os.PathLike, config: AutoEPConfig, *, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a HF MoE model directory straight into the expert-parallel, sharded layout of ``config``.

    Call on every rank of an initialised process group. Returns the
    parallelized model (see :func:`autoep.parallelize`); ``dtype`` defaults to
    the checkpoint's ``torch_dtype`` (or fp32).
    """
    from transformers import AutoConfig

    from autoep.models.loading import auto_model_class

    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{str(path)!r} is not a Hugging Face model directory (no config.json)")
    hf_config = AutoConfig.from_pretrained(path)
    with parameters_on_meta():
        model = auto_model_class(hf_config).from_config(hf_config, dtype=dtype or torch.float32)
    parallelize(model, config, init_meta=False)  # allocates this rank's shards; the weights come next
    load_hf_weights(model, path)
    return model
