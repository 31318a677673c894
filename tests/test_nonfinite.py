"""Non-finite steps on 4 gloo ranks: an Inf injected into one rank's embedding output.

* ``skip`` (default): the step is skipped on every rank, the weights after it
  equal those before it, the modules with non-finite gradients are named
  identically everywhere, and training goes on: the final weights equal a clean
  run that never saw that batch.
* ``stop``: every rank raises ``NonFiniteError`` at that step.
* Too many skipped steps in a row stop the run with a clear error.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import autoep
from autoep.checkpoint.manager import full_tensor
from autoep.launch import run_local
from autoep.models.tiny import build_tiny_model
from autoep.train import train_step
from autoep.train.nonfinite import NonFiniteError, NonFiniteGuard

STEPS = 6


def _params(model) -> dict[str, torch.Tensor]:
    return {n: full_tensor(p).detach().clone() for n, p in model.named_parameters()}


def _run(poison: set[int], skip_batches: set[int] = frozenset(), policy: str = "skip", max_consecutive: int = 5):
    """Train ``STEPS`` steps; at the (1-based) steps in ``poison`` rank 1's embedding output holds an Inf."""
    rank = dist.get_rank()
    model = build_tiny_model("tiny-deepseek-v3", seed=4)
    config = autoep.AutoEPConfig(
        ep_size=2, zero_stage=3, gradient_clipping=1.0, optimizer={"type": "AdamW", "params": {"lr": 1e-2}}
    )
    autoep.parallelize(model, config)
    optimizer = autoep.build_optimizer(model, config)
    current = {"step": 0}

    def inject(module, args, output):
        if rank == 1 and current["step"] in poison:
            output = output.clone()
            output[0, 0, 0] = float("inf")
        return output

    model.get_input_embeddings().register_forward_hook(inject)
    guard = NonFiniteGuard(policy, max_consecutive)
    gen = torch.Generator().manual_seed(11)
    batches = [torch.randint(0, 256, (dist.get_world_size(), 8), generator=gen) for _ in range(STEPS)]
    out = {"params": [], "skipped": [], "modules": [], "error": None}
    try:
        for step, batch in enumerate(batches, start=1):
            if step in skip_batches:
                continue
            current["step"] = step
            result = train_step(model, optimizer, [batch[rank : rank + 1]], max_grad_norm=1.0)
            out["skipped"].append(result.skipped)
            out["modules"].append(result.nonfinite)
            params = _params(model)  # a collective: every rank gathers, rank 0 keeps them
            out["params"].append(params if rank == 0 else None)
            guard.observe(step, result.skipped, result.loss, result.grad_norm, result.nonfinite)
    except NonFiniteError as err:
        out["error"] = (current["step"], str(err))
    out["skipped_total"] = guard.skipped
    return out


def _worker() -> dict:
    return {
        "skip": _run({4}),
        "clean": _run(set(), skip_batches={4}),
        "stop": _run({4}, policy="stop"),
        "consecutive": _run({2, 3}, max_consecutive=2),
    }


@pytest.fixture(scope="module")
def results() -> dict[int, dict]:
    return run_local(_worker, 4)


def test_skipped_step_leaves_weights_unchanged_on_every_rank(results) -> None:
    for rank, out in results.items():
        run = out["skip"]
        assert run["skipped"] == [False, False, False, True, False, False], rank
        assert run["error"] is None and run["skipped_total"] == 1
        assert run["modules"][3] and run["modules"][3] == results[0]["skip"]["modules"][3]  # same on every rank
        assert any("embed_tokens" in m or "layers" in m for m in run["modules"][3])
    params = results[0]["skip"]["params"]
    for name in params[2]:
        assert torch.equal(params[3][name], params[2][name]), name  # step 4 changed nothing
    assert any(not torch.equal(params[4][n], params[3][n]) for n in params[3])  # step 5 trained
    assert all(torch.isfinite(t).all() for t in params[-1].values())


def test_training_continues_as_if_the_batch_never_came(results) -> None:
    skipped, clean = results[0]["skip"]["params"][-1], results[0]["clean"]["params"][-1]
    for name, value in clean.items():
        torch.testing.assert_close(skipped[name], value, atol=1e-7, rtol=0, msg=name)


def test_stop_policy_raises_on_every_rank(results) -> None:
    for out in results.values():
        step, message = out["stop"]["error"]
        assert step == 4 and "not finite" in message and "stop" in message


def test_too_many_consecutive_skips_stop(results) -> None:
    for out in results.values():
        step, message = out["consecutive"]["error"]
        assert step == 3 and "2 steps in a row" in message
