"""Tiny configs: a generic shrinker keyed on attribute names, plus a small table for what it cannot know."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from autoep.models.zoo.common import ZooBuildError, _is_int, _one_line, _quiet, _raw, _sub_configs
from autoep.models.zoo.discovery import _EXPERT_COUNT_ATTRS, _config_class, _has_expert_count, _module_source

HIDDEN = 64
LAYERS = 4
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 16
EXPERTS = 8
TOP_K = 2
VOCAB = 256
AUX_HIDDEN = 32
AUX_LAYERS = 2
AUX_HEADS = 2

_LAYER_COUNTS = (
    "num_hidden_layers",
    "num_layers",
    "n_layers",
    "decoder_layers",
    "encoder_layers",
    "num_decoder_layers",
    "num_encoder_layers",
    "depth",
)
_HIDDEN_NAMES = ("hidden_size", "d_model", "n_embd", "embed_dim", "dim", "model_dim", "width")
_HEAD_COUNTS = (
    "num_attention_heads",
    "n_heads",
    "num_heads",
    "decoder_attention_heads",
    "encoder_attention_heads",
    "swa_num_attention_heads",
    "index_n_heads",
    "indexer_n_heads",
    "linear_num_heads",
    "linear_num_value_heads",
    "num_sliding_attention_heads",
    "heads_per_ngram",
)
_KV_HEAD_COUNTS = (
    "num_key_value_heads",
    "kv_n_heads",
    "swa_num_key_value_heads",
    "linear_num_key_heads",
    "indexer_kv_heads",
)
_HEAD_DIMS = (
    "head_dim",
    "swa_head_dim",
    "linear_head_dim",
    "linear_key_head_dim",
    "linear_value_head_dim",
    "index_head_dim",
    "indexer_head_dim",
    "mamba_head_dim",
    "mamba_d_head",
    "d_kv",
    "kv_channels",
    "qk_nope_head_dim",
    "v_head_dim",
)
_EXPERT_TOP_K = (
    "num_experts_per_tok",
    "num_experts_per_token",
    "moe_topk",
    "moe_top_k",
    "moe_k",
    "top_k_experts",
    "num_selected_experts",
)
_SHARED_EXPERT_COUNTS = ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts", "shared_expert_num")
_DENSE_PREFIX = ("first_k_dense_replace", "num_dense_layers", "moe_layer_start_index")
_EVERY_NTH = (
    "decoder_sparse_step",
    "encoder_sparse_step",
    "moe_layer_freq",
    "moe_layer_interval",
    "interleave_moe_layer_step",
    "attn_layer_period",
    "expert_layer_period",
    "full_attention_interval",
    "global_attn_every_n_layers",
    "sliding_window_pattern",
    "no_rope_layer_interval",
)
_OFFSETS = ("attn_layer_offset", "expert_layer_offset")
_TO_TEXT_HIDDEN = ("out_hidden_size", "text_hidden_size", "thinker_hidden_size", "projector_output_dim")
_ADAPTER_OUT = re.compile(r"^(adapter|projector|merger)_?out(put)?_(dim|size)$")
_ADAPTER_IN = re.compile(r"^(adapter|projector|merger)_?in(put)?_(dim|size)$")
_FFN_SIZES = (
    "d_ff",
    "ffn_hidden_size",
    "decoder_ffn_dim",
    "encoder_ffn_dim",
    "expert_ffn_hidden_size",
    "moe_hidden_size",
    "share_expert_dim",
    "ffn_dim",
    "mlp_dim",
    "moe_latent_size",
)
_SEQ_LENGTHS = ("max_position_embeddings", "max_seq_len", "model_max_length", "max_window_layers")
_WINDOWS = ("sliding_window", "sliding_window_size", "window_size", "attention_chunk_size")
_ZEROED_COUNTS = ("num_nextn_predict_layers", "num_mtp_layers")
_SMALL_STATE = ("mamba_d_state", "ssm_state_size", "state_size", "d_state")
_INDEX_LISTS = re.compile(r"(layers|indexes|indices|layer_ids|_idxs)$")
_MOE_VALUE = re.compile(r"moe|expert", re.IGNORECASE)
_DENSE_VALUE = re.compile(r"^(dense|mlp|ffn)$", re.IGNORECASE)
_TOKEN_ID = re.compile(r"(token_id|token_index|_token)$")
_MEDIA_TOKEN = re.compile(r"image|video|audio|vision|visual|speech|frame|img|vid|boi|eoi|boa|eoa|patch|tts|codec")

# Per-type overrides applied to the (text) config after the generic shrinker, for what names cannot tell.
# Keep this table short: every entry is a family the generic rules do not yet carry.
TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    # The MoE MLP splits hidden features into shared and per-expert parts; the default part exceeds the tiny width.
    "vitpose_backbone": {"part_features": 16},
    # The attention config of real checkpoints carries rope_theta; the default config does not.
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}},
    # Per-layer choices the defaults leave unset (every checkpoint sets them).
    "deepseek_ocr2": {"text_config": {"mlp_layer_types": ["dense", "sparse", "sparse", "sparse"]}},
    "lfm2_moe": {"layer_types": ["conv", "full_attention", "conv", "full_attention"]},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention", "linear_attention", "full_attention"]},
    "qwen4_exp": {
        "text_config": {
            "indexer_n_heads": 4,
            "indexer_kv_heads": 1,
            "indexer_head_dim": 16,
            "indexer_budget": 4,
            "indexer_compress_ratio": 2,
        }
    },
    # Attributes the modeling code reads that only checkpoints' config.json files carry.
    "qwen3_omni_moe": {
        "talker_config": {"spatial_merge_size": 2, "text_config": {"shared_expert_intermediate_size": 32}}
    },
    "step3p7": {"text_config": {"sliding_window": 4}},
}


@dataclass
class _Shrink:
    """What one (sub-)config is shrunk to; ``layers_before`` is its default layer count."""

    text: bool
    layers_before: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int


def _resize_layer_list(name: str, values: list[Any], layers: int, pool: list[Any] | None = None) -> list[Any]:
    """``values`` cut to ``layers`` entries keeping every distinct value of ``pool`` (default ``values``)
    once, and MoE kinds (``"moe"``, ``"hash_moe"``, ``"sparse"`` in an MLP list) twice, where there is room."""
    pool = values if pool is None else pool
    out = list(values[:layers])

    def is_moe(value: Any) -> bool:
        return isinstance(value, str) and bool(_MOE_VALUE.search(value) or ("mlp" in name and "sparse" in value))

    def need(value: Any) -> int:
        return 2 if is_moe(value) else 1

    for wanted in dict.fromkeys(map(_hashable, pool)):
        original = next(v for v in pool if _hashable(v) == wanted)
        while sum(_hashable(v) == wanted for v in out) < need(original):
            hashed = list(map(_hashable, out))
            surplus = [p for p in range(len(out)) if hashed.count(hashed[p]) > need(out[p]) and hashed[p] != wanted]
            if not surplus:
                break
            out[surplus[-1]] = original
    moe_values = [v for v in out if is_moe(v)]
    if moe_values and len(moe_values) < 2:  # no room: a dense-MLP layer becomes MoE (Nemotron-H: mlp -> moe)
        for pos in range(len(out) - 1, -1, -1):
            if isinstance(out[pos], str) and _DENSE_VALUE.match(out[pos]):
                out[pos] = moe_values[0]
                break
    return out


def _hashable(value: Any) -> Any:
    return repr(value) if isinstance(value, (list, dict)) else value


def _shrink_value(name: str, value: Any, s: _Shrink) -> Any:
    """The tiny value of one config attribute, by its name (``value`` unchanged when no rule applies)."""
    lname = name.lower()
    if isinstance(value, float) and (
        "dropout" in lname or "pdrop" in lname or "drop_path" in lname or "jitter" in lname or "layerdrop" in lname
    ):
        return 0.0
    if name in ("use_mamba_kernels", "use_kernels", "use_flash_attention"):
        return False
    if name in ("enable_moe_block", "is_moe", "use_moe") and value is False and s.text:
        return True
    if isinstance(value, list):
        return _shrink_list(name, value, s)
    if isinstance(value, dict):
        return value
    if not _is_int(value):
        if name == "mamba_dt_rank" and value == "auto":
            return value
        if value is None and s.text:  # families whose experts are off by default (gemma4: enable_moe_block)
            if name in _EXPERT_COUNT_ATTRS:
                return EXPERTS
            if name in _EXPERT_TOP_K:
                return TOP_K
            if name == "moe_intermediate_size":
                return 32
            if name in _SHARED_EXPERT_COUNTS:  # unset in the defaults, set by every checkpoint
                return 1
            if name == "head_dim":
                return HEAD_DIM
        return value
    if name in _EXPERT_COUNT_ATTRS and value >= 1 and s.text:  # 1 is "dense" in MoE-capable encoders (VitPose)
        return EXPERTS
    if name in _EXPERT_TOP_K and value >= 1 and s.text:  # top-1 families go to 2 unless their validators refuse
        return TOP_K
    if name == "moe_layer_end_index":
        return s.layers - 1
    if name in _ZEROED_COUNTS:
        return 0
    if name in _DENSE_PREFIX:  # keep one dense layer in front where the family has a dense prefix
        return min(value, 1)
    if name in _KV_HEAD_COUNTS and value > 1:
        return s.kv_heads
    target = _size_target(name, lname, s)
    if s.text and "vocab_size" in lname and name != "vocab_size" and value > VOCAB:
        target = VOCAB  # unpadded_vocab_size, vocab_size_per_layer_input
    return value if target is None else min(value, target)


def _size_target(name: str, lname: str, s: _Shrink) -> int | None:
    """The most an integer size may be in the tiny model (``None``: leave it)."""
    if name in _LAYER_COUNTS:
        return s.layers
    if name in _HIDDEN_NAMES:
        return s.hidden
    if name in _TO_TEXT_HIDDEN or _ADAPTER_OUT.search(name):
        return HIDDEN
    if _ADAPTER_IN.search(name):
        return s.hidden
    if name in _HEAD_COUNTS:
        return s.heads
    if name in ("mamba_num_heads", "mamba_n_heads"):
        return 4
    if name in ("mamba_n_groups", "n_groups"):
        return 2
    if name in ("qk_rope_head_dim", "rotary_dim"):
        return HEAD_DIM // 2
    if name in _HEAD_DIMS:
        return HEAD_DIM
    if name == "qk_head_dim":
        return HEAD_DIM + HEAD_DIM // 2
    if name in ("kv_lora_rank", "q_lora_rank", "o_lora_rank"):
        return 32
    if lname.endswith("_rank") or lname.endswith("lowrank"):
        return 8
    if "intermediate_size" in lname or name in _FFN_SIZES:
        dense = name in ("intermediate_size", "d_ff", "ffn_dim", "mlp_dim") or "dense" in lname
        return 2 * s.hidden if dense or not s.text else 32
    if s.text and name == "vocab_size":
        return VOCAB
    if name in _SEQ_LENGTHS:
        return 128
    if name in _WINDOWS:
        return 4
    if name in _EXPERT_TOP_K:
        return TOP_K
    if name in ("n_group", "num_expert_group"):
        return 4
    if name == "topk_group":
        return 2
    if name in _SHARED_EXPERT_COUNTS:
        return 1
    if name in _EVERY_NTH:
        return 2
    if name in _OFFSETS:
        return 1
    if name in _SMALL_STATE:
        return 16
    if name in ("zero_expert_num", "num_zero_experts", "n_null_experts"):
        return 4
    if name == "mamba_dt_rank":
        return 8
    return None


def _shrink_list(name: str, value: list[Any], s: _Shrink) -> list[Any]:
    if s.layers_before > 1 and len(value) == s.layers_before:
        out = _resize_layer_list(name, value, s.layers)
        if any(h in name for h in ("heads", "head_dim")):
            out = [_shrink_value(name.replace("_per_layer", ""), v, s) for v in out]
        return out
    if _INDEX_LISTS.search(name) and value and all(_is_int(v) for v in value) and s.layers_before > 1:
        if max(value) < s.layers_before:
            return sorted({min(s.layers - 1, v * s.layers // s.layers_before) for v in value})
    if value and all(_is_int(v) for v in value):  # per-modality sizes (Ernie-VL: [text, vision] widths)
        target = _size_target(name, name.lower(), s)
        if target is not None and name not in _LAYER_COUNTS:
            return [min(v, target) for v in value]
    return value


def _layer_count(config: Any) -> int:
    for name in _LAYER_COUNTS:
        value = _raw(config, name)
        if _is_int(value) and value > 0:
            return value
    for name in ("layer_types", "layers_block_type"):
        value = _raw(config, name)
        if isinstance(value, list):
            return len(value)
    return 0


def _is_text_role(key: str | None, config: Any) -> bool:
    """Shrink as the language model (full rules) or as an auxiliary encoder (only needs to build)."""
    if key is None or _has_expert_count(type(config)):
        return True
    return key in ("text_config", "language_config", "llm_config", "decoder_config", "thinker_config", "talker_config")


# How far a (sub-)config is shrunk: everything, only its layer count (and per-layer lists), or not at all.
_SHRINK_ALL, _SHRINK_LAYERS, _SHRINK_NONE = 0, 1, 2


def _split(total: int, weights: list[int]) -> list[int]:
    """``total`` split in proportion to ``weights`` (largest remainder, each part >= 1)."""
    exact = [w * total / sum(weights) for w in weights]
    parts = [max(1, int(x)) for x in exact]
    order = sorted(range(len(parts)), key=lambda i: (-(exact[i] - int(exact[i])), i))
    for i in order[: max(0, total - sum(parts))]:
        parts[i] += 1
    return parts


def _rescaled_rope(rope: Any, old_dim: int, new_dim: int) -> Any:
    """``mrope_section`` (time/height/width split of the rotary half-dim) scaled to the new head size."""
    if not isinstance(rope, dict) or not old_dim or old_dim == new_dim:
        return rope
    if any(isinstance(v, dict) for v in rope.values()):
        return {k: _rescaled_rope(v, old_dim, new_dim) for k, v in rope.items()}
    sections = rope.get("mrope_section")
    if not isinstance(sections, list) or not sections:
        return rope
    target = max(len(sections), round(sum(sections) * new_dim / old_dim))
    return {**rope, "mrope_section": _split(target, sections)}


def _shrink_kwargs(config: Any, text: bool, init_kwargs: dict[str, Any], level: int = _SHRINK_ALL) -> dict[str, Any]:
    """Constructor kwargs that rebuild ``config`` (a default-valued config of its family) tiny.

    Only values that change are returned, so values the config derives from
    others (``layer_types``, ``qk_head_dim``, ``mamba_d_head``...) are
    recomputed from the new sizes; a derived value is passed explicitly only
    when the config refuses to build without it. Sub-configs come back as
    kwargs dicts, so the parent applies its own ``init_kwargs`` to them.
    """
    cls = type(config)
    specs = getattr(cls, "sub_configs_defaults", None) or {}
    subs = _sub_configs(config)

    def sub_kwargs(aux_level: int) -> dict[str, Any]:
        out = {}
        for key, sub in subs.items():
            spec_kwargs = _without_layer_patterns(sub, getattr(specs.get(key), "init_kwargs", None) or {})
            role = _is_text_role(key, sub)
            kwargs: dict[str, Any] = {}
            for sub_level in range(_SHRINK_ALL if role else aux_level, _SHRINK_NONE):
                try:
                    kwargs = _shrink_kwargs(sub, role, spec_kwargs, sub_level)
                    break
                except Exception:  # its validators refuse: shrink it less
                    continue
            kwargs = {**spec_kwargs, **kwargs}
            out[key] = {"model_type": sub.model_type, **kwargs} if sub.model_type else kwargs
        return out

    before = _layer_count(config) if level != _SHRINK_NONE else 0
    s = _Shrink(
        text=text,
        layers_before=before,
        hidden=HIDDEN if text else AUX_HIDDEN,
        layers=(LAYERS if text else AUX_LAYERS) if before else 0,
        heads=HEADS if text else AUX_HEADS,
        kv_heads=KV_HEADS if text else AUX_HEADS,
    )
    overrides: dict[str, Any] = {}
    derived: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        if not field.init or field.name in subs or field.name == "per_layer_config":
            continue
        name, value = field.name, _raw(config, field.name)
        if isinstance(value, tuple):
            value = list(value)
        if level == _SHRINK_NONE:
            continue
        if level == _SHRINK_LAYERS and name not in _LAYER_COUNTS and not isinstance(value, (list, dict)):
            continue
        new = _shrink_value(name, value, s)
        if _hashable(new) == _hashable(value):
            continue
        if field.default in (None, "auto") and value != field.default and name not in init_kwargs:
            derived[name] = new  # the config computes it from other values; recompute unless that fails
        else:
            overrides[name] = new
    tied = _tie_sizes({n: _raw(config, n) for n in {*overrides, *derived, *_TIED}}, {**derived, **overrides})
    overrides.update({k: v for k, v in tied.items() if k in overrides})
    derived.update({k: v for k, v in tied.items() if k in derived})
    per_layer = _per_layer_dict(config)
    if per_layer and level != _SHRINK_NONE:
        overrides["per_layer_config"] = _shrunk_per_layer(config, per_layer, {**derived, **overrides}, s)
    rope = _raw(config, "rope_parameters")
    for dim_name in ("qk_rope_head_dim", "head_dim"):
        old_dim = _raw(config, dim_name)
        if _is_int(old_dim) and isinstance(rope, dict):
            new_dim = {**derived, **overrides}.get(dim_name, old_dim)
            if _rescaled_rope(rope, old_dim, new_dim) != rope:
                overrides["rope_parameters"] = _rescaled_rope(rope, old_dim, new_dim)
            break

    def build(kwargs: dict[str, Any], sub_level: int) -> tuple[Any, dict[str, Any]]:
        nested = sub_kwargs(sub_level)
        return cls(**{**init_kwargs, **kwargs, **nested}), nested

    # Auxiliary sub-configs shrink less when cross-config checks refuse (an audio head tied to its encoder).
    levels = [_SHRINK_ALL, _SHRINK_LAYERS, _SHRINK_NONE] if subs else [_SHRINK_ALL]
    raised = {k for k, v in overrides.items() if _is_int(v) and _is_int(_raw(config, k)) and v > _raw(config, k)}
    kept = {k: v for k, v in overrides.items() if k not in raised}  # top-1 families that insist (ZAYA)
    attempts = [(kw, lv) for kw in (overrides, {**overrides, **derived}) for lv in levels]
    attempts += [(kw, lv) for kw in (kept, {**kept, **derived}) for lv in levels] if raised else []
    error: Exception | None = None
    for kwargs, sub_level in attempts:
        try:
            tiny, nested = build(kwargs, sub_level)
            overrides = dict(kwargs)
            break
        except Exception as exc:  # the config's validators say no: try the next, more conservative variant
            error = error or exc
    else:
        assert error is not None
        raise error
    # Derived values the config filled in as constants (not from the new sizes): use the shrunk ones.
    fix: dict[str, Any] = {
        name: new
        for name, new in derived.items()
        if name not in overrides and _hashable(_raw(tiny, name)) == _hashable(_raw(config, name))
    }
    # Per-layer lists the config did not recompute, or that lost their MoE layers.
    now = _layer_count(tiny)
    for field in dataclasses.fields(tiny):
        value, current = _raw(config, field.name), _raw(tiny, field.name)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list) or before < 2 or len(value) != before or not isinstance(current, list):
            continue
        if len(current) == now:
            resized = _resize_layer_list(field.name, current, now, pool=value)
            if resized != current:
                fix[field.name] = resized
        else:
            fix[field.name] = _shrink_list(field.name, value, s)
    kinds = " ".join(str(v) for v in (fix.get("layer_types") or _raw(tiny, "layer_types") or []))
    if text and "sliding" in kinds and _raw(tiny, "sliding_window") is None and "sliding_window" in _field_names(tiny):
        fix["sliding_window"] = 4  # a sliding layer kept from the default pattern needs a window
    for batch in [fix] + ([{k: v} for k, v in fix.items()] if len(fix) > 1 else []):
        try:
            cls(**{**init_kwargs, **overrides, **batch, **nested})
            overrides.update(batch)
            if batch is fix:
                break
        except Exception:  # all fixes at once are refused: keep those the config takes one by one
            continue
    return {**overrides, **nested}


def _without_layer_patterns(config: Any, init_kwargs: dict[str, Any]) -> dict[str, Any]:
    """A parent's kwargs for a sub-config minus legacy per-layer patterns that are not fields
    (``hybrid_override_pattern="MEM*..."``): they would win over the resized per-layer lists."""
    before, fields = _layer_count(config), _field_names(config)
    return {
        k: v
        for k, v in init_kwargs.items()
        if k in fields or not (isinstance(v, (str, list, tuple)) and before > 1 and len(v) == before)
    }


def _tie_sizes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Sizes the family ties together stay tied after shrinking (``new`` holds the changed values):
    key heads equal to query heads (MHA, MLA), a ``head_dim`` equal to ``qk_rope_head_dim`` (the rotary
    part of MLA) or to nope + rope, a ``qk_head_dim`` equal to nope + rope."""
    out = dict(new)
    heads = old.get("num_attention_heads")
    for name in _KV_HEAD_COUNTS:
        if name in out and _is_int(old.get(name)) and old.get(name) == heads:
            out[name] = out.get("num_attention_heads", heads)
    rope, nope = old.get("qk_rope_head_dim"), old.get("qk_nope_head_dim")
    if not _is_int(rope):
        return out
    new_rope, new_nope = out.get("qk_rope_head_dim", rope), out.get("qk_nope_head_dim", nope)
    for name in ("head_dim", "rotary_dim", "qk_head_dim"):
        if name not in out:
            continue
        if old.get(name) == rope:
            out[name] = new_rope
        elif _is_int(nope) and old.get(name) == rope + nope:
            out[name] = new_rope + new_nope
    return out


