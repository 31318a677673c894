"""GPU benchmark: exactness on CUDA, grouped GEMM, all-to-all bandwidth, and a ~1B-parameter MoE step (bf16).

    python benchmarks/gpu.py all                                    # one GPU: check, gemm, step (ep 1)
    python benchmarks/gpu.py check                                  # converted vs HF model, fp32 and bf16
    python benchmarks/gpu.py gemm
    torchrun --nproc-per-node 8 benchmarks/gpu.py alltoall          # all GPUs of a node
    torchrun --nproc-per-node 8 benchmarks/gpu.py step --peak-tflops 989

* ``check``: four built-in tiny families on the device, forward and backward:
  in fp32, converted (ep 1; the experts' per-expert loop on CUDA) vs the HF
  model, as ``autoep verify`` compares them; in bf16, the converted model's
  grouped GEMM vs its per-expert loop. Exits 1 if any fails, since the timings
  below would then mean nothing.
* ``gemm``: bf16 grouped GEMM (``torch.nn.functional.grouped_mm``, the kernel
  autoep's experts use) against one dense GEMM of the same FLOPs, TFLOP/s of
  each and their ratio, for expert shapes of Mixtral / Qwen3-MoE / DeepSeek-V3.
* ``alltoall``: ``all_to_all_single`` of equal splits, algorithm bandwidth
  (bytes each rank sends / time) and bus bandwidth (x (W-1)/W), per message size.
* ``step``: a Qwen3-MoE-style model of about 1B parameters (ep = world, ZeRO 1,
  bf16), tokens/s and MFU = 6 x active parameters x tokens/s / (world x peak).

``--device cpu --tiny`` runs every part at toy sizes on CPU (gloo): the
test suite does, so this script keeps working until a GPU runs it. Quote
ratios and MFU, not absolute times. docs/training.md says how to run it on a
lent GPU machine.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import socket
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

FAMILIES = ("tiny-mixtral", "tiny-qwen3-moe", "tiny-deepseek-v3", "tiny-gpt-oss")


def _time(fn: Callable[[], object], device: str, iters: int = 20, warmup: int = 5) -> float:
    """Median seconds of ``fn()`` (CUDA events on the current stream on CUDA)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - begin)
    return statistics.median(samples)


def _dtype(args: argparse.Namespace) -> torch.dtype:
    return torch.bfloat16 if args.device == "cuda" else torch.float32


def _init_group(device: str) -> None:
    """The default group: torchrun's, else a world of one (``python benchmarks/gpu.py``)."""
    if dist.is_initialized():
        return
    backend = "nccl" if device == "cuda" else "gloo"
    if "RANK" in os.environ:
        dist.init_process_group(backend)
    else:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def check(args: argparse.Namespace) -> bool:
    """fp32: converted vs the HF model (exactness). bf16: the experts' grouped GEMM vs their per-expert loop,
    both converted, so that a difference is the kernel's (against HF, a bf16 rounding difference upstream can
    flip a near-tie routing choice in a later layer, and the comparison then says nothing about the kernel)."""
    from autoep.convert import convert
    from autoep.models.loading import load_model
    from autoep.verify import VerifyReport, compare_models

    print("| model | comparison | experts path | logits max diff | worst grad diff | result |")
    print("| --- | --- | --- | --- | --- | --- |")
    passed = True
    for name in FAMILIES:
        reference = load_model(name, dtype=torch.float32, seed=0).to(args.device).train()
        converted = copy.deepcopy(reference)
        convert(converted, 1)
        ids = torch.randint(0, reference.config.get_text_config().vocab_size, (2, 16), device=args.device)
        report = compare_models(reference, converted, ids, VerifyReport(name, 1, "float32", atol=1e-5, rtol=1e-4))
        grad = max((c.grad_diff for c in report.layers), default=0.0)
        rows = [
            ("fp32, converted vs HF", _paths(converted, ids, torch.float32), report.logits_diff, grad, report.passed)
        ]
        fast = copy.deepcopy(converted).to(torch.bfloat16)
        fast.zero_grad(set_to_none=True)
        loop = copy.deepcopy(fast)
        for experts in _experts(loop):
            experts.backend = "loop"
        logits, grad, ok = _same_model_diff(fast, loop, ids)
        paths = f"{_paths(fast, ids, torch.bfloat16)} vs {_paths(loop, ids, torch.bfloat16)}"
        rows.append(("bf16, default vs loop", paths, logits, grad, ok))
        for comparison, paths, logits, grad, ok in rows:
            passed &= ok
            print(f"| {name} | {comparison} | {paths} | {logits:.2e} | {grad:.2e} | {'pass' if ok else 'FAIL'} |")
    return passed


