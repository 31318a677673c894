"""``autoep check CKPT``: verify a checkpoint offline, file by file, against the checksums taken at save."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check",
        help="verify a checkpoint's files against the checksums recorded when it was saved",
        description="Verify CKPT (a checkpoints root, which uses its 'latest', or one step directory), in this "
        "process: every shard DCP's metadata needs is present and long enough, and every file has the size and "
        "CRC-32 it had when it was written. Exit 0 when intact, 1 when damaged, 2 when there is no checkpoint.",
    )
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint root (e.g. runs/x/checkpoints) or step directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from autoep.checkpoint.integrity import read_manifests, verify_entries
    from autoep.checkpoint.manager import read_metadata, resolve_checkpoint, verify_files
    from autoep.errors import CheckpointError

    step_dir = resolve_checkpoint(args.checkpoint)
    problems = []
    try:
        read_metadata(step_dir)
        verify_files(step_dir)
    except CheckpointError as err:
        problems.append(str(err))
    entries = read_manifests(step_dir)
    problems += verify_entries(step_dir, entries)
    if not entries:
        print(f"autoep check: {step_dir} has no checksums (saved before autoep recorded them); structure only")
    if problems:
        for problem in problems:
            print(f"DAMAGED {problem}")
        print(f"autoep check: {step_dir} is damaged ({len(problems)} problem(s) in {len(entries)} files)")
        return 1
    size = sum(size for size, _ in entries.values())
    print(f"autoep check: {step_dir} is intact ({len(entries)} files, {size:,} bytes verified)")
    return 0
