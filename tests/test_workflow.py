"""The workflow end to end on the CI subset config, in a scratch directory."""

import json
import subprocess
import sys

import pandas as pd
import pytest

from conftest import CI_CONFIG, REPO, ci_targets, snakemake


def test_dry_run_plans_every_stage(tmp_path):
    proc = snakemake(tmp_path, "-n", "results/table4.csv", configfile=CI_CONFIG)
    out = proc.stdout + proc.stderr
    for rule in ("generate_pairs", "download", "table4"):
        assert rule in out


def test_default_config_plans_every_seed_on_both_reported_splits(tmp_path):
    """The default trains three seeds of the table-4 run and evaluates each on test and heldout
    (the CI subset evaluates test only); dev is written but evaluated on request only."""
    proc = snakemake(tmp_path, "-n", "results/table4.csv", configfile=REPO / "config" / "default.yaml")
    out = proc.stdout + proc.stderr
    for seed in (0, 1, 2):
        assert f"wildcards: run=ccs+datacomp, seed={seed}\n" in out  # pretrain and sft
        for split in ("test", "heldout"):  # one job per split: every benchmark
            assert f"wildcards: run=ccs+datacomp, seed={seed}, split={split}\n" in out
            assert f"--benchmarks MMBench,SEEDBench,MMStar,MathVista,POPE --data-dir results/eval_data/{split} " in out
    assert out.count("\nrule evaluate:") == 6
    assert "split=dev" not in out and "results/eval_data/dev/POPE.parquet" in out
    dev = snakemake(tmp_path, "-n", "results/runs/ccs+datacomp/seed1/eval/dev/POPE.json",
                    configfile=REPO / "config" / "default.yaml")
    assert "seed=1, split=dev\n" in dev.stdout + dev.stderr


def paper_downloads(root, mlm_import: bool = False):
    """Placeholders at every path config/full.yaml names (the releases a user downloads first):
    pair lists in the release columns, weight files, model folders, benchmark folders.
    mlm_import: the official MLM-Filter scoring outputs in place of the released model."""
    yaml = __import__("yaml")
    cfg = yaml.safe_load((REPO / "config" / "full.yaml").read_text())
    mlm = cfg["filter"]["mlm"]
    if mlm_import:
        del mlm["release"]
        mlm["scores_dir"] = "data/mlm_filter"
    for src in cfg["sources"].values():
        path = root / src["pair_list"]
        path.parent.mkdir(parents=True, exist_ok=True)
        pairs = pd.DataFrame({"url": ["http://127.0.0.1:9/x.jpg"], "caption": ["c"], "text": ["c"], "uid": ["u"]})
        if src.get("format") == "json":
            path.write_text(pairs.to_json(orient="records"))
        elif src.get("format") == "parquet_dir":
            path.mkdir(exist_ok=True)
            pairs.to_parquet(path / "0000.parquet")
        else:
            pairs.to_parquet(path)
    files = [cfg["filter"]["sources"]["datacomp"]["uid_list"], cfg["filter"]["clip"]["pretrained"],
             cfg["model"]["vision_weights"], cfg["sft_data"]["path"],
             *(r["sft_data"]["path"] for r in cfg["runs"].values() if "sft_data" in r),
             *(f"{r['model_dir']}/config.json" for r in cfg["released"].values() if "model_dir" in r)]
    folders = [cfg["model"]["lm_path"], cfg["model"]["tokenizer"]["path"], *cfg["evaluate"]["real"].values(),
               *(r["run_dir"] for r in cfg["released"].values() if "run_dir" in r),
               *((f"{mlm['scores_dir']}/{s}" for s in mlm["sources"]) if mlm_import
                 else (mlm["release"]["path"], mlm["release"]["vision"]))]
    for f in files:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_bytes(b"")
    for d in folders:
        (root / d).mkdir(parents=True, exist_ok=True)
    cfg_path = root / "full.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False) if mlm_import
                        else (REPO / "config" / "full.yaml").read_text())
    return cfg_path


