"""The plan as a table (rich when installed) or JSON."""

from __future__ import annotations

from autoep.plan.api import GiB, LayoutPlan, PlanResult

HEADERS = (
    "rank",
    "layout",
    "fits",
    "peak GiB (busiest)",
    "params",
    "grads",
    "optim",
    "activ",
    "dispatch bal/busy",
    "a2a GB/step",
    "dense GB/step",
    "KB/token",
)

NOTES = (
    "Memory per GPU at the step's peak, GiB; 'busiest': rank 0 holding the hottest expert at the imbalance factor.",
    "a2a: all-to-all bytes this GPU sends per step; dense: FSDP/TP/norm collectives. Ranked by bytes per token.",
    "Attention runs the kernel torch picks for fake CPU tensors: flash-style where q/k/v head dims match; "
    "MLA and eager-only families materialise the T x T scores, so their activations are an upper bound.",
)


def _gib(value: int) -> str:
    return f"{value / GiB:.1f}"


def _row(rank: str, p: LayoutPlan) -> tuple[str, ...]:
    if p.skipped is not None:
        return (rank, p.layout.label(), "no", p.skipped, *[""] * 8)
    worst = p.busiest or p.balanced
    dispatch = f"{_gib(p.balanced.dispatch)}/{_gib(worst.dispatch)}"
    return (
        rank,
        p.layout.label(),
        "yes" if p.fits else "no",
        _gib(p.peak),
        _gib(worst.params),
        _gib(worst.grads),
        _gib(worst.optimizer),
        _gib(worst.activations),
        dispatch,
        f"{p.all_to_all / 1e9:.2f}",
        f"{p.dense_comm / 1e9:.2f}",
        f"{p.comm_per_token / 1e3:.0f}",
    )


def rows(result: PlanResult) -> list[tuple[str, ...]]:
    """Fitting layouts first (ranked), then the others by peak memory."""
    ranked = result.ranked()
    others = sorted((p for p in result.layouts if not p.fits), key=lambda p: (p.skipped is not None, p.peak))
    return [_row(str(i + 1), p) for i, p in enumerate(ranked)] + [_row("-", p) for p in others]


def title(result: PlanResult) -> str:
    simulated = next((p.simulated for p in result.layouts if p.skipped is None), "nothing simulated")
    seq = result.layouts[0].seq_len if result.layouts else 0
    return (
        f"autoep plan {result.model}: {result.total_params / 1e9:.1f}B parameters on {result.gpus} GPUs of "
        f"{_gib(result.gpu_memory)} GiB, seq {seq}, imbalance {result.imbalance:g}x; {simulated}"
    )


def print_plan(result: PlanResult) -> None:
    from autoep.cli.render import print_table

    print_table(title(result), HEADERS, rows(result))
    for note in NOTES:
        print(f"  {note}")
    best = result.ranked()
    print(f"best: {best[0].layout.label()}" if best else "no layout fits: add GPUs, checkpointing or shorter sequences")
