"""Build a tiny model of any MoE type with deterministic random weights, and check it runs on CPU."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from autoep.models.zoo.common import ZooBuildError, _is_int, _one_line, _quiet, _sub_configs
from autoep.models.zoo.shrink import VOCAB, special_token_ids, tiny_config, vocab_size_of

_BLOCK_CLASS = re.compile(r"(SparseMoeBlock|SparseMoe|MoE|Moe|MoeBlock|MoeLayer|MoELayer|SparseMLP|SparseMlp)$")
_EXPERTS_CLASS = re.compile(r"(Experts|NaiveMoe)$")
_ROUTER_CLASS = re.compile(r"(Router|Gate|Gating)$")
_ROUTER_ATTRS = ("gate", "router", "gating", "classifier", "router_gate", "wg", "gate_proj_router")
_EXPERT_FLAGS = ("has_gate", "is_transposed", "is_concatenated", "has_bias", "has_post_expert_norm")
ROUTER_LOGIT_STD = 2.0
"""Router weights get std ``ROUTER_LOGIT_STD / sqrt(fan_in)``: logits of std ~2 spread tokens over experts."""


_AUTO_CLASSES = (
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM"),
    ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "AutoModelForImageTextToText"),
    ("MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES", "AutoModelForMultimodalLM"),
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "AutoModelForSeq2SeqLM"),
    ("MODEL_MAPPING_NAMES", "AutoModel"),
    ("MODEL_FOR_BACKBONE_MAPPING_NAMES", "AutoBackbone"),
    ("MODEL_FOR_POSE_ESTIMATION_MAPPING_NAMES", "AutoModelForPoseEstimation"),
)


def model_auto_class(model_type: str) -> str | None:
    """The Auto class ``build_tiny`` uses: causal LM, else image-text-to-text, multimodal, seq2seq, base."""
    from transformers.models.auto import modeling_auto

    for mapping, auto in _AUTO_CLASSES:
        if model_type in getattr(modeling_auto, mapping, {}):
            return auto
    return None


def _auto(name: str) -> Any:
    import transformers

    return getattr(transformers, name)


def _has_forward(auto_name: str, config: Any) -> bool:
    try:
        cls = _auto(auto_name)._model_mapping[type(config)]
    except Exception:
        return True
    return getattr(cls, "forward", None) is not getattr(nn.Module, "forward", None)


def _trainable(model_type: str, config: Any) -> tuple[str | None, Any]:
    """The Auto class and config to build: the type's own, or, when that model has no ``forward``
    (Qwen3-Omni's top level only generates), its first sub-model that has one (the thinker)."""
    auto_name = model_auto_class(model_type)
    if auto_name is None or _has_forward(auto_name, config):
        return auto_name, config
    for sub in _sub_configs(config).values():
        sub_auto = model_auto_class(sub.model_type)
        if sub_auto is not None and sub_auto != "AutoModel" and _has_forward(sub_auto, sub):
            return sub_auto, sub
    return auto_name, config


def build_tiny(
    model_type: str,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    experts_implementation: str | None = None,
    **overrides: Any,
) -> nn.Module:
    """The tiny model of ``model_type`` with random weights, the same for the same ``(model_type, seed)``
    in any process.

    Built on CPU from :func:`tiny_config` (``overrides`` go there) with
    ``attn_implementation="eager"`` (``"sdpa"`` where eager is refused) under
    ``torch.manual_seed(seed)`` in a forked RNG (the caller's RNG is left as
    it was); router weights and correction biases are then re-drawn
    (:func:`randomize_routers_`): transformers leaves them near zero.
    ``experts_implementation`` (``"eager"``, ``"grouped_mm"``...) is passed to
    transformers when given; by default transformers picks (``grouped_mm``
    where it can). A composite whose top-level model has no ``forward``
    (Qwen3-Omni) builds its first sub-model that has one (the thinker).
    Raises :class:`ZooBuildError` with a one-line reason when it cannot be built.
    """
    config = tiny_config(model_type, **overrides)
    auto_name, config = _trainable(model_type, config)
    if auto_name is None:
        raise ZooBuildError(model_type, "no Auto model class maps this type")
    auto = _auto(auto_name)
    extra = {} if experts_implementation is None else {"experts_implementation": experts_implementation}
    error: Exception | None = None
    for attn in ("eager", "sdpa"):
        try:
            with _quiet(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = auto.from_config(config, attn_implementation=attn, dtype=dtype, **extra)
            break
        except Exception as exc:
            error = error or exc
    else:
        assert error is not None
        raise ZooBuildError(model_type, _reason(error, f"{auto_name}.from_config")) from error
    randomize_routers_(model, seed)
    return model


def moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's MoE blocks in module order: the nearest ``*MoE``/``*SparseMoeBlock`` above an experts
    container (else its parent), plus ``*MoE`` blocks that hold experts another way (Doge)."""
    modules = dict(model.named_modules())
    found: dict[str, nn.Module] = {}
    for name, module in modules.items():
        if not name or (not _EXPERTS_CLASS.search(type(module).__name__) and not name.endswith(".experts")):
            continue
        parts = name.split(".")
        block = ".".join(parts[:-1])
        for cut in range(len(parts) - 1, 0, -1):
            candidate = ".".join(parts[:cut])
            if _BLOCK_CLASS.search(type(modules[candidate]).__name__):
                block = candidate
                break
        if block and not any(block.startswith(f + ".") for f in found):
            found[block] = modules[block]
    for name, module in modules.items():
        if name and _BLOCK_CLASS.search(type(module).__name__):
            if not any(name == f or name.startswith(f + ".") or f.startswith(name + ".") for f in found):
                found[name] = module
    order = {name: i for i, name in enumerate(modules)}
    return sorted(found.items(), key=lambda item: order[item[0]])


def experts_of(block: nn.Module) -> nn.Module | None:
    """The experts container of an MoE block (``None`` when it holds experts another way)."""
    experts = getattr(block, "experts", None)
    if isinstance(experts, nn.Module):
        return experts
    for _, module in block.named_modules():
        if _EXPERTS_CLASS.search(type(module).__name__):
            return module
    return None


def _expert_count(block: nn.Module, experts: nn.Module | None) -> int | None:
    for owner in (experts, block):
        for attr in ("num_experts", "num_local_experts", "n_routed_experts", "num_routed_experts"):
            value = getattr(owner, attr, None)
            if _is_int(value):
                return value
    if isinstance(experts, nn.ModuleList):
        return len(experts)
    params = list(experts.parameters(recurse=False)) if experts is not None else []
    return params[0].shape[0] if params and params[0].dim() == 3 else None


def expert_flags(experts: nn.Module | None) -> dict[str, bool] | None:
    """The ``@use_experts_implementation`` flags of an experts module (``None`` when it has none)."""
    if experts is None or not all(hasattr(experts, f) for f in _EXPERT_FLAGS):
        return None
    return {f: bool(getattr(experts, f)) for f in _EXPERT_FLAGS}


def _routers(block: nn.Module) -> list[nn.Module]:
    experts = experts_of(block)
    out = []
    for name, module in block.named_modules():
        if experts is not None and (module is experts or any(module is m for m in experts.modules())):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if name and (_ROUTER_CLASS.search(type(module).__name__) or leaf in _ROUTER_ATTRS):
            if not any(module is m for r in out for m in r.modules()):
                out.append(module)
    return out


@torch.no_grad()
def randomize_routers_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-draw router weights (std ``ROUTER_LOGIT_STD / sqrt(fan_in)``), router biases and
    ``e_score_correction_bias`` (std 0.1) from a generator seeded with ``seed``.

    transformers initialises routers with ``initializer_range`` (0.02: almost
    uniform scores, top-k picked by noise) and correction biases at zero;
    routers with logits of std ~2 and non-zero biases spread tokens over the
    experts and make parity tests sensitive to the routing rule.
    """
    gen = torch.Generator().manual_seed(seed + 7919)
    for _, block in moe_blocks(model):
        tensors: dict[int, tuple[str, torch.Tensor]] = {}
        for router in _routers(block):
            for name, tensor in [*router.named_parameters(), *router.named_buffers()]:
                tensors[id(tensor)] = (name, tensor)
        for name, tensor in [*block.named_parameters(), *block.named_buffers()]:
            if "correction_bias" in name or "expert_bias" in name:
                tensors[id(tensor)] = (name, tensor)
        for name, tensor in tensors.values():
            if not tensor.is_floating_point() or tensor.numel() == 0:
                continue
            if tensor.dim() >= 2:
                std = ROUTER_LOGIT_STD / tensor.shape[-1] ** 0.5
            elif "norm" in name or "scale" in name:
                continue
            else:
                std = 0.1
            tensor.copy_((std * torch.randn(tensor.shape, generator=gen)).to(tensor.dtype))
    return model


def tiny_input_ids(model_or_config: Any, batch: int = 2, seq: int = 8, seed: int = 0) -> torch.Tensor:
    """Random token ids below the tiny vocabulary that avoid every special token id of the config."""
    config = getattr(model_or_config, "config", model_or_config)
    vocab = vocab_size_of(config) or VOCAB
    special = special_token_ids(config)
    allowed = torch.tensor([t for t in range(min(vocab, VOCAB)) if t not in special])
    gen = torch.Generator().manual_seed(seed)
    return allowed[torch.randint(len(allowed), (batch, seq), generator=gen)]


def tiny_loss(model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``(loss, is_lm_loss)``: the model's own loss with ``labels=input_ids``, or, for a model that takes
    no labels, the mean square of its first output (enough to check backward)."""
    try:
        out = model(input_ids=input_ids, labels=input_ids)
        loss = getattr(out, "loss", None)
        if loss is not None:
            return loss, True
    except TypeError as exc:
        if "labels" not in str(exc):
            raise
        out = model(input_ids=input_ids)
    first = next(v for v in (out.values() if hasattr(out, "values") else out) if isinstance(v, torch.Tensor))
    return first.float().pow(2).mean(), False


@dataclass
class ZooResult:
    """One zoo type's build-and-run outcome (see :func:`check_tiny`)."""

    model_type: str
    ok: bool = False
    lm_loss: bool = False
    loss: float | None = None
    reason: str | None = None
    auto_class: str | None = None
    model_class: str | None = None
    moe_blocks: int = 0
    first_block: str | None = None
    block_class: str | None = None
    experts_class: str | None = None
    expert_flags: dict[str, bool] | None = None
    num_experts: int | None = None
    parameters: int = 0
    seconds: float = 0.0


def check_tiny(model_type: str, seed: int = 0) -> ZooResult:
    """Build the tiny model, run forward (``input_ids`` 2x8, ``labels=input_ids``) and backward."""
    start = time.perf_counter()
    result = ZooResult(model_type, auto_class=model_auto_class(model_type))
    try:
        model = build_tiny(model_type, seed)
    except ZooBuildError as exc:
        result.reason = exc.reason
        result.seconds = time.perf_counter() - start
        return result
    except Exception as exc:
        result.reason = _one_line(exc)
        result.seconds = time.perf_counter() - start
        return result
    result.model_class = type(model).__name__
    blocks = moe_blocks(model)
    result.moe_blocks = len(blocks)
    if blocks:
        result.first_block, block = blocks[0]
        result.block_class = type(block).__name__
        experts = experts_of(block)
        result.experts_class = type(experts).__name__ if experts is not None else None
        result.expert_flags = expert_flags(experts)
        result.num_experts = _expert_count(block, experts)
    result.parameters = sum(p.numel() for p in model.parameters())
    try:
        with _quiet():
            loss, result.lm_loss = tiny_loss(model, tiny_input_ids(model, seed=seed))
            loss.backward()
        result.loss = float(loss.detach())
        if not torch.isfinite(loss.detach()):
            result.reason = f"loss is not finite ({result.loss})"
        elif not blocks:
            result.reason = "built, but no MoE block found in the model"
        else:
            result.ok = True
    except Exception as exc:
        result.reason = _reason(exc, "forward/backward")
    result.seconds = time.perf_counter() - start
    return result


_KERNEL_HINT = re.compile(r"\b(cuda|triton|mamba_ssm|causal_conv1d|flash_attn|fla|kernels)\b", re.IGNORECASE)
_INPUT_HINT = re.compile(r"\b(pixel_values|input_features|input_values|image_grid_thw|audio_values)\b")


def _reason(exc: BaseException, stage: str) -> str:
    """A one-line reason, naming missing GPU kernels or extra inputs when the error says so."""
    text = str(exc)
    if _INPUT_HINT.search(text):
        return f"{stage} needs more than input_ids: {_one_line(exc)}"
    if _KERNEL_HINT.search(text) or isinstance(exc, ImportError):
        return f"{stage} needs GPU kernels or an extra package: {_one_line(exc)}"
    return f"{stage} fails: {_one_line(exc)}"


def build_error(model_type: str, seed: int = 0) -> str | None:
    """``None`` when the tiny model builds and runs forward and backward on CPU, else the one-line reason."""
    result = check_tiny(model_type, seed)
    return None if result.ok else result.reason
