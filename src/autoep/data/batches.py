"""Deterministic batches: a pure function of (step, micro-batch, data-parallel rank).

The same job on any number of ranks walks the same global batches, and
resuming at a step needs nothing but the step. Rows are shuffled per epoch by a
keyed Feistel permutation of the row numbers, computed per row in O(1) memory:
a shuffled index of 10^9 rows costs nothing, where ``randperm`` would hold 8 GB
on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from autoep.data.packing import make_row

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


@dataclass
class Batch:
    """``[B, S]`` tensors for one micro-batch; ``position_ids`` only when some row packs several documents."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        move = (lambda t: t.to(device)) if str(device) != "cpu" else (lambda t: t)
        pos = move(self.position_ids) if self.position_ids is not None else None
        return Batch(move(self.input_ids), move(self.labels), pos)

    @property
    def label_tokens(self) -> int:
        """Tokens that get a loss (after the causal shift), the unit of the training objective."""
        return int((self.labels[:, 1:] != -100).sum())


def _mix(values: np.ndarray, key: int) -> np.ndarray:
    """splitmix64 of ``values ^ key`` (wrapping uint64 arithmetic)."""
    with np.errstate(over="ignore"):
        z = (values ^ np.uint64(key & 0xFFFFFFFFFFFFFFFF)) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (z ^ (z >> np.uint64(31))) & _MASK64


def permute(indices: np.ndarray, n: int, key: int) -> np.ndarray:
    """A bijection of ``[0, n)`` chosen by ``key``, applied to ``indices`` (Feistel network + cycle walking)."""
    if n <= 1:
        return np.zeros_like(indices)
    bits = max(2, int(n - 1).bit_length() + (int(n - 1).bit_length() & 1))
    half = np.uint64(bits // 2)
    low = np.uint64((1 << (bits // 2)) - 1)
    x = indices.astype(np.uint64)
    todo = np.ones(x.shape, dtype=bool)
    while todo.any():
        left, right = x[todo] >> half, x[todo] & low
        for round_ in range(4):
            left, right = right, left ^ (_mix(right, key * 8 + round_) & low)
        x[todo] = (left << half) | right
        todo = x >= np.uint64(n)  # outside [0, n): walk on (the cycle returns to [0, n))
    return x.astype(np.int64)


class DataBatches:
    """Rows of a store, shuffled per epoch, addressed by (step, micro-batch, dp rank)."""

    def __init__(self, store, rows, seq_len: int, micro_batch: int, dp_size: int, pad_id: int, seed: int = 0) -> None:
        self.store, self.rows = store, rows
        self.seq_len, self.micro_batch, self.dp_size = seq_len, micro_batch, dp_size
        self.pad_id, self.seed = pad_id, seed
        self.num_rows = rows.num_rows

    def row_of(self, sample: int) -> int:
        epoch, index = divmod(sample, self.num_rows)
        return int(permute(np.asarray([index]), self.num_rows, self.seed * 1_000_003 + epoch)[0])

    def rows_batch(self, rows: list[int | None]) -> Batch:
        """A batch of the given rows; ``None`` is an all-padding row that carries no label."""
        ids, labels, positions, packed = [], [], [], False
        for row in rows:
            if row is None:
                ids.append(np.full(self.seq_len, self.pad_id, dtype=np.int64))
                labels.append(np.full(self.seq_len, -100, dtype=np.int64))
                positions.append(np.arange(self.seq_len))
                continue
            i, lab, pos, several = make_row(self.store, self.rows, row, self.seq_len, self.pad_id)
            ids.append(i)
            labels.append(lab)
            positions.append(pos)
            packed |= several
        pos = torch.from_numpy(np.stack(positions)) if packed else None
        return Batch(torch.from_numpy(np.stack(ids)), torch.from_numpy(np.stack(labels)), pos)

    def batch(self, step: int, micro: int, dp_rank: int, accumulation: int) -> Batch:
        """This rank's micro-batch ``micro`` of ``step``."""
        first = ((step * accumulation + micro) * self.dp_size + dp_rank) * self.micro_batch
        return self.rows_batch([self.row_of(first + i) for i in range(self.micro_batch)])