def _experts(model: torch.nn.Module) -> list:
    from autoep.moe.experts import GroupedExperts

    return [m for m in model.modules() if isinstance(m, GroupedExperts)]


def _paths(model: torch.nn.Module, ids: torch.Tensor, dtype: torch.dtype) -> str:
    probe = ids.new_empty(0, dtype=dtype)
    return ", ".join(sorted({"loop" if m.uses_loop(probe) else "grouped_mm" for m in _experts(model)}))


def _same_model_diff(a: torch.nn.Module, b: torch.nn.Module, ids: torch.Tensor) -> tuple[float, float, bool]:
    """Largest logits and gradient differences of two copies of one model, and whether both are within bf16's
    tolerance (1e-2 + 5e-2 x the larger magnitude)."""
    out_a, out_b = a(input_ids=ids, labels=ids), b(input_ids=ids, labels=ids)
    out_a.loss.backward()
    out_b.loss.backward()
    logits = (out_a.logits.float() - out_b.logits.float()).abs().max().item()
    ok = logits <= 1e-2 + 5e-2 * out_a.logits.float().abs().max().item()
    grad = 0.0
    for (_, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        if pa.grad is None or pb.grad is None:
            ok &= pa.grad is None and pb.grad is None
            continue
        diff = (pa.grad.float() - pb.grad.float()).abs().max().item()
        grad = max(grad, diff)
        ok &= diff <= 1e-2 + 5e-2 * pa.grad.float().abs().max().item()
    return logits, grad, ok


def gemm(args: argparse.Namespace) -> None:
    from autoep.moe.experts import grouped_mm_supported

    grouped_mm = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    shapes = {"mixtral": (8, 4096, 14336), "qwen3-moe": (128, 2048, 768), "deepseek-v3": (256, 7168, 2048)}
    if args.tiny:
        shapes = {"tiny": (4, 64, 128)}
    dtype = _dtype(args)
    print(f"| experts shape | E | tokens x k | grouped TFLOP/s | dense TFLOP/s | grouped / dense |  ({dtype})")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, (experts, hidden, inter) in shapes.items():
        rows = (args.tokens // (16 if args.tiny else 1)) * args.top_k
        x = torch.randn(rows, hidden, device=args.device, dtype=dtype)
        if not grouped_mm_supported(x, hidden, inter):
            print(f"| {name} | {experts} | {rows} | grouped GEMM not supported for {dtype} on this device | | |")
            continue
        w = torch.randn(experts, hidden, inter, device=args.device, dtype=dtype)
        offs = torch.arange(1, experts + 1, device=args.device, dtype=torch.int32) * (rows // experts)
        flops = 2 * (rows // experts) * experts * hidden * inter
        t_grouped = _time(lambda x=x, w=w, offs=offs: grouped_mm(x, w, offs=offs), args.device)
        w_dense = torch.randn(hidden, inter, device=args.device, dtype=dtype)
        x_dense = x[: (rows // experts) * experts]
        t_dense = _time(lambda x=x_dense, w=w_dense: x @ w, args.device)
        grouped, dense = flops / t_grouped / 1e12, flops / t_dense / 1e12
        ratio = grouped / dense
        print(f"| {name} ({hidden}x{inter}) | {experts} | {rows} | {grouped:.3g} | {dense:.3g} | {ratio:.2f} |")


def alltoall(args: argparse.Namespace) -> None:
    _init_group(args.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        print(f"| bytes sent per rank | time (us) | algorithm GB/s | bus GB/s |  (world {world})")
        print("| --- | --- | --- | --- |")
    for size in (2**12, 2**16) if args.tiny else (2**20, 2**24, 2**26, 2**28):
        x = torch.empty(size // 2, device=args.device, dtype=torch.bfloat16)
        out = torch.empty_like(x)
        seconds = _time(lambda x=x, out=out: dist.all_to_all_single(out, x), args.device)
        if rank == 0:
            algo = size / seconds / 1e9
            print(f"| {size:,} | {seconds * 1e6:.0f} | {algo:.1f} | {algo * (world - 1) / world:.1f} |")


def _moe_config(tiny: bool):
    from transformers import Qwen3MoeConfig

    # ~1.0B parameters, ~0.3B active: 16 layers, 32 experts of width 768, top-4.
    sizes = dict(hidden_size=1024, intermediate_size=2816, moe_intermediate_size=768, num_hidden_layers=16)
    sizes |= dict(num_attention_heads=16, num_key_value_heads=4, head_dim=64, vocab_size=32000)
    if tiny:
        sizes = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2)
        sizes |= dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256)
    return Qwen3MoeConfig(
        **sizes, num_experts=32, num_experts_per_tok=4, norm_topk_prob=True, max_position_embeddings=4096
    )


def step(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM

    import autoep
    from autoep.train import train_step

    _init_group(args.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    config = _moe_config(args.tiny)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    expert_params = 3 * config.moe_intermediate_size * config.hidden_size * config.num_experts
    active = total - config.num_hidden_layers * expert_params * (1 - config.num_experts_per_tok / config.num_experts)
    autoep_config = autoep.AutoEPConfig(
        ep_size=world,
        zero_stage=1,
        micro_batch_size=args.micro_batch,
        # bf16 in the CPU smoke run too: the same FSDP2 mixed-precision path as on a GPU
        mixed_precision={"param_dtype": "bfloat16", "reduce_dtype": "float32"},
    )
    autoep.parallelize(model, autoep_config)
    optimizer = autoep.build_optimizer(model, autoep_config)
    seq_len = 32 if args.tiny else args.seq_len
    ids = torch.randint(0, config.vocab_size, (args.micro_batch, seq_len), device=args.device)
    losses: list[float] = []

    def one_step() -> None:
        losses.append(train_step(model, optimizer, [ids], max_grad_norm=1.0).loss)

    seconds = _time(one_step, args.device, iters=3 if args.tiny else 10, warmup=1 if args.tiny else 3)
    if not all(map(lambda loss: loss == loss and abs(loss) != float("inf"), losses)):
        raise SystemExit(f"non-finite loss in the step benchmark: {losses}")
    tokens_per_s = world * args.micro_batch * seq_len / seconds
    mfu = 6 * active * tokens_per_s / (world * args.peak_tflops * 1e12)
    if rank == 0:
        print(
            f"~{total / 1e9:.3g}B parameters ({active / 1e9:.3g}B active), ep {world}, ZeRO 1, "
            f"bf16, {args.micro_batch}x{seq_len} tokens per rank: "
            f"step {seconds * 1e3:.0f} ms, {tokens_per_s:,.0f} tokens/s, MFU {mfu:.1%} "
            f"(peak {args.peak_tflops} TFLOP/s per device); loss {losses[0]:.3f} -> {losses[-1]:.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["all", "check", "gemm", "alltoall", "step"])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="toy sizes: a smoke run (CPU) or a quick look")
    parser.add_argument("--tokens", type=int, default=16384, help="gemm: tokens (x top-k rows)")
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak per GPU (H100/H200: 989)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA device (or --device cpu --tiny for a smoke run)")
    torch.manual_seed(0)
    parts: dict[str, Callable[[argparse.Namespace], object]] = {"check": check, "gemm": gemm}
    parts |= {"alltoall": alltoall, "step": step}
    chosen = ["check", "gemm", "step"] if args.what == "all" else [args.what]
    if args.what == "all" and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        chosen.insert(2, "alltoall")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        _init_group(args.device)  # first: each rank on its own GPU for the single-device parts too
    failed = False
    with contextlib.redirect_stdout(io.StringIO()) if int(os.environ.get("RANK", 0)) else contextlib.nullcontext():
        for name in chosen:
            print(f"\n## {name}", flush=True)
            failed |= parts[name](args) is False
    if dist.is_initialized():
        import autoep

        autoep.shutdown(1 if failed else 0)  # leaves without gloo's exit-time abort (autoep.teardown)
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