_TIED = ("num_attention_heads", "head_dim", "qk_nope_head_dim", "qk_rope_head_dim", "qk_head_dim", "rotary_dim")


def _shrunk_per_layer(config: Any, per_layer: dict[str, Any], new: dict[str, Any], s: _Shrink) -> dict[str, Any]:
    """Per-layer overrides of the layers that remain, shrunk like the global values and tied in context
    (a sliding layer whose ``head_dim`` is nope + rope keeps that, even where the global one does not)."""
    out = {}
    for key, entry in per_layer.items():
        if not isinstance(entry, dict) or int(key) >= s.layers:
            continue
        old_ctx = {**{n: _raw(config, n) for n in _TIED}, **entry}
        new_globals = {n: new.get(n, _raw(config, n)) for n in _TIED}
        shrunk = {n: _shrink_value(n, v, s) for n, v in entry.items()}
        tied = _tie_sizes(old_ctx, {**new_globals, **shrunk})
        out[key] = {**shrunk, **{n: v for n, v in tied.items() if n in shrunk or v != new_globals.get(n)}}
    return out


def _per_layer_dict(config: Any) -> dict[str, Any] | None:
    """Per-layer overrides of a heterogeneous config (Dots3, Gemma4) as a plain ``{"layer": {...}}`` dict."""
    if "per_layer_config" not in vars(config) and not hasattr(type(config), "per_layer_config"):
        return None
    try:
        value = config.to_dict().get("per_layer_config")
    except Exception:
        return None
    return value if isinstance(value, dict) and value else None


