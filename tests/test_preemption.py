"""Preemption through the CLI, with real signals (4 gloo workers under torch elastic).

SIGTERM to the launcher (or SIGUSR1, when configured) during training: every
rank finishes the step it is in, a checkpoint of exactly the last completed
step is saved, and the launcher exits with code 75 (EX_TEMPFAIL, "requeue").
Resuming continues exactly: the resumed steps' losses equal an uninterrupted
run's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from autoep.train.preemption import EXIT_PREEMPTED

STEPS = 60  # the schedule's length; runs stop early with --stop-at or a signal
COMMON = ["--steps", str(STEPS), "--seq-len", "16", "--micro-batch", "1", "--log-every", "100"]


def _train(*args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "autoep", "train", *COMMON, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def _metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _preempt(run: Path, signal_name: str) -> tuple[int, str, int]:
    """Start a run, signal the launcher once step 3 is done; (exit code, output, last completed step)."""
    proc = _train("--output", str(run), "--preempt-signal", signal_name)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and len(_metrics(run)) < 3:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0]
    sent = time.monotonic()
    proc.send_signal(getattr(signal, signal_name))
    out, _ = proc.communicate(timeout=90)
    assert time.monotonic() - sent < 60, "preemption took too long"
    return proc.returncode, out, _metrics(run)[-1]["step"]


def _assert_preempted(run: Path, code: int, out: str, last: int) -> None:
    assert code == EXIT_PREEMPTED, out
    assert 3 <= last < STEPS, out
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{last:08d}", (latest, last)  # the last completed step, no later, no earlier
    meta = json.loads((run / "checkpoints" / latest / "autoep.json").read_text())
    assert meta["extra"]["preempted"] is True
    assert "preempted" in out and "--resume" in out


def test_sigusr1_saves_the_current_step_and_exits_75(tmp_path) -> None:
    run = tmp_path / "run"
    _assert_preempted(run, *_preempt(run, "SIGUSR1"))


def test_sigterm_then_resume_continues_exactly(tmp_path) -> None:
    run = tmp_path / "run"
    code, out, last = _preempt(run, "SIGTERM")
    _assert_preempted(run, code, out, last)
    stop = last + 4
    resumed = _train("--output", str(run), "--resume", "--stop-at", str(stop))
    out, _ = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, out
    straight_dir = tmp_path / "straight"
    straight = _train("--output", str(straight_dir), "--stop-at", str(stop))
    out, _ = straight.communicate(timeout=180)
    assert straight.returncode == 0, out
    got = {r["step"]: r["loss"] for r in _metrics(run)}
    want = {r["step"]: r["loss"] for r in _metrics(straight_dir)}
    assert sorted(got) == list(range(1, stop + 1))
    for step in range(last + 1, stop + 1):
        assert abs(got[step] - want[step]) <= 1e-6, (step, got[step], want[step])
