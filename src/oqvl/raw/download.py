"""Download a pair list into webdataset shards with img2dataset, and account for every pair.

    python -m oqvl.raw.download --pairs results/raw/ccs/pairs.parquet --out results/raw/ccs/shards

The same call serves both scales: toy pair lists hold file:// URLs, paper ones http(s) URLs.
OPTIONS are the config's raw section with the source's own `download` entries over it (DataComp:
its download script's resize mode and face blurring); blur_faces blurs the pair list's
face_bboxes (img2dataset's bbox_col).
After img2dataset, every pair is either a sample in a shard or a failure with its reason
(OUT/failures.parquet); ACCOUNTING holds the counts and the check in = out + failures, and the
job's manifest lies beside it (accounting.manifest.json: a file inside OUT, a directory output,
could not be declared an output of its own).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tarfile
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from ..io import sha256_file, write_json, write_parquet
from ..manifest import args_config, manifest_path, write_manifest
from .import_pairs import BBOX


class AccountingError(RuntimeError):
    """Pairs went missing between the pair list and the shards."""


def run_img2dataset(pairs: Path, out: Path, opts: dict) -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # it would phone home on import
    from img2dataset import download

    blur = opts.get("blur_faces", False)
    if blur and BBOX not in pq.ParquetFile(pairs).schema_arrow.names:
        raise ValueError(f"{pairs}: blur_faces needs a {BBOX} column (give the source's bbox_col)")
    download(
        url_list=str(pairs),
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        save_additional_columns=["uid", "source"],
        output_format="webdataset",
        output_folder=str(out),
        image_size=opts["image_size"],
        resize_mode=opts["resize_mode"],
        resize_only_if_bigger=opts["resize_only_if_bigger"],
        skip_reencode=opts.get("skip_reencode", False),
        bbox_col=BBOX if blur else None,  # img2dataset blurs these boxes (and keeps them as a column)
        encode_format=opts["encode_format"],
        encode_quality=opts["encode_quality"],
        number_sample_per_shard=opts["samples_per_shard"],
        processes_count=opts["processes"],
        thread_count=opts["threads"],
        timeout=opts["timeout_s"],
        retries=opts["retries"],
        oom_shard_count=opts.get("oom_shard_count", 5),  # digits of a shard's name (img2dataset's default)
        distributor="multiprocessing",
        enable_wandb=False,
        incremental_mode="incremental",  # a re-run after a crash keeps the finished shards
    )


def failure_reason(message: str | None) -> str:
    """A short, stable reason from an img2dataset error message (paths and numbers removed)."""
    if not message:
        return "unknown"
    if "!buf.empty()" in message:  # OpenCV's words for a zero-length body
        return "empty image file"
    first = str(message).strip().splitlines()[0].lower()
    first = re.sub(r"(file|https?)://\S+", "<url>", first)
    first = re.sub(r"/\S+", "<path>", first)
    first = re.sub(r"\d+", "N", first)
    return first[:120]


def count_tar_samples(tar_path: Path) -> list[str]:
    """Keys of the samples in one webdataset shard (a sample = files sharing a key)."""
    keys = set()
    with tarfile.open(tar_path) as tf:
        for member in tf:
            if member.isfile():
                keys.add(member.name.split(".", 1)[0])
    return sorted(keys)


def account(pairs: Path, out: Path) -> dict:
    """Check that every pair of the list is a shard sample or a listed failure."""
    n_in = len(pd.read_parquet(pairs, columns=["uid"]))
    shard_rows = [pd.read_parquet(p) for p in sorted(out.glob("*.parquet")) if p.stem != "failures"]
    rows = pd.concat(shard_rows, ignore_index=True) if shard_rows else pd.DataFrame(
        columns=["uid", "url", "status", "error_message"])
    ok = rows[rows["status"] == "success"]
    failed = rows[rows["status"] != "success"].copy()
    failed["reason"] = [failure_reason(m) for m in failed["error_message"]]
    in_tars = sum(len(count_tar_samples(t)) for t in sorted(out.glob("*.tar")))
    counts = {
        "pairs_in": n_in,
        "samples_in_shards": in_tars,
        "failures": int(len(failed)),
        "failures_by_reason": {k: int(v) for k, v in failed["reason"].value_counts().items()},
        "shards": len(list(out.glob("*.tar"))),
    }
    write_parquet(failed[["uid", "url", "status", "reason", "error_message"]], out / "failures.parquet")
    missing = n_in - len(rows)
    if missing or len(ok) != in_tars:
        raise AccountingError(
            f"{pairs}: {n_in} pairs in, {len(rows)} rows reported by img2dataset, "
            f"{len(ok)} successes but {in_tars} samples in the shards of {out}")
    return counts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--options", required=True, help="JSON of the config's raw section")
    ap.add_argument("--accounting", type=Path, required=True)
    args = ap.parse_args(argv)
    opts = json.loads(args.options)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        run_img2dataset(args.pairs, args.out, opts)
    except ValueError as e:
        sys.exit(f"error: {e}")
    counts = account(args.pairs, args.out)
    write_json(args.accounting, counts)
    files = sorted(args.out.glob("*.tar")) + [args.out / "failures.parquet", args.accounting]
    write_manifest(manifest_path(args.accounting), "raw", work=(counts["pairs_in"], "pairs"),
                   config={**args_config(args), "options": opts}, files=files, counts=counts,
                   inputs={str(args.pairs): sha256_file(args.pairs)})
    print(f"{args.pairs}: {counts['pairs_in']} in = {counts['samples_in_shards']} in shards "
          f"+ {counts['failures']} failed {counts['failures_by_reason']}")


if __name__ == "__main__":
    main()
