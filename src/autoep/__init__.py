"""autoep: automatic expert parallelism for Hugging Face MoE models on PyTorch's own distributed stack."""

from autoep.convert import ConversionReport, LayerReport, convert, find_moe_blocks, supported_families
from autoep.errors import AlreadyConvertedError, AutoEPError, ConfigError, UnsupportedModelError
from autoep.models import FamilyAdapter, register_family, unregister_family
from autoep.moe import MoELayer

__version__ = "0.1.0"

__all__ = [
    "AlreadyConvertedError",
    "AutoEPError",
    "ConfigError",
    "ConversionReport",
    "FamilyAdapter",
    "LayerReport",
    "MoELayer",
    "UnsupportedModelError",
    "__version__",
    "convert",
    "find_moe_blocks",
    "register_family",
    "supported_families",
    "unregister_family",
]
