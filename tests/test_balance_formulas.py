"""Balancing formulas, bias rules and capacity drops, against independent references (one process)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import autoep
from autoep.config import AutoEPConfig
from autoep.errors import ConfigError
from autoep.load_balance import collect_load_stats
from autoep.moe import balance as bal
from autoep.moe.capacity import apply_capacity, expert_capacity
from autoep.moe.layer import MoELayer
from autoep.moe.router import RouterOutput
from tests.conftest import ALL_FAMILIES, batch, model_pair


def _routing(T: int = 64, E: int = 8, K: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=gen) * 2 + torch.linspace(0, 2, E)  # skewed towards high ids
    indices = logits.topk(K, dim=-1).indices
    return logits, indices


def test_switch_loss_is_hf_loss_over_k() -> None:
    logits, indices = _routing()
    E, K = 8, 2
    ours = bal.switch_aux_loss(torch.softmax(logits, -1), bal.expert_counts(indices, E), 64, K)
    hf = load_balancing_loss_func((logits,), E, K)  # Hugging Face's normalisation is K times ours
    assert torch.allclose(ours * K, hf, atol=1e-6), (ours, hf)
    uniform = bal.switch_aux_loss(torch.full((16, E), 1 / E), torch.full((E,), 4), 16, K)
    assert uniform.item() == pytest.approx(1.0)  # perfect balance gives 1


def test_sequence_loss_matches_per_sequence_loop() -> None:
    B, S, E, K = 3, 16, 8, 2
    logits, indices = _routing(B * S, E, K, seed=1)
    scores = torch.sigmoid(logits)
    probs = scores / scores.sum(-1, keepdim=True)
    want = 0.0
    for b in range(B):
        rows = slice(b * S, (b + 1) * S)
        for e in range(E):
            f = E / (K * S) * (indices[rows] == e).sum().item()
            want += f * probs[rows, e].mean().item() / B
    got = bal.sequence_aux_loss(bal.routing_probs(logits, "sigmoid").view(B, S, E), indices.view(B, S, K))
    assert got.item() == pytest.approx(want, abs=1e-6)


def test_z_loss_formula() -> None:
    logits, _ = _routing()
    want = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / logits.shape[0]
    assert bal.z_loss(logits).item() == pytest.approx(want, rel=1e-6)


def test_bias_rules() -> None:
    counts = torch.tensor([10.0, 2.0, 6.0, 6.0])  # mean 6
    sign = bal.bias_update(counts, 0.1, "sign")
    assert torch.allclose(sign, torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    centred = bal.bias_update(torch.tensor([10.0, 4.0, 4.0, 6.0]), 0.1, "sign_centered")
    assert centred.sum().abs().item() < 1e-7
    assert torch.allclose(centred, torch.tensor([-0.1, 0.1, 0.1, 0.0]) - 0.025)


# Hand-built skewed routing: 8 tokens, 8 experts, top-2, every token picks experts 0 and 1
# (capacity 1.0 -> 2 assignments per expert). Token t's probability for expert 0 is P0[t].
P0 = [0.30, 0.10, 0.50, 0.45, 0.05, 0.40, 0.20, 0.35]
P1 = [0.25, 0.40, 0.15, 0.30, 0.45, 0.10, 0.35, 0.20]
EXPECTED_KEPT = {
    "probs": {0: {2, 3}, 1: {4, 1}},  # the two highest probabilities per expert
    "position": {0: {0, 1}, 1: {0, 1}},  # the two earliest tokens
}


def _hand_routing() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    probs = torch.full((8, 8), 0.0)
    probs[:, 0], probs[:, 1] = torch.tensor(P0), torch.tensor(P1)
    probs[:, 2:] = ((1 - probs[:, 0] - probs[:, 1]) / 6).unsqueeze(1)
    indices = torch.tensor([[0, 1]] * 8)
    return probs.log(), probs.gather(1, indices), indices


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_capacity_drops_expected_assignments(policy) -> None:
    _, weights, indices = _hand_routing()
    assert expert_capacity(8, 2, 8, 1.0) == 2
    kept_idx, kept_w, dropped = apply_capacity(indices, weights, weights, 8, 1.0, policy)
    for slot, expert in enumerate((0, 1)):
        kept = {t for t in range(8) if kept_idx[t, slot] == expert}
        assert kept == EXPECTED_KEPT[policy][expert]
        assert all(kept_idx[t, slot] == 8 and kept_w[t, slot] == 0 for t in range(8) if t not in kept)
    assert dropped.tolist() == [6, 6, 0, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_layer_with_capacity_equals_layer_without_the_dropped_assignments(policy) -> None:
    """The capped layer computes exactly the dropless layer with the dropped weights set to 0."""
    logits, weights, indices = _hand_routing()
    _, model = model_pair("tiny-mixtral")
    autoep.convert(model, 1, balance=bal.BalanceConfig(capacity_factor=1.0, drop_policy=policy))
    layer = next(m for m in model.modules() if isinstance(m, MoELayer))
    layer.router_module.forward = lambda x: RouterOutput(logits, weights, indices)
    x = torch.randn(1, 8, layer.spec.hidden_size, generator=torch.Generator().manual_seed(0))
    layer.train()
    capped = layer(x)
    stats = collect_load_stats(model)
    keep = torch.zeros(8, 2, dtype=torch.bool)
    for slot, expert in enumerate((0, 1)):
        for t in EXPECTED_KEPT[policy][expert]:
            keep[t, slot] = True
    layer.balance = bal.BalanceConfig()
    layer.router_module.forward = lambda x: RouterOutput(logits, torch.where(keep, weights, 0.0), indices)
    want = layer(x)
    assert torch.allclose(capped, want, atol=1e-6)
    layer.router_module.forward = lambda x: RouterOutput(logits, weights, indices)
    assert not torch.allclose(capped, layer(x), atol=1e-4)  # dropping really changed the output
    assert stats.dropped_LE[0].tolist() == [6, 6, 0, 0, 0, 0, 0, 0]
    assert stats.routed_LE[0].tolist() == [8, 8, 0, 0, 0, 0, 0, 0]
    assert stats.dropped_fraction_L[0].item() == pytest.approx(12 / 16)


@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_router_logits_and_hf_aux_loss_survive_conversion(name) -> None:
    reference, model = model_pair(name)
    autoep.convert(model, 1)
    ids = batch(reference.config.vocab_size, (2, 8), seed=3)
    want = reference(input_ids=ids, labels=ids, output_router_logits=True)
    got = model(input_ids=ids, labels=ids, output_router_logits=True)
    assert len(got.router_logits) == len(want.router_logits) > 0
    for a, b in zip(got.router_logits, want.router_logits, strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)
    assert (got.aux_loss is None) == (want.aux_loss is None)
    if want.aux_loss is not None:  # families with load_balancing_loss_func add it to the loss themselves
        assert torch.allclose(got.aux_loss, want.aux_loss, atol=1e-6)
    assert torch.allclose(got.loss, want.loss, atol=1e-5)


def test_balancing_losses_join_the_model_loss_and_eval_adds_nothing() -> None:
    reference, model = model_pair("tiny-qwen3-moe")
    cfg = bal.BalanceConfig(aux_loss_coef=0.5, z_loss_coef=0.25)
    autoep.convert(model, 1, balance=cfg)
    ids = batch(reference.config.vocab_size, (2, 8), seed=4)
    lm = reference(input_ids=ids, labels=ids).loss
    model.train()
    out = model(input_ids=ids, labels=ids)
    stats = collect_load_stats(model)
    expected = 0.5 * stats.losses["aux_loss"].mean() + 0.25 * stats.losses["z_loss"].mean()
    assert out.balance_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(lm.item() + expected.item(), rel=1e-5)
    model.eval()
    assert model(input_ids=ids, labels=ids).loss.item() == pytest.approx(lm.item(), abs=1e-5)


def test_bias_update_adds_a_zero_bias_to_families_without_one() -> None:
    reference, model = model_pair("tiny-mixtral")
    autoep.convert(model, 1, balance=bal.BalanceConfig(bias_update_rate=0.1))
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    assert all(m.added_selection_bias and m.router_module.e_score_correction_bias.abs().sum() == 0 for m in layers)
    ids = batch(reference.config.vocab_size, (2, 8), seed=5)
    assert torch.allclose(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5)


def test_config_validation() -> None:
    config = AutoEPConfig.create(load_balancing={"global_aux_loss_coef": 1e-3, "capacity_factor": 1.25})
    assert config.load_balancing.enabled_losses == ("global_aux_loss",)
    ds = AutoEPConfig.from_deepspeed({"load_balancing": {"bias_update_rate": 1e-3, "bias_update_rule": "sign"}})
    assert ds.load_balancing.updates_bias
    for bad, words in [
        ({"z_loss_coef": -1}, "z_loss_coef must be >= 0"),
        ({"capacity_factor": 0}, "capacity_factor must be > 0"),
        ({"drop_policy": "random"}, "drop_policy"),
        ({"aux_coef": 1}, "aux_coef"),
    ]:
        with pytest.raises(ConfigError, match=words):
            AutoEPConfig.create(load_balancing=bad)
