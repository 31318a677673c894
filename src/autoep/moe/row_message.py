"""One message per dispatched row: the token, its combine weights and its local expert ids.

Sending the weights and ids as their own all-to-all doubled the exchanges per
layer (and their backward). Packed, a row is ``[x (D) | weights (Kw) | ids (Ki)]``
in the activation dtype, bit-exact:

* weights travel as fp32 bit patterns (a bf16 row carries each weight in two
  columns), so their precision does not depend on the activation dtype, and
  their gradients come back the same way;
* ids travel as integers of the activation's width (int16 in a bf16 row), viewed
  as that dtype: no rounding, whatever the number of experts (< 2**15 in 16 bits).

:class:`RowLayout` packs before the exchange and unpacks after it; both are
autograd functions whose backward sends ``x``'s and the weights' gradients
through the reverse exchange in one message too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_INT_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class RowLayout:
    """Column layout of a packed row for hidden size ``D``, ``K`` choices, activation ``dtype``."""

    D: int
    K: int
    dtype: torch.dtype

    @property
    def _width(self) -> int:
        return self.dtype.itemsize

    @property
    def weight_cols(self) -> int:
        """Columns per row holding the K fp32 weights (fp32 bits; upcast in rows wider than 32 bits)."""
        return self.K * 4 // self._width if self._width <= 4 else self.K

    @property
    def columns(self) -> int:
        return self.D + self.weight_cols + self.K

    def check_ids(self, num_ids: int) -> None:
        if num_ids >= 2 ** (8 * self._width - 1):
            raise ValueError(f"{num_ids} local experts do not fit the {self._width * 8}-bit id columns of {self.dtype}")

    # -- encoding ---------------------------------------------------------------------------------------
    def weights_to_cols(self, weights_NK: torch.Tensor) -> torch.Tensor:
        w = weights_NK.float()
        return w.contiguous().view(self.dtype) if self._width <= 4 else w.to(self.dtype)

    def weights_from_cols(self, cols: torch.Tensor) -> torch.Tensor:
        return cols.contiguous().view(torch.float32) if self._width <= 4 else cols.float()

    def ids_to_cols(self, ids_NK: torch.Tensor) -> torch.Tensor:
        return ids_NK.to(_INT_OF_WIDTH[self._width]).view(self.dtype)

    # -- packing --------------------------------------------------------------------------------------
    def pack(
        self, x_TD: torch.Tensor, token_N: torch.Tensor, weights_NK: torch.Tensor, ids_NK: torch.Tensor
    ) -> torch.Tensor:
        """``[N, columns]``: row ``n`` is token ``token_N[n]`` of ``x_TD`` with its weights and ids."""
        return _Pack.apply(self, x_TD, token_N, weights_NK, ids_NK)

    def unpack(self, rows_NC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_ND, weights_NK fp32, ids_NK int64)`` of received rows (ids carry no gradient)."""
        x_ND, weights_NK = _Unpack.apply(self, rows_NC)
        ids_NK = rows_NC.detach()[:, self.D + self.weight_cols :].contiguous().view(_INT_OF_WIDTH[self._width])
        return x_ND, weights_NK, ids_NK.long()


class _Pack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layout: RowLayout, x_TD, token_N, weights_NK, ids_NK):
        ctx.layout, ctx.num_tokens, ctx.weights_dtype = layout, x_TD.shape[0], weights_NK.dtype
        ctx.save_for_backward(token_N)
        return torch.cat(
            [x_TD.index_select(0, token_N), layout.weights_to_cols(weights_NK), layout.ids_to_cols(ids_NK)], dim=1
        )

    @staticmethod
    def backward(ctx, grad_NC):
        layout, (token_N,) = ctx.layout, ctx.saved_tensors
        D, Kw = layout.D, layout.weight_cols
        grad_TD = grad_NC.new_zeros(ctx.num_tokens, D).index_add_(0, token_N, grad_NC[:, :D])
        grad_NK = layout.weights_from_cols(grad_NC[:, D : D + Kw]).to(ctx.weights_dtype)
        return None, grad_TD, None, grad_NK, None


class _Unpack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layout: RowLayout, rows_NC):
        ctx.layout = layout
        D, Kw = layout.D, layout.weight_cols
        return rows_NC[:, :D], layout.weights_from_cols(rows_NC[:, D : D + Kw])

    @staticmethod
    def backward(ctx, grad_ND, grad_NK):
        layout = ctx.layout
        N = grad_ND.shape[0] if grad_ND is not None else grad_NK.shape[0]
        if grad_ND is None:
            grad_ND = grad_NK.new_zeros(N, layout.D, dtype=layout.dtype)
        if grad_NK is None:
            grad_NK = grad_ND.new_zeros(N, layout.K, dtype=torch.float32)
        ids = grad_ND.new_zeros(N, layout.K)
        return None, torch.cat([grad_ND.to(layout.dtype), layout.weights_to_cols(grad_NK), ids], dim=1)
