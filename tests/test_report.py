"""Report stage: compute accounting from benchmark files, the paper-scale projection, result tables
with provenance, plots, and the report rules in the DAG."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, snakemake
from PIL import Image

from oqvl.report import compute, plots, tables
from oqvl.model.flops import ModelCost, flop_factors, flops_per_token
from oqvl.report.compute import project_hours

HEADER = ("s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\tjobid\t"
          "rule_name\twildcards\tparams\tthreads\tcpu_usage\tresources\tinput_size_mb")
TOY_HEAD = 8214 * 128  # toy preset: vocab x hidden, tied


def bench(path: Path, s, cpu, rss, rule, wildcards, params, threads, resources):
    """One extended benchmark record, as Snakemake 9 writes it (Python reprs for the dicts)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = [f"{s:.2f}", "0:00:00", rss, "1.0", "1.0", "1.0", "0.00", "0.00", "0.00", cpu, "3", rule,
           repr(wildcards), repr(params), str(threads), "10.0", repr(resources), "{}"]
    path.write_text(HEADER + "\n" + "\t".join(map(str, rec)) + "\n")


def eval_file(path: Path, run, bench_name, scores, chance=25.0, below=(), seed=0):
    """An evaluation file as oqvl.evaluate writes it: percentages, both protocols, the headline
    accuracy first, then a descriptive metric with no chance level."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for proto, v in scores.items():
        rows.append({"run": run, "seed": seed, "benchmark": bench_name, "protocol": proto, "metric": "accuracy",
                     "value": v, "n": 200, "chance": chance, "control": chance + 1,
                     "above_chance": bench_name not in below})
        rows.append({"run": run, "seed": seed, "benchmark": bench_name, "protocol": proto, "metric": "yes_ratio",
                     "value": 51.5, "n": 200, "chance": None, "control": None, "above_chance": None})
    path.write_text(json.dumps(rows))


TOY_PARAMS = {"vision": 820_000, "projector": 33_000, "lm": 1_788_000, "total": 2_641_000}


def summary(run, stage, **over):
    s = {"stage": stage, "run": run, "steps": 50, "tokens": 400_000, "loss_tokens": 100_000,
         "sequences": 800, "seconds": 100.0, "tokens_per_s": 4000.0, "world_size": 1, "device": "cpu",
         "gpus": 0, "threads": 2, "params": TOY_PARAMS,
         "trainable_params": TOY_PARAMS["projector"] + TOY_PARAMS["lm"], "final_loss": 3.2}
    s.update(over)
    return s


def write_json(path: Path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


SCORES = {"MMBench": (62.0, 60.0), "SEEDBench": (55.0, 54.0), "MMStar": (41.0, 40.0),
          "MathVista": (30.0, 29.0), "POPE": (81.0, 80.0)}


def manifest(path: Path, stage, amount, unit, device="cpu", gpus=0, **extra):
    """A job's manifest as oqvl.manifest writes it (the fields the report reads)."""
    write_json(path, {"stage": stage, "work": {"amount": amount, "unit": unit},
                      "device": {"type": device, "gpus": gpus}, "code_version": "abc123", "files": {}, **extra})


class World:
    """A results tree and the declared files the report rules would pass (rules/report.smk)."""

    def __init__(self, res: Path):
        self.res = res
        self.jobs = []          # [benchmark, manifest] per accounted job
        self.pretrain = {}      # run -> {summary, packed_stats}
        self.records = {}       # run -> the files of its table rows

    def job(self, bench_path, manifest_path):
        self.jobs.append([str(bench_path), str(manifest_path)])


