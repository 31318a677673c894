"""Adapters for the Hugging Face MoE families autoep converts on the block path.

Each reads its routing rule from the model's own config, mirroring the
family's router code in transformers 5, down to the dtype of its gate's logits.
"""

from __future__ import annotations

from typing import Any

from autoep.models.base import FamilyAdapter, register_family
from autoep.moe.experts import ExpertLayout
from autoep.moe.router import RouterConfig


def _softmax_router(always_normalise: bool = False):
    def build(config: Any, num_experts: int) -> RouterConfig:
        return RouterConfig(
            num_experts=num_experts,
            top_k=config.num_experts_per_tok,
            scoring="softmax",
            norm_topk_prob=always_normalise or bool(getattr(config, "norm_topk_prob", False)),
            logits_dtype="input",
        )

    return build


def _deepseek_v2_router(config: Any, num_experts: int) -> RouterConfig:
    group_limited = getattr(config, "topk_method", "greedy") == "group_limited_greedy"
    return RouterConfig(
        num_experts=num_experts,
        top_k=config.num_experts_per_tok,
        scoring="softmax",
        n_group=config.n_group if group_limited else 1,
        topk_group=config.topk_group if group_limited else 1,
        group_score="max",
        routed_scaling_factor=float(config.routed_scaling_factor),
    )


def _sigmoid_grouped_router(config: Any, num_experts: int) -> RouterConfig:
    """DeepSeek-V3 / Moonlight / Kimi-K2 / GLM-4-MoE: sigmoid, bias for choice, top-2-sum groups."""
    n_group = config.n_group or 1
    return RouterConfig(
        num_experts=num_experts,
        top_k=config.num_experts_per_tok,
        scoring=getattr(config, "scoring_func", "sigmoid") or "sigmoid",
        norm_topk_prob=bool(config.norm_topk_prob),
        n_group=n_group,
        topk_group=config.topk_group or n_group,
        group_score="top2_sum",
        use_correction_bias=True,
        routed_scaling_factor=float(config.routed_scaling_factor),
        norm_eps=1e-20,
    )


def _gpt_oss_router(config: Any, num_experts: int) -> RouterConfig:
    return RouterConfig(
        num_experts=num_experts,
        top_k=config.num_experts_per_tok,
        scoring="topk_softmax",
        router_bias=True,
        logits_dtype="input",
    )


def _gpt_oss_layout(experts: Any, config: Any) -> ExpertLayout:
    return ExpertLayout("gpt_oss", alpha=float(experts.alpha), limit=float(experts.limit))


def _no_jitter(config: Any) -> float:
    return 0.0  # the block ignores router_jitter_noise even where its config declares it


def _llama4_router(config: Any, num_experts: int) -> RouterConfig:
    """``Llama4Router``: top-k on the raw logits, sigmoid of each chosen logit, no normalisation."""
    return RouterConfig(
        num_experts=num_experts, top_k=config.num_experts_per_tok, scoring="topk_sigmoid", logits_dtype="input"
    )


def _transposed_swiglu(experts: Any, config: Any) -> ExpertLayout:
    """``Llama4TextExperts``: ``gate_up_proj [E, D, 2F]`` (gate then up columns), ``down_proj [E, F, D]``."""
    return ExpertLayout("swiglu", transposed=True)


def _dbrx_router(config: Any, num_experts: int) -> RouterConfig:
    """``DbrxFFN.route_tokens_to_experts``: softmax, top-k, then divide by the p-norm of the k weights."""
    ffn = config.ffn_config
    p = ffn.moe_normalize_expert_weights
    return RouterConfig(
        num_experts=num_experts,
        top_k=ffn.moe_top_k,
        scoring="softmax",
        norm_topk_prob=p is not None,
        norm_p=None if p is None else float(p),
        logits_dtype="input",  # DBRX also takes its softmax in that dtype; autoep's is fp32
    )


def _dbrx_layout(experts: Any, config: Any) -> ExpertLayout:
    return ExpertLayout("dbrx")


