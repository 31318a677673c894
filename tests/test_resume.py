"""Six steps straight equal three steps, a save, a load in fresh processes, and three more steps.

The split run may change layout at the save: its first half runs at tp 2
with dp 2 and twice the micro-batch (the same global batch as the straight
run's dp 4 at tp 1, ep 2, ZeRO 3) and resumes at tp 1, ep 4, ZeRO 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
COMMON = ["--model", "tiny-deepseek-v3", "--steps", "6", "--seq-len", "32", "--micro-batch", "2", "--log-every", "1"]


def train(out: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "autoep", "train", *COMMON, "--output", str(out), *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=ENV, cwd=out.parent)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def final_state(out: Path, tmp: Path) -> dict[str, torch.Tensor]:
    target = tmp / f"{out.name}.pt"
    dcp_to_torch_save(out / "checkpoints" / "step_00000006", target)
    return torch.load(target, weights_only=False)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "straight"
    train(out, "--save-every", "6")
    return out


@pytest.mark.parametrize(
    ("first_layout", "resume_layout", "tol"),
    [((), (), 1e-6), (("--tp", "2", "--micro-batch", "4"), ("--ep", "4", "--zero", "1"), 1e-5)],
    ids=["same-layout", "tp2-to-ep4-zero1"],
)
def test_resume_equals_straight_run(straight: Path, tmp_path: Path, first_layout, resume_layout, tol: float) -> None:
    out = tmp_path / "split"
    train(out, "--stop-at", "3", "--save-every", "3", *first_layout)
    assert [s for s, _ in losses(out)] == [1, 2, 3]
    result = train(out, "--save-every", "3", "--resume", *resume_layout)
    assert "resumed from" in result.stdout and "step_00000003" in result.stdout
    got, want = losses(out), losses(straight)
    assert [s for s, _ in got] == list(range(1, 7))
    assert max(abs(a - b) for (_, a), (_, b) in zip(got, want, strict=True)) <= tol
    got_state, want_state = final_state(out, tmp_path), final_state(straight, tmp_path)
    for section in ("model", "optim"):
        flat_got, flat_want = _flatten(got_state[section]), _flatten(want_state[section])
        assert flat_got.keys() == flat_want.keys()
        for key, value in flat_want.items():
            if isinstance(value, torch.Tensor):
                assert (flat_got[key].float() - value.float()).abs().max().item() <= tol, key


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(tree, list):
        return {f"{prefix}{i}": v for i, v in enumerate(tree)}
    return {prefix.rstrip("."): tree}


def test_resume_without_checkpoint_is_one_clear_line(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "autoep", "train", "--resume", "--output", str(tmp_path / "none")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "no autoep checkpoint" in result.stderr
