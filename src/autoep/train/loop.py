"""The training loop behind `autoep train`, run on every rank."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from autoep.checkpoint import from_pretrained, load_checkpoint, save_checkpoint
from autoep.config import AutoEPConfig
from autoep.data import DataOptions, evaluate, prepare_data
from autoep.launch import collective_timeout
from autoep.load_balance import moe_layers
from autoep.models.loading import is_builtin_model, load_config, load_model
from autoep.optim import build_optimizer
from autoep.optim.schedule import scheduler_state_for
from autoep.parallel.groups import apply_timeout_to_all_groups, local_device
from autoep.parallelize import parallelize
from autoep.train.heartbeat import heartbeat, install_moe_phase_hooks, mark
from autoep.train.metrics import MetricsLog, Progress, load_record
from autoep.train.nonfinite import NonFiniteGuard
from autoep.train.preemption import PreemptionWatcher
from autoep.train.restart import should_resume
from autoep.train.step import train_step
from autoep.train.tensorboard import TensorBoardLog


@dataclass
class TrainJob:
    """Everything one run needs besides the parallel config."""

    config: AutoEPConfig
    model: str = "tiny-mixtral"
    data: str | None = None
    steps: int = 200
    seq_len: int = 64
    output: str | None = None
    warmup_steps: int = 10
    log_every: int = 10
    save_every: int | None = None
    keep_last: int | None = 3
    resume: bool = False
    stop_at: int | None = None
    nonfinite_policy: str = "skip"
    max_skipped_steps: int = 5
    preempt_signal: str = "SIGTERM"
    heartbeat_dir: str | None = None
    data_options: DataOptions | None = None  # everything about data but the path (``data``)

    @property
    def data_settings(self) -> DataOptions:
        return replace(self.data_options or DataOptions(), data=self.data)

    @property
    def checkpoint_root(self) -> Path | None:
        return Path(self.output) / "checkpoints" if self.output else None

    def describe(self) -> dict[str, Any]:
        """JSON-ready record of the run (written to ``config.json``)."""
        return {
            "autoep": self.config.model_dump(),
            "model": self.model,
            "data": self.data or "builtin",
            "steps": self.steps,
            "seq_len": self.seq_len,
            "warmup_steps": self.warmup_steps,
            "data_options": {k: v for k, v in asdict(self.data_settings).items() if k != "data"},
        }


def _lr_lambda(warmup: int, total: int):
    """Linear warmup, then cosine decay to 10% of the peak learning rate."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _eval_due(done: int, last: int, every: int | None) -> bool:
    """Evaluate every ``every`` steps and after the last one."""
    return done == last or (every is not None and done % every == 0)


