"""Muon: per-expert orthogonalisation, Gram Newton-Schulz, the AdamW split, and distributed exactness."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

import autoep
from autoep.launch import run_local
from autoep.models.tiny import build_tiny_model
from autoep.optim import muon_split
from autoep.optim.muon import Muon
from autoep.optim.newton_schulz import orthogonalize
from autoep.train import train_step


def _one_muon_step(params: list[nn.Parameter], grads: list[torch.Tensor], **kwargs) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    Muon([{"params": params, "use_muon": True}], lr=0.1, **kwargs).step()


def test_stacked_experts_are_orthogonalised_one_by_one() -> None:
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(4, 12, 20, generator=gen)
    grad = torch.randn(4, 12, 20, generator=gen)
    stacked = nn.Parameter(weights.clone())
    _one_muon_step([stacked], [grad])
    alone = [nn.Parameter(weights[e].clone()) for e in range(4)]
    _one_muon_step(alone, [grad[e] for e in range(4)])
    for e in range(4):
        torch.testing.assert_close(stacked[e], alone[e], atol=1e-6, rtol=0)
    as_one_matrix = orthogonalize(grad.reshape(48, 20)).reshape(4, 12, 20)
    per_expert = orthogonalize(grad)
    assert (as_one_matrix - per_expert).abs().max() > 1e-2  # the stack is not one matrix


@pytest.mark.parametrize("shape", [(16, 64), (3, 24, 200), (8, 9)])
def test_gram_newton_schulz_agrees_with_standard_on_wide_matrices(shape) -> None:
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    standard, gram = orthogonalize(g, method="standard"), orthogonalize(g, method="gram")
    assert (gram - standard).abs().max() <= 1e-4 * standard.abs().max()
    singular = torch.linalg.svdvals(gram.double())
    assert singular.min() > 0.6 and singular.max() < 1.25  # Muon's quintic lands near 1, not exactly


@pytest.mark.parametrize("shape", [(20, 20), (64, 16)])
def test_gram_falls_back_to_standard_for_square_and_tall(shape) -> None:
    g = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    assert torch.equal(orthogonalize(g, method="gram"), orthogonalize(g, method="standard"))


def test_bf16_newton_schulz_is_close_to_fp32() -> None:
    g = torch.randn(4, 32, 64, generator=torch.Generator().manual_seed(3))
    fp32, bf16 = orthogonalize(g), orthogonalize(g, dtype=torch.bfloat16)
    assert bf16.dtype == torch.float32
    assert (bf16 - fp32).abs().max() < 5e-2


def test_update_scales() -> None:
    from autoep.optim.muon import _scale

    assert _scale(torch.Size([64, 256]), "moonlight") == pytest.approx(0.2 * 16)
    assert _scale(torch.Size([8, 64, 16]), "spectral") == pytest.approx(2.0)
    assert _scale(torch.Size([16, 64]), "spectral") == 1.0


def test_adamw_gets_embeddings_head_norms_biases_and_gates() -> None:
    model = build_tiny_model("tiny-qwen2-moe")
    muon, adamw = muon_split(model)
    assert "model.embed_tokens.weight" in adamw and "lm_head.weight" in adamw
    assert "model.layers.1.mlp.gate.weight" in adamw  # router
    assert "model.layers.1.mlp.shared_expert_gate.weight" in adamw
    assert "model.norm.weight" in adamw and "model.layers.0.self_attn.q_proj.bias" in adamw
    assert "model.layers.1.mlp.experts.gate_up_proj" in muon and "model.layers.0.self_attn.q_proj.weight" in muon
    autoep.convert(model)  # the same split once converted
    assert muon_split(model) == (muon, adamw)


def test_parameters_muon_cannot_handle_are_listed_at_start_up() -> None:
    class WithConv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3)
            self.proj = nn.Linear(4, 4)

    config = autoep.AutoEPConfig(optimizer={"type": "Muon", "params": {"lr": 0.02}})
    with pytest.raises(autoep.ConfigError, match=r"conv\.weight: 4-D tensor"):
        autoep.build_optimizer(WithConv(), config)
    routed = autoep.AutoEPConfig(optimizer={"type": "Muon", "params": {"adamw_params": ["conv.*"]}})
    assert isinstance(autoep.build_optimizer(WithConv(), routed), Muon)


# --- distributed exactness: world 4, ep 2, ZeRO 1/2/3 and tp 2 against single-process Muon -------------------------

MODEL, STEPS, SEQ, WORLD = "tiny-deepseek-v3", 5, 8, 4
MUON = {"lr": 0.01, "weight_decay": 0.1, "adamw_lr": 1e-3, "adamw_eps": 1e-6, "ns_method": "standard"}


def _batches():
    gen = torch.Generator().manual_seed(4)
    return [torch.randint(0, 256, (WORLD, SEQ), generator=gen) for _ in range(STEPS)]


def _full(model) -> dict[str, torch.Tensor]:
    from autoep.checkpoint.manager import full_tensor

    return {n: full_tensor(p).detach().clone() for n, p in model.named_parameters()}


def muon_worker() -> dict:
    out = {}
    for zero in (1, 2, 3):
        model = build_tiny_model(MODEL, seed=1)
        config = autoep.AutoEPConfig(ep_size=2, zero_stage=zero, optimizer={"type": "Muon", "params": MUON})
        autoep.parallelize(model, config)
        optimizer = autoep.build_optimizer(model, config)
        losses = [train_step(model, optimizer, [b[dist.get_rank() : dist.get_rank() + 1]]).loss for b in _batches()]
        expert = model.model.layers[1].mlp.experts.gate_up_proj
        # 8 experts / ep 2, sharded over edp 2 by FSDP (ZeRO 3), whole on each owner (ZeRO 1/2)
        assert isinstance(expert, DTensor) and expert.to_local().shape[0] == (2 if zero == 3 else 4)
        assert (model.autoep.owned is not None) == (zero < 3)
        params = _full(model)  # a collective: every rank gathers
        out[zero] = {"losses": losses, "params": params if dist.get_rank() == 0 else None}
    # tp 2 (dp 2, two rows each: the same global batch): row- and column-split dense matrices are
    # orthogonalised whole.
    model = build_tiny_model(MODEL, seed=1)
    config = autoep.AutoEPConfig(
        ep_size=2, tp_size=2, zero_stage=3, micro_batch_size=2, optimizer={"type": "Muon", "params": MUON}
    )
    autoep.parallelize(model, config)
    optimizer = autoep.build_optimizer(model, config)
    dp_rank = model.autoep.dp_rank
    losses = [train_step(model, optimizer, [b[2 * dp_rank : 2 * dp_rank + 2]]).loss for b in _batches()]
    down = model.model.layers[0].mlp.down_proj.weight
    assert isinstance(down, DTensor) and "tp" in down.device_mesh.mesh_dim_names  # really split
    params = _full(model)
    out["tp2"] = {"losses": losses, "params": params if dist.get_rank() == 0 else None}
    return out


@pytest.fixture(scope="module")
def reference() -> dict:
    model = build_tiny_model(MODEL, seed=1)
    config = autoep.AutoEPConfig(optimizer={"type": "Muon", "params": MUON})
    optimizer = autoep.build_optimizer(model, config)
    losses = []
    for batch in _batches():
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "params": _full(model)}


@pytest.fixture(scope="module")
def distributed() -> dict:
    return run_local(muon_worker, WORLD)[0]


@pytest.mark.parametrize("layout", [1, 2, 3, "tp2"])
def test_distributed_muon_matches_single_process(distributed, reference, layout) -> None:
    got = distributed[layout]
    assert max(abs(a - b) for a, b in zip(got["losses"], reference["losses"], strict=True)) <= 1e-5
    for name, value in reference["params"].items():
        diff = (got["params"][name] - value).abs().max().item()
        assert diff <= 1e-5, f"{name}: {diff}"
    initial = _full(build_tiny_model(MODEL, seed=1))
    assert max((reference["params"][k] - initial[k]).abs().max().item() for k in initial) > 1e-3  # it moved


def test_moonlight_style_run_from_the_cli(tmp_path) -> None:
    command = [sys.executable, "-m", "autoep", "train", "--model", "tiny-deepseek-v3", "--optimizer", "muon"]
    command += ["--steps", "30", "--lr", "3e-3", "--output", str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Muon updates" in result.stdout and "router gates" in result.stdout
    import json

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["final_loss"] < summary["first_loss"] - 0.5
