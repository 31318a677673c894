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


def _grads(bucket_bytes: int, accumulate: bool, b_in_synced: bool = True) -> dict:
    rank = dist.get_rank()
    model = _Three()
    reducer = ReplicatedGradients([(list(model.parameters()), dist.group.WORLD)], 2, bucket_bytes=bucket_bytes)
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
    return {
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
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


def _scenarios() -> dict:
    return {
        "one_bucket": _grads(2**20, accumulate=False),
        "per_param_buckets": _grads(1, accumulate=False),
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
