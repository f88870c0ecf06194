"""Training throughput of the real architecture: tokens/s per GPU, MFU, peak memory, data-wait
share and the step-time breakdown, for pretraining (144 visual tokens per image, packed 4096-token
sequences) and SFT (729 visual tokens), each under the trainer itself (`python -m oqvl.train`,
torchrun for several processes) with the chosen switches.

    .venv/bin/python benchmarks/train_throughput.py --out results/benchmarks/train_throughput.json
    python benchmarks/train_throughput.py --depth full --variants plain,fused,compile \\
        --micro-batches 1,2,4 --nproc 8 --out train_throughput.json        # a GPU machine

It writes its own inputs first (in --work): a real-id Qwen2.5 tokenizer (oqvl.model.tokenizer),
webdataset shards of 512 x 384 JPEGs with captions, packed by oqvl.pack as the workflow packs
them, and LLaVA-format SFT conversations. The model is SigLIP-SO400M-14-384 + Qwen2.5-1.5B built
from their published configs with random weights (`--random-init`: nothing is downloaded), at
full width; `--depth reduced` (the default, what CI runs on the CPU) keeps 2 decoder layers and 2
vision blocks. MFU is achieved model FLOP/s (oqvl.model.flops: docs/performance.md) over a peak:
the GPU's dense bf16 peak by its name, or on a CPU a float32 matmul peak measured in this run.
The first `--warmup` steps of each run are left out of the figures (allocator, compile).

Variants name trainer switches: plain, fused (fused AdamW), checkpointing (activation
checkpointing), compile (torch.compile per layer), flex (flex attention, GPU only), flash
(flash_attention_2, flash-attn installed), isolation (document isolation, the project's default
at toy scale; the reference attends causally across a packed sequence), workers0 (data in the
training process). Every variant but workers0 loads data with `--workers` processes.

Under a bare Python with torch, transformers and timm (a lent GPU machine) it needs, beside this
project's package, only open_clip_torch, webdataset, pyarrow/pandas, safetensors and the dashscope
wheel (its qwen.tiktoken ranks build the tokenizer); `--tokenizer DIR` skips that build.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

VARIANTS = {
    "plain": [],
    "fused": ["--fused-adamw"],
    "checkpointing": ["--grad-checkpointing"],
    "compile": ["--compile"],
    "flex": ["--attention", "flex_attention", "--doc-isolation"],
    "flash": ["--attention", "flash_attention_2"],
    "isolation": ["--doc-isolation"],
    "workers0": ["--workers", "0"],
}
DEPTHS = {"reduced": ["--lm-layers", "2", "--vision-layers", "2"], "full": []}
PHASES = ("data_s", "forward_s", "backward_s", "optimizer_s")


def make_shards(folder: Path, n: int, seed: int) -> None:
    """n image-caption pairs in webdataset shards: smooth 512 x 384 JPEGs (web-photo-like decode
    cost) and 20-40 word captions."""
    import io

    from PIL import Image

    from oqvl.shards import ShardSink

    rng = np.random.default_rng(seed)
    words = np.array(["a", "photo", "of", "the", "red", "blue", "green", "small", "large", "dog", "cat", "car", "tree", "house", "on", "in", "near", "with", "two", "three", "people", "street", "field", "water", "sky", "building", "table"])
    with ShardSink(folder, 256) as sink:
        for i in range(n):
            base = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
            img = Image.fromarray(base).resize((512, 384), Image.BICUBIC)
            noise = rng.integers(-8, 9, (384, 512, 3))
            img = Image.fromarray(np.clip(np.asarray(img, dtype=np.int64) + noise, 0, 255).astype(np.uint8))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            caption = " ".join(rng.choice(words, rng.integers(20, 41)))
            sink.write({"__key__": f"{i:08d}", "jpg": buf.getvalue(), "txt": caption.encode(),
                        "json": json.dumps({"uid": f"bench{i:08d}"}).encode()})


def make_sft(folder: Path, shards: Path, n: int, seed: int) -> Path:
    """n LLaVA-format conversations (3 turns) over the shards' first n images."""
    from oqvl.shards import iter_samples, shard_paths

    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i, sample in zip(range(n), iter_samples(shard_paths(shards))):
        (folder / "images" / f"{i}.jpg").write_bytes(sample["jpg"])
        turns = []
        for t in range(3):
            question = ("<image>\n" if t == 0 else "") + "What is shown here? Describe it in detail."
            answer = sample["txt"].decode() * int(rng.integers(1, 3))
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        records.append({"id": str(i), "image": f"images/{i}.jpg", "conversations": turns})
    path = folder / "llava.json"
    path.write_text(json.dumps(records))
    return path


def prepare(work: Path, tokenizer: Path | None, pairs: int, seed: int) -> dict:
    """The benchmark's inputs, made once per --work folder."""
    from oqvl.model.tokenizer import build_qwen2_tokenizer
    from oqvl.pack import build

    if tokenizer is None:
        tokenizer = work / "tokenizer"
        if not (tokenizer / "tokenizer.json").is_file():
            build_qwen2_tokenizer(tokenizer)
    shards = work / "shards"
    if not shards.is_dir():
        make_shards(shards, pairs, seed)
    packed = work / "packed"
    if not (packed / "sequences.parquet").is_file():
        build.main(["--shards", str(shards), "--tokenizer", str(tokenizer), "--visual-tokens", "144",
                    "--context-len", "4096", "--document-tokens", "reference", "--out", str(packed)])
    sft = work / "sft" / "llava.json"
    if not sft.is_file():
        sft = make_sft(work / "sft", shards, min(pairs, 256), seed)
    return {"tokenizer": tokenizer, "shards": shards, "packed": packed, "sft": sft}


