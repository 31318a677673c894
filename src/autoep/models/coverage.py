"""Which MoE model types of the installed transformers autoep converts, and proof that it is exact.

For every MoE model type transformers ships (discovered by :mod:`autoep.models.zoo`,
not listed by hand) a tiny random model is built and converted; each row says
which path converted it (a dedicated family adapter, or the generic experts
path) or why it was refused, and the parity columns hold the largest
difference from the unconverted model: logits, and every gradient (expert
gradients summed over the EP group, as the all-to-all backward sums them).

    python -m autoep.models.coverage                 # print the table (ep 1 in-process, ep 2 on 2 gloo ranks)
    python -m autoep.models.coverage --write README.md docs/families.md   # refresh the generated tables

The README's family table is generated here and checked by
``tests/test_families.py``.
"""

from __future__ import annotations

import argparse
import copy
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

LOGITS_TOL = 1e-5
GRAD_TOL = 1e-6
START, END = "<!-- families:start -->", "<!-- families:end -->"


@dataclass
class FamilyResult:
    """One model type: how it converts and how close the converted model is, per ep size."""

    model_type: str
    path: str = "refused"  # "block" | "experts" | "refused" | "not built"
    detail: str = ""  # adapter / experts class, or the reason it is refused
    layers: int = 0
    logits: dict[int, float] = field(default_factory=dict)  # ep -> max |Δ logits|
    grads: dict[int, float] = field(default_factory=dict)  # ep -> max |Δ grad|

    def exact(self, ep: int) -> bool:
        return self.logits.get(ep, 1.0) <= LOGITS_TOL and self.grads.get(ep, 1.0) <= GRAD_TOL


def _max_abs(t: torch.Tensor) -> float:
    return t.abs().max().item() if t.numel() else 0.0


def _batch(vocab: int, rank: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(1000 + rank))


def parity(reference: nn.Module, converted: nn.Module, input_ids: torch.Tensor) -> tuple[float, float]:
    """``(max |Δ logits|, max |Δ grad|)`` over every parameter, after one LM-loss backward on each model."""
    from autoep.moe.experts import local_tensor
    from autoep.moe.sites import moe_sites

    ref_out = reference(input_ids=input_ids, labels=input_ids)
    out = converted(input_ids=input_ids, labels=input_ids)
    ref_out.loss.backward()
    out.loss.backward()
    logits = _max_abs(ref_out.logits.float() - out.logits.float())
    ref_params = dict(reference.named_parameters())
    experts = {id(p): site for _, site in moe_sites(converted) for p in site.experts_module.parameters()}
    worst = 0.0
    for name, param in converted.named_parameters():
        ref = ref_params[name].grad
        grad = param.grad
        if ref is None and grad is None:
            continue
        ref = torch.zeros_like(ref_params[name]) if ref is None else ref.clone()
        site = experts.get(id(param))
        if site is not None and site.ep_size > 1:
            dist.all_reduce(ref, group=site.dispatcher.group)
            ref = ref[site.expert_start : site.expert_end]
        mine = local_tensor(grad) if grad is not None else torch.zeros_like(ref)
        worst = max(worst, _max_abs(mine.float() - ref.float()))
    return logits, worst


def check_type(model_type: str, ep: int, seed: int = 0) -> FamilyResult:
    """Build, convert at ``ep`` (every rank of the default group calls it when ep > 1) and compare."""
    from autoep.convert import convert, find_convertible_blocks
    from autoep.errors import AutoEPError
    from autoep.models import zoo

    result = FamilyResult(model_type)
    try:
        reference = zoo.build_tiny(model_type, seed=seed)
    except zoo.ZooBuildError as err:
        result.path, result.detail = "not built", err.reason
        return result
    blocks, refused = find_convertible_blocks(reference)
    if refused or not blocks:
        result.detail = refused[0][1] if refused else "no MoE block found"
        return result
    kinds = {"experts" if hasattr(spec, "experts_name") else "block" for _, _, spec in blocks}
    result.path = "experts" if kinds == {"experts"} else "block" if kinds == {"block"} else "block+experts"
    result.layers = len(blocks)
    first = blocks[0][2]
    experts_module = blocks[0][1].get_submodule(getattr(first, "experts_name", "experts"))
    result.detail = f"{first.family}: {type(blocks[0][1]).__name__} / {type(experts_module).__name__}"
    converted = copy.deepcopy(reference)
    try:
        convert(converted, ep)
    except AutoEPError as err:
        result.path, result.detail = "refused", str(err)
        return result
    rank = dist.get_rank() if dist.is_initialized() else 0
    vocab = reference.config.get_text_config().vocab_size
    logits, grads = parity(reference, converted, _batch(vocab, rank))
    result.logits[ep], result.grads[ep] = logits, grads
    return result


