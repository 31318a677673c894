"""Discover the MoE model types of the installed transformers from its own source (no hand-written list)."""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path

from autoep.models.zoo.common import _is_int, _raw, _sub_configs

# Signals in a modeling module's source that it holds a routed-experts layer.
_EXPERTS_DECORATOR = "use_experts_implementation"
_MOE_CLASS = re.compile(
    r"^class (\w*?(?:Experts|SparseMoe\w*|SparseMLP|MoE|Moe|Moe(?:Block|Layer|MLP|Mlp)|MoE(?:Block|Layer|MLP)"
    r"|Top\w*Router|TopkRouter|TopKGating))\b",
    re.MULTILINE,
)
# Config attributes that count routed experts.
_EXPERT_COUNT_ATTRS = (
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
    "moe_num_experts",
    "num_routed_experts",
    "expert_num",
)
# A composite config naming another model type as the default of a sub-config.
_SUB_TYPE_REF = re.compile(r"""(?:model_type\s*=\s*|CONFIG_MAPPING\[)["']([\w\-]+)["']""")


@functools.cache
def _transformers_models_dir() -> Path:
    spec = importlib.util.find_spec("transformers.models")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations)))


@functools.cache
def _module_source(module: str, prefix: str) -> str:
    """All ``{prefix}*.py`` files of ``transformers.models.<module>`` as one string ('' when none)."""
    folder = _transformers_models_dir() / module.replace(".", "/")
    if not folder.is_dir():
        return ""
    return "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted(folder.glob(f"{prefix}*.py")))


def _moe_markers(source: str) -> list[str]:
    """Why ``source`` looks like it holds routed experts (empty: it does not)."""
    found = [m.group(1) for m in _MOE_CLASS.finditer(source)]
    if _EXPERTS_DECORATOR in source:
        found.insert(0, _EXPERTS_DECORATOR)
    return found


def _auto_class_names(model_type: str) -> list[str]:
    """The model classes the Auto* mappings give ``model_type`` (base, causal LM, image-text-to-text...)."""
    from transformers.models.auto import modeling_auto

    names: list[str] = []
    for attr in dir(modeling_auto):
        mapping = getattr(modeling_auto, attr)
        if attr.endswith("_MAPPING_NAMES") and isinstance(mapping, dict):
            value = mapping.get(model_type)
            for name in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(name, str) and name not in names:
                    names.append(name)
    return names


@functools.cache
def _class_index() -> dict[str, str]:
    """Class name -> module (relative to ``transformers.models``) of the library's exported classes."""
    import transformers

    index: dict[str, str] = {}
    for name, module in getattr(transformers, "_class_to_module", {}).items():
        if module.startswith("models."):
            index[name] = module.removeprefix("models.")
    return index


@functools.cache
def _module_defining(class_name: str) -> str | None:
    """The ``transformers.models`` package that defines ``class_name`` (from the export index, else by
    searching the modeling sources)."""
    module = _class_index().get(class_name)
    if module:
        return module.split(".")[0]
    pattern = re.compile(rf"^class {re.escape(class_name)}\b", re.MULTILINE)
    for path in sorted(_transformers_models_dir().glob("*/modeling_*.py")):
        if pattern.search(path.read_text(encoding="utf-8", errors="replace")):
            return path.parent.name
    return None


def _config_class(model_type: str) -> type:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type]


def _sub_config_types(config_class: type) -> set[str]:
    """Model types of the sub-configs a composite config class builds by default, transitively."""
    types: set[str] = set()
    seen: set[type] = {config_class}
    stack = [config_class]
    while stack:
        cls = stack.pop()
        specs = getattr(cls, "sub_configs_defaults", None) or {}
        classes = getattr(cls, "sub_configs", None) or {}
        for key in {*specs, *classes}:
            spec, sub_cls = specs.get(key), classes.get(key)
            sub_type = getattr(spec, "model_type", None) or getattr(sub_cls, "model_type", None)
            if sub_cls is None or sub_cls.__name__ == "AutoConfig":  # the default type is on the spec
                try:
                    sub_cls = _config_class(sub_type) if sub_type else None
                except (KeyError, ImportError, AttributeError):
                    sub_cls = None
            if sub_type:
                types.add(sub_type)
            if sub_cls is not None and sub_cls not in seen:
                seen.add(sub_cls)
                stack.append(sub_cls)
    return types


