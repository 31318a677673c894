"""Families whose experts are not transformers' standard experts module, converted on the block path.

* Llama 4: transposed experts (``gate_up_proj [E, D, 2F]``), a top-k-then-sigmoid
  router, the routing weight scales the expert *input*, and the block returns
  ``([T, D] out, router_logits)``.
* DBRX: experts flattened as ``mlp.w1/v1/w2 [E * F, D]``, the gate under
  ``router.layer``, top-k weights divided by their p-norm.
* LongCat-Flash: the router also picks zero-computation (identity) experts,
  computed where the token lives; only the real experts are expert-parallel.

Each converted model equals the unconverted one (fp32: logits within 1e-5,
every gradient within 1e-6) at ep 1 in this process and at ep 2 on two gloo
ranks. The same single spawn round-trips Hugging Face checkpoints:
``save_pretrained`` -> ``autoep.from_pretrained`` (ep 2) -> ``export_hf`` ->
transformers' ``from_pretrained``, logits equal.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from transformers import AutoModelForCausalLM

import autoep
from autoep.convert import find_convertible_blocks
from autoep.errors import ConfigError
from autoep.launch import run_local
from autoep.models import zoo
from autoep.moe import MoELayer
from autoep.moe.balance import BalanceConfig
from autoep.moe.experts import local_tensor
from autoep.moe.sites import moe_sites, owned_rows
from autoep.moe.spec import MoESpec

FAMILIES = ("llama4", "dbrx", "longcat_flash")
LOGITS_TOL, GRAD_TOL = 1e-5, 1e-6


def _build(model_type: str, seed: int = 0, dbrx_norm_p: float | None = 1.0) -> nn.Module:
    """A tiny random model; DBRX optionally with another ``moe_normalize_expert_weights``."""
    model = zoo.build_tiny(model_type, seed=seed)
    if model_type == "dbrx":
        model.config.ffn_config.moe_normalize_expert_weights = dbrx_norm_p
        for module in model.modules():
            if type(module).__name__ == "DbrxFFN":
                module.moe_normalize_expert_weights = dbrx_norm_p  # the HF block keeps its own copy
    return model


def _ids(model: nn.Module, rank: int = 0, shape: tuple[int, int] = (2, 8)) -> torch.Tensor:
    vocab = model.config.get_text_config().vocab_size
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(100 + rank))


def parity(reference: nn.Module, converted: nn.Module, ids: torch.Tensor) -> tuple[float, float]:
    """``(max |Δ logits|, max |Δ grad|)`` after one LM-loss backward on each model.

    With ep > 1 the reference expert gradients are summed over the EP group
    first: the all-to-all backward sums every rank's tokens into the owner.
    """
    ref_out = reference(input_ids=ids, labels=ids)
    out = converted(input_ids=ids, labels=ids)
    ref_out.loss.backward()
    out.loss.backward()
    logits = (ref_out.logits - out.logits).abs().max().item()
    ref_params = dict(reference.named_parameters())
    experts = {id(p): site for _, site in moe_sites(converted) for p in site.experts_module.parameters()}
    worst = 0.0
    for name, param in converted.named_parameters():
        ref_grad = ref_params[name].grad
        if ref_grad is None and param.grad is None:
            continue
        ref_grad = torch.zeros_like(ref_params[name]) if ref_grad is None else ref_grad.clone()
        site = experts.get(id(param))
        if site is not None:
            if site.ep_size > 1:
                dist.all_reduce(ref_grad, group=site.dispatcher.group)
            ref_grad = owned_rows(site, param, ref_grad)
        grad = local_tensor(param.grad) if param.grad is not None else torch.zeros_like(ref_grad)
        worst = max(worst, (grad - ref_grad).abs().max().item())
    return logits, worst


def _convert_and_compare(model_type: str, ep: int, **build) -> dict:
    """Convert a copy at ``ep`` (every rank calls it when ep > 1); parity, layout facts, routing facts."""
    reference = _build(model_type, **build)
    converted = copy.deepcopy(reference)
    report = autoep.convert(converted, ep)
    layers = [m for m in converted.modules() if isinstance(m, MoELayer)]
    chosen: list[torch.Tensor] = []
    handle = layers[0].router_module.register_forward_hook(lambda _m, _i, out: chosen.append(out.indices_TK))
    rank = dist.get_rank() if dist.is_initialized() else 0
    logits, grads = parity(reference, converted, _ids(reference, rank))
    handle.remove()
    indices_TK, layer = chosen[0], layers[0]
    rank_TK = torch.div(indices_TK.clamp(max=layer.num_experts - 1), layer.num_local_experts, rounding_mode="floor")
    return {
        "logits": logits,
        "grads": grads,
        "families": sorted({r.family for r in report.layers}),
        "zero_choices": int((indices_TK >= layer.num_experts).sum()),
        "real_choices": int((indices_TK < layer.num_experts).sum()),
        "shared_rank_rows": int((rank_TK[:, :1] == rank_TK[:, 1:]).all(dim=1).sum()),
        "dispatched": int(layer.tokens_per_expert.sum()),  # assignments this rank's experts computed
    }


def _assert_exact(result: dict, what: str) -> None:
    assert result["logits"] <= LOGITS_TOL, f"{what}: logits differ by {result['logits']:.2e}"
    assert result["grads"] <= GRAD_TOL, f"{what}: a gradient differs by {result['grads']:.2e}"


# ---------------------------------------------------------------- ep 1, in this process


def test_each_family_takes_the_block_path_with_its_own_description() -> None:
    specs = {}
    for model_type in FAMILIES:
        blocks, refused = find_convertible_blocks(_build(model_type))
        assert not refused and blocks and all(isinstance(spec, MoESpec) for _, _, spec in blocks)
        specs[model_type] = blocks[0][2]
    llama4, dbrx, longcat = (specs[t] for t in FAMILIES)
    assert llama4.layout.transposed and llama4.weights_scale_input and llama4.returns_router_logits
    assert llama4.router.scoring == "topk_sigmoid" and llama4.shared_attr == "shared_expert"
    assert dbrx.layout.kind == "dbrx" and dbrx.router_linear == "layer" and dbrx.router.norm_p == 1.0
    assert longcat.zero_experts == 4 and longcat.num_experts == 8 and longcat.router.num_experts == 12
    assert longcat.unused_in_rows == 4 and longcat.router_linear == "classifier"


@pytest.mark.parametrize("model_type", FAMILIES)
def test_ep1_equals_the_unconverted_model(model_type: str) -> None:
    result = _convert_and_compare(model_type, 1)
    assert result["families"] == [model_type]
    _assert_exact(result, model_type)


@pytest.mark.parametrize("norm_p", [2.0, None])
def test_dbrx_normalisation_variants(norm_p: float | None) -> None:
    _assert_exact(_convert_and_compare("dbrx", 1, dbrx_norm_p=norm_p), f"dbrx p={norm_p}")


@pytest.mark.parametrize("model_type", FAMILIES)
def test_state_dict_keys_are_the_originals(model_type: str) -> None:
    reference = _build(model_type)
    converted = copy.deepcopy(reference)
    autoep.convert(converted)
    ref_state, state = reference.state_dict(), converted.state_dict()
    assert set(state) == set(ref_state)
    differ = {k for k in state if state[k].shape != ref_state[k].shape}
    if model_type == "longcat_flash":  # the zero experts' never-read in-projection rows are not kept
        assert differ and all(k.endswith("experts.gate_up_proj") for k in differ)
        assert all(state[k].shape[0] == 8 and ref_state[k].shape[0] == 12 for k in differ)
    else:
        assert not differ


def test_llama4_returns_flat_rows_and_router_logits_like_hf() -> None:
    reference = _build("llama4", seed=1)
    converted = copy.deepcopy(reference)
    autoep.convert(converted)
    x = torch.randn(2, 5, reference.config.hidden_size)
    block, layer = reference.model.layers[0].feed_forward, converted.model.layers[0].feed_forward
    (ref_out, ref_logits), (out, logits) = block(x), layer(x)
    assert out.shape == ref_out.shape == (10, x.shape[-1])
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits, ref_logits, atol=1e-6, rtol=0)
    ids = _ids(reference)
    ref_all = reference(input_ids=ids, output_router_logits=True).router_logits
    conv_all = converted(input_ids=ids, output_router_logits=True).router_logits
    assert len(conv_all) == len(ref_all) == 4
    for mine, theirs in zip(conv_all, ref_all, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)


def test_longcat_zero_experts_are_chosen_and_never_dispatched() -> None:
    result = _convert_and_compare("longcat_flash", 1)
    assert result["zero_choices"] > 0 and result["real_choices"] > 0  # both kinds are exercised
    assert result["dispatched"] == result["real_choices"]  # only real-expert choices reach the GEMMs


def test_longcat_capacity_and_balancing_count_real_experts_only() -> None:
    model = _build("longcat_flash")
    balance = BalanceConfig(capacity_factor=0.5, aux_loss_coef=0.01, z_loss_coef=0.001)
    autoep.convert(model, balance=balance)
    out = model(input_ids=_ids(model), labels=_ids(model))
    out.loss.backward()
    layer = model.model.layers[0].mlp
    assert layer.load_stats.routed_E.shape == (8,) and layer.load_stats.dropped_E.shape == (8,)
    assert int(layer.load_stats.dropped_E.sum()) > 0
    assert {"aux_loss", "z_loss"} <= set(layer.load_stats.loss_sums)  # over all 12 choices, zero experts included


def test_longcat_refuses_aux_loss_free_bias_updates() -> None:
    with pytest.raises(ConfigError, match="zero-computation experts"):
        autoep.convert(_build("longcat_flash"), balance=BalanceConfig(bias_update_rate=1e-3))


# ---------------------------------------------------------------- ep 2, one spawn of two gloo ranks


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _ep2_worker(root: str) -> dict:
    """Every ep-2 scenario: parity per family, then the checkpoint round trip per family."""
    torch.set_num_threads(1)
    out: dict = {"parity": {t: _convert_and_compare(t, 2) for t in FAMILIES}, "loaded": {}}
    for model_type in FAMILIES:
        model = autoep.from_pretrained(Path(root) / model_type / "hf", autoep.AutoEPConfig(ep_size=2, zero_stage=3))
        out["loaded"][model_type] = _logits(model, _ids(model))
        autoep.export_hf(model, Path(root) / model_type / "export")
    return out


@pytest.fixture(scope="module")
def ep2(tmp_path_factory) -> tuple[Path, dict[int, dict]]:
    root = tmp_path_factory.mktemp("nonstandard")
    for model_type in FAMILIES:
        _build(model_type, seed=5).save_pretrained(root / model_type / "hf")
    return root, run_local(_ep2_worker, 2, str(root))


@pytest.mark.parametrize("model_type", FAMILIES)
def test_ep2_equals_the_unconverted_model(ep2, model_type: str) -> None:
    _, results = ep2
    for rank, result in results.items():
        _assert_exact(result["parity"][model_type], f"{model_type} ep 2 rank {rank}")


def test_ep2_scenarios_are_the_intended_ones(ep2) -> None:
    _, results = ep2
    # Llama 4: some token sends both of its choices to one rank, so one row carries two input weights.
    assert any(r["parity"]["llama4"]["shared_rank_rows"] > 0 for r in results.values())
    longcat = [r["parity"]["longcat_flash"] for r in results.values()]
    assert all(r["zero_choices"] > 0 for r in longcat)
    assert sum(r["dispatched"] for r in longcat) == sum(r["real_choices"] for r in longcat)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_ep2_checkpoint_round_trip(ep2, model_type: str) -> None:
    root, results = ep2
    hf_model = AutoModelForCausalLM.from_pretrained(root / model_type / "hf")
    ids = _ids(hf_model)
    original = _logits(hf_model, ids)
    torch.testing.assert_close(results[0]["loaded"][model_type], original, atol=1e-5, rtol=0)
    exported = _logits(AutoModelForCausalLM.from_pretrained(root / model_type / "export"), ids)
    torch.testing.assert_close(exported, original, atol=1e-5, rtol=0)
