"""What a MoE layer costs besides FLOPs, counted exactly (autoep.report.costs), on both conversion paths.

* ep 2 on two gloo ranks (one spawn): one host sync in forward (the split-size
  exchange), none in backward; all-to-all rows equal the lower bound (each
  token sent once per distinct destination rank, in dispatch and in combine).
* ep 1, dropless: no host sync at all (every choice is an assignment, and
  counting per expert is a scatter-add, not CUDA's host-sized ``bincount``).
* A whole training step at ep 1 reads the device once: its losses and
  gradient norm together.
* One process: recomputing the experts' activation in backward gives the same
  outputs and gradients bit for bit and keeps fewer bytes for backward.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import autoep
from autoep.launch import run_local
from autoep.models import zoo
from autoep.models.tiny import build_tiny_model
from autoep.moe.balance import BalanceConfig
from autoep.moe.row_message import RowLayout
from autoep.moe.sites import moe_sites
from autoep.report.costs import CollectiveCounter, HostSyncCounter, SavedBytes

MODELS = {"block path": "tiny-mixtral", "experts path": "zoo:minimax"}


def _build(name: str) -> torch.nn.Module:
    return zoo.build_tiny(name.removeprefix("zoo:"), seed=1) if name.startswith("zoo:") else build_tiny_model(name)


def _block(model: torch.nn.Module):
    path, site = moe_sites(model)[0]
    return model.get_submodule(path), site


def _ep2_costs() -> dict:
    torch.set_num_threads(1)
    results = {}
    for label, name in MODELS.items():
        model = _build(name)
        autoep.convert(model, ep_size=2)
        block, site = _block(model)
        seen = []
        dispatch = site.dispatcher.start_dispatch

        def recording(x_TD, weights_TK, indices_TK, dispatch=dispatch, seen=seen):
            seen.append((indices_TK.clone(), x_TD.shape[-1], x_TD.dtype, indices_TK.shape[1]))
            return dispatch(x_TD, weights_TK, indices_TK)

        site.dispatcher.start_dispatch = recording
        hidden = model.config.get_text_config().hidden_size
        x = torch.randn(1, 64, hidden, generator=torch.Generator().manual_seed(dist.get_rank())).requires_grad_(True)
        with HostSyncCounter() as fwd_syncs, CollectiveCounter() as fwd_comm:
            out = block(x)
        out = out[0] if isinstance(out, tuple) else out
        with HostSyncCounter() as bwd_syncs, CollectiveCounter() as bwd_comm:
            out.sum().backward()
        indices_TK, hidden_size, dtype, top_k = seen[0]
        layout, width = RowLayout(hidden_size, top_k, dtype), dtype.itemsize
        per_rank = site.num_experts // 2
        ranks_TK = torch.div(indices_TK, per_rank, rounding_mode="floor")
        rows = int(torch.zeros(len(ranks_TK), 3, dtype=torch.bool).scatter_(1, ranks_TK, True)[:, :2].sum())
        results[label] = {
            "syncs": (fwd_syncs.total, bwd_syncs.total, dict(fwd_syncs.counts)),
            # dispatch + combine rows, plus the weights and ids packed into each dispatched row
            "a2a": (
                fwd_comm.all_to_all_bytes,
                bwd_comm.all_to_all_bytes,
                2 * rows * hidden_size * width + rows * (layout.columns - hidden_size) * width,
            ),
        }
    # The global aux loss all-reduces counts and token totals in forward: no read-back of the total.
    model = _build("tiny-mixtral")
    autoep.convert(model, ep_size=2, balance=BalanceConfig(global_aux_loss_coef=0.01))
    block, _ = _block(model)
    block.train()
    with HostSyncCounter() as syncs:
        block(torch.randn(1, 64, model.config.hidden_size))
    results["global aux loss"] = (syncs.total, dict(syncs.counts), sorted(block.balance_losses))
    return results


@pytest.fixture(scope="module")
def ep2() -> dict:
    return run_local(_ep2_costs, 2)


@pytest.mark.parametrize("path", list(MODELS))
def test_one_host_sync_in_forward_none_in_backward(ep2, path):
    for rank in ep2.values():
        forward, backward, kinds = rank[path]["syncs"]
        assert (forward, backward) == (1, 0), kinds


def test_the_global_aux_loss_adds_no_host_sync(ep2):
    for rank in ep2.values():
        total, kinds, losses = rank["global aux loss"]
        assert "global_aux_loss" in losses and total == 1, kinds


@pytest.mark.parametrize("path", list(MODELS))
def test_all_to_all_sends_each_token_once_per_destination_rank(ep2, path):
    # Summed over the EP group (a rank sends back in combine what it received in dispatch).
    forward, backward, bound = (sum(rank[path]["a2a"][i] for rank in ep2.values()) for i in range(3))
    counts_exchange = len(ep2) * 2 * 2 * 8  # per rank: rows and assignments for each of 2 peers, int64
    assert forward == bound + counts_exchange
    assert backward == bound


@pytest.mark.parametrize("name", list(MODELS.values()))
def test_no_host_sync_at_ep_1(name):
    model = _build(name)
    autoep.convert(model, ep_size=1)
    block, _ = _block(model)
    x = torch.randn(1, 64, model.config.get_text_config().hidden_size, requires_grad=True)
    with HostSyncCounter() as fwd_syncs:
        out = block(x)
    out = out[0] if isinstance(out, tuple) else out
    with HostSyncCounter() as bwd_syncs:
        out.sum().backward()
    assert (fwd_syncs.total, bwd_syncs.total) == (0, 0), (fwd_syncs.counts, bwd_syncs.counts)


def test_a_training_step_reads_the_device_once():
    from autoep.train import train_step

    model = build_tiny_model("tiny-mixtral")
    autoep.convert(model, ep_size=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)  # as autoep.build_optimizer makes it
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    train_step(model, optimizer, [ids, ids], max_grad_norm=1.0)
    with HostSyncCounter() as syncs:
        result = train_step(model, optimizer, [ids, ids], max_grad_norm=1.0)  # 2 micro-batches, clipping on
    assert dict(syncs.counts) == {"tolist": 1}
    assert result.loss > 0 and result.grad_norm > 0


@pytest.mark.parametrize("name", list(MODELS.values()))
def test_recomputing_the_expert_activation_is_exact_and_keeps_less(name):
    torch.manual_seed(0)
    model = _build(name)
    autoep.convert(model, ep_size=1)
    block, site = _block(model)
    hidden = model.config.get_text_config().hidden_size
    x = torch.randn(1, 128, hidden)
    runs = {}
    for recompute in (False, True):
        site.recompute_activation = recompute
        xx = x.clone().requires_grad_(True)
        with SavedBytes(block) as saved:
            out = block(xx)
        out = out[0] if isinstance(out, tuple) else out
        out.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}
        block.zero_grad(set_to_none=True)
        runs[recompute] = (out.detach(), xx.grad, grads, saved.bytes)
    (out0, gx0, g0, kept0), (out1, gx1, g1, kept1) = runs[False], runs[True]
    assert torch.equal(out0, out1) and torch.equal(gx0, gx1)
    assert g0.keys() == g1.keys() and all(torch.equal(g0[k], g1[k]) for k in g0)
    assert kept1 < kept0 * 0.8, (kept0, kept1)
