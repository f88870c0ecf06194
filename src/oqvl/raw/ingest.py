"""Ingest released, already filtered webdataset shards (Open-Qwen2VL-Data) as a source's raw stage.

    python -m oqvl.raw.ingest --shards data/Open-Qwen2VL-Data/ccs_webdataset --revision <sha> \
        --samples results/raw/ccs/samples.parquet --accounting results/raw/ccs/accounting.json

The shards are img2dataset's output (numbered .tar files of key.jpg, key.txt and key.json per
sample, a .parquet per shard); they are read where they lie, never copied. Every sample of every tar is
checked: it needs an image (jpg, jpeg, png or webp, whose header PIL recognises and whose size is
within oqvl.reasons.MAX_PIXELS), a non-empty UTF-8 caption (txt) and a uid (its json's, else its
key) that no other sample has. A sample that fails is listed with its reason (a name from
oqvl.reasons) and the message behind it, and so is a sample a shard's table lists as downloaded
but its tar lacks. SAMPLES holds one row per sample (uid, shard, key, status, reason, message); ACCOUNTING the
counts in the download stage's terms (pairs_in = samples_in_shards + failures), so the filter
(method none or uid_list) and the mixture read an ingested source as they read a downloaded one.
The job's manifest lies beside ACCOUNTING.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from ..images import open_image
from ..io import write_json, write_parquet
from ..manifest import args_config, manifest_path, write_manifest
from ..shards import sample_uid

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
IMAGE_HEAD = 1 << 16
WDS_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's split of a member into key and extension


class _Hashing(io.RawIOBase):
    """A file read once for two ends: tarfile's samples and the manifest's sha256."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def readable(self):
        return True

    def readinto(self, buf):
        n = self.f.readinto(buf)
        self.sha.update(memoryview(buf)[:n])
        return n


def tar_samples(path: Path) -> tuple[dict[str, dict[str, bytes]], str]:
    """key -> {extension: bytes} of one tar (a sample = the files sharing a key), and its sha256."""
    samples: dict[str, dict[str, bytes]] = {}
    try:
        with open(path, "rb") as f:
            reader = _Hashing(f)
            with tarfile.open(fileobj=reader, mode="r|*") as tf:  # streamed: one read of a large shard
                for member in tf:
                    named = WDS_NAME.match(member.name)
                    if not member.isfile() or not named:
                        continue
                    key, ext = named.group(1), named.group(2).lower()
                    data = tf.extractfile(member).read()
                    # an image's first bytes hold its header, all the check reads: a shard's
                    # images are never all in memory at once
                    samples.setdefault(key, {})[ext] = data[:IMAGE_HEAD] if ext in IMAGE_EXTS else data
            while reader.read(1 << 20):  # the tar's end padding, so the hash is the file's
                pass
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable tar ({e})") from None
    return samples, reader.sha.hexdigest()


def check_sample(parts: dict[str, bytes]) -> tuple[str, str] | None:
    """(reason, message) when a sample cannot be used, else None; the image's header only is read
    (a full decode is the scorer's or trainer's)."""
    _, problem = open_image(next((parts[e] for e in IMAGE_EXTS if e in parts), None))
    if problem:
        return problem
    if "txt" not in parts:
        return "no_caption", "no txt in the sample"
    try:
        caption = parts["txt"].decode("utf-8")
    except UnicodeDecodeError as e:
        return "caption_not_utf8", str(e)
    if not caption.strip():
        return "empty_caption", "the caption is empty or white space"
    if "json" in parts:
        try:
            json.loads(parts["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return "metadata_unreadable", f"{type(e).__name__}: {e}"
    return None


def listed_downloads(tar: Path) -> set[str]:
    """Keys img2dataset's table of a shard lists as downloaded (empty when there is no table)."""
    table = tar.with_suffix(".parquet")
    if not table.exists():
        return set()
    try:
        rows = pd.read_parquet(table, columns=["key", "status"])
    except (ValueError, KeyError, OSError) as e:
        raise ValueError(f"{table}: not an img2dataset shard table with key and status ({e})") from None
    return set(rows.loc[rows["status"] == "success", "key"].astype(str))


def ingest(shards: Path) -> tuple[pd.DataFrame, dict, dict[str, str]]:
    """One row per sample of the released shards, the counts, and each tar's sha256."""
    if not shards.is_dir():
        raise FileNotFoundError(f"{shards}: released shards not found (download the release first)")
    tars = sorted(shards.glob("*.tar"))
    if not tars:
        raise FileNotFoundError(f"{shards}: no .tar shards")
    rows, hashes = [], {}
    for tar in tqdm(tars, desc=f"ingest {shards.name}", unit="shard", mininterval=2):
        samples, hashes[str(tar)] = tar_samples(tar)
        for key, parts in samples.items():
            reason, message = check_sample(parts) or ("", "")
            rows.append({"uid": sample_uid({"__key__": key, **parts}), "shard": tar.name, "key": key,
                         "status": "failed" if reason else "success", "reason": reason, "message": message})
        for key in sorted(listed_downloads(tar) - set(samples)):
            rows.append({"uid": key, "shard": tar.name, "key": key, "status": "failed",
                         "reason": "missing_from_tar", "message": "in the shard's table, not in its tar"})
    table = pd.DataFrame(rows, columns=["uid", "shard", "key", "status", "reason", "message"])
    # A uid twice is no one sample: every copy fails, so a kept set never names an ambiguous uid.
    dup = table["uid"].duplicated(keep=False) & (table["status"] == "success")
    table.loc[dup, ["status", "reason", "message"]] = ["failed", "duplicate_uid", "another sample has its uid"]
    failed = table[table["status"] == "failed"]
    counts = {
        "pairs_in": len(table),
        "samples_in_shards": int((table["status"] == "success").sum()),
        "failures": len(failed),
        "failures_by_reason": dict(Counter(failed["reason"])),
        "shards": len(tars),
    }
    assert counts["pairs_in"] == counts["samples_in_shards"] + counts["failures"]
    return table, counts, hashes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=Path, required=True, help="the released shards' folder")
    ap.add_argument("--revision", default=None, help="the release's revision (its dataset commit)")
    ap.add_argument("--samples", type=Path, required=True)
    ap.add_argument("--accounting", type=Path, required=True)
    args = ap.parse_args(argv)
    try:
        table, counts, hashes = ingest(args.shards)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    counts["revision"] = args.revision
    write_parquet(table, args.samples)
    write_json(args.accounting, counts)
    write_manifest(manifest_path(args.accounting), "ingest_shards", work=(counts["pairs_in"], "pairs"),
                   config=args_config(args), files=[args.samples, args.accounting], counts=counts,
                   inputs=hashes)
    print(f"{args.shards}: {counts['pairs_in']} in = {counts['samples_in_shards']} samples "
          f"+ {counts['failures']} failed {counts['failures_by_reason']}")


if __name__ == "__main__":
    main()
