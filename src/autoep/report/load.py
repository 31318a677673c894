"""Read a training run directory (``config.json`` + ``metrics.jsonl``) for reporting.

Everything beyond ``step`` and ``expert_load`` is optional: runs written by
older versions, or with balancing features off, lack the extra fields, and
the report shows what is there instead of failing.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from autoep.errors import ConfigError


def layer_labels(names: Any, num_layers: int) -> list[str]:
    """Names from ``config.json``'s ``moe_layers`` when they fit, else ``layer 0``, ``layer 1``, ..."""
    if isinstance(names, list) and len(names) == num_layers and all(isinstance(n, str) and n for n in names):
        return list(names)
    return [f"layer {i}" for i in range(num_layers)]


@dataclass
class RunData:
    """The records of one run that carry an expert load, sorted by step."""

    run_dir: Path
    config: dict[str, Any]
    records: list[dict[str, Any]]
    layer_names: list[str]

    @property
    def model_name(self) -> str | None:
        model = self.config.get("model")
        return str(model) if model else None

    @property
    def steps(self) -> list[int]:
        return [int(r["step"]) for r in self.records]

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    @property
    def num_experts(self) -> int:
        return len(self.records[0]["expert_load"][0])

    def stacked(self, key: str) -> torch.Tensor:
        """``[S, L, E]`` float64 of a per-expert field (``expert_load``); absent entries are zeros."""
        shape = (self.num_layers, self.num_experts)
        rows = []
        for r in self.records:
            row = torch.tensor(r[key], dtype=torch.float64) if r.get(key) else torch.zeros(shape, dtype=torch.float64)
            if tuple(row.shape) != shape:
                raise ConfigError(f"step {r['step']}: '{key}' is not {shape[0]} layers x {shape[1]} experts")
            rows.append(row)
        return torch.stack(rows)

    def has(self, key: str) -> bool:
        """Whether any record carries ``key`` (optional fields appear only when their feature is on)."""
        return any(r.get(key) is not None for r in self.records)


def _read_records(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    records = []
    for position, (lineno, line) in enumerate(numbered):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if position == len(numbered) - 1:  # a run killed mid-write leaves a partial last line
                print(f"autoep report: skipping incomplete last line {lineno} of {path}", file=sys.stderr)
                continue
            raise ConfigError(f"{path}:{lineno} is not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ConfigError(f"{path}:{lineno} is not a metrics record (no integer 'step')")
        records.append(record)
    return records


def load_run(run_dir: str | Path) -> RunData:
    """Parse ``RUN_DIR``; raises :class:`~autoep.errors.ConfigError` with the reason when it cannot be reported on."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {str(run_dir)!r} does not exist (expected the --output of autoep train)")
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise ConfigError(f"{metrics} does not exist: is {str(run_dir)!r} an autoep train --output directory?")
    records = _read_records(metrics)
    if not records:
        raise ConfigError(f"{metrics} has no records: the run has not finished a step yet")
    # A restart that appended without truncating repeats steps: the later record wins.
    by_step = {r["step"]: r for r in records if r.get("expert_load")}
    if not by_step:
        raise ConfigError(f"{metrics} has no 'expert_load' in any record: no MoE layer was routed in this run")
    records = [by_step[s] for s in sorted(by_step)]
    shape = (len(records[0]["expert_load"]), len(records[0]["expert_load"][0]))
    for r in records:
        load = r["expert_load"]
        if len(load) != shape[0] or any(len(row) != shape[1] for row in load):
            raise ConfigError(
                f"{metrics}: step {r['step']} has an expert load of another shape than step {records[0]['step']} "
                f"({shape[0]} layers x {shape[1]} experts)"
            )
    config_path = run_dir / "config.json"
    config: dict[str, Any] = {}
    if config_path.is_file():
        try:
            loaded = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ConfigError(f"{config_path} is not valid JSON ({err.msg})") from None
        config = loaded if isinstance(loaded, dict) else {}
    return RunData(run_dir, config, records, layer_labels(config.get("moe_layers"), shape[0]))