def test_paper_config_plans_the_same_dag(tmp_path):
    # Paper scale imports released pair lists instead of generating them; same rules otherwise.
    cfg = paper_downloads(tmp_path)
    proc = snakemake(tmp_path, "-n", "results/table4.csv", configfile=cfg)
    out = proc.stdout + proc.stderr
    assert "import_pairs" in out and "generate_pairs" not in out
    # The paper's model is trained on mixture 1+4: the released MLM-Filter, converted, scores
    # DataComp on a GPU, then its kept set is united with DFN.
    assert "rule convert_mlm_filter:" in out and "rule mlm_score:" in out and "rule keep_union:" in out
    assert "rule mlm_import:" not in out
    # Paper scale uses released weights and tokenizer: nothing toy is trained or built.
    for toy_rule in ("train_clip", "tokenizer", "filter_quality", "sft_data", "train_mlm_filter"):
        assert f"rule {toy_rule}:" not in out
    # The released model: converted, then evaluated like a run (no training), on every benchmark.
    assert "rule convert_released:" in out and "wildcards: name=Open-Qwen2VL-2B" in out
    assert "rule evaluate_released:" in out and "wildcards: name=Open-Qwen2VL-2B, split=test\n" in out
    for b in ("MMBench", "SEEDBench", "MMStar", "MathVista", "POPE"):
        assert f"results/released/Open-Qwen2VL-2B/eval/test/{b}.json" in out, b
    # The Qwen2-VL baseline: evaluated as downloaded (no conversion), on every benchmark.
    assert "wildcards: name=Qwen2-VL-2B-Instruct, split=test\n" in out
    assert "wildcards: name=Qwen2-VL-2B-Instruct\n" not in out
    assert out.count("\nrule evaluate_released:") == 2 and out.count("\nrule convert_released:") == 1
    for b in ("MMBench", "SEEDBench", "MMStar", "MathVista", "POPE"):
        assert f"results/released/Qwen2-VL-2B-Instruct/eval/test/{b}.json" in out, b


def test_paper_config_evaluates_the_qwen2_vl_download_itself(tmp_path):
    cfg = paper_downloads(tmp_path)
    proc = snakemake(tmp_path, "-n", "-p", "results/table4.csv", configfile=cfg)
    out = proc.stdout + proc.stderr
    (job,) = [line for line in out.splitlines() if "-m oqvl.evaluate " in line and "Qwen2-VL-2B-Instruct" in line]
    assert "--checkpoint models/Qwen2-VL-2B-Instruct --run Qwen2-VL-2B-Instruct --split test" in job
    assert "--device cuda" in job and "--out results/released/Qwen2-VL-2B-Instruct/eval/test" in job
    # its evaluation rows are table4's inputs, beside the converted Open-Qwen2VL checkpoint's
    table4 = out[out.index("\nrule table4:"):]
    table4 = table4[:table4.index("\n\n")]
    assert "results/released/Qwen2-VL-2B-Instruct/eval/test/POPE.json" in table4
    assert "results/released/Qwen2-VL-2B-Instruct/eval/test/manifest.json" in table4


def test_paper_config_plans_the_final_model_and_the_isolation_ablation(tmp_path):
    # table4's run fine-tunes the 1+4 pretraining on MAmmoTH-VL (no pretraining of its own); the
    # isolation ablation pretrains the same mixture again with document isolation.
    cfg = paper_downloads(tmp_path)
    proc = snakemake(tmp_path, "-n", "-p", "results/table4.csv", "results/table3.csv", configfile=cfg)
    out = proc.stdout + proc.stderr
    sft = [line for line in out.splitlines() if "-m oqvl.train.launch " in line and " -- sft " in line]
    mammoth = next(line for line in sft if "runs/ccs+datacomp_mlm+mammoth/seed7/sft" in line)
    assert "--init-from results/runs/ccs+datacomp_mlm/seed7/pretrain/final" in mammoth
    assert "--seed 7" in mammoth  # one chain per run at the reference's seed
    assert "--sft-data data/MAmmoTH-VL-Instruct-12M/mammoth_si_10M_simple.jsonl" in mammoth
    assert "--image-root data/MAmmoTH-VL-Instruct-12M/single_image_data" in mammoth
    assert "--too-long truncate" in mammoth and "--document-tokens reference" in mammoth
    assert "--steps 150000" in mammoth and "--steps 150000" not in next(
        line for line in sft if "runs/ccs+datacomp_mlm/seed7/sft" in line)
    pretrain = [line for line in out.splitlines() if "-m oqvl.train.launch " in line and " -- pretrain " in line]
    assert not any("runs/ccs+datacomp_mlm+mammoth/" in line for line in pretrain)
    isolated = next(line for line in pretrain if "runs/ccs+datacomp_mlm+isolation/" in line)
    assert "--doc-isolation" in isolated.replace("--no-doc-isolation", "")
    plain = next(line for line in pretrain if "runs/ccs+datacomp_mlm/" in line)
    assert "--no-doc-isolation" in plain and "--document-tokens reference" in plain
    pack = next(line for line in out.splitlines() if " -m oqvl.pack " in line)
    assert "--document-tokens reference" in pack


