"""Manifests: what a stage did, from what, with which code, config and libraries.

Every job writes one manifest beside its output (`manifest_path`): the work it did (one amount
and its unit: pairs scored, documents packed, tokens trained, samples evaluated), its counts, the
resolved config values it ran with (and their hash), the sha256 of each output file, the inputs
it read, the versions of the libraries it used, and the code version. The report reads these
manifests, and nothing else, to say what each job did.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from . import __version__
from .io import sha256_file, write_json

REPO_ROOT = Path(__file__).resolve().parents[2]
MANIFEST = "manifest.json"
FILE_SUFFIXES = (".parquet", ".json", ".jsonl", ".csv", ".md", ".tsv")  # what a file output ends with
# The distributions whose versions decide what a stage computes (absent ones are left out).
LIBRARIES = ("torch", "transformers", "open_clip_torch", "lmms_eval", "img2dataset", "webdataset",
             "tokenizers", "safetensors", "numpy", "pandas", "pyarrow", "pillow")


def manifest_path(output: str | Path) -> Path:
    """Where the manifest of the job writing `output` lies: inside an output folder, beside a file."""
    output = Path(output)
    if output.suffix not in FILE_SUFFIXES:  # a folder output (shards, a model directory, a mixture)
        return output / MANIFEST
    return output.with_name(f"{output.stem}.{MANIFEST}")


def code_version() -> str:
    """`git describe` of the harness checkout (with -dirty), else the package version."""
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True, text=True, timeout=10, check=True,
        )
        return out.stdout.strip() or __version__
    except (OSError, subprocess.SubprocessError):
        return __version__


def container_image() -> str | None:
    """The image this process runs in, as apptainer (or the podman wrapper) tells it; None on the host."""
    return os.environ.get("APPTAINER_CONTAINER") or os.environ.get("SINGULARITY_CONTAINER") or None


def library_versions() -> dict:
    """Python and the installed versions of LIBRARIES; CUDA and the GPU where torch was used."""
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    torch = sys.modules.get("torch")  # only a stage that imported torch reports its device
    if torch is not None and torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


# The SLURM allocation a job ran in, as its environment gives it (compute.csv cross-checks the
# GPU-hours against SLURM's own accounting of these job ids).
SLURM_ENV = {"job_id": "SLURM_JOB_ID", "nodes": "SLURM_JOB_NUM_NODES", "gpus_on_node": "SLURM_GPUS_ON_NODE",
             "cpus_on_node": "SLURM_CPUS_ON_NODE", "partition": "SLURM_JOB_PARTITION"}


def slurm_allocation() -> dict:
    """{job_id, nodes, gpus_on_node, cpus_on_node, partition} of the SLURM job running this, or {}."""
    if "SLURM_JOB_ID" not in os.environ:
        return {}
    return {k: os.environ[v] for k, v in SLURM_ENV.items() if v in os.environ}


def write_manifest(
    path: str | Path, stage: str, *, work: tuple[float, str], config: dict,
    files: list[str | Path] | dict[str | Path, str] = (), counts: dict | None = None,
    inputs: dict[str, str] | None = None,
    device: str = "cpu", gpus: int = 0,
) -> dict:
    """Write a job's manifest; `files` are hashed and listed relative to the manifest's folder
    (or map each path to its sha256, hashed before the file was moved there).

    `work` is (amount, unit), e.g. (3000, "pairs"); `config` the values the job ran with; `device`
    and `gpus` what the job computed on (the GPU-hour accounting trusts a job that used GPUs)."""
    from .config import config_hash

    path = Path(path)
    base = path.parent
    hashes = ({str(f): h for f, h in files.items()} if isinstance(files, dict)
              else {str(f): sha256_file(f) for f in files})
    amount, unit = work
    manifest = {
        "stage": stage,
        "work": {"amount": float(amount), "unit": unit},
        "device": {"type": device, "gpus": int(gpus)},
        "counts": counts or {},
        "config": config,
        "config_hash": config_hash(config),
        "files": {os.path.relpath(f, base): hashes[f] for f in sorted(hashes)},
        "inputs": inputs or {},
        "versions": library_versions(),
        "code_version": code_version(),
        "container_image": container_image(),
        "slurm": slurm_allocation(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(path, manifest)
    return manifest


def args_config(args) -> dict:
    """An argparse namespace as the JSON config fragment a stage ran with (paths as strings)."""
    def plain(v):
        if isinstance(v, (str, int, float, bool)) or v is None:
            return v
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        return str(v)

    return {k: plain(v) for k, v in sorted(vars(args).items()) if k != "func"}
