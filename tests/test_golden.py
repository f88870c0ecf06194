"""Golden outputs of the CI run: the names of all its outputs, and the content of the deterministic ones.

The snapshot is tests/golden/ci.json. After a change that is meant to change outputs, regenerate
it and review the diff:

    OQVL_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "golden" / "ci.json"

# Files whose bytes vary between identical runs, and why. Every other output is hashed.
VARYING = {
    # Records of the run itself: timings, timestamps, library versions, the checkout's git state.
    "results/benchmarks/*": "wall and CPU times",
    "results/logs/*": "timings and progress output",
    "*manifest.json": "creation time, code version, library versions",
    "results/table4.csv": "provenance columns: code version and hashes of the manifests",
    "results/summary.md": "job timings",
    "results/report/*": "the tables above, as pages",
    "*/summary.json": "training seconds and throughput",
    "*/train_log.jsonl": "tokens/s per step",
    "*/tensorboard/*": "the training log's numbers, with wall times",
    "*/loss.png": "rendered from the training log's losses, whose last bits follow the CPU's kernels",
    # Image shards: img2dataset writes samples in the order its threads finish and stamps tar
    # members; each sample's url is the absolute path of this run's scratch directory.
    "results/raw/*/pairs.parquet": "file:// urls into this run's scratch directory",
    "results/raw/*/shards/*": "download order, tar mtimes, absolute urls",
    "results/mixtures/*": "the raw shards' urls and tar mtimes",
    # Everything a trained model computed: floating-point sums depend on the CPU's vector width
    # and thread count, so bits differ across machines even where one machine repeats itself.
    "results/filter/clip_model/*": "trained weights",
    "results/filter/*/clip_*": "scores of the trained CLIP model",
    "results/filter/*/kept*": "decisions on those scores",
    "results/filter/*/mlm_*": "scores of the trained MLM-Filter",
    "results/filter/mlm_model/init/*": "the seeded untrained model, saved with safetensors' unordered metadata",
    "results/filter/mlm_model/train/*": "trained weights and their checkpoints",
    "results/filter/quality/*": "precision and recall of those decisions",
    "results/packed/*": "packs the mixture's kept pairs",
    "results/runs/*": "trained weights, checkpoints and the evaluations of them",
}


# Files whose names vary between identical runs: TensorBoard names an event file by its creation
# time, host and process id; the snapshot lists it under a stable name (its content varies too).
EVENT_FILE = re.compile(r"(/tensorboard/events\.out\.tfevents)\..*$")


def varying(path: str) -> bool:
    return any(fnmatch.fnmatch(path, pattern) for pattern in VARYING)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(root: Path) -> dict:
    # A resumed training appends a second event file; both carry the stable name.
    files = sorted({EVENT_FILE.sub(r"\1.TIME.HOST.PID", p.relative_to(root).as_posix())
                    for p in (root / "results").rglob("*") if p.is_file()})
    return {"outputs": files, "hashes": {f: sha256(root / f) for f in files if not varying(f)}}


def diff(old: dict, new: dict) -> list[str]:
    lines = [f"missing output: {f}" for f in sorted(set(old["outputs"]) - set(new["outputs"]))]
    lines += [f"new output: {f}" for f in sorted(set(new["outputs"]) - set(old["outputs"]))]
    lines += [f"content changed: {f}" for f in sorted(set(old["hashes"]) & set(new["hashes"]))
              if old["hashes"][f] != new["hashes"][f]]
    lines += [f"now hashed (was varying or absent): {f}" for f in sorted(set(new["hashes"]) - set(old["hashes"]))
              if f in old["outputs"]]
    return lines


def same_tensors(a: Path, b: Path) -> bool:
    """Bitwise the same weights (the files' metadata order may differ)."""
    from safetensors.torch import load_file

    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(x[k].equal(y[k]) for k in x)


def same_run(root: Path, reference: Path, ignore: str = "") -> list[str]:
    """What differs between two runs of the same DAG on one machine: output names, deterministic
    files byte for byte, and the trained weights and evaluations too (same CPU, same threads).
    `ignore`: a prefix of outputs only one run has by design (its SLURM logs)."""
    new, old = snapshot(root), snapshot(reference)
    new["outputs"] = [f for f in new["outputs"] if not (ignore and f.startswith(ignore))]
    problems = diff(old, new)
    models = [f for f in old["outputs"] if f.endswith("/model.safetensors") and ("/final/" in f or "/init/" in f)]
    assert len(models) >= 4  # the MLM-Filter's init and final, the run's pretrain and sft
    problems += [f"weights differ: {f}" for f in models if (root / f).is_file() and not same_tensors(root / f, reference / f)]
    problems += [f"evaluation differs: {f}" for f in old["outputs"] if f.startswith("results/runs/")
                 and f.endswith("/eval/tidy.csv") and (root / f).is_file() and sha256(root / f) != sha256(reference / f)]
    return problems


@pytest.mark.slow
def test_ci_run_matches_its_golden_snapshot(ci_run):
    new = snapshot(ci_run)
    if os.environ.get("OQVL_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(new, indent=1, sort_keys=True) + "\n")
    old = json.loads(GOLDEN.read_text())
    problems = diff(old, new)
    assert not problems, ("the CI run's outputs differ from tests/golden/ci.json (regenerate with "
                          "OQVL_UPDATE_GOLDEN=1 if the change is meant):\n" + "\n".join(problems[:60]))
    assert len(new["hashes"]) > 100  # the deterministic stages are hashed, not waved through


def test_the_diff_is_readable():
    old = {"outputs": ["a", "b", "c"], "hashes": {"a": "1", "b": "2"}}
    new = {"outputs": ["a", "c", "d"], "hashes": {"a": "9", "c": "3"}}
    assert diff(old, new) == ["missing output: b", "new output: d", "content changed: a",
                              "now hashed (was varying or absent): c"]
    assert varying("results/runs/x/sft/final/model.safetensors") and not varying("results/raw/ccs/truth.parquet")
