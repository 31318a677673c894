"""`AutoEPConfig`: the validated description of a training job's parallel layout and recipe.

Build it directly, from a DeepSpeed-style JSON (`AutoEPConfig.from_deepspeed`),
or through `autoep train` flags. Everything is checked before the first
collective, identically on every rank: a bad value raises `ConfigError` with
a one-line message.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from autoep.errors import ConfigError
from autoep.moe.balance import BalanceConfig

DType = Literal["float32", "bfloat16"]
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def torch_dtype(name: DType) -> torch.dtype:
    """The torch dtype a configuration's dtype name stands for."""
    return _TORCH_DTYPES[name]


class AutoEPWarning(UserWarning):
    """A configuration was accepted but part of it is ignored."""


class MixedPrecisionConfig(BaseModel):
    """Compute dtype of parameters in forward/backward, and dtype of gradient reductions."""

    model_config = ConfigDict(extra="forbid")
    param_dtype: DType = "float32"
    reduce_dtype: DType = "float32"


_ADAMW_PARAMS = {"lr", "betas", "eps", "weight_decay"}
_MUON_PARAMS = {
    "lr",
    "momentum",
    "nesterov",
    "weight_decay",
    "ns_steps",
    "ns_method",
    "ns_dtype",
    "update_scale",
    "adamw_lr",
    "adamw_betas",
    "adamw_eps",
    "adamw_weight_decay",
    "adamw_params",
}


class OptimizerConfig(BaseModel):
    """Optimizer type and its keyword arguments.

    AdamW: ``lr``, ``betas``, ``eps``, ``weight_decay``. Muon: ``lr``,
    ``momentum``, ``nesterov``, ``weight_decay``, ``ns_steps``, ``ns_method``
    (``standard``/``gram``), ``ns_dtype`` (``float32``/``bfloat16``),
    ``update_scale`` (``moonlight``/``spectral``/``none``), and for the AdamW
    part ``adamw_lr``, ``adamw_betas``, ``adamw_eps``, ``adamw_weight_decay``,
    ``adamw_params`` (extra name globs sent to AdamW).
    """

    model_config = ConfigDict(extra="forbid")
    type: Literal["AdamW", "Muon"] = "AdamW"
    params: dict[str, Any] = Field(default_factory=lambda: {"lr": 1e-3, "betas": (0.9, 0.95), "weight_decay": 0.0})

    @field_validator("type", mode="before")
    @classmethod
    def _normalise_type(cls, value: Any) -> Any:
        if isinstance(value, str) and value.lower() in ("adamw", "adam"):
            return "AdamW"
        if isinstance(value, str) and value.lower() == "muon":
            return "Muon"
        return value

    @model_validator(mode="after")
    def _check_params(self) -> OptimizerConfig:
        if self.type == "Muon" and "params" not in self.model_fields_set:
            self.__dict__["params"] = {}  # the default params are AdamW's; Muon has its own defaults
        allowed = _MUON_PARAMS if self.type == "Muon" else _ADAMW_PARAMS
        unknown = sorted(set(self.params) - allowed)
        if unknown:
            raise ValueError(f"unknown {self.type} parameter(s) {unknown}; known: {sorted(allowed)}")
        for key in ("lr", "adamw_lr"):
            if key in self.params and not float(self.params[key]) > 0:
                raise ValueError(f"{key} must be > 0, got {self.params[key]}")
        choices = {"ns_method": ("standard", "gram"), "ns_dtype": ("float32", "bfloat16")}
        choices["update_scale"] = ("moonlight", "spectral", "none")
        for key, options in choices.items():
            if key in self.params and self.params[key] not in options:
                raise ValueError(f"{key} must be one of {list(options)}, got {self.params[key]!r}")
        return self


@dataclass(frozen=True)
class ParallelDims:
    """The two views of the same W ranks (DESIGN.md): dense W = tp x dp, experts W = ep x edp."""

    world: int
    ep: int
    tp: int = 1

    @property
    def dp(self) -> int:
        return self.world // self.tp

    @property
    def edp(self) -> int:
        return self.world // self.ep


