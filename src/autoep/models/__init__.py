"""Model adapters: recognise each HF family's MoE blocks, and built-in tiny models."""

from autoep.models import families as _families  # noqa: F401  (registers the built-in adapters)
from autoep.models.base import (
    FamilyAdapter,
    adapter_for,
    register_family,
    registered_families,
    unregister_family,
)

__all__ = ["FamilyAdapter", "adapter_for", "register_family", "registered_families", "unregister_family"]