def run_record(res: Path, run, mixture):
    """One seed's record (seed 0), as oqvl.plan.run_record names its files."""
    base = res / "runs" / run
    return {"mixture": mixture, "seeds": [0],
            "evals": [str(base / "eval" / f"{b}.json") for b in SCORES],
            "pretrain_summaries": [str(base / "pretrain" / "summary.json")],
            "pretrain_jobs": [[str(res / "benchmarks" / "train" / f"{run}_pretrain.tsv"),
                               str(base / "pretrain" / "manifest.json")]],
            "manifests": [str(res / "mixtures" / mixture / "manifest.json"), str(base / "pretrain" / "manifest.json")]}


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A results tree: data-stage jobs, a GPU pretraining job, a CPU-only GPU rule, an evaluated run
    (r12, mixture 1+2) and a trained but unevaluated run (r13, mixture 1+3)."""
    monkeypatch.chdir(tmp_path)  # the rules run in the workflow's directory: paths relative to it
    res = tmp_path / "results"
    w = World(res)
    b = res / "benchmarks"
    res_ = {"tmpdir": "/tmp", "_nodes": 1, "_cores": 2}
    bench(b / "raw" / "download_ccs.tsv", 36.0, 18.0, 1030.25, "download", {"source": "ccs"},
          {"options": "{}"}, 2, {**res_, "mem_mb": 4000})
    manifest(res / "raw" / "ccs" / "accounting.manifest.json", "raw", 300, "pairs")
    w.job(b / "raw" / "download_ccs.tsv", res / "raw" / "ccs" / "accounting.manifest.json")
    # A GPU rule run under --resources gpu=0: Snakemake records gpu 0.
    bench(b / "filter" / "clip_score_ccs.tsv", 72.0, 130.0, 900.0, "clip_score", {"source": "ccs"},
          {"model": "toy"}, 2, {**res_, "gpu": 0})
    manifest(res / "filter" / "ccs" / "clip_scores.manifest.json", "clip_score", 288, "pairs")
    w.job(b / "filter" / "clip_score_ccs.tsv", res / "filter" / "ccs" / "clip_scores.manifest.json")
    # The MLM-Filter on 1 GPU: pairs with no readable score are work done too.
    bench(b / "filter" / "mlm_score_ccs.tsv", 100.0, 90.0, 5000.0, "mlm_score", {"source": "ccs"},
          {"model": "m"}, 2, {**res_, "gpu": 1})
    manifest(res / "filter" / "ccs" / "mlm_scores.manifest.json", "mlm_score", 288, "pairs", "cuda", 1)
    w.job(b / "filter" / "mlm_score_ccs.tsv", res / "filter" / "ccs" / "mlm_scores.manifest.json")
    # A job faster than Snakemake's sampling interval: memory and CPU time are NA; and its
    # manifest is missing: no accounted work.
    (b / "report").mkdir(parents=True)
    (b / "report" / "table4.tsv").write_text(
        HEADER + "\n0.40\t0:00:00\tNA\tNA\tNA\tNA\tNA\tNA\tNA\tNA\t0\ttable4\t{}\t{}\t1\tNA\t"
        "{'tmpdir': '/tmp', '_nodes': 1, '_cores': 1}\t{}\n")
    w.job(b / "report" / "table4.tsv", res / "gone.manifest.json")
    bench(b / "pack" / "ccs+datacomp.tsv", 18.0, 17.0, 500.0, "pack", {"mixture": "ccs+datacomp"}, {}, 1, res_)
    manifest(res / "packed" / "ccs+datacomp" / "manifest.json", "pack", 100, "documents")
    w.job(b / "pack" / "ccs+datacomp.tsv", res / "packed" / "ccs+datacomp" / "manifest.json")
    write_json(res / "packed" / "ccs+datacomp" / "stats.json",
               {"sequences": 40, "documents_packed": 100, "text_tokens": 2000, "real_tokens": 3800})
    write_json(res / "packed" / "ccs+laion" / "stats.json",
               {"sequences": 30, "documents_packed": 80, "text_tokens": 1600, "real_tokens": 3040})
    manifest(res / "mixtures" / "ccs+datacomp" / "manifest.json", "mixture", 100, "pairs",
             counts={"ccs": 60, "datacomp": 40, "total": 100})
    # r12: pretrained on 2 GPUs (granted and reported), evaluated on both protocols.
    bench(b / "train" / "r12_pretrain.tsv", 3600.0, 3500.0, 20000.0, "pretrain", {"run": "r12"}, {}, 8,
          {**res_, "gpu": 2})
    write_json(res / "runs" / "r12" / "pretrain" / "summary.json",
               summary("r12", "pretrain", device="NVIDIA H100 80GB HBM3", gpus=2, world_size=2,
                       tokens=7_200_000, loss_tokens=1_800_000, tokens_per_s=2400.0))
    manifest(res / "runs" / "r12" / "pretrain" / "manifest.json", "pretrain", 7_200_000, "tokens",
             "NVIDIA H100 80GB HBM3", 2)
    w.job(b / "train" / "r12_pretrain.tsv", res / "runs" / "r12" / "pretrain" / "manifest.json")
    for name, (p, l) in SCORES.items():
        eval_file(res / "runs" / "r12" / "eval" / f"{name}.json", "r12", name, {"paper": p, "lmms": l},
                  below=("MathVista",))
    bench(b / "evaluate" / "r12_POPE.tsv", 60.0, 55.0, 3000.0, "evaluate", {"run": "r12", "benchmark": "POPE"},
          {}, 1, res_)
    manifest(res / "runs" / "r12" / "eval" / "POPE.manifest.json", "evaluate", 800, "samples")
    w.job(b / "evaluate" / "r12_POPE.tsv", res / "runs" / "r12" / "eval" / "POPE.manifest.json")
    # r13: pretrained on the CPU, never evaluated.
    bench(b / "train" / "r13_pretrain.tsv", 120.0, 230.0, 2500.0, "pretrain", {"run": "r13"}, {}, 2, res_)
    write_json(res / "runs" / "r13" / "pretrain" / "summary.json", summary("r13", "pretrain"))
    manifest(res / "runs" / "r13" / "pretrain" / "manifest.json", "pretrain", 400_000, "tokens")
    w.job(b / "train" / "r13_pretrain.tsv", res / "runs" / "r13" / "pretrain" / "manifest.json")
    for run, mixture in (("r12", "ccs+datacomp"), ("r13", "ccs+laion")):
        w.pretrain[run] = {"summary": str(res / "runs" / run / "pretrain" / "summary.json"),
                           "packed_stats": str(res / "packed" / mixture / "stats.json")}
        w.records[run] = run_record(res, run, mixture)
    w.records["r13"]["evals"] = []  # never evaluated: the rule would wait; the table has no row
    return w


CONFIG = {
    "scale": "toy",
    "model": {"visual_tokens_pretrain": 16, "visual_tokens_sft": 64},
    "mixtures": {"ccs+datacomp": {"paper_id": "1+2", "sources": ["ccs", "datacomp"]},
                 "ccs+laion": {"paper_id": "1+3", "sources": ["ccs", "laion"]}},
    "runs": {"r12": {"mixture": "ccs+datacomp"}, "r13": {"mixture": "ccs+laion"}},
    "table4_run": "r12",
}


# ------------------------------------------------------------------------------------ accounting

def jobs_of(w):
    return compute.job_rows(w.jobs).set_index("job")


def test_mlm_filter_scoring_is_accounted_per_gpu(world):
    row = jobs_of(world).loc["mlm_score[source=ccs]"]
    assert row["gpus"] == 1 and row["gpu_h"] == pytest.approx(100 / 3600)
    assert row["work"] == 288 and row["throughput"] == pytest.approx(288 / 100)
    assert row["throughput_unit"] == "pairs/s/gpu"


def test_job_recorded_with_gpu_0_costs_no_gpu_hours(world):
    row = jobs_of(world).loc["clip_score[source=ccs]"]
    assert row["gpus"] == 0 and row["gpu_h"] == 0
    assert row["device"] == "cpu"
    assert row["wall_h"] == pytest.approx(72 / 3600)
    assert row["cpu_h"] == pytest.approx(130 / 3600)
    assert row["peak_mem_mb"] == pytest.approx(900.0)
    # Per core: 288 pairs (scored + failed) over 72 s on 2 threads.
    assert row["work"] == 288 and row["work_unit"] == "pairs"
    assert row["throughput"] == pytest.approx(288 / (72 * 2))
    assert row["throughput_unit"] == "pairs/s/core"
    assert row["stage"] == "filter"


def test_gpu_job_hours_and_throughput_per_gpu(world):
    row = jobs_of(world).loc["pretrain[run=r12]"]
    assert row["gpus"] == 2
    assert row["gpu_h"] == pytest.approx(2.0)  # 2 GPUs x 1 h
    assert row["device"] == "NVIDIA H100 80GB HBM3"
    assert row["stage"] == "pretrain" and row["run"] == "r12"
    assert row["throughput"] == pytest.approx(7_200_000 / (3600 * 2))
    assert row["throughput_unit"] == "tokens/s/gpu"


def test_work_done_per_stage_and_missing_values(world):
    jobs = jobs_of(world)
    assert jobs.loc["download[source=ccs]", "work"] == 300
    assert jobs.loc["pack[mixture=ccs+datacomp]", "work_unit"] == "documents"
    assert jobs.loc["pack[mixture=ccs+datacomp]", "work"] == 100
    assert jobs.loc["evaluate[benchmark=POPE,run=r12]", "work"] == 800
    fast = jobs.loc["table4"]
    assert fast["wall_h"] == pytest.approx(0.4 / 3600)
    assert math.isnan(fast["cpu_h"]) and math.isnan(fast["peak_mem_mb"]) and math.isnan(fast["work"])
    assert fast["gpu_h"] == 0


def test_repeated_benchmark_is_averaged(tmp_path):
    path = tmp_path / "b" / "raw" / "x.tsv"
    bench(path, 10.0, 5.0, 100.0, "generate_pairs", {"source": "ccs"}, {"n_pairs": 50}, 1, {"_cores": 1})
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[1], lines[1].replace("10.00", "20.00", 1)]) + "\n")
    manifest(tmp_path / "pairs.manifest.json", "generate_pairs", 50, "pairs")
    row = compute.job_rows([[path, tmp_path / "pairs.manifest.json"]]).iloc[0]
    assert row["wall_h"] == pytest.approx(15 / 3600)
    assert row["work"] == 50 and row["throughput"] == pytest.approx(50 / 15)
    assert "2 repeats" in row["note"]


def test_reads_a_record_snakemake_wrote(tmp_path):
    # Copied from a real benchmark file of this workflow (rule download, default config).
    real = (HEADER + "\n39.74\t0:00:39\t1030.25\t6795.86\t621.76\t733.71\t3.91\t0.89\t19.78\t8.37\t5\tdownload\t"
            "{'source': 'laion'}\t{'options': '{\"encode_format\":\"jpg\",\"threads\":8}'}\t2\t786.09\t"
            "{'tmpdir': '/tmp', '_nodes': 1, 'mem_mb': 4000, 'mem': '4 GB', 'mem_mib': 3815, '_cores': 2}\t"
            "{'results/raw/laion/pairs.parquet': 0.1616373062133789}\n")
    path = tmp_path / "benchmarks" / "raw" / "download_laion.tsv"
    path.parent.mkdir(parents=True)
    path.write_text(real)
    job = compute.parse_job(path, tmp_path / "benchmarks")
    assert (job.rule, job.wildcards, job.threads, job.gpus) == ("download", {"source": "laion"}, 2, 0)
    assert (job.wall_s, job.cpu_s, job.peak_mem_mb, job.stage) == (39.74, 8.37, 1030.25, "raw")


def test_compute_csv(world, tmp_path):
    out = tmp_path / "compute.csv"
    compute.main(["--inputs-json", json.dumps({"jobs": world.jobs, "pretrain": world.pretrain}),
                  "--config-json", json.dumps(CONFIG), "--out", str(out), "--html", str(tmp_path / "c.html")])
    df = pd.read_csv(out)
    assert list(df.columns) == compute.COLUMNS
    assert (df["row_type"] == "job").sum() == 8
    assert (df["row_type"] == "projection").sum() == 2  # r12 and r13 pretrained
    paper = df[df["row_type"] == "paper"].set_index("job")
    assert paper.loc["Open-Qwen2VL v1", "gpu_h"] == 442 and paper.loc["Open-Qwen2VL v2", "gpu_h"] == 220
    assert paper["device"].eq("A100-40G").all()
    assert "442" in (tmp_path / "c.html").read_text()


# ------------------------------------------------------------------------------------ projection

def test_flop_factors():
    assert flop_factors(("projector", "lm")) == {"vision": 2, "projector": 6, "lm": 6}
    assert flop_factors(("lm",)) == {"vision": 2, "projector": 2, "lm": 6}
    # Frozen below a trained part: the input gradient is still computed (4 per parameter).
    assert flop_factors(("vision",)) == {"vision": 6, "projector": 4, "lm": 4}
    assert flop_factors(("vision", "projector", "lm")) == {"vision": 6, "projector": 6, "lm": 6}


def test_flops_per_token_by_hand():
    m = ModelCost(vision_params=10, projector_params=3, lm_params=100, lm_head_params=40,
                  patches_per_image=4, visual_tokens=2)
    # L = 2 + 6 + 2 = 10; head on (6 + 1) / 10 of tokens; vision frozen (2), projector trained (6).
    lm = 6 * (60 + 40 * 0.7)
    per_image = 2 * 10 * 4 + 6 * 3 * 2
    assert flops_per_token(m, 6) == pytest.approx(lm + per_image / 10)
    assert flops_per_token(m, 6, loss_fraction=1.0) == pytest.approx(6 * 100 + per_image / 10)


def test_project_hours():
    # 1000 tokens/s at 1e9 FLOP/token = 1e12 FLOP/s; 5e9 tokens at 1e10 FLOP/token = 5e19 FLOPs.
    assert project_hours(1000, 1e9, 1e10, 5e9) == pytest.approx(5e19 / 1e12 / 3600)
    # Same model: just tokens over throughput.
    assert project_hours(2500, 7e9, 7e9, 5e9) == pytest.approx(5e9 / 2500 / 3600)
    assert project_hours(2000, 1e9, 1e10, 5e9) == pytest.approx(project_hours(1000, 1e9, 1e10, 5e9) / 2)


def test_paper_model_numbers():
    proj = compute.report_settings({})["projection"]
    assert proj["lm_head_params"] == 151936 * 1536
    assert proj["projector_params"] == (1152 * 1536 + 1536) + (1536 * 1536 + 1536)
    assert compute.patches_from_open_clip_config("ViT-SO400M-14-SigLIP-384") == proj["patches_per_image"] == 729
    assert compute.patches_from_open_clip_config("toy-vit-p8-sigmoid") == 64
    assert proj["visual_tokens"] == 144 and proj["tokens"] == 5e9
    # The config files carry the same numbers as the defaults.
    import yaml

    for name in ("default", "ci", "full"):
        rep = yaml.safe_load((REPO / "config" / f"{name}.yaml").read_text())["report"]
        assert rep["paper_gpu_hours"] == {"v1": 442, "v2": 220}
        assert {k: rep["projection"][k] for k in rep["projection"]} == {k: proj[k] for k in rep["projection"]}


def test_projection_rows_by_hand(world):
    rows = {r["run"]: r for r in compute.projection_rows(CONFIG, world.pretrain)}
    proj = compute.report_settings({})["projection"]
    # r13: toy model on the CPU, 4000 tokens/s; captions 1600 / 80 = 20 tokens; L = 16 + 20 + 2.
    p = TOY_PARAMS
    f_toy = 6 * ((p["lm"] - TOY_HEAD) + TOY_HEAD * 100_000 / 400_000) + (2 * p["vision"] * 64 + 6 * p["projector"] * 16) / 38
    L = 144 + 20 + 2
    f_paper = (6 * ((proj["lm_params"] - proj["lm_head_params"]) + proj["lm_head_params"] * 21 / L)
               + (2 * proj["vision_params"] * 729 + 6 * proj["projector_params"] * 144) / L
               # attention: the LM's over the reference's full causal 4096-token sequences, the
               # tower's over its 729 patches (docs/performance.md)
               + 6 * 2 * 28 * 1536 * 4097 / 2 + 2 * 2 * 26 * 1152 * 729 ** 2 / L)
    hours = 5e9 * f_paper / (4000 * f_toy) / 3600
    r13 = rows["r13"]
    assert r13["wall_h"] == pytest.approx(hours, rel=1e-9)
    assert r13["gpu_h"] == 0 and r13["cpu_h"] == pytest.approx(hours * 2)  # 2 threads
    assert r13["device"] == "cpu"
    # r12 ran on 2 GPUs: 1200 tokens/s per GPU; captions 2000 / 100 = 20 tokens.
    f_toy12 = 6 * ((p["lm"] - TOY_HEAD) + TOY_HEAD * 0.25) + (2 * p["vision"] * 64 + 6 * p["projector"] * 16) / 38
    r12 = rows["r12"]
    assert r12["gpu_h"] == pytest.approx(5e9 * f_paper / (1200 * f_toy12) / 3600, rel=1e-9)
    assert r12["device"] == "NVIDIA H100 80GB HBM3"
    paper = [r for r in compute.projection_rows(CONFIG, world.pretrain) if r["row_type"] == "paper"]
    v2 = next(r for r in paper if r["job"].endswith("v2"))
    rate = 5e9 * f_paper / (220 * 3600)
    assert f"{rate / 312e12:.0%}" in v2["note"]


def test_projection_from_a_paper_scale_run_is_tokens_over_throughput(world):
    # A run of the paper's own model (preset with a released LM): the FLOP ratio is 1, so the
    # projection is 5B tokens at the measured rate per GPU.
    path = world.res / "runs" / "r12" / "pretrain" / "summary.json"
    s = json.loads(path.read_text())
    s["train_config"] = {"preset": "open-qwen2vl"}
    s["loss_tokens"] = s["tokens"] * 21 / 166  # caption + EOS of 144 + 20 + 2, as the formula assumes
    s["attn_pairs"] = s["tokens"] * 4097 / 2  # full causal 4096-token sequences, as the reference
    path.write_text(json.dumps(s))
    cfg = {**CONFIG, "report": {"projection": {"text_tokens_per_image": 20}}}
    r12 = next(r for r in compute.projection_rows(cfg, world.pretrain) if r["run"] == "r12")
    assert r12["gpu_h"] == pytest.approx(5e9 / 1200 / 3600)


def test_projection_without_packed_stats_says_so(world):
    pretrain = {**world.pretrain, "r12": {**world.pretrain["r12"], "packed_stats": "results/packed/gone/stats.json"}}
    rows = {r["run"]: r for r in compute.projection_rows(CONFIG, pretrain) if r["row_type"] == "projection"}
    assert rows["r12"]["note"].startswith("not projected")
    assert math.isnan(rows["r12"]["gpu_h"])


def test_measured_trained_parts():
    s = summary("r", "pretrain")
    assert compute.trained_parts(s, ["lm"]) == ("projector", "lm")
    s["trainable_params"] = sum(TOY_PARAMS[k] for k in ("vision", "projector", "lm"))
    assert compute.trained_parts(s, ["lm"]) == ("vision", "projector", "lm")
    del s["trainable_params"]
    assert compute.trained_parts(s, ["lm"]) == ("lm",)


# ---------------------------------------------------------------------------------------- tables

def test_table4_paper_rows_only_without_a_run(world):
    df = tables.build("table4", {k: v for k, v in CONFIG.items() if k not in ("runs", "table4_run")}, {})
    assert list(df.columns) == tables.COLUMNS
    assert (df["scale"] == "paper").all() and (df["protocol"] == "paper").all()
    ours = df.set_index("row").loc["Open-Qwen2VL-2B"]
    assert ours["MMBench"] == 80.9 and ours["pretrain_gpu_hours"] == 220 and ours["pretrain_device"] == "A100-40G"
    assert "442 (v1)" in ours["source"]
    assert df[tables.PROVENANCE].isna().all().all()  # provenance belongs to reproduced rows
    # The paper's Table 4 model is the MAmmoTH-VL-10M one; its baselines are others' models.
    assert ours["sft_data"] == "MAmmoTH-VL-10M (single-image)"
    assert df.set_index("row").loc["Qwen2-VL-2B-Instruct", "sft_data"] == "its own"


def test_table4_sets_a_reproduction_beside_the_same_mixtures_table3_row(world):
    """The final run's mixture (1+2 here) as the paper fine-tuned it on LLaVA-665k, and the SFT
    data of the reproduced rows, so like is read against like."""
    df = tables.build("table4", {**CONFIG, "sft_data": {"path": "data/llava.json", "name": "LLaVA-665k"}},
                      {"r12": world.records["r12"]}).set_index("row")
    same = df.loc["Open-Qwen2VL-2B (1+2, Table 3)"]
    assert same["MMBench"] == 75.6 and same["sft_data"] == "LLaVA-665k" and same["scale"] == "paper"
    assert same["table"] == "table4" and same["source"].endswith("Table 3")
    assert set(df.loc["r12", "sft_data"]) == {"LLaVA-665k"}
    toy = tables.build("table4", CONFIG, {"r12": world.records["r12"]})
    assert set(toy.loc[toy["run"] == "r12", "sft_data"]) == {"toy conversations (generated)"}
    assert tables.sft_data_name({"sft_data": {"path": "x/mammoth_si_10M.json"}}) == "mammoth_si_10M.json"


def test_table4_reproduced_rows_with_provenance(world):
    df = tables.build("table4", CONFIG, {"r12": world.records["r12"]})
    assert list(df.loc[df["scale"] == "toy", "seed"]) == ["mean", 0, "mean", 0]
    ours = df[(df["scale"] == "toy") & (df["seed"] == "mean")].set_index("protocol")
    assert list(ours.index) == ["paper", "lmms"]
    assert (ours["run"] == "r12").all() and (ours["row"] == "r12").all()
    for name, (p, l) in SCORES.items():
        assert ours.loc["paper", name] == pytest.approx(p)
        assert ours.loc["lmms", name] == pytest.approx(l)
    assert ours.loc["paper", "avg_5"] == pytest.approx(np.mean([v[0] for v in SCORES.values()]), abs=0.01)
    # The headline metric's verdict; a descriptive metric's null verdict lists nothing.
    assert ours.loc["paper", "not_above_chance"] == "MathVista"
    assert ours.loc["paper", "pretrain_tokens"] == "7.2M"
    assert ours.loc["paper", "pretrain_gpu_hours"] == pytest.approx(2.0)
    assert ours.loc["paper", "pretrain_device"] == "NVIDIA H100 80GB HBM3"
    assert ours.loc["paper", "pretrain_data"] == "ccs+datacomp (1+2), 100 pairs"
    # Provenance on every reproduced row.
    assert ours["code_version"].eq("abc123").all()  # from the upstream manifest
    assert ours["config_hash"].str.fullmatch(r"[0-9a-f]{16}").all()
    lock = hashlib.sha256((REPO / "requirements.lock").read_bytes()).hexdigest()[:16]
    assert ours["lock_hash"].eq(lock).all()
    assert ours["container_image"].fillna("").eq("").all()  # none ran here: empty, not guessed
    pope = world.res / "runs" / "r12" / "eval" / "POPE.json"
    assert f"results/runs/r12/eval/POPE.json:{hashlib.sha256(pope.read_bytes()).hexdigest()[:16]}" in ours.loc["paper", "input_hashes"]
    assert "results/mixtures/ccs+datacomp/manifest.json:" in ours.loc["paper", "input_hashes"]
    # The report section is presentation only: it does not change the config hash.
    other = tables.build("table4", {**CONFIG, "report": {"paper_device": "x"}}, {"r12": world.records["r12"]})
    assert set(other.loc[other["scale"] == "toy", "config_hash"]) == set(ours["config_hash"])


def test_preferred_metric_from_config(world):
    cfg = {**CONFIG, "report": {"metrics": {"POPE": "yes_ratio"}}}
    df = tables.build("table4", cfg, {"r12": world.records["r12"]})
    ours = df[(df["scale"] == "toy") & (df["seed"] == "mean")].set_index("protocol")
    assert ours.loc["paper", "POPE"] == 51.5 and ours.loc["paper", "MMBench"] == 62.0


def test_missing_benchmark_is_empty_and_no_partial_average(world):
    (world.res / "runs" / "r12" / "eval" / "MathVista.json").write_text("[]")  # evaluated, no rows
    df = tables.build("table4", CONFIG, {"r12": world.records["r12"]})
    ours = df[df["scale"] == "toy"]
    assert len(ours) == 4 and ours["MathVista"].isna().all() and ours["avg_5"].isna().all()


def test_table3_rows_of_evaluated_runs_beside_the_paper(world):
    df = tables.build("table3", CONFIG, world.records)
    assert list(df["row"]) == ["1+2", "1+2", "1+2", "1+2", "1+2", "1+3", "1+2+3", "1+4"]
    assert list(df["scale"]) == ["paper", "toy", "toy", "toy", "toy", "paper", "paper", "paper"]
    assert not (df["run"] == "r13").any()  # trained, never evaluated: absent, not filled in
    paper12 = df.iloc[0]
    assert paper12["avg_5"] == pytest.approx(np.mean([75.6, 68.9, 39.6, 28.6, 79.2]), abs=0.01)
    assert paper12["paper_avg_8"] == 55.3
    assert df.iloc[1][tables.PROVENANCE[:3]].notna().all()


def test_seeds_give_a_mean_row_with_std_and_seeds_over_the_bar(world):
    """Three seeds of r12: each seed's row, and the mean row with the std (n - 1) and k/n over the bar."""
    record = dict(world.records["r12"])
    record["seeds"] = [0, 1, 2]
    base = world.res / "runs" / "r12"
    evals = list(record["evals"])
    for seed, shift, below in ((1, 4.0, ("MathVista", "MMBench")), (2, -1.0, ())):
        for name, (p, l) in SCORES.items():
            path = base / f"seed{seed}" / "eval" / f"{name}.json"
            eval_file(path, "r12", name, {"paper": p + shift, "lmms": l + shift}, below=below, seed=seed)
            evals.append(str(path))
    record["evals"] = evals
    record["pretrain_jobs"] = record["pretrain_jobs"] * 3  # the same job record stands for each seed
    df = tables.build("table4", CONFIG, {"r12": record})
    ours = df[(df["scale"] == "toy") & (df["protocol"] == "paper")]
    assert list(ours["seed"]) == ["mean", 0, 1, 2]
    mean = ours.iloc[0]
    values = [SCORES["MMBench"][0] + d for d in (0.0, 4.0, -1.0)]
    assert mean["MMBench"] == pytest.approx(np.mean(values), abs=0.01)
    assert mean["MMBench_std"] == pytest.approx(np.std(values, ddof=1), abs=0.01)
    assert list(ours["MMBench"].iloc[1:]) == pytest.approx(values)
    # MathVista is below the bar in seeds 0 and 1, MMBench in seed 1 only.
    assert mean["MathVista_over_bar"] == "1/3" and mean["MMBench_over_bar"] == "2/3"
    assert mean["POPE_over_bar"] == "3/3"
    assert mean["not_above_chance"] == "MMBench;MathVista"
    assert ours.iloc[2]["not_above_chance"] == "MMBench;MathVista" and ours.iloc[3]["not_above_chance"] == ""
    assert ours.iloc[1][tables.SEED_COLUMNS].isna().all()  # a seed's own row has no spread
    assert mean["pretrain_gpu_hours"] == pytest.approx(2.0)  # per seed, the mean over the seeds


