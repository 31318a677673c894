"""Errors and quiet helpers shared by the zoo modules."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any


class ZooBuildError(RuntimeError):
    """A zoo model type that cannot be built or run on CPU; ``reason`` is one line."""

    def __init__(self, model_type: str, reason: str):
        super().__init__(f"{model_type}: {reason}")
        self.model_type = model_type
        self.reason = reason


def _one_line(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence transformers' config and init warnings (tiny sizes trip many of them on purpose)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _raw(config: Any, name: str) -> Any:
    """An attribute as stored (per-layer configs raise on some global reads)."""
    stored = vars(config)
    if name in stored:
        return stored[name]
    try:
        return getattr(config, name, None)
    except Exception:
        return None


def _sub_configs(config: Any) -> dict[str, Any]:
    from transformers import PreTrainedConfig

    out = {}
    for key in getattr(config, "sub_configs", None) or {}:
        value = _raw(config, key)
        if isinstance(value, PreTrainedConfig):
            out[key] = value
    return out