def test_paper_config_can_read_the_official_mlm_filter_outputs(tmp_path):
    cfg = paper_downloads(tmp_path, mlm_import=True)
    proc = snakemake(tmp_path, "-n", "results/table4.csv", configfile=cfg)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "rule mlm_import:" in out and "rule keep_mlm:" in out
    assert "rule mlm_score:" not in out and "rule convert_mlm_filter:" not in out


def test_paper_config_trains_on_8_processes_from_the_released_models(tmp_path):
    cfg = paper_downloads(tmp_path)
    (tmp_path / "results/packed/ccs+datacomp").mkdir(parents=True)
    (tmp_path / "results/packed/ccs+datacomp/sequences.parquet").write_text("")
    (tmp_path / "results/mixtures/ccs+datacomp/shards").mkdir(parents=True)
    proc = snakemake(tmp_path, "-n", "-p", "results/runs/ccs+datacomp/seed7/sft/final/config.json",
                     "--allowed-rules", "pretrain", "sft", configfile=cfg)
    out = proc.stdout + proc.stderr
    launches = [line for line in out.splitlines() if " -m oqvl.train.launch " in line]
    pretrain = next(line for line in launches if " -- pretrain " in line)
    sft = next(line for line in launches if " -- sft " in line)
    for flag in ("--nodes 1 --nproc-per-node 8 --", "--preset open-qwen2vl", "--lm-path models/Qwen2.5-1.5B-Instruct",
                 "--visual-tokens-pretrain 144", "--visual-tokens-sft 729", "--grad-checkpointing",
                 "--lr 5e-05", "--epochs 1", "--freeze-vision", "--no-doc-isolation", "--betas 0.9 0.999",
                 "--eps 1e-08", "--attention sdpa", "--workers 4", "--no-fused-adamw", "--no-compile"):
        assert flag in pretrain, flag
    for flag in ("--global-batch 128", "--micro-batch 2", "--lr 2e-05", "--weight-decay 0.1", "--betas 0.9 0.999",
                 "--sft-data data/llava_v1_5_mix665k.json", "--image-root data/llava_images"):
        assert flag in sft, flag
    # the preset's file is an input of pretraining: editing it (an init scale) reruns the run
    inputs = next(line for line in out.splitlines() if line.strip().startswith("input: results/packed/"))
    assert str(REPO / "src/oqvl/model/model_configs/open-qwen2vl.json") in inputs