class AutoEPConfig(BaseModel):
    """Parallel layout (``ep_size``, ``tp_size``, ``zero_stage``) and training recipe of a job.

    ZeRO stages (docs/training.md): 0 replicates everything and all-reduces
    gradients; 1 splits optimizer state, 2 also gradients; 3 also shards
    parameters, re-gathered per layer. ``zero_backend`` says how 0-2 run when
    parameters compute in their own dtype: ``"replicated"`` keeps parameters
    whole and reduces gradients in buckets, each rank updating the parameters
    it owns (ZeRO 1/2, as DeepSpeed does); ``"fsdp"`` uses FSDP2 for every
    stage, so ZeRO 1/2 parameters are sharded between steps and gathered from
    forward to backward (less memory at rest, one gather per layer per step).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    ep_size: int = Field(1, ge=1)
    tp_size: int = Field(1, ge=1)
    zero_stage: Literal[0, 1, 2, 3] = 0
    mixed_precision: MixedPrecisionConfig = Field(default_factory=MixedPrecisionConfig)
    cpu_offload: bool = False
    zero_backend: Literal["replicated", "fsdp"] = "replicated"
    activation_checkpointing: bool = False
    recompute_expert_activation: bool = False  # keep only the experts' gate/up output for backward
    gradient_accumulation_steps: int = Field(1, ge=1)
    gradient_clipping: float | None = Field(None, ge=0)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    micro_batch_size: int = Field(1, ge=1)
    seed: int = 0
    load_balancing: BalanceConfig = Field(default_factory=BalanceConfig)

    @field_validator("gradient_clipping")
    @classmethod
    def _zero_means_off(cls, value: float | None) -> float | None:
        return None if value == 0 else value

    @classmethod
    def create(cls, **fields: Any) -> AutoEPConfig:
        """Like the constructor, but a bad value raises a one-line :class:`ConfigError`."""
        try:
            return cls(**fields)
        except ValidationError as err:
            raise ConfigError(format_validation_error(err)) from None

    def parallel_dims(self, world_size: int) -> ParallelDims:
        """The layout on ``world_size`` ranks; raises :class:`ConfigError` if it does not fit."""
        if world_size % self.ep_size:
            raise ConfigError(
                f"ep_size={self.ep_size} does not divide the world size {world_size}; "
                f"use an ep_size among {[n for n in range(1, world_size + 1) if world_size % n == 0]}"
            )
        if world_size % self.tp_size:
            raise ConfigError(f"tp_size={self.tp_size} does not divide the world size {world_size}")
        return ParallelDims(world=world_size, ep=self.ep_size, tp=self.tp_size)

    @classmethod
    def from_deepspeed(cls, source: dict[str, Any] | str | Path, **overrides: Any) -> AutoEPConfig:
        """Read a DeepSpeed-style config (a dict or a JSON file).

        Understood: ``zero_optimization.stage`` (and ``offload_param`` /
        ``offload_optimizer`` with ``device: cpu``), ``expert_parallel.{enabled,
        autoep_size}``, ``tensor_parallel.autotp_size``, ``bf16.enabled``,
        ``gradient_accumulation_steps``, ``gradient_clipping``,
        ``optimizer.{type, params}``, ``train_micro_batch_size_per_gpu``,
        ``activation_checkpointing``, ``seed`` and autoep's own ``load_balancing``
        section (the fields of :class:`BalanceConfig`). Every other key is listed in
        one :class:`AutoEPWarning` and ignored. ``overrides`` win over the file.
        """
        raw = _load_json(source)
        fields, unknown = _fields_from_deepspeed(raw)
        if unknown:
            warnings.warn(
                f"autoep ignores these DeepSpeed config keys: {', '.join(unknown)}", AutoEPWarning, stacklevel=2
            )
        return cls.create(**{**fields, **overrides})


def format_validation_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "config"
        message = e["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message} (got {e.get('input')!r})" if "input" in e else f"{where}: {message}")
    return "invalid autoep config: " + "; ".join(parts)


def _load_json(source: dict[str, Any] | str | Path) -> dict[str, Any]:
    if isinstance(source, dict):
        return source
    path = Path(source)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"DeepSpeed config {str(path)!r} does not exist") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"DeepSpeed config {str(path)!r} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"DeepSpeed config {str(path)!r} must hold a JSON object")
    return data


_SECTION_KEYS = {
    "zero_optimization": {"stage", "offload_param", "offload_optimizer"},
    "expert_parallel": {"enabled", "autoep_size"},
    "tensor_parallel": {"autotp_size"},
    "bf16": {"enabled"},
    "fp16": {"enabled"},
    "optimizer": {"type", "params"},
}
_TOP_LEVEL_KEYS = {
    "gradient_accumulation_steps",
    "gradient_clipping",
    "train_micro_batch_size_per_gpu",
    "activation_checkpointing",
    "seed",
    "load_balancing",
}


def _fields_from_deepspeed(raw: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    unknown = [k for k in raw if k not in _SECTION_KEYS and k not in _TOP_LEVEL_KEYS]
    for section, keys in _SECTION_KEYS.items():
        value = raw.get(section)
        if isinstance(value, dict):
            unknown += [f"{section}.{k}" for k in value if k not in keys]
    fields: dict[str, Any] = {}
    zero = raw.get("zero_optimization") or {}
    if "stage" in zero:
        fields["zero_stage"] = zero["stage"]
    if any((zero.get(k) or {}).get("device") == "cpu" for k in ("offload_param", "offload_optimizer")):
        fields["cpu_offload"] = True
    ep = raw.get("expert_parallel") or {}
    if ep.get("enabled", "autoep_size" in ep):
        fields["ep_size"] = ep.get("autoep_size", 1)
    tp = raw.get("tensor_parallel") or {}
    if "autotp_size" in tp:
        fields["tp_size"] = tp["autotp_size"]
    if (raw.get("fp16") or {}).get("enabled"):
        raise ConfigError('fp16 training is not supported; use bf16 ("bf16": {"enabled": true})')
    if (raw.get("bf16") or {}).get("enabled"):
        fields["mixed_precision"] = {"param_dtype": "bfloat16", "reduce_dtype": "float32"}
    for ds_key, key in [
        ("gradient_accumulation_steps", "gradient_accumulation_steps"),
        ("gradient_clipping", "gradient_clipping"),
        ("train_micro_batch_size_per_gpu", "micro_batch_size"),
        ("seed", "seed"),
    ]:
        if ds_key in raw:
            fields[key] = raw[ds_key]
    if "load_balancing" in raw:  # autoep's own section (see docs/load-balancing.md)
        fields["load_balancing"] = raw["load_balancing"]
    if raw.get("activation_checkpointing"):
        fields["activation_checkpointing"] = True
    if "optimizer" in raw:
        opt = raw["optimizer"] or {}
        fields["optimizer"] = {"type": opt.get("type", "AdamW"), "params": dict(opt.get("params") or {})}
    return fields, unknown
