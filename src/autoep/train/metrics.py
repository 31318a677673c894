"""Step metrics: expert load across ranks, JSONL logging, and the progress display."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.distributed as dist
from torch import nn

from autoep.moe.layer import MoELayer


@torch.no_grad()
def expert_load(model: nn.Module) -> torch.Tensor:
    """``[layers, E]`` routed (token, expert) pairs of the last forward, summed over all ranks.

    Each assignment is processed by exactly one rank, so one all-reduce of the
    locally placed counts gives the global per-expert load.
    """
    layers = [m for m in model.modules() if isinstance(m, MoELayer) and m.tokens_per_expert is not None]
    if not layers:
        return torch.zeros(0, 0)
    counts = torch.zeros(len(layers), layers[0].spec.num_experts, dtype=torch.float64)
    for row, layer in enumerate(layers):
        counts[row, layer.expert_start : layer.expert_end] = layer.tokens_per_expert.to("cpu", torch.float64)
    if dist.is_initialized():
        device = layers[0].tokens_per_expert.device
        counts = counts.to(device)
        dist.all_reduce(counts)
        counts = counts.cpu()
    return counts


def imbalance(counts_LE: torch.Tensor) -> float:
    """Worst layer's max/mean tokens per expert (1.0 is perfectly balanced)."""
    if counts_LE.numel() == 0:
        return 1.0
    mean = counts_LE.mean(dim=1).clamp(min=1e-9)
    return float((counts_LE.max(dim=1).values / mean).max())


class MetricsLog:
    """Append-only JSONL file of per-step records (rank 0 writes)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._file: TextIO | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class Progress:
    """A tqdm bar on a terminal; a plain line every ``log_every`` steps otherwise (logs, CI)."""

    def __init__(self, total: int, enabled: bool, log_every: int = 10, initial: int = 0) -> None:
        self.enabled = enabled
        self.log_every = log_every
        self.total = total
        self.bar = None
        self._printed = False
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="autoep train", unit="step", dynamic_ncols=True)

    def update(self, step: int, loss: float, tokens_per_s: float, load_imbalance: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", imbalance=f"{load_imbalance:.2f}")
            self.bar.update(1)
        elif step == 1 or step % self.log_every == 0 or step == self.total or not self._printed:
            self._printed = True
            print(
                f"step {step:>5}/{self.total}  loss {loss:.4f}  tok/s {tokens_per_s:,.0f}  "
                f"expert imbalance {load_imbalance:.2f}",
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
