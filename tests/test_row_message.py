"""The packed dispatch row (autoep.moe.row_message): token, fp32 weights and ids in one message, bit-exact.

An all-to-all moves bytes without arithmetic, so packing followed by unpacking
(the exchange as an identity) must give back exactly what was packed, and the
gradients must equal those of the unpacked computation, in fp32 and in bf16.
"""

from __future__ import annotations

import pytest
import torch

from autoep.moe.row_message import RowLayout


def _inputs(dtype: torch.dtype, num_ids: int):
    gen = torch.Generator().manual_seed(0)
    x_TD = torch.randn(6, 8, generator=gen).to(dtype).requires_grad_(True)
    token_N = torch.tensor([0, 2, 2, 5, 1, 0, 3])
    # fp32 weights with mantissa bits a bf16 column could not hold
    weights_NK = (torch.rand(7, 3, generator=gen) + 1e-3).requires_grad_(True)
    ids_NK = torch.randint(0, num_ids, (7, 3), generator=gen)
    ids_NK[0, 0] = num_ids  # the "owned elsewhere" sentinel travels too
    return x_TD, token_N, weights_NK, ids_NK


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_and_gradients_are_exact(dtype) -> None:
    num_ids = 300  # more local experts than bf16 holds exactly as numbers (256)
    layout = RowLayout(8, 3, dtype)
    x_TD, token_N, weights_NK, ids_NK = _inputs(dtype, num_ids)
    rows = layout.pack(x_TD, token_N, weights_NK, ids_NK)
    assert rows.dtype == dtype and rows.shape == (7, layout.columns)
    x_ND, w_NK, got_ids = layout.unpack(rows)
    assert torch.equal(x_ND, x_TD[token_N]) and torch.equal(got_ids, ids_NK)
    assert w_NK.dtype == torch.float32 and torch.equal(w_NK, weights_NK), "weights must keep every fp32 bit"

    probe_ND = torch.randn(7, 8, generator=torch.Generator().manual_seed(1)).to(dtype)
    probe_NK = torch.randn(7, 3, generator=torch.Generator().manual_seed(2))
    ((x_ND.float() * probe_ND.float()).sum() + (w_NK * probe_NK).sum()).backward()
    packed_grads = (x_TD.grad.clone(), weights_NK.grad.clone())

    x_TD.grad, weights_NK.grad = None, None
    ((x_TD[token_N].float() * probe_ND.float()).sum() + (weights_NK * probe_NK).sum()).backward()
    assert torch.equal(packed_grads[0], x_TD.grad)
    assert torch.equal(packed_grads[1], weights_NK.grad)


def test_metadata_bytes_per_row() -> None:
    # k fp32 weights + k ids of the activation's width: 8k bytes in fp32 rows, 6k in bf16 rows.
    for dtype, meta_bytes in ((torch.float32, 8 * 4), (torch.bfloat16, 6 * 4)):
        layout = RowLayout(16, 4, dtype)
        width = dtype.itemsize
        assert (layout.columns - layout.D) * width == meta_bytes


def test_ids_that_do_not_fit_are_refused() -> None:
    with pytest.raises(ValueError, match="local experts"):
        RowLayout(8, 2, torch.bfloat16).check_ids(2**15)
