"""Routing extremes and precisions at ep = 1 (the ep > 1 versions live in test_parity_multi_rank)."""

from __future__ import annotations

import copy

import pytest
import torch

import autoep
from autoep.models.tiny import build_tiny_model
from autoep.moe import MoELayer
from autoep.moe.experts import ExpertLayout, GroupedExperts
from tests.conftest import batch, model_pair


def _assert_model_parity(reference, converted, ids, loss_fn) -> None:
    ref_out, conv_out = reference(input_ids=ids), converted(input_ids=ids)
    torch.testing.assert_close(conv_out.logits, ref_out.logits, atol=1e-5, rtol=0)
    loss_fn(ref_out.logits).backward()
    loss_fn(conv_out.logits).backward()
    ref_params = dict(reference.named_parameters())
    for key, param in converted.named_parameters():
        if ref_params[key].grad is not None:
            torch.testing.assert_close(param.grad, ref_params[key].grad, atol=1e-6, rtol=1e-5, msg=key)


def test_every_token_to_one_expert() -> None:
    """GPT-OSS router bias forces expert 5 for every token (top-1): 7 of 8 experts get nothing."""
    reference = build_tiny_model("tiny-gpt-oss", num_experts_per_tok=1)
    with torch.no_grad():
        for module in reference.modules():
            if type(module).__name__ == "GptOssTopKRouter":
                module.bias.zero_()
                module.bias[5] = 100.0
    converted = copy.deepcopy(reference)
    autoep.convert(converted)
    ids = batch(reference.config.vocab_size, (2, 9), seed=4)
    _assert_model_parity(reference, converted, ids, lambda logits: logits.square().mean())
    for layer in (m for m in converted.modules() if isinstance(m, MoELayer)):
        assert layer.tokens_per_expert.tolist() == [0, 0, 0, 0, 0, 18, 0, 0]


def test_correction_bias_steers_selection_not_weights() -> None:
    """DeepSeek-V3: a large bias on expert 3 makes every token pick it, with the same combine weights as HF."""
    reference, converted = model_pair("tiny-deepseek-v3")
    with torch.no_grad():
        for module in reference.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.zero_()
                module.e_score_correction_bias[3] = 10.0
    converted = copy.deepcopy(reference)
    autoep.convert(converted)
    ids = batch(reference.config.vocab_size, (2, 8), seed=5)
    _assert_model_parity(reference, converted, ids, lambda logits: logits.square().mean())
    for layer in (m for m in converted.modules() if isinstance(m, MoELayer)):
        assert layer.tokens_per_expert[3].item() == 16


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-deepseek-v3", "tiny-gpt-oss", "tiny-qwen2-moe"])
def test_one_token_batch(name: str) -> None:
    reference, converted = model_pair(name)
    autoep.convert(converted)
    ids = batch(reference.config.vocab_size, (1, 1), seed=6)
    _assert_model_parity(reference, converted, ids, lambda logits: logits.square().mean())


def test_empty_input_to_a_layer() -> None:
    _, converted = model_pair("tiny-qwen2-moe")
    report = autoep.convert(converted)
    layer = converted.get_submodule(report.layers[0].path)
    x = torch.zeros(1, 0, 32, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == (1, 0, 32)
    assert layer.experts.down_proj.grad is not None and layer.experts.down_proj.grad.abs().sum() == 0


def _layer_error(block, x_ref32: torch.Tensor, dtype: torch.dtype) -> float:
    reference = copy.deepcopy(block).float()
    expected = reference(x_ref32)
    got = copy.deepcopy(block).to(dtype)(x_ref32.to(dtype))
    expected = expected[0] if isinstance(expected, tuple) else expected
    got = got[0] if isinstance(got, tuple) else got
    # Mean, not max: a bf16 rounding can flip one token's expert choice, in HF and here alike.
    return (got.float() - expected).abs().mean().item()


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-deepseek-v3", "tiny-gpt-oss"])
def test_bf16_error_no_worse_than_transformers(name: str) -> None:
    """In bf16 the converted layer is as close to the fp32 result as the HF block itself is."""
    reference, converted = model_pair(name)
    report = autoep.convert(converted)
    path = report.layers[0].path
    x = torch.randn(2, 24, 32, generator=torch.Generator().manual_seed(0))
    hf_error = _layer_error(reference.get_submodule(path), x, torch.bfloat16)
    ours_error = _layer_error(converted.get_submodule(path), x, torch.bfloat16)
    assert ours_error <= 1.5 * hf_error + 1e-4, (ours_error, hf_error)
    assert ours_error < 1e-2  # bf16-sized, not garbage


def test_bf16_training_step_runs_and_is_finite() -> None:
    reference = build_tiny_model("tiny-deepseek-v3", dtype=torch.bfloat16)
    autoep.convert(reference)
    ids = batch(reference.config.vocab_size, (2, 8), seed=2)
    out = reference(input_ids=ids, labels=ids)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in reference.parameters())


@pytest.mark.parametrize("layout", [ExpertLayout("swiglu"), ExpertLayout("gpt_oss")])
def test_grouped_mm_matches_loop_backend_in_bf16(layout: ExpertLayout) -> None:
    torch.manual_seed(0)
    loop = GroupedExperts(4, 32, 16, layout, backend="loop").to(torch.bfloat16)
    with torch.no_grad():
        for p in loop.parameters():
            p.normal_(0, 0.2)
    grouped = copy.deepcopy(loop)
    grouped.backend = "grouped_mm"
    counts = torch.tensor([3, 0, 6, 1])
    x = torch.randn(10, 32, dtype=torch.bfloat16)
    x_loop, x_grouped = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_loop = loop(x_loop, counts, counts.tolist())
    y_grouped = grouped(x_grouped, counts, None)
    torch.testing.assert_close(y_grouped.float(), y_loop.float(), atol=2e-2, rtol=2e-2)
    y_loop.float().square().sum().backward()
    y_grouped.float().square().sum().backward()
    torch.testing.assert_close(grouped.down_proj.grad.float(), loop.down_proj.grad.float(), atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(x_grouped.grad.float(), x_loop.grad.float(), atol=5e-2, rtol=5e-2)
    assert loop.uses_loop(x) and not grouped.uses_loop(x)