def test_table_cli_and_html(world, tmp_path):
    out, page = tmp_path / "t4.csv", tmp_path / "t4.html"
    tables.main(["table4", "--runs-json", json.dumps({"r12": world.records["r12"]}), "--config-json", json.dumps(CONFIG),
                 "--out", str(out), "--html", str(page)])
    df = pd.read_csv(out)
    text = page.read_text()
    assert text.count('<tr class="paper">') == (df["scale"] == "paper").sum() == 5  # Table 4's, the 1+2 row
    assert text.count('<tr class="repro">') == (df["scale"] == "toy").sum() == 4  # mean and seed 0, 2 protocols
    assert "Provenance of reproduced rows" in text and "80.9" in text


# ----------------------------------------------------------------------------------------- plots

def test_plots(world, tmp_path):
    for stage, base in (("pretrain", 5.0), ("sft", 2.0)):
        log = world.res / "runs" / "r12" / stage / "train_log.jsonl"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("".join(json.dumps({"step": i + 1, "loss": base / (1 + i), "lr": 1e-3, "tokens": 1000,
                                           "tokens_per_s": 900.0, "grad_norm": 1.0}) + "\n" for i in range(20)))
    t3, c = tmp_path / "t3.csv", tmp_path / "c.csv"
    tables.build("table3", CONFIG, world.records).to_csv(t3, index=False)
    compute.build({"jobs": world.jobs, "pretrain": world.pretrain}, CONFIG).to_csv(c, index=False)
    out = tmp_path / "plots"
    manifest(world.res / "runs" / "r12" / "sft" / "manifest.json", "sft", 20_000, "tokens")
    for stage in ("pretrain", "sft"):  # the trainer lists its log among the manifest's files
        path = world.res / "runs" / "r12" / stage / "manifest.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "files": {"train_log.jsonl": "0" * 64}}))
    logs = {run: {stage: str(world.res / "runs" / run / stage / "manifest.json") for stage in ("pretrain", "sft")}
            for run in ("r12", "r13")}
    plots.main(["--table3", str(t3), "--compute", str(c), "--train-manifests-json", json.dumps(logs),
                "--out-dir", str(out)])
    for name in plots.PLOTS.values():
        img = np.asarray(Image.open(out / name).convert("RGB"))
        assert img.shape[0] > 200 and img.shape[1] > 600
        assert img.std() > 10  # something was drawn, not a blank canvas
    # The loss panels draw r12's curve (matplotlib's first colour); the scores panel both bar colours.
    loss = np.asarray(Image.open(out / plots.PLOTS["loss"]).convert("RGB")).reshape(-1, 3)
    assert (np.abs(loss.astype(int) - (0x1F, 0x77, 0xB4)).sum(axis=1) < 6).sum() > 300
    scores = np.asarray(Image.open(out / plots.PLOTS["scores"]).convert("RGB")).reshape(-1, 3)
    for rgb in ((0x9B, 0xB7, 0xD4), (0xE3, 0xA1, 0x3B)):
        assert (np.abs(scores.astype(int) - rgb).sum(axis=1) < 6).sum() > 200, rgb


