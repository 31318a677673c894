"""Checkpoint integrity under injected faults (world 4, gloo, tiny models).

* A byte flipped in a shard file (same size: DCP alone would load it) is
  refused by ``load_checkpoint`` on every rank with the file named, and by
  ``autoep check``; an untouched checkpoint passes both.
* A save that fails on one rank (its file-size limit set to 64 KiB: writes
  fail with EFBIG, as on a full disk) raises the same ``CheckpointError`` on
  every rank, leaves ``latest`` and the previous checkpoint intact, and the
  run can load it.
* Tied input/output embeddings: saved at world 4 / ep 2 / ZeRO 3, loaded at
  world 2 / ep 2 / ZeRO 1, exported to HF; transformers' logits equal the
  trained model's.
"""

from __future__ import annotations

import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import autoep
from autoep.checkpoint.manager import full_tensor
from autoep.errors import CheckpointError
from autoep.launch import run_local
from autoep.models.tiny import build_tiny_model
from autoep.train import train_step

CONFIG = dict(ep_size=2, zero_stage=3, optimizer={"type": "AdamW", "params": {"lr": 1e-2}})


def _trained(name: str = "tiny-mixtral", steps: int = 1, **overrides):
    model = build_tiny_model(name, seed=3, **overrides)
    config = autoep.AutoEPConfig(**CONFIG)
    autoep.parallelize(model, config)
    optimizer = autoep.build_optimizer(model, config)
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(9)
    for _ in range(steps):
        batch = torch.randint(0, 256, (dist.get_world_size(), 8), generator=gen)
        train_step(model, optimizer, [batch[rank : rank + 1]])
    return model, optimizer


def _params(model) -> dict[str, torch.Tensor]:
    return {n: full_tensor(p).detach().clone() for n, p in model.named_parameters()}


def _load_error(root: str, model, optimizer) -> str | None:
    try:
        autoep.load_checkpoint(root, model, optimizer)
    except CheckpointError as err:
        return str(err)
    return None


def _world4(base: str) -> dict:
    rank = dist.get_rank()
    out: dict = {}
    # --- a flipped byte -------------------------------------------------------------------------
    model, optimizer = _trained()
    good, bad = f"{base}/good", f"{base}/bad"
    autoep.save_checkpoint(good, model, optimizer, step=1)
    autoep.save_checkpoint(bad, model, optimizer, step=1)
    if rank == 0:
        shard = Path(bad) / "step_00000001" / "__1_0.distcp"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x40
        shard.write_bytes(data)
    dist.barrier()
    out["good_load"] = _load_error(good, model, optimizer)
    out["bad_load"] = _load_error(bad, model, optimizer)
    # --- a save that fails on one rank ------------------------------------------------------------
    saved = _params(model)
    ckpt = f"{base}/full"
    autoep.save_checkpoint(ckpt, model, optimizer, step=1)
    train_step(model, optimizer, [torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(rank))])
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    if rank == 1:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, limit[1]))
    try:
        autoep.save_checkpoint(ckpt, model, optimizer, step=2)
        out["failed_save"] = None
    except CheckpointError as err:
        out["failed_save"] = str(err)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
    out["latest"] = (Path(ckpt) / "latest").read_text().strip()
    out["reload_error"] = _load_error(ckpt, model, optimizer)
    reloaded = _params(model)
    out["reload_diff"] = max((saved[k] - reloaded[k]).abs().max().item() for k in saved)
    # --- tied embeddings: save at world 4 / ep 2 / ZeRO 3 --------------------------------------------
    tied, tied_opt = _trained(steps=2, tie_word_embeddings=True)
    autoep.save_checkpoint(f"{base}/tied", tied, tied_opt, step=2)
    params = _params(tied)
    out["tied_params"] = params if rank == 0 else None
    return out


def _world2(base: str) -> dict:
    model = build_tiny_model("tiny-mixtral", seed=0, tie_word_embeddings=True)
    config = autoep.AutoEPConfig(ep_size=2, zero_stage=1, optimizer=CONFIG["optimizer"])
    autoep.parallelize(model, config)
    optimizer = autoep.build_optimizer(model, config)
    autoep.load_checkpoint(f"{base}/tied", model, optimizer)
    params = _params(model)
    autoep.export_hf(model, f"{base}/tied_hf")
    ids = torch.arange(16).reshape(2, 8)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return {"params": params, "logits": logits}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, dict, dict]:
    base = tmp_path_factory.mktemp("integrity")
    world4 = run_local(_world4, 4, str(base))
    world2 = run_local(_world2, 2, str(base))
    return base, world4, world2


def test_flipped_byte_is_refused_on_every_rank(runs) -> None:
    _, world4, _ = runs
    for rank, out in world4.items():
        assert out["good_load"] is None, (rank, out["good_load"])
        assert out["bad_load"] is not None and "__1_0.distcp" in out["bad_load"], (rank, out["bad_load"])
        assert "checksum mismatch" in out["bad_load"]


def _check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autoep", "check", str(path)], capture_output=True, text=True)


def test_autoep_check_reports_the_damaged_file(runs) -> None:
    base, _, _ = runs
    good, bad = _check(base / "good"), _check(base / "bad")
    assert good.returncode == 0 and "is intact" in good.stdout, good.stdout + good.stderr
    assert bad.returncode == 1 and "__1_0.distcp" in bad.stdout and "checksum mismatch" in bad.stdout, bad.stdout
    missing = _check(base / "nothing-here")
    assert missing.returncode == 2 and "no autoep checkpoint" in missing.stderr


def test_check_catches_a_missing_rng_file(runs, tmp_path) -> None:
    base, _, _ = runs
    copy = tmp_path / "copy"
    shutil.copytree(base / "good", copy)
    (copy / "step_00000001" / "rng" / "rank_00002.pt").unlink()
    result = _check(copy)
    assert result.returncode == 1 and "rng/rank_00002.pt: missing" in result.stdout, result.stdout


def test_failed_save_raises_everywhere_and_keeps_the_previous_checkpoint(runs) -> None:
    _, world4, _ = runs
    for rank, out in world4.items():
        message = out["failed_save"]
        assert message is not None, rank
        assert "rank 1" in message or "File too large" in message or "EFBIG" in message, message
        assert "previous checkpoint" in message
        assert out["latest"] == "step_00000001"
        assert out["reload_error"] is None and out["reload_diff"] == 0.0


def test_tied_embeddings_reshard_and_export(runs) -> None:
    base, world4, world2 = runs
    want = world4[0]["tied_params"]
    assert "lm_head.weight" not in want  # tied: one tensor
    for out in world2.values():
        for name, value in want.items():
            assert torch.equal(out["params"][name], value), name
    hf = AutoModelForCausalLM.from_pretrained(base / "tied_hf")
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    hf.eval()
    with torch.no_grad():
        logits = hf(input_ids=torch.arange(16).reshape(2, 8)).logits
    torch.testing.assert_close(logits, world2[0]["logits"], atol=1e-5, rtol=0)
