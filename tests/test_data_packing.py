"""A packed row computes what its documents compute alone: attention never crosses a document boundary."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from autoep.data import DataOptions, prepare_data
from autoep.models.tiny import build_tiny_model


@pytest.fixture(scope="module")
def packed_rows(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("packing")
    lengths = [9, 23, 5, 14, 31, 7, 12, 3, 18]
    lines = [json.dumps({"text": "".join(chr(97 + (i * 7 + j) % 26) for j in range(n))}) for i, n in enumerate(lengths)]
    (tmp / "docs.jsonl").write_text("\n".join(lines) + "\n")
    data = prepare_data(
        DataOptions(data=str(tmp / "docs.jsonl"), cache_dir=str(tmp / "cache")),
        model="tiny-mixtral",
        builtin_model=True,
        vocab_size=256,
        seq_len=40,
        micro_batch=2,
        dp_size=1,
    )
    return data.train.rows_batch([0, 1])  # UTF-8 bytes, no EOS: rows of whole and split documents


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["tiny-mixtral", "tiny-deepseek-v3", "tiny-qwen3-moe"])
def test_packed_logits_equal_each_document_alone(packed_rows, family: str, attention: str) -> None:
    model = build_tiny_model(family, seed=3).eval()
    model.config._attn_implementation = attention
    batch = packed_rows
    assert batch.position_ids is not None
    with torch.no_grad():
        packed = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
        for row in range(batch.input_ids.shape[0]):
            positions = batch.position_ids[row]
            starts = [*(positions == 0).nonzero().flatten().tolist(), positions.numel()]
            assert len(starts) > 2  # several documents in the row
            for begin, end in itertools.pairwise(starts):
                alone = model(input_ids=batch.input_ids[row : row + 1, begin:end], use_cache=False).logits
                error = (packed[row, begin:end] - alone[0]).abs().max().item()
                assert error < 1e-5, (row, begin, end, error)


def test_without_position_ids_documents_would_see_each_other(packed_rows) -> None:
    """The control: the same row as one sequence changes the later documents' logits."""
    model = build_tiny_model("tiny-mixtral", seed=3).eval()
    with torch.no_grad():
        packed = model(input_ids=packed_rows.input_ids, position_ids=packed_rows.position_ids, use_cache=False).logits
        plain = model(input_ids=packed_rows.input_ids, use_cache=False).logits
    assert (packed - plain).abs().max().item() > 1e-2


def test_a_cache_would_switch_packing_off(packed_rows) -> None:
    """Why train_step passes use_cache=False: with a cache, transformers ignores packed position_ids."""
    model = build_tiny_model("tiny-mixtral", seed=3).eval()
    with torch.no_grad():
        kwargs = {"input_ids": packed_rows.input_ids, "position_ids": packed_rows.position_ids}
        cached = model(**kwargs, use_cache=True).logits
        uncached = model(**kwargs, use_cache=False).logits
    assert (cached - uncached).abs().max().item() > 1e-2


def test_rows_lose_no_token(tmp_path: Path) -> None:
    """Packed text rows are consecutive windows: together they hold the stream (bar the last partial row)."""
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": "x" * n}) + "\n" for n in (5, 50, 17, 3)))
    data = prepare_data(
        DataOptions(data=str(tmp_path / "d.jsonl"), cache_dir=str(tmp_path / "c")),
        model="tiny-mixtral",
        builtin_model=True,
        vocab_size=256,
        seq_len=16,
        micro_batch=1,
        dp_size=1,
    )
    assert data.train.num_rows == (5 + 50 + 17 + 3) // 16
