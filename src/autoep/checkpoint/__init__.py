"""Checkpoints that survive layout changes (DCP), and Hugging Face weights in and out."""

from autoep.checkpoint.manager import CheckpointState, load_checkpoint, save_checkpoint

__all__ = ["CheckpointState", "load_checkpoint", "save_checkpoint"]
