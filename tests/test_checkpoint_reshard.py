"""Save at world 4 (ep 2, ZeRO 3); load at world 2 (ep 2, ZeRO 1) and world 4 (ep 4, ZeRO 2), and back.

Full parameters and AdamW states after loading equal the saved ones exactly,
and the next step's loss equals the one the original layout computes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import autoep
from autoep.checkpoint.manager import full_tensor
from autoep.launch import run_local
from autoep.models.tiny import build_tiny_model
from autoep.train import train_step

MODEL = "tiny-deepseek-v3"
GLOBAL_ROWS = 4
SEQ = 8


def _batches(steps: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(0, 256, (GLOBAL_ROWS, SEQ), generator=gen) for _ in range(steps)]


def _setup(ep: int, zero: int):
    model = build_tiny_model(MODEL, seed=3)
    config = autoep.AutoEPConfig(ep_size=ep, zero_stage=zero, gradient_clipping=1.0)
    autoep.parallelize(model, config)
    return model, autoep.build_optimizer(model, config)


def _my_rows(batch: torch.Tensor) -> torch.Tensor:
    per_rank = GLOBAL_ROWS // dist.get_world_size()
    return batch[dist.get_rank() * per_rank : (dist.get_rank() + 1) * per_rank]


def _snapshot(model, optimizer) -> dict[str, torch.Tensor]:
    """Full parameters and optimizer states; states merged over ranks (ZeRO 1: each rank owns some)."""
    names = {p: n for n, p in model.named_parameters()}
    out = {f"param/{n}": full_tensor(p).detach().clone() for n, p in model.named_parameters()}
    states = {}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            states[f"{key}/{names[param]}"] = full_tensor(value).detach().clone()
    every_rank = [None] * dist.get_world_size()
    dist.all_gather_object(every_rank, states)
    for rank_states in every_rank:
        out.update(rank_states)
    return out


def save_side(root: str, ep: int = 2, zero: int = 3) -> dict:
    model, optimizer = _setup(ep=ep, zero=zero)
    batches = _batches(4)
    for batch in batches[:3]:
        train_step(model, optimizer, [_my_rows(batch)], max_grad_norm=1.0)
    autoep.save_checkpoint(root, model, optimizer, step=3, extra={"note": "hello"})
    snapshot = _snapshot(model, optimizer)
    next_loss = train_step(model, optimizer, [_my_rows(batches[3])], max_grad_norm=1.0).loss
    owned = model.autoep.owned is not None
    return {"snapshot": snapshot if dist.get_rank() == 0 else None, "next_loss": next_loss, "owned": owned}


def load_side(root: str, ep: int, zero: int) -> dict:
    model, optimizer = _setup(ep=ep, zero=zero)
    state = autoep.load_checkpoint(root, model, optimizer)
    snapshot = _snapshot(model, optimizer)
    next_loss = train_step(model, optimizer, [_my_rows(_batches(4)[3])], max_grad_norm=1.0).loss
    return {
        "snapshot": snapshot if dist.get_rank() == 0 else None,
        "next_loss": next_loss,
        "step": state.step,
        "extra": state.extra,
        "layout": state.layout,
    }


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("ckpt")
    return root, run_local(save_side, 4, str(root))[0]


@pytest.mark.parametrize(("world", "ep", "zero"), [(2, 2, 1), (4, 4, 2), (4, 1, 0)])
def test_reshard_on_load(saved, world: int, ep: int, zero: int) -> None:
    root, original = saved
    loaded = run_local(load_side, world, str(root), ep, zero)[0]
    assert loaded["step"] == 3 and loaded["extra"] == {"note": "hello"}
    assert loaded["layout"] == {"world_size": 4, "ep_size": 2, "zero_stage": 3, "tp_size": 1}
    want, got = original["snapshot"], loaded["snapshot"]
    assert got.keys() == want.keys()
    assert any(k.startswith("exp_avg_sq/") and "experts" in k for k in want)  # expert Adam states included
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    assert abs(loaded["next_loss"] - original["next_loss"]) <= 1e-5


def test_owned_zero1_state_saves_and_reshards(tmp_path) -> None:
    """ZeRO 1 (each rank holds the optimizer state of the parameters it owns, experts split over edp = 2)
    saves a checkpoint that ZeRO 3 at another world size loads exactly."""
    original = run_local(save_side, 4, str(tmp_path), 2, 1)[0]
    assert original["owned"]  # the bucketed ZeRO 1, not FSDP's
    loaded = run_local(load_side, 2, str(tmp_path), 1, 3)[0]
    assert loaded["layout"] == {"world_size": 4, "ep_size": 2, "zero_stage": 1, "tp_size": 1}
    want, got = original["snapshot"], loaded["snapshot"]
    assert got.keys() == want.keys() and any(k.startswith("exp_avg/") and "experts" in k for k in want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    assert abs(loaded["next_loss"] - original["next_loss"]) <= 1e-5


def test_checkpoint_layout_on_disk(saved) -> None:
    root, _ = saved
    assert (root / "latest").read_text() == "step_00000003"
    step_dir = root / "step_00000003"
    assert (step_dir / ".metadata").is_file() and (step_dir / "autoep.json").is_file()
    assert sorted(p.name for p in (step_dir / "rng").iterdir()) == [f"rank_0000{r}.pt" for r in range(4)]
    assert not list(root.glob(".*.partial"))
