"""`autoep.plan`: which layouts of a job fit on N GPUs, and what each costs in memory and network.

For every candidate layout the planner simulates a training step of the
converted, parallelized model in a fake world of N ranks (rank 0, which also
holds the busiest expert when routing is imbalanced) and reports its peak
memory per GPU by component and its collective bytes. Layouts whose model
states alone (from shapes) exceed the GPU memory are not simulated.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from autoep.config import AutoEPConfig
from autoep.errors import ConfigError
from autoep.plan.layouts import Layout, enumerate_layouts, valid_tp_sizes
from autoep.plan.memory import MemoryBreakdown
from autoep.plan.routing import PlannedRouting
from autoep.plan.scale import ScalePlan, Vector, builders, extrapolate, scale_plan
from autoep.plan.simulate import simulate_step

GiB = 1024**3
DEFAULT_IMBALANCE = 2.0


def parse_memory(value: str | int | float) -> int:
    """``80GiB``, ``80GB``, ``141 GiB``, ``8e10`` -> bytes."""
    if isinstance(value, (int, float)):
        return int(value)
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]i?B?|B)?\s*", value)
    if not match:
        raise ConfigError(f"cannot read a memory size from {value!r} (e.g. 80GiB, 141GB)")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    powers = {"K": 1, "M": 2, "G": 3, "T": 4}
    if unit == "B":
        return int(number)
    base = 1024 if "I" in unit else 1000
    return int(number * base ** powers[unit[0]])


@dataclass
class LayoutPlan:
    """One layout's simulated step on one GPU (bytes)."""

    layout: Layout
    seq_len: int
    gpu_memory: int
    balanced: MemoryBreakdown | None = None  # peak at balanced routing
    busiest: MemoryBreakdown | None = None  # peak on the busiest expert's rank at the imbalance factor
    comm: dict[str, int] = field(default_factory=dict)  # bytes per collective kind, balanced
    busiest_all_to_all: int = 0
    simulated: str = ""
    seconds: float = 0.0
    skipped: str | None = None  # why it was not simulated

    @property
    def peak(self) -> int:
        """The planning figure: the busiest rank's peak (or the lower bound of a skipped layout)."""
        worst = self.busiest or self.balanced
        return worst.total if worst is not None else 0

    @property
    def fits(self) -> bool:
        return self.skipped is None and self.peak <= self.gpu_memory

    @property
    def tokens_per_gpu(self) -> float:
        lay = self.layout
        return lay.micro_batch * self.seq_len * lay.grad_accum / lay.tp

    @property
    def all_to_all(self) -> int:
        return self.comm.get("all_to_all", 0)

    @property
    def dense_comm(self) -> int:
        return sum(v for k, v in self.comm.items() if k != "all_to_all")

    @property
    def comm_per_token(self) -> float:
        return (self.all_to_all + self.dense_comm) / self.tokens_per_gpu

    def as_dict(self) -> dict[str, Any]:
        return {
            "layout": self.layout.as_dict(),
            "label": self.layout.label(),
            "seq_len": self.seq_len,
            "fits": self.fits,
            "peak_bytes": self.peak,
            "balanced": self.balanced.as_dict() if self.balanced else None,
            "busiest": self.busiest.as_dict() if self.busiest else None,
            "comm_bytes": dict(self.comm),
            "busiest_all_to_all_bytes": self.busiest_all_to_all,
            "comm_bytes_per_token": round(self.comm_per_token, 1) if self.skipped is None else None,
            "simulated": self.simulated,
            "seconds": round(self.seconds, 2),
            "skipped": self.skipped,
        }


@dataclass
class PlanResult:
    """Every layout considered, for one model on ``gpus`` GPUs of ``gpu_memory`` bytes."""

    model: str
    gpus: int
    gpu_memory: int
    total_params: int
    imbalance: float
    layouts: list[LayoutPlan]

    def ranked(self) -> list[LayoutPlan]:
        """Layouts that fit, least communication per token first."""
        return sorted((p for p in self.layouts if p.fits), key=lambda p: (p.comm_per_token, p.peak))

    def as_dict(self) -> dict[str, Any]:
        ranked = self.ranked()
        return {
            "model": self.model,
            "gpus": self.gpus,
            "gpu_memory_bytes": self.gpu_memory,
            "total_params": self.total_params,
            "imbalance": self.imbalance,
            "best": ranked[0].layout.label() if ranked else None,
            "layouts": [p.as_dict() for p in self.layouts],
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)


def load_plan_config(model: Any):
    """A transformers config from MODEL: a config object, a built-in name, a directory or a config.json."""
    if not isinstance(model, (str, Path)):
        return model
    path = Path(model)
    if path.suffix == ".json" and path.is_file():
        from transformers import AutoConfig

        data = json.loads(path.read_text())
        if "model_type" not in data:
            raise ConfigError(f"{str(path)!r} has no model_type: not a Hugging Face config.json")
        return AutoConfig.for_model(**data)
    from autoep.models.loading import load_config

    return load_config(str(model))


def _meta_model(config) -> nn.Module:
    from autoep.plan.models import build_meta

    return build_meta(config)


def _state_bytes_lower_bound(expert_params: int, dense_params: int, layout: Layout) -> int:
    """Parameters, gradients and AdamW state (fp32: 16 bytes a parameter), sharded as ZeRO shards them."""
    per_param = 16
    dense = dense_params / layout.tp
    experts = expert_params / layout.ep
    if layout.zero >= 1:
        dense, experts = dense / layout.dp, experts / layout.edp
    return int((dense + experts) * per_param)


