"""Candidate parallel layouts of a job: (ep, tp, ZeRO stage, micro-batch, activation checkpointing).

Only layouts autoep accepts for the model are produced: ``ep`` divides the
routed experts and the world, ``tp`` divides the world and the dimensions the
model's tensor-parallel plan splits (checked by autoep's own validation).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from torch import nn

from autoep.config import AutoEPConfig
from autoep.errors import AutoEPError

DEFAULT_ZERO = (1, 3)  # ZeRO-2 is ZeRO-1 in autoep (docs/training.md); 0 only on request
MAX_TP = 8  # tensor parallelism stays inside one node


@dataclass(frozen=True, order=True)
class Layout:
    """One way to run the job on ``gpus`` GPUs."""

    gpus: int
    ep: int
    tp: int = 1
    zero: int = 3
    micro_batch: int = 1
    activation_checkpointing: bool = False
    grad_accum: int = 1
    bf16: bool = True

    @property
    def dp(self) -> int:
        return self.gpus // self.tp

    @property
    def edp(self) -> int:
        return self.gpus // self.ep

    def config(self) -> AutoEPConfig:
        """The :class:`AutoEPConfig` a training run with this layout uses."""
        mp = {"param_dtype": "bfloat16", "reduce_dtype": "float32"} if self.bf16 else {}
        return AutoEPConfig.create(
            ep_size=self.ep,
            tp_size=self.tp,
            zero_stage=self.zero,
            micro_batch_size=self.micro_batch,
            activation_checkpointing=self.activation_checkpointing,
            gradient_accumulation_steps=self.grad_accum,
            mixed_precision=mp,
        )

    def label(self) -> str:
        ac = " ac" if self.activation_checkpointing else ""
        tp = f" tp{self.tp}" if self.tp > 1 else ""
        return f"ep{self.ep}{tp} z{self.zero} mb{self.micro_batch}{ac}"

    def as_dict(self) -> dict:
        return asdict(self)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def valid_ep_sizes(num_experts: int, gpus: int) -> list[int]:
    return [d for d in divisors(gpus) if num_experts % d == 0]


def valid_tp_sizes(model: nn.Module, gpus: int, max_tp: int = MAX_TP) -> list[int]:
    """tp sizes the model's tensor-parallel plan accepts (rank-local check, meta model is fine)."""
    from autoep.parallel.tensor_parallel import validate_tensor_parallel

    sizes = []
    for tp in divisors(gpus):
        if tp > max_tp:
            break
        try:
            validate_tensor_parallel(model, tp)
        except AutoEPError:
            continue
        sizes.append(tp)
    return sizes


def enumerate_layouts(
    gpus: int,
    num_experts: int,
    tp_sizes: Iterable[int],
    *,
    ep: Sequence[int] | None = None,
    tp: Sequence[int] | None = None,
    zero: Sequence[int] | None = None,
    micro_batch: Sequence[int] = (1,),
    activation_checkpointing: Sequence[bool] = (False, True),
    bf16: bool = True,
) -> list[Layout]:
    """Every valid combination, with each given sequence fixing that dimension."""
    eps = valid_ep_sizes(num_experts, gpus)
    if ep is not None:
        bad = [e for e in ep if e not in eps]
        if bad:
            raise AutoEPError(f"ep {bad} does not divide both the {num_experts} experts and {gpus} GPUs; valid: {eps}")
        eps = list(ep)
    tps = list(tp_sizes)
    if tp is not None:
        bad = [t for t in tp if t not in tps and t != 1]
        if bad:
            raise AutoEPError(f"tp {bad} is not valid for this model on {gpus} GPUs; valid: {tps}")
        tps = list(tp)
    zeros = list(zero) if zero is not None else list(DEFAULT_ZERO)
    return [
        Layout(gpus, e, t, z, b, a, 1, bf16)
        for e in eps
        for t in tps
        for z in zeros
        for b in micro_batch
        for a in activation_checkpointing
    ]
