"""``autoep report RUN_DIR``: is routing balanced? A table, ``load_summary.json`` and a heatmap.

Works on any ``autoep train --output`` directory, finished or still running,
from any version: fields a run did not log are simply left out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from autoep.errors import ConfigError
from autoep.report.summary import DEFAULT_WINDOW


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="summarise and plot the expert load of a training run",
        description="Read RUN_DIR (the --output of autoep train), print per MoE layer how evenly tokens reach the "
        "experts over the run and over its last steps, and write RUN_DIR/load_summary.json and a heatmap of "
        "expert load per step (RUN_DIR/expert_load.png; needs matplotlib).",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory with metrics.jsonl (and config.json)")
    p.add_argument("--output", metavar="PNG", help="where to write the heatmap (default: RUN_DIR/expert_load.png)")
    p.add_argument(
        "--last",
        type=int,
        default=DEFAULT_WINDOW,
        metavar="N",
        help=f"steps that make up the final state, for the summary and the last panel (default: {DEFAULT_WINDOW})",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from autoep.cli.render import print_table
    from autoep.report.load import load_run
    from autoep.report.summary import summarize, summary_json, table

    if args.last < 1:
        raise ConfigError(f"--last must be >= 1, got {args.last}")
    data = load_run(args.run_dir)
    rows = summarize(data, args.last)
    summary = summary_json(data, rows, args.last)
    summary_path = data.run_dir / "load_summary.json"
    summary_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    headers, cells = table(rows)
    model = f"{data.model_name}: " if data.model_name else ""
    print_table(
        f"{model}expert load, steps {summary['first_step']}-{summary['last_step']}; final = last {summary['window']} "
        "steps; share = load / mean load",
        headers,
        cells,
    )
    print(f"autoep report: wrote {summary_path}")
    from autoep.report.heatmap import plot_load

    png = plot_load(data, Path(args.output) if args.output else data.run_dir / "expert_load.png", args.last)
    print(f"autoep report: wrote {png}")
    return 0
