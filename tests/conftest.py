"""Shared fixtures: the repository root and a runner for the workflow in a scratch directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def snakemake(workdir: Path, *args: str, configfile: Path | None = None, check=True, env=None):
    """Run the project's Snakefile with outputs under `workdir` (never the checkout's results/)."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
           "--directory", str(workdir), "--workflow-profile", str(REPO / "profiles" / "default"),
           "--cores", "2", *args]
    if configfile:
        cmd += ["--configfile", str(configfile)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def lmms_eval_cli(launcher: list[str], ckpt: Path, tasks: list[str], task_dir: Path, out: Path,
                  limit: int, model: str = "oqvl", model_args: str = "max_new_tokens=4") -> dict:
    """lmms-eval's command line on a model (default the `oqvl` model), offline; its results JSON."""
    import json

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               LMMS_EVAL_DATASETS_CACHE=str(out / "cache"))
    proc = subprocess.run(
        [*launcher, "--model", model, "--model_args", ",".join(filter(None, [f"pretrained={ckpt}", model_args])),
         "--include_path", str(task_dir), "--tasks", ",".join(tasks), "--batch_size", "4",
         "--limit", str(limit), "--output_path", str(out), "--log_samples",
         "--verbosity", "DEBUG"],  # DEBUG: lmms-eval re-raises errors instead of only logging them
        capture_output=True, text=True, env=env, cwd=out.parent, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (results,) = out.rglob("*_results.json")
    return json.loads(results.read_text())


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


CI_CONFIG = REPO / "config" / "ci.yaml"


def ci_targets() -> list[str]:
    """What the CI run builds: table 4 (and the summary), every packed mixture, the filter report."""
    import yaml

    mixtures = yaml.safe_load(CI_CONFIG.read_text())["mixtures"]
    return ["results/table4.csv", *(f"results/packed/{m}/stats.json" for m in mixtures),
            "results/filter/quality/report.md"]


@pytest.fixture(scope="session")
def ci_run(tmp_path_factory) -> Path:
    """The workflow on config/ci.yaml, run once per session in a scratch directory (its root)."""
    root = tmp_path_factory.mktemp("ci_run")
    snakemake(root, *ci_targets(), configfile=CI_CONFIG)
    return root


def toy_clip_checkpoint(out: Path) -> Path:
    """A toy CLIP checkpoint trained for 2 steps: weights of the real format, quickly."""
    from oqvl.filter import train_clip

    train_clip.main(["--out", str(out), "--n-pairs", "32", "--steps", "2", "--batch-size", "16",
                     "--seed", "0", "--threads", "1", "--log-every", "1"])
    return out


def raw_toy_source(out: Path, source: str, n_pairs: int, seed: int, rates: dict | None = None,
                   samples_per_shard: int = 20) -> Path:
    """A real raw toy source: pairs generated, then downloaded by img2dataset into shards under out."""
    import json

    from oqvl.raw import download, generate

    options = {"image_size": 512, "resize_mode": "keep_ratio", "resize_only_if_bigger": True,
               "encode_format": "jpg", "encode_quality": 95, "samples_per_shard": samples_per_shard,
               "processes": 1, "threads": 4, "timeout_s": 10, "retries": 0}
    generate.main(["--source", source, "--n-pairs", str(n_pairs), "--rates", json.dumps(rates or {}),
                   "--seed", str(seed), "--out", str(out)])
    download.main(["--pairs", str(out / "pairs.parquet"), "--out", str(out / "shards"),
                   "--options", json.dumps(options), "--accounting", str(out / "accounting.json")])
    return out


def toy_mixture(root: Path, n_pairs: int, mix_per_shard: int, seed: int = 11, rates: dict | None = None,
                samples_per_shard: int = 20) -> Path:
    """A real mixture of one toy source (every pair kept): raw generation, img2dataset, reshard.
    Returns the mixture's shard folder."""
    import pandas as pd

    from oqvl import mixture
    from oqvl.shards import iter_samples, sample_meta, shard_paths

    raw = raw_toy_source(root / "ccs", "ccs", n_pairs, seed, rates, samples_per_shard)
    uids = [str(sample_meta(s)["uid"]) for s in iter_samples(shard_paths(raw / "shards"))]
    pd.DataFrame({"uid": uids}).to_parquet(root / "kept.parquet", index=False)
    counts = mixture.build_mixture([("ccs", raw / "shards", root / "kept.parquet")], root / "mix", mix_per_shard)
    assert counts["total"] == len(uids)
    return root / "mix" / "shards"
