"""Bad requests fail early, with a message that says what to do."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autoep
from autoep.convert import validate_conversion
from tests.conftest import model_pair


def test_ep_size_that_does_not_divide_the_experts_lists_valid_sizes() -> None:
    _, model = model_pair("tiny-mixtral")  # 8 experts
    with pytest.raises(autoep.ConfigError) as err:
        validate_conversion(model, ep_size=3, world_size=6)
    message = str(err.value)
    assert "ep_size=3" in message and "8 routed experts" in message
    assert "[1, 2]" in message  # divisors of both 8 and the world size 6


def test_world_size_that_ep_size_does_not_divide() -> None:
    _, model = model_pair("tiny-mixtral")
    with pytest.raises(autoep.ConfigError, match=r"does not divide the world size 6.*\[1, 2, 3, 6\]"):
        validate_conversion(model, ep_size=4, world_size=6)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_ep_size_must_be_a_positive_int(bad) -> None:
    _, model = model_pair("tiny-mixtral")
    with pytest.raises(autoep.ConfigError, match="positive integer"):
        validate_conversion(model, ep_size=bad, world_size=8)


def test_ep_without_distributed_says_how_to_launch() -> None:
    _, model = model_pair("tiny-mixtral")
    with pytest.raises(autoep.ConfigError, match=r"torch\.distributed"):
        autoep.convert(model, ep_size=2)
    assert not any(isinstance(m, autoep.MoELayer) for m in model.modules())  # nothing half-done


def test_unsupported_family_names_the_supported_ones_and_the_escape_hatch() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    )
    with pytest.raises(autoep.UnsupportedModelError) as err:
        autoep.convert(dense)
    message = str(err.value)
    for family in autoep.supported_families():
        assert family in message
    assert "register_family" in message


def test_unknown_moe_block_is_named() -> None:
    class ExoticMoe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.experts = nn.ModuleList([nn.Linear(4, 4)])

    model = nn.Sequential(ExoticMoe())
    with pytest.raises(autoep.UnsupportedModelError, match="ExoticMoe"):
        autoep.convert(model)


def test_converting_twice_is_refused() -> None:
    _, model = model_pair("tiny-qwen3-moe")
    autoep.convert(model)
    with pytest.raises(autoep.AlreadyConvertedError, match="already converted"):
        autoep.convert(model)


def test_supported_families() -> None:
    assert autoep.supported_families() == sorted(
        [
            "mixtral",
            "qwen2_moe",
            "qwen3_moe",
            "deepseek_v2",
            "deepseek_v3",
            "olmoe",
            "gpt_oss",
            "glm4_moe",
            "llama4",
            "dbrx",
            "longcat_flash",
        ]
    )


def test_errors_are_value_errors_with_one_base() -> None:
    assert issubclass(autoep.ConfigError, autoep.AutoEPError)
    assert issubclass(autoep.AutoEPError, ValueError)
    assert torch.nn is not None
