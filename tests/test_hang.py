"""A rank that stops answering: the job ends with an error naming where it stuck, instead of hanging.

A real fault: one worker of a 4-rank ``autoep train`` gets SIGSTOP mid-run
(a stalled process, as when a machine freezes). The other ranks wait in their
next collective until ``--collective-timeout`` expires, then fail with one line
naming their rank, step and phase; torch elastic stops the rest, and the
launcher exits non-zero within the timeout plus the launcher's 30 s shutdown
grace (about 40 s here; the bound allows for a loaded machine). ``--heartbeat DIR``
leaves each rank's last phase on disk.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from autoep.train.preemption import _children

TIMEOUT = 10


def _is_worker(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return "spawn_main" in cmdline and "resource_tracker" not in cmdline


def test_stalled_rank_ends_the_job_with_the_phase_named(tmp_path) -> None:
    run, beats = tmp_path / "run", tmp_path / "heartbeat"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["--steps", "500", "--seq-len", "16", "--micro-batch", "1", "--log-every", "1000"]
    args += ["--output", str(run), "--collective-timeout", str(TIMEOUT), "--heartbeat", str(beats)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "autoep", "train", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    workers = sorted(pid for pid in _children(proc.pid) if _is_worker(pid))  # not the resource tracker
    assert proc.poll() is None and len(workers) == 4, (workers, proc.poll())
    stalled = workers[-1]
    os.kill(stalled, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        out, _ = proc.communicate(timeout=TIMEOUT + 110)
    finally:
        try:
            os.kill(stalled, signal.SIGKILL)
        except ProcessLookupError:
            pass
    elapsed = time.monotonic() - stopped_at
    assert proc.returncode not in (0, None), out
    assert elapsed < TIMEOUT + 100, (elapsed, out[-2000:])  # timeout + torch elastic's 30 s grace, on a loaded box
    lines = [line for line in out.splitlines() if "timed out" in line]
    assert lines, out[-3000:]
    assert any("rank " in line and "step " in line for line in lines), lines
    last = {p.name: p.read_text() for p in sorted(beats.glob("rank_*.txt"))}
    assert len(last) == 4 and all("step " in text for text in last.values()), last
    done = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert 3 <= done[-1] < 500
