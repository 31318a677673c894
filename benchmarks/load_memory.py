"""Peak memory per rank while `autoep.from_pretrained` loads a >= 1 GB model at world 4.

    python benchmarks/load_memory.py                # builds /tmp/autoep-load-bench once (about 1.2 GB)
    python benchmarks/load_memory.py --ep 2 --zero 1

The bound autoep holds itself to, per rank:

    peak RSS <= 1.3 x (model bytes / world) + largest single tensor + baseline RSS

where the baseline is the process's RSS right before the load (Python, torch,
transformers and the distributed runtime). The model is a Mixtral-style MoE
written by transformers' own ``save_pretrained`` (per-expert keys), fp32.
"""

from __future__ import annotations

import argparse
import json
import resource
from pathlib import Path

import torch

import autoep
from autoep.launch import run_local


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _write_model(directory: str, layers: int) -> None:
    from transformers import AutoModelForCausalLM, MixtralConfig

    config = MixtralConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=1024,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        num_local_experts=8,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(directory, max_shard_size="500MB")


def build_checkpoint(directory: Path, layers: int) -> dict:
    """Write the model once, in a child process: workers are forked from this process, and a
    forked child's peak RSS starts at its parent's, so this process must never hold the model."""
    import multiprocessing

    if not (directory / "config.json").is_file():
        writer = multiprocessing.get_context("spawn").Process(target=_write_model, args=(str(directory), layers))
        writer.start()
        writer.join()
    from autoep.checkpoint.safetensors_io import SafetensorsSource

    source = SafetensorsSource(directory)
    sizes = [torch.Size(source.shape(k)).numel() * 4 for k in source.weight_map]
    return {"model_bytes": sum(sizes), "largest_tensor_bytes": max(sizes)}


def _worker(directory: str, ep: int, zero: int) -> dict:
    import gc

    import transformers.models.mixtral.modeling_mixtral  # noqa: F401  (code, not weights: part of the baseline)

    gc.collect()
    baseline = _rss_mib()
    model = autoep.from_pretrained(directory, autoep.AutoEPConfig(ep_size=ep, zero_stage=zero))
    local = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    return {"baseline_mib": baseline, "peak_mib": _peak_mib(), "local_param_mib": local / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/autoep-load-bench")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--ep", type=int, default=4)
    parser.add_argument("--zero", type=int, default=3)
    args = parser.parse_args()

    directory = Path(args.dir)
    sizes = build_checkpoint(directory, args.layers)
    results = run_local(_worker, args.world, str(directory), args.ep, args.zero)
    model_mib = sizes["model_bytes"] / 2**20
    largest_mib = sizes["largest_tensor_bytes"] / 2**20
    print(
        f"model {model_mib:,.0f} MiB fp32, largest tensor {largest_mib:,.0f} MiB, world {args.world}, "
        f"ep {args.ep}, ZeRO {args.zero}"
    )
    print(f"{'rank':>4} {'baseline':>9} {'peak':>8} {'peak-base':>9} {'local params':>12} {'bound':>8} {'ratio':>6}")
    rows = []
    for rank, r in sorted(results.items()):
        bound = 1.3 * model_mib / args.world + largest_mib + r["baseline_mib"]
        rows.append({**r, "rank": rank, "bound_mib": bound, "ok": r["peak_mib"] <= bound})
        print(
            f"{rank:>4} {r['baseline_mib']:>9.0f} {r['peak_mib']:>8.0f} {r['peak_mib'] - r['baseline_mib']:>9.0f} "
            f"{r['local_param_mib']:>12.0f} {bound:>8.0f} {r['peak_mib'] / bound:>6.2f}"
        )
    print("within bound on every rank" if all(r["ok"] for r in rows) else "BOUND EXCEEDED")
    print(json.dumps({"model_mib": model_mib, "largest_tensor_mib": largest_mib, "ranks": rows}))


if __name__ == "__main__":
    main()
