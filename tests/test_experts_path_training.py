"""Training on the experts path (families no adapter knows) equals one process on the global batch.

World 4, one spawn for every scenario. The models are tiny random models of
families that only the generic experts path converts: MiniMax (Mixtral-style
softmax router), Qwen3.5-MoE (hybrid linear attention, gated shared expert)
and dots.llm1 (sigmoid router with an ``e_score_correction_bias``). Each is
compared with the unconverted model trained in one process:

* 5 AdamW steps at ZeRO 3, ep 2 with clipping active: losses, global norms and
  final parameters within 1e-5 (same eps reasoning as test_training_exactness);
* dots1 with aux-loss-free bias updates: the reference counts each layer's
  routed assignments with a hook on the unconverted experts module and applies
  the same sign rule; biases and parameters match;
* Muon (per-expert orthogonalisation) at ZeRO 3, ep 2 against single-process Muon;
* tensor-parallel folding (tp 2, ep 2, ZeRO 1) with global aux and z losses
  computed from the family router's logits, against the same losses in one process;
* a checkpoint saved at ep 2 / ZeRO 3 resumes at ep 4 / ZeRO 1 with identical
  parameters, and its next step equals the uninterrupted run's.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import autoep
from autoep.checkpoint.manager import full_tensor
from autoep.launch import run_local
from autoep.models import zoo
from autoep.moe.balance import BalanceConfig
from autoep.optim import param_groups
from autoep.train import train_step

WORLD, STEPS, SEQ = 4, 5, 8
CLIP, LR, EPS = 0.05, 1e-3, 1e-6
TOL = 1e-5
ADAMW = {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.1, "betas": (0.9, 0.95), "eps": EPS}}
MUON = {"type": "Muon", "params": {"lr": 0.01, "weight_decay": 0.1, "adamw_lr": 1e-3, "adamw_eps": 1e-6}}
BIAS = {"bias_update_rate": 0.01}
LOSSES = {"global_aux_loss_coef": 0.5, "z_loss_coef": 0.05}
FAMILIES = ("minimax", "qwen3_5_moe", "dots1")


def build(model_type: str) -> torch.nn.Module:
    model = zoo.build_tiny(model_type, seed=1)
    model.zero_grad(set_to_none=True)
    return model


def batches(vocab: int, rows: int = WORLD) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, vocab, (rows, SEQ), generator=gen) for _ in range(STEPS)]


def full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: full_tensor(p).detach().clone() for n, p in model.named_parameters()}


def biases(model: torch.nn.Module) -> list[torch.Tensor]:
    return [b.detach().clone().reshape(-1) for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]


def _train(model_type: str, optimizer: dict, balancing: dict, steps: int = STEPS, zero: int = 3, ep: int = 2) -> dict:
    rank = dist.get_rank()
    model = build(model_type)
    config = autoep.AutoEPConfig(
        ep_size=ep, zero_stage=zero, gradient_clipping=CLIP, optimizer=optimizer, load_balancing=balancing
    )
    autoep.parallelize(model, config)
    assert model.autoep.report.layers[0].conversion == "experts"
    opt = autoep.build_optimizer(model, config)
    losses, norms = [], []
    for batch in batches(model.config.get_text_config().vocab_size)[:steps]:
        result = train_step(model, opt, [batch[rank : rank + 1]], max_grad_norm=CLIP)
        losses.append(result.loss)
        norms.append(result.grad_norm)
    params = full_params(model)
    return {"losses": losses, "norms": norms, "params": params if rank == 0 else None, "bias": biases(model)}


def _fold_step(model_type: str) -> dict:
    """One SGD step at tp 2 x dp 2, ep 2, ZeRO 1 with balancing losses: the update is -grad."""
    model = build(model_type)
    config = autoep.AutoEPConfig(ep_size=2, tp_size=2, zero_stage=1, micro_batch_size=2, load_balancing=LOSSES)
    autoep.parallelize(model, config)
    before = full_params(model)
    dp_rank = model.autoep.dp_rank
    batch = batches(model.config.get_text_config().vocab_size)[0]
    result = train_step(model, torch.optim.SGD(model.parameters(), lr=1.0), [batch[2 * dp_rank : 2 * dp_rank + 2]])
    after = full_params(model)
    grads = {n: before[n] - after[n] for n in before}
    return {"loss": result.loss, "norm": result.grad_norm, "grads": grads if dist.get_rank() == 0 else None}


def _resume(model_type: str, root: str) -> dict:
    """2 steps at ep 2 / ZeRO 3, save; load at ep 4 / ZeRO 1 and take step 3."""
    rank = dist.get_rank()
    data = None
    first = build(model_type)
    config = autoep.AutoEPConfig(ep_size=2, zero_stage=3, gradient_clipping=CLIP, optimizer=ADAMW)
    autoep.parallelize(first, config)
    opt = autoep.build_optimizer(first, config)
    data = batches(first.config.get_text_config().vocab_size)
    for batch in data[:2]:
        train_step(first, opt, [batch[rank : rank + 1]], max_grad_norm=CLIP)
    autoep.save_checkpoint(root, first, opt, step=2)
    saved = full_params(first)
    second = build(model_type)
    config = autoep.AutoEPConfig(ep_size=4, zero_stage=1, gradient_clipping=CLIP, optimizer=ADAMW)
    autoep.parallelize(second, config)
    opt = autoep.build_optimizer(second, config)
    autoep.load_checkpoint(root, second, opt)
    loaded = full_params(second)
    same = max((saved[k] - loaded[k]).abs().max().item() for k in saved)
    loss = train_step(second, opt, [data[2][rank : rank + 1]], max_grad_norm=CLIP).loss
    return {"max_diff_after_load": same, "step3_loss": loss}


def _worker(root: str) -> dict:
    out = {f"adamw-{t}": _train(t, ADAMW, BIAS if t == "dots1" else {}) for t in FAMILIES}
    out["muon-minimax"] = _train("minimax", MUON, {})
    out["fold-minimax"] = _fold_step("minimax")
    out["resume-minimax"] = _resume("minimax", root)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ckpt")
    return run_local(_worker, WORLD, str(root))


def _count_hooks(model: torch.nn.Module) -> list[torch.Tensor]:
    """Per MoE layer, the routed assignments per expert of the last forward (hooks on the HF experts)."""
    counts: list[torch.Tensor] = []
    for module in model.modules():
        if getattr(module, "has_gate", None) is not None and hasattr(module, "num_experts"):

            def record(mod, args, _store=counts):
                _store.append(torch.bincount(args[1].reshape(-1), minlength=mod.num_experts))

            module.register_forward_pre_hook(record)
    return counts


def reference(model_type: str, optimizer: dict, bias_rate: float = 0.0) -> dict:
    model = build(model_type)
    if optimizer["type"] == "Muon":
        opt = autoep.build_optimizer(model, autoep.AutoEPConfig(optimizer=optimizer))
    else:
        p = optimizer["params"]
        opt = torch.optim.AdamW(param_groups(model, p["weight_decay"]), lr=p["lr"], betas=p["betas"], eps=p["eps"])
    counts = _count_hooks(model)
    bias_buffers = [b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]
    losses, norms = [], []
    for batch in batches(model.config.get_text_config().vocab_size):
        counts.clear()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if bias_rate:
            for bias, routed in zip(bias_buffers, counts, strict=True):
                routed = routed.double()
                bias.add_((bias_rate * torch.sign(routed.mean() - routed)).float())
    return {"losses": losses, "norms": norms, "params": full_params(model), "bias": biases(model)}


def _assert_close_runs(got: dict, want: dict) -> None:
    assert max(abs(a - b) for a, b in zip(got["losses"], want["losses"], strict=True)) <= TOL, (got, want)
    assert max(abs(a - b) for a, b in zip(got["norms"], want["norms"], strict=True)) <= TOL
    assert got["params"].keys() == want["params"].keys()
    for name, value in want["params"].items():
        diff = (got["params"][name] - value).abs().max().item()
        assert diff <= TOL, f"{name}: {diff}"


@pytest.mark.parametrize("model_type", FAMILIES)
def test_adamw_zero3_ep2_equals_one_process(results, model_type) -> None:
    want = reference(model_type, ADAMW, BIAS["bias_update_rate"] if model_type == "dots1" else 0.0)
    assert min(want["norms"]) > CLIP  # clipping is active in every step
    _assert_close_runs(results[0][f"adamw-{model_type}"], want)


def test_aux_loss_free_bias_updates_match_reference(results) -> None:
    want = reference("dots1", ADAMW, BIAS["bias_update_rate"])
    assert want["bias"] and max(b.abs().max().item() for b in want["bias"]) > 0  # the biases moved
    for rank, per_rank in results.items():
        got = per_rank["adamw-dots1"]["bias"]
        assert len(got) == len(want["bias"])
        for g, w in zip(got, want["bias"], strict=True):
            assert torch.allclose(g, w, atol=1e-6), (rank, g, w)


def test_muon_per_expert_equals_one_process(results) -> None:
    want = reference("minimax", MUON)
    got = results[0]["muon-minimax"]
    assert max(abs(a - b) for a, b in zip(got["losses"], want["losses"], strict=True)) <= TOL
    for name, value in want["params"].items():
        assert (got["params"][name] - value).abs().max().item() <= TOL, name


def test_folded_step_with_balancing_losses_equals_one_process(results) -> None:
    model = build("minimax")
    autoep.convert(model, balance=BalanceConfig(**LOSSES))  # ep 1, one process: the same losses on the same router
    batch = batches(model.config.vocab_size)[0]
    out = model(input_ids=batch, labels=batch)
    out.loss.backward()
    got = results[0]["fold-minimax"]
    assert got["loss"] == pytest.approx(float(out.loss), abs=1e-5)
    assert float(out["balance_loss"]) > 0
    for name, param in model.named_parameters():
        torch.testing.assert_close(got["grads"][name], param.grad, atol=2e-5, rtol=1e-4, msg=name)


def test_checkpoint_reshards_across_layouts(results) -> None:
    straight = results[0]["adamw-minimax"]["losses"]
    for per_rank in results.values():
        resumed = per_rank["resume-minimax"]
        assert resumed["max_diff_after_load"] == 0.0
        assert resumed["step3_loss"] == pytest.approx(straight[2], abs=TOL)
