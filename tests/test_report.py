"""`autoep report` (summary, load_summary.json, heatmap) and the optional TensorBoard mirror of metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from autoep.cli.main import main
from autoep.report.heatmap import MAX_COLUMNS, bin_steps
from autoep.report.load import load_run
from autoep.train.tensorboard import TensorBoardLog

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def autoep_cmd(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "autoep", *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=ENV
    )


def write_run(run_dir: Path, records: list[dict], config: dict | None = None) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if config is not None:
        (run_dir / "config.json").write_text(json.dumps(config))
    return run_dir


def collapsing_records(steps: int = 12, collapse_from: int = 7) -> list[dict]:
    """2 layers x 4 experts: layer 0 always balanced; layer 1 balanced, then expert 0 takes every token."""
    return [
        {
            "step": s,
            "loss": 1.0 / s,
            "expert_load": [[5.0] * 4, [20.0, 0.0, 0.0, 0.0] if s >= collapse_from else [5.0] * 4],
        }
        for s in range(1, steps + 1)
    ]


def check_png(path: Path) -> tuple[int, int]:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_MAGIC
    height, width = imread(path).shape[:2]
    assert height > 100 and width > 100
    return height, width


def test_report_on_a_real_training_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    trained = autoep_cmd(
        "train", "--steps", "12", "--nproc-per-node", "2", "--output", str(run_dir),
        "--capacity-factor", "1.0", "--bias-update-rate", "0.01", "--aux-loss-coef", "0.01", cwd=tmp_path,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-4000:]
    result = autoep_cmd("report", str(run_dir), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    check_png(run_dir / "expert_load.png")

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    config = json.loads((run_dir / "config.json").read_text())
    num_layers = len(records[0]["expert_load"])
    labels = config.get("moe_layers") or [f"layer {i}" for i in range(num_layers)]
    summary = json.loads((run_dir / "load_summary.json").read_text())
    assert summary["model"] == "tiny-mixtral" and summary["window"] == 10 and summary["window_steps"] == [3, 12]
    assert [row["layer"] for row in summary["layers"]] == labels
    for layer, row in enumerate(summary["layers"]):
        final = [max(r["expert_load"][layer]) / (sum(r["expert_load"][layer]) / 8) for r in records[-10:]]
        assert row["final_imbalance"] == pytest.approx(sum(final) / len(final), rel=1e-9)
        assert row["experts"] == 8 and row["min_share"] <= 1.0 <= row["max_share"]
        dropped = sum(sum(r["expert_dropped"][layer]) for r in records[-10:])
        assert row["dropped_fraction"] == pytest.approx(
            dropped / sum(sum(r["expert_load"][layer]) for r in records[-10:])
        )
        assert row["dropped_fraction"] > 0  # tiny-mixtral is skewed: capacity 1.0 drops
        assert row["bias_min"] < 0 < row["bias_max"]
        assert labels[layer] in result.stdout
    assert "final imbalance" in result.stdout


def test_summary_numbers_of_a_known_collapse(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = write_run(tmp_path / "run", collapsing_records(), config={"model": "tiny-test"})
    assert main(["report", str(run_dir), "--last", "4"]) == 0
    summary = json.loads((run_dir / "load_summary.json").read_text())
    assert (summary["steps"], summary["window"], summary["window_steps"]) == (12, 4, [9, 12])
    balanced, collapsed = summary["layers"]
    assert balanced["layer"] == "layer 0" and collapsed["layer"] == "layer 1"
    assert balanced["mean_imbalance"] == balanced["final_imbalance"] == 1.0
    assert (balanced["min_share"], balanced["max_share"], balanced["dead_experts"]) == (1.0, 1.0, 0)
    assert collapsed["mean_imbalance"] == pytest.approx(2.5)  # 6 steps at 1.0, 6 at 4.0
    assert collapsed["final_imbalance"] == 4.0
    assert (collapsed["min_share"], collapsed["max_share"], collapsed["dead_experts"]) == (0.0, 4.0, 3)
    for field in ("dropped_fraction", "aux_loss", "z_loss", "bias_min", "bias_max"):
        assert balanced[field] is None and collapsed[field] is None
    out = capsys.readouterr().out
    assert "tiny-test" in out and "3/4" in out and "dropped" not in out and "bias" not in out

    # A window reaching back before the collapse sees the dead experts come alive.
    assert main(["report", str(run_dir), "--last", "12"]) == 0
    collapsed = json.loads((run_dir / "load_summary.json").read_text())["layers"][1]
    assert collapsed["dead_experts"] == 0 and collapsed["final_imbalance"] == 2.5


def test_optional_fields_are_reported_when_present(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    records = collapsing_records(steps=3, collapse_from=99)
    for r in records:
        r["layers"] = {"imbalance": [1.0, 1.0], "aux_loss": [0.1 * r["step"], 0.2], "z_loss": [0.5, 0.25]}
        r["expert_dropped"] = [[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]]  # 2 of 20 routed in layer 0
        r["expert_bias"] = [[0.01 * r["step"], -0.02, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    names = ["model.layers.0.mlp", "model.layers.1.mlp"]
    run_dir = write_run(tmp_path / "run", records, config={"moe_layers": names})
    assert main(["report", str(run_dir)]) == 0
    first, second = json.loads((run_dir / "load_summary.json").read_text())["layers"]
    assert [first["layer"], second["layer"]] == names
    assert first["dropped_fraction"] == pytest.approx(0.1) and second["dropped_fraction"] == 0.0
    assert first["aux_loss"] == pytest.approx(0.3) and second["z_loss"] == 0.25  # the last step's values
    assert (first["bias_min"], first["bias_max"]) == (pytest.approx(-0.02), pytest.approx(0.03))
    out = capsys.readouterr().out
    for header in ("dropped", "aux loss", "z loss", "bias min", "bias max", "10.0%", "model.layers.1.mlp"):
        assert header in out, header

    records[-1]["layers"]["dropped_fraction"] = [0.5, 0.0]  # logged per layer: wins over expert_dropped
    write_run(run_dir, records)
    assert main(["report", str(run_dir), "--last", "1"]) == 0
    assert json.loads((run_dir / "load_summary.json").read_text())["layers"][0]["dropped_fraction"] == 0.5


def test_heatmap_for_one_step_and_for_many(tmp_path: Path) -> None:
    one = write_run(tmp_path / "one", collapsing_records(steps=1))
    png = tmp_path / "plots" / "one.png"
    assert main(["report", str(one), "--output", str(png)]) == 0
    check_png(png)
    assert not (one / "expert_load.png").exists()

    many = collapsing_records(steps=1000, collapse_from=500)
    run = load_run(write_run(tmp_path / "many", many))
    edges, load_CLE = bin_steps(run.steps, run.stacked("expert_load"))
    assert load_CLE.shape == (334, 2, 4) and load_CLE.shape[0] <= MAX_COLUMNS  # 3 steps per column
    assert len(edges) == 335 and (edges[0], edges[1], edges[-1]) == (0.5, 3.5, 1000.5)
    assert float(load_CLE.sum()) == sum(sum(map(sum, r["expert_load"])) for r in many)  # counts are summed, not lost
    assert main(["report", str(tmp_path / "many")]) == 0
    check_png(tmp_path / "many" / "expert_load.png")


def test_metrics_parsing_tolerates_blank_lines_restarts_and_a_partial_last_line(tmp_path: Path) -> None:
    records = collapsing_records(steps=4)
    lines = [json.dumps(r) for r in records]
    rerun = {**records[1], "expert_load": [[1.0, 2.0, 3.0, 4.0], [4.0, 4.0, 4.0, 4.0]]}
    text = "\n".join([lines[0], "", lines[1], "   ", *lines[2:], json.dumps(rerun)]) + '\n{"step": 5, "loss'
    (tmp_path / "metrics.jsonl").write_text(text)
    run = load_run(tmp_path)
    assert run.steps == [1, 2, 3, 4] and run.layer_names == ["layer 0", "layer 1"]
    assert run.records[1]["expert_load"] == rerun["expert_load"]  # a repeated step: the later record wins
    assert run.model_name is None

    (tmp_path / "metrics.jsonl").write_text("\n".join([lines[0], "{oops", lines[1]]))
    with pytest.raises(Exception, match=r"metrics.jsonl:2 is not valid JSON"):
        load_run(tmp_path)


@pytest.mark.parametrize(
    ("setup", "args", "expected"),
    [
        ("nothing", (), "does not exist"),
        ("empty_dir", (), "metrics.jsonl does not exist"),
        ("empty_metrics", (), "has no records"),
        ("dense", (), "no 'expert_load'"),
        ("ok", ("--last", "0"), "--last must be >= 1"),
    ],
)
def test_bad_run_dirs_give_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], setup: str, args: tuple[str, ...], expected: str
) -> None:
    run_dir = tmp_path / "run"
    if setup != "nothing":
        run_dir.mkdir()
    if setup == "empty_metrics":
        (run_dir / "metrics.jsonl").write_text("\n\n")
    if setup == "dense":
        write_run(run_dir, [{"step": 1, "loss": 2.0, "expert_load": []}])
    if setup == "ok":
        write_run(run_dir, collapsing_records(steps=2))
    assert main(["report", str(run_dir), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("autoep: error:") and expected in err[0], err


def test_missing_run_dir_exits_2_from_the_command_line(tmp_path: Path) -> None:
    result = autoep_cmd("report", str(tmp_path / "nope"), cwd=tmp_path)
    assert result.returncode == 2
    missing = str(tmp_path / "nope")
    assert result.stderr.strip().splitlines() == [
        f"autoep: error: run directory {missing!r} does not exist (expected the --output of autoep train)"
    ]


def test_without_matplotlib_the_summary_is_written_and_the_error_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = write_run(tmp_path / "run", collapsing_records(steps=2))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert main(["report", str(run_dir)]) == 2
    assert 'pip install "autoep[report]"' in capsys.readouterr().err
    assert (run_dir / "load_summary.json").is_file() and not (run_dir / "expert_load.png").exists()


def tensorboard_records() -> list[dict]:
    return [
        {
            "step": s,
            "loss": 3.0 - s,
            "lm_loss": 2.5 - s,
            "lr": 1e-3,
            "aux_loss": 0.01 * s,
            "seq_aux_loss": 0.02,
            "dropped_fraction": 0.25,
            "expert_imbalance": 2.0,
            "expert_load": [[10.0, 10.0, 10.0, 10.0], [40.0, 0.0, 0.0, 0.0]],
            "expert_bias": [[0.1, -0.1, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
            "layers": {"aux_loss": [0.5, 0.75], "dropped_fraction": [0.0, 0.5]},
        }
        for s in (1, 2)
    ]


def test_tensorboard_log_writes_scalars_and_load_histograms(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert TensorBoardLog.available()
    with TensorBoardLog(tmp_path / "tb", layer_names=["model.layers.0.mlp", "model.layers.1.mlp"]) as tb:
        assert tb.enabled
        for record in tensorboard_records():
            tb.write(record)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()

    def scalar(tag: str) -> list[tuple[int, float]]:
        return [(e.step, pytest.approx(e.value)) for e in events.Scalars(tag)]

    assert scalar("train/loss") == [(1, 2.0), (2, 1.0)]
    assert scalar("train/lm_loss") == [(1, 1.5), (2, 0.5)]
    assert scalar("loss/aux_loss") == [(1, 0.01), (2, 0.02)] and scalar("loss/seq_aux_loss")[0] == (1, 0.02)
    assert scalar("moe/dropped_fraction")[0] == (1, 0.25) and scalar("moe/expert_imbalance")[0] == (1, 2.0)
    assert scalar("moe/model.layers.1.mlp/imbalance") == [(1, 4.0), (2, 4.0)]  # derived from the load
    assert scalar("moe/model.layers.0.mlp/aux_loss")[0] == (1, 0.5)
    assert scalar("moe/model.layers.1.mlp/dropped_fraction")[0] == (1, 0.5)
    assert "moe/model.layers.0.mlp/z_loss" not in events.Tags()["scalars"]  # absent fields are not invented
    histogram = events.Histograms("moe/model.layers.1.mlp/load_share")[0].histogram_value
    assert (histogram.min, histogram.max, histogram.num, histogram.sum) == (0.0, 4.0, 4, 4.0)
    assert "moe/model.layers.0.mlp/router_bias" in events.Tags()["histograms"]


def test_tensorboard_log_is_a_no_op_without_tensorboard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    assert not TensorBoardLog.available()
    with pytest.warns(RuntimeWarning, match="pip install tensorboard"):
        tb = TensorBoardLog(tmp_path / "tb")
    assert not tb.enabled
    for record in tensorboard_records():
        tb.write(record)
    tb.close()
    assert not (tmp_path / "tb").exists()
    TensorBoardLog(None).write(tensorboard_records()[0])  # no directory (non-zero ranks): silent no-op
