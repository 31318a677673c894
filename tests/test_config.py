"""AutoEPConfig: validation, DeepSpeed import, layout checks."""

from __future__ import annotations

import json
import warnings

import pytest

import autoep
from autoep.config import AutoEPWarning


def test_defaults_are_a_valid_single_rank_job() -> None:
    config = autoep.AutoEPConfig()
    assert (config.ep_size, config.tp_size, config.zero_stage) == (1, 1, 0)
    assert config.parallel_dims(1).dp == 1


def test_from_deepspeed_maps_every_documented_key(tmp_path) -> None:
    ds = {
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}},
        "expert_parallel": {"enabled": True, "autoep_size": 4},
        "tensor_parallel": {"autotp_size": 1},
        "bf16": {"enabled": True},
        "gradient_accumulation_steps": 8,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95], "weight_decay": 0.1}},
        "train_micro_batch_size_per_gpu": 2,
        "activation_checkpointing": {"partition_activations": False},
        "seed": 7,
    }
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key above is understood: no warning
        config = autoep.AutoEPConfig.from_deepspeed(path)
    assert config.zero_stage == 3 and config.cpu_offload
    assert config.ep_size == 4 and config.tp_size == 1
    assert config.mixed_precision.param_dtype == "bfloat16" and config.mixed_precision.reduce_dtype == "float32"
    assert (config.gradient_accumulation_steps, config.gradient_clipping, config.micro_batch_size) == (8, 1.0, 2)
    assert config.optimizer.type == "AdamW" and config.optimizer.params["lr"] == 3e-4
    assert config.activation_checkpointing and config.seed == 7


def test_expert_parallel_disabled_means_ep1() -> None:
    config = autoep.AutoEPConfig.from_deepspeed({"expert_parallel": {"enabled": False, "autoep_size": 4}})
    assert config.ep_size == 1


def test_unknown_keys_give_one_warning_listing_them() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        autoep.AutoEPConfig.from_deepspeed(
            {"zero_optimization": {"stage": 1, "overlap_comm": True}, "steps_per_print": 10, "wall_clock_breakdown": 0}
        )
    ours = [w for w in caught if issubclass(w.category, AutoEPWarning)]
    assert len(ours) == 1
    message = str(ours[0].message)
    for key in ("steps_per_print", "wall_clock_breakdown", "zero_optimization.overlap_comm"):
        assert key in message


@pytest.mark.parametrize(
    ("ds", "expected"),
    [
        ({"zero_optimization": {"stage": 4}}, "zero_stage"),
        ({"expert_parallel": {"enabled": True, "autoep_size": 0}}, "ep_size"),
        ({"tensor_parallel": {"autotp_size": 0}}, "tp_size"),
        ({"optimizer": {"type": "SGD"}}, "optimizer.type"),
        ({"optimizer": {"type": "AdamW", "params": {"lr": -1}}}, "lr must be > 0"),
        ({"optimizer": {"type": "AdamW", "params": {"momentum": 0.9}}}, "unknown AdamW parameter"),
        ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps"),
        ({"fp16": {"enabled": True}}, "fp16"),
    ],
)
def test_invalid_values_raise_one_line_config_errors(ds, expected) -> None:
    with pytest.raises(autoep.ConfigError) as err:
        autoep.AutoEPConfig.from_deepspeed(ds)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_unreadable_files_are_config_errors(tmp_path) -> None:
    with pytest.raises(autoep.ConfigError, match="does not exist"):
        autoep.AutoEPConfig.from_deepspeed(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(autoep.ConfigError, match="not valid JSON"):
        autoep.AutoEPConfig.from_deepspeed(bad)


def test_layout_must_fit_the_world() -> None:
    config = autoep.AutoEPConfig(ep_size=4)
    dims = config.parallel_dims(8)
    assert (dims.dp, dims.edp, dims.ep) == (8, 2, 4)
    with pytest.raises(autoep.ConfigError, match=r"does not divide the world size 6"):
        config.parallel_dims(6)


def test_clipping_zero_means_off() -> None:
    assert autoep.AutoEPConfig(gradient_clipping=0).gradient_clipping is None
