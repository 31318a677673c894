"""Stacked expert weights and the grouped matrix multiplies that run them.

Weights keep the Hugging Face transformers-5 layout of each family, so a
converted block has the same parameter names and per-expert shapes as the
original; on a rank they hold the local slice ``[E_local, ...]`` of the
global ``[E, ...]`` tensors.

Two GEMM backends compute ``y_A = x_A @ W[e(A)]`` for rows already grouped by
expert: the grouped GEMM (``torch.nn.functional.grouped_mm``, one kernel for
all experts; fp32/bf16 on CPU, bf16 on CUDA sm80+) and a portable per-expert
loop that works for any dtype, device and shape.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.utils.checkpoint
from torch import nn
from torch.distributed.tensor import DTensor

GemmBackend = Literal["auto", "grouped_mm", "loop"]


@dataclass(frozen=True)
class ExpertLayout:
    """How a family stores and applies its experts.

    ``swiglu``: HF-5 fused layout, ``gate_up_proj [E, 2F, D]`` (gate rows then
    up rows) and ``down_proj [E, D, F]``; ``act(gate) * up``. With
    ``transposed=True`` the same tensors are stored ``[E, D, 2F]`` (gate
    columns then up columns) and ``[E, F, D]`` (Llama 4).

    ``gpt_oss``: transposed ``gate_up_proj [E, D, 2F]`` with gate/up interleaved
    along the last dim, ``down_proj [E, F, D]``, biases on both, a clamped gate
    and ``(up + 1) * gate * sigmoid(alpha * gate)`` (always transposed).

    ``dbrx``: separate gate and up projections ``mlp.w1``/``mlp.v1`` and the down
    projection ``mlp.w2``, each flattened over the experts as ``[E * F, D]``
    (expert ``e`` owns rows ``[e * F, (e + 1) * F)``); ``act(x @ w1ᵀ) * (x @ v1ᵀ) @ w2``.
    The flattened shapes are kept so that state dicts and checkpoints keep DBRX's names.
    """

    kind: Literal["swiglu", "gpt_oss", "dbrx"] = "swiglu"
    alpha: float = 1.702
    limit: float = 7.0
    transposed: bool = False

    def __post_init__(self) -> None:
        if self.kind == "gpt_oss":
            object.__setattr__(self, "transposed", True)
        elif self.kind == "dbrx" and self.transposed:
            raise ValueError("the dbrx layout has one fixed orientation; transposed=True does not apply")

    @property
    def has_bias(self) -> bool:
        return self.kind == "gpt_oss"

    @property
    def tensor_names(self) -> tuple[str, ...]:
        """The expert tensors, relative to the experts module, in-projections first."""
        if self.kind == "dbrx":
            return ("mlp.w1", "mlp.v1", "mlp.w2")
        biases = ("gate_up_proj_bias", "down_proj_bias") if self.has_bias else ()
        return ("gate_up_proj", "down_proj", *biases)

    def rows_per_expert(self, intermediate_size: int) -> int:
        """Rows of dim 0 one expert owns: 1 for stacked ``[E, ...]`` tensors, ``F`` for flattened ones."""
        return intermediate_size if self.kind == "dbrx" else 1


def _grouped_mm_op():
    """The grouped-GEMM op of this torch: public ``F.grouped_mm`` (>= 2.10) or ``torch._grouped_mm``."""
    return getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_supported(x: torch.Tensor, hidden: int, intermediate: int) -> bool:
    """Whether the grouped GEMM can run on ``x``'s device and dtype with these expert shapes.

    CPU: fp32 and bf16. CUDA: bf16 on sm80+ (sm90+ for the private op of older torch).
    Every row stride must be a multiple of 16 bytes.
    """
    op = _grouped_mm_op()
    if op is None:
        return False
    if (hidden * x.element_size()) % 16 or (intermediate * x.element_size()) % 16:
        return False
    if x.device.type == "cpu":
        # A fake tensor (autoep.plan) runs the op's meta kernel, which, like CUDA, takes bf16 only.
        fake = isinstance(x, torch._subclasses.fake_tensor.FakeTensor)
        return x.dtype == torch.bfloat16 if fake else x.dtype in (torch.float32, torch.bfloat16)
    if x.device.type == "cuda" and x.dtype == torch.bfloat16:
        needed = (8, 0) if hasattr(torch.nn.functional, "grouped_mm") else (9, 0)
        return torch.cuda.get_device_capability(x.device) >= needed
    return False


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an expert-parallel DTensor weight (differentiable); plain tensors pass through."""
    return t.to_local() if isinstance(t, DTensor) else t


