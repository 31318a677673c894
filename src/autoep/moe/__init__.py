"""The expert-parallel MoE layer: router, stacked experts and token dispatch."""

from autoep.moe.experts import ExpertLayout, GroupedExperts
from autoep.moe.layer import MoELayer
from autoep.moe.router import RouterConfig, RouterOutput, TopKRouter

__all__ = [
    "ExpertLayout",
    "GroupedExperts",
    "MoELayer",
    "RouterConfig",
    "RouterOutput",
    "TopKRouter",
]
