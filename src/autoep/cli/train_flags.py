"""The flags of ``autoep train``, grouped as ``--help`` shows them, and their defaults."""

from __future__ import annotations

import argparse

from autoep.cli.launcher import STATIC_PORT
from autoep.launch import DEFAULT_RDZV_TIMEOUT, SHARED_RUN_ID

DEFAULTS = {"ep_size": 2, "zero_stage": 3, "micro_batch_size": 4, "lr": 1e-3}
BALANCE_FLAGS = (
    "aux_loss_coef",
    "seq_aux_loss_coef",
    "global_aux_loss_coef",
    "z_loss_coef",
    "bias_update_rate",
    "bias_update_rule",
    "capacity_factor",
    "drop_policy",
)


def add_flags(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
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
    g.add_argument(
        "--zero-backend",
        choices=["replicated", "fsdp"],
        help="ZeRO 0-2: whole parameters and bucketed reductions (replicated, the default) or FSDP2 (fsdp: "
        "ZeRO 1/2 parameters sharded between steps)",
    )
    g.add_argument("--activation-checkpointing", action="store_true", help="recompute activations in backward")
    g.add_argument(
        "--recompute-expert-activation",
        action="store_true",
        help="keep only the experts' gate/up output for backward; recompute activation and down projection",
    )
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
    return p
