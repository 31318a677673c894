"""Load balancing on 2 real gloo ranks with expert parallelism (one spawn for all scenarios).

* Balancing-loss values reported by a training step, and the gradients of the
  step, equal a single-process reference on the unconverted model whose
  losses are written out from their definitions: switch and z-loss per
  rank, sequence loss per sequence, global loss with counts over both ranks.
  Covered at ZeRO-2 (DeepSeek-V3, sigmoid routing, all four losses), at
  ZeRO-3 with 2 accumulated micro-batches (Mixtral, softmax routing) and at
  ZeRO-3 with activation checkpointing (Qwen3-MoE): recomputed forwards must
  neither count tokens twice nor skip the global all-reduce.
* The aux-loss-free bias update uses the counts of both ranks and leaves the
  bias identical on every rank.
* Capacity drops at ep 2 equal the drops of one process on the same rank-local
  batch (capacity is per rank and micro-batch), for both policies.
* ``output_router_logits`` still returns the routers' logits at ep 2.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import autoep
from autoep.launch import run_local
from autoep.load_balance import expert_bias
from autoep.models.tiny import build_tiny_model
from autoep.moe import balance as bal
from autoep.train import train_step

WORLD, SEQ = 2, 8
COEFS_A = {"aux_loss_coef": 0.3, "seq_aux_loss_coef": 0.2, "global_aux_loss_coef": 0.5, "z_loss_coef": 0.01}
COEFS_B = {"aux_loss_coef": 0.3, "global_aux_loss_coef": 0.5, "z_loss_coef": 0.01}
# (name, model, zero, rows per micro-batch per rank, micro-batches, coefficients, activation checkpointing)
CASES = [
    ("A", "tiny-deepseek-v3", 2, 2, 1, COEFS_A, False),
    ("B", "tiny-mixtral", 3, 1, 2, COEFS_B, False),
    ("C", "tiny-qwen3-moe", 3, 2, 1, COEFS_A, True),  # recomputed forwards redo the global all-reduce
]


def global_batch(vocab: int, rows: int, seed: int = 7) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, SEQ), generator=torch.Generator().manual_seed(seed))


def full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}


def _exact_step(model_name: str, zero: int, micro: int, accum: int, coefs: dict, checkpointing: bool) -> dict:
    """One SGD(lr=1) step: the parameter change is minus the gradient."""
    rank = dist.get_rank()
    model = build_tiny_model(model_name, seed=1)
    config = autoep.AutoEPConfig(
        ep_size=2,
        zero_stage=zero,
        micro_batch_size=micro,
        load_balancing=coefs,
        activation_checkpointing=checkpointing,
    )
    autoep.parallelize(model, config)
    before = full_params(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    rows = global_batch(model.config.vocab_size, WORLD * micro * accum)
    mine = rows[rank * micro * accum : (rank + 1) * micro * accum]
    result = train_step(model, optimizer, list(mine.split(micro)))
    after = full_params(model)
    grads = {name: before[name] - after[name] for name in before}
    return {
        "loss": result.loss,
        "lm_loss": result.lm_loss,
        "losses": {k: v.clone() for k, v in result.load.losses.items()},
        "routed": result.load.routed_LE.clone(),
        "grads": grads if rank == 0 else None,
    }


def _bias_step() -> dict:
    model = build_tiny_model("tiny-mixtral", seed=1)
    lb = {"bias_update_rate": 0.05, "bias_update_rule": "sign_centered"}
    config = autoep.AutoEPConfig(ep_size=2, zero_stage=1, micro_batch_size=2, load_balancing=lb)
    autoep.parallelize(model, config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    rows = global_batch(model.config.vocab_size, 2 * WORLD, seed=11)[2 * dist.get_rank() :][:2]
    result = train_step(model, optimizer, [rows])
    return {"bias": expert_bias(model), "routed": result.load.routed_LE}


def _capacity_forward(policy: str) -> dict:
    model = build_tiny_model("tiny-mixtral", seed=1)
    lb = {"capacity_factor": 1.0, "drop_policy": policy}
    autoep.parallelize(model, autoep.AutoEPConfig(ep_size=2, zero_stage=1, load_balancing=lb))
    rows = global_batch(model.config.vocab_size, 2 * WORLD, seed=13)[2 * dist.get_rank() :][:2]
    model.train()
    logits = model(input_ids=rows).logits.detach()
    stats = autoep.load_balance.collect_load_stats(model)
    return {"logits": logits, "dropped": stats.dropped_LE, "routed": stats.routed_LE}


def _router_logits() -> list[torch.Tensor]:
    model = build_tiny_model("tiny-qwen3-moe", seed=1)
    autoep.parallelize(model, autoep.AutoEPConfig(ep_size=2, zero_stage=2))
    rows = global_batch(model.config.vocab_size, 2 * WORLD, seed=17)[2 * dist.get_rank() :][:2]
    return [t.detach() for t in model(input_ids=rows, output_router_logits=True).router_logits]


def _worker() -> dict:
    out = {name: _exact_step(*case) for name, *case in CASES}
    out["bias"] = _bias_step()
    out["capacity"] = {policy: _capacity_forward(policy) for policy in ("probs", "position")}
    out["router_logits"] = _router_logits()
    return out


@pytest.fixture(scope="module")
def results() -> dict[int, dict]:
    return run_local(_worker, WORLD)


# ---- the single-process reference, written from the definitions -------------------------


def _capture_routers(model: torch.nn.Module) -> list:
    captured = []
    for module in model.modules():
        if type(module).__name__.endswith(("TopKRouter", "TopkRouter")):
            module.register_forward_hook(lambda m, a, o: captured.append((o[0].float(), o[2])))
    return captured


def _probs(logits: torch.Tensor, sigmoid: bool) -> torch.Tensor:
    if sigmoid:
        s = torch.sigmoid(logits)
        return s / s.sum(-1, keepdim=True)
    return torch.softmax(logits, -1)


def _switch(probs: torch.Tensor, indices: torch.Tensor, counts_from: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_e f_e P_e with f_e = E·count_e/(K·T), counts from ``counts_from`` (default: the same tokens)."""
    source = indices if counts_from is None else counts_from
    E, K = probs.shape[1], indices.shape[1]
    counts = torch.stack([(source == e).sum() for e in range(E)]).float()
    return (E * counts / (K * source.shape[0]) * probs.mean(0)).sum()


