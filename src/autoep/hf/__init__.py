"""autoep inside transformers' Trainer, TRL and accelerate (``pip install "autoep[hf]"``).

* :class:`Trainer` / :class:`AutoEPMixin`: Trainer (or any subclass) on an
  expert-parallel model, with ``autoep_config=AutoEPConfig(...)``.
* accelerate loops: ``accelerator.prepare`` leaves an autoep model as it is
  (it is marked as prepared, and ``accelerator.accumulate`` uses its
  ``no_sync``); shard data with :func:`data_parallel_loader` and clip with
  :func:`autoep.clip_grad_norm_`.
"""

try:
    import accelerate  # noqa: F401  (transformers' Trainer needs it)
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError('autoep.hf needs accelerate: pip install "autoep[hf]" (or "autoep[trl]" for TRL)') from err

from autoep.hf.arguments import check_training_args
from autoep.hf.data import data_parallel_loader, data_parallel_sampler
from autoep.hf.trainer import AutoEPMixin, Trainer

__all__ = ["AutoEPMixin", "Trainer", "check_training_args", "data_parallel_loader", "data_parallel_sampler"]