def _dbrx_jitter(config: Any) -> float:
    return float(config.ffn_config.moe_jitter_eps or 0.0)


def _longcat_router(config: Any, num_experts: int) -> RouterConfig:
    """``LongcatFlashTopkRouter``: softmax over real and zero experts, selection bias, scaled weights.

    ``num_experts`` counts both kinds; the classifier's bias, where the config
    declares one, is not applied by the HF router, so it is not here either.
    """
    return RouterConfig(
        num_experts=num_experts,
        top_k=config.num_experts_per_tok,
        scoring="softmax",
        use_correction_bias=True,
        routed_scaling_factor=float(config.routed_scaling_factor),
    )


# How transformers' save_pretrained (and most checkpoints on the Hub) store experts: one module per expert.
_PROJ = ("gate_proj", "up_proj", "down_proj")

BUILTIN_FAMILIES = (
    FamilyAdapter(
        "mixtral",
        ("MixtralSparseMoeBlock",),
        _softmax_router(always_normalise=True),
        ("mixtral",),
        disk_experts=("w1", "w3", "w2"),
        disk_block_name="block_sparse_moe",
    ),
    FamilyAdapter(
        "qwen2_moe",
        ("Qwen2MoeSparseMoeBlock",),
        _softmax_router(),
        ("qwen2_moe",),
        shared_attr="shared_expert",
        shared_gate_attr="shared_expert_gate",
        disk_experts=_PROJ,
    ),
    FamilyAdapter("qwen3_moe", ("Qwen3MoeSparseMoeBlock",), _softmax_router(), ("qwen3_moe",), disk_experts=_PROJ),
    FamilyAdapter(
        "deepseek_v2",
        ("DeepseekV2Moe",),
        _deepseek_v2_router,
        ("deepseek_v2",),
        shared_attr="shared_experts",
        disk_experts=_PROJ,
    ),
    FamilyAdapter(
        "deepseek_v3",
        ("DeepseekV3MoE",),
        _sigmoid_grouped_router,
        ("deepseek_v3", "kimi_k2"),
        shared_attr="shared_experts",
        disk_experts=_PROJ,
    ),
    FamilyAdapter("olmoe", ("OlmoeSparseMoeBlock",), _softmax_router(), ("olmoe",), disk_experts=_PROJ),
    FamilyAdapter(
        "gpt_oss",
        ("GptOssMLP",),
        _gpt_oss_router,
        ("gpt_oss",),
        router_attr="router",
        returns_router_scores=True,
        layout=_gpt_oss_layout,
    ),
    FamilyAdapter(
        "glm4_moe",
        ("Glm4MoeMoE",),
        _sigmoid_grouped_router,
        ("glm4_moe",),
        shared_attr="shared_experts",
        disk_experts=_PROJ,
    ),
    # Families whose experts are not transformers' standard experts module.
    FamilyAdapter(
        "llama4",
        ("Llama4TextMoe",),
        _llama4_router,
        ("llama4", "llama4_text"),
        router_attr="router",
        shared_attr="shared_expert",
        layout=_transposed_swiglu,
        weights_scale_input=True,
        returns_router_logits=True,
        flat_output=True,
        jitter_noise=_no_jitter,
    ),
    FamilyAdapter(
        "dbrx",
        ("DbrxFFN",),
        _dbrx_router,
        ("dbrx",),
        router_attr="router",
        router_linear="layer",
        layout=_dbrx_layout,
        act_fn_attr="experts.mlp.activation_fn",
        jitter_noise=_dbrx_jitter,
    ),
    FamilyAdapter(
        "longcat_flash",
        ("LongcatFlashMoE",),
        _longcat_router,
        ("longcat_flash",),
        router_attr="router",
        router_linear="classifier",
        zero_expert_output="identity",
        disk_experts=_PROJ,
    ),
)

for _adapter in BUILTIN_FAMILIES:
    register_family(_adapter)
