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

from autoep.errors import AutoEPError
from autoep.launch import DEFAULT_RDZV_TIMEOUT, SHARED_RUN_ID

STATIC_PORT = 29500  # torchrun's --master-port default
DEFAULTS = {"ep_size": 2, "zero_stage": 3, "micro_batch_size": 4, "lr": 1e-3}
_BALANCE_FLAGS = (
    "aux_loss_coef",
    "seq_aux_loss_coef",
    "global_aux_loss_coef",
    "z_loss_coef",
    "bias_update_rate",
    "bias_update_rule",
    "capacity_factor",
    "drop_policy",
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a MoE model with expert parallelism and ZeRO (FSDP2)",
        description=(
            "Train MODEL with expert parallelism. With no arguments: the built-in tiny Mixtral-style model on the "
            "built-in corpus, 4 CPU processes (gloo), ep=2, ZeRO-3. On CUDA machines: one process per GPU (NCCL). "
            "Inside torchrun, the current processes are used. Settings come from the built-in defaults, then "
            "--config, then the flags given."
        ),
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="tiny-mixtral", help="built-in model name or local HF model directory")
    g.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default: 64)")
    g = p.add_argument_group("data (docs/data.md)")
    g.add_argument(
        "--data",
        help="training data: .jsonl/.json/.parquet/.csv/.txt files or a glob of them, a datasets.save_to_disk "
        "directory, or a dataset name load_dataset resolves (offline: from its cache) (default: built-in corpus)",
    )
    g.add_argument("--format", choices=["text", "chat", "prompt-completion"], help="default: detected from the fields")
    g.add_argument("--text-field", help="the field holding the text of a text record (default: text)")
    g.add_argument("--split", default="train", help="split of a named or saved dataset (default: train)")
    g.add_argument("--data-config", help="configuration name of a named dataset")
    g.add_argument("--tokenizer", help="tokenizer directory (default: the model directory's; UTF-8 bytes for built-in)")
    g.add_argument(
        "--no-packing", action="store_true", help="one document per row, padded (default: pack documents into rows)"
    )
    g.add_argument("--eval-data", help="evaluation data, read like --data")
    g.add_argument(
        "--eval-split",
        help="a split of --data (or of --eval-data) to evaluate on, or N%% to hold out the last N%% of --data's rows",
    )
    g.add_argument("--eval-every", type=int, help="evaluate every N steps (default: after the last step only)")
    g.add_argument("--eval-rows", type=int, help="evaluate on at most this many rows (default: all)")
    g.add_argument(
        "--data-cache",
        help="where tokenized data is cached (default: $AUTOEP_DATA_CACHE or ~/.cache/autoep/data); "
        "shared by every rank, and by later runs",
    )
    g = p.add_argument_group("parallelism and recipe (override --config)")
    g.add_argument("--config", help="DeepSpeed-style JSON config (zero stage, expert_parallel, bf16, optimizer...)")
    g.add_argument("--ep", type=int, help=f"expert-parallel size (default: {DEFAULTS['ep_size']})")
    g.add_argument(
        "--tp", type=int, help="tensor-parallel size of the dense path; MoE layers fold over it (default: 1)"
    )
    g.add_argument("--zero", type=int, choices=[0, 1, 2, 3], help=f"ZeRO stage (default: {DEFAULTS['zero_stage']})")
    g.add_argument("--steps", type=int, default=200, help="optimizer steps (default: 200)")
    g.add_argument(
        "--micro-batch", type=int, help=f"sequences per rank per micro-step (default: {DEFAULTS['micro_batch_size']})"
    )
    g.add_argument("--grad-accum", type=int, help="micro-steps per optimizer step (default: 1)")
    g.add_argument("--lr", type=float, help=f"peak learning rate (default: {DEFAULTS['lr']})")
    g.add_argument(
        "--optimizer",
        choices=["adamw", "muon"],
        help="adamw, or muon (Muon for matrices and per-expert stacks, AdamW for the rest; default: adamw)",
    )
    g.add_argument("--clip", type=float, help="global gradient-norm clipping; 0 disables (default: 1.0)")
    g.add_argument("--bf16", action="store_true", help="bf16 parameters in forward/backward, fp32 reductions")
    g.add_argument("--activation-checkpointing", action="store_true", help="recompute activations in backward")
    g.add_argument("--seed", type=int, help="seed for weights of built-in models and data order (default: 0)")
    g.add_argument(
        "--gpu-memory",
        help="memory per GPU (e.g. 80GiB): simulate this layout first (as `autoep plan` does) and refuse it, "
        "with the numbers, if it will not fit",
    )
    g = p.add_argument_group("load balancing (override --config's load_balancing; all off by default)")
    g.add_argument("--aux-loss-coef", type=float, help="switch-style aux loss per micro-batch")
    g.add_argument("--seq-aux-loss-coef", type=float, help="DeepSeek-V3 sequence-wise aux loss")
    g.add_argument("--global-aux-loss-coef", type=float, help="aux loss with expert counts summed over all ranks")
    g.add_argument("--z-loss-coef", type=float, help="router z-loss")
    g.add_argument("--bias-update-rate", type=float, help="aux-loss-free balancing: selection-bias step per update")
    g.add_argument(
        "--bias-update-rule",
        choices=["sign", "sign_centered"],
        help="DeepSeek-V3 sign rule or Moonlight's mean-centred one (default: sign)",
    )
    g.add_argument(
        "--capacity-factor", type=float, help="cap each expert at factor*T*K/E assignments (default: dropless)"
    )
    g.add_argument(
        "--drop-policy", choices=["probs", "position"], help="which over-capacity assignments go (default: probs)"
    )
    g = p.add_argument_group("output")
    g.add_argument("--output", help="run directory for metrics.jsonl, config.json, summary.json (default: runs/...)")
    g.add_argument("--log-every", type=int, default=10, help="log line interval when not on a terminal")
    g.add_argument("--save-every", type=int, help="save a checkpoint every N steps and at the end (OUTPUT/checkpoints)")
    g.add_argument("--keep-last", type=int, default=3, help="checkpoints to keep (default: 3)")
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUTPUT/checkpoints/latest; world size, --ep and --zero may differ from the saved run",
    )
    g.add_argument(
        "--stop-at", type=int, help="stop after this step (the schedule still follows --steps), e.g. to split a run"
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in an --output that already holds a run, removing its metrics and checkpoints",
    )
    g = p.add_argument_group("faults")
    g.add_argument(
        "--on-nonfinite",
        choices=["skip", "stop"],
        default="skip",
        help="a step with a NaN/Inf loss or gradient norm: drop its update (default) or stop",
    )
    g.add_argument(
        "--max-skipped-steps",
        type=int,
        default=5,
        help="stop after this many non-finite steps in a row (default: 5)",
    )
    g.add_argument(
        "--collective-timeout",
        type=float,
        default=600.0,
        help="seconds a collective may wait for the other ranks; then every rank fails naming its step and "
        "phase instead of hanging (default: 600)",
    )
    g.add_argument(
        "--heartbeat",
        metavar="DIR",
        help="every rank keeps DIR/rank_N.txt at its current step and phase (to see where a hung job is)",
    )
    g.add_argument(
        "--preempt-signal",
        choices=["SIGTERM", "SIGUSR1"],
        default="SIGTERM",
        help="on this signal every rank finishes its step, saves a checkpoint and the job exits with code 75 "
        "(default: SIGTERM)",
    )
    g = p.add_argument_group("launcher (torch elastic)")
    g.add_argument("--nproc-per-node", type=int, help="processes per machine (default: GPUs, or 4 on CPU)")
    g.add_argument("--nnodes", default="1", help="machines, N or MIN:MAX (default: 1)")
    g.add_argument(
        "--rdzv-endpoint",
        help="HOST:PORT where the nodes meet, reachable from every node (default: localhost:0, one machine only)",
    )
    g.add_argument("--rdzv-backend", default="c10d", help="rendezvous backend: c10d (default) or static")
    g.add_argument(
        "--rdzv-id",
        help=f"job id, the same on every node (default: {SHARED_RUN_ID!r} with an --rdzv-endpoint, else random); "
        "jobs sharing an endpoint at the same time need different ids",
    )
    g.add_argument(
        "--rdzv-timeout",
        type=int,
        default=DEFAULT_RDZV_TIMEOUT,
        help=f"seconds to wait for every node to join; then exit 2 (default: {DEFAULT_RDZV_TIMEOUT})",
    )
    g.add_argument("--node-rank", type=int, help="this node's rank, 0..N-1 (static backend only)")
    g.add_argument("--master-addr", help="address of the node with --node-rank 0 (static backend only)")
    g.add_argument(
        "--master-port", type=int, help=f"port on --master-addr (static backend only; default: {STATIC_PORT})"
    )
    g.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        help="after a worker fails, restart all workers up to N times; they resume from OUTPUT/checkpoints/latest "
        "(default: 0)",
    )
    p.set_defaults(func=run)


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
    balance = dict(base["load_balancing"])
    for key in _BALANCE_FLAGS:
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


