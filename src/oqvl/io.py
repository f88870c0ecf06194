"""Small file helpers every stage shares: atomic writes and content identities.

A stage never leaves half a file behind: it writes `<name>.tmp` beside the target and renames it
into place (a rename within one folder is atomic on POSIX). A resume key that names model weights
uses `weights_identity`, their content, never their path or mtime: a retrained model under the
same path is a different model. A path read from data is joined with `inside`, so it stays in its
folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def inside(root: str | Path, relative: str, where: str) -> Path:
    """root / relative, refused (one line naming `where`) when data gives an absolute path or one
    that climbs out of root: a dataset names files under its own folder, never elsewhere."""
    # Lexical, not resolved: a dataset folder may hold symlinks to where its images really are.
    norm = os.path.normpath(relative)
    if os.path.isabs(relative) or norm == ".." or norm.startswith(".." + os.sep):
        raise ValueError(f"{where}: path {relative!r} is outside {root}")
    return Path(root) / relative


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a scratch path beside `path`; on success it is renamed onto `path`, on error removed."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.is_file():
            tmp.unlink()


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj) -> None:
    """Indented, key-sorted JSON, written atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_parquet(table, path: str | Path) -> None:
    """A pandas DataFrame (without its index) or a pyarrow Table, written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not isinstance(table, pa.Table):
        table = pa.Table.from_pandas(table, preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# Files of a model folder that define what it computes (weights, configs, tokenizer); logs,
# plots, run records and optimizer state beside them do not.
_MODEL_SUFFIXES = (".safetensors", ".json", ".txt", ".model")
_RUN_RECORDS = ("manifest.json", "summary.json", "state.json", "latest.json", "train_log.jsonl")


def _defines_model(path: Path) -> bool:
    return path.suffix in _MODEL_SUFFIXES and not path.name.endswith(_RUN_RECORDS)


def weights_identity(path: str | Path | None) -> str:
    """The content identity of model weights: sha256 of a file, or of every model file of a folder
    (names and contents, in name order); "none" for no weights; an open_clip tag is its own name."""
    if path is None or str(path) == "":
        return "none"
    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(q for q in p.rglob("*") if q.is_file() and _defines_model(q)):
            h.update(f"{f.relative_to(p).as_posix()}\0{sha256_file(f)}\0".encode())
        return h.hexdigest()
    return f"tag:{path}"  # a named release (e.g. an open_clip pretrained tag), not a local file
