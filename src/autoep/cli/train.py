"""``autoep train``: validate once, start the workers, train, summarise.

Configuration precedence: built-in defaults < ``--config ds.json`` < flags.
Everything that can be checked before starting workers is checked here, in
one process, so a mistake prints one line instead of a traceback per rank.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from autoep.cli.launcher import inside_torchrun, launcher_settings, planned_world
from autoep.cli.train_flags import BALANCE_FLAGS, DEFAULTS, add_flags
from autoep.errors import AutoEPError


def add_parser(sub: argparse._SubParsersAction) -> None:
    add_flags(sub).set_defaults(func=run)


def build_config(args: argparse.Namespace):
    from autoep.config import AutoEPConfig

    if args.config:
        base = AutoEPConfig.from_deepspeed(args.config).model_dump()
    else:
        base = AutoEPConfig.create(
            ep_size=DEFAULTS["ep_size"],
            zero_stage=DEFAULTS["zero_stage"],
            micro_batch_size=DEFAULTS["micro_batch_size"],
            gradient_clipping=1.0,
            optimizer={"type": "AdamW", "params": {"lr": DEFAULTS["lr"], "betas": (0.9, 0.95), "weight_decay": 0.1}},
        ).model_dump()
    overrides: dict[str, Any] = {
        key: value
        for key, value in {
            "ep_size": args.ep,
            "tp_size": args.tp,
            "zero_stage": args.zero,
            "zero_backend": args.zero_backend,
            "micro_batch_size": args.micro_batch,
            "gradient_accumulation_steps": args.grad_accum,
            "gradient_clipping": args.clip,
            "seed": args.seed,
        }.items()
        if value is not None
    }
    if args.bf16:
        overrides["mixed_precision"] = {"param_dtype": "bfloat16", "reduce_dtype": "float32"}
    if args.activation_checkpointing:
        overrides["activation_checkpointing"] = True
    if args.recompute_expert_activation:
        overrides["recompute_expert_activation"] = True
    balance = dict(base["load_balancing"])
    for key in BALANCE_FLAGS:
        if getattr(args, key, None) is not None:
            balance[key] = getattr(args, key)
    overrides["load_balancing"] = balance
    optimizer = dict(base["optimizer"])
    if args.optimizer and args.optimizer.lower() != optimizer["type"].lower():
        optimizer = {"type": args.optimizer, "params": {"lr": optimizer["params"].get("lr", DEFAULTS["lr"])}}
        if args.optimizer == "muon":  # Moonlight scaling makes Muon's lr interchangeable with AdamW's
            optimizer["params"].update(weight_decay=0.1, update_scale="moonlight")
    if args.lr is not None:
        optimizer["params"] = {**optimizer["params"], "lr": args.lr}
    return AutoEPConfig.create(**{**base, **overrides, "optimizer": optimizer})


def _check_fresh_start(args: argparse.Namespace) -> None:
    """A fresh start (no --resume) refuses an --output that already holds a run, unless --overwrite.

    Appending to another run's metrics or, worse, letting a restart take its
    checkpoints for this run's (a restarted attempt resumes from
    OUTPUT/checkpoints/latest, autoep.train.restart) would silently mix two runs.
    ``--overwrite`` removes the old run's records and checkpoints first. Checked
    once, in the launcher: inside torchrun a worker cannot tell a fresh start
    from a restart that its own agent did not count.
    """
    import shutil
    from pathlib import Path

    from autoep.train.restart import has_checkpoint

    if args.resume or not args.output:
        return
    out = Path(args.output)
    old = [name for name in _RUN_FILES if (out / name).exists()]
    if not old and not has_checkpoint(args.output):
        return
    if not args.overwrite:
        raise AutoEPError(
            f"{args.output} already holds a run ({', '.join(old) or 'checkpoints'}): pass --resume to continue it, "
            "--overwrite to replace it, or choose a new --output"
        )
    for name in _RUN_FILES:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


_RUN_FILES = ("metrics.jsonl", "summary.json", "config.json", "checkpoints", "tensorboard")


def _validate(args: argparse.Namespace, config, world: int | None) -> None:
    from pathlib import Path

    from autoep.convert import plan_conversion
    from autoep.models.loading import build_meta_model
    from autoep.parallel.tensor_parallel import validate_tensor_parallel

    for name, value in (("--steps", args.steps), ("--seq-len", args.seq_len), ("--log-every", args.log_every)):
        if value < 1:
            raise AutoEPError(f"{name} must be >= 1, got {value}")
    for name, value in (
        ("--save-every", args.save_every),
        ("--keep-last", args.keep_last),
        ("--stop-at", args.stop_at),
        ("--max-skipped-steps", args.max_skipped_steps),
    ):
        if value is not None and value < 1:
            raise AutoEPError(f"{name} must be >= 1, got {value}")
    if args.resume:
        from autoep.checkpoint.manager import resolve_checkpoint

        if not args.output:
            raise AutoEPError("--resume needs --output: the run directory whose checkpoints to continue from")
        resolve_checkpoint(Path(args.output) / "checkpoints")
    _validate_data(args)
    meta = build_meta_model(args.model)
    if world is not None:
        config.parallel_dims(world)
        plan_conversion(meta, config.ep_size, world_size=world)
        validate_tensor_parallel(meta, config.tp_size)
        if args.gpu_memory and not inside_torchrun():  # a fake world in this process, before any real one
            from autoep.plan import check_layout

            check_layout(args.model, config, world, args.gpu_memory, args.seq_len)


def _validate_data(args: argparse.Namespace) -> None:
    """What can be checked without reading the data: files exist, datasets is installed where needed, flags fit."""
    from autoep.data.pipeline import holdout_percent
    from autoep.data.sources import DataSpec, check_spec

    for name, value in (("--eval-every", args.eval_every), ("--eval-rows", args.eval_rows)):
        if value is not None and value < 1:
            raise AutoEPError(f"{name} must be >= 1, got {value}")
    share = holdout_percent(args.eval_split)
    if share is not None and args.eval_data:
        raise AutoEPError("--eval-split N% holds out rows of --data; with --eval-data give a split name or nothing")
    if args.eval_every and not (args.eval_data or args.eval_split):
        raise AutoEPError("--eval-every needs evaluation data: --eval-data or --eval-split")
    for value in (args.data, args.eval_data):
        if value:
            check_spec(DataSpec(value, args.split, args.data_config))


class CollectiveTimeout(RuntimeError):
    """A collective waited past --collective-timeout; the message says where this rank was."""


def _worker(job) -> dict[str, Any]:
    from autoep.launch import collective_timeout
    from autoep.train.heartbeat import describe_timeout, is_timeout
    from autoep.train.loop import run_training

    try:
        return run_training(job)
    except AutoEPError as err:  # raised identically on every rank: report it once, from the parent
        return {"error": str(err)}
    except Exception as err:
        if not is_timeout(err):
            raise
        timeout = collective_timeout()
        _exit_now(CollectiveTimeout(describe_timeout(err, timeout.total_seconds() if timeout else None)))


def _exit_now(err: BaseException) -> None:
    """Leave this worker at once, non-zero, with ``err`` recorded for torch elastic's failure report.

    After a collective timed out, a peer is gone or stuck: unwinding normally would
    tear down the process group, which can wait for that peer forever.
    """
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    print(f"autoep: error: {err}", file=sys.stderr, flush=True)
    try:
        ErrorHandler().record_exception(err)
    finally:
        os._exit(1)


def _print_summary(summary: dict[str, Any]) -> None:
    if not summary["steps"]:
        print(f"autoep train: nothing to do, the run is already at step {summary['last_step']}")
        return
    tp = f", tp={summary['tp']}" if summary.get("tp", 1) > 1 else ""
    print(
        f"autoep train: steps {summary['first_step']}-{summary['last_step']} of {summary['model']} "
        f"on {summary['world_size']} ranks "
        f"(ep={summary['ep']}{tp}, zero={summary['zero_stage']}) in {summary['seconds']:.1f}s\n"
        f"  loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f}, "
        f"{summary['tokens_per_s']:,.0f} tokens/s, final expert imbalance {summary['final_expert_imbalance']:.2f}"
        + (f"\n  metrics: {summary['output']}/metrics.jsonl" if summary.get("output") else "")
    )


def run(args: argparse.Namespace) -> int:
    from autoep.data import DataOptions
    from autoep.train.loop import TrainJob

    launcher = None if inside_torchrun() else launcher_settings(args)
    config = build_config(args)
    nproc, world = planned_world(args)
    _validate(args, config, world)
    if launcher is not None:  # inside torchrun a restart looks like a fresh start: see _check_fresh_start
        _check_fresh_start(args)
    output = args.output or os.path.join(
        "runs", f"{os.path.basename(args.model.rstrip('/'))}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    job = TrainJob(
        config=config,
        model=args.model,
        data=args.data,
        steps=args.steps,
        seq_len=args.seq_len,
        output=output,
        log_every=args.log_every,
        save_every=args.save_every,
        keep_last=args.keep_last,
        resume=args.resume,
        stop_at=args.stop_at,
        nonfinite_policy=args.on_nonfinite,
        max_skipped_steps=args.max_skipped_steps,
        preempt_signal=args.preempt_signal,
        heartbeat_dir=args.heartbeat,
        data_options=DataOptions(
            text_field=args.text_field,
            split=args.split,
            data_config=args.data_config,
            format=args.format,
            tokenizer=args.tokenizer,
            packing=not args.no_packing,
            eval_data=args.eval_data,
            eval_split=args.eval_split,
            eval_every=args.eval_every,
            eval_rows=args.eval_rows,
            cache_dir=args.data_cache,
        ),
    )
    if args.collective_timeout <= 0:
        raise AutoEPError(f"--collective-timeout must be > 0 seconds, got {args.collective_timeout}")
    from autoep.launch import COLLECTIVE_TIMEOUT_ENV

    os.environ[COLLECTIVE_TIMEOUT_ENV] = str(args.collective_timeout)  # read by every worker's process group
    if inside_torchrun():
        summary = _run_in_this_process(job)
    else:
        summary = _launch(job, nproc, launcher)
        if summary is None:  # this node does not host global rank 0
            return 0
    if "error" in summary:
        raise AutoEPError(summary["error"])
    if summary.get("preempted"):
        return _preempted(job)
    if int(os.environ.get("RANK", 0)) == 0:
        _print_summary(summary)
    return 0


def _launch(job, nproc: int, launcher: dict[str, Any]) -> dict[str, Any] | None:
    """Run the workers; rank 0's summary (``None`` on a node without rank 0).

    A preemption signal sent to this launcher reaches the workers (torch
    elastic forwards SIGTERM; SIGUSR1 is forwarded here), which save and
    return; torch elastic then re-raises the signal as ``SignalException``,
    answered from the checkpoint the workers left.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from autoep.launch import run_local
    from autoep.train.preemption import forward_to_children

    if job.preempt_signal != "SIGTERM":
        forward_to_children(job.preempt_signal)
    try:
        results = run_local(_worker, nproc, job, **launcher)
    except SignalException:
        if _last_checkpoint_preempted(job):
            return {"preempted": True}
        raise
    except ChildFailedError as err:
        timeouts = _timeout_lines(err)
        if timeouts:
            raise AutoEPError("; ".join(timeouts[:4])) from None
        raise
    return results.get(0)


