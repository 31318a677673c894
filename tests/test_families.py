"""Every MoE model type of the installed transformers: converted exactly, or refused with a reason.

The types are discovered from transformers itself (`autoep.models.zoo`), not
listed here. Each gets a tiny random model, converted at ep 1 in this process
and at ep 2 on two real gloo ranks (one spawn for all types), and compared
with the unconverted model: logits within 1e-5, every gradient within 1e-6
(expert gradients of the reference summed over the EP group). The printed
table is the one the README and docs/families.md carry (regenerate with
``python -m autoep.models.coverage --write README.md docs/families.md``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers

from autoep.models import coverage
from autoep.models.coverage import FamilyResult

ROOT = Path(__file__).resolve().parents[1]
MUST_DISCOVER = ("mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss", "qwen3_next", "jamba", "llama4", "dbrx")


@pytest.fixture(scope="module")
def results() -> list[FamilyResult]:
    rows = coverage.run_coverage()
    print("\n" + coverage.render_markdown(rows))
    return rows


def test_types_are_discovered_not_listed(results) -> None:
    types = {r.model_type for r in results}
    assert len(types) >= 60, sorted(types)
    assert set(MUST_DISCOVER) <= types, set(MUST_DISCOVER) - types


def test_at_least_45_types_convert_exactly_at_ep2(results) -> None:
    exact = sorted(r.model_type for r in results if r.exact(1) and r.exact(2))
    assert len(exact) >= 45, exact
    generic = [r for r in results if r.path == "experts" and r.exact(2)]
    assert len(generic) >= 40, [r.model_type for r in generic]


def test_no_type_converts_inexactly(results) -> None:
    """A type either converts exactly at every ep size or is refused up front; nothing in between."""
    converted = [r for r in results if r.path not in ("refused", "not built")]
    wrong = {r.model_type: (r.logits, r.grads) for r in converted if not (r.exact(1) and r.exact(2))}
    assert not wrong, wrong


def test_every_other_type_has_a_reason(results) -> None:
    for r in results:
        if r.path in ("refused", "not built"):
            assert r.detail.strip(), r


def test_docs_tables_are_generated_from_this_run(results) -> None:
    """README and docs/families.md carry exactly what this run finds (for the transformers they were made with)."""
    for name, block, render in (
        ("README.md", coverage.SUMMARY, coverage.render_summary),
        ("docs/families.md", coverage.TABLE, coverage.render_markdown),
    ):
        text = (ROOT / name).read_text()
        recorded = coverage.generated_block(text, block)
        assert recorded is not None, f"{name} has no generated {block} block"
        assert "MoE model types in transformers" in recorded, f"{name}'s {block} block is empty"
        if f"transformers {transformers.__version__}:" not in recorded:
            pytest.skip(f"{name} was generated with another transformers than {transformers.__version__}")
        assert recorded == render(results), f"{name} is stale: run python -m autoep.models.coverage --write {name}"
