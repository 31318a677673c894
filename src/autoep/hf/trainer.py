"""`AutoEPMixin` and `Trainer`: transformers' Trainer (and its subclasses, e.g. TRL's) on an autoep model.

The division of labour (DESIGN.md, "Living inside other trainers"): autoep
owns the parallel model, the optimizer's parameter groups, the global
gradient norm, the data-parallel rank that picks a rank's rows, gradient sync
on the last micro-batch only, checkpoints and the final Hugging Face export;
Trainer owns the schedule, logging, evaluation, callbacks and its checkpoint
folders. Trainer has no public hook for a few of these (the clipping norm,
what goes into and comes out of a checkpoint folder); those are overridden at
the narrowest method, and the tests pin their behaviour.

Loss semantics match autoep's own loop: the language-model loss is the mean
over every label token of the global batch (Trainer's ``num_items_in_batch``,
counted over data-parallel ranks, not tensor-parallel peers) and the
balancing losses are averaged over micro-batches and ranks.
"""

from __future__ import annotations

import copy
import inspect
import os
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from autoep.checkpoint.hf_export import export_hf
from autoep.checkpoint.hf_load import from_pretrained
from autoep.config import AutoEPConfig
from autoep.errors import ConfigError
from autoep.hf.arguments import check_training_args, take_over, trainer_config
from autoep.hf.callback import LoadBalancingCallback
from autoep.hf.checkpoints import check_resumable, load_model_state, load_scheduler, save_model_state, save_scheduler
from autoep.hf.data import EpochCallback, data_parallel_loader
from autoep.load_balance import balancing_loss, balancing_loss_outside
from autoep.optim import build_optimizer
from autoep.parallel.clip import clip_grad_norm_, global_grad_norm
from autoep.parallelize import parallelize

TRAINING_ARGS_NAME = "training_args.bin"


def _resolve_config(model: Any, autoep_config: AutoEPConfig | None) -> AutoEPConfig:
    state = getattr(model, "autoep", None)
    if state is None:
        if autoep_config is None:
            raise ConfigError("pass autoep_config=AutoEPConfig(ep_size=..., zero_stage=...) to the trainer")
        return autoep_config
    if autoep_config is not None:
        mine = {k: getattr(state.config, k) for k in ("ep_size", "tp_size", "zero_stage")}
        theirs = {k: getattr(autoep_config, k) for k in mine}
        if mine != theirs:
            raise ConfigError(f"the model is already parallelized with {mine}, but autoep_config asks for {theirs}")
    return state.config


def _prepare_model(model: Any, config: AutoEPConfig) -> nn.Module:
    """Load shard-on-read from a path, or parallelize a model passed in (once)."""
    if isinstance(model, (str, os.PathLike)):
        return from_pretrained(model, config)
    if getattr(model, "autoep", None) is None:
        parallelize(model, config)
    return model


def _prepare_reference(reference: Any, model: Any, config: AutoEPConfig) -> nn.Module:
    """A frozen autoep copy for trainers that take a reference model (TRL's DPO): from the same path,
    a copy of the model made before it is sharded, or the given reference, parallelized."""
    if reference is None:
        if getattr(model, "autoep", None) is not None:
            raise ConfigError("pass ref_model=... as well: an already parallelized model cannot be copied")
        reference = model if isinstance(model, (str, os.PathLike)) else copy.deepcopy(model)
    reference = _prepare_model(reference, config)
    reference.requires_grad_(False)
    return reference


