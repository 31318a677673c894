"""What one MoE layer costs besides FLOPs, counted exactly (no timing), per layer and per token.

For each model and expert-parallel size, on real gloo ranks, the first MoE
layer of the converted model runs forward and backward on T tokens per rank:

* host syncs in forward and in backward (every op that needs a device-to-host
  copy; see autoep.report.costs);
* all-to-all bytes sent per token in forward and backward, and the lower bound
  (each token's row sent once per distinct destination rank: what dispatch
  must move; routing metadata is reported apart);
* bytes saved for backward per token, against the unconverted HF block with
  its grouped-GEMM experts implementation (the faster one; eager saves more);
* collectives per training step of the whole model (dense and expert meshes),
  by kind.

    python benchmarks/moe_costs.py                          # the default table (3 models x ep 2, 4)
    python benchmarks/moe_costs.py --models tiny-mixtral --ep 2 --tokens 512

Counts are deterministic for a seed: they do not depend on the machine.
"""

from __future__ import annotations

import argparse
import copy
import os
from collections import Counter

import torch
import torch.distributed as dist

from autoep.moe.row_message import RowLayout

os.environ.setdefault("OMP_NUM_THREADS", "1")

QWEN3_LAYER = "qwen3-moe-layer"  # Qwen3-MoE's routing shape (128 experts, top-8) at a CPU-sized width


def build(name: str, seed: int = 0) -> torch.nn.Module:
    from autoep.models.tiny import build_tiny_model, tiny_config

    if name != QWEN3_LAYER:
        return build_tiny_model(name, seed=seed)
    from transformers import AutoModelForCausalLM

    config = tiny_config(
        "tiny-qwen3-moe",
        hidden_size=128,
        moe_intermediate_size=64,
        num_experts=128,
        num_experts_per_tok=8,
        num_hidden_layers=2,
        norm_topk_prob=True,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def _first_moe_block(model: torch.nn.Module) -> tuple[str, torch.nn.Module]:
    from autoep.moe.sites import moe_sites

    path, _ = moe_sites(model)[0]
    return path, model.get_submodule(path)


def _hf_block(model: torch.nn.Module, path: str) -> torch.nn.Module:
    block = model.get_submodule(path)
    setter = getattr(model, "set_experts_implementation", None)
    if setter is not None:
        try:
            setter("grouped_mm")
        except (ValueError, KeyError, AttributeError):
            pass
    return block


def _layer_costs(block: torch.nn.Module, x_BSD: torch.Tensor) -> dict:
    from autoep.report.costs import CollectiveCounter, HostSyncCounter, SavedBytes

    x = x_BSD.clone().requires_grad_(True)
    with HostSyncCounter() as fwd_syncs, CollectiveCounter() as fwd_comm, SavedBytes(block) as saved:
        out = block(x)
    out = out[0] if isinstance(out, tuple) else out
    grad = torch.ones_like(out) / out.numel()
    with HostSyncCounter() as bwd_syncs, CollectiveCounter() as bwd_comm:
        out.backward(grad)
    return {
        "syncs_fwd": fwd_syncs.total,
        "syncs_fwd_kinds": dict(fwd_syncs.counts),
        "syncs_bwd": bwd_syncs.total,
        "syncs_bwd_kinds": dict(bwd_syncs.counts),
        "a2a_fwd": fwd_comm.all_to_all_bytes,
        "a2a_bwd": bwd_comm.all_to_all_bytes,
        "saved": saved.bytes,
    }


def _record_routing(block: torch.nn.Module) -> list:
    """Keep the (post-capacity) expert ids the dispatcher is handed; benchmark-only instrumentation."""
    from autoep.moe.sites import moe_sites

    site = moe_sites(block)[0][1] if moe_sites(block) else block
    seen: list = []
    dispatch = site.dispatcher.start_dispatch  # every schedule goes through it

    def recording(x_TD, weights_TK, indices_TK):
        seen.append((indices_TK.detach().clone(), site.num_experts, x_TD.shape[-1] * x_TD.element_size()))
        seen.append(RowLayout(x_TD.shape[-1], indices_TK.shape[1], x_TD.dtype))
        return dispatch(x_TD, weights_TK, indices_TK)

    site.dispatcher.start_dispatch = recording
    return seen


def _lower_bound(seen: list, ep: int) -> tuple[int, int]:
    """Bytes of token rows one exchange must send (one row per token and distinct real destination rank),
    and the bytes of routing metadata autoep packs into those rows (k fp32 weights and k ids per row,
    autoep.moe.row_message)."""
    (indices_TK, num_experts, row_bytes), layout = seen[0], seen[1]
    per_rank = num_experts // ep
    ranks_TK = torch.div(indices_TK, per_rank, rounding_mode="floor")  # dropped choices (id E) -> rank ep
    hit = torch.zeros(ranks_TK.shape[0], ep + 1, dtype=torch.bool).scatter_(1, ranks_TK, True)[:, :ep]
    rows = int(hit.sum())
    meta_bytes = (layout.columns - layout.D) * layout.dtype.itemsize
    return rows * row_bytes, rows * meta_bytes


def _measure(model_name: str, ep: int, tokens: int, seed: int) -> dict:
    import autoep
    from autoep.moe.sites import moe_sites
    from autoep.optim import build_optimizer
    from autoep.report.costs import CollectiveCounter
    from autoep.train import train_step

    torch.set_num_threads(1)
    rank = dist.get_rank()
    reference = build(model_name, seed)
    converted = copy.deepcopy(reference)
    autoep.convert(converted, ep_size=ep)  # the layer alone: FSDP does not change what it sends or keeps
    path, block = _first_moe_block(converted)
    hidden = reference.config.get_text_config().hidden_size
    x_BSD = torch.randn(1, tokens, hidden, generator=torch.Generator().manual_seed(seed + rank))
    seen = _record_routing(block)
    ours = _layer_costs(block, x_BSD)
    ours["bound"], ours["meta"] = _lower_bound(seen, ep)
    site = moe_sites(converted)[0][1]
    site.recompute_activation = True  # AutoEPConfig(recompute_expert_activation=True)
    ours["saved_recompute"] = _layer_costs(block, x_BSD)["saved"]
    site.recompute_activation = False
    theirs = _layer_costs(_hf_block(reference, path), x_BSD)
    # Collectives of one whole training step (dense + expert meshes).
    model = copy.deepcopy(reference)
    config = autoep.AutoEPConfig(ep_size=ep, zero_stage=1)
    autoep.parallelize(model, config)
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (1, 64), generator=torch.Generator().manual_seed(seed + rank))
    optimizer = build_optimizer(model, config)
    with CollectiveCounter() as step_comm:
        train_step(model, optimizer, [ids])
    keys = ("a2a_fwd", "a2a_bwd", "bound", "meta", "saved", "saved_recompute")
    totals = torch.tensor([ours[k] for k in keys] + [theirs["saved"]], dtype=torch.float64)
    dist.all_reduce(totals)  # per-token figures over the whole EP group
    ours.update({f"{k}_all": v for k, v in zip(keys, totals[:-1].tolist(), strict=True)})
    theirs["saved_all"] = totals[-1].item()
    return {"ours": ours, "hf": theirs, "step": dict(step_comm.counts), "tokens": tokens * dist.get_world_size()}


