"""The extension point: describe an in-house MoE block with a FamilyAdapter and convert it."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import autoep
from autoep.moe import RouterConfig


class HouseMoeBlock(nn.Module):
    """A made-up block: softmax top-2 routing, HF-5 fused experts, a router called ``router``."""

    def __init__(self, hidden: int = 16, inter: int = 8, experts: int = 4) -> None:
        super().__init__()
        self.router = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.Module()
        self.experts.gate_up_proj = nn.Parameter(torch.randn(experts, 2 * inter, hidden) * 0.2)
        self.experts.down_proj = nn.Parameter(torch.randn(experts, hidden, inter) * 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(self.router(x).float(), dim=-1)
        top_w, top_i = probs.topk(2, dim=-1)
        out = torch.zeros_like(x)
        for k in range(2):
            for e in range(self.experts.gate_up_proj.shape[0]):
                mask = top_i[..., k] == e
                gate, up = (x[mask] @ self.experts.gate_up_proj[e].T).chunk(2, dim=-1)
                y = (F.silu(gate) * up) @ self.experts.down_proj[e].T
                out[mask] += top_w[..., k][mask, None] * y
        return out


def test_register_and_convert_a_custom_block() -> None:
    adapter = autoep.FamilyAdapter(
        name="house_moe",
        block_classes=("HouseMoeBlock",),
        router_config=lambda config, num_experts: RouterConfig(num_experts=num_experts, top_k=2),
        router_attr="router",
    )
    autoep.register_family(adapter)
    try:
        torch.manual_seed(0)
        reference = nn.Sequential(nn.Linear(16, 16), HouseMoeBlock(), nn.Linear(16, 3))
        converted = copy.deepcopy(reference)
        report = autoep.convert(converted)
        assert [(r.path, r.family) for r in report.layers] == [("1", "house_moe")]
        x = torch.randn(5, 16)
        torch.testing.assert_close(converted(x), reference(x), atol=1e-5, rtol=0)
        reference(x).sum().backward()
        converted(x).sum().backward()
        torch.testing.assert_close(converted[1].experts.down_proj.grad, reference[1].experts.down_proj.grad)
        torch.testing.assert_close(converted[1].router.weight.grad, reference[1].router.weight.grad)
    finally:
        autoep.unregister_family("house_moe")
    assert "house_moe" not in autoep.supported_families()
