"""benchmarks/gpu.py at toy sizes on CPU: it has no GPU to run on in CI, so this keeps it working until one does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_every_part_runs_on_two_ranks_and_the_checks_pass() -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    done = subprocess.run(
        [*command, str(SCRIPT), "all", "--device", "cpu", "--tiny"], capture_output=True, text=True, env=ENV
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert [line for line in out.splitlines() if line.startswith("## ")] == [
        "## check",
        "## gemm",
        "## alltoall",
        "## step",
    ]  # rank 0 alone prints
    checks = [line for line in out.splitlines() if line.startswith("| tiny-")]
    assert len(checks) == 8 and all(line.endswith("| pass |") for line in checks), out
    assert any("default vs loop | grouped_mm vs loop |" in line for line in checks)  # the two paths really differ
    assert "| 65,536 |" in out  # an all-to-all row
    step = next(line for line in out.splitlines() if line.startswith("~"))
    assert "ep 2, ZeRO 1, bf16" in step
    first, last = (float(x) for x in step.rsplit("loss ", 1)[1].split(" -> "))
    assert last < first  # it trained


def test_a_single_process_makes_its_own_group_and_a_failed_check_fails_the_run(tmp_path: Path) -> None:
    """A check that cannot pass (an expert weight of the loop copy changed) must exit 1."""
    sabotage = tmp_path / "sitecustomize.py"
    sabotage.write_text(
        "import torch\n"
        "from autoep.moe.experts import GroupedExperts\n"
        "original = GroupedExperts.forward\n"
        "def forward(self, x, *args, **kwargs):\n"
        "    y = original(self, x, *args, **kwargs)\n"
        "    return y * 1.5 if self.backend == 'loop' else y\n"
        "GroupedExperts.forward = forward\n"
    )
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "all", "--device", "cpu", "--tiny"], capture_output=True, text=True, env=ENV
    )
    assert done.returncode == 0 and "ep 1, ZeRO 1" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(tmp_path), ENV.get("PYTHONPATH", "")])}
    failed = subprocess.run(
        [sys.executable, str(SCRIPT), "check", "--device", "cpu"], capture_output=True, text=True, env=env
    )
    assert failed.returncode == 1, failed.stdout[-3000:] + failed.stderr[-3000:]
    assert failed.stdout.count("| FAIL |") == 4  # every bf16 row, no fp32 row
