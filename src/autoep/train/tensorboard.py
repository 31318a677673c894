"""Optional TensorBoard mirror of the per-step metrics records.

``metrics.jsonl`` stays the source of truth; this writes the same records as
TensorBoard scalars and histograms so expert load can be watched live. When
the ``tensorboard`` package is missing it does nothing (with one warning), so
training never fails for want of a viewer.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

# Top-level record fields logged as scalars, by TensorBoard section.
_SCALARS = {
    "train": ("loss", "lm_loss", "grad_norm", "lr"),
    "perf": ("tokens_per_s", "step_time_s"),
    "moe": ("expert_imbalance", "dropped_fraction"),
    "eval": ("eval_loss", "eval_ppl"),
}
_LOSS_SUFFIXES = ("aux_loss", "z_loss")  # aux_loss, seq_aux_loss, global_aux_loss, z_loss, and any future one
_LAYER_SCALARS = ("imbalance", "aux_loss", "z_loss", "dropped_fraction")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class TensorBoardLog:
    """Writes metrics records to ``log_dir``; a no-op when ``log_dir`` is None or TensorBoard is not installed."""

    def __init__(self, log_dir: str | Path | None, layer_names: Sequence[str] | None = None) -> None:
        self.layer_names = list(layer_names) if layer_names is not None else None
        self._writer = None
        if log_dir is None:
            return
        if not self.available():
            warnings.warn(
                f"TensorBoard logging to {log_dir} is off: pip install tensorboard", RuntimeWarning, stacklevel=2
            )
            return
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(log_dir))

    @staticmethod
    def available() -> bool:
        """Whether ``torch.utils.tensorboard`` imports (it needs the ``tensorboard`` package)."""
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            return False
        return True

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def _label(self, layer: int) -> str:
        if self.layer_names is not None and layer < len(self.layer_names):
            return self.layer_names[layer]
        return f"layer_{layer}"

    def write(self, record: dict[str, Any]) -> None:
        """Log one step's record (the ``metrics.jsonl`` schema; every field but ``step`` is optional)."""
        writer = self._writer
        if writer is None:
            return
        step = int(record["step"])
        for section, keys in _SCALARS.items():
            for key in keys:
                if _number(record.get(key)):
                    writer.add_scalar(f"{section}/{key}", record[key], step)
        for key, value in record.items():
            if key.endswith(_LOSS_SUFFIXES) and key != "lm_loss" and _number(value):
                writer.add_scalar(f"loss/{key}", value, step)
        layers = record.get("layers") or {}
        load = record.get("expert_load") or []
        bias = record.get("expert_bias") or []
        for layer in range(max(len(load), *(len(v) for v in layers.values() if isinstance(v, list)), 0)):
            prefix = f"moe/{self._label(layer)}"
            counts_E = torch.tensor(load[layer], dtype=torch.float64) if layer < len(load) else None
            mean = float(counts_E.mean()) if counts_E is not None and counts_E.numel() else 0.0
            for key in _LAYER_SCALARS:
                column = layers.get(key)
                if isinstance(column, list) and layer < len(column) and _number(column[layer]):
                    writer.add_scalar(f"{prefix}/{key}", column[layer], step)
                elif key == "imbalance" and mean > 0:  # older records: derive it from the load
                    writer.add_scalar(f"{prefix}/imbalance", float(counts_E.max()) / mean, step)
            if mean > 0:
                writer.add_histogram(f"{prefix}/load_share", (counts_E / mean).numpy(), step)
            if layer < len(bias) and bias[layer]:
                writer.add_histogram(
                    f"{prefix}/router_bias", torch.tensor(bias[layer], dtype=torch.float64).numpy(), step
                )

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> TensorBoardLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