def _truncate_metrics(path: Path, keep_through: int) -> None:
    """Drop records of steps after the checkpoint we resume from (they will be redone)."""
    if path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= keep_through]
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def run_training(job: TrainJob) -> dict[str, Any]:
    """Train on this rank (the default process group must be initialised); returns the summary."""
    config = job.config
    rank, world = dist.get_rank(), dist.get_world_size()
    is_main = rank == 0
    settings = job.data_settings
    data = prepare_data(  # before the model: bad data fails on every rank before any collective but one
        settings,
        model=job.model,
        builtin_model=is_builtin_model(job.model),
        vocab_size=load_config(job.model).get_text_config().vocab_size,
        seq_len=job.seq_len,
        micro_batch=config.micro_batch_size,
        dp_size=config.parallel_dims(world).dp,
        seed=config.seed,
        log=(lambda line: print(line, flush=True)) if is_main else (lambda _: None),
    )
    torch.manual_seed(config.seed)
    if is_builtin_model(job.model):
        model = load_model(job.model, seed=config.seed).to(local_device())
        parallelize(model, config)
    else:  # a HF directory: each rank reads only its own slices
        model = from_pretrained(job.model, config)
    model.train()
    timeout = collective_timeout()
    if timeout is not None:  # the mesh groups too, not only the world group
        apply_timeout_to_all_groups(timeout)
    dims = model.autoep.dims
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(min(job.warmup_steps, job.steps), job.steps))
    batches = data.train

    output = Path(job.output) if job.output else None
    if is_main and dims.tp > 1:
        print(model.autoep.tp_plan, flush=True)  # what tensor parallelism split, and what it left whole
    start = 0
    if should_resume(job):  # --resume, or a restart after a worker failure
        state = load_checkpoint(job.checkpoint_root, model, optimizer)
        # Per-group lists follow the optimizer's groups, which depend on the layout.
        scheduler.load_state_dict(scheduler_state_for(optimizer, state.extra["scheduler"]))
        start = state.data_position
        if is_main:
            _truncate_metrics(output / "metrics.jsonl", keep_through=start)
            print(f"resumed from {state.path} at step {start}", flush=True)
    log = MetricsLog(output / "metrics.jsonl" if output is not None and is_main else None)
    layer_names = [path for path, _ in moe_layers(model)]
    if output is not None and is_main:
        (output / "config.json").write_text(json.dumps({**job.describe(), "moe_layers": layer_names}, indent=2))
    # TensorBoard event files next to metrics.jsonl whenever the tensorboard package is installed.
    use_board = output is not None and is_main and TensorBoardLog.available()
    board = TensorBoardLog(output / "tensorboard" if use_board else None, layer_names=layer_names)
    progress = Progress(job.steps, enabled=is_main, log_every=job.log_every, initial=start)
    last = min(job.steps, job.stop_at) if job.stop_at else job.steps
    tokens_per_step = dims.dp * config.gradient_accumulation_steps * config.micro_batch_size * job.seq_len
    device = local_device()
    history: list[dict[str, Any]] = []
    guard = NonFiniteGuard(job.nonfinite_policy, job.max_skipped_steps)
    watcher = PreemptionWatcher(job.preempt_signal)
    heartbeat().rank = rank
    if job.heartbeat_dir:
        heartbeat().write_to(job.heartbeat_dir, rank)
    install_moe_phase_hooks(model)
    preempted = False
    started = time.perf_counter()
    for step in range(start, last):
        mark("loading the batch", step=step + 1)
        t0 = time.perf_counter()
        micro = [
            batches.batch(step, m, model.autoep.dp_rank, config.gradient_accumulation_steps).to(device)
            for m in range(config.gradient_accumulation_steps)
        ]
        result = train_step(model, optimizer, micro, max_grad_norm=config.gradient_clipping)
        scheduler.step()
        step_time = time.perf_counter() - t0
        record = {
            "step": step + 1,
            "loss": result.loss,
            "lm_loss": result.lm_loss,
            "grad_norm": result.grad_norm,
            "lr": optimizer.param_groups[0]["lr"],
            "tokens_per_s": tokens_per_step / step_time,
            "step_time_s": step_time,
            **load_record(result.load, model, capacity=config.load_balancing.capacity_factor is not None),
        }
        if result.skipped:
            record.update(skipped=True, nonfinite_modules=result.nonfinite)
            if is_main:
                print(f"step {step + 1}: non-finite loss or gradients, update skipped ({result.nonfinite})", flush=True)
        guard.observe(step + 1, result.skipped, result.loss, result.grad_norm, result.nonfinite)
        done = step + 1
        if data.eval is not None and _eval_due(done, last, settings.eval_every):
            mark("evaluation")
            record.update(evaluate(model, data.eval, dp_rank=model.autoep.dp_rank, max_rows=settings.eval_rows))
        history.append(record)
        log.write(record)
        board.write(record)
        progress.update(
            done, result.loss, record["tokens_per_s"], record.get("expert_imbalance", 1.0), record.get("eval_loss")
        )
        mark("preemption check")
        preempted = watcher.agreed() and done < last  # every rank stops after the same step
        periodic = job.save_every and (done % job.save_every == 0 or done == last)
        if job.checkpoint_root and (periodic or preempted):
            mark("checkpoint save")
            save_checkpoint(
                job.checkpoint_root,
                model,
                optimizer,
                step=done,
                extra={"scheduler": scheduler.state_dict(), "data_position": done, "preempted": preempted},
                keep_last=job.keep_last,
            )
        if preempted:
            if is_main:
                print(f"preempted ({job.preempt_signal}): saved step {done}; resume with --resume", flush=True)
            break
    watcher.close()
    progress.close()
    log.close()
    board.close()
    elapsed = time.perf_counter() - started
    window = max(1, min(10, len(history) // 5))
    summary = {
        "model": job.model,
        "world_size": world,
        "ep": config.ep_size,
        "tp": config.tp_size,
        "zero_stage": config.zero_stage,
        "steps": len(history),
        "first_step": start + 1,
        "last_step": start + len(history),
        "first_loss": sum(r["loss"] for r in history[:window]) / window if history else None,
        "final_loss": sum(r["loss"] for r in history[-window:]) / window if history else None,
        "tokens_per_s": tokens_per_step * len(history) / max(elapsed, 1e-9),
        "seconds": elapsed,
        "final_expert_imbalance": history[-1].get("expert_imbalance") if history else None,
        "final_eval_loss": next((r["eval_loss"] for r in reversed(history) if "eval_loss" in r), None),
        "skipped_steps": guard.skipped,
        "preempted": preempted,
        "output": str(output) if output else None,
    }
    if output is not None and is_main:
        (output / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
