"""Representative layers: simulate a few decoder layers and scale to the model's depth.

Simulating all 61 layers of a DeepSeek-V3 step takes far longer than one
layer of each kind. Every per-layer quantity of a step (sharded parameters,
gradients, optimizer state, saved activations, collective bytes) grows
linearly with the number of layers of each kind, while the transient part
(one layer's gathered weights, the logits) does not. So the planner simulates
a base model with the first layer of each kind, plus, for each kind with more
than one layer, the base with one more layer of that kind; the difference is
that kind's per-layer cost, and

    estimate(model) = base + sum over kinds of (layers of the kind - 1) x per-layer cost.

Layers are of the same kind when their parameters have the same names and
shapes and their ``layer_types`` entry (sliding or full attention) is equal.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from autoep.parallel.fsdp import decoder_layers

FULL_DEPTH_LIMIT = 6  # models this shallow are simulated whole


def _layer_list(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(parent, attribute, ModuleList) holding the decoder layers."""
    layers = decoder_layers(model)
    ids = {id(layer) for layer in layers}
    for module in model.modules():
        for name, child in module.named_children():
            if isinstance(child, nn.ModuleList) and child and all(id(m) in ids for m in child):
                return module, name, child
    raise ValueError(f"{type(model).__name__}: no ModuleList of decoder layers found")


def layer_kinds(model: nn.Module) -> list[str]:
    """A kind label per decoder layer (model order)."""
    _, _, layers = _layer_list(model)
    types = getattr(model.config.get_text_config(), "layer_types", None) or []
    signatures: dict[tuple, str] = {}
    kinds = []
    for index, layer in enumerate(layers):
        shapes = tuple((n, tuple(p.shape)) for n, p in layer.named_parameters())
        attention = types[index] if index < len(types) else ""
        key = (type(layer).__name__, shapes, attention)
        if key not in signatures:
            moe = "moe" if any("experts" in n for n, _ in shapes) else "dense"
            signatures[key] = f"{moe}{'/' + attention if attention else ''}#{len(signatures)}"
        kinds.append(signatures[key])
    return kinds


def keep_layers(model: nn.Module, indices: list[int]) -> nn.Module:
    """A copy of ``model`` (meta) with only the decoder layers at ``indices``; the config follows."""
    parent, name, layers = _layer_list(model)
    kept = nn.ModuleList([layers[i] for i in indices])
    setattr(parent, name, nn.ModuleList())  # do not copy the layers we drop
    memo: dict = {}
    try:
        pruned = copy.deepcopy(model, memo)
    finally:
        setattr(parent, name, layers)
    # The same memo: the kept layers share the copy's config and rotary tables.
    setattr(_layer_list_parent(pruned, parent, model), name, copy.deepcopy(kept, memo))
    text = pruned.config.get_text_config()
    types = getattr(text, "layer_types", None)
    text.num_hidden_layers = len(indices)
    if types:
        text.layer_types = [types[i] for i in indices]
    return pruned


def _layer_list_parent(copy_root: nn.Module, parent: nn.Module, root: nn.Module) -> nn.Module:
    path = next(n for n, m in root.named_modules() if m is parent)
    return copy_root.get_submodule(path) if path else copy_root


@dataclass(frozen=True)
class Variant:
    """A model with some of the layers, and how much of the estimate it stands for."""

    indices: tuple[int, ...]
    kind: str | None  # the kind this variant adds a second layer of (None: the base)
    extra_layers: int  # how many more layers of ``kind`` the full model has than the base


@dataclass(frozen=True)
class ScalePlan:
    """Which variants to simulate for a model, and how to describe that."""

    variants: tuple[Variant, ...]
    total_layers: int
    full: bool

    def describe(self) -> str:
        if self.full:
            return f"all {self.total_layers} layers simulated"
        simulated = len(self.variants[0].indices)
        return (
            f"{simulated} of {self.total_layers} layers simulated (one per layer kind, {len(self.variants)} runs), "
            "scaled linearly per layer kind"
        )


def scale_plan(model: nn.Module, full: bool | None = None) -> ScalePlan:
    """The variants to simulate (``full``: all layers; default: whole only when the model is shallow)."""
    kinds = layer_kinds(model)
    n = len(kinds)
    if full or (full is None and n <= FULL_DEPTH_LIMIT):
        return ScalePlan((Variant(tuple(range(n)), None, 0),), n, True)
    first: dict[str, list[int]] = {}
    for index, kind in enumerate(kinds):
        first.setdefault(kind, []).append(index)
    base = sorted(indices[0] for indices in first.values())
    variants = [Variant(tuple(base), None, 0)]
    for kind, indices in first.items():
        if len(indices) > 1:
            variants.append(Variant(tuple(sorted([*base, indices[1]])), kind, len(indices) - 1))
    return ScalePlan(tuple(variants), n, False)


def builders(model: nn.Module, plan: ScalePlan) -> list[Callable[[], nn.Module]]:
    """One fresh-model factory per variant (each call returns a new meta model)."""
    if plan.full:
        template = model
        return [lambda: copy.deepcopy(template)]
    templates = [keep_layers(model, list(v.indices)) for v in plan.variants]
    return [lambda t=t: copy.deepcopy(t) for t in templates]


def extrapolate(values: list, plan: ScalePlan):
    """``base + sum((variant - base) * extra_layers)`` for values supporting +, - and ``scaled``."""
    base = values[0]
    total = base
    for variant, value in zip(plan.variants[1:], values[1:], strict=True):
        total = total + (value - base).scaled(variant.extra_layers)
    return total


class Vector(dict):
    """Named numbers that add, subtract and scale (collective bytes per kind)."""

    def __add__(self, other: dict) -> Vector:
        return Vector({k: self.get(k, 0) + other.get(k, 0) for k in {*self, *other}})

    def __sub__(self, other: dict) -> Vector:
        return Vector({k: self.get(k, 0) - other.get(k, 0) for k in {*self, *other}})

    def scaled(self, factor: float) -> Vector:
        return Vector({k: round(v * factor) for k, v in self.items()})
