"""Tokenization throughput and per-rank peak memory of `autoep train` against corpus size.

For each size, a JSONL corpus of generated documents is written, then a real
training run (tiny-mixtral, 2 gloo ranks, 20 steps) tokenizes it into a fresh
token cache (both ranks build) and trains on it. Reported per size: tokens,
tokenization time and tokens/s, and each rank's peak RSS (VmHWM: anonymous
memory plus mapped cache pages it touched), against the same run on the
built-in corpus. The bound checked: peak RSS within +200 MiB of the built-in
run's, whatever the corpus size.

    python benchmarks/data.py --sizes 10MB,200MB         # what benchmarks/results/data_cpu.txt holds
    python benchmarks/data.py --sizes 10MB,200MB,2GB --tokenizer bytes
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

BOUND_MIB = 200
WORDS = (
    "alice bob carol dave erin has gives more apples books coins shells at the market library park harbor school "
    "garden now then one two three four five six seven eight nine ten and with from to of in on a"
).split()


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(KB|MB|GB)", text.strip().upper())
    if not match:
        raise SystemExit(f"bad size {text!r}: use e.g. 10MB, 2GB")
    return int(float(match[1]) * {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}[match[2]])


def write_corpus(path: Path, size: int, seed: int = 0) -> None:
    """JSONL documents of 20-400 random words until ``size`` bytes."""
    rng = random.Random(seed)
    written = 0
    with path.open("w") as f:
        while written < size:
            block = []
            for _ in range(1000):
                words = rng.choices(WORDS, k=rng.randint(20, 400))
                block.append(json.dumps({"text": " ".join(words) + "."}) + "\n")
            text = "".join(block)
            f.write(text)
            written += len(text)


def make_bpe(path: Path) -> Path:
    """A byte-level-free BPE tokenizer small enough (vocabulary 256) for the built-in tiny models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=256, special_tokens=["<pad>", "<s>", "</s>", "<unk>"], show_progress=False)
    tok.train_from_iterator([" ".join(WORDS) + " ."] * 50, trainer)
    PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    ).save_pretrained(path)
    return path


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _worker(job) -> dict:
    import contextlib
    import io

    from autoep.train.loop import run_training

    started = time.perf_counter()
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # rank 0's data lines carry the tokenization figures
        summary = run_training(job)
    seconds = time.perf_counter() - started
    return {"peak_rss_mib": _peak_rss_mib(), "seconds": seconds, "loss": summary["final_loss"], "log": log.getvalue()}


def run(data: str | None, tokenizer: str | None, cache: Path, out: Path, nproc: int, steps: int) -> dict:
    from autoep.config import AutoEPConfig
    from autoep.data import DataOptions
    from autoep.launch import run_local
    from autoep.train.loop import TrainJob

    config = AutoEPConfig(ep_size=2, zero_stage=3, micro_batch_size=4)
    options = DataOptions(tokenizer=tokenizer, cache_dir=str(cache))
    job = TrainJob(config=config, data=data, steps=steps, output=str(out), log_every=steps, data_options=options)
    results = run_local(_worker, nproc, job)
    return {"ranks": [results[r] for r in sorted(results)], "log": results[0]["log"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10MB,200MB,2GB", help="comma-separated corpus sizes (default: %(default)s)")
    parser.add_argument("--tokenizer", choices=["bpe", "bytes"], default="bpe", help="(default: bpe)")
    parser.add_argument("--nproc", type=int, default=2, help="ranks, all building the cache (default: 2)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workdir", help="where corpora and caches go (default: a temporary directory)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="autoep-data-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = str(make_bpe(work / "tok")) if args.tokenizer == "bpe" else None
    print(
        f"tiny-mixtral, {args.nproc} gloo ranks (ep 2, ZeRO 3), {args.steps} steps, seq 64, micro-batch 4; "
        f"tokenizer: {args.tokenizer}; {os.cpu_count()} CPU cores"
    )
    base = run(None, tokenizer, work / "cache-builtin", work / "run-builtin", args.nproc, args.steps)
    base_peak = max(r["peak_rss_mib"] for r in base["ranks"])
    peaks = ", ".join(f"{r['peak_rss_mib']:.0f}" for r in base["ranks"])
    print(f"built-in corpus: per-rank peak RSS {peaks} MiB")
    header = f"{'corpus':>8} {'tokens':>14} {'tokenize s':>10} {'tokens/s':>12} {'peak RSS MiB/rank':>20}"
    print(f"{header} {'vs built-in':>12}")
    ok = True
    for text in args.sizes.split(","):
        size = parse_size(text)
        corpus = work / f"corpus-{text.strip()}.jsonl"
        if not corpus.is_file() or corpus.stat().st_size < size:
            write_corpus(corpus, size)
        cache = work / f"cache-{text.strip()}"
        shutil.rmtree(cache, ignore_errors=True)  # measure a fresh build
        result = run(str(corpus), tokenizer, cache, work / f"run-{text.strip()}", args.nproc, args.steps)
        match = re.search(r"tokenized [\d,]+ documents, ([\d,]+) tokens in ([\d.]+)s", result["log"])
        tokens, seconds = (int(match[1].replace(",", "")), float(match[2])) if match else (0, float("nan"))
        peaks = [r["peak_rss_mib"] for r in result["ranks"]]
        delta = max(peaks) - base_peak
        ok &= delta <= BOUND_MIB
        print(
            f"{text.strip():>8} {tokens:>14,} {seconds:>10.1f} {tokens / seconds:>12,.0f} "
            f"{' / '.join(f'{p:.0f}' for p in peaks):>20} {delta:>+11.0f}M",
            flush=True,
        )
    print(f"bound: per-rank peak RSS within +{BOUND_MIB} MiB of the built-in corpus run: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
