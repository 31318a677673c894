"""Shared helpers for the autoep tests (tiny models only, CPU, no downloads)."""

from __future__ import annotations

import copy
import os

import pytest
import torch

# Tests run ranks as processes on 2 cores; keep each one single-threaded and quiet.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from autoep.models.tiny import build_tiny_model

ALL_FAMILIES = [
    "tiny-mixtral",
    "tiny-qwen2-moe",
    "tiny-qwen3-moe",
    "tiny-deepseek-v2",
    "tiny-deepseek-v3",
    "tiny-olmoe",
    "tiny-gpt-oss",
    "tiny-glm4-moe",
]


def model_pair(name: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """(original, untouched copy to convert) of a built-in tiny model."""
    reference = build_tiny_model(name, seed=seed, dtype=dtype)
    return reference, copy.deepcopy(reference)


def batch(vocab: int, shape: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _single_thread():
    torch.set_num_threads(1)
    yield
