"""Stage 3, mixture: gather the kept pairs of several sources into one set of shards.

    python -m oqvl.mixture --part ccs results/raw/ccs/shards results/filter/ccs/kept.parquet \
        --part datacomp results/raw/datacomp/shards results/filter/datacomp/kept.parquet \
        --out results/mixtures/ccs+datacomp

Writes OUT/shards/%05d.tar (sample key = uid, unique across sources; image bytes copied as
they are; source shards in order, each one's kept pairs in uid order) and OUT/manifest.json (pairs per part, sha256 per shard).
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from .io import sha256_file
from .manifest import args_config, manifest_path, write_manifest
from .shards import ShardSink, iter_samples, sample_uid, shard_paths


def kept_samples(path: Path, kept: set[str]) -> list[tuple[str, dict]]:
    """(uid, sample) for the kept samples of one shard, in the shard's order."""
    out = []
    for sample in iter_samples([path]):
        uid = sample_uid(sample)
        if uid in kept:
            out.append((uid, sample))
    return out


def build_mixture(parts: list[tuple[str, Path, Path]], out: Path, samples_per_shard: int) -> dict:
    counts: dict[str, int] = {}
    # Write into a scratch folder and swap it in at the end: a failed run never leaves a
    # half-written mixture where a complete one is expected, and never mixes two runs' shards.
    shards_out = out / "shards"
    scratch = out / "shards.partial"
    shutil.rmtree(scratch, ignore_errors=True)
    seen: set[str] = set()
    with ShardSink(scratch, samples_per_shard) as sink:
        for name, shards, kept_path in parts:
            kept = set(pd.read_parquet(kept_path)["uid"].astype(str))
            n = 0
            bar = tqdm(desc=f"mixture <- {name}", unit="pair", mininterval=2)
            for path in shard_paths(shards):
                # img2dataset writes a shard in download-completion order, which varies run to
                # run; uid order within each shard makes the mixture, and all after it, repeatable.
                for uid, sample in sorted(kept_samples(path, kept), key=lambda t: t[0]):
                    if uid in seen:
                        raise ValueError(f"{shards}: uid {uid} appears twice in the mixture")
                    seen.add(uid)
                    sink.write({"__key__": uid, **{k: v for k, v in sample.items()
                                                   if not k.startswith("__")}})
                    n += 1
                bar.update(n - bar.n)
            bar.close()
            if n != len(kept):
                raise ValueError(f"{kept_path}: {len(kept)} kept uids but {n} found in {shards}")
            counts[name] = n
    counts["total"] = sum(counts.values())
    shutil.rmtree(shards_out, ignore_errors=True)
    os.replace(scratch, shards_out)
    return counts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", nargs=3, action="append", required=True, metavar=("NAME", "SHARDS", "KEPT"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--samples-per-shard", type=int, default=10000)
    args = ap.parse_args(argv)
    parts = [(n, Path(s), Path(k)) for n, s, k in args.part]
    counts = build_mixture(parts, args.out, args.samples_per_shard)
    files = sorted((args.out / "shards").glob("*.tar"))
    write_manifest(manifest_path(args.out), "mixture", work=(counts["total"], "pairs"),
                   config=args_config(args), files=files, counts=counts,
                   inputs={str(k): sha256_file(k) for _, _, k in parts})
    print(f"{args.out}: {counts}")


if __name__ == "__main__":
    main()