def _field_names(config: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(config)}


def _remap_token_ids(config: Any, vocab: int) -> None:
    """Special token ids beyond the tiny vocabulary move to its top (a padding_idx, a mask token must fit).

    Image/video/audio placeholders stay out of range, so random ids below the
    vocabulary never ask a multimodal model for features it was not given.
    """
    taken: set[int] = set()
    configs = [config]
    while configs:
        current = configs.pop()
        configs.extend(_sub_configs(current).values())
        for name in list(vars(current)):
            if not (_TOKEN_ID.search(name) or name in ("pad_token_id", "bos_token_id", "eos_token_id")):
                continue
            if _MEDIA_TOKEN.search(name):
                continue
            value = getattr(current, name)
            if _is_int(value) and value >= vocab:
                setattr(current, name, _free_id(vocab, taken))
            elif isinstance(value, list) and value and all(_is_int(v) for v in value):
                setattr(current, name, [_free_id(vocab, taken) if v >= vocab else v for v in value])


def _free_id(vocab: int, taken: set[int]) -> int:
    token = vocab - 1
    while token in taken:
        token -= 1
    taken.add(token)
    return token


def special_token_ids(config: Any) -> set[int]:
    """Every token id a config names (pad, bos, image, audio...): tiny inputs avoid them."""
    ids: set[int] = set()
    configs = [config]
    while configs:
        current = configs.pop()
        configs.extend(_sub_configs(current).values())
        for name, value in vars(current).items():
            if _TOKEN_ID.search(name) or name.endswith("_id") or name.endswith("_ids"):
                values = value if isinstance(value, (list, tuple)) else [value]
                ids.update(v for v in values if _is_int(v))
    return ids


