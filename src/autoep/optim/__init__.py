"""Optimizers for converted, sharded MoE models."""

from autoep.optim.builder import build_optimizer, param_groups

__all__ = ["build_optimizer", "param_groups"]
