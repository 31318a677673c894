"""ep > 1 on real gloo processes: each rank's logits and expert gradients match the original model.

One spawn per world size runs every scenario, to keep the suite fast on 2 cores.
The reference loss is the sum over an EP group of each rank's mean loss, so the
reference gradient of an expert is the sum, over the EP group, of each rank's
gradient on its own batch; the owner's slice of it must equal the local gradient.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

import autoep
from autoep.launch import run_local
from autoep.models.tiny import build_tiny_model
from autoep.moe import MoELayer
from autoep.moe.experts import local_tensor

TOL = 1e-5


def _skew_to_rank0(model: torch.nn.Module) -> None:
    """Every token picks expert 0 (and its top-k mates) on EP rank 0: the other ranks receive nothing."""
    with torch.no_grad():
        for module in model.modules():
            bias = getattr(module, "e_score_correction_bias", None)
            if bias is not None:
                bias.zero_()
                bias[:2] = 100.0


def _loss(out, ids: torch.Tensor) -> torch.Tensor:
    # A one-token sequence has no next-token target; use a loss on the logits there.
    return out.loss if ids.shape[1] > 1 else out.logits.square().mean()


def _compare(name: str, ep: int, *, shape=(2, 10), skew=False, overrides=None) -> dict[str, float]:
    rank = dist.get_rank()
    reference = build_tiny_model(name, seed=7, **(overrides or {}))
    if skew:
        _skew_to_rank0(reference)
    converted = copy.deepcopy(reference)
    report = autoep.convert(converted, ep)
    ids = torch.randint(0, reference.config.vocab_size, shape, generator=torch.Generator().manual_seed(100 + rank))
    ref_out = reference(input_ids=ids, labels=ids)
    conv_out = converted(input_ids=ids, labels=ids)
    _loss(ref_out, ids).backward()
    _loss(conv_out, ids).backward()
    result = {"logits": (ref_out.logits - conv_out.logits).abs().max().item(), "expert_grad": 0.0, "dense_grad": 0.0}
    ref_params = dict(reference.named_parameters())
    expert_keys = set()
    for layer_report in report.layers:
        layer = converted.get_submodule(layer_report.path)
        assert isinstance(layer, MoELayer)
        for pname, param in layer.experts.named_parameters():
            key = f"{layer_report.path}.experts.{pname}"
            expert_keys.add(key)
            ref_grad = ref_params[key].grad.clone()
            dist.all_reduce(ref_grad, group=layer.dispatcher.group)
            expected = ref_grad[layer.expert_start : layer.expert_end]
            assert local_tensor(param).shape == expected.shape
            diff = (local_tensor(param.grad) - expected).abs().max().item()
            result["expert_grad"] = max(result["expert_grad"], diff)
    for key, param in converted.named_parameters():
        if key not in expert_keys and param.grad is not None:
            diff = (param.grad - ref_params[key].grad).abs().max().item()
            result["dense_grad"] = max(result["dense_grad"], diff)
    if skew:
        # Proof that the scenario is the intended one: EP ranks other than 0 get no routed token.
        layers = [m for m in converted.modules() if isinstance(m, MoELayer)]
        result["ep_rank"] = layers[0].ep_rank
        result["routed_here"] = sum(int(m.tokens_per_expert.sum()) for m in layers)
    return result


def _zero_token_rank(name: str, ep: int) -> dict[str, float]:
    """Layer level: EP rank 1 brings no tokens at all, but still serves the others."""
    rank = dist.get_rank()
    reference = build_tiny_model(name, seed=3)
    converted = copy.deepcopy(reference)
    report = autoep.convert(converted, ep)
    path = report.layers[0].path
    ref_block, layer = reference.get_submodule(path), converted.get_submodule(path)
    tokens = 0 if rank % ep == 1 else 9
    x = torch.randn(1, tokens, reference.config.hidden_size, generator=torch.Generator().manual_seed(rank))
    x_ref, x_conv = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y_conv = ref_block(x_ref), layer(x_conv)
    y_ref.square().sum().backward()
    y_conv.square().sum().backward()
    out = {"tokens": tokens, "out": (y_ref - y_conv).abs().max().item() if tokens else 0.0}
    out["x_grad"] = (x_ref.grad - x_conv.grad).abs().max().item() if tokens else 0.0
    ref_grad = ref_block.experts.down_proj.grad.clone()
    dist.all_reduce(ref_grad, group=layer.dispatcher.group)
    local_grad = local_tensor(layer.experts.down_proj.grad)
    out["expert_grad"] = (local_grad - ref_grad[layer.expert_start : layer.expert_end]).abs().max()
    out["expert_grad"] = out["expert_grad"].item()
    return out


def _global_state_dict(name: str, ep: int) -> dict[str, float]:
    """Expert weights are DTensors of the global shape: the state dict looks like the original's."""
    reference = build_tiny_model(name, seed=11)
    converted = copy.deepcopy(reference)
    autoep.convert(converted, ep)
    ref_state, state = reference.state_dict(), converted.state_dict()
    worst, same_shapes = 0.0, ref_state.keys() == state.keys()
    for key, value in state.items():
        full = value.full_tensor() if isinstance(value, torch.distributed.tensor.DTensor) else value
        same_shapes &= full.shape == ref_state[key].shape
        worst = max(worst, (full - ref_state[key]).abs().max().item())
    return {"same_shapes": same_shapes, "max_diff": worst}