class AutoEPMixin:
    """Put in front of any ``transformers.Trainer`` subclass: ``class SFT(AutoEPMixin, trl.SFTTrainer)``.

    Takes ``autoep_config=AutoEPConfig(...)`` next to the trainer's usual
    arguments. ``model`` may be a Hugging Face directory (loaded shard-on-read),
    a model (parallelized here) or a model autoep already parallelized.
    """

    def __init__(self, *posargs: Any, autoep_config: AutoEPConfig | None = None, **kwargs: Any) -> None:
        # Trainer subclasses order their arguments differently (DPOTrainer: model, ref_model, args):
        # find ``model`` and ``args`` by name in the parent's signature.
        bound = inspect.signature(super().__init__).bind_partial(*posargs, **kwargs)
        model, args = bound.arguments.get("model"), bound.arguments.get("args")
        if args is None:
            raise ConfigError("autoep's trainers need explicit TrainingArguments (output_dir, batch size, steps)")
        if model is None:
            raise ConfigError("autoep's trainers need a model (a path or a module); model_init is not supported")
        config = _resolve_config(model, autoep_config)
        check_training_args(args, config, model)  # rank-local: a bad option fails on every rank alike
        config = trainer_config(args, config)
        take_over(args)
        _ = args.device  # initialises torch.distributed under torchrun / accelerate launch
        if "ref_model" in bound.signature.parameters:  # preference trainers: the reference is sharded alike
            bound.arguments["ref_model"] = _prepare_reference(bound.arguments.get("ref_model"), model, config)
        bound.arguments["model"] = _prepare_model(model, config)
        self.autoep_config = config
        super().__init__(*bound.args, **bound.kwargs)
        self._autoep_balance = LoadBalancingCallback(self.model)
        self._autoep_epochs = EpochCallback()
        self.add_callback(self._autoep_balance)
        self.add_callback(self._autoep_epochs)

    # ---------------------------------------------------------------- layout
    def get_tp_size(self) -> int:
        """Tensor-parallel peers share a batch: Trainer counts tokens and batch sizes over dp = world / tp."""
        return self.model.autoep.dims.tp

    # ---------------------------------------------------------------- data
    def _shard(self, loader, *, batch_size: int, shuffle: bool):
        if isinstance(loader.dataset, torch.utils.data.IterableDataset):
            raise ConfigError("autoep's trainers need a map-style dataset (with a length), not an IterableDataset")
        args = self.args
        seed = args.data_seed if args.data_seed is not None else args.seed
        sharded = data_parallel_loader(
            loader.dataset,
            self.model,
            batch_size=batch_size,
            collate_fn=loader.collate_fn,
            shuffle=shuffle,
            seed=seed,
            drop_last=args.dataloader_drop_last,
            num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory,
        )
        if shuffle:
            self._autoep_epochs.sampler = sharded.sampler
        return sharded

    def get_train_dataloader(self):
        """Trainer's loader (columns, collator) re-sharded by data-parallel rank instead of world rank."""
        return self._shard(super().get_train_dataloader(), batch_size=self._train_batch_size, shuffle=True)

    def get_eval_dataloader(self, eval_dataset=None):
        loader = super().get_eval_dataloader(eval_dataset)
        return self._shard(loader, batch_size=self.args.eval_batch_size, shuffle=False)

    # ---------------------------------------------------------------- optimizer and loss
    def create_optimizer(self, model: nn.Module | None = None):
        """AdamW or Muon (``autoep_config.optimizer.type``) with Trainer's hyperparameters, groups per mesh."""
        if self.optimizer is None:
            self.optimizer = build_optimizer(self.model, self.autoep_config)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Trainer's loss, plus the balancing losses scaled as autoep's loop scales them."""
        with balancing_loss_outside(self.model):
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        extra = balancing_loss(self.model)
        if extra is None or not self.model.training:
            return result
        loss, outputs = result if return_outputs else (result, None)
        # Trainer divides a per-micro-batch mean by the accumulation steps itself, but not a loss it
        # already normalised by the global token count: the balancing part needs that division here.
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None
            )
        loss = loss + extra.to(loss.dtype) / (self.current_gradient_accumulation_steps if scaled else 1)
        return (loss, outputs) if return_outputs else loss

    def _clip_grad_norm(self, model):
        """autoep's global norm: every parameter once, over dense and expert meshes."""
        return clip_grad_norm_(self.model, self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        return global_grad_norm(self.model.parameters()) if grad_norm is None else grad_norm

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:
            logs.update(self._autoep_balance.pop_metrics())
        super().log(logs, *args, **kwargs)

    # ---------------------------------------------------------------- checkpoints
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Inside a checkpoint folder: an autoep checkpoint. Otherwise: a Hugging Face model directory."""
        output_dir = output_dir or self.args.output_dir
        if _internal_call:
            optimizer = None if self.args.save_only_model else self.optimizer
            save_model_state(output_dir, self.model, optimizer, self.state.global_step)
            return
        export_hf(self.model, output_dir, into_existing=True)
        if self.args.should_save:
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, Path(output_dir) / TRAINING_ARGS_NAME)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        save_scheduler(output_dir, self.lr_scheduler)  # the optimizer went into the autoep checkpoint

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        check_resumable(resume_from_checkpoint)  # loaded with the optimizer, once it exists

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        load_model_state(checkpoint, self.model, self.optimizer)
        load_scheduler(checkpoint, self.lr_scheduler, self.optimizer)

    def _load_best_model(self) -> None:
        load_model_state(self.state.best_model_checkpoint, self.model)


class Trainer(AutoEPMixin, transformers.Trainer):
    """``transformers.Trainer`` on an expert-parallel, sharded autoep model (see :class:`AutoEPMixin`)."""
