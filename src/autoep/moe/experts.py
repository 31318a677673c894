"""Stacked expert weights and the grouped matrix multiplies that run them.

Weights keep the Hugging Face transformers-5 layout of each family, so a
converted block has the same parameter names and per-expert shapes as the
original; on a rank they hold the local slice ``[E_local, ...]`` of the
global ``[E, ...]`` tensors.

Two GEMM backends compute ``y_A = x_A @ W[e(A)]`` for rows already grouped by
expert: ``torch._grouped_mm`` (one kernel for all experts; bf16 on CPU and on
CUDA sm90+) and a portable per-expert loop that works for any dtype/device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

GemmBackend = Literal["auto", "grouped_mm", "loop"]


@dataclass(frozen=True)
class ExpertLayout:
    """How a family stores and applies its experts.

    ``swiglu``: HF-5 fused layout, ``gate_up_proj [E, 2F, D]`` (gate rows then
    up rows) and ``down_proj [E, D, F]``; ``act(gate) * up``.

    ``gpt_oss``: transposed ``gate_up_proj [E, D, 2F]`` with gate/up interleaved
    along the last dim, ``down_proj [E, F, D]``, biases on both, a clamped gate
    and ``(up + 1) * gate * sigmoid(alpha * gate)``.
    """

    kind: Literal["swiglu", "gpt_oss"] = "swiglu"
    alpha: float = 1.702
    limit: float = 7.0

    @property
    def transposed(self) -> bool:
        return self.kind == "gpt_oss"

    @property
    def has_bias(self) -> bool:
        return self.kind == "gpt_oss"


def grouped_mm_supported(x: torch.Tensor, w: torch.Tensor, hidden: int, intermediate: int) -> bool:
    """Whether ``torch._grouped_mm`` can run these operands here (bf16, CPU or CUDA sm90+)."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16:
        return False
    if x.device.type == "cuda":
        if torch.cuda.get_device_capability(x.device) < (9, 0):
            return False
    elif x.device.type != "cpu":
        return False
    # Every row and column stride must be 16-byte aligned: multiples of 8 bf16 elements.
    return hidden % 8 == 0 and intermediate % 8 == 0


def grouped_matmul(
    x_AK: torch.Tensor,
    w_EKN: torch.Tensor,
    counts_E: torch.Tensor,
    counts_list: list[int] | None,
) -> torch.Tensor:
    """``y[a] = x[a] @ w[e]`` for the rows ``a`` of expert ``e`` (rows grouped by expert).

    ``counts_list`` is the host copy of ``counts_E`` and selects the backend:
    given, a per-expert loop runs (any dtype, any device); ``None``, one
    ``torch._grouped_mm`` call runs with no host sync.
    """
    if counts_list is None:
        offs_E = torch.cumsum(counts_E, dim=0, dtype=torch.int32)
        return torch._grouped_mm(x_AK, w_EKN, offs=offs_E)
    # Empty experts still get their (0-row) matmul: the autograd graph, and so the
    # collectives its backward issues, must not depend on how many rows arrived.
    chunks = torch.split(x_AK, counts_list, dim=0)
    return torch.cat([chunk @ w_EKN[e] for e, chunk in enumerate(chunks)], dim=0)


class GroupedExperts(nn.Module):
    """The local experts of one MoE layer, stored as stacked tensors."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        layout: ExpertLayout,
        act_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        backend: GemmBackend = "auto",
    ) -> None:
        super().__init__()
        E, D, F = num_experts, hidden_size, intermediate_size
        self.num_experts = E
        self.hidden_size = D
        self.intermediate_size = F
        self.layout = layout
        self.backend: GemmBackend = backend
        self.act_fn = act_fn if act_fn is not None else nn.SiLU()
        if layout.transposed:
            self.gate_up_proj = nn.Parameter(torch.empty(E, D, 2 * F))
            self.down_proj = nn.Parameter(torch.empty(E, F, D))
        else:
            self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * F, D))
            self.down_proj = nn.Parameter(torch.empty(E, D, F))
        if layout.has_bias:
            self.gate_up_proj_bias = nn.Parameter(torch.zeros(E, 2 * F))
            self.down_proj_bias = nn.Parameter(torch.zeros(E, D))
        else:
            self.gate_up_proj_bias = None
            self.down_proj_bias = None

    def _weights_EKN(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Both weights as ``[E, in, out]`` views (no copy)."""
        if self.layout.transposed:
            return self.gate_up_proj, self.down_proj
        return self.gate_up_proj.transpose(1, 2), self.down_proj.transpose(1, 2)

    def uses_loop(self, x: torch.Tensor) -> bool:
        """Whether the portable per-expert loop (which needs host-side counts) runs for ``x``."""
        if self.backend != "auto":
            return self.backend == "loop"
        return not grouped_mm_supported(x, self.gate_up_proj, self.hidden_size, self.intermediate_size)

    def forward(self, x_AD: torch.Tensor, counts_E: torch.Tensor, counts_list: list[int] | None) -> torch.Tensor:
        """Apply expert ``e`` to its ``counts_E[e]`` consecutive rows of ``x_AD``.

        ``counts_list`` (host copy of ``counts_E``) selects the loop backend; ``None`` the grouped GEMM.
        """
        w13_EDF2, w2_EFD = self._weights_EKN()
        h_AF2 = grouped_matmul(x_AD, w13_EDF2, counts_E, counts_list)
        if self.layout.has_bias:
            expert_A = torch.repeat_interleave(torch.arange(self.num_experts, device=x_AD.device), counts_E)
            h_AF2 = h_AF2 + self.gate_up_proj_bias[expert_A]
        h_AF = self._activate(h_AF2)
        y_AD = grouped_matmul(h_AF, w2_EFD, counts_E, counts_list)
        if self.layout.has_bias:
            y_AD = y_AD + self.down_proj_bias[expert_A]
        return y_AD

    def _activate(self, h_AF2: torch.Tensor) -> torch.Tensor:
        if self.layout.kind == "gpt_oss":
            gate, up = h_AF2[..., ::2], h_AF2[..., 1::2]
            gate = gate.clamp(max=self.layout.limit)
            up = up.clamp(min=-self.layout.limit, max=self.layout.limit)
            return (up + 1) * (gate * torch.sigmoid(gate * self.layout.alpha))
        gate, up = h_AF2.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden={self.hidden_size}, "
            f"intermediate={self.intermediate_size}, layout={self.layout.kind}, backend={self.backend}"
        )
