"""Data on real gloo ranks: exact loss normalisation and evaluation at world 1, 2 and 4, bad data on every rank,
and `autoep train` reusing its token cache."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import autoep
from autoep.data import DataOptions, evaluate, prepare_data
from autoep.errors import ConfigError
from autoep.launch import run_local
from autoep.models.tiny import build_tiny_model
from autoep.train import train_step
from tests.data_helpers import chats, make_tokenizer, write_jsonl

MODEL = "tiny-qwen3-moe"
SEQ = 48
ACCUM = 2


def options(paths: dict, data: str) -> DataOptions:
    return DataOptions(data=paths[data], tokenizer=paths["tok"], cache_dir=paths["cache"], eval_split="25%")


def prepare(paths: dict, data: str, dp: int):
    return prepare_data(
        options(paths, data), model=MODEL, builtin_model=True, vocab_size=256, seq_len=SEQ, micro_batch=1, dp_size=dp
    )


def reference(paths: dict, dp: int) -> dict:
    """One process, the unconverted model: the global batch's mean token loss, its gradient norm, the eval loss."""
    data = prepare(paths, "chat", 1)
    model = build_tiny_model(MODEL, seed=1)
    rows = [data.train.row_of(i) for i in range(ACCUM * dp)]
    batch = data.train.rows_batch(rows)
    output = model(input_ids=batch.input_ids, labels=batch.labels, num_items_in_batch=batch.label_tokens)
    output.loss.backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
    naive = sum(
        model(input_ids=batch.input_ids[i : i + 1], labels=batch.labels[i : i + 1]).loss.item()
        for i in range(len(rows))
    ) / len(rows)
    return {"loss": output.loss.item(), "norm": norm.item(), "naive": naive, "eval": evaluate(model, data.eval)}


def worker(paths: dict) -> dict:
    out: dict = {}
    world = dist.get_world_size()
    for bad in ("bad", "nochat"):  # every rank raises the same one-line error; nobody hangs
        try:
            prepare(paths, bad, world)
            out[bad] = None
        except ConfigError as err:
            out[bad] = str(err)
    data = prepare(paths, "chat", world)
    model = build_tiny_model(MODEL, seed=1)
    config = autoep.AutoEPConfig(
        ep_size=2,
        zero_stage=3 if world == 4 else 1,
        micro_batch_size=1,
        gradient_accumulation_steps=ACCUM,
        optimizer={"type": "AdamW", "params": {"lr": 1e-3}},
    )
    autoep.parallelize(model, config)
    out["eval"] = evaluate(model, data.eval, dp_rank=model.autoep.dp_rank)
    optimizer = autoep.build_optimizer(model, config)
    micro = [data.train.batch(0, m, model.autoep.dp_rank, ACCUM) for m in range(ACCUM)]
    result = train_step(model, optimizer, micro)
    out.update(loss=result.loss, norm=result.grad_norm)
    return out


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("data")
    conversations = chats(40)
    for i, chat in enumerate(conversations):  # very different label counts per row
        chat["messages"][1]["content"] = "one " * (1 + (i * 5) % 13)
    bad = tmp / "bad.jsonl"
    bad.write_bytes(b'{"messages": []}\n{"messages": [\xff]}\n')
    return {
        "tok": str(make_tokenizer(tmp / "tok")),
        "cache": str(tmp / "cache"),
        "chat": str(write_jsonl(tmp / "chat.jsonl", conversations)),
        "bad": str(bad),
        "nochat": str(write_jsonl(tmp / "nochat.jsonl", [*chats(2), {"messages": [{"role": "user", "content": "x"}]}])),
    }


@pytest.mark.parametrize("world", [2, 4])
def test_loss_and_eval_equal_one_process(paths: dict, world: int) -> None:
    want = reference(paths, world)
    results = run_local(worker, world, paths)
    for rank, got in results.items():
        assert got["bad"] == results[0]["bad"] and got["bad"].startswith(f"{paths['bad']}:2: not valid UTF-8"), got
        assert got["nochat"] == f"{paths['nochat']}:3: the conversation has no assistant turn (nothing to train on)"
        assert abs(got["loss"] - want["loss"]) < 1e-5, (rank, got["loss"], want)
        assert abs(got["norm"] - want["norm"]) < 1e-5 * max(1.0, want["norm"]), (rank, got["norm"], want)
        assert got["eval"]["eval_tokens"] == want["eval"]["eval_tokens"]
        assert abs(got["eval"]["eval_loss"] - want["eval"]["eval_loss"]) < 1e-6, (rank, got["eval"], want["eval"])
    assert abs(want["loss"] - want["naive"]) > 1e-3  # a mean per row would be a different objective


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}


def autoep_train(paths: dict, out: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "autoep", "train", "--model", MODEL, "--data", paths["chat"]]
    command += ["--tokenizer", paths["tok"], "--data-cache", paths["cache"] + "-cli", "--seq-len", str(SEQ)]
    command += ["--nproc-per-node", "2", "--micro-batch", "2", "--output", str(out), *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=ENV, cwd=out.parent)


def test_autoep_train_evaluates_and_reuses_its_token_cache(paths: dict, tmp_path: Path) -> None:
    first = autoep_train(paths, tmp_path / "a", "--steps", "3", "--eval-split", "10%", "--eval-every", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "format chat (detected from field 'messages')" in first.stdout
    assert "data: tokenizing" in first.stdout and "eval loss" in first.stdout
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert "eval_loss" not in records[0] and {"eval_loss", "eval_ppl"} <= records[1].keys() <= records[2].keys()
    assert math.isclose(records[2]["eval_ppl"], math.exp(records[2]["eval_loss"]), rel_tol=1e-9)
    second = autoep_train(paths, tmp_path / "b", "--steps", "3", "--stop-at", "1", "--eval-split", "10%")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "data: reusing token cache" in second.stdout and "data: tokenizing" not in second.stdout
    again = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert again[0]["loss"] == records[0]["loss"]
    bad = autoep_train(paths, tmp_path / "c", "--data", paths["nochat"])
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"autoep: error: {paths['nochat']}:3: the conversation has no assistant turn (nothing to train on)"
    ], bad.stderr[-3000:]