def _param_split(model: nn.Module) -> tuple[int, int]:
    """(routed expert parameters, all other parameters) of an unconverted meta model."""
    from autoep.convert import find_convertible_blocks

    described, _ = find_convertible_blocks(model)
    expert_ids: set[int] = set()
    for _, block, spec in described:
        experts = block.get_submodule(getattr(spec, "experts_name", "experts"))
        expert_ids.update(id(p) for p in experts.parameters())
    experts = sum(p.numel() for p in model.parameters() if id(p) in expert_ids)
    return experts, sum(p.numel() for p in model.parameters()) - experts


def simulate_layout(
    model: nn.Module,
    layout: Layout,
    seq_len: int,
    gpu_memory: int,
    *,
    imbalance: float = DEFAULT_IMBALANCE,
    scale: ScalePlan | None = None,
) -> LayoutPlan:
    """Simulate ``layout`` for the meta ``model`` (balanced, then at ``imbalance`` on expert 0's rank)."""
    scale = scale or scale_plan(model)
    factories = builders(model, scale)
    start = time.perf_counter()
    result = LayoutPlan(layout, seq_len, gpu_memory, simulated=scale.describe())
    routings = [PlannedRouting(1.0)] + ([PlannedRouting(imbalance)] if imbalance != 1.0 and layout.ep >= 1 else [])
    for index, routing in enumerate(routings):
        runs = [simulate_step(build, layout, seq_len, lambda _i, r=routing: r) for build in factories]
        peak = extrapolate([r.peak for r in runs], scale)
        comm = extrapolate([Vector(r.comm.as_dict()) for r in runs], scale)
        if index == 0:
            result.balanced, result.comm = peak, dict(comm)
        else:
            result.busiest, result.busiest_all_to_all = peak, comm.get("all_to_all", 0)
    result.seconds = time.perf_counter() - start
    return result


def plan(
    model: Any,
    gpus: int,
    *,
    gpu_memory: str | int = "80GiB",
    seq_len: int = 4096,
    micro_batch: tuple[int, ...] = (1,),
    ep: tuple[int, ...] | None = None,
    tp: tuple[int, ...] | None = None,
    zero: tuple[int, ...] | None = None,
    activation_checkpointing: tuple[bool, ...] = (False, True),
    bf16: bool = True,
    imbalance: float = DEFAULT_IMBALANCE,
    full: bool | None = None,
) -> PlanResult:
    """Simulate every candidate layout of ``model`` on ``gpus`` GPUs; see :class:`PlanResult`.

    ``model``: a built-in name, a local HF directory, a config.json path or a
    transformers config (no weights are read). Each tuple fixes that dimension
    of the search; unset ones take every valid value. ``full`` simulates every
    layer instead of representative ones (default: only for shallow models).
    """
    if gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {gpus}")
    config = load_plan_config(model)
    meta = _meta_model(config)
    memory = parse_memory(gpu_memory)
    expert_params, dense_params = _param_split(meta)
    num_experts = _num_experts(meta)
    layouts = enumerate_layouts(
        gpus,
        num_experts,
        valid_tp_sizes(meta, gpus),
        ep=ep,
        tp=tp,
        zero=zero,
        micro_batch=micro_batch,
        activation_checkpointing=activation_checkpointing,
        bf16=bf16,
    )
    scale = scale_plan(meta, full)
    results = []
    for layout in layouts:
        bound = _state_bytes_lower_bound(expert_params, dense_params, layout)
        if bound > memory:
            skipped = LayoutPlan(layout, seq_len, memory, simulated="not simulated")
            skipped.skipped = f"model states alone need >= {bound / GiB:.1f} GiB"
            results.append(skipped)
            continue
        results.append(simulate_layout(meta, layout, seq_len, memory, imbalance=imbalance, scale=scale))
    name = model if isinstance(model, (str, Path)) else getattr(config, "model_type", "model")
    return PlanResult(str(name), gpus, memory, expert_params + dense_params, imbalance, results)


def _num_experts(model: nn.Module) -> int:
    from autoep.convert import find_convertible_blocks

    described, _ = find_convertible_blocks(model)
    if not described:
        raise ConfigError(f"{type(model).__name__} has no MoE block autoep converts")
    return math.gcd(*[spec.num_experts for _, _, spec in described])


def _size(nbytes: float) -> str:
    """GiB, or MiB below 1 GiB (tiny models), with one decimal."""
    return f"{nbytes / GiB:.1f} GiB" if nbytes >= GiB else f"{nbytes / 2**20:.1f} MiB"


def check_layout(model: Any, config: AutoEPConfig, world_size: int, gpu_memory: str | int, seq_len: int) -> LayoutPlan:
    """Simulate the job's own layout; raise :class:`ConfigError` with the numbers if it will not fit.

    For a trainer's start-up, before any weights are loaded (run it on one
    process before launching workers: it initialises a fake process group).
    """
    layout = Layout(
        gpus=world_size,
        ep=config.ep_size,
        tp=config.tp_size,
        zero=config.zero_stage,
        micro_batch=config.micro_batch_size,
        activation_checkpointing=config.activation_checkpointing,
        grad_accum=config.gradient_accumulation_steps,
        bf16=config.mixed_precision.param_dtype == "bfloat16",
    )
    meta = _meta_model(load_plan_config(model))
    result = simulate_layout(meta, layout, seq_len, parse_memory(gpu_memory))
    if not result.fits:
        worst = result.busiest or result.balanced
        parts = ", ".join(f"{k} {_size(v)}" for k, v in worst.as_dict().items() if k != "total")
        raise ConfigError(
            f"layout {layout.label()} on {world_size} GPUs needs {_size(result.peak)} per GPU at peak "
            f"({parts}; seq_len {seq_len}, expert imbalance {DEFAULT_IMBALANCE}x) but a GPU has "
            f"{_size(result.gpu_memory)}; run `autoep plan` to find a layout that fits"
        )
    return result
