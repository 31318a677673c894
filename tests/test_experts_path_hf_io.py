"""Hugging Face weights in and out for experts-path families, shard-on-read at ep 2.

Five families no adapter knows, each with a different on-disk expert layout:
MiniMax (per-expert ``block_sparse_moe.experts.N.w1/w3/w2``: the block is
renamed on disk), Qwen3-Next (per-expert ``gate/up/down_proj``), ERNIE 4.5
(per-expert, plus a selection bias held as a frozen parameter), NemotronH
(ungated experts: per-expert ``up_proj/down_proj``) and GraniteMoE (fused on
disk). ``save_pretrained`` writes each; ``autoep.from_pretrained`` loads it at
ep 2 / ZeRO 3 on two gloo ranks reading only each rank's slices; ``export_hf``
writes it back (per expert, and fused for one family); transformers loads the
export and its logits equal the original's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import autoep
from autoep.launch import run_local
from autoep.models import zoo

FAMILIES = ("minimax", "qwen3_next", "ernie4_5_moe", "nemotron_h", "granitemoe")


def _keys(directory: Path) -> list[str]:
    keys = []
    for shard in directory.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            keys += list(f.keys())
    return keys


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _load_and_export(root: str) -> dict:
    out = {}
    for family in FAMILIES:
        config = autoep.AutoEPConfig(ep_size=2, zero_stage=3)
        model = autoep.from_pretrained(Path(root) / family / "hf", config)
        assert model.autoep.report.layers[0].conversion == "experts"
        ids = torch.arange(16).reshape(2, 8) % 50
        logits = _logits(model, ids)
        autoep.export_hf(model, Path(root) / family / "export")
        if family == "minimax":
            autoep.export_hf(model, Path(root) / family / "fused", per_expert=False)
        out[family] = logits if dist.get_rank() == 0 else None
    return out


@pytest.fixture(scope="module")
def roundtrip(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("hf")
    for family in FAMILIES:
        zoo.build_tiny(family, seed=5).save_pretrained(root / family / "hf")
    return root, run_local(_load_and_export, 2, str(root))[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_shard_on_read_export_and_reload(roundtrip, family) -> None:
    root, sharded_logits = roundtrip
    ids = torch.arange(16).reshape(2, 8) % 50
    original = _logits(AutoModelForCausalLM.from_pretrained(root / family / "hf"), ids)
    reloaded = _logits(AutoModelForCausalLM.from_pretrained(root / family / "export"), ids)
    torch.testing.assert_close(sharded_logits[family], original, atol=1e-5, rtol=0)
    torch.testing.assert_close(reloaded, original, atol=1e-5, rtol=0)
    # The export stores experts the way transformers' own save_pretrained does for the family.
    assert sorted(_keys(root / family / "export")) == sorted(_keys(root / family / "hf"))
    assert json.loads((root / family / "export" / "config.json").read_text())["model_type"] == family


def test_layouts_differ_between_families(roundtrip) -> None:
    """The five files really cover per-expert (renamed block, gated, ungated) and fused layouts."""
    root, _ = roundtrip
    keys = {family: _keys(root / family / "hf") for family in FAMILIES}
    assert any(".block_sparse_moe.experts.0.w1.weight" in k for k in keys["minimax"])
    assert any(".experts.0.gate_proj.weight" in k for k in keys["qwen3_next"])
    assert any(".experts.0.up_proj.weight" in k for k in keys["nemotron_h"])
    assert not any(".experts.0.gate_proj" in k for k in keys["nemotron_h"])
    assert any(k.endswith("e_score_correction_bias") for k in keys["ernie4_5_moe"])
    assert not any(".experts.0." in k for k in keys["granitemoe"])


def test_fused_export_loads_too(roundtrip) -> None:
    root, _ = roundtrip
    ids = torch.arange(16).reshape(2, 8) % 50
    fused = root / "minimax" / "fused"
    assert any(k.endswith("experts.gate_up_proj") for k in _keys(fused))
    original = _logits(AutoModelForCausalLM.from_pretrained(root / "minimax" / "hf"), ids)
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(fused), ids), original, atol=1e-5, rtol=0)