def _inside_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def _planned_world(args: argparse.Namespace) -> tuple[int, int | None]:
    """(processes per node, world size if known in advance)."""
    import torch

    if _inside_torchrun():
        return int(os.environ.get("LOCAL_WORLD_SIZE", 1)), int(os.environ["WORLD_SIZE"])
    nproc = args.nproc_per_node or (torch.cuda.device_count() if torch.cuda.is_available() else 4)
    if nproc < 1:
        raise AutoEPError(f"--nproc-per-node must be >= 1, got {nproc}")
    min_nodes, _, max_nodes = args.nnodes.partition(":")
    fixed = not max_nodes or max_nodes == min_nodes
    return nproc, nproc * int(min_nodes) if fixed else None


def _parse_nnodes(value: str) -> tuple[int, int]:
    low, _, high = value.partition(":")
    try:
        min_nodes, max_nodes = int(low), int(high or low)
    except ValueError:
        min_nodes = max_nodes = 0
    if not 1 <= min_nodes <= max_nodes:
        raise AutoEPError(f"--nnodes must be N or MIN:MAX with 1 <= MIN <= MAX, got {value!r}")
    return min_nodes, max_nodes


def _endpoint_port(endpoint: str) -> int:
    from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

    try:
        return parse_rendezvous_endpoint(endpoint, default_port=29400)[1]
    except ValueError:
        raise AutoEPError(f"--rdzv-endpoint must be HOST:PORT, got {endpoint!r}") from None


