"""The launcher across machines and through failures, with real processes.

Two launchers on this machine stand in for two nodes; a SIGKILLed worker
stands in for a crashed one. Bad launcher flags are refused in-process,
before any worker starts.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from autoep.cli.main import main
from autoep.launch import SHARED_RUN_ID, default_run_id

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
FAST = ["--seq-len", "16", "--micro-batch", "1", "--log-every", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def train_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "autoep", "train", *FAST, *args]


@pytest.fixture
def start(tmp_path: Path):
    """Start a launcher in the background, in a session of its own, output to a file (a full pipe would stall it).

    Whatever is still running at the end of the test, launcher and workers, is killed by session.
    """
    started: list[subprocess.Popen] = []

    def launch(command: list[str], name: str) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"{name}.log"
        with log.open("w") as sink:
            proc = subprocess.Popen(
                command, cwd=tmp_path, env=ENV, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
            )
        started.append(proc)
        return proc, log

    yield launch
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_launchers_meet_and_train_to_the_end(tmp_path: Path, start) -> None:
    out = tmp_path / "run"
    command = train_command(
        "--nnodes", "2",
        "--nproc-per-node", "2",
        "--rdzv-endpoint", f"localhost:{free_port()}",
        "--rdzv-id", "two-nodes",
        "--steps", "6",
        "--output", str(out),
    )  # fmt: skip
    nodes = [start(command, f"node{i}") for i in range(2)]
    for proc, log in nodes:
        assert proc.wait(timeout=300) == 0, log.read_text()[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["world_size"], summary["steps"], summary["last_step"]) == (4, 6, 6)
    assert [r["step"] for r in records(out)] == list(range(1, 7))
    printed = [log.read_text() for _, log in nodes]
    assert sum("on 4 ranks" in text for text in printed) == 1, printed  # the node with global rank 0


@pytest.mark.parametrize("backend", ["c10d", "static"])
def test_a_lone_node_gives_up_after_the_rendezvous_timeout_with_one_line(tmp_path: Path, backend: str) -> None:
    port = free_port()
    where = (
        ["--rdzv-endpoint", f"localhost:{port}"]
        if backend == "c10d"
        else ["--rdzv-backend", "static", "--master-addr", "localhost", "--master-port", str(port), "--node-rank", "0"]
    )
    command = train_command("--nnodes", "2", "--nproc-per-node", "1", "--rdzv-timeout", "5", "--steps", "1", *where)
    started = time.monotonic()
    result = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert "did not all join the rendezvous within 5 s" in lines[0]
    assert all(flag in lines[0] for flag in ("--rdzv-endpoint", "--rdzv-id", "--nnodes", "firewall"))
    assert elapsed < 60, elapsed


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the live children of ``pid``, read from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # exited meanwhile
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state; comm may hold spaces
        if parent == pid:
            found.append((int(entry.name), cmdline))
    return found


def _last_step(metrics: Path) -> int:
    """The last step in metrics.jsonl, counting only complete lines (rank 0 may be writing one)."""
    lines = metrics.read_text().splitlines(keepends=True) if metrics.is_file() else []
    return max((json.loads(line)["step"] for line in lines if line.endswith("\n")), default=0)


def _kill_a_worker_after(proc: subprocess.Popen, out: Path, step: int, log: Path) -> int:
    """SIGKILL one spawned worker of the launcher ``proc`` once ``step`` is in metrics.jsonl; its pid."""
    deadline = time.monotonic() + 240
    while _last_step(out / "metrics.jsonl") < step:
        assert proc.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, f"the run never reached step {step}"
        time.sleep(0.02)
    workers = [pid for pid, cmdline in _children(proc.pid) if "spawn_main" in cmdline]
    assert len(workers) == 2, _children(proc.pid)
    os.kill(workers[-1], signal.SIGKILL)
    return workers[-1]


def _final_state(out: Path, tmp: Path) -> dict:
    target = tmp / f"{out.name}.pt"
    dcp_to_torch_save(out / "checkpoints" / "step_00000008", target)
    state = torch.load(target, weights_only=False)
    return {key: value for section in ("model", "optim") for key, value in _flatten(state[section], section).items()}


def _flatten(tree, prefix: str) -> dict:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}.{key}").items()}
    if isinstance(tree, list):
        return {f"{prefix}.{i}": value for i, value in enumerate(tree)}
    return {prefix: tree}


RESTARTABLE = ["--nproc-per-node", "2", "--max-restarts", "1", "--save-every", "3", "--steps", "8"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    command = train_command(*RESTARTABLE, "--output", str(out))
    result = subprocess.run(command, cwd=out.parent, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


@pytest.mark.parametrize(
    ("kill_after", "expected"),
    [
        (5, r"restart 1: resuming from step (3|6)\n"),  # the step 3 checkpoint, or step 6's if the kill came later
        (1, r"restart 1: no checkpoint saved yet, starting again from step 0\n"),
    ],
    ids=["from-checkpoint", "before-first-checkpoint"],
)
def test_a_killed_worker_restarts_and_the_run_ends_as_an_uninterrupted_one(
    tmp_path: Path, start, uninterrupted: Path, kill_after: int, expected: str
) -> None:
    faulted = tmp_path / "faulted"
    proc, log = start(train_command(*RESTARTABLE, "--output", str(faulted)), "faulted")
    _kill_a_worker_after(proc, faulted, kill_after, log)
    assert proc.wait(timeout=300) == 0, log.read_text()[-4000:]
    assert re.search(expected, log.read_text()), log.read_text()[-4000:]
    got, want = records(faulted), records(uninterrupted)
    assert [r["step"] for r in got] == list(range(1, 9))
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(got, want, strict=True)) <= 1e-6
    got_state, want_state = _final_state(faulted, tmp_path), _final_state(uninterrupted, tmp_path)
    assert got_state.keys() == want_state.keys()
    for key, value in want_state.items():
        if isinstance(value, torch.Tensor):
            assert (got_state[key].float() - value.float()).abs().max().item() <= 1e-6, key


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--node-rank", "1"), "--node-rank is only read by --rdzv-backend static"),
        (("--master-addr", "host0"), "--master-addr is only read by --rdzv-backend static"),
        (("--master-port", "29500"), "--master-port is only read by --rdzv-backend static"),
        (("--rdzv-backend", "static", "--nnodes", "2", "--node-rank", "1"), "needs --master-addr HOST"),
        (("--rdzv-backend", "static", "--nnodes", "2", "--master-addr", "h"), "needs --node-rank 0..1 on each node"),
        (("--rdzv-backend", "static", "--nnodes", "2", "--master-addr", "h", "--node-rank", "2"), "in 0..1"),
        (("--rdzv-backend", "static", "--nnodes", "1:2", "--master-addr", "h"), "needs a fixed --nnodes N"),
        (("--rdzv-backend", "static", "--master-addr", "h", "--rdzv-endpoint", "h:1"), "give the static backend"),
        (
            ("--rdzv-backend", "static", "--master-addr", "h", "--max-restarts", "1"),
            "--max-restarts needs --rdzv-backend c10d",
        ),
        (("--nnodes", "2"), "needs --rdzv-endpoint HOST:PORT with a fixed port"),
        (("--nnodes", "2", "--rdzv-endpoint", "host0:0"), "host0:0 only works on one machine"),
        (("--nnodes", "two"), "--nnodes must be N or MIN:MAX"),
        (("--nnodes", "3:2"), "--nnodes must be N or MIN:MAX"),
        (("--rdzv-endpoint", "host0:port"), "--rdzv-endpoint must be HOST:PORT"),
        (("--max-restarts", "-1"), "--max-restarts must be >= 0"),
        (("--rdzv-timeout", "0"), "--rdzv-timeout must be >= 1"),
        (("--nnodes", "2", "--rdzv-endpoint", "h:29400", "--save-every", "5"), "needs the same --output on every"),
    ],
)
def test_bad_launcher_flags_are_refused_before_anything_starts(capsys, args, expected: str) -> None:
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


def test_a_fresh_start_refuses_a_directory_that_holds_a_run(tmp_path: Path, capsys) -> None:
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_00000003")
    assert main(["train", "--max-restarts", "1", "--output", str(tmp_path)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    assert main(["train", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "already holds a run (metrics.jsonl" in err and "--overwrite" in err and "--resume" in err


def test_overwrite_replaces_the_old_run(tmp_path: Path) -> None:
    import subprocess
    import sys

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_00000099")
    (tmp_path / "metrics.jsonl").write_text('{"step": 99}\n')
    command = [sys.executable, "-m", "autoep", "train", "--steps", "2", "--seq-len", "16", "--micro-batch", "1"]
    result = subprocess.run([*command, "--output", str(tmp_path), "--overwrite"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    steps = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert len(steps) == 2 and not (tmp_path / "checkpoints").exists()


def test_run_ids_meet_on_a_shared_endpoint_and_stay_apart_locally() -> None:
    assert default_run_id("host0:29400") == default_run_id("10.0.0.1:29400") == SHARED_RUN_ID
    assert default_run_id("localhost:0") != default_run_id("localhost:0")
