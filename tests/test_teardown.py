"""Processes autoep owns end without interpreter finalization, where gloo's exit-time abort happens.

The abort (pytorch/pytorch#179291) needs a gloo worker thread to take the GIL after
finalization began; it cannot be forced on demand, so these tests check the guarantee
that rules it out: an armed process never reaches finalization (a finalizer's marker
never appears), yet keeps its exit status, its exit handlers, its buffered output and its unclosed files' contents.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from autoep.launch import run_local

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# Cyclic garbage is freed by the interpreter's final collection, after finalization began:
# the moment a gloo worker thread that needs the GIL aborts the process.
FINALIZER = """
import gc, pathlib
gc.set_threshold(1_000_000_000)  # no automatic collection before the final one


class Finalized:
    def __init__(self, marker):
        self.cycle, self.marker = self, pathlib.Path(marker)

    def __del__(self):
        self.marker.write_text("finalized")
"""


def _script(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    code = FINALIZER + "\nimport atexit, sys\nimport autoep\n" + body
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=ENV)


def test_shutdown_leaves_before_finalization_with_status_handlers_and_output(tmp_path: Path) -> None:
    done = _script(
        tmp_path,
        "atexit.register(print, 'exit handler ran')\n"
        "sys.stdout.write('buffered, no newline')\n"
        "Finalized('marker')\n"
        "import torch.distributed\n"
        "deprecated = torch.distributed.reduce_op  # warns when asked its __class__: the exit must not ask\n"
        "results = open('results.txt', 'w')\n"
        "results.write('kept')  # never closed: finalization would flush it\n"
        "try:\n    autoep.shutdown(3)\nfinally:\n    print('finally ran', end='; ')\n",
    )
    assert done.returncode == 3 and done.stderr == "", done.stderr
    assert done.stdout == "buffered, no newlinefinally ran; exit handler ran\n"
    assert not (tmp_path / "marker").exists()  # never finalized
    assert (tmp_path / "results.txt").read_text() == "kept"


def test_unarmed_process_finalizes_as_usual(tmp_path: Path) -> None:
    """The control: without shutdown the same script is finalized (so the marker above means something)."""
    done = _script(tmp_path, "Finalized('marker')\nsys.exit(autoep.teardown.exit_with(3))\n")
    assert done.returncode == 3, done.stderr
    assert (tmp_path / "marker").read_text() == "finalized"


def _worker_leaving_garbage(marker_dir: str) -> tuple[int, torch.Tensor]:
    import torch.distributed as dist

    namespace: dict = {}
    exec(FINALIZER, namespace)
    rank = dist.get_rank()
    namespace["Finalized"](os.path.join(marker_dir, f"rank{rank}"))
    total = torch.ones(4)
    dist.all_reduce(total, async_op=True).wait()
    return rank, total


def test_run_local_workers_leave_before_finalization(tmp_path: Path) -> None:
    """...and their results, tensors included, still arrive after the workers are gone."""
    results = run_local(_worker_leaving_garbage, 2, str(tmp_path))
    assert sorted(results) == [0, 1] and all(results[r][0] == r for r in results)
    assert all(torch.equal(results[r][1], torch.full((4,), 2.0)) for r in results)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _worker_returning_a_lambda() -> object:
    return lambda: None


def test_a_result_that_cannot_be_pickled_fails_the_run() -> None:
    """It fails inside the worker, before the exit is armed with status 0 (armed first, the launcher waits
    forever for a result that never comes: the alarm turns that into a failure)."""

    def hung(*_: object) -> None:
        raise TimeoutError("run_local never returned")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    try:
        with pytest.raises(ChildFailedError):
            run_local(_worker_returning_a_lambda, 2)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_cli_rank_under_torchrun_keeps_its_exit_status(tmp_path: Path) -> None:
    """`autoep train` inside torchrun: an error every rank raises after joining the group still exits 2."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "autoep", "train"]
    (tmp_path / "empty.txt").write_text("")  # found empty only once read, inside the ranks' group
    command += ["--steps", "1", "--ep", "2", "--data", "empty.txt", "--output", "run"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode != 0
    assert done.stderr.count("autoep: error: empty.txt: the data is empty") == 2, done.stderr[-3000:]
    assert "exitcode: 2)" in done.stderr, done.stderr[-3000:]  # torch elastic's record of the failed rank
