"""Resolve a MODEL argument: a built-in tiny model name, ``zoo:TYPE`` or a local HF model directory.

``zoo:TYPE`` is a tiny random model of any MoE model type of the installed
transformers (``zoo:qwen3_next``, ``zoo:minimax``...; see `autoep.models.zoo`),
to try a family with no download.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from autoep.errors import ConfigError
from autoep.models.tiny import build_tiny_model, is_tiny_model_name, tiny_config, tiny_model_names

ZOO_PREFIX = "zoo:"


def _check_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"{str(path)!r} is neither a built-in model ({', '.join(tiny_model_names())}, or zoo:TYPE for any MoE "
            "model type of the installed transformers) nor a local Hugging Face model directory with a config.json "
            "(autoep never downloads)"
        )


def _zoo_type(name: str) -> str | None:
    """The model type of a ``zoo:TYPE`` name (checked against the discovered types), else ``None``."""
    if not name.startswith(ZOO_PREFIX):
        return None
    from autoep.models import zoo

    model_type = name[len(ZOO_PREFIX) :]
    if model_type not in zoo.moe_model_types():
        raise ConfigError(
            f"{model_type!r} is not a MoE model type of this transformers; try one of: "
            f"{', '.join(zoo.moe_model_types())}"
        )
    return model_type


def is_builtin_model(name: str) -> bool:
    """A model autoep builds itself with random weights (``tiny-*`` or ``zoo:TYPE``), not a directory."""
    return is_tiny_model_name(name) or name.startswith(ZOO_PREFIX)


def auto_model_class(config):
    """The transformers Auto class that builds a trainable model for ``config``: a causal LM where the type
    has one, else an image-text-to-text or multimodal LM (the text decoder carries the MoE blocks)."""
    import transformers
    from transformers.models.auto import modeling_auto

    for mapping, auto in (
        ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM"),
        ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "AutoModelForImageTextToText"),
        ("MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES", "AutoModelForMultimodalLM"),
    ):
        if config.model_type in getattr(modeling_auto, mapping, {}):
            return getattr(transformers, auto)
    return transformers.AutoModelForCausalLM  # raises transformers' own clear error for the type


def load_config(name_or_path: str):
    """The HF config of MODEL, without touching any weights."""
    if is_tiny_model_name(name_or_path):
        return tiny_config(name_or_path)
    if (model_type := _zoo_type(name_or_path)) is not None:
        from autoep.models import zoo

        return zoo.tiny_config(model_type)
    from transformers import AutoConfig

    path = Path(name_or_path)
    _check_dir(path)
    return AutoConfig.from_pretrained(path)


def load_model(name_or_path: str, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """MODEL with real weights: a seeded tiny model, or ``from_pretrained`` on a local directory."""
    if is_tiny_model_name(name_or_path):
        return build_tiny_model(name_or_path, seed=seed, dtype=dtype)
    if (model_type := _zoo_type(name_or_path)) is not None:
        from autoep.models import zoo

        return zoo.build_tiny(model_type, seed=seed, dtype=dtype)
    from transformers import AutoConfig

    path = Path(name_or_path)
    _check_dir(path)
    model = auto_model_class(AutoConfig.from_pretrained(path)).from_pretrained(path, dtype=dtype)
    model.config._attn_implementation = "eager"
    return model


def build_meta_model(name_or_path: str) -> nn.Module:
    """MODEL's architecture on the meta device: shapes only, no memory, no weights read."""
    config = load_config(name_or_path)
    with torch.device("meta"):
        return auto_model_class(config).from_config(config)
