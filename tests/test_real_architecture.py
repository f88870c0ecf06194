"""The real architecture (SigLIP-SO400M-14-384 + Qwen2.5-1.5B from their published configs, random
weights, full width) takes pretraining steps on packed 4096-token sequences and SFT steps at 729
visual tokens, at reduced depth (2 decoder layers, 2 vision blocks), through the throughput
benchmark as a user runs it; and at full depth it has the parameter counts the report projects with."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from oqvl.model.flops import model_cost
from oqvl.model.vlm import OpenQwen2VL
from oqvl.report.compute import DEFAULT_REPORT

REPO = Path(__file__).resolve().parents[1]


def test_full_depth_parameter_counts_are_the_published_models():
    with torch.device("meta"):
        model = OpenQwen2VL.from_preset("open-qwen2vl", random_init=True)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model.lm) == 1_543_714_304  # Qwen2.5-1.5B, tied head counted once
    assert count(model.vision) == 428_225_600  # SigLIP-SO400M-14-384's visual tower
    assert count(model.projector) == 4_131_840
    cost = model_cost(model, 144)
    assert (cost.lm_layers, cost.lm_width, cost.vision_layers, cost.vision_width) == (28, 1536, 26, 1152)
    for key in ("lm_layers", "lm_width", "vision_layers", "vision_width"):
        assert DEFAULT_REPORT["projection"][key] == getattr(cost, key), key


@pytest.mark.slow
def test_reduced_depth_real_architecture_trains_through_the_benchmark(tmp_path):
    out = tmp_path / "throughput.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), "--out", str(out),
                           "--work", str(tmp_path / "work"), "--steps", "2", "--warmup", "1", "--pairs", "120"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    runs = {r["stage"]: r for r in result["runs"]}
    assert set(runs) == {"pretrain", "sft"} and result["depth"] == "reduced"
    packed = json.loads((tmp_path / "work" / "packed" / "stats.json").read_text())
    assert packed["context_len"] == 4096 and packed["visual_tokens"] == 144
    pre = runs["pretrain"]
    assert pre["images_per_step"] > 10 and pre["tokens_per_s_per_gpu"] > 0 and 0 < pre["mfu"] < 1.5
    assert pre["data_share"] < 0.05 and sum(pre["breakdown"].values()) <= 1.0001
    logs = {s: [json.loads(line) for line in (tmp_path / "work" / "runs" / "plain-mb1" / s / "train_log.jsonl")
                .read_text().splitlines()] for s in ("pretrain", "sft")}
    assert all(r["tokens"] > 3000 for r in logs["pretrain"])  # packed 4096-token sequences
    sft_cfg = json.loads((tmp_path / "work" / "runs" / "plain-mb1" / "sft" / "final" / "config.json").read_text())
    assert sft_cfg["lm"]["num_hidden_layers"] == 2 and sft_cfg["lm"]["hidden_size"] == 1536
    assert sft_cfg["visual_tokens_sft"] == 729
    assert all(r["loss"] == r["loss"] and r["loss"] > 0 for s in logs.values() for r in s)
