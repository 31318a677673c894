"""Trainer options that conflict with autoep are refused before any collective, with what to use instead.

No process group exists in this process: an error raised here was raised
before any rank could wait on another. The same function of the arguments
runs on every rank, so every rank raises it.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import transformers

import autoep
import autoep.hf
from autoep.errors import ConfigError
from autoep.hf.arguments import take_over, trainer_config
from autoep.models.tiny import build_tiny_model


def _args(tmp_path, **fields):
    return transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **fields)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"deepspeed": {"zero_optimization": {"stage": 3}}}, "AutoEPConfig.from_deepspeed"),
        ({"fsdp": ["full_shard"]}, "zero_stage"),
        ({"fp16": True}, "use bf16"),
        ({"optim": "adafactor"}, "AdamW or Muon"),
        ({"ddp_find_unused_parameters": True}, "does not use DDP"),
        ({"ddp_bucket_cap_mb": 25}, "does not use DDP"),
        ({"bf16_full_eval": True}, "bf16_full_eval"),
    ],
)
def test_conflicting_trainer_options_are_refused(tmp_path, fields, message):
    args = _args(tmp_path)
    for name, value in fields.items():  # set after construction: transformers checks some (deepspeed, fsdp)
        setattr(args, name, value)  # against installed packages and devices, which is not what is tested
    with pytest.raises(ConfigError, match=message):
        autoep.hf.Trainer(model=build_tiny_model("tiny-mixtral"), args=args, autoep_config=autoep.AutoEPConfig())
    assert not dist.is_initialized()


def test_device_map_models_are_refused(tmp_path):
    model = build_tiny_model("tiny-mixtral")
    model.hf_device_map = {"": "cpu"}
    with pytest.raises(ConfigError, match="device_map"):
        autoep.hf.Trainer(model=model, args=_args(tmp_path), autoep_config=autoep.AutoEPConfig())


@pytest.mark.parametrize(
    ("config", "fields", "message"),
    [
        ({"gradient_accumulation_steps": 4}, {"gradient_accumulation_steps": 2}, "set gradient_accumulation_steps"),
        ({"micro_batch_size": 4}, {"per_device_train_batch_size": 2}, "set per_device_train_batch_size"),
        ({"gradient_clipping": 0.5}, {"max_grad_norm": 1.0}, "set max_grad_norm"),
        ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}}, {}, "learning_rate"),
    ],
)
def test_the_same_setting_in_both_places_must_agree(tmp_path, config, fields, message):
    with pytest.raises(ConfigError, match=message):
        autoep.hf.Trainer(
            model=build_tiny_model("tiny-mixtral"),
            args=_args(tmp_path, **fields),
            autoep_config=autoep.AutoEPConfig(**config),
        )


def test_missing_pieces_are_named(tmp_path):
    with pytest.raises(ConfigError, match="autoep_config"):
        autoep.hf.Trainer(model=build_tiny_model("tiny-mixtral"), args=_args(tmp_path))
    with pytest.raises(ConfigError, match="TrainingArguments"):
        autoep.hf.Trainer(model=build_tiny_model("tiny-mixtral"), autoep_config=autoep.AutoEPConfig())


def test_trainer_settings_flow_into_the_autoep_config(tmp_path):
    args = _args(
        tmp_path,
        learning_rate=2e-4,
        weight_decay=0.1,
        adam_beta1=0.8,
        adam_beta2=0.9,
        adam_epsilon=1e-6,
        per_device_train_batch_size=3,
        gradient_accumulation_steps=2,
        max_grad_norm=0.7,
        bf16=True,
        gradient_checkpointing=True,
    )
    config = trainer_config(args, autoep.AutoEPConfig(ep_size=2, zero_stage=3))
    assert config.optimizer.params == {"lr": 2e-4, "weight_decay": 0.1, "betas": (0.8, 0.9), "eps": 1e-6}
    assert (config.micro_batch_size, config.gradient_accumulation_steps, config.gradient_clipping) == (3, 2, 0.7)
    assert config.mixed_precision.param_dtype == "bfloat16" and config.activation_checkpointing
    assert (config.ep_size, config.zero_stage) == (2, 3)
    muon = trainer_config(args, autoep.AutoEPConfig(optimizer={"type": "Muon", "params": {"momentum": 0.9}}))
    assert muon.optimizer.params["momentum"] == 0.9 and muon.optimizer.params["lr"] == 2e-4
    assert muon.optimizer.params["adamw_betas"] == (0.8, 0.9)
    take_over(args)  # autoep applies activation checkpointing before sharding; Trainer must not again
    assert not args.activation_checkpointing


def test_torch_lr_schedulers_drive_autoep_optimizers():
    model = build_tiny_model("tiny-mixtral")
    optimizer = autoep.build_optimizer(model, autoep.AutoEPConfig(optimizer={"type": "Muon"}))
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    before = [g["lr"] for g in optimizer.param_groups]
    optimizer.step()
    schedule.step()
    assert [g["lr"] for g in optimizer.param_groups] == [lr / 2 for lr in before]


@pytest.mark.parametrize(
    ("precision", "config", "message"),
    [
        ("fp16", {}, "not supported"),
        ("bf16", {}, "does not reach an autoep model"),
        ("bf16", {"mixed_precision": {"param_dtype": "bfloat16"}}, None),
    ],
)
def test_accelerator_settings_that_would_be_skipped_are_refused(precision, config, message):
    """accelerate's prepare() leaves an autoep model alone, so its own mixed precision would silently not apply."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from autoep.parallelize import validate

    Accelerator(mixed_precision=precision, cpu=True)
    try:
        model, config = build_tiny_model("tiny-mixtral"), autoep.AutoEPConfig(**config)
        if message is None:
            validate(model, config, world_size=1)
        else:
            with pytest.raises(ConfigError, match=message):
                validate(model, config, world_size=1)
    finally:
        AcceleratorState._reset_state(True)
    assert not dist.is_initialized()