def _reference(model_name: str, zero: int, micro: int, accum: int, coefs: dict, checkpointing: bool) -> dict:
    model = build_tiny_model(model_name, seed=1)
    captured = _capture_routers(model)
    sigmoid = model_name == "tiny-deepseek-v3"
    rows = global_batch(model.config.vocab_size, WORLD * micro * accum)
    per_rank = micro * accum
    total, values = 0.0, {}
    for m in range(accum):
        # Micro-batch m of every rank, concatenated: rank r's rows come r-th.
        ids = torch.cat([rows[r * per_rank + m * micro : r * per_rank + (m + 1) * micro] for r in range(WORLD)])
        captured.clear()
        lm = model(input_ids=ids, labels=ids).loss
        terms: dict[str, list[torch.Tensor]] = {name: [] for name in bal.LOSS_NAMES}
        for logits, indices in captured:
            probs = _probs(logits, sigmoid)
            T = micro * SEQ
            ranks = [slice(r * T, (r + 1) * T) for r in range(WORLD)]
            seqs = [slice(s * SEQ, (s + 1) * SEQ) for s in range(WORLD * micro)]
            terms["aux_loss"].append(torch.stack([_switch(probs[r], indices[r]) for r in ranks]).mean())
            terms["seq_aux_loss"].append(torch.stack([_switch(probs[s], indices[s]) for s in seqs]).mean())
            terms["global_aux_loss"].append(_switch(probs, indices))
            terms["z_loss"].append(torch.logsumexp(logits, -1).square().mean())
        extra = sum(coefs.get(f"{n}_coef", 0.0) * torch.stack(v).mean() for n, v in terms.items())
        total = total + (lm + extra) / accum
        for name, v in terms.items():
            values[name] = values.get(name, 0.0) + torch.stack(v).detach() / accum
    total.backward()
    return {"loss": float(total.detach()), "values": values, "grads": {n: p.grad for n, p in model.named_parameters()}}