def test_plots_before_any_run(tmp_path):
    t3, c = tmp_path / "t3.csv", tmp_path / "c.csv"
    tables.build("table3", {}, {}).to_csv(t3, index=False)
    pd.DataFrame(columns=compute.COLUMNS).to_csv(c, index=False)
    plots.main(["--table3", str(t3), "--compute", str(c), "--out-dir", str(tmp_path)])
    assert all((tmp_path / n).stat().st_size > 1000 for n in plots.PLOTS.values())


# ----------------------------------------------------------------------------------------- rules

def effective_config(configfile):
    """The config Snakemake runs with: the given file alone (a --configfile replaces
    config/default.yaml, the Snakefile says), validated."""
    from oqvl.config import load

    return load(configfile)



def test_report_rules_in_the_dag(tmp_path):
    ci = REPO / "config" / "ci.yaml"
    proc = snakemake(tmp_path, "-n", "results/table3.csv", "results/compute.csv",
                     "results/plots/compute_by_stage.png", configfile=ci)
    out = proc.stdout + proc.stderr
    # The tables and the accounting wait for every packed mixture, whatever runs are configured.
    n_mixtures = len(effective_config(ci)["mixtures"])
    for rule, count in (("compute", 1), ("table3", 1), ("plots", 1), ("pack", n_mixtures)):
        assert out.count(f"rule {rule}:") == count, rule