def _has_expert_count(config_class: type) -> bool:
    """Whether a config class declares an expert count (its model may hold experts)."""
    names = set(getattr(config_class, "attribute_map", {}) or {})
    for klass in config_class.__mro__:
        names.update(vars(klass).get("__annotations__", {}))
        names.update(vars(klass))
    return any(n in names for n in _EXPERT_COUNT_ATTRS)


def _composite_with_experts(model_type: str, moe_types: list[str]) -> str | None:
    """``"sub-config X"`` when the default config of ``model_type`` holds an MoE type ``X`` with experts on."""
    try:
        config = _config_class(model_type)()
    except Exception:  # a default that does not build (gemma4_assistant forbids MoE text configs)
        return None
    stack = list(_sub_configs(config).values())
    while stack:
        sub = stack.pop()
        counts = [_raw(sub, n) for n in _EXPERT_COUNT_ATTRS]
        if sub.model_type in moe_types and any(_is_int(c) and c > 1 for c in counts):
            return f"sub-config {sub.model_type}"
        stack.extend(_sub_configs(sub).values())
    return None


@functools.cache
def _discover() -> dict[str, tuple[str, ...]]:
    """``{model_type: evidence}`` for every top-level MoE model type; evidence says why it counts as MoE."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

    module_of = {t: model_type_to_module_name(t) for t in CONFIG_MAPPING_NAMES}
    by_module: dict[str, list[str]] = {}
    for model_type, module in module_of.items():
        by_module.setdefault(module, []).append(model_type)

    # 1. The type's own modeling source, and that of the modules defining its Auto classes
    #    (some types, e.g. sarvam_moe, reuse another family's modeling code).
    evidence: dict[str, tuple[str, ...]] = {}
    for model_type, module in module_of.items():
        markers = _moe_markers(_module_source(module, "modeling_"))
        if not markers and not _module_source(module, "modeling_"):
            for name in _auto_class_names(model_type):
                other = _module_defining(name) if not name.endswith("Config") else None
                if other and other != module:
                    markers = [f"{name}: {m}" for m in _moe_markers(_module_source(other, "modeling_"))]
                    if markers:
                        break
        if markers:
            evidence[model_type] = tuple(markers[:3])

    # 2. Composite configs whose default text (or other) sub-config is an MoE type of another module.
    for model_type, module in module_of.items():
        if model_type in evidence:
            continue
        refs = set(_SUB_TYPE_REF.findall(_module_source(module, "configuration_")))
        moe_refs = [r for r in sorted(refs) if r in evidence and module_of.get(r) != module]
        if moe_refs:
            reason = _composite_with_experts(model_type, moe_refs)
            if reason:
                evidence[model_type] = (reason,)

    # 3. Fold sub-model types into the composite type of the same module that builds them.
    folded: set[str] = set()
    for module, types in by_module.items():
        candidates = [t for t in types if t in evidence]
        if len(types) < 2 or not candidates:
            continue
        for model_type in types:
            try:
                subs = _sub_config_types(_config_class(model_type))
            except (KeyError, ImportError, AttributeError):
                continue
            folded.update(s for s in subs if s != model_type and module_of.get(s) == module)
    return {t: e for t, e in evidence.items() if t not in folded}


def moe_type_evidence() -> dict[str, tuple[str, ...]]:
    """Why each discovered type counts as MoE (decorator, class names, or the MoE sub-config it builds)."""
    return dict(_discover())


def moe_model_types() -> list[str]:
    """Every Mixture-of-Experts model type of the installed transformers, sorted.

    Found from source, not from a list: a type counts when its modeling code
    (or that of the classes its Auto mappings name) holds a routed-experts
    layer (``@use_experts_implementation``, an ``*Experts`` / ``*SparseMoeBlock``
    / ``*MoE`` / top-k router class), or when it is a composite whose default
    sub-config is such a type (``nemotron_h_omni`` -> ``nemotron_h``).
    Sub-model types of a composite (``qwen3_vl_moe_text``) are folded into it.
    """
    return sorted(_discover())
