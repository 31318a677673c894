"""Tensor parallelism with folded MoE layers, through `autoep.parallelize` and `train_step`, on 4 gloo ranks.

One SGD(lr=1) step, so a parameter's change is minus its gradient: every
gradient, gathered to a full tensor, the step's loss and the global gradient
norm must equal one process training the unconverted model on the global
batch. Layouts fold the
MoE layers over tp 2 (dp 2) with the dense path tensor-parallel where the
family's plan allows, at ZeRO 0-3, ep 2 and 4, with accumulation, with
activation checkpointing, and with the global aux loss and z-loss on. The
step's routing statistics must count each token once (tp peers see the same
tokens) and the data each rank trains on must follow its dp rank.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import autoep
from autoep.launch import run_local
from autoep.models.tiny import build_tiny_model
from autoep.moe.balance import BalanceConfig
from autoep.train import train_step

WORLD, TP, SEQ = 4, 2, 6
# Losses whose mean over data shards is the same loss on the whole batch, so one process
# with the same settings is the reference: z-loss (a mean over tokens) and the global aux
# loss (global counts, linear in the local mean probabilities).
BALANCE = {"global_aux_loss_coef": 0.5, "z_loss_coef": 0.05}
# (model, zero, ep, rows per micro-batch, micro-batches, activation checkpointing, balancing losses)
CASES = [
    ("tiny-qwen3-moe", 2, 2, 2, 1, False, False),
    ("tiny-mixtral", 3, 4, 1, 2, False, False),
    ("tiny-deepseek-v3", 1, 2, 2, 1, False, True),
    ("tiny-qwen2-moe", 0, 2, 1, 1, False, False),
    ("tiny-qwen3-moe", 3, 2, 2, 1, True, False),  # recomputed forwards repeat the fold's collectives
]


def global_batch(vocab: int, rows: int) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, SEQ), generator=torch.Generator().manual_seed(5))


def full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}


def _step(name: str, zero: int, ep: int, micro: int, accum: int, checkpointing: bool, balancing: bool) -> dict:
    model = build_tiny_model(name, seed=2)
    config = autoep.AutoEPConfig(
        ep_size=ep,
        tp_size=TP,
        zero_stage=zero,
        micro_batch_size=micro,
        activation_checkpointing=checkpointing,
        load_balancing=BALANCE if balancing else {},
    )
    autoep.parallelize(model, config)
    state = model.autoep
    before = full_params(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    rows = micro * accum
    batch = global_batch(model.config.vocab_size, WORLD // TP * rows)
    mine = batch[state.dp_rank * rows : (state.dp_rank + 1) * rows]
    result = train_step(model, optimizer, list(mine.split(micro)))
    after = full_params(model)
    sharded = sorted(
        n for n, p in model.named_parameters() if isinstance(p, DTensor) and "tp" in p.device_mesh.mesh_dim_names
    )
    return {
        "loss": result.loss,
        "grad_norm": result.grad_norm,
        "routed": float(result.load.routed_LE.sum()),
        "moe_layers": result.load.routed_LE.shape[0],
        "grads": {n: before[n] - after[n] for n in before} if dist.get_rank() == 0 else None,
        "tp_sharded": sharded,
        "dp_rank": state.dp_rank,
    }


def _worker() -> dict:
    return {case: _step(*case) for case in CASES}


def _reference(name: str, rows: int, balancing: bool) -> dict:
    model = build_tiny_model(name, seed=2)
    if balancing:
        autoep.convert(model, balance=BalanceConfig(**BALANCE))  # the loss hook adds them to out.loss
    model.train()
    batch = global_batch(model.config.vocab_size, rows)
    out = model(input_ids=batch, labels=batch)
    out.loss.backward()
    return {
        "loss": float(out.loss.detach()),
        "grad_norm": float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))),
        "assignments_per_layer": batch.numel() * model.config.num_experts_per_tok,
        "grads": {n: p.grad for n, p in model.named_parameters()},
    }


@pytest.fixture(scope="module")
def results() -> dict[int, dict]:
    return run_local(_worker, WORLD)


def _case_id(case: tuple) -> str:
    name, zero, ep, micro, accum, checkpointing, balancing = case
    return f"{name}-zero{zero}-ep{ep}-micro{micro}x{accum}{'-ac' * checkpointing}{'-balance' * balancing}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_tp_fold_step_equals_one_process(results, case):
    name, _, _, micro, accum, _, balancing = case
    want = _reference(name, WORLD // TP * micro * accum, balancing)
    got = results[0][case]
    assert got["loss"] == pytest.approx(want["loss"], abs=1e-5)
    # the global norm counts TP-split, lane-repeated and expert tensors each once
    assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
    # each token counted once, not once per tp peer
    assert got["routed"] == got["moe_layers"] * want["assignments_per_layer"]
    assert [results[r][case]["dp_rank"] for r in range(WORLD)] == [0, 0, 1, 1]  # tp peers share a data shard
    assert got["tp_sharded"], "nothing was tensor-parallel"
    assert got["grads"].keys() == want["grads"].keys()
    for pname, grad in want["grads"].items():
        torch.testing.assert_close(got["grads"][pname], grad, atol=2e-5, rtol=1e-4, msg=pname)
