"""Data sources, formats and the token cache, in one process (no model, no distributed)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from autoep.data import DataOptions, prepare_data
from autoep.data.batches import permute
from autoep.data.formats import HFTokenizer
from autoep.errors import ConfigError
from tests.data_helpers import chats, make_tokenizer, prompt_completions, texts, write_jsonl


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "tok")


def prepare(tmp: Path, data: str, tok: Path | None = None, seq_len: int = 48, **options):
    lines: list[str] = []
    prepared = prepare_data(
        DataOptions(data=data, tokenizer=str(tok) if tok else None, cache_dir=str(tmp / "cache"), **options),
        model="tiny-mixtral",
        builtin_model=True,
        vocab_size=256,
        seq_len=seq_len,
        micro_batch=2,
        dp_size=1,
        log=lines.append,
    )
    return prepared, lines


def all_rows(batches) -> list[np.ndarray]:
    return [batches.rows_batch([r]).input_ids[0].numpy() for r in range(batches.num_rows)]


def test_every_input_kind_loads(tmp_path: Path, tok: Path) -> None:
    """jsonl, txt, json, parquet, csv, a glob, a save_to_disk directory and a load_dataset path give the same text."""
    import datasets

    records = texts(40)
    write_jsonl(tmp_path / "a.jsonl", records)
    (tmp_path / "parts").mkdir()
    write_jsonl(tmp_path / "parts" / "p0.jsonl", records[:25])
    write_jsonl(tmp_path / "parts" / "p1.jsonl", records[25:])
    table = datasets.Dataset.from_list(records)
    table.to_json(tmp_path / "a.json")
    table.to_parquet(tmp_path / "a.parquet")
    table.to_csv(tmp_path / "a.csv", index=False)
    datasets.DatasetDict({"train": table}).save_to_disk(tmp_path / "saved")
    (tmp_path / "hub").mkdir()
    write_jsonl(tmp_path / "hub" / "train.jsonl", records)
    reference, lines = prepare(tmp_path, str(tmp_path / "a.jsonl"), tok)
    assert any("format text" in line for line in lines)
    want = all_rows(reference.train)
    sources = ["parts/*.jsonl", "a.json", "a.parquet", "a.csv", "saved", "hub"]
    for source in sources:
        got, _ = prepare(tmp_path, str(tmp_path / source), tok)
        assert got.train.num_rows == reference.train.num_rows, source
        assert all((a == b).all() for a, b in zip(all_rows(got.train), want, strict=True)), source
    (tmp_path / "one.txt").write_text("alice has 3 books.\nbob gives more.\n")
    txt, _ = prepare(tmp_path, str(tmp_path / "one.txt"), tok)
    ids = txt.train.rows_batch([0]).input_ids[0]
    tokenizer = HFTokenizer(str(tok))
    expected = [*tokenizer.tok("alice has 3 books.\nbob gives more.\n", add_special_tokens=False)["input_ids"]]
    assert ids[: len(expected) + 1].tolist() == [*expected, tokenizer.eos_id]  # one document per .txt file


def test_chat_masking_is_exact_token_by_token(tmp_path: Path, tok: Path) -> None:
    conversation = chats(3)[2]
    prepared, lines = prepare(tmp_path, str(write_jsonl(tmp_path / "c.jsonl", [conversation])), tok, seq_len=64)
    assert any("format chat (detected from field 'messages')" in line for line in lines)
    batch = prepared.train.rows_batch([0])
    ids, labels = batch.input_ids[0].tolist(), batch.labels[0].tolist()
    tokenizer = HFTokenizer(str(tok)).tok

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    # The template, piece by piece: role markers and user turns are context, assistant turns + <|end|> are trained.
    pieces, trained = [], []
    for message in conversation["messages"]:
        head = encode(f"<|{message['role']}|>")
        body = encode(message["content"] + "<|end|>")
        pieces += head + body
        trained += [False] * len(head) + [message["role"] == "assistant"] * len(body)
    assert ids[: len(pieces)] == pieces
    assert all(i == 0 for i in ids[len(pieces) :])  # padding
    for position, (token, label) in enumerate(zip(ids, labels, strict=True)):
        expected = token if position < len(pieces) and trained[position] else -100
        assert label == expected, (position, token, label)


def test_prompt_completion_masks_the_prompt(tmp_path: Path, tok: Path) -> None:
    record = prompt_completions(3)[1]
    prepared, _ = prepare(tmp_path, str(write_jsonl(tmp_path / "pc.jsonl", [record])), tok, packing=False)
    batch = prepared.train.rows_batch([0])
    tokenizer = HFTokenizer(str(tok))
    prompt = tokenizer.tok(record["prompt"], add_special_tokens=False)["input_ids"]
    completion = tokenizer.tok(record["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_id]
    n = len(prompt) + len(completion)
    assert batch.input_ids[0, :n].tolist() == prompt + completion
    assert batch.labels[0, :n].tolist() == [-100] * len(prompt) + completion
    assert (batch.labels[0, n:] == -100).all()


def test_packing_restarts_positions_and_never_predicts_across_documents(tmp_path: Path, tok: Path) -> None:
    data = str(write_jsonl(tmp_path / "pc.jsonl", prompt_completions(30)))
    packed, _ = prepare(tmp_path, data, tok)
    padded, _ = prepare(tmp_path, data, tok, packing=False)
    assert packed.train.num_rows < padded.train.num_rows == 30
    batch = packed.train.rows_batch([0])
    positions, labels = batch.position_ids[0], batch.labels[0]
    starts = (positions == 0).nonzero().flatten().tolist()
    assert len(starts) > 1 and starts[0] == 0
    assert all(labels[s] == -100 for s in starts)  # a document's first token is not predicted from the previous one
    assert padded.train.rows_batch([0]).position_ids is None  # one document per row: plain causal attention


def test_the_cache_is_built_once_and_reused(tmp_path: Path, tok: Path, monkeypatch) -> None:
    data = str(write_jsonl(tmp_path / "c.jsonl", chats(20)))
    first, lines = prepare(tmp_path, data, tok)
    assert any(line.startswith("data: tokenizing") for line in lines)

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(HFTokenizer, "encode_with_offsets", refuse)
    monkeypatch.setattr(HFTokenizer, "encode_batch", refuse)
    again, lines = prepare(tmp_path, data, tok)
    assert any(line.startswith("data: reusing token cache") for line in lines)
    assert not any(line.startswith("data: tokenizing") for line in lines)
    assert all((a == b).all() for a, b in zip(all_rows(first.train), all_rows(again.train), strict=True))


def test_parallel_builders_write_the_same_stream(tmp_path: Path, tok: Path, monkeypatch) -> None:
    """Three local builders (threads here, ranks in training) produce the tokens one builder does."""
    monkeypatch.setattr("autoep.data.sources.CELL_BYTES", 4096)
    from autoep.data.formats import make_encoder
    from autoep.data.sources import DataSpec, open_source
    from autoep.data.token_store import build_or_open

    data = tmp_path / "big.txt"
    data.write_text("alice has 3 books. bob gives more.\n" * 700)  # 24 KiB: six cells of 4 KiB
    source = open_source(DataSpec(str(data)))
    encoder = make_encoder("text", HFTokenizer(str(tok)), None, str(data))
    meta = {"format": "text", "dtype": "uint8", "masked": False}
    one = build_or_open(source, encoder, tmp_path / "one", dict(meta))
    stores = [None] * 3

    def build(i: int) -> None:
        stores[i] = build_or_open(source, encoder, tmp_path / "three", dict(meta), local_index=i, local_count=3)

    threads = [threading.Thread(target=build, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    three = stores[0]
    assert three.num_tokens == one.num_tokens and three.num_docs == one.num_docs == 1
    assert (three.tokens(0, three.num_tokens) == one.tokens(0, one.num_tokens)).all()
    assert len(three.meta["part_tokens"]) == 3


def test_batches_are_a_function_of_step_and_rank_at_any_layout(tmp_path: Path) -> None:
    indices = np.arange(1000)
    for n in (1, 2, 7, 1000, 12345):
        assert sorted(permute(np.arange(n), n, key=3).tolist()) == list(range(n))
    assert permute(indices, 1000, 1).tolist() != permute(indices, 1000, 2).tolist()
    data, _ = prepare(tmp_path, None)  # the built-in corpus
    two = [data.train.row_of(((5 * 2 + m) * 2 + r) * 2 + i) for m in range(2) for r in range(2) for i in range(2)]
    four = [data.train.row_of(((5 * 1 + 0) * 8 + r) + 0) for r in range(8)]
    assert two == four  # step 5's global batch: dp 2 x 2 micro-batches x 2 rows == dp 8 x 1 x 1


BAD = [
    ("missing.jsonl", [{"content": "x"}], "no string field 'text' (fields: content)", True),
    ("empty.jsonl", [], "the data is empty", False),
    ("nochat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}], "has no assistant turn", True),
]


@pytest.mark.parametrize(("name", "records", "expected", "has_line"), BAD, ids=[b[0] for b in BAD])
def test_bad_records_name_the_file_and_line(tmp_path: Path, tok: Path, name, records, expected, has_line) -> None:
    good = texts(3) if "messages" not in json.dumps(records) else chats(3)
    path = write_jsonl(tmp_path / name, good + records if records else [])
    with pytest.raises(ConfigError) as err:
        prepare(tmp_path, str(path), tok)
    message = str(err.value)
    assert expected in message and "\n" not in message, message
    assert str(path) in message
    if has_line:
        assert f"{path}:4:" in message


def test_malformed_json_non_utf8_long_samples_and_missing_templates(tmp_path: Path, tok: Path) -> None:
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(ConfigError, match=rf"^{broken}:2: not valid JSON"):
        prepare(tmp_path, str(broken), tok)
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"fine\nna\xefve\n")
    with pytest.raises(ConfigError, match=rf"^{latin}:2: not valid UTF-8"):
        prepare(tmp_path, str(latin), tok)
    long = write_jsonl(tmp_path / "long.jsonl", [*prompt_completions(2), {"prompt": "one " * 60, "completion": "two"}])
    with pytest.raises(ConfigError, match=rf"^{long}:3: a sample of \d+ tokens is longer than --seq-len 48"):
        prepare(tmp_path, str(long), tok)
    plain = make_tokenizer(tmp_path / "plain", chat_template=None)
    chat = write_jsonl(tmp_path / "chat.jsonl", chats(2))
    with pytest.raises(ConfigError, match="needs a tokenizer with a chat template"):
        prepare(tmp_path, str(chat), plain)
    with pytest.raises(ConfigError, match="needs a tokenizer with a chat template"):
        prepare(tmp_path, str(chat), None)  # UTF-8 bytes have no template either
    with pytest.raises(ConfigError, match="matches no file"):
        prepare(tmp_path, str(tmp_path / "nothing-*.jsonl"), tok)