def _static_endpoint(args: argparse.Namespace, nodes: int) -> str:
    """The static backend's meeting point: node 0's address, and every other node's rank, named up front."""
    if args.rdzv_endpoint and (args.master_addr or args.master_port):
        raise AutoEPError("give the static backend's host once: --master-addr/--master-port or --rdzv-endpoint")
    if not args.rdzv_endpoint and not args.master_addr:
        raise AutoEPError("--rdzv-backend static needs --master-addr HOST, the node started with --node-rank 0")
    if nodes > 1 and args.node_rank is None:
        raise AutoEPError(f"--rdzv-backend static with --nnodes {nodes} needs --node-rank 0..{nodes - 1} on each node")
    if args.node_rank is not None and not 0 <= args.node_rank < nodes:
        raise AutoEPError(f"--node-rank must be in 0..{nodes - 1} for --nnodes {nodes}, got {args.node_rank}")
    return args.rdzv_endpoint or f"{args.master_addr}:{args.master_port or STATIC_PORT}"


def _launcher_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Check the launcher flags before anything starts; ``run_local``'s keyword arguments.

    Mistakes here would otherwise surface as nodes that wait for each other
    until the rendezvous times out, or as a torch traceback per node.
    """
    min_nodes, max_nodes = _parse_nnodes(args.nnodes)
    if args.max_restarts < 0:
        raise AutoEPError(f"--max-restarts must be >= 0, got {args.max_restarts}")
    if args.rdzv_timeout < 1:
        raise AutoEPError(f"--rdzv-timeout must be >= 1 second, got {args.rdzv_timeout}")
    if args.master_port is not None and not 1 <= args.master_port <= 65535:
        raise AutoEPError(f"--master-port must be in 1..65535, got {args.master_port}")
    if args.rdzv_backend == "static":
        if args.max_restarts > 0:
            raise AutoEPError(
                "--max-restarts needs --rdzv-backend c10d: torch's static backend hands restarted workers the "
                "failed attempt's store, where their initialisation can hang"
            )
        if min_nodes != max_nodes:
            raise AutoEPError(f"--rdzv-backend static needs a fixed --nnodes N, got {args.nnodes!r}")
        endpoint = _static_endpoint(args, max_nodes)
    else:
        for flag, value in (("--node-rank", args.node_rank), ("--master-addr", args.master_addr)):
            if value is not None:
                raise AutoEPError(f"{flag} is only read by --rdzv-backend static; c10d meets at --rdzv-endpoint")
        if args.master_port is not None:
            raise AutoEPError("--master-port is only read by --rdzv-backend static; c10d meets at --rdzv-endpoint")
        endpoint = args.rdzv_endpoint or "localhost:0"
    if max_nodes > 1 and args.save_every and not args.output:
        raise AutoEPError(
            "a multi-node run that saves checkpoints needs the same --output on every node, in a directory all "
            "nodes share (the default name carries each node's own start time)"
        )
    if _endpoint_port(endpoint) == 0 and max_nodes > 1:
        raise AutoEPError(
            f"--nnodes {args.nnodes} needs --rdzv-endpoint HOST:PORT with a fixed port on a host every node can "
            f"reach (the first node's address); {endpoint} only works on one machine"
        )
    return {
        "nnodes": f"{min_nodes}:{max_nodes}",
        "rdzv_endpoint": endpoint,
        "rdzv_backend": args.rdzv_backend,
        "rdzv_id": args.rdzv_id,
        "node_rank": args.node_rank,
        "rdzv_timeout": args.rdzv_timeout,
        "max_restarts": args.max_restarts,
    }


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
        if args.gpu_memory and not _inside_torchrun():  # a fake world in this process, before any real one
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

    launcher = None if _inside_torchrun() else _launcher_settings(args)
    config = build_config(args)
    nproc, world = _planned_world(args)
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
    if _inside_torchrun():
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

    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group(default_backend(), timeout=collective_timeout())
    try:
        return _worker(job)
    finally:
        if owns_group:
            dist.destroy_process_group()
