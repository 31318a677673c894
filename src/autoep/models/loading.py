"""Resolve a MODEL argument: a built-in tiny model name or a local HF model directory."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from autoep.errors import ConfigError
from autoep.models.tiny import build_tiny_model, is_tiny_model_name, tiny_config, tiny_model_names


def _check_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"{str(path)!r} is neither a built-in model ({', '.join(tiny_model_names())}) "
            "nor a local Hugging Face model directory with a config.json (autoep never downloads)"
        )


def load_config(name_or_path: str):
    """The HF config of MODEL, without touching any weights."""
    if is_tiny_model_name(name_or_path):
        return tiny_config(name_or_path)
    from transformers import AutoConfig

    path = Path(name_or_path)
    _check_dir(path)
    return AutoConfig.from_pretrained(path)


def load_model(name_or_path: str, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """MODEL with real weights: a seeded tiny model, or ``from_pretrained`` on a local directory."""
    if is_tiny_model_name(name_or_path):
        return build_tiny_model(name_or_path, seed=seed, dtype=dtype)
    from transformers import AutoModelForCausalLM

    path = Path(name_or_path)
    _check_dir(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.config._attn_implementation = "eager"
    return model


def build_meta_model(name_or_path: str) -> nn.Module:
    """MODEL's architecture on the meta device: shapes only, no memory, no weights read."""
    from transformers import AutoModelForCausalLM

    config = load_config(name_or_path)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