def _timeout_lines(err: BaseException) -> list[str]:
    """The one-line reports of ranks whose collectives timed out, from torch elastic's failure records."""
    lines = []
    for failure in getattr(err, "failures", {}).values():
        message = getattr(failure, "message", "") or ""
        text = str(message.get("message", "") if isinstance(message, dict) else message)
        lines += [line.strip() for line in text.splitlines() if "a collective timed out" in line]
    return sorted(set(lines))


def _last_checkpoint_preempted(job) -> bool:
    from pathlib import Path

    from autoep.checkpoint.manager import read_metadata, resolve_checkpoint
    from autoep.errors import CheckpointError

    try:
        meta = read_metadata(resolve_checkpoint(Path(job.output) / "checkpoints"))
    except CheckpointError:
        return False
    return bool((meta.get("extra") or {}).get("preempted"))


def _preempted(job) -> int:
    from autoep.train.preemption import EXIT_PREEMPTED

    if int(os.environ.get("RANK", 0)) == 0:
        print(f"autoep train: preempted; checkpoint saved in {job.output}/checkpoints, continue with --resume")
    return EXIT_PREEMPTED


def _run_in_this_process(job) -> dict[str, Any]:
    import torch.distributed as dist

    from autoep.launch import collective_timeout, default_backend
    from autoep.teardown import end_process_group

    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group(default_backend(), timeout=collective_timeout())
    summary = _worker(job)  # a rank that raises keeps its group: a peer may be gone (see autoep.launch)
    if owns_group:
        end_process_group()  # this process then exits with the command's status, without gloo's exit abort
    return summary
