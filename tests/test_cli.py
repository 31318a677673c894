"""The ``autoep`` command line, run as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from autoep.models.tiny import build_tiny_model


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "autoep", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_inspect_builtin_model() -> None:
    result = run_cli("inspect", "tiny-deepseek-v3", "--ep", "2")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "model.layers.1.mlp" in out and "model.layers.2.mlp" in out
    assert "model.layers.0.mlp" not in out  # the dense first layer
    assert "deepseek_v3" in out and "0-3" in out  # EP rank 0 holds experts 0..3 of 8


def test_inspect_shows_the_tensor_parallel_plan() -> None:
    result = run_cli("inspect", "tiny-deepseek-v2", "--tp", "2")
    assert result.returncode == 0, result.stderr
    assert "model.layers.*.mlp.shared_experts (x2)" in result.stdout  # split
    assert "self_attn (x3): unsupported tp style 'mla_kv_a_proj'" in result.stdout  # replicated, with why
    bad = run_cli("inspect", "tiny-qwen3-moe", "--tp", "4")
    assert bad.returncode == 2 and "does not divide num_key_value_heads=2" in bad.stderr


def test_inspect_a_saved_hf_directory(tmp_path: Path) -> None:
    build_tiny_model("tiny-qwen2-moe").save_pretrained(tmp_path / "qwen")
    result = run_cli("inspect", str(tmp_path / "qwen"))
    assert result.returncode == 0, result.stderr
    assert "qwen2_moe" in result.stdout and "yes" in result.stdout  # shared expert detected


def test_verify_passes_at_ep1() -> None:
    result = run_cli("verify", "tiny-glm4-moe")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS" in result.stdout
    assert result.stdout.count("pass") >= 3  # two MoE layers and the logits


def test_verify_with_expert_parallel_processes() -> None:
    result = run_cli("verify", "tiny-deepseek-v3", "--ep", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS" in result.stdout and "worst over ranks" in result.stdout


def test_verify_fails_loudly_when_tolerance_is_impossible() -> None:
    # bf16 cannot meet a zero tolerance: the verdict must say FAIL and the exit code must be 1.
    result = run_cli("verify", "tiny-mixtral", "--dtype", "bfloat16", "--atol", "0", "--rtol", "0")
    assert result.returncode == 1
    assert "FAIL" in result.stdout


def test_bad_inputs_give_one_clean_line() -> None:
    for args, expected in [
        (("inspect", "no-such-model"), "neither a built-in model"),
        (("verify", "tiny-mixtral", "--ep", "3"), "does not divide the 8 routed experts"),
    ]:
        result = run_cli(*args)
        assert result.returncode == 2, result
        assert expected in result.stderr
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
