"""The examples under examples/ run as written (2 CPU processes, few steps)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]


def _run(command: list[str], tmp_path: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_trainer_example(tmp_path):
    out = _run([*TORCHRUN, str(ROOT / "examples/trainer.py"), "--steps", "8", "--output", "run"], tmp_path)
    assert "reloaded MixtralForCausalLM" in out
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "checkpoint-8" / "autoep" / "latest").is_file()  # Trainer saves the last step


def test_sft_example(tmp_path):
    out = _run([*TORCHRUN, str(ROOT / "examples/sft_trl.py"), "--steps", "10", "--output", "run"], tmp_path)
    first, last = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+)", out).groups())
    assert last < first


@pytest.mark.parametrize("launcher", ["accelerate"])
def test_accelerate_example(tmp_path, launcher):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    out = _run([*command, str(ROOT / "examples/accelerate_loop.py"), "--steps", "10"], tmp_path)
    losses = [float(x) for x in re.findall(r"step \d+: loss ([\d.]+)", out)]
    assert out.count("done") == 1  # accelerator.print: only the main process, so accelerate saw 2 processes
    assert len(losses) == 1