def test_manifests_record_the_container_image(tmp_path, monkeypatch):
    from oqvl.manifest import write_manifest

    (tmp_path / "f.txt").write_text("x")
    monkeypatch.delenv("APPTAINER_CONTAINER", raising=False)
    monkeypatch.delenv("SINGULARITY_CONTAINER", raising=False)
    def write():
        return write_manifest(tmp_path / "m.json", "s", work=(1, "pairs"), config={"a": 1}, files=[tmp_path / "f.txt"])

    assert write()["container_image"] is None
    monkeypatch.setenv("APPTAINER_CONTAINER", "localhost/oqvl-model:abc")
    assert write()["container_image"] == "localhost/oqvl-model:abc"


def test_manifests_record_work_config_values_and_library_versions(tmp_path):
    from oqvl.manifest import write_manifest

    (tmp_path / "f.txt").write_text("x")
    m = write_manifest(tmp_path / "m.json", "pack", work=(100, "documents"), config={"context_len": 512},
                       files=[tmp_path / "f.txt"], device="cuda", gpus=2)
    on_disk = json.loads((tmp_path / "m.json").read_text())
    assert on_disk == m
    assert m["work"] == {"amount": 100.0, "unit": "documents"} and m["device"] == {"type": "cuda", "gpus": 2}
    assert m["config"] == {"context_len": 512} and len(m["config_hash"]) == 16
    assert m["files"] == {"f.txt": hashlib.sha256(b"x").hexdigest()}
    from importlib.metadata import version
    assert m["versions"]["pandas"] == version("pandas") and m["versions"]["python"].count(".") == 2


