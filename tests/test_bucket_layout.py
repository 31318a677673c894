"""Bucket cuts, ownership split and run layouts: the rules the reducer and the plan share."""

from __future__ import annotations

import torch

from autoep.parallel.bucket_layout import cut_buckets, owners_by_bucket, packed, runs, split_runs

F32, BF16 = torch.float32, torch.bfloat16


def _meta(numels: list[int], dtypes: list[torch.dtype] | None = None) -> list[torch.Tensor]:
    """Shards with sizes and dtypes but no storage (a 16 MiB one costs nothing)."""
    return [torch.empty(n, dtype=d, device="meta") for n, d in zip(numels, dtypes or [F32] * len(numels), strict=True)]


def test_buckets_close_once_full_and_at_a_dtype_change() -> None:
    assert cut_buckets(_meta([10, 10, 10, 10, 10]), cap=80) == [range(0, 2), range(2, 4), range(4, 5)]
    mixed = _meta([4, 4, 4, 4], [F32, F32, BF16, F32])
    assert cut_buckets(mixed, cap=100) == [range(0, 2), range(2, 3), range(3, 4)]
    assert cut_buckets(_meta([500, 1]), cap=20) == [range(0, 1), range(1, 2)]  # an oversized one alone
    assert cut_buckets(_meta([10, 10, 10], [BF16] * 3), cap=40) == [range(0, 2), range(2, 3)]  # bytes, not elements
    assert cut_buckets([], cap=20) == []


def test_ownership_is_split_within_each_bucket() -> None:
    numels = [5, 5, 5, 5, 100]
    assert split_runs(numels, 2) == [0, 0, 0, 0, 1]  # one split over everything: rank 0 gets the four small ones
    assert owners_by_bucket(_meta(numels), parts=2) == split_runs(numels, 2)  # one 25 MiB bucket holds them all
    big = _meta([2**22] * 4)  # 16 MiB each: buckets of two
    assert owners_by_bucket(big, parts=2) == [0, 1, 0, 1]


def test_run_layout_gives_every_element_one_place_inside_its_owners_run() -> None:
    numels = [3, 7, 2, 9, 1]
    layout = runs(numels, 3)
    used = set()
    for offset, flag, owner, n in zip(layout.offsets, layout.flags, layout.owners, numels, strict=True):
        span = set(range(offset, offset + n)) | {flag}
        assert all(owner * layout.region <= i < (owner + 1) * layout.region for i in span)
        assert not span & used
        used |= span
    assert layout.owners == split_runs(numels, 3) and layout.numel == 3 * layout.region
    flat = packed(numels)
    assert flat.offsets == [0, 3, 10, 12, 21] and flat.flags == [22, 23, 24, 25, 26] and flat.numel == 27
