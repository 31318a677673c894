"""Muon for (expert-parallel, sharded) MoE models, with AdamW for everything else.

* 2-D weights, and stacked experts ``[E, A, B]`` (one matrix per expert), get
  Muon: Nesterov momentum, then Newton–Schulz orthogonalisation of the update,
  scaled (``"moonlight"``: 0.2·sqrt(max(A, B)), so its RMS matches AdamW's;
  ``"spectral"``: sqrt(max(1, A / B)); ``"none"``).
* Embeddings, the output head, norms, biases and the router gates get AdamW
  with its own learning rate and weight decay (torch's own AdamW update).

Sharded parameters are orthogonalised as whole matrices:

* expert tensors are sharded along the expert dimension only (by EP and by
  FSDP), so every rank holds whole experts and orthogonalises them locally,
  in one batched call, with no communication;
* a dense matrix sharded by FSDP (rows over dp ranks) and by tensor
  parallelism (rows or columns over tp ranks) is all-gathered once per step
  (its momentum-updated gradient: the matrix's size in bytes, received by
  every rank), orthogonalised on every rank, and each rank keeps its part.
  The alternative, each rank orthogonalising whole matrices it owns and
  scattering the results, trades that all-gather plus redundant compute for
  a gather and a scatter of the same size; the gather keeps the step simple
  and exactly equal to single-process Muon.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.optim.adamw import adamw

from autoep.optim.newton_schulz import NSMethod, orthogonalize
from autoep.parallel.materialize import local_index

UpdateScale = Literal["moonlight", "spectral", "none"]


def _scale(shape: torch.Size, rule: UpdateScale) -> float:
    rows, cols = shape[-2], shape[-1]
    if rule == "moonlight":
        return 0.2 * math.sqrt(max(rows, cols))
    if rule == "spectral":
        return math.sqrt(max(1.0, rows / cols))
    return 1.0


def _orthogonalize_param_update(update: torch.Tensor, steps: int, method: NSMethod, dtype: torch.dtype):
    """Orthogonalise a (possibly sharded) update as whole matrices; returns this rank's part."""
    if not isinstance(update, DTensor):
        return orthogonalize(update, steps, method, dtype)
    local = update.to_local()
    if update.ndim == 3 or all(isinstance(p, Replicate) for p in update.placements):
        # Whole experts (dim 0 is the only sharded one) or a full replica: local work only.
        return orthogonalize(local, steps, method, dtype)
    return orthogonalize(update.full_tensor(), steps, method, dtype)[local_index(update)]


def check_muon_placements(param: torch.Tensor) -> str | None:
    """Why Muon cannot handle ``param`` as laid out, or ``None`` if it can."""
    if param.ndim not in (2, 3):
        return f"{param.ndim}-D tensor (Muon handles matrices and [E, A, B] expert stacks)"
    if isinstance(param, DTensor) and param.ndim == 3:
        for placement in param.placements:
            if isinstance(placement, Shard) and placement.dim != 0:
                return f"sharded along dim {placement.dim}; autoep's Muon expects expert stacks sharded by expert"
    return None


def _as_groups(params: Iterable[Any]) -> list[dict[str, Any]]:
    """Param groups as given, or plain tensors split into a Muon group (2-D/3-D) and an AdamW group."""
    items = list(params)
    if not items or all(isinstance(item, dict) for item in items):
        return items
    if any(isinstance(item, dict) for item in items):
        raise TypeError("Muon takes either param groups (dicts) or tensors, not a mix")
    tensors = [item[1] if isinstance(item, tuple) else item for item in items]  # named_parameters() works too
    muon = [t for t in tensors if t.ndim in (2, 3)]
    other = [t for t in tensors if t.ndim not in (2, 3)]
    return [g for g in ({"params": muon, "use_muon": True}, {"params": other, "use_muon": False}) if g["params"]]


class Muon(torch.optim.Optimizer):
    """Muon on groups with ``use_muon=True``; AdamW (torch's update) on the others.

    Build it with :func:`autoep.optim.build_optimizer` (which splits the
    parameters and lists any it cannot handle), pass param groups yourself, or
    pass plain tensors like to any torch optimizer (``Muon(model.parameters())``):
    matrices and ``[E, A, B]`` stacks then get Muon and everything else AdamW.
    Embeddings and the output head are matrices too; keep them on AdamW by
    passing groups (``build_optimizer`` does).
    """

    def __init__(
        self,
        params: Iterable[dict[str, Any]] | Iterable[torch.Tensor],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
        ns_method: NSMethod = "standard",
        ns_dtype: torch.dtype = torch.float32,
        update_scale: UpdateScale = "moonlight",
        adamw_lr: float = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.0,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            ns_steps=ns_steps,
            ns_method=ns_method,
            ns_dtype=ns_dtype,
            update_scale=update_scale,
            use_muon=True,
            betas=adamw_betas,
            eps=adamw_eps,
        )
        groups = []
        for group in _as_groups(params):
            group = dict(group)
            if not group.get("use_muon", True):
                group.setdefault("lr", adamw_lr)
                group.setdefault("weight_decay", adamw_weight_decay)
            groups.append(group)
        super().__init__(groups, defaults)
        for group in self.param_groups:
            if group["use_muon"]:
                for p in group["params"]:
                    problem = check_muon_placements(p)
                    if problem is not None:
                        raise ValueError(f"Muon cannot handle a parameter of shape {tuple(p.shape)}: {problem}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _muon_step(self, group: dict[str, Any]) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.mul_(mu).add_(p.grad)
            update = p.grad.add(buf, alpha=mu) if group["nesterov"] else buf
            ortho = _orthogonalize_param_update(update, group["ns_steps"], group["ns_method"], group["ns_dtype"])
            local_p = p.to_local() if isinstance(p, DTensor) else p
            local_p.mul_(1 - lr * wd)
            local_p.add_(ortho, alpha=-lr * _scale(p.shape, group["update_scale"]))

    def _adamw_step(self, group: dict[str, Any]) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        adamw(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
            foreach=False,
        )
