"""`autoep train` end to end: the default job, flags, torchrun, and clean errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}


def autoep_cmd(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "autoep", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=ENV
    )


def test_default_job_trains_and_the_loss_falls(tmp_path: Path) -> None:
    result = autoep_cmd("train", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["steps"] >= 100 and summary["world_size"] == 4
    assert (summary["ep"], summary["zero_stage"]) == (2, 3)
    assert summary["seconds"] < 600
    assert summary["final_loss"] < 0.6 * summary["first_loss"], summary
    records = [json.loads(line) for line in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, summary["steps"] + 1))
    assert all(r["tokens_per_s"] > 0 and r["expert_imbalance"] >= 1.0 for r in records)
    assert len(records[-1]["expert_load"][0]) == 8  # tiny-mixtral: 8 experts per layer
    assert "loss" in result.stdout and "tokens/s" in result.stdout


def test_help_documents_every_flag(tmp_path: Path) -> None:
    result = autoep_cmd("train", "--help", cwd=tmp_path)
    assert result.returncode == 0
    for flag in (
        "--model",
        "--data",
        "--ep",
        "--zero",
        "--steps",
        "--micro-batch",
        "--seq-len",
        "--lr",
        "--optimizer",
        "--config",
        "--output",
        "--grad-accum",
        "--clip",
        "--bf16",
        "--nproc-per-node",
        "--nnodes",
        "--rdzv-endpoint",
    ):
        assert flag in result.stdout, flag


def test_recipe_flags_and_jsonl_data(tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"line {i} of a tiny corpus for autoep."}) for i in range(200)))
    ds = tmp_path / "ds.json"
    ds.write_text(
        json.dumps({"zero_optimization": {"stage": 1}, "expert_parallel": {"enabled": True, "autoep_size": 4}})
    )
    out = tmp_path / "run"
    result = autoep_cmd(
        "train",
        "--config", str(ds),
        "--zero", "2",  # a flag wins over the file
        "--data", str(data),
        "--model", "tiny-qwen3-moe",
        "--steps", "4",
        "--micro-batch", "2",
        "--seq-len", "32",
        "--grad-accum", "2",
        "--bf16",
        "--activation-checkpointing",
        "--output", str(out),
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    written = json.loads((out / "config.json").read_text())
    assert written["autoep"]["zero_stage"] == 2 and written["autoep"]["ep_size"] == 4
    assert written["autoep"]["mixed_precision"]["param_dtype"] == "bfloat16"
    assert written["autoep"]["gradient_accumulation_steps"] == 2
    assert written["data"] == str(data)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4


def test_inside_torchrun_uses_the_existing_processes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "autoep", "train"]
    command += ["--steps", "3", "--ep", "2", "--zero", "0", "--output", str(out)]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=ENV)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["zero_stage"] == 0


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--config", "{bad}"), "stage"),
        (("--ep", "3"), "does not divide the world size 4"),
        (("--model", "tiny-qwen3-moe", "--tp", "4"), "does not divide num_key_value_heads=2"),
        (("--nproc-per-node", "16", "--ep", "16"), "does not divide the 8 routed experts"),
        (("--data", "missing.txt"), "does not exist"),
        (("--model", "no-such-model"), "neither a built-in model"),
        (("--data", "{bad_jsonl}", "--steps", "2"), "not valid JSON"),
    ],
)
def test_bad_input_gives_one_clear_line(tmp_path: Path, args, expected) -> None:
    bad_config = tmp_path / "bad.json"
    bad_config.write_text(json.dumps({"zero_optimization": {"stage": 5}}))
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"text": "fine"}\nnot json\n')
    args = tuple(a.replace("{bad}", str(bad_config)).replace("{bad_jsonl}", str(bad_jsonl)) for a in args)
    result = autoep_cmd("train", *args, cwd=tmp_path)
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def test_train_from_a_hf_directory_then_export(tmp_path: Path) -> None:
    """`--model DIR` loads per-rank slices; `--save-every` + `autoep export` round-trips to transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    from autoep.models.tiny import build_tiny_model

    build_tiny_model("tiny-olmoe", seed=2).save_pretrained(tmp_path / "olmoe")
    out = tmp_path / "run"
    result = autoep_cmd(
        "train", "--model", str(tmp_path / "olmoe"), "--steps", "3", "--save-every", "3",
        "--seq-len", "32", "--micro-batch", "2", "--output", str(out), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    exported = autoep_cmd("export", str(out / "checkpoints"), str(tmp_path / "hf"), cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr[-3000:]
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    original = AutoModelForCausalLM.from_pretrained(tmp_path / "olmoe")
    moved = [
        (a - b).abs().max().item()
        for a, b in zip(trained.state_dict().values(), original.state_dict().values(), strict=True)
    ]
    assert max(moved) > 1e-4  # three AdamW steps changed the weights
    with torch.no_grad():
        assert torch.isfinite(trained(torch.tensor([[1, 2, 3]])).logits).all()


def test_added_selection_bias_trains_from_hf_and_is_left_out_of_export(tmp_path: Path) -> None:
    """Mixtral has no selection bias: autoep adds one (0 at load), checkpoints it, export drops it with a warning."""
    from safetensors import safe_open

    from autoep.models.tiny import build_tiny_model

    build_tiny_model("tiny-mixtral", seed=2).save_pretrained(tmp_path / "mixtral")
    out = tmp_path / "run"
    result = autoep_cmd(
        "train", "--model", str(tmp_path / "mixtral"), "--steps", "3", "--save-every", "3", "--nproc-per-node", "2",
        "--seq-len", "32", "--bias-update-rate", "0.05", "--output", str(out), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["expert_bias"] != records[-1]["expert_bias"]  # the bias moved
    assert all(abs(v) <= 3 * 0.05 + 1e-6 for row in records[-1]["expert_bias"] for v in row)
    exported = autoep_cmd("export", str(out / "checkpoints"), str(tmp_path / "hf"), cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "e_score_correction_bias" in exported.stderr  # the warning names what was left out
    keys = set()
    for shard in (tmp_path / "hf").glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            keys |= set(f.keys())
    assert keys and not any("e_score_correction_bias" in k for k in keys)
