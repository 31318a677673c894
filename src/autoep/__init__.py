"""autoep: automatic expert parallelism for Hugging Face MoE models on PyTorch's own distributed stack."""

from autoep.config import AutoEPConfig
from autoep.convert import ConversionReport, LayerReport, convert, find_moe_blocks, supported_families
from autoep.errors import AlreadyConvertedError, AutoEPError, ConfigError, UnsupportedModelError
from autoep.models import FamilyAdapter, register_family, unregister_family
from autoep.moe import MoELayer
from autoep.optim import build_optimizer
from autoep.parallel.clip import clip_grad_norm_
from autoep.parallelize import parallelize

__version__ = "0.1.0"

__all__ = [
    "AlreadyConvertedError",
    "AutoEPConfig",
    "AutoEPError",
    "ConfigError",
    "ConversionReport",
    "FamilyAdapter",
    "LayerReport",
    "MoELayer",
    "UnsupportedModelError",
    "__version__",
    "build_optimizer",
    "clip_grad_norm_",
    "convert",
    "find_moe_blocks",
    "parallelize",
    "register_family",
    "supported_families",
    "unregister_family",
]