def _row(model_name: str, ep: int, r: dict) -> str:
    ours, hf, tokens = r["ours"], r["hf"], r["tokens"]
    collectives = ", ".join(f"{k} {v}" for k, v in sorted(Counter(r["step"]).items()) if "wrap" not in k)
    # Each direction has two row exchanges (dispatch, combine; their gradients in backward).
    rows_fwd = (ours["a2a_fwd_all"] - ours["meta_all"]) / (2 * ours["bound_all"])
    rows_bwd = (ours["a2a_bwd_all"] - ours["meta_all"]) / (2 * ours["bound_all"])
    return (
        f"| {model_name} | {ep} | {ours['syncs_fwd']} | {ours['syncs_bwd']} | {ours['a2a_fwd_all'] / tokens:.0f} | "
        f"{ours['a2a_bwd_all'] / tokens:.0f} | {ours['meta_all'] / tokens:.0f} | "
        f"{2 * ours['bound_all'] / tokens:.0f} | "
        f"{rows_fwd:.2f} / {rows_bwd:.2f} | {ours['saved_all'] / tokens:.0f} | "
        f"{ours['saved_recompute_all'] / tokens:.0f} | {hf['saved_all'] / tokens:.0f} | "
        f"{hf['syncs_fwd']} / {hf['syncs_bwd']} | {collectives} |"
    )


def main() -> None:
    from autoep.launch import run_local

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny-mixtral", "tiny-deepseek-v3", QWEN3_LAYER])
    parser.add_argument("--ep", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--tokens", type=int, default=256, help="tokens per rank (default 256)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(
        "| model | ep | syncs fwd | syncs bwd | a2a B/token fwd | a2a B/token bwd | of which routing metadata | "
        "lower bound for rows | rows / bound fwd / bwd | saved B/token | saved, recomputing the activation | "
        "HF saved B/token | HF syncs fwd / bwd | "
        "collectives per training step |"
    )
    print("|" + " --- |" * 14)
    for name in args.models:
        for ep in args.ep:
            result = run_local(_measure, ep, name, ep, args.tokens, args.seed)[0]
            print(_row(name, ep, result), flush=True)
            print(f"<!-- {name} ep{ep} sync kinds: fwd {result['ours']['syncs_fwd_kinds']} "
                  f"bwd {result['ours']['syncs_bwd_kinds']} -->", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
