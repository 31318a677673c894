"""Exception types raised by autoep.

Every error autoep raises on purpose derives from :class:`AutoEPError`, so a
launcher can print its message as one clean line instead of a traceback per
rank. Errors are raised before any collective, identically on every rank.
"""

from __future__ import annotations


class AutoEPError(ValueError):
    """Base class for errors that carry a user-facing, actionable message."""


class ConfigError(AutoEPError):
    """A configuration value is invalid (bad ep size, world size mismatch, ...)."""


class UnsupportedModelError(AutoEPError):
    """The model contains no MoE block that any registered family adapter recognises."""


class CheckpointError(AutoEPError):
    """A checkpoint is missing, corrupt, truncated, or does not fit the model it is loaded into."""


class AlreadyConvertedError(AutoEPError):
    """`convert` was called on a model whose MoE blocks were already replaced."""