def _bf16_model_with_fp32_routers() -> dict:
    """A bf16 DeepSeek-V3 keeps HF's fp32 router weights; ZeRO 3 gives them FSDP units of their own (FSDP2
    needs one dtype per unit), ZeRO 1 buckets them apart: both train, to the same losses."""
    from autoep.models.loading import load_model
    from autoep.train import train_step

    result = {}
    for zero in (1, 3):
        model = load_model("tiny-deepseek-v3", dtype=torch.bfloat16, seed=3)
        config = autoep.AutoEPConfig(ep_size=2, zero_stage=zero)
        autoep.parallelize(model, config)
        optimizer = autoep.build_optimizer(model, config)
        ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(dist.get_rank()))
        gates = {str(local_tensor(p).dtype) for n, p in model.named_parameters() if n.endswith("gate.weight")}
        result[zero] = ([train_step(model, optimizer, [ids]).loss for _ in range(3)], sorted(gates))
    return result


def _world_worker(scenarios: list[tuple]) -> dict:
    results = {}
    for label, fn, args, kwargs in scenarios:
        results[label] = globals()[fn](*args, **kwargs)
    return results


WORLD2 = [
    ("mixtral-ep2", "_compare", ("tiny-mixtral", 2), {}),
    ("deepseek_v3-ep2", "_compare", ("tiny-deepseek-v3", 2), {}),
    ("qwen2_moe-ep2", "_compare", ("tiny-qwen2-moe", 2), {}),
    ("gpt_oss-ep2", "_compare", ("tiny-gpt-oss", 2), {}),
    ("one-token", "_compare", ("tiny-deepseek-v3", 2), {"shape": (1, 1)}),
    ("skewed", "_compare", ("tiny-deepseek-v3", 2), {"skew": True}),
    ("zero-tokens", "_zero_token_rank", ("tiny-qwen3-moe", 2), {}),
    ("global-state", "_global_state_dict", ("tiny-gpt-oss", 2), {}),
    ("bf16-fp32-routers", "_bf16_model_with_fp32_routers", (), {}),
]

WORLD4 = [
    ("deepseek_v3-ep4", "_compare", ("tiny-deepseek-v3", 4), {}),
    ("deepseek_v3-ep2", "_compare", ("tiny-deepseek-v3", 2), {}),
    ("mixtral-ep4", "_compare", ("tiny-mixtral", 4), {}),
    ("glm4_moe-ep2", "_compare", ("tiny-glm4-moe", 2), {}),
    ("deepseek_v2-ep4", "_compare", ("tiny-deepseek-v2", 4), {}),
    ("olmoe-ep4", "_compare", ("tiny-olmoe", 4), {}),
    ("qwen3_moe-ep2", "_compare", ("tiny-qwen3-moe", 2), {}),
    ("skewed-ep4", "_compare", ("tiny-glm4-moe", 4), {"skew": True}),
]


@pytest.fixture(scope="module")
def world2() -> dict[int, dict]:
    return run_local(_world_worker, 2, WORLD2)


@pytest.fixture(scope="module")
def world4() -> dict[int, dict]:
    return run_local(_world_worker, 4, WORLD4)


def _check_parity(results: dict[int, dict], label: str) -> None:
    for rank, per_rank in results.items():
        r = per_rank[label]
        assert r["logits"] <= TOL, (rank, r)
        assert r["expert_grad"] <= TOL, (rank, r)
        assert r["dense_grad"] <= TOL, (rank, r)


@pytest.mark.parametrize("label", [s[0] for s in WORLD2 if s[1] == "_compare"])
def test_world2(world2, label: str) -> None:
    assert sorted(world2) == [0, 1]
    _check_parity(world2, label)


@pytest.mark.parametrize("label", [s[0] for s in WORLD4 if s[1] == "_compare"])
def test_world4(world4, label: str) -> None:
    assert sorted(world4) == [0, 1, 2, 3]
    _check_parity(world4, label)


@pytest.mark.parametrize(("world", "label"), [("world2", "skewed"), ("world4", "skewed-ep4")])
def test_skewed_routing_leaves_other_ranks_empty(world, label, request) -> None:
    results = request.getfixturevalue(world)
    for r in (per_rank[label] for per_rank in results.values()):
        assert (r["routed_here"] > 0) == (r["ep_rank"] == 0), r


def test_expert_weights_are_global_dtensors(world2) -> None:
    for per_rank in world2.values():
        assert per_rank["global-state"] == {"same_shapes": True, "max_diff": 0.0}


def test_rank_that_brings_zero_tokens(world2) -> None:
    results = {rank: r["zero-tokens"] for rank, r in world2.items()}
    assert results[1]["tokens"] == 0 and results[0]["tokens"] > 0
    for r in results.values():
        assert r["out"] <= TOL and r["x_grad"] <= TOL and r["expert_grad"] <= TOL, r


def test_a_bf16_model_with_fp32_routers_trains_under_zero_1_and_3(world2) -> None:
    for per_rank in world2.values():
        (losses1, gates1), (losses3, gates3) = per_rank["bf16-fp32-routers"][1], per_rank["bf16-fp32-routers"][3]
        assert gates1 == gates3 == ["torch.float32"]
        assert losses1 == losses3 and losses1[-1] < losses1[0], (losses1, losses3)
