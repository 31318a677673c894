"""Models built on the meta device: allocate only this rank's shards and initialise them.

This is autoep's counterpart of DeepSpeed's ``zero.Init``: a model too big for
one rank is built on the meta device, sharded by `parallelize`, and each rank
then allocates and fills only its own shards. The initial weights are a pure
function of (seed, tensor name, row index along dim 0), so the global weights
are the same whatever the world size, ep size or ZeRO stage: generating a
row-slice reads no other rank's rows.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset


def has_meta_parameters(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate this rank's shards; real buffers keep their values, meta buffers are recomputed.

    Non-persistent buffers that were on the meta device (rotary frequencies)
    are recomputed by the model's own ``_init_weights`` where it has one.
    """
    real = {name: b.detach().clone() for name, b in model.named_buffers() if not b.is_meta}
    meta_owners = [module for module in model.modules() if any(b.is_meta for b in module.buffers(recurse=False))]
    model.to_empty(device=device)
    with torch.no_grad():
        for name, value in real.items():
            model.get_buffer(name).copy_(value)
        init_module = getattr(model, "_init_weights", None)
        for module in meta_owners:
            if init_module is not None and "RotaryEmbedding" in type(module).__name__:
                init_module(module)


def local_index(tensor: torch.Tensor) -> tuple[slice, ...]:
    """The slice of the global tensor this rank holds (everything for a plain tensor)."""
    if not isinstance(tensor, DTensor):
        return tuple(slice(0, n) for n in tensor.shape)
    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))


def _local_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(local tensor, first global row, number of local rows) of a dim-0 sharded or plain tensor."""
    if tensor.ndim == 0:
        return tensor, 0, 1
    index = local_index(tensor)
    if any(s.start != 0 or s.stop != n for s, n in zip(index[1:], tensor.shape[1:], strict=True)):
        raise NotImplementedError("deterministic init supports dim-0 sharding only")
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local, index[0].start, index[0].stop - index[0].start


def _kind(name: str, tensor: torch.Tensor) -> str:
    if name.endswith("bias") or name.endswith("e_score_correction_bias"):
        return "zeros"
    if tensor.ndim == 1 and "norm" in name:
        return "ones"
    return "normal"


@torch.no_grad()
def init_deterministic_(model: nn.Module, seed: int = 0, std: float | None = None) -> None:
    """Fill every parameter and persistent buffer of ``model`` (this rank's rows) reproducibly.

    Weights ~ N(0, std) with ``std = config.initializer_range`` (0.02 if
    unset); norm weights 1; biases and the router correction bias 0.
    """
    if std is None:
        config = getattr(model, "config", None)
        text = config.get_text_config() if config is not None else None
        std = float(getattr(text, "initializer_range", 0.02) or 0.02)
    buffers = dict(model.named_buffers())
    state = model.state_dict()
    for name, tensor in state.items():
        if name in buffers and not name.endswith("e_score_correction_bias"):
            continue  # real buffers were kept by materialize()
        local, first, count = _local_rows(tensor)
        kind = _kind(name, tensor)
        if kind != "normal":
            local.fill_(0.0 if kind == "zeros" else 1.0)
            continue
        key = zlib.crc32(name.encode())
        if local.ndim == 0:
            continue
        row_shape = tuple(local.shape[1:])
        gen = torch.Generator()
        for row in range(count):
            gen.manual_seed((seed * 1_000_003 + key) * 4_000_037 + first + row)
            local[row].copy_(torch.randn(row_shape, generator=gen) * std)
