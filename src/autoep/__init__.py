"""autoep: automatic expert parallelism for Hugging Face MoE models on PyTorch's own distributed stack."""

# First, so that its exit handler runs after those of everything autoep imports (see autoep.teardown).
from autoep.teardown import shutdown  # isort: skip
from autoep.checkpoint import (
    CheckpointState,
    export_checkpoint,
    export_hf,
    from_pretrained,
    load_checkpoint,
    save_checkpoint,
)
from autoep.config import AutoEPConfig
from autoep.convert import ConversionReport, LayerReport, convert, find_moe_blocks, supported_families
from autoep.errors import AlreadyConvertedError, AutoEPError, CheckpointError, ConfigError, UnsupportedModelError
from autoep.models import FamilyAdapter, register_family, unregister_family
from autoep.moe import MoELayer
from autoep.optim import build_optimizer
from autoep.parallel.clip import clip_grad_norm_
from autoep.parallelize import parallelize
from autoep.plan import plan

__version__ = "0.1.0"

__all__ = [
    "AlreadyConvertedError",
    "AutoEPConfig",
    "AutoEPError",
    "CheckpointError",
    "CheckpointState",
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
    "export_checkpoint",
    "export_hf",
    "find_moe_blocks",
    "from_pretrained",
    "load_checkpoint",
    "parallelize",
    "plan",
    "register_family",
    "save_checkpoint",
    "shutdown",
    "supported_families",
    "unregister_family",
]
