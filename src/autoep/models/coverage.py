"""Which MoE model types of the installed transformers autoep converts, and proof that it is exact.

For every MoE model type transformers ships (discovered by :mod:`autoep.models.zoo`,
not listed by hand) a tiny random model is built and converted; each row says
which path converted it (a dedicated family adapter, or the generic experts
path) or why it was refused, and the parity columns hold the largest
difference from the unconverted model: logits, and every gradient (expert
gradients summed over the EP group, as the all-to-all backward sums them).

    python -m autoep.models.coverage                 # print the table (ep 1 in-process, ep 2 on 2 gloo ranks)
    python -m autoep.models.coverage --write README.md docs/families.md   # refresh the generated tables

The README's compact table and docs/families.md's full table are generated
here (between ``<!-- families-summary:start/end -->`` and
``<!-- families:start/end -->`` markers) and checked by ``tests/test_families.py``.
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
GRAD_TOL = {1: 1e-6}
"""Gradient bound per ep size (absolute, relative beyond 1). At ep > 1 expert rows are computed on
another rank in other GEMM groupings, so fp32 round-off reaches ~2e-6 on some models' largest
gradients; the bound there is 1e-5, as in the block path's multi-rank tests."""
GRAD_TOL_EP = 1e-5
TABLE, SUMMARY = "families", "families-summary"


@dataclass
class FamilyResult:
    """One model type: how it converts and how close the converted model is, per ep size."""

    model_type: str
    path: str = "refused"  # "block" | "experts" | "refused" | "not built"
    detail: str = ""  # adapter / experts class, or the reason it is refused
    layers: int = 0
    logits: dict[int, float] = field(default_factory=dict)  # ep -> max |Δ logits|
    grads: dict[int, float] = field(default_factory=dict)  # ep -> max |Δ grad| / max(1, |grad|)

    def exact(self, ep: int) -> bool:
        return self.logits.get(ep, 1.0) <= LOGITS_TOL and self.grads.get(ep, 1.0) <= GRAD_TOL.get(ep, GRAD_TOL_EP)


def _max_abs(t: torch.Tensor) -> float:
    return t.abs().max().item() if t.numel() else 0.0


def _batch(vocab: int, rank: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(1000 + rank))


def _output(out) -> torch.Tensor:
    """The model's main output: LM logits, or the last hidden state of a model without a head."""
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


def _loss(out) -> torch.Tensor:
    """The LM loss, or (models that compute none, e.g. diffusion or encoder-only) a loss on the output."""
    loss = getattr(out, "loss", None)
    return loss if loss is not None else _output(out).float().square().mean()


def parity(reference: nn.Module, converted: nn.Module, input_ids: torch.Tensor) -> tuple[float, float]:
    """``(max |Δ logits|, max |Δ grad| / max(1, max |grad|))`` over every parameter, after one LM-loss
    backward on each model."""
    from autoep.moe.experts import local_tensor
    from autoep.moe.sites import moe_sites, owned_rows

    seed = int(input_ids.sum())  # some models draw random numbers in forward (diffusion masking): same draws
    torch.manual_seed(seed)
    ref_out = reference(input_ids=input_ids, labels=input_ids)
    torch.manual_seed(seed)
    out = converted(input_ids=input_ids, labels=input_ids)
    _loss(ref_out).backward()
    _loss(out).backward()
    logits = _max_abs(_output(ref_out).float() - _output(out).float())
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
        if site is not None:
            if site.ep_size > 1:
                dist.all_reduce(ref, group=site.dispatcher.group)
            ref = owned_rows(site, param, ref)
        mine = local_tensor(grad) if grad is not None else torch.zeros_like(ref)
        if mine.shape != ref.shape:  # a conversion that changed a parameter's shape is simply wrong
            worst = float("inf")
            continue
        # fp32 summation order differs (the combine adds a token's experts in another order), so a
        # gradient of size g carries round-off ~1e-7·g: beyond 1, the bound is relative.
        worst = max(worst, _max_abs(mine.float() - ref.float()) / max(1.0, _max_abs(ref.float())))
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
    reference.zero_grad(set_to_none=True)
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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as on every rank: the same reduction order in every run of the table
    try:
        results = {t: check_type(t, 1) if 1 in ep_sizes else FamilyResult(t) for t in model_types}
    finally:
        torch.set_num_threads(threads)
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
    return "exact" if result.exact(ep) else "**differs**"


_ORDER = {"block": 0, "block+experts": 1, "experts": 2, "refused": 3, "not built": 4}


def _header(results: list[FamilyResult], ep_sizes: tuple[int, ...]) -> str:
    import transformers

    parts = [
        f"{sum(r.exact(ep) for r in results)} exact at ep {ep} (logits within {LOGITS_TOL:g}, "
        f"gradients within {GRAD_TOL.get(ep, GRAD_TOL_EP):g})"
        for ep in ep_sizes
    ]
    return (
        f"MoE model types in transformers {transformers.__version__}: {len(results)}; {'; '.join(parts)}. "
        "Gradient differences are relative for gradients larger than 1; expert gradients of the unconverted "
        "model are summed over the EP group."
    )


def render_summary(results: list[FamilyResult], ep_sizes: tuple[int, ...] = (1, 2)) -> str:
    """One line per conversion path: the model types on it (the README's compact table)."""
    ep = max(ep_sizes)
    lines = [_header(results, ep_sizes), "", "| path | model types |", "| --- | --- |"]
    for path in sorted({r.path for r in results}, key=lambda p: _ORDER.get(p, 9)):
        names = sorted(
            r.model_type + ("" if r.exact(ep) or path in ("refused", "not built") else " (differs)")
            for r in results
            if r.path == path
        )
        lines.append(f"| {path} | {', '.join(names)} |")
    return "\n".join(lines)


def render_markdown(results: list[FamilyResult], ep_sizes: tuple[int, ...] = (1, 2)) -> str:
    """The coverage table, sorted by path then model type, with a summary line."""
    rows = sorted(results, key=lambda r: (_ORDER.get(r.path, 9), r.model_type))
    lines = [
        _header(results, ep_sizes),
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


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def replace_generated(text: str, name: str, content: str) -> str:
    """``text`` with the block between the ``name`` markers replaced by ``content``."""
    start, end = _markers(name)
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise ValueError(f"no {start} ... {end} block to replace")
    return pattern.sub(lambda _: f"{start}\n{content}\n{end}", text)


def generated_block(text: str, name: str) -> str | None:
    start, end = _markers(name)
    match = re.search(re.escape(start) + r"\n?(.*?)\n?" + re.escape(end), text, re.S)
    return match.group(1) if match else None


def refresh_docs(results: list[FamilyResult], files: list[Path]) -> None:
    """Rewrite every generated block (full table, compact summary) found in ``files``."""
    blocks = {TABLE: render_markdown(results), SUMMARY: render_summary(results)}
    for path in files:
        text = path.read_text()
        for name, content in blocks.items():
            if generated_block(text, name) is not None:
                text = replace_generated(text, name, content)
        path.write_text(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", nargs="*", help="only these model types (default: every discovered one)")
    parser.add_argument("--write", nargs="*", default=[], help="files whose families block to refresh")
    args = parser.parse_args(argv)
    results = run_coverage(args.types or None)
    print(render_markdown(results))
    for r in results:
        for ep in sorted(r.logits):
            print(f"{r.model_type}: ep {ep} logits {r.logits[ep]:.1e} grads {r.grads[ep]:.1e}")
    refresh_docs(results, [Path(name) for name in args.write])


if __name__ == "__main__":
    main()
