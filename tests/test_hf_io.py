"""Hugging Face weights out (export_hf, `autoep export`) and in (autoep.from_pretrained), every family."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import autoep
from autoep.launch import run_local
from autoep.models.tiny import build_tiny_model
from tests.conftest import ALL_FAMILIES

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(9))


def _hf_logits(directory: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(IDS).logits


def _autoep_logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(IDS).logits


def export_worker(root: str) -> dict[str, torch.Tensor]:
    """World 2, ep 2, ZeRO 3: export every family from the live sharded model."""
    out = {}
    for name in ALL_FAMILIES:
        model = build_tiny_model(name, seed=4)
        autoep.parallelize(model, autoep.AutoEPConfig(ep_size=2, zero_stage=3))
        out[name] = _autoep_logits(model)
        autoep.export_hf(model, Path(root) / name)
    return out


def load_worker(root: str) -> dict[str, torch.Tensor]:
    """World 2, ep 2, ZeRO 3: from_pretrained on per-expert and fused directories."""
    out = {}
    for name in ALL_FAMILIES:
        for layout in ("per_expert", "fused"):
            model = autoep.from_pretrained(
                Path(root) / f"{name}-{layout}", autoep.AutoEPConfig(ep_size=2, zero_stage=3)
            )
            out[f"{name}-{layout}"] = _autoep_logits(model)
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("export")
    return root, run_local(export_worker, 2, str(root))[0]


@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_export_loads_in_transformers_with_equal_logits(exported, name: str) -> None:
    root, logits = exported
    torch.testing.assert_close(_hf_logits(root / name), logits[name], atol=1e-5, rtol=0)


def test_export_writes_the_family_layout(exported) -> None:
    from safetensors import safe_open

    root, _ = exported
    with safe_open(str(root / "tiny-mixtral" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.1.block_sparse_moe.experts.7.w3.weight" in keys  # what transformers writes for Mixtral
    assert "model.layers.1.block_sparse_moe.gate.weight" in keys
    assert not any("gate_up_proj" in k for k in keys)
    with safe_open(str(root / "tiny-gpt-oss" / "model.safetensors"), "pt") as f:
        assert "model.layers.1.mlp.experts.gate_up_proj" in set(f.keys())  # GPT-OSS is fused on disk


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("load")
    for name in ALL_FAMILIES:
        model = build_tiny_model(name, seed=6)
        model.save_pretrained(root / f"{name}-per_expert")  # transformers' own writer: per-expert keys
        autoep.export_hf(model, root / f"{name}-fused", per_expert=False)
    return root, run_local(load_worker, 2, str(root))[0]


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_from_pretrained_equals_transformers(loaded, name: str, layout: str) -> None:
    root, logits = loaded
    torch.testing.assert_close(logits[f"{name}-{layout}"], _hf_logits(root / f"{name}-{layout}"), atol=1e-5, rtol=0)


def test_autoep_export_cli_streams_a_checkpoint(tmp_path: Path) -> None:
    model = build_tiny_model("tiny-qwen2-moe", seed=8)
    autoep.convert(model)
    optimizer = torch.optim.AdamW(model.parameters())
    autoep.save_checkpoint(tmp_path / "ckpt", model, optimizer, step=5)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "autoep", "export", str(tmp_path / "ckpt"), str(tmp_path / "hf")]
    command += ["--max-shard-size", "100KB"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    shards = sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    torch.testing.assert_close(_hf_logits(tmp_path / "hf"), _autoep_logits(model), atol=1e-5, rtol=0)


def test_from_pretrained_names_what_does_not_fit(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    model = build_tiny_model("tiny-olmoe", seed=1)
    model.save_pretrained(tmp_path / "ok")
    tensors = load_file(tmp_path / "ok" / "model.safetensors")
    del tensors["model.layers.2.self_attn.q_proj.weight"]
    tensors["model.norm.weight"] = torch.ones(7)
    (tmp_path / "bad").mkdir()
    save_file(tensors, tmp_path / "bad" / "model.safetensors")
    model.config.save_pretrained(tmp_path / "bad")
    message = run_local(_load_error, 1, str(tmp_path / "bad"))[0]
    assert "missing keys ['model.layers.2.self_attn.q_proj.weight']" in message
    assert "model.norm.weight: file [7], model [32]" in message
    truncated = tmp_path / "ok" / "model.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:1000])
    assert "truncated" in run_local(_load_error, 1, str(tmp_path / "ok"))[0]


def _load_error(directory: str) -> str:
    try:
        autoep.from_pretrained(directory, autoep.AutoEPConfig())
    except autoep.CheckpointError as err:
        return str(err)
    return "no error"