def cpu_matmul_peak(threads: int, n: int = 2048, reps: int = 8) -> float:
    """FLOP/s of a float32 n x n matmul on `threads` threads: the CPU's peak MFU is measured against."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def run_stage(stage: str, out: Path, args: list[str], nproc: int) -> list[dict]:
    """One trainer run; its per-step records."""
    from oqvl.train import launch

    train_args = [stage, "--out", str(out), *args]
    cmd = launch.command(1, nproc, train_args, env={}) if nproc > 1 else [sys.executable, "-m", "oqvl.train",
                                                                         *train_args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{stage} failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def figures(log: list[dict], warmup: int, nproc: int) -> dict:
    """A run's figures over its steps after the warm-up."""
    steps = log[warmup:] or log[-1:]
    seconds = sum(r["seconds"] for r in steps)

    def mean(k):
        vals = [r[k] for r in steps if r.get(k) is not None]
        return statistics.fmean(vals) if vals else None

    breakdown = {k: round(sum(r.get(k, 0.0) for r in steps) / seconds, 4) for k in PHASES}
    mfu = mean("mfu")
    return {"steps_measured": len(steps), "step_s": round(seconds / len(steps), 3),
            "tokens_per_s_per_gpu": round(sum(r["tokens"] for r in steps) / seconds / nproc, 1),
            "tflops_per_gpu": round(mean("tflops"), 4), "mfu": None if mfu is None else round(mfu, 4),
            "peak_mem_mb": max(r["peak_mem_mb"] for r in steps), "data_share": breakdown["data_s"],
            "breakdown": breakdown, "vision_flops_share": round(mean("vision_flops_share"), 4),
            "images_per_step": round(mean("images"), 1), "final_loss": steps[-1]["loss"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="the JSON written")
    ap.add_argument("--work", type=Path, default=Path("results/benchmarks/train_throughput"),
                    help="inputs and runs (inputs are reused)")
    ap.add_argument("--depth", choices=DEPTHS, default="reduced")
    ap.add_argument("--variants", default="plain", help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--micro-batches", default="1", help="comma-separated micro-batch sizes (the sweep)")
    ap.add_argument("--steps", type=int, default=3, help="steps per run, warm-up included")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--stages", default="pretrain,sft")
    ap.add_argument("--nproc", type=int, default=1, help="processes (GPUs); above 1 under torchrun + FSDP2")
    ap.add_argument("--workers", type=int, default=2, help="data-loader workers per process")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per process on a CPU")
    ap.add_argument("--pairs", type=int, default=600, help="image-caption pairs generated")
    ap.add_argument("--tokenizer", type=Path, default=None, help="a Qwen2.5 tokenizer directory (default: build)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")

    import torch

    cuda = torch.cuda.is_available()
    t0 = time.perf_counter()
    inputs = prepare(args.work, args.tokenizer, args.pairs, args.seed)
    print(f"inputs ready in {time.perf_counter() - t0:.0f}s: {args.work}", flush=True)
    peak = None if cuda else cpu_matmul_peak(args.threads)
    common = ["--tokenizer", str(inputs["tokenizer"]), "--steps", str(args.steps), "--save-every",
              str(args.steps), "--warmup-frac", "0", "--time-phases", "--no-tensorboard",
              "--threads", str(args.threads), "--workers", str(args.workers), "--seed", str(args.seed)]
    if peak:
        common += ["--peak-tflops", f"{peak / 1e12:.6f}"]
    runs = []
    for variant in args.variants.split(","):
        for mb in map(int, args.micro_batches.split(",")):
            name = f"{variant}-mb{mb}"
            sizes = ["--global-batch", str(mb * args.nproc), "--micro-batch", str(mb)]
            base = args.work / "runs" / name
            stage_args = {
                "pretrain": ["--packed", str(inputs["packed"]), "--shards", str(inputs["shards"]),
                             "--preset", "open-qwen2vl", "--random-init", *DEPTHS[args.depth],
                             "--visual-tokens-pretrain", "144", "--visual-tokens-sft", "729",
                             "--no-doc-isolation", "--document-tokens", "reference"],
                "sft": ["--init-from", str(base / "pretrain" / "final"), "--sft-data", str(inputs["sft"]),
                        "--max-len", "4096", "--too-long", "truncate", "--document-tokens", "reference"],
            }
            for stage in args.stages.split(","):
                out = base / stage
                if out.exists():
                    import shutil

                    shutil.rmtree(out)  # a fresh run: a resumed one would measure nothing
                t1 = time.perf_counter()
                log = run_stage(stage, out, [*stage_args[stage], *common, *sizes, *VARIANTS[variant]], args.nproc)
                row = {"variant": variant, "stage": stage, "micro_batch": mb,
                       **figures(log, args.warmup, args.nproc), "wall_s": round(time.perf_counter() - t1, 1)}
                runs.append(row)
                print(json.dumps(row), flush=True)
    device = torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor() or platform.machine()})"
    result = {"device": device, "gpus": args.nproc if cuda else 0, "depth": args.depth,
              "dtype": "bfloat16 (FSDP2 mixed precision)" if cuda else "float32",
              "peak_tflops": None if cuda else round(peak / 1e12, 4),
              "peak_source": "the GPU's dense bf16 peak (oqvl.model.flops.PEAK_FLOPS)" if cuda
              else f"float32 2048x2048 matmul on {args.threads} threads, measured in this run",
              "threads": args.threads, "workers": args.workers, "steps": args.steps, "warmup": args.warmup,
              "torch": torch.__version__, "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
              "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