def test_summary_from_the_declared_files(world, tmp_path):
    from oqvl.report import summary as summary_md

    t4 = tmp_path / "t4.csv"
    tables.build("table4", CONFIG, {"r12": world.records["r12"]}).to_csv(t4, index=False)
    out = tmp_path / "summary.md"
    summary_md.main(["--table4", str(t4), "--runs-json", json.dumps({"r12": world.records["r12"]}),
                     "--jobs-json", json.dumps(world.jobs), "--config-json", json.dumps(CONFIG), "--out", str(out)])
    text = out.read_text()
    assert text.startswith("# Summary: `r12` at toy scale")
    assert "snakemake --cores all results/table4.csv" in text
    # The run's scores with chance and control; bold where above both; the paper's row beside them.
    rows = {tuple(c.strip() for c in line.split("|")[1:4]): line for line in text.splitlines() if line.startswith("| ")}
    seed0 = rows[("paper", "test", "0")]
    assert "**62.0** (25.0, 26.0)" in seed0 and "30.0 (25.0, 26.0)" in seed0  # MathVista below
    # the mean over the seeds with the seeds over the bar (one seed: no spread)
    mean = rows[("paper", "test", "mean")]
    assert "| 62.0 [1/1] |" in mean and "| 30.0 [0/1] |" in mean
    assert "80.9" in rows[("paper's Open-Qwen2VL-2B", "", "")]
    # Every job with its wall time and work, from the benchmark files and manifests.
    assert "| pretrain[run=r12] | NVIDIA H100 80GB HBM3 | 3600 | 7200000 tokens |" in text
    assert f"{len(world.jobs)} jobs" in text and "code version: `abc123`" in text
