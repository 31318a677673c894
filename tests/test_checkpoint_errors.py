"""Checkpoint failures are named, and never damage what exists (single process, no collectives)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import autoep
from autoep.models.tiny import build_tiny_model


def _model(name: str = "tiny-mixtral", **overrides):
    model = build_tiny_model(name, **overrides)
    autoep.convert(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _train_once(model, optimizer) -> None:
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    model, optimizer = _model()
    _train_once(model, optimizer)
    autoep.save_checkpoint(tmp_path, model, optimizer, step=1)
    return tmp_path


def test_round_trip_without_distributed(saved: Path) -> None:
    model, optimizer = _model()
    state = autoep.load_checkpoint(saved, model, optimizer)
    assert state.step == 1 and state.data_position == 1 and state.path == saved / "step_00000001"
    reference, ref_opt = _model()
    _train_once(reference, ref_opt)
    for (name, got), want in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(got, want), name


def _unchanged_after(fn, model) -> None:
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(autoep.CheckpointError) as err:
        fn()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    return str(err.value)


def test_different_model_is_refused(saved: Path) -> None:
    model, optimizer = _model("tiny-qwen3-moe")
    message = _unchanged_after(lambda: autoep.load_checkpoint(saved, model, optimizer), model)
    assert "different model" in message and "mixtral" in message


def test_shape_mismatch_is_named_with_both_shapes(saved: Path) -> None:
    model, optimizer = _model(intermediate_size=40)
    message = _unchanged_after(lambda: autoep.load_checkpoint(saved, model, optimizer), model)
    assert "shape mismatch" in message
    assert "model.layers.0.mlp.experts.gate_up_proj: checkpoint [8, 96, 32], model [8, 80, 32]" in message


def test_missing_and_unexpected_keys_are_named(saved: Path) -> None:
    deeper, optimizer = _model(num_hidden_layers=4)
    message = _unchanged_after(lambda: autoep.load_checkpoint(saved, deeper, optimizer), deeper)
    assert "missing keys" in message and "model.layers.3." in message
    shallower, optimizer = _model(num_hidden_layers=2)
    message = _unchanged_after(lambda: autoep.load_checkpoint(saved, shallower, optimizer), shallower)
    assert "unexpected keys" in message and "model.layers.2." in message


def test_truncated_shard_is_detected_before_loading(saved: Path) -> None:
    shard = next((saved / "step_00000001").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    model, optimizer = _model()
    message = _unchanged_after(lambda: autoep.load_checkpoint(saved, model, optimizer), model)
    assert "truncated" in message


def test_corrupt_metadata_and_missing_checkpoints(saved: Path, tmp_path_factory) -> None:
    model, optimizer = _model()
    (saved / "step_00000001" / "autoep.json").write_text("{not json")
    assert "corrupt" in _unchanged_after(lambda: autoep.load_checkpoint(saved, model, optimizer), model)
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(autoep.CheckpointError, match="no autoep checkpoint"):
        autoep.load_checkpoint(empty, model, optimizer)


def test_keep_last_prunes_old_steps(tmp_path: Path) -> None:
    model, optimizer = _model()
    for step in (1, 2, 3, 4):
        autoep.save_checkpoint(tmp_path, model, optimizer, step=step, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step_")) == [
        "step_00000003",
        "step_00000004",
    ]
    assert (tmp_path / "latest").read_text() == "step_00000004"


CRASH_SCRIPT = """
import os, signal, sys, torch
import torch.distributed.checkpoint as dcp
import autoep
from autoep.models.tiny import build_tiny_model
root = sys.argv[1]
model = build_tiny_model("tiny-mixtral"); autoep.convert(model)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
autoep.save_checkpoint(root, model, optimizer, step=1)
with torch.no_grad():
    for p in model.parameters():
        p.add_(1.0)
real_save = dcp.save
def save_then_die(*args, **kwargs):
    real_save(*args, **kwargs)          # the shards of step 2 are on disk...
    os.kill(os.getpid(), signal.SIGKILL)  # ...and the process dies before the commit
dcp.save = save_then_die
autoep.save_checkpoint(root, model, optimizer, step=2)
"""


def test_a_save_killed_midway_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(tmp_path)], env=env, capture_output=True)
    assert result.returncode == -9, result.stderr.decode()[-2000:]
    assert (tmp_path / "latest").read_text() == "step_00000001"
    assert (tmp_path / ".step_00000002.partial").is_dir()  # the debris of the dead save
    assert not (tmp_path / "step_00000002").exists()
    model, optimizer = _model()
    state = autoep.load_checkpoint(tmp_path, model, optimizer)
    assert state.step == 1
    untouched = _model()[0]
    for key, value in model.state_dict().items():
        assert torch.equal(value, untouched.state_dict()[key]), key  # step 1's weights, not the +1 ones
    autoep.save_checkpoint(tmp_path, model, optimizer, step=2)  # the next save clears the debris
    assert not list(tmp_path.glob(".*.partial"))
    assert json.loads((tmp_path / "step_00000002" / "autoep.json").read_text())["step"] == 2
