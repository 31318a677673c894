"""Training data: a built-in corpus, text/JSONL files, and deterministic batches.

The built-in corpus is generated, not downloaded: short English sentences about
people counting things, with simple arithmetic that a tiny model can learn, so
the loss of the default job visibly falls. Files are tokenized with the model
directory's tokenizer when it has one, else as UTF-8 bytes (vocabulary 256,
which is what the built-in tiny models use).

Batches are a pure function of (step, micro-batch, data-parallel rank): the
same job on any number of ranks walks the same global batches, and resuming
at a step needs nothing but the step.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from autoep.errors import ConfigError

_NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy"]
_THINGS = ["apples", "books", "coins", "shells", "stones", "cards", "pens", "cups"]
_PLACES = ["the market", "the library", "the park", "the harbor", "the school", "the garden"]


def builtin_corpus(num_stories: int = 4000, seed: int = 0) -> str:
    """Deterministic synthetic stories (about 600 KB for the default size)."""
    rng = random.Random(seed)
    stories = []
    for _ in range(num_stories):
        a, b = rng.sample(_NAMES, 2)
        thing, place = rng.choice(_THINGS), rng.choice(_PLACES)
        n, m = rng.randint(2, 9), rng.randint(1, 9)
        if rng.random() < 0.5:
            story = f"{a} has {n} {thing}. {b} gives {a} {m} more {thing} at {place}. now {a} has {n + m} {thing}.\n"
        else:
            total = n + m
            story = f"{a} has {total} {thing}. {a} gives {m} {thing} to {b} at {place}. now {a} has {n} {thing}.\n"
        stories.append(story)
    return "".join(stories)


def read_text(path: str | Path) -> str:
    """A ``.txt`` file, or the ``text`` fields of a ``.jsonl`` file joined by newlines."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data file {str(path)!r} does not exist")
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ConfigError(f"{path}:{number}: each JSONL line needs a string field 'text'")
            texts.append(record["text"])
        return "\n".join(texts)
    return path.read_text(encoding="utf-8")


def tokenize(text: str, vocab_size: int, model_dir: str | None = None) -> torch.Tensor:
    """Token ids of ``text``: the model directory's tokenizer if present, else UTF-8 bytes."""
    if model_dir is not None and any(
        (Path(model_dir) / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")
    ):
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)
    if vocab_size < 256:
        raise ConfigError(f"byte-level data needs a vocabulary of at least 256 tokens; the model has {vocab_size}")
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


class TokenBatches:
    """Fixed-length windows of a token stream, shuffled per epoch, addressed by step."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, micro_batch: int, dp_size: int, seed: int = 0) -> None:
        if tokens.numel() < seq_len + 1:
            raise ConfigError(f"the data has {tokens.numel()} tokens, fewer than one sequence of {seq_len}")
        self.tokens = tokens
        self.seq_len = seq_len
        self.micro_batch = micro_batch
        self.dp_size = dp_size
        self.seed = seed
        self.num_windows = (tokens.numel() - 1) // seq_len
        self._epoch_orders: dict[int, torch.Tensor] = {}

    def _window_start(self, sample: int) -> int:
        epoch, index = divmod(sample, self.num_windows)
        order = self._epoch_orders.get(epoch)
        if order is None:
            order = torch.randperm(self.num_windows, generator=torch.Generator().manual_seed(self.seed + epoch))
            self._epoch_orders = {epoch: order}  # keep one epoch's order in memory
        return int(order[index]) * self.seq_len

    def batch(self, step: int, micro: int, dp_rank: int, accumulation: int) -> torch.Tensor:
        """``[micro_batch, seq_len]`` token ids for this rank's micro-batch ``micro`` of ``step``."""
        first = ((step * accumulation + micro) * self.dp_size + dp_rank) * self.micro_batch
        rows = [self._window_start(first + i) for i in range(self.micro_batch)]
        return torch.stack([self.tokens[start : start + self.seq_len] for start in rows])
