"""Per-layer numbers that say whether routing is balanced, and whether it stays so.

The run mean shows the history; the final window (the last ``N`` steps) shows
where training ended up, which is what decides whether to change the
balancing recipe. Shares are counts divided by the layer's mean count, so
1.0 is a perfectly fair expert whatever the batch size or top-k.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from autoep.report.load import RunData

DEFAULT_WINDOW = 10


def step_imbalance(load_SLE: torch.Tensor) -> torch.Tensor:
    """``[S, L]`` max/mean load per step and layer; 1.0 for a layer that routed nothing."""
    mean_SL = load_SLE.mean(dim=-1)
    ratio = load_SLE.amax(dim=-1) / mean_SL.clamp(min=1e-12)
    return torch.where(mean_SL > 0, ratio, torch.ones_like(ratio))


def shares(load_LE: torch.Tensor) -> torch.Tensor:
    """``[L, E]`` count / mean count per layer (0 where the layer routed nothing)."""
    mean_L1 = load_LE.mean(dim=-1, keepdim=True)
    return torch.where(mean_L1 > 0, load_LE / mean_L1.clamp(min=1e-12), torch.zeros_like(load_LE))


@dataclass(frozen=True)
class LayerSummary:
    layer: str
    index: int
    experts: int
    mean_imbalance: float
    final_imbalance: float
    min_share: float
    max_share: float
    dead_experts: int
    dropped_fraction: float | None = None
    aux_loss: float | None = None
    z_loss: float | None = None
    bias_min: float | None = None
    bias_max: float | None = None


def _layer_values(records: list[dict[str, Any]], key: str, layer: int) -> list[float]:
    """``records[i]['layers'][key][layer]`` for the records that have it."""
    values = []
    for r in records:
        column = (r.get("layers") or {}).get(key)
        if isinstance(column, list) and layer < len(column) and isinstance(column[layer], (int, float)):
            values.append(float(column[layer]))
    return values


def summarize(run: RunData, window: int = DEFAULT_WINDOW) -> list[LayerSummary]:
    """One row per MoE layer; ``window`` is the number of final steps that make up the final state."""
    load_SLE = run.stacked("expert_load")
    k = max(1, min(window, load_SLE.shape[0]))
    tail = run.records[-k:]
    imbalance_SL = step_imbalance(load_SLE)
    window_LE = load_SLE[-k:].sum(dim=0)
    share_LE = shares(window_LE)
    dropped_LE = run.stacked("expert_dropped")[-k:].sum(dim=0) if run.has("expert_dropped") else None
    bias_LE = None
    with_bias = [r for r in run.records if r.get("expert_bias")]
    if with_bias:
        bias_LE = torch.tensor(with_bias[-1]["expert_bias"], dtype=torch.float64)
    rows = []
    for layer, name in enumerate(run.layer_names):
        dropped = _layer_values(tail, "dropped_fraction", layer)
        dropped_fraction = sum(dropped) / len(dropped) if dropped else None
        if dropped_fraction is None and dropped_LE is not None:  # expert_load counts dropped choices too
            routed = float(window_LE[layer].sum())
            dropped_fraction = float(dropped_LE[layer].sum()) / routed if routed > 0 else 0.0
        aux, z = _layer_values(run.records, "aux_loss", layer), _layer_values(run.records, "z_loss", layer)
        bias_row = bias_LE[layer] if bias_LE is not None and layer < bias_LE.shape[0] else None
        rows.append(
            LayerSummary(
                layer=name,
                index=layer,
                experts=int(load_SLE.shape[-1]),
                mean_imbalance=float(imbalance_SL[:, layer].mean()),
                final_imbalance=float(imbalance_SL[-k:, layer].mean()),
                min_share=float(share_LE[layer].min()),
                max_share=float(share_LE[layer].max()),
                dead_experts=int((window_LE[layer] == 0).sum()),
                dropped_fraction=dropped_fraction,
                aux_loss=aux[-1] if aux else None,
                z_loss=z[-1] if z else None,
                bias_min=float(bias_row.min()) if bias_row is not None else None,
                bias_max=float(bias_row.max()) if bias_row is not None else None,
            )
        )
    return rows


def summary_json(run: RunData, rows: list[LayerSummary], window: int) -> dict[str, Any]:
    """What ``load_summary.json`` holds: the run's identity, the window, and the rows."""
    steps = run.steps
    k = max(1, min(window, len(steps)))
    return {
        "run_dir": str(run.run_dir),
        "model": run.model_name,
        "steps": len(steps),
        "first_step": steps[0],
        "last_step": steps[-1],
        "window": k,
        "window_steps": [steps[-k], steps[-1]],
        "layers": [asdict(row) for row in rows],
    }


def table(rows: list[LayerSummary]) -> tuple[list[str], list[list[str]]]:
    """Headers and cells for :func:`autoep.cli.render.print_table`; optional columns only when some layer has them."""
    columns: list[tuple[str, Any]] = [
        ("layer", lambda r: r.layer),
        ("mean imbalance", lambda r: f"{r.mean_imbalance:.2f}"),
        ("final imbalance", lambda r: f"{r.final_imbalance:.2f}"),
        ("min share", lambda r: f"{r.min_share:.2f}"),
        ("max share", lambda r: f"{r.max_share:.2f}"),
        ("dead experts", lambda r: f"{r.dead_experts}/{r.experts}"),
    ]
    optional: list[tuple[str, str, Any]] = [
        ("dropped", "dropped_fraction", lambda v: f"{100 * v:.1f}%"),
        ("aux loss", "aux_loss", lambda v: f"{v:.4g}"),
        ("z loss", "z_loss", lambda v: f"{v:.4g}"),
        ("bias min", "bias_min", lambda v: f"{v:+.3g}"),
        ("bias max", "bias_max", lambda v: f"{v:+.3g}"),
    ]
    for header, field, fmt in optional:
        if any(getattr(r, field) is not None for r in rows):
            columns.append((header, lambda r, f=field, fmt=fmt: "" if getattr(r, f) is None else fmt(getattr(r, f))))
    return [h for h, _ in columns], [[cell(r) for _, cell in columns] for r in rows]
