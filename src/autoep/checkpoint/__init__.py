"""Checkpoints that survive layout changes (DCP), and Hugging Face weights in and out."""

from autoep.checkpoint.hf_export import export_checkpoint, export_hf
from autoep.checkpoint.hf_load import from_pretrained
from autoep.checkpoint.manager import CheckpointState, load_checkpoint, save_checkpoint

__all__ = [
    "CheckpointState",
    "export_checkpoint",
    "export_hf",
    "from_pretrained",
    "load_checkpoint",
    "save_checkpoint",
]
