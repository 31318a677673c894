"""autoep vs DeepSpeed AutoEP, side by side on the identical model and data (CPU, gloo), plus the floor.

Runs ``../shared/peer-bench`` (its ``ds_autoep_bench.py`` in the DeepSpeed venv, its
``autoep_bench.py`` here): a Mixtral-style model (hidden 256, 8 experts, top-2, 4 layers),
``--nproc`` ranks (default 4) x 4 x 128 tokens, AdamW, the same initial weights and tokens on both sides. For every
(ep, ZeRO) the two run back to back, in alternating order, ``--repeats`` times; each run reports
its median step (max over ranks). The table gives the median over repeats and the median of the
per-repeat ratios: only same-run ratios mean anything on a shared machine. The floor is the
unconverted model doing the same global batch in one process on the same cores.

    DSV=/path/to/deepspeed-venv python benchmarks/peer_compare.py --out benchmarks/results/peer_compare_cpu.txt

The DeepSpeed venv: ``python -m venv $DSV && $DSV/bin/pip install torch==2.13.0 &&
DS_BUILD_OPS=0 $DSV/bin/pip install deepspeed==0.19.8 transformers==5.23.0`` (peer-bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT.parent / "shared" / "peer-bench"


def _torchrun(
    python: str, script: Path, nproc: int, args: list[str], out: Path, extra_env: dict[str, str], *, wrap: bool
) -> dict:
    """``wrap``: run ``script`` through then_shutdown.py (autoep's side: no gloo exit-time abort)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra_env}
    wrapper = [str(ROOT / "benchmarks" / "then_shutdown.py")] if wrap else []
    cmd = [python, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), *wrapper, str(script)]
    cmd += [*args, "--out", str(out)]
    done = subprocess.run(cmd, cwd=PEER, env=env, capture_output=True, text=True)
    if not out.exists():
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    if done.returncode != 0:  # results written, then a rank died at exit (gloo teardown, pytorch/pytorch#179291)
        print(f"note: {script.name} exited {done.returncode} after writing its results", flush=True)
    return json.loads(out.read_text())


def floor_step(steps: int, warmup: int, nproc: int) -> float:
    """Median step (ms) of the unconverted model on the global batch, one process, all cores."""
    import torch

    sys.path.insert(0, str(PEER))
    import common

    parser = common.add_model_args(argparse.ArgumentParser())
    args = parser.parse_args(["--steps", str(steps)])
    model = common.build_model(args)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=common.LR, betas=common.BETAS, eps=common.EPS, weight_decay=common.WEIGHT_DECAY
    )
    batch = torch.cat([common.rank_batches(args, rank)[0] for rank in range(nproc)])
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:]) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ds-python", default=os.path.join(os.environ.get("DSV", ""), "bin", "python"))
    parser.add_argument("--eps", default="2,4")
    parser.add_argument("--zeros", default="0,1,2,3")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--nproc", type=int, default=4, help="ranks (the issue's comparison: 4 on 2 cores)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--floor-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_only:
        print(json.dumps({"floor_ms": floor_step(args.steps, 2, args.nproc)}))
        return
    if not Path(args.ds_python).exists():
        sys.exit(f"no DeepSpeed venv python at {args.ds_python!r}: set DSV or --ds-python (see the docstring)")
    configs = [(ep, zero) for ep in map(int, args.eps.split(",")) for zero in map(int, args.zeros.split(","))]
    runs: dict[tuple[int, int], dict[str, list[float]]] = {c: {"ds": [], "autoep": [], "loss": []} for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for ep, zero in configs:
                flags = ["--ep", str(ep), "--zero", str(zero), "--steps", str(args.steps)]
                sides = [
                    ("ds", args.ds_python, PEER / "ds_autoep_bench.py", {"DS_ACCELERATOR": "cpu"}, False),
                    ("autoep", sys.executable, PEER / "autoep_bench.py", {}, True),
                ]
                results = {}
                for name, python, script, env, wrap in sides if repeat % 2 == 0 else sides[::-1]:
                    out = Path(tmp) / f"{name}-{ep}-{zero}-{repeat}.json"
                    results[name] = _torchrun(python, script, args.nproc, flags, out, env, wrap=wrap)
                    runs[(ep, zero)][name].append(results[name]["median_step_ms"])
                pairs = zip(results["ds"]["losses"], results["autoep"]["losses"], strict=True)
                diff = max(abs(a - b) for a, b in pairs)
                runs[(ep, zero)]["loss"].append(diff)
                print(f"repeat {repeat} ep{ep} zero{zero}: ds {runs[(ep, zero)]['ds'][-1]:.1f} ms, "
                      f"autoep {runs[(ep, zero)]['autoep'][-1]:.1f} ms", flush=True)  # fmt: skip
    floor = json.loads(
        subprocess.run(
            [sys.executable, __file__, "--floor-only", "--steps", str(args.steps), "--nproc", str(args.nproc)],
            env={**os.environ, "OMP_NUM_THREADS": "2"},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )["floor_ms"]
    lines = [
        f"# {' '.join(sys.argv)}",
        f"# median step ms over repeats (each run: median of its steps, max over {args.nproc} ranks); ratio: median of "
        "per-repeat autoep/DeepSpeed",
        f"# floor: unconverted model, global batch, one process, same 2 cores: {floor:.1f} ms",
        f"{'config':<12}{'DeepSpeed':>11}{'autoep':>9}{'ratio':>8}{'vs floor':>10}{'max |loss diff|':>17}",
    ]
    for (ep, zero), r in runs.items():
        ratio = statistics.median(a / d for a, d in zip(r["autoep"], r["ds"], strict=True))
        ds, ae = statistics.median(r["ds"]), statistics.median(r["autoep"])
        lines.append(
            f"{f'ep{ep} zero{zero}':<12}{ds:>11.1f}{ae:>9.1f}{ratio:>8.3f}{ae / floor:>10.2f}{max(r['loss']):>17.2e}"
        )
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
