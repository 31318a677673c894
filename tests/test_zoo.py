"""The model zoo: every MoE model type of the installed transformers, discovered, built tiny and run on CPU."""

from __future__ import annotations

import inspect
import math
import subprocess
import sys
import time

from autoep.models import zoo

CORE_TYPES = ("mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss", "qwen3_next", "jamba", "llama4", "dbrx")


def state_digest(model):
    """SHA-256 of the state dict (names and raw bytes). Self-contained: its source also runs in a subprocess."""
    import hashlib

    import torch

    out = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        out.update(name.encode())
        out.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return out.hexdigest()


def test_every_moe_type_builds_and_trains_one_step() -> None:
    start = time.perf_counter()
    types = zoo.moe_model_types()
    discovery = time.perf_counter() - start
    assert len(types) >= 60, types
    assert set(CORE_TYPES) <= set(types), sorted(set(CORE_TYPES) - set(types))

    results = [zoo.check_tiny(model_type) for model_type in types]
    total = time.perf_counter() - start

    print(f"\n{len(types)} MoE model types, discovered in {discovery:.2f}s, all built and run in {total:.1f}s")
    print(f"{'type':<36} {'ok':<3} {'blocks':>6} {'loss':>7} {'secs':>5}  first MoE block / reason")
    for r in results:
        loss = "-" if r.loss is None else f"{r.loss:.3f}" + ("" if r.lm_loss else "*")
        detail = r.reason or f"{r.first_block} ({r.block_class} / {r.experts_class})"
        print(
            f"{r.model_type:<36} {'yes' if r.ok else 'no':<3} {r.moe_blocks:>6} {loss:>7} {r.seconds:>5.2f}  {detail}"
        )
    print("* no labels: mean square of the first output stands in for the loss")

    ok = [r for r in results if r.ok]
    assert len(ok) >= 55, [(r.model_type, r.reason) for r in results if not r.ok]
    for r in results:
        assert r.ok or (r.reason and r.reason.strip()), r
        if r.ok:
            assert r.loss is not None and math.isfinite(r.loss), r
    by_type = {r.model_type: r for r in results}
    for model_type in CORE_TYPES:
        r = by_type[model_type]
        assert r.ok and r.lm_loss and r.moe_blocks >= 2 and r.num_experts == zoo.EXPERTS, r
    assert sum(r.moe_blocks >= 2 and r.num_experts == zoo.EXPERTS for r in ok) >= 55


def test_same_seed_same_weights_in_any_process() -> None:
    model_type = "deepseek_v3"  # router and correction bias are re-drawn from the seed after transformers' init
    here = state_digest(zoo.build_tiny(model_type, seed=3))
    assert here == state_digest(zoo.build_tiny(model_type, seed=3))
    assert here != state_digest(zoo.build_tiny(model_type, seed=4))
    source = inspect.getsource(state_digest)
    code = f"from autoep.models import zoo\n{source}\nprint(state_digest(zoo.build_tiny({model_type!r}, seed=3)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == here


def test_routers_are_random_and_inputs_avoid_special_tokens() -> None:
    model = zoo.build_tiny("deepseek_v3")
    name, block = zoo.moe_blocks(model)[0]
    assert name == "model.layers.1.mlp"
    assert block.gate.weight.std() > 0.1 and block.gate.e_score_correction_bias.abs().sum() > 0
    ids = zoo.tiny_input_ids(model, batch=4, seq=64)
    assert not set(ids.flatten().tolist()) & zoo.special_token_ids(model.config)
