"""Keep Hugging Face's ``output_router_logits`` working after conversion.

transformers 5 collects ``router_logits`` with forward hooks that it installs on
modules of the family's router class (``_can_record_outputs``). The converted
layer's router is autoep's own class, so the same hook is installed on it; its
output, like the HF routers', holds the logits at index 0. The model then
returns ``router_logits`` and, for families that define one, adds
``router_aux_loss_coef · aux_loss`` to its loss exactly as before conversion.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

from torch import nn


def _install_hook():
    """transformers' hook installer (its name has changed spelling across releases)."""
    try:
        from transformers.utils import output_capturing
    except ImportError:
        return None
    for name in ("install_output_capturing_hook", "install_output_capuring_hook"):
        if hasattr(output_capturing, name):
            return getattr(output_capturing, name)
    return None


def _recorders(model: nn.Module) -> list[tuple[str, object]]:
    """``(key, OutputRecorder)`` pairs declared by every HF model class inside ``model``."""
    found: dict[tuple, tuple[str, object]] = {}  # a wrapper and its base model often share one declaration
    for module in model.modules():
        specs = getattr(type(module), "_can_record_outputs", None)
        if not isinstance(specs, dict):
            continue
        for key, value in specs.items():
            for spec in value if isinstance(value, list) else [value]:
                target = getattr(spec, "target_class", None)
                if target is not None:
                    found[(key, target, spec.index, spec.layer_name)] = (key, spec)
    return list(found.values())


def capture_router_logits(model: nn.Module, replaced: Iterable[tuple[nn.Module, nn.Module]]) -> int:
    """Give each new router the output-recording hooks its HF predecessor's class had.

    ``replaced`` pairs the original router module with its replacement.
    Returns how many hooks were installed.
    """
    recorders = _recorders(model)
    if not recorders:
        return 0
    install = _install_hook()
    installed = 0
    for old, new in replaced:
        for key, spec in recorders:
            if key == "hidden_states" or not isinstance(old, spec.target_class):
                continue
            if spec.layer_name is not None:
                continue  # layer-specific recorders do not target MoE routers in any supported family
            if install is None:
                warnings.warn(
                    "this transformers version has no output-capturing hook autoep knows; "
                    "converted models will not return router_logits",
                    stacklevel=3,
                )
                return installed
            install(new, key, spec.index)
            installed += 1
    return installed


def router_logit_recorders(model: nn.Module) -> list[object]:
    """The ``OutputRecorder`` specs by which ``model`` declares where its router logits come from."""
    return [spec for key, spec in _recorders(model) if key == "router_logits"]
