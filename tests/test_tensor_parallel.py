"""Dense-path tensor parallelism from the HF ``base_model_tp_plan``, on 2 real gloo ranks (one spawn).

Each rank converts a tiny model (ep 1: all experts local), shards its dense
path over tp 2 and runs forward and backward on the same batch. Loss and every
parameter's gradient (DTensor gradients gathered to full tensors) must equal
one process running the unconverted model. Covered: Qwen3-MoE (per-head
q_norm/k_norm, whose replicated weights need their gradient summed over tp),
Mixtral (attention only), DeepSeek-V2 (MLA attention stays replicated; dense
MLP and shared experts sharded), OLMoE (unsupported attention styles: all
replicated) and GLM4-MoE (attention, dense MLP and shared experts sharded).
Single-process: plans and the divisibility errors, without any collective.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

import autoep
from autoep.errors import ConfigError
from autoep.launch import run_local
from autoep.models.tiny import build_tiny_model
from autoep.parallel.tensor_parallel import (
    ReplicatedWithGradAllReduce,
    apply_tensor_parallel,
    dense_tp_plan,
    validate_tensor_parallel,
)

WORLD, ROWS, SEQ = 2, 2, 6
FAMILIES = ["tiny-qwen3-moe", "tiny-mixtral", "tiny-deepseek-v2", "tiny-olmoe", "tiny-glm4-moe"]


def _placements(model: torch.nn.Module) -> dict[str, object]:
    """``name -> Shard(0) / Replicate() / 'plain'`` for every parameter."""
    return {n: p.placements[0] if isinstance(p, DTensor) else "plain" for n, p in model.named_parameters()}


def _scenario(name: str) -> dict:
    """Problems found on this rank (empty when loss and all gradients match the reference) and the layout."""
    reference = build_tiny_model(name, seed=0)
    model = copy.deepcopy(reference)
    autoep.convert(model)
    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",))
    plan = apply_tensor_parallel(model, mesh)

    ids = torch.randint(0, reference.config.vocab_size, (ROWS, SEQ), generator=torch.Generator().manual_seed(3))
    want = reference(input_ids=ids, labels=ids).loss
    want.backward()
    got = model(input_ids=ids, labels=ids).loss
    got.backward()

    problems = []
    if abs(got.item() - want.item()) > 1e-5:
        problems.append(f"loss {got.item()} != {want.item()}")
    ref_params = dict(reference.named_parameters())
    params = dict(model.named_parameters())
    if params.keys() != ref_params.keys():
        problems.append(f"parameter names differ: {sorted(params.keys() ^ ref_params.keys())}")
    for pname, p in params.items():
        grad = p.grad
        if grad is None:
            problems.append(f"{pname}: no gradient")
            continue
        if isinstance(grad, DTensor):
            if grad.placements != p.placements:
                problems.append(f"{pname}: gradient placements {grad.placements} != parameter's {p.placements}")
            grad = grad.full_tensor()
        try:
            torch.testing.assert_close(grad, ref_params[pname].grad, rtol=1e-5, atol=1e-6)
        except AssertionError as err:
            problems.append(f"{pname}: {str(err).splitlines()[0]} {str(err).splitlines()[-1]}")
    return {"problems": problems, "placements": _placements(model), "plan": str(plan)}


def _worker() -> dict:
    results = {name: _scenario(name) for name in FAMILIES}
    results["rank"] = dist.get_rank()
    return results


@pytest.fixture(scope="module")
def results() -> dict[int, dict]:
    return run_local(_worker, WORLD)


@pytest.mark.parametrize("name", FAMILIES)
def test_tp_loss_and_gradients_equal_one_process(results, name):
    for rank in range(WORLD):
        assert results[rank][name]["problems"] == [], f"rank {rank}: " + "\n".join(results[rank][name]["problems"])


def _expect(placements: dict[str, object], sharded: dict[str, object], replicated: list[str]) -> None:
    for pname, placement in sharded.items():
        assert placements[pname] == placement, pname
    for pname in replicated:
        assert placements[pname] == "plain", pname


def test_tp_layout(results):
    qwen3 = results[0]["tiny-qwen3-moe"]["placements"]
    _expect(
        qwen3,
        {
            "model.layers.1.self_attn.q_proj.weight": Shard(0),
            "model.layers.1.self_attn.k_proj.weight": Shard(0),
            "model.layers.1.self_attn.o_proj.weight": Shard(1),
            "model.layers.1.self_attn.q_norm.weight": Replicate(),
            "model.layers.1.self_attn.k_norm.weight": Replicate(),
            "model.layers.0.mlp.up_proj.weight": Shard(0),
            "model.layers.0.mlp.down_proj.weight": Shard(1),
        },
        ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.1.mlp.gate.weight"],
    )
    assert all(v == "plain" for n, v in qwen3.items() if ".experts." in n)

    deepseek = results[0]["tiny-deepseek-v2"]
    _expect(
        deepseek["placements"],
        {
            "model.layers.0.mlp.gate_proj.weight": Shard(0),
            "model.layers.1.mlp.shared_experts.up_proj.weight": Shard(0),
            "model.layers.1.mlp.shared_experts.down_proj.weight": Shard(1),
        },
        ["model.layers.1.self_attn.q_b_proj.weight", "model.layers.1.self_attn.kv_b_proj.weight"],
    )
    assert "replicated: model.layers.*.self_attn (x3): unsupported tp style 'mla_kv_a_proj'" in deepseek["plan"]

    olmoe = results[0]["tiny-olmoe"]
    assert set(olmoe["placements"].values()) == {"plain"}
    assert "unsupported tp style 'colwise_gather_output', 'rowwise_split_input'" in olmoe["plan"]

    glm = results[0]["tiny-glm4-moe"]["placements"]
    _expect(
        glm,
        {
            "model.layers.1.self_attn.v_proj.weight": Shard(0),
            "model.layers.1.mlp.shared_experts.gate_proj.weight": Shard(0),
        },
        ["model.layers.1.mlp.gate.weight"],
    )
    mixtral = results[0]["tiny-mixtral"]["placements"]
    _expect(mixtral, {"model.layers.0.self_attn.q_proj.weight": Shard(0)}, ["model.layers.0.mlp.gate.weight"])


def test_plan_skips_experts_and_absent_modules():
    model = build_tiny_model("tiny-qwen3-moe", seed=0)
    autoep.convert(model)
    plan = dense_tp_plan(model)
    assert not any("experts" in name.split(".") for name in plan.styles)
    assert all(model.get_submodule(name) is not None for name in plan.styles)
    assert "model.layers.1.mlp.gate_proj" not in plan.styles  # layer 1's mlp is a MoE layer
    assert plan.style_names["model.layers.0.mlp.gate_proj"] == "colwise"
    assert isinstance(plan.styles["model.layers.2.self_attn.k_norm"], ReplicatedWithGradAllReduce)
    assert validate_tensor_parallel(model, 1).styles  # tp 1 needs no divisibility


@pytest.mark.parametrize(
    ("name", "tp", "message"),
    [
        ("tiny-qwen3-moe", 3, "tp_size 3 does not divide num_attention_heads=4 of model.layers.0.self_attn"),
        ("tiny-mixtral", 4, "tp_size 4 does not divide num_key_value_heads=2 of model.layers.0.self_attn"),
        ("tiny-deepseek-v3", 3, "tp_size 3 does not divide out_features=64 of colwise model.layers.0.mlp.gate_proj"),
    ],
)
def test_bad_tp_size_raises_config_error(name, tp, message):
    model = build_tiny_model(name, seed=0)
    autoep.convert(model)
    with pytest.raises(ConfigError, match=message):
        validate_tensor_parallel(model, tp)


def test_replicated_blocks_need_no_divisibility():
    model = build_tiny_model("tiny-olmoe", seed=0)
    autoep.convert(model)
    assert validate_tensor_parallel(model, 3).styles == {}