@pytest.mark.slow
def test_ci_config_end_to_end(ci_run):
    cfg = __import__("yaml").safe_load(CI_CONFIG.read_text())
    results = ci_run / "results"
    for source, scfg in cfg["sources"].items():
        acc = json.loads((results / "raw" / source / "accounting.json").read_text())
        assert acc["pairs_in"] == scfg["n_pairs"]
        assert acc["samples_in_shards"] + acc["failures"] == acc["pairs_in"]
        broken = sum(round(scfg["corruption"].get(k, 0) * scfg["n_pairs"])
                     for k in ("broken_truncated", "broken_empty", "broken_not_image"))
        assert acc["failures"] == broken
        # Every job left an extended benchmark record (the GPU-hour accounting reads them).
        bench = pd.read_csv(results / "benchmarks" / "raw" / f"download_{source}.tsv", sep="\t")
        assert {"s", "cpu_time", "max_rss", "threads", "resources"} <= set(bench.columns)
    # The toy CLIP filter, trained for seconds, already keeps true pairs more than corrupted
    # ones: kept precision clears the unfiltered clean rate on every source (seeded run:
    # +0.06 ccs, +0.17 datacomp, +0.11 laion).
    summary = pd.read_csv(results / "filter" / "quality" / "summary.csv")
    quality = summary[summary["filter"] == "clip"].set_index("source")
    assert (quality["precision"] > quality["usable_rate"] + 0.03).all(), quality
    assert quality.loc["datacomp", "precision"] > quality.loc["datacomp", "usable_rate"] + 0.08
    by_kind = pd.read_csv(results / "filter" / "quality" / "by_corruption.csv")
    assert (by_kind.loc[by_kind["corruption"].str.startswith("broken"), "kept"] == 0).all()
    # The MLM-Filter scored every datacomp pair (a status each) and sits in the report beside CLIP;
    # the union keeps at least what either filter keeps.
    mlm = json.loads((results / "filter" / "datacomp" / "mlm_score_stats.json").read_text())
    acc = json.loads((results / "raw" / "datacomp" / "accounting.json").read_text())
    assert mlm["scored"] + mlm["no_score"] + mlm["failed"] == acc["samples_in_shards"]
    assert set(summary.loc[summary["source"] == "datacomp", "filter"]) == {"clip", "colour", "mlm", "union"}
    union = json.loads((results / "filter" / "datacomp" / "kept_union_stats.json").read_text())
    assert union["kept"] == union["kept_a"] + union["kept_b"] - union["both"] >= max(union["kept_a"], union["kept_b"])
    # Every mixture is packed; every kept pair of its sources (its kept set of each) is a document of it.
    for name, mix in cfg["mixtures"].items():
        stats = json.loads((results / "packed" / name / "stats.json").read_text())
        stat_file = {"filter": "kept_stats.json", "mlm": "kept_mlm_stats.json", "union": "kept_union_stats.json"}
        kept = sum(json.loads((results / "filter" / s / stat_file[mix.get("kept", {}).get(s, "filter")]).read_text())["kept"]
                   for s in mix["sources"])
        assert stats["documents_in"] == kept and stats["documents_packed"] == kept
        assert 0.5 < stats["fill_ratio"] <= 1
    # Each seed of the table4 run was pretrained and fine-tuned on 2 processes, and evaluated
    # everywhere; the seeds' weights differ (their own init and data order).
    run = results / "runs" / cfg["table4_run"]
    seeds = cfg["train"]["seeds"]
    assert len(seeds) == 2
    for seed in seeds:
        for stage in ("pretrain", "sft"):
            summary = json.loads((run / f"seed{seed}" / stage / "summary.json").read_text())
            assert summary["world_size"] == cfg["train"]["nproc"] == 2
            assert summary["steps"] == cfg["train"][stage]["steps"] and summary["tokens"] > 0
            log = (run / f"seed{seed}" / stage / "train_log.jsonl").read_text().splitlines()
            assert len(log) == summary["steps"]
            assert (run / f"seed{seed}" / stage / "final" / "model.safetensors").is_file()
            assert (run / f"seed{seed}" / stage / "loss.png").is_file()
        for bench in ("MMBench", "SEEDBench", "MMStar", "MathVista", "POPE"):
            rows = json.loads((run / f"seed{seed}" / "eval" / "test" / f"{bench}.json").read_text())
            assert {r["protocol"] for r in rows} == {"paper", "lmms"}
            assert all(r["run"] == cfg["table4_run"] and r["seed"] == seed and r["split"] == "test" and r["n"] > 0
                       for r in rows)
    weights = [(run / f"seed{s}" / "sft" / "final" / "model.safetensors").read_bytes() for s in seeds]
    assert weights[0] != weights[1]
    table = pd.read_csv(results / "table4.csv", dtype={"seed": str})
    assert {"scale", "protocol", "split", "seed", "MMBench", "POPE", "MMBench_std", "POPE_over_bar"} <= set(table.columns)
    assert (table.loc[table["row"] == "Open-Qwen2VL-2B", "MMBench"] == 80.9).all()
    toy = table[table["scale"] == "toy"]
    assert set(toy["protocol"]) == {"paper", "lmms"} and toy["MMBench"].notna().all()
    assert list(toy["seed"]) == ["mean", "0", "1"] * 2 and set(toy["split"]) == {"test"}
    mean = toy[toy["seed"] == "mean"]
    assert mean["MMBench_over_bar"].str.fullmatch(r"[0-2]/2").all() and mean["MMBench_std"].notna().all()
    # The summary of the run: its scores per seed and over the seeds, every job of its chain, provenance.
    summary = (results / "summary.md").read_text()
    assert summary.startswith(f"# Summary: `{cfg['table4_run']}` at toy scale")
    assert "| paper | test | 0 |" in summary and "| lmms | test | mean |" in summary
    assert "pretrain[run=ccs+datacomp,seed=1]" in summary
    # Every job's manifest says what it did; the accounting reads it.
    pack = json.loads((results / "packed" / "ccs+datacomp" / "manifest.json").read_text())
    packed = json.loads((results / "packed" / "ccs+datacomp" / "stats.json").read_text())
    assert pack["work"]["unit"] == "documents" and pack["work"]["amount"] == packed["documents_packed"]
    assert pack["config"]["context_len"] == 512 and "torch" in pack["versions"]
    # A second run has nothing to do: outputs are complete and up to date.
    proc = snakemake(ci_run, "-n", *ci_targets(), configfile=CI_CONFIG)
    assert "Nothing to be done" in proc.stdout + proc.stderr


@pytest.mark.parametrize("config", ["default.yaml", "full.yaml"])
def test_snakemake_lint_is_clean(tmp_path, config):
    # Toy scale in the checkout itself; paper scale (its own rules) with the downloads in place.
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--lint"]
    if config == "full.yaml":
        cmd += ["--configfile", str(paper_downloads(tmp_path))]
    proc = subprocess.run(cmd, cwd=REPO if config == "default.yaml" else tmp_path, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Congratulations, your workflow is in a good condition!" in out, out[-3000:]
