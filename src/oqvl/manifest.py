"""Manifests: what a stage wrote, from what, with which code and config.

Every stage writes `manifest.json` beside its output: counts, the sha256 of each output file,
the config hash of the parameters it used, and the code version.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from . import __version__

REPO_ROOT = Path(__file__).resolve().parents[2]


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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


def write_json_atomic(path: str | Path, obj) -> None:
    """Write then rename, so a crash never leaves half a file behind."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def container_image() -> str | None:
    """The image this process runs in, as apptainer (or the podman wrapper) tells it; None on the host."""
    return os.environ.get("APPTAINER_CONTAINER") or os.environ.get("SINGULARITY_CONTAINER") or None


def write_manifest(
    path: str | Path, stage: str, files: list[str | Path], counts: dict, params_hash: str,
    inputs: dict[str, str] | None = None,
) -> dict:
    """Write a manifest listing `files` (relative to the manifest's folder) with their sha256."""
    path = Path(path)
    base = path.parent
    manifest = {
        "stage": stage,
        "counts": counts,
        "files": {str(Path(f).relative_to(base)): sha256_file(f) for f in sorted(map(str, files))},
        "config_hash": params_hash,
        "inputs": inputs or {},
        "code_version": code_version(),
        "container_image": container_image(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json_atomic(path, manifest)
    return manifest