@pytest.mark.parametrize(("case", "model_name", "zero", "micro", "accum", "coefs", "checkpointing"), CASES)
def test_losses_and_gradients_equal_reference(results, case, model_name, zero, micro, accum, coefs, checkpointing):
    want = _reference(model_name, zero, micro, accum, coefs, checkpointing)
    got = results[0][case]
    for name in ("aux_loss", "z_loss", *(k.removesuffix("_coef") for k in coefs)):
        assert torch.allclose(got["losses"][name].float(), want["values"][name], atol=1e-5), name
        assert torch.allclose(results[1][case]["losses"][name], got["losses"][name])  # reported alike on ranks
    assert got["loss"] == pytest.approx(want["loss"], abs=1e-5)
    tokens = WORLD * micro * accum * SEQ
    assert got["routed"].sum(dim=1).tolist() == [2 * tokens] * got["routed"].shape[0]  # top-2, counted once
    assert got["loss"] - got["lm_loss"] > 0.1  # the balancing terms really were in the objective
    for name, grad in want["grads"].items():
        diff = (got["grads"][name] - grad).abs().max().item()
        assert diff <= 2e-6, f"{name}: {diff} (reference max {grad.abs().max().item()})"


def test_global_loss_differs_from_local_loss(results) -> None:
    """Otherwise the test above could not tell the global variant from the local one."""
    losses = results[0]["A"]["losses"]
    assert (losses["global_aux_loss"] - losses["aux_loss"]).abs().max() > 1e-3


def test_bias_update_uses_global_counts_and_stays_identical(results) -> None:
    bias0, bias1 = results[0]["bias"]["bias"], results[1]["bias"]["bias"]
    routed = results[0]["bias"]["routed"]
    assert torch.equal(bias0, bias1)
    assert routed.sum(dim=1).tolist() == [2 * WORLD * SEQ * 2] * routed.shape[0]  # both ranks' tokens, top-2
    want = torch.stack([bal.bias_update(row, 0.05, "sign_centered") for row in routed])
    assert torch.allclose(bias0, want, atol=1e-7)
    assert bias0.abs().max() > 0 and bias0.sum(dim=1).abs().max() < 1e-6


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_capacity_at_ep2_equals_one_process(results, policy) -> None:
    dropped = 0
    for rank in range(WORLD):
        model = build_tiny_model("tiny-mixtral", seed=1)
        autoep.convert(model, 1, balance=bal.BalanceConfig(capacity_factor=1.0, drop_policy=policy))
        rows = global_batch(model.config.vocab_size, 2 * WORLD, seed=13)[2 * rank :][:2]
        model.train()
        want = model(input_ids=rows).logits
        got = results[rank]["capacity"][policy]
        assert torch.allclose(got["logits"], want, atol=1e-5)
        dropped += sum(m.load_stats.dropped_E.sum().item() for m in model.modules() if hasattr(m, "load_stats"))
    assert results[0]["capacity"][policy]["dropped"].sum().item() == dropped > 0


def test_router_logits_at_ep2(results) -> None:
    for rank in range(WORLD):
        model = build_tiny_model("tiny-qwen3-moe", seed=1)
        rows = global_batch(model.config.vocab_size, 2 * WORLD, seed=17)[2 * rank :][:2]
        want = model(input_ids=rows, output_router_logits=True).router_logits
        got = results[rank]["router_logits"]
        assert len(got) == len(want) > 0
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, want, strict=True))
