"""Built-in tiny models, one per family, with random weights and no download.

They exist so that ``autoep inspect``, ``autoep verify``, the default
``autoep train`` job and the tests run anywhere in seconds. Every tiny model
has at least two MoE layers, a dense first layer where its family has one, and
routing options switched on (groups, correction bias, shared experts) so that
each code path of the converted layer is exercised.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_COMMON: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

_MLA: dict[str, Any] = dict(
    num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8
)

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "mixtral": dict(model_type="mixtral", intermediate_size=48, num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(
        model_type="qwen2_moe",
        intermediate_size=64,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        mlp_only_layers=[0],
    ),
    "qwen3_moe": dict(
        model_type="qwen3_moe",
        intermediate_size=64,
        moe_intermediate_size=24,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        head_dim=8,
        mlp_only_layers=[0],
    ),
    "deepseek_v2": dict(
        model_type="deepseek_v2",
        intermediate_size=64,
        moe_intermediate_size=24,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
        routed_scaling_factor=1.5,
        **_MLA,
    ),
    "deepseek_v3": dict(
        model_type="deepseek_v3",
        intermediate_size=64,
        moe_intermediate_size=24,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        **_MLA,
    ),
    "olmoe": dict(model_type="olmoe", intermediate_size=24, num_experts=8, num_experts_per_tok=2),
    "gpt_oss": dict(
        model_type="gpt_oss",
        intermediate_size=24,
        num_local_experts=8,
        num_experts_per_tok=2,
        head_dim=8,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    "glm4_moe": dict(
        model_type="glm4_moe",
        intermediate_size=64,
        moe_intermediate_size=24,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        n_group=2,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=1.5,
        head_dim=8,
    ),
}

TINY_PREFIX = "tiny-"


def tiny_model_names() -> list[str]:
    return [TINY_PREFIX + family.replace("_", "-") for family in TINY_CONFIGS]


def _family_of(name: str) -> str:
    family = name.removeprefix(TINY_PREFIX).replace("-", "_")
    if not name.startswith(TINY_PREFIX) or family not in TINY_CONFIGS:
        raise KeyError(f"unknown built-in model {name!r}; built-in models: {', '.join(tiny_model_names())}")
    return family


def is_tiny_model_name(name: str) -> bool:
    try:
        _family_of(name)
    except KeyError:
        return False
    return True


def tiny_config(name: str, **overrides: Any):
    """The transformers config of a built-in tiny model (``tiny-mixtral``, ``tiny-deepseek-v3``...)."""
    from transformers import AutoConfig

    kwargs = {**_COMMON, **TINY_CONFIGS[_family_of(name)], **overrides}
    model_type = kwargs.pop("model_type")
    config = AutoConfig.for_model(model_type, **kwargs)
    config._attn_implementation = "eager"
    return config


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0, std: float = 0.1) -> nn.Module:
    """Deterministic random weights, including the routing extras HF initialises to zero.

    Biases and ``e_score_correction_bias`` get random values too, so parity
    tests would notice a routing rule that ignores them.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if not tensor.is_floating_point() or "rotary" in name or "inv_freq" in name:
            continue
        if name.endswith("norm.weight") or "layernorm" in name or name.endswith("_norm.weight"):
            values = 1.0 + 0.1 * torch.randn(tensor.shape, generator=gen)
        else:
            values = std * torch.randn(tensor.shape, generator=gen)
        tensor.copy_(values.to(tensor.dtype))
    return model


def build_tiny_model(name: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any):
    """A built-in tiny causal LM with deterministic random weights."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(name, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return randomize_(model, seed=seed)
