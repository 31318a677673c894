"""``autoep`` entry point: subcommands ``train``, ``inspect``, ``verify``, ``export``, ``report`` and ``check``.

Errors autoep raises on purpose (:class:`~autoep.errors.AutoEPError`) print as
one line on stderr and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from autoep.errors import AutoEPError
from autoep.teardown import exit_with


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="show the MoE layers autoep finds in MODEL and how they would be split",
        description="Detect the MoE blocks of MODEL (built on the meta device: no weights are read) "
        "and print how each would be converted at the given expert-parallel size, and with --tp which "
        "dense blocks tensor parallelism would split.",
    )
    p.add_argument("model", help="built-in tiny model (e.g. tiny-mixtral) or a local HF model directory")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size to plan for (default: 1)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to plan for (default: 1)")
    p.set_defaults(func=_run_inspect)


def _add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify",
        help="check the converted MODEL against the original, layer by layer",
        description="Run the original and the converted MODEL on the same batch and print, per MoE layer, "
        "the largest difference in outputs and in gradients, with a pass/fail verdict. "
        "With --ep N > 1, N local processes are started (gloo on CPU, NCCL on GPUs).",
    )
    p.add_argument("model", help="built-in tiny model (e.g. tiny-deepseek-v3) or a local HF model directory")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size; starts this many processes")
    p.add_argument("--batch-size", type=int, default=2, help="sequences per rank (default: 2)")
    p.add_argument("--seq-len", type=int, default=16, help="tokens per sequence (default: 16)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="default: float32")
    p.add_argument("--seed", type=int, default=0, help="seed for the batch and the tiny models' weights")
    p.add_argument("--atol", type=float, default=None, help="absolute tolerance (default 1e-5 fp32, 1e-2 bf16)")
    p.add_argument("--rtol", type=float, default=None, help="relative tolerance (default 1e-4 fp32, 5e-2 bf16)")
    p.set_defaults(func=_run_verify)


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write an autoep checkpoint as a Hugging Face model directory",
        description="Convert CKPT (a run's checkpoints directory, which uses its 'latest', or one step directory) "
        "into OUT_DIR: safetensors shards plus config.json, loadable with transformers' from_pretrained. "
        "Streams one tensor at a time; the whole model is never in memory.",
    )
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint root (e.g. runs/x/checkpoints) or step directory")
    p.add_argument("out_dir", metavar="OUT_DIR", help="where to write the HF model (replaced only when complete)")
    p.add_argument("--fused", action="store_true", help="keep experts fused ([E, ...] tensors) instead of per expert")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default: 5GB)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="cast weights (default: as saved)")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    import torch

    from autoep.checkpoint import export_checkpoint

    out = export_checkpoint(
        args.checkpoint,
        args.out_dir,
        max_shard_size=args.max_shard_size,
        per_expert=not args.fused,
        dtype=getattr(torch, args.dtype) if args.dtype else None,
    )
    print(f"autoep export: wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autoep", description="Automatic expert parallelism for Hugging Face MoE models."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    from autoep.cli import check, report, train

    train.add_parser(sub)
    _add_inspect(sub)
    _add_verify(sub)
    _add_export(sub)
    report.add_parser(sub)
    check.add_parser(sub)
    _add_plan(sub)
    return parser


def _add_plan(sub: argparse._SubParsersAction) -> None:
    from autoep.cli.plan import add_parser

    add_parser(sub)


def _run_inspect(args: argparse.Namespace) -> int:
    from autoep.cli.render import print_table
    from autoep.convert import ConversionReport, plan_conversion
    from autoep.models.loading import build_meta_model
    from autoep.parallel.tensor_parallel import validate_tensor_parallel

    model = build_meta_model(args.model)
    report = plan_conversion(model, args.ep)
    tp_plan = validate_tensor_parallel(model, args.tp)
    total = sum(p.numel() for p in model.parameters())
    title = (
        f"{args.model}: {len(report.layers)} MoE layers, family {', '.join(report.families)}, "
        f"{total:,} parameters; plan for ep={args.ep} (EP rank 0)"
    )
    print_table(title, ConversionReport.HEADERS, report.rows())
    if args.tp > 1:
        print(f"plan for tp={args.tp}: {tp_plan}")
    return 0


def _verify_worker(model: str, ep: int, kwargs: dict):
    from autoep.verify import verify_model

    return verify_model(model, ep, **kwargs)


def _run_verify(args: argparse.Namespace) -> int:
    import torch

    from autoep.cli.render import print_table
    from autoep.convert import plan_conversion
    from autoep.models.loading import build_meta_model

    # Fail fast, here and once, on a bad MODEL or --ep, before any worker starts.
    plan_conversion(build_meta_model(args.model), args.ep)
    kwargs = dict(
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        seed=args.seed,
        dtype=getattr(torch, args.dtype),
        atol=args.atol,
        rtol=args.rtol,
    )
    if args.ep == 1:
        report = _verify_worker(args.model, 1, kwargs)
    else:
        from autoep.launch import run_local

        results = run_local(_verify_worker, args.ep, args.model, args.ep, kwargs)
        reports = [results[r] for r in sorted(results)]
        report = reports[0]
        for other in reports[1:]:
            report = report.merge(other)
    rows = [
        (
            c.path,
            f"{c.output_diff:.2e}",
            f"{c.grad_diff:.2e}",
            "pass" if report.layer_passed(c) else "FAIL",
        )
        for c in report.layers
    ]
    rows.append(
        (
            "logits",
            f"{report.logits_diff:.2e}",
            "",
            "pass" if report.within(report.logits_diff, report.logits_scale) else "FAIL",
        )
    )
    title = (
        f"autoep verify {args.model}: ep={args.ep}, {report.dtype}, tolerance {report.atol:g} + {report.rtol:g}·|ref|"
        + (" (worst over ranks)" if args.ep > 1 else "")
    )
    print_table(title, ("layer", "max |Δ output|", "max |Δ grad|", "verdict"), rows)
    print("PASS: the converted model matches the original" if report.passed else "FAIL: see the layers above")
    return 0 if report.passed else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except AutoEPError as err:
        print(f"autoep: error: {err}", file=sys.stderr)
        code = 2
    return exit_with(code)  # a rank that ran under torchrun leaves with it, skipping finalization


if __name__ == "__main__":
    sys.exit(main())
