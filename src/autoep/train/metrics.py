"""Step metrics: the expert-load record, JSONL logging, and the progress display."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, TextIO

from torch import nn

from autoep.load_balance import StepLoadStats, expert_bias, moe_layers


def load_scalars(stats: StepLoadStats, capacity: bool) -> dict[str, float]:
    """The step's scalar load metrics: worst-layer imbalance, mean balancing losses, dropped fraction."""
    scalars = {"expert_imbalance": stats.imbalance, **stats.mean_losses()}
    if capacity:
        scalars["dropped_fraction"] = stats.dropped_fraction
    return scalars


def load_record(stats: StepLoadStats | None, model: nn.Module, capacity: bool) -> dict[str, Any]:
    """The expert-load part of a step's metrics record (see docs/load-balancing.md for the fields)."""
    if stats is None:
        return {}
    record: dict[str, Any] = {**load_scalars(stats, capacity), "expert_load": stats.routed_LE.long().tolist()}
    layers = {"imbalance": stats.imbalance_L.tolist()}
    layers.update({name: values.tolist() for name, values in stats.losses.items()})
    if capacity:
        record["expert_dropped"] = stats.dropped_LE.long().tolist()
        layers["dropped_fraction"] = stats.dropped_fraction_L.tolist()
    bias = expert_bias(model) if any(layer.balance.updates_bias for _, layer in moe_layers(model)) else None
    if bias is not None:
        record["expert_bias"] = bias.tolist()
    record["layers"] = layers
    return record


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

    def update(
        self, step: int, loss: float, tokens_per_s: float, load_imbalance: float, eval_loss: float | None = None
    ) -> None:
        """``eval_loss`` (given on evaluation steps) is shown with its perplexity, and always printed."""
        if not self.enabled:
            return
        if self.bar is not None:
            extra = {"eval_loss": f"{eval_loss:.4f}"} if eval_loss is not None else {}
            self.bar.set_postfix(
                loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", imbalance=f"{load_imbalance:.2f}", **extra
            )
            self.bar.update(1)
        elif (
            step == 1 or step % self.log_every == 0 or step == self.total or not self._printed or eval_loss is not None
        ):
            self._printed = True
            evaluated = f"  eval loss {eval_loss:.4f} ppl {math.exp(min(eval_loss, 700.0)):.2f}" if eval_loss else ""
            print(
                f"step {step:>5}/{self.total}  loss {loss:.4f}  tok/s {tokens_per_s:,.0f}  "
                f"expert imbalance {load_imbalance:.2f}{evaluated}",
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
