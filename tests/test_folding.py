"""Folding MoE layers over tensor-parallel peers, on 4 real gloo ranks (one spawn).

Each rank belongs to a tp group (peers feed the MoE layers identical tokens)
and a dp group (peers hold different data). The dense path is replicated over
tp here, so only the MoE layers' folding is under test: every peer dispatches
a disjoint share of the tokens, and after the DESIGN.md reductions (dense and
router gradients: mean over dp; expert gradients: sum over edp, divided by dp)
loss and every gradient must equal one process training the unconverted model
on the whole global batch. Layouts: tp 2 x dp 2 with ep 2 (an EP group is the
two lanes of one data shard) and ep 4, and tp 4 x dp 1 with ep 2 (expert
replicas hold different lanes' tokens of the same data).
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

import autoep
from autoep.errors import ConfigError
from autoep.launch import run_local
from autoep.models.tiny import build_tiny_model
from autoep.parallel.fold import gather_lane_rows, lane_rows, take_lane_rows
from autoep.parallel.groups import build_expert_mesh

WORLD, SEQ, ROWS = 4, 5, 2  # ROWS sequences per data shard; 2·5 = 10 tokens: uneven lane shares at tp 4
LAYOUTS = [(2, 2), (2, 4), (4, 2)]  # (tp, ep)
FAMILIES = ["tiny-mixtral", "tiny-deepseek-v3", "tiny-gpt-oss"]


def _scenario(name: str, tp: int, ep: int) -> list[str]:
    """Problems found (empty when loss and all gradients match the reference)."""
    dp = WORLD // tp
    mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
    tp_group, dp_group = mesh["tp"].get_group(), mesh["dp"].get_group()
    shard = mesh["dp"].get_local_rank()
    expert_mesh = build_expert_mesh(ep)

    reference = build_tiny_model(name, seed=3)
    model = copy.deepcopy(reference)
    autoep.convert(model, ep, ep_group=expert_mesh["ep"], fold_group=tp_group, stats_group=dp_group)
    vocab = reference.config.vocab_size
    ids = torch.randint(0, vocab, (dp * ROWS, SEQ), generator=torch.Generator().manual_seed(11))

    ref_loss = torch.stack([reference(input_ids=part, labels=part).loss for part in ids.split(ROWS)]).mean()
    ref_loss.backward()
    mine = ids[shard * ROWS : (shard + 1) * ROWS]
    loss = model(input_ids=mine, labels=mine).loss
    loss.backward()

    problems = []
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss, group=dp_group)
    if not torch.allclose(mean_loss / dp, ref_loss.detach(), atol=1e-5):
        problems.append(f"loss {float(mean_loss / dp)} != {float(ref_loss)}")
    ref_grads = {n: p.grad for n, p in reference.named_parameters()}
    for pname, param in model.named_parameters():
        grad = param.grad
        if isinstance(grad, DTensor):  # an expert shard: replicas over edp hold different tokens' sums
            local = grad.to_local().clone()
            dist.all_reduce(local, group=expert_mesh["edp"].get_group())
            grad = DTensor.from_local(local / dp, grad.device_mesh, grad.placements).full_tensor()
        else:
            grad = grad.clone()
            dist.all_reduce(grad, group=dp_group)
            grad /= dp
        if not torch.allclose(grad, ref_grads[pname], atol=2e-5, rtol=1e-4):
            problems.append(f"{pname}: max diff {float((grad - ref_grads[pname]).abs().max()):.2e}")
    return [f"{name} tp{tp} ep{ep} rank {dist.get_rank()}: {p}" for p in problems]


def _lane_ops() -> list[str]:
    """take/gather over a tp-4 group with 10 rows: forward and the replicated-gradient backward."""
    group = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",)).get_group()
    x = torch.arange(30.0).view(10, 3).requires_grad_()
    mine = take_lane_rows(x, group)
    start, end = lane_rows(10, dist.get_rank(), WORLD)
    out = gather_lane_rows(mine * 2, 10, group)
    out.backward(torch.ones_like(out))
    problems = []
    if not torch.equal(mine, x[start:end]):
        problems.append("take_lane_rows took the wrong rows")
    if not torch.equal(out, 2 * x):
        problems.append("gather_lane_rows did not restore the rows in order")
    if not torch.equal(x.grad, torch.full_like(x, 2.0)):  # not 2·tp (reduce-scatter), not 0 outside the share
        problems.append(f"input gradient {x.grad[:, 0].tolist()} is not 2 everywhere")
    return problems


def _jitter_refused() -> list[str]:
    """Router jitter would give the lanes different tokens: converting with a fold group refuses it."""
    group = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",)).get_group()
    model = build_tiny_model("tiny-mixtral", seed=0)
    model.config.router_jitter_noise = 0.1
    try:
        autoep.convert(model, fold_group=group)
    except ConfigError as err:
        return [] if "jitter" in str(err) else [f"unexpected error: {err}"]
    return ["a jittering router was folded"]


def _worker() -> list[str]:
    torch.manual_seed(0)
    problems = _lane_ops() + _jitter_refused()
    for tp, ep in LAYOUTS:
        for name in FAMILIES:
            problems += _scenario(name, tp, ep)
    return problems


def test_folded_moe_layers_train_like_one_process():
    results = run_local(_worker, WORLD)
    problems = [p for rank in sorted(results) for p in results[rank]]
    assert not problems, "\n".join(problems[:20])


def test_lane_rows_cover_every_row_once():
    for rows in (0, 1, 3, 10, 16):
        for lanes in (1, 2, 4):
            spans = [lane_rows(rows, lane, lanes) for lane in range(lanes)]
            assert [i for start, end in spans for i in range(start, end)] == list(range(rows))
