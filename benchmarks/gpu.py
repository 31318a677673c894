"""GPU benchmark: grouped GEMM, all-to-all bandwidth, and a ~1B-parameter MoE training step (bf16, NCCL).

    python benchmarks/gpu.py gemm                                   # one GPU
    torchrun --nproc-per-node 8 benchmarks/gpu.py alltoall          # all GPUs of a node
    torchrun --nproc-per-node 8 benchmarks/gpu.py step --peak-tflops 989

* ``gemm``: bf16 grouped GEMM (``torch.nn.functional.grouped_mm``, the kernel
  autoep's experts use) against one dense GEMM of the same FLOPs, TFLOP/s of
  each and their ratio, for expert shapes of Mixtral / Qwen3-MoE / DeepSeek-V3.
* ``alltoall``: ``all_to_all_single`` of equal splits, algorithm bandwidth
  (bytes each rank sends / time) and bus bandwidth (x (W-1)/W), per message size.
* ``step``: a Qwen3-MoE-style model of about 1B parameters (ep = world, ZeRO 1,
  bf16), tokens/s and MFU = 6 x active parameters x tokens/s / (world x peak).

Needs CUDA; CI never runs it. Quote ratios and MFU, not absolute times.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
import torch.distributed as dist


def _cuda_time(fn, iters: int = 20, warmup: int = 5) -> float:
    """Median seconds of ``fn()`` on the current stream."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return statistics.median(samples)


def gemm(args: argparse.Namespace) -> None:
    grouped_mm = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    shapes = {"mixtral": (8, 4096, 14336), "qwen3-moe": (128, 2048, 768), "deepseek-v3": (256, 7168, 2048)}
    print("| experts shape | E | tokens x k | grouped TFLOP/s | dense TFLOP/s | grouped / dense |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, (experts, hidden, inter) in shapes.items():
        rows = args.tokens * args.top_k
        x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(experts, hidden, inter, device="cuda", dtype=torch.bfloat16)
        offs = torch.arange(1, experts + 1, device="cuda", dtype=torch.int32) * (rows // experts)
        flops = 2 * (rows // experts) * experts * hidden * inter
        t_grouped = _cuda_time(lambda x=x, w=w, offs=offs: grouped_mm(x, w, offs=offs))
        w_dense = torch.randn(hidden, inter, device="cuda", dtype=torch.bfloat16)
        x_dense = x[: (rows // experts) * experts]
        t_dense = _cuda_time(lambda x=x_dense, w=w_dense: x @ w)
        grouped, dense = flops / t_grouped / 1e12, flops / t_dense / 1e12
        ratio = grouped / dense
        print(f"| {name} ({hidden}x{inter}) | {experts} | {rows} | {grouped:.0f} | {dense:.0f} | {ratio:.2f} |")


def alltoall(args: argparse.Namespace) -> None:
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if rank == 0:
        print("| bytes sent per rank | time (us) | algorithm GB/s | bus GB/s |")
        print("| --- | --- | --- | --- |")
    for size in (2**20, 2**24, 2**26, 2**28):
        x = torch.empty(size // 2, device="cuda", dtype=torch.bfloat16)
        out = torch.empty_like(x)
        seconds = _cuda_time(lambda x=x, out=out: dist.all_to_all_single(out, x))
        if rank == 0:
            algo = size / seconds / 1e9
            print(f"| {size:,} | {seconds * 1e6:.0f} | {algo:.1f} | {algo * (world - 1) / world:.1f} |")
    dist.destroy_process_group()


def _billion_moe_config():
    from transformers import Qwen3MoeConfig

    # ~1.0B parameters, ~0.3B active: 16 layers, 32 experts of width 768, top-4.
    return Qwen3MoeConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        moe_intermediate_size=768,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=64,
        num_experts=32,
        num_experts_per_tok=4,
        norm_topk_prob=True,
        max_position_embeddings=4096,
    )


def step(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM

    import autoep
    from autoep.train import train_step

    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    config = _billion_moe_config()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    expert_params = 3 * config.moe_intermediate_size * config.hidden_size * config.num_experts
    active = total - config.num_hidden_layers * expert_params * (1 - config.num_experts_per_tok / config.num_experts)
    autoep_config = autoep.AutoEPConfig(
        ep_size=world,
        zero_stage=1,
        mixed_precision={"param_dtype": "bfloat16", "reduce_dtype": "float32"},
        micro_batch_size=args.micro_batch,
    )
    autoep.parallelize(model, autoep_config)
    optimizer = autoep.build_optimizer(model, autoep_config)
    ids = torch.randint(0, config.vocab_size, (args.micro_batch, args.seq_len), device="cuda")
    seconds = _cuda_time(lambda: train_step(model, optimizer, [ids], max_grad_norm=1.0), iters=10, warmup=3)
    tokens_per_s = world * args.micro_batch * args.seq_len / seconds
    mfu = 6 * active * tokens_per_s / (world * args.peak_tflops * 1e12)
    if rank == 0:
        print(
            f"~{total / 1e9:.2f}B parameters ({active / 1e9:.2f}B active), ep {world}, ZeRO 1, bf16, "
            f"{args.micro_batch}x{args.seq_len} tokens per GPU: step {seconds * 1e3:.0f} ms, "
            f"{tokens_per_s:,.0f} tokens/s, MFU {mfu:.1%} (peak {args.peak_tflops} TFLOP/s per GPU)"
        )
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["gemm", "alltoall", "step"])
    parser.add_argument("--tokens", type=int, default=16384, help="gemm: tokens (x top-k rows)")
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak per GPU (H100/H200: 989)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA device")
    {"gemm": gemm, "alltoall": alltoall, "step": step}[args.what](args)


if __name__ == "__main__":
    main()
