"""Optimizers for converted, sharded MoE models: AdamW and Muon."""

from autoep.optim.builder import build_optimizer, muon_split, param_groups
from autoep.optim.muon import Muon

__all__ = ["Muon", "build_optimizer", "muon_split", "param_groups"]