def _dense_grad(grad: torch.Tensor) -> torch.Tensor:
    return grad.contiguous()


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
        y_AN = _grouped_mm_op()(x_AK, w_EKN, offs=offs_E)
        if y_AN.requires_grad:  # the grouped GEMM's backward rejects stride-0 (expanded) gradients
            y_AN.register_hook(_dense_grad)
        return y_AN
    # Empty experts still get their (0-row) matmul: the autograd graph, and so the
    # collectives its backward issues, must not depend on how many rows arrived.
    chunks = torch.split(x_AK, counts_list, dim=0)
    return torch.cat([chunk @ w_EKN[e] for e, chunk in enumerate(chunks)], dim=0)


def act_and_down(
    activate: Callable[[torch.Tensor], torch.Tensor],
    h_AF2: torch.Tensor,
    w_EFD: torch.Tensor,
    counts_E: torch.Tensor,
    counts_list: list[int] | None,
    recompute: bool,
) -> torch.Tensor:
    """``grouped_matmul(activate(h), w)``; with ``recompute``, backward recomputes both from ``h``.

    Without it, backward keeps the activation's inputs and the ``[A, F]``
    activation (the down projection's input); with it, only ``h``, at the cost
    of the activation and the down projection's forward GEMM once more.
    """

    def run(h: torch.Tensor) -> torch.Tensor:
        return grouped_matmul(activate(h), w_EFD, counts_E, counts_list)

    if recompute and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(run, h_AF2, use_reentrant=False)
    return run(h_AF2)


class GroupedExperts(nn.Module):
    """The local experts of one MoE layer, stored as stacked tensors (or DBRX's flattened ones)."""

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
        self.recompute_activation = False  # see act_and_down
        self.act_fn = act_fn if act_fn is not None else nn.SiLU()
        if layout.kind == "dbrx":
            self.mlp = nn.Module()  # DBRX's own child name: keeps the keys experts.mlp.{w1,v1,w2}
            for name in ("w1", "v1", "w2"):
                self.mlp.register_parameter(name, nn.Parameter(torch.empty(E * F, D)))
            return
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

    def _weights_EKN(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The local in-projection(s) and the out-projection as ``[E_local, in, out]`` views (no copy).

        One fused gate|up in-projection, or DBRX's separate gate and up ones.
        """
        if self.layout.kind == "dbrx":
            E, F, D = self.num_experts, self.intermediate_size, self.hidden_size
            w1, v1, w2 = (local_tensor(getattr(self.mlp, n)).view(E, F, D) for n in ("w1", "v1", "w2"))
            return [w1.transpose(1, 2), v1.transpose(1, 2)], w2
        w13, w2 = local_tensor(self.gate_up_proj), local_tensor(self.down_proj)
        if self.layout.transposed:
            return [w13], w2
        return [w13.transpose(1, 2)], w2.transpose(1, 2)

    def uses_loop(self, x: torch.Tensor) -> bool:
        """Whether the portable per-expert loop (which needs host-side counts) runs for ``x``."""
        if self.backend != "auto":
            return self.backend == "loop"
        return not grouped_mm_supported(x, self.hidden_size, self.intermediate_size)

    def forward(
        self,
        x_AD: torch.Tensor,
        counts_E: torch.Tensor,
        counts_list: list[int] | None,
        expert_A: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Apply expert ``e`` to its ``counts_E[e]`` consecutive rows of ``x_AD`` (``expert_A``: each row's expert).

        ``counts_list`` (host copy of ``counts_E``) selects the loop backend; ``None`` the grouped GEMM.
        """
        w_in, w2_EFD = self._weights_EKN()
        h_parts = [grouped_matmul(x_AD, w_EDN, counts_E, counts_list) for w_EDN in w_in]
        h_AF2 = h_parts[0] if len(h_parts) == 1 else torch.cat(h_parts, dim=-1)
        if self.layout.has_bias:
            if expert_A is None:
                experts = torch.arange(self.num_experts, device=x_AD.device)
                expert_A = torch.repeat_interleave(experts, counts_E, output_size=x_AD.shape[0])
            h_AF2 = h_AF2 + local_tensor(self.gate_up_proj_bias)[expert_A]
        y_AD = act_and_down(self._activate, h_AF2, w2_EFD, counts_E, counts_list, self.recompute_activation)
        if self.layout.has_bias:
            y_AD = y_AD + local_tensor(self.down_proj_bias)[expert_A]
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
