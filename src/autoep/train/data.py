"""Compatibility names: training data now lives in :mod:`autoep.data`."""

from __future__ import annotations

import torch

from autoep.data.builtin import builtin_corpus
from autoep.data.formats import ByteTokenizer, has_tokenizer
from autoep.errors import ConfigError

__all__ = ["builtin_corpus", "tokenize"]


def tokenize(text: str, vocab_size: int, model_dir: str | None = None) -> torch.Tensor:
    """Token ids of ``text``: the model directory's tokenizer if present, else UTF-8 bytes."""
    if has_tokenizer(model_dir):
        from transformers import AutoTokenizer

        return torch.tensor(AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"], dtype=torch.long)
    if vocab_size < 256:
        raise ConfigError(f"byte-level data needs a vocabulary of at least 256 tokens; the model has {vocab_size}")
    return torch.from_numpy(ByteTokenizer().encode_batch([text])[0])
