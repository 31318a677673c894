"""Model configurations the planner is checked on: published shapes and tiny-but-real accuracy models.

Published shapes are written from the numbers their model cards and config
files state (no download), with transformers' own config classes; the planner
builds them on the meta device. The accuracy models (hidden 512, 16 experts, 4
layers) are small enough to train for real on CPU ranks and large enough that
memory is dominated by the same tensors as at scale.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# name -> (config class, fields, published total parameters)
PUBLISHED: dict[str, tuple[str, dict[str, Any], float]] = {
    "Mixtral-8x7B": (
        "MixtralConfig",
        dict(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            num_local_experts=8,
            num_experts_per_tok=2,
            max_position_embeddings=32768,
            rope_theta=1e6,
            tie_word_embeddings=False,
        ),
        46.7e9,
    ),
    "Qwen3-30B-A3B": (
        "Qwen3MoeConfig",
        dict(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=6144,
            moe_intermediate_size=768,
            num_hidden_layers=48,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            num_experts=128,
            num_experts_per_tok=8,
            norm_topk_prob=True,
            max_position_embeddings=40960,
            tie_word_embeddings=False,
        ),
        30.5e9,
    ),
    "Qwen3-235B-A22B": (
        "Qwen3MoeConfig",
        dict(
            vocab_size=151936,
            hidden_size=4096,
            intermediate_size=12288,
            moe_intermediate_size=1536,
            num_hidden_layers=94,
            num_attention_heads=64,
            num_key_value_heads=4,
            head_dim=128,
            num_experts=128,
            num_experts_per_tok=8,
            norm_topk_prob=True,
            max_position_embeddings=40960,
            tie_word_embeddings=False,
        ),
        235e9,
    ),
    "DeepSeek-V3": (
        "DeepseekV3Config",
        dict(
            vocab_size=129280,
            hidden_size=7168,
            intermediate_size=18432,
            moe_intermediate_size=2048,
            num_hidden_layers=61,
            num_attention_heads=128,
            num_key_value_heads=128,
            n_shared_experts=1,
            n_routed_experts=256,
            routed_scaling_factor=2.5,
            kv_lora_rank=512,
            q_lora_rank=1536,
            qk_rope_head_dim=64,
            qk_nope_head_dim=128,
            v_head_dim=128,
            n_group=8,
            topk_group=4,
            num_experts_per_tok=8,
            first_k_dense_replace=3,
            norm_topk_prob=True,
            max_position_embeddings=163840,
            tie_word_embeddings=False,
        ),
        671e9,
    ),
    "GPT-OSS-120B": (
        "GptOssConfig",
        dict(
            vocab_size=201088,
            hidden_size=2880,
            intermediate_size=2880,
            num_hidden_layers=36,
            num_attention_heads=64,
            num_key_value_heads=8,
            head_dim=64,
            num_local_experts=128,
            num_experts_per_tok=4,
            sliding_window=128,
            tie_word_embeddings=False,
        ),
        116.8e9,
    ),
}

_ACCURACY_COMMON: dict[str, Any] = dict(
    vocab_size=2048,
    hidden_size=512,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)

ACCURACY: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral-512": (
        "MixtralConfig",
        dict(**_ACCURACY_COMMON, intermediate_size=512, num_local_experts=16, num_experts_per_tok=2),
    ),
    "qwen3-moe-512": (
        "Qwen3MoeConfig",
        dict(
            **_ACCURACY_COMMON,
            intermediate_size=1024,
            moe_intermediate_size=256,
            num_experts=16,
            num_experts_per_tok=4,
            head_dim=64,
            norm_topk_prob=True,
        ),
    ),
    "deepseek-v3-512": (
        "DeepseekV3Config",
        dict(
            **{**_ACCURACY_COMMON, "num_key_value_heads": 8},
            intermediate_size=1024,
            moe_intermediate_size=256,
            n_shared_experts=1,
            n_routed_experts=16,
            num_experts_per_tok=4,
            n_group=4,
            topk_group=2,
            first_k_dense_replace=1,
            kv_lora_rank=128,
            q_lora_rank=192,
            qk_rope_head_dim=32,
            qk_nope_head_dim=32,
            v_head_dim=64,
            norm_topk_prob=True,
        ),
    ),
}


def make_config(class_name: str, fields: dict[str, Any]):
    """A transformers config of class ``class_name`` with ``fields``."""
    import transformers

    return getattr(transformers, class_name)(**fields)


def published_config(name: str):
    class_name, fields, _ = PUBLISHED[name]
    return make_config(class_name, fields)


def accuracy_config(name: str):
    class_name, fields = ACCURACY[name]
    return make_config(class_name, fields)


def build_meta(config) -> nn.Module:
    """The trainable model of ``config`` on the meta device, with SDPA attention where the family has it."""
    from autoep.models.loading import auto_model_class

    cls = auto_model_class(config)
    with torch.device("meta"):
        try:
            return cls.from_config(config, attn_implementation="sdpa")
        except (ValueError, ImportError):
            return cls.from_config(config, attn_implementation="eager")


# Importable builders for spawned workers (the accuracy runs).
def build_mixtral_512() -> nn.Module:
    return build_meta(accuracy_config("mixtral-512"))


def build_qwen3_moe_512() -> nn.Module:
    return build_meta(accuracy_config("qwen3-moe-512"))


def build_deepseek_v3_512() -> nn.Module:
    return build_meta(accuracy_config("deepseek-v3-512"))


ACCURACY_BUILDERS = {
    "mixtral-512": build_mixtral_512,
    "qwen3-moe-512": build_qwen3_moe_512,
    "deepseek-v3-512": build_deepseek_v3_512,
}