def text_config_of(config: Any) -> Any:
    """The sub-config that holds the experts (the config itself for a plain LM)."""
    stack = [config]
    while stack:
        current = stack.pop(0)
        if any(_is_int(_raw(current, n)) for n in _EXPERT_COUNT_ATTRS):
            return current
        stack.extend(_sub_configs(current).values())
    return getattr(config, "text_config", config)


def vocab_size_of(config: Any) -> int | None:
    """The language model's vocabulary size: that of the experts' config, else the nearest config with one."""
    stack = [text_config_of(config), config]
    while stack:
        current = stack.pop(0)
        if _is_int(_raw(current, "vocab_size")):
            return _raw(current, "vocab_size")
        stack.extend(_sub_configs(current).values())
    return None


def _merge_kwargs(config: Any, kwargs: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` over ``kwargs``; a sub-config's name maps to a dict merged into that sub-config's kwargs."""
    out = dict(kwargs)
    subs = _sub_configs(config)
    for key, value in extra.items():
        if key in subs and isinstance(value, dict):
            out[key] = _merge_kwargs(subs[key], dict(out.get(key) or {"model_type": subs[key].model_type}), value)
        else:
            out[key] = value
    return out


_MROPE_DEFAULT = re.compile(r"""mrope_section["']?\s*,\s*\[([\d,\s]+)\]""")


def _add_mrope_section(config: Any) -> None:
    """Multimodal rotary sections scaled to the tiny head size, for text configs whose modeling code falls
    back to hard-coded sections (sized for the full model) when the config has none."""
    stack = [config]
    while stack:
        current = stack.pop()
        stack.extend(_sub_configs(current).values())
        rope = _raw(current, "rope_parameters")
        if not isinstance(rope, dict) or "mrope_section" in rope or "rope_type" not in rope:
            continue
        module = type(current).__module__.split(".")[-2]
        source = _module_source(module, "modeling_")
        if "mrope_section" not in source:
            continue
        found = _MROPE_DEFAULT.search(source)
        sections = [int(v) for v in found.group(1).split(",") if v.strip()] if found else [1, 1, 1]
        head_dim = _raw(current, "head_dim") or current.hidden_size // current.num_attention_heads
        factor = rope.get("partial_rotary_factor", _raw(current, "partial_rotary_factor") or 1.0)
        current.rope_parameters = {**rope, "mrope_section": _split(int(head_dim * factor) // 2, sections)}


def tiny_config(model_type: str, **overrides: Any) -> Any:
    """A tiny config of ``model_type``: the family's defaults shrunk by attribute name.

    ``overrides`` (over :data:`TINY_OVERRIDES`) are constructor kwargs of the
    top-level config; a sub-config's name (``text_config``) maps to a dict of
    that sub-config's kwargs.
    """
    try:
        with _quiet():
            default = _config_class(model_type)()
    except Exception as exc:
        raise ZooBuildError(model_type, f"default config does not build: {_one_line(exc)}") from exc
    extra = _merge_dicts(TINY_OVERRIDES.get(model_type, {}), overrides)
    try:
        with _quiet():
            kwargs = _merge_kwargs(default, _shrink_kwargs(default, text=True, init_kwargs={}), extra)
            tiny = type(default)(**kwargs)
    except Exception as exc:
        raise ZooBuildError(model_type, f"shrunk config rejected: {_one_line(exc)}") from exc
    _add_mrope_section(tiny)
    if getattr(tiny, "is_encoder_decoder", False) and getattr(tiny, "decoder_start_token_id", None) is None:
        tiny.decoder_start_token_id = getattr(tiny, "pad_token_id", None) or 0  # labels -> decoder inputs
    vocab = vocab_size_of(tiny)
    if vocab is not None:
        _remap_token_ids(tiny, vocab)
    return tiny


def _merge_dicts(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge_dicts(out[key], value)
        else:
            out[key] = value
    return out
