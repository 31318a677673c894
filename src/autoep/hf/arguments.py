"""Reconcile transformers' ``TrainingArguments`` with an :class:`AutoEPConfig`, before any collective.

Trainer owns the schedule and the optimizer's hyperparameters (learning rate,
weight decay, betas, epsilon, warmup, scheduler), the batch size, gradient
accumulation and clipping threshold; autoep owns the parallel layout, the
optimizer's type (AdamW or Muon) and Muon's own settings. Options that would
make accelerate or Trainer distribute the model a second way are refused with
a one-line :class:`ConfigError` that names what to use instead. Everything
here reads plain fields only (no device or process-group setup), so every
rank raises the same error before any rank waits on another.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from autoep.config import AutoEPConfig
from autoep.errors import ConfigError

_TORCH_ADAMW = {"adamw_torch", "adamw_torch_fused"}

# (field, is it set, what to do instead)
_REFUSED: list[tuple[str, Any, str]] = [
    ("fsdp", lambda v: bool(v), "autoep shards with FSDP2 itself: use AutoEPConfig(zero_stage=...)"),
    ("deepspeed", lambda v: v is not None, "use AutoEPConfig (AutoEPConfig.from_deepspeed reads a DeepSpeed JSON)"),
    ("fp16", bool, "fp16 is not supported; use bf16=True (autoep's bf16 mixed precision)"),
    ("fp16_full_eval", bool, "fp16 is not supported; evaluate in the training precision"),
    ("bf16_full_eval", bool, "autoep evaluates with its own mixed precision; drop bf16_full_eval"),
    ("parallelism_config", lambda v: v is not None, "set ep_size / tp_size / zero_stage in AutoEPConfig"),
    ("ddp_find_unused_parameters", lambda v: v is not None, "autoep does not use DDP; drop the ddp_* options"),
    ("ddp_bucket_cap_mb", lambda v: v is not None, "autoep does not use DDP; drop the ddp_* options"),
    ("ddp_broadcast_buffers", lambda v: v is not None, "autoep does not use DDP; drop the ddp_* options"),
    ("ddp_static_graph", lambda v: v is not None, "autoep does not use DDP; drop the ddp_* options"),
]


def check_training_args(args: Any, config: AutoEPConfig, model: Any = None) -> None:
    """Raise :class:`ConfigError` for options that conflict with autoep (rank-local, no collectives)."""
    for name, is_set, instead in _REFUSED:
        if is_set(getattr(args, name, None)):
            raise ConfigError(f"TrainingArguments.{name} conflicts with autoep: {instead}")
    optim = str(getattr(getattr(args, "optim", None), "value", getattr(args, "optim", "")))
    if optim and optim not in _TORCH_ADAMW:
        raise ConfigError(
            f"TrainingArguments.optim={optim!r}: autoep builds the optimizer; choose AdamW or Muon with "
            "AutoEPConfig(optimizer={'type': ...}) and leave optim at its default"
        )
    if isinstance(model, nn.Module) and getattr(model, "hf_device_map", None):
        raise ConfigError("the model was loaded with a device_map: load it without one (autoep places every shard)")
    if model is not None and not isinstance(model, (str, os.PathLike, nn.Module)):
        raise ConfigError(f"model must be a path or an nn.Module, got {type(model).__name__}")
    fields = config.model_fields_set
    pairs = [
        ("gradient_accumulation_steps", "gradient_accumulation_steps", args.gradient_accumulation_steps),
        ("micro_batch_size", "per_device_train_batch_size", args.per_device_train_batch_size),
    ]
    for field, arg, value in pairs:
        if field in fields and getattr(config, field) != value:
            raise ConfigError(
                f"AutoEPConfig.{field}={getattr(config, field)} but TrainingArguments.{arg}={value}: "
                f"under Trainer, set {arg} only"
            )
    if "gradient_clipping" in fields and (config.gradient_clipping or 0.0) != (args.max_grad_norm or 0.0):
        raise ConfigError(
            f"AutoEPConfig.gradient_clipping={config.gradient_clipping} but TrainingArguments.max_grad_norm="
            f"{args.max_grad_norm}: under Trainer, set max_grad_norm only"
        )
    if "params" in config.optimizer.model_fields_set:
        owned = {"lr", "weight_decay", "betas", "eps"} & set(config.optimizer.params)
        if owned:
            raise ConfigError(
                f"AutoEPConfig.optimizer.params sets {sorted(owned)}: under Trainer these come from "
                "TrainingArguments (learning_rate, weight_decay, adam_beta1/adam_beta2, adam_epsilon)"
            )


def trainer_config(args: Any, config: AutoEPConfig) -> AutoEPConfig:
    """``config`` with Trainer's batch size, accumulation, clipping, precision and optimizer hyperparameters."""
    params = dict(config.optimizer.params) if "params" in config.optimizer.model_fields_set else {}
    if config.optimizer.type == "AdamW":
        params.update(
            lr=args.learning_rate,
            weight_decay=args.weight_decay,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
        )
    else:  # Muon: the AdamW part takes Trainer's AdamW settings unless Muon's own are given
        params.update(lr=args.learning_rate, weight_decay=args.weight_decay)
        params.setdefault("adamw_betas", (args.adam_beta1, args.adam_beta2))
        params.setdefault("adamw_eps", args.adam_epsilon)
        params.setdefault("adamw_weight_decay", args.weight_decay)
    update: dict[str, Any] = {
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "micro_batch_size": args.per_device_train_batch_size,
        "gradient_clipping": args.max_grad_norm or None,
        "optimizer": {"type": config.optimizer.type, "params": params},
    }
    if getattr(args, "activation_checkpointing", None) or getattr(args, "gradient_checkpointing", None):
        update["activation_checkpointing"] = True  # applied by autoep before sharding (see take_over)
    if getattr(args, "bf16", False):  # Trainer's bf16 means autoep's bf16 mixed precision
        update["mixed_precision"] = {"param_dtype": "bfloat16", "reduce_dtype": "float32"}
    return AutoEPConfig.create(**{**config.model_dump(), **update})


def take_over(args: Any) -> None:
    """Switch off what autoep now does in Trainer's place (activation checkpointing is applied by
    ``parallelize``, before sharding; Trainer would apply it again to the sharded model)."""
    for name in ("activation_checkpointing", "gradient_checkpointing"):
        if getattr(args, name, None):
            setattr(args, name, False)
