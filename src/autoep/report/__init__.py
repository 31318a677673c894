"""Offline report on a training run's expert load: summary table, ``load_summary.json`` and a heatmap."""

from __future__ import annotations

from autoep.report.load import RunData, layer_labels, load_run
from autoep.report.summary import LayerSummary, summarize, summary_json

__all__ = ["LayerSummary", "RunData", "layer_labels", "load_run", "summarize", "summary_json"]