def _check_all(model_types: list[str], ep: int) -> list[dict]:
    torch.set_num_threads(1)
    return [asdict(check_type(t, ep)) for t in model_types]


def run_coverage(model_types: list[str] | None = None, ep_sizes: tuple[int, ...] = (1, 2)) -> list[FamilyResult]:
    """Every type at ep 1 in this process, and at each larger ep on that many local gloo ranks (one spawn)."""
    from autoep.launch import run_local
    from autoep.models import zoo

    model_types = model_types if model_types is not None else zoo.moe_model_types()
    results = {t: check_type(t, 1) if 1 in ep_sizes else FamilyResult(t) for t in model_types}
    for ep in (e for e in ep_sizes if e > 1):
        convertible = [t for t, r in results.items() if r.path not in ("refused", "not built")]
        per_rank = run_local(_check_all, ep, convertible, ep)
        for rank_rows in per_rank.values():
            for row in rank_rows:
                mine = results[row["model_type"]]
                for key in ("logits", "grads"):
                    got = {int(k): v for k, v in row[key].items()}
                    getattr(mine, key)[ep] = max(getattr(mine, key).get(ep, 0.0), got.get(ep, 1.0))
                if row["path"] == "refused":
                    mine.path, mine.detail = "refused", row["detail"]
    return list(results.values())


def _cell(result: FamilyResult, ep: int) -> str:
    if ep not in result.logits:
        return "-"
    mark = "exact" if result.exact(ep) else "**differs**"
    return f"{mark} ({max(result.logits[ep], result.grads[ep]):.0e})"


def render_markdown(results: list[FamilyResult], ep_sizes: tuple[int, ...] = (1, 2)) -> str:
    """The coverage table, sorted by path then model type, with a summary line."""
    import transformers

    order = {"block": 0, "block+experts": 1, "experts": 2, "refused": 3, "not built": 4}
    rows = sorted(results, key=lambda r: (order.get(r.path, 9), r.model_type))
    exact = {ep: sum(r.exact(ep) for r in results) for ep in ep_sizes}
    summary = ", ".join(f"{n} exact at ep {ep}" for ep, n in exact.items())
    lines = [
        f"MoE model types in transformers {transformers.__version__}: {len(results)}; {summary}. "
        f"Max difference from the unconverted model in brackets (logits ≤ {LOGITS_TOL:g}, gradients ≤ {GRAD_TOL:g}).",
        "",
        "| model type | path | MoE layers | "
        + " | ".join(f"ep {ep}" for ep in ep_sizes)
        + " | block / experts, or why not |",
        "| --- | --- | --- | " + " | ".join("---" for _ in ep_sizes) + " | --- |",
    ]
    for r in rows:
        detail = r.detail.replace("|", "\\|").replace("\n", " ")
        cells = " | ".join(_cell(r, ep) for ep in ep_sizes)
        lines.append(f"| {r.model_type} | {r.path} | {r.layers or '-'} | {cells} | {detail} |")
    return "\n".join(lines)


def replace_generated(text: str, table: str) -> str:
    """``text`` with the block between the families markers replaced by ``table``."""
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f"no {START} ... {END} block to replace")
    return pattern.sub(lambda _: f"{START}\n{table}\n{END}", text)


def generated_block(text: str) -> str | None:
    match = re.search(re.escape(START) + r"\n(.*?)\n" + re.escape(END), text, re.S)
    return match.group(1) if match else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", nargs="*", help="only these model types (default: every discovered one)")
    parser.add_argument("--write", nargs="*", default=[], help="files whose families block to refresh")
    args = parser.parse_args(argv)
    table = render_markdown(run_coverage(args.types or None))
    print(table)
    for name in args.write:
        path = Path(name)
        path.write_text(replace_generated(path.read_text(), table))


if __name__ == "__main__":
    main()
