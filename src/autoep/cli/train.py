"""``autoep train``: validate once, start the workers, train, summarise.

Configuration precedence: built-in defaults < ``--config ds.json`` < flags.
Everything that can be checked before starting workers is checked here, in
one process, so a mistake prints one line instead of a traceback per rank.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from autoep.errors import AutoEPError

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
    g.add_argument("--data", help="a .txt file or a .jsonl file with a 'text' field per line (default: built-in)")
    g.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default: 64)")
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
    g = p.add_argument_group("launcher (torch elastic)")
    g.add_argument("--nproc-per-node", type=int, help="processes per machine (default: GPUs, or 4 on CPU)")
    g.add_argument("--nnodes", default="1", help="machines, N or MIN:MAX (default: 1)")
    g.add_argument("--rdzv-endpoint", default="localhost:0", help="host:port of the rendezvous (multi-node)")
    g.add_argument("--rdzv-backend", default="c10d", help="rendezvous backend (default: c10d)")
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
    ):
        if value is not None and value < 1:
            raise AutoEPError(f"{name} must be >= 1, got {value}")
    if args.resume:
        from autoep.checkpoint.manager import resolve_checkpoint

        if not args.output:
            raise AutoEPError("--resume needs --output: the run directory whose checkpoints to continue from")
        resolve_checkpoint(Path(args.output) / "checkpoints")
    if args.data and not Path(args.data).is_file():
        raise AutoEPError(f"data file {args.data!r} does not exist")
    meta = build_meta_model(args.model)
    if world is not None:
        config.parallel_dims(world)
        plan_conversion(meta, config.ep_size, world_size=world)
        validate_tensor_parallel(meta, config.tp_size)


def _worker(job) -> dict[str, Any]:
    from autoep.train.loop import run_training

    try:
        return run_training(job)
    except AutoEPError as err:  # raised identically on every rank: report it once, from the parent
        return {"error": str(err)}


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
    from autoep.train.loop import TrainJob

    config = build_config(args)
    nproc, world = _planned_world(args)
    _validate(args, config, world)
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
    )
    if _inside_torchrun():
        summary = _run_in_this_process(job)
    else:
        from autoep.launch import run_local

        results = run_local(
            _worker,
            nproc,
            job,
            nnodes=args.nnodes,
            rdzv_endpoint=args.rdzv_endpoint,
            rdzv_backend=args.rdzv_backend,
        )
        summary = results.get(0)
        if summary is None:  # this node does not host global rank 0
            return 0
    if "error" in summary:
        raise AutoEPError(summary["error"])
    if int(os.environ.get("RANK", 0)) == 0:
        _print_summary(summary)
    return 0


def _run_in_this_process(job) -> dict[str, Any]:
    import torch.distributed as dist

    from autoep.launch import default_backend

    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group(default_backend())
    try:
        return _worker(job)
    finally:
        if owns_group:
            dist.destroy_process_group()
