"""ZeRO 0's bucketed all-reduce (autoep.parallel.replicate), on 2 real gloo ranks.

The exactness suite (tests/test_training_exactness.py) proves ZeRO 0 equals one
process; these pin what it cannot see: which backend a config gets, gradients
a rank (or every rank) did not produce, accumulation without sync, many
buckets started in order, and one all-reduce per bucket.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

import autoep
from autoep.launch import run_local
from autoep.models.tiny import build_tiny_model
from autoep.moe.experts import local_tensor
from autoep.parallel.replicate import ReplicatedGradients
from autoep.report.costs import CollectiveCounter


class _Three(nn.Module):
    """``a`` used by every rank, ``b`` by rank 0 only, ``c`` by nobody."""

    def __init__(self) -> None:
        super().__init__()
        self.use_b = True
        self.a = nn.Parameter(torch.arange(6.0).view(2, 3))
        self.b = nn.Parameter(torch.ones(3))
        self.c = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = (x @ self.a).sum()
        return out + (self.b * x.sum()).sum() if dist.get_rank() == 0 and self.use_b else out


def _grads(bucket_bytes: int, accumulate: bool, b_in_synced: bool = True, scatter: bool = False) -> dict:
    rank = dist.get_rank()
    model = _Three()
    group = [(list(model.parameters()), dist.group.WORLD)]
    reducer = ReplicatedGradients(group, 2, bucket_bytes=bucket_bytes, runs=scatter, scatter=scatter)
    x = torch.full((4, 2), float(rank + 1))
    counter = CollectiveCounter()
    if accumulate:  # two micro-batches, the first without sync: equals one backward of their sum
        reducer.set_requires_gradient_sync(False)
        model(x).backward()
        reducer.set_requires_gradient_sync(True)
    model.use_b = b_in_synced
    with counter:
        model(x).backward()
    reducer.remove()
    owners = {}
    for bucket in reducer.buckets():
        owners.update({id(p): owner for p, owner in zip(bucket.params, bucket.layout.owners, strict=True)})
    return {
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "owner": {n: owners[id(p)] for n, p in model.named_parameters()},
        "all_reduces": counter.counts["allreduce_"],
        "buckets": len(reducer._groups[0].buckets),
    }


def _hf_backends() -> dict:
    out = {}
    for name, mp in (("fp32", {}), ("bf16", {"param_dtype": "bfloat16"})):
        model = build_tiny_model("tiny-mixtral", seed=0)
        autoep.parallelize(model, autoep.AutoEPConfig(ep_size=2, zero_stage=0, mixed_precision=mp))
        out[name] = (isinstance(model, FSDPModule), model.autoep.replicated is not None)
        if name == "fp32":
            ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
            counter = CollectiveCounter()
            loss = model(input_ids=ids, labels=ids).loss
            with counter:
                loss.backward()
            out["backward_all_reduces"] = counter.counts["allreduce_"]
            out["buckets"] = sum(len(g.buckets) for g in model.autoep.replicated._groups)
    return out


def _owned_vs_zero0() -> dict:
    """Three AdamW steps of tiny-mixtral (ep 2: dense split over dp 2, experts whole on each rank) with
    clipping active, at ZeRO 0 and at ZeRO 1 and 2 with owned updates; the model built on the meta device
    (buffers allocated after materialisation); plus which backend bf16 compute gets."""
    from autoep.train import train_step

    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 256, (2, 8), generator=gen)[dist.get_rank() :][:1] for _ in range(3)]
    out = {}
    for zero in (0, 1, 2):
        with torch.device("meta"):
            model = build_tiny_model("tiny-mixtral", seed=0)
        autoep.parallelize(model, autoep.AutoEPConfig(ep_size=2, zero_stage=zero))
        optimizer = autoep.build_optimizer(model, model.autoep.config)
        model(input_ids=batches[0], labels=batches[0]).loss.backward()
        with_grads = sorted(n for n, p in model.named_parameters() if p.grad is not None)
        devices = {local_tensor(p.grad).device.type for p in model.parameters() if p.grad is not None}
        optimizer.zero_grad()
        counter = CollectiveCounter()
        with counter:
            results = [train_step(model, optimizer, [b], max_grad_norm=0.05) for b in batches]
        names = {id(p): n for n, p in model.named_parameters()}
        out[zero] = {
            "losses": [r.loss for r in results],
            "norms": [r.grad_norm for r in results],
            "params": {n: local_tensor(p).detach().clone() for n, p in model.named_parameters()},
            "state": sorted(names[id(p)] for p in optimizer.state),
            "with_grads": with_grads,
            "grad_devices": devices,
            "all_gathers": counter.counts["_allgather_base_"],
            "buckets": sum(1 for _ in model.autoep.replicated.buckets()),
            "owned": model.autoep.owned is not None,
            "grads_after_step": [n for n, p in model.named_parameters() if p.grad is not None],
        }
        if zero == 2:  # a second synchronised backward on top of ZeRO 2's reduced gradients cannot be added
            model(input_ids=batches[0], labels=batches[0]).loss.backward()
            try:
                model(input_ids=batches[0], labels=batches[0]).loss.backward()
                out["second_backward"] = "accepted"
            except RuntimeError as error:
                out["second_backward"] = str(error)
    model = build_tiny_model("tiny-mixtral", seed=0)
    bf16 = autoep.AutoEPConfig(ep_size=2, zero_stage=1, mixed_precision={"param_dtype": "bfloat16"})
    autoep.parallelize(model, bf16)
    out["bf16"] = (isinstance(model, FSDPModule), model.autoep.owned is not None)
    return out


def _scenarios() -> dict:
    return {
        "owned": _owned_vs_zero0(),
        "one_bucket": _grads(2**20, accumulate=False),
        "per_param_buckets": _grads(1, accumulate=False),
        # ZeRO 2's reduction, one bucket per parameter: earlier buckets may be handed out while later ones run
        "scattered": _grads(1, accumulate=True, scatter=True),
        "accumulated": _grads(1, accumulate=True),
        # b's gradient exists only from the unsynced micro-batch: the synced backward never reaches it
        "leftover": _grads(1, accumulate=True, b_in_synced=False),
        "hf": _hf_backends(),
    }


@pytest.fixture(scope="module")
def world2() -> dict:
    return run_local(_scenarios, 2)


def _expected(micro_batches: int) -> dict[str, torch.Tensor | None]:
    # d/da sum(x @ a) = x.sum(0) broadcast over columns; ranks bring x = 1 and x = 2 (4 rows, 2 cols).
    a = torch.tensor([[4.0], [4.0]]).expand(2, 3) * (1 + 2) / 2  # mean over the 2 ranks
    b = torch.full((3,), 8.0) / 2  # rank 0's x.sum() = 8, rank 1 brings nothing: zeros count
    return {"a": a * micro_batches, "b": b * micro_batches, "c": None}


@pytest.mark.parametrize("scenario", ["one_bucket", "per_param_buckets"])
def test_gradients_are_the_mean_and_untouched_stay_none(world2, scenario) -> None:
    for rank in (0, 1):
        got = world2[rank][scenario]["grads"]
        for name, want in _expected(1).items():
            if want is None:
                assert got[name] is None, f"{scenario}: no rank produced {name}'s gradient, yet it has one"
            else:
                torch.testing.assert_close(got[name], want, rtol=0, atol=0)


def test_one_all_reduce_per_bucket(world2) -> None:
    assert world2[0]["one_bucket"]["buckets"] == 1 and world2[0]["one_bucket"]["all_reduces"] == 1
    per_param = world2[0]["per_param_buckets"]
    assert per_param["buckets"] == 3 and per_param["all_reduces"] == 3


def test_unsynced_micro_batch_accumulates_into_the_reduction(world2) -> None:
    for rank in (0, 1):
        got = world2[rank]["accumulated"]["grads"]
        for name, want in _expected(2).items():
            if want is None:
                assert got[name] is None
            else:
                torch.testing.assert_close(got[name], want, rtol=0, atol=0)


def test_zero0_backend_choice_and_bucketed_backward(world2) -> None:
    hf = world2[0]["hf"]
    assert hf["fp32"] == (False, True), "fp32 ZeRO 0 must use the bucketed all-reduce, not FSDP"
    assert hf["bf16"] == (True, False), "bf16 compute over fp32 weights needs FSDP's cast"
    # ep 2 on 2 ranks: dense over dp = 2 (one bucket, one all-reduce), experts over edp = 1 (no collective).
    assert hf["buckets"] == 2 and hf["backward_all_reduces"] == 1


def test_gradient_only_from_an_unsynced_micro_batch_is_reduced(world2) -> None:
    want = _expected(2)
    want["b"] = _expected(1)["b"]  # rank 0's first micro-batch alone, averaged with rank 1's nothing
    for rank in (0, 1):
        got = world2[rank]["leftover"]["grads"]
        assert got["c"] is None
        for name in ("a", "b"):
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)


@pytest.mark.parametrize("zero", [1, 2])
def test_owned_updates_equal_zero0_with_split_state(world2, zero) -> None:
    for rank in (0, 1):
        z0, owned = world2[rank]["owned"][0], world2[rank]["owned"][zero]
        assert owned["owned"] and not z0["owned"]
        # 2 ranks: the same sums, bit for bit; ZeRO 2's norm adds the squares per owner, in another order
        exact = {"rtol": 0, "atol": 0} if zero == 1 else {"rtol": 1e-6, "atol": 1e-7}
        assert owned["losses"][0] == z0["losses"][0]
        torch.testing.assert_close(owned["losses"], z0["losses"], **exact)
        torch.testing.assert_close(owned["norms"], z0["norms"], **exact)
        assert z0["norms"][0] > 0.05  # clipping was active
        for name, value in z0["params"].items():
            torch.testing.assert_close(owned["params"][name], value, **exact, msg=name)
    for zero_ in (0, zero):  # dense parameters stay replicated: every rank applied the same update
        params0, params1 = world2[0]["owned"][zero_]["params"], world2[1]["owned"][zero_]["params"]
        for name in set(params0) - _experts(set(params0)):
            assert torch.equal(params0[name], params1[name]), f"ZeRO {zero_}: {name} differs between ranks"
        # one in-place all-gather per bucket and step (experts: a group of one rank, nothing to gather)
        assert owned["all_gathers"] == 3 * (owned["buckets"] - 1) and z0["all_gathers"] == 0
        assert owned["grads_after_step"] == []
        assert owned["grad_devices"] == {"cpu"}  # built on meta: buckets allocated on the real device
    every = set(world2[0]["owned"][0]["state"])
    mine, theirs = set(world2[0]["owned"][zero]["state"]), set(world2[1]["owned"][zero]["state"])
    assert mine and theirs and not (mine & theirs - _experts(every)), "a dense parameter updated on both ranks"
    assert mine | theirs == every, "a parameter nobody updates"
    grads0, grads1 = set(world2[0]["owned"][zero]["with_grads"]), set(world2[1]["owned"][zero]["with_grads"])
    if zero == 1:
        assert grads0 == grads1 == set(world2[0]["owned"][0]["with_grads"])  # replicated gradients
    else:  # each dense gradient on its owner only, as its optimizer state
        assert grads0 - _experts(every) == mine - _experts(every)
        assert grads1 - _experts(every) == theirs - _experts(every)
    assert world2[0]["owned"]["bf16"] == (True, False), "bf16 compute over fp32 weights needs FSDP's cast"


def test_zero2_refuses_to_add_onto_reduced_gradients(world2) -> None:
    assert "zero_grad" in world2[0]["owned"]["second_backward"]


def _experts(names: set[str]) -> set[str]:
    return {n for n in names if ".experts." in n}


def test_scattered_gradients_reach_their_owner_only(world2) -> None:
    """Bucket by bucket (handed out early where the reduction is already done), each gradient lands on the
    rank that owns its run, equal to the mean; the other rank holds none; nobody's stays None everywhere."""
    want = _expected(2)
    for rank in (0, 1):
        got, owner = world2[rank]["scattered"]["grads"], world2[rank]["scattered"]["owner"]
        assert world2[rank]["scattered"]["buckets"] == 3
        for name in ("a", "b"):
            if owner[name] == rank:
                torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
            else:
                assert got[name] is None, f"rank {rank} holds {name}'s gradient, owned by rank {owner[name]}"
        assert got["c"] is None
