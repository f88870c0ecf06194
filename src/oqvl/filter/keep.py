"""Decide which pairs a filter keeps: a score threshold, a kept fraction, a released uid list, or all.

    python -m oqvl.filter.keep --scores S.parquet --failures F.parquet --fraction 0.7 --out kept.parquet
    python -m oqvl.filter.keep --scores S.parquet --failures F.parquet --threshold 85 \
        --shards results/raw/datacomp/shards --out kept_mlm.parquet
    python -m oqvl.filter.keep --uid-list dfn_uids.npy --shards results/raw/datacomp/shards --out kept.parquet
    python -m oqvl.filter.keep --keep-all --samples results/raw/ccs/samples.parquet --out kept.parquet
    python -m oqvl.filter.keep --union kept.parquet kept_mlm.parquet --out kept_union.parquet
    python -m oqvl.filter.keep --user-scores my_scores.parquet --shards results/raw/datacomp/shards \
        --threshold 0.5 --out kept_mine.parquet

Semantics: `--threshold t` keeps pairs with score >= t; `--fraction f` keeps the round(f * n)
best-scored pairs (ties broken by uid, so the result is deterministic); `--uid-list` keeps the
pairs of the shards whose uid is in the list (DataComp's DFN release: an .npy of uids, either
strings or 128-bit ids as two uint64 fields); `--keep-all` (method none: a release filtered
before it was published, BLIP's CCS or a CLIP-filtered LAION subset) keeps every pair of the
shards; `--union A B` keeps the pairs either kept set holds (the paper's mixture 4: MLM-Filter |
DFN). With `--scores` and `--shards` only the scored pairs the source's shards hold are judged;
the others (scores imported from a run over another download) are counted as `scored_absent` and
left out. `--user-scores` keeps the pairs of the shards by the scores a user computed elsewhere
(a parquet of uid, score) under `--threshold` or `--fraction`: a pair of the shards the file has
no score for is rejected and counted (no_score), a uid of the file not in the shards is counted
(not_in_shards) and ignored. A pair with no score (an MLM-Filter answer that
had no number in 0-100) is rejected by any rule and counted. Every pair in is kept, rejected or
failed. The pairs of a source are its downloaded shards' (`--shards`: img2dataset's tables) or
its ingested shards' (`--samples`: oqvl.raw.ingest's list, valid samples only). The job's
manifest lies beside OUT (kept.manifest.json for kept.parquet).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from ..io import sha256_file, write_json, write_parquet
from ..manifest import args_config, manifest_path, write_manifest


def keep_by_score(scores: pd.DataFrame, threshold: float | None = None,
                  fraction: float | None = None) -> pd.Series:
    """A boolean mask over `scores` rows; a row without a score (NaN) is never kept."""
    if (threshold is None) == (fraction is None):
        raise ValueError("give exactly one of threshold and fraction")
    if threshold is not None:
        return scores["score"] >= threshold
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction {fraction} is not in [0, 1]")
    n_keep = int(round(fraction * len(scores)))
    scored = scores[scores["score"].notna()]
    order = scored.sort_values(["score", "uid"], ascending=[False, True], kind="stable").index
    mask = pd.Series(False, index=scores.index)
    mask.loc[order[:n_keep]] = True
    return mask


def read_uid_list(path: Path) -> set[str]:
    """uids from an .npy (strings, or DataComp's (uint64, uint64) pairs) or a text file."""
    if path.suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
        if arr.dtype.names and len(arr.dtype.names) == 2:  # DataComp: 128-bit uid as two u64
            a, b = arr.dtype.names
            return {f"{int(x):016x}{int(y):016x}" for x, y in zip(arr[a], arr[b])}
        if arr.dtype.kind in "US":
            return set(arr.astype(str).tolist())
        raise ValueError(f"{path}: unsupported uid dtype {arr.dtype}")
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def read_kept(path: Path) -> pd.Series:
    if not path.exists():
        raise FileNotFoundError(f"{path}: kept set not found")
    df = pd.read_parquet(path)
    if "uid" not in df.columns:
        raise ValueError(f"{path}: no uid column")
    return df["uid"].astype(str)


def shard_uids(shards: Path) -> pd.Series:
    """uids of the samples that made it into a raw source's shards (img2dataset's parquet)."""
    parts = [p for p in sorted(shards.glob("*.parquet")) if p.stem != "failures"]
    if not parts:
        raise FileNotFoundError(f"{shards}: no img2dataset shard tables (*.parquet)")
    rows = pd.concat([pd.read_parquet(p, columns=["uid", "status"]) for p in parts])
    return rows.loc[rows["status"] == "success", "uid"].astype(str).reset_index(drop=True)


def read_user_scores(path: Path) -> pd.DataFrame:
    """A user's scores file: one row per uid, a numeric score (NaN: no score)."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: scores file not found")
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # pyarrow's errors for a file that is not parquet vary by version
        raise ValueError(f"{path}: not a readable parquet file ({type(e).__name__})") from None
    missing = [c for c in ("uid", "score") if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: no {' or '.join(missing)} column (columns: {', '.join(map(str, df.columns))})")
    if not pd.api.types.is_numeric_dtype(df["score"]) or pd.api.types.is_bool_dtype(df["score"]):
        raise ValueError(f"{path}: column score is {df['score'].dtype}, not numbers")
    df = pd.DataFrame({"uid": df["uid"].astype(str), "score": df["score"].astype(float)})
    dup = df["uid"][df["uid"].duplicated()]
    if len(dup):
        raise ValueError(f"{path}: {dup.nunique()} uid(s) appear more than once, e.g. {dup.iloc[0]!r}")
    return df


def scores_of_shards(path: Path, shards: Path) -> tuple[pd.DataFrame, int]:
    """(uid, score) of every pair of the shards, NaN where the file has none; and how many of the
    file's uids are not in the shards."""
    user = read_user_scores(path)
    uids = shard_uids(shards)
    scores = pd.DataFrame({"uid": uids}).merge(user, on="uid", how="left")
    return scores, int((~user["uid"].isin(set(uids))).sum())


def present_in(uids: pd.Series, scores: pd.DataFrame, failed: pd.DataFrame
               ) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """(scores, failures) of the pairs the source's shards hold, and how many scored or failed
    uids they do not hold (not counted as pairs in: the mixture reads only the shards)."""
    present = set(uids)
    s_in, f_in = scores["uid"].astype(str).isin(present), failed["uid"].astype(str).isin(present)
    absent = int((~s_in).sum() + (~f_in).sum())
    return scores.loc[s_in].reset_index(drop=True), failed.loc[f_in].reset_index(drop=True), absent


def samples_uids(samples: Path) -> pd.Series:
    """uids of the valid samples of an ingested source (oqvl.raw.ingest's sample list)."""
    if not samples.exists():
        raise FileNotFoundError(f"{samples}: sample list not found")
    rows = pd.read_parquet(samples, columns=["uid", "status"])
    return rows.loc[rows["status"] == "success", "uid"].astype(str).reset_index(drop=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scores", type=Path)
    ap.add_argument("--failures", type=Path)
    ap.add_argument("--threshold", type=float)
    ap.add_argument("--fraction", type=float)
    ap.add_argument("--uid-list", type=Path)
    ap.add_argument("--union", type=Path, nargs=2, metavar=("KEPT_A", "KEPT_B"))
    ap.add_argument("--user-scores", type=Path, help="a user's parquet of uid, score (with --shards)")
    ap.add_argument("--keep-all", action="store_true", help="method none: keep every pair")
    ap.add_argument("--shards", type=Path,
                    help="the source's shards: with --uid-list, --keep-all or --user-scores the pairs they "
                         "select from; with --scores only the scored pairs they hold are kept or rejected")
    ap.add_argument("--samples", type=Path, help="an ingested source's sample list (instead of --shards)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--stats", type=Path, required=True)
    args = ap.parse_args(argv)
    if (args.uid_list or args.keep_all) and not (args.shards or args.samples):
        ap.error("--uid-list and --keep-all need --shards or --samples (the source whose pairs they select)")
    if args.user_scores and not args.shards:
        ap.error("--user-scores needs --shards (the source whose pairs it selects)")
    if not (args.uid_list or args.union or args.keep_all or args.user_scores) and not (args.scores and args.failures):
        ap.error("give --scores and --failures, --uid-list or --keep-all with --shards or --samples, "
                 "--user-scores and --shards, or --union")
    try:
        if args.union:
            read = args.union
            a, b = (set(read_kept(p)) for p in args.union)
            kept = pd.Series(sorted(a | b), dtype=str)
            stats = {"method": "union", "kept_a": len(a), "kept_b": len(b), "both": len(a & b),
                     "only_a": len(a - b), "only_b": len(b - a), "kept": len(kept)}
            stats.update(pairs_in=len(kept), rejected=0, failed=0)  # counted by the sets' own stats
        elif args.keep_all:
            read = [args.samples] if args.samples else []
            kept = samples_uids(args.samples) if args.samples else shard_uids(args.shards)
            stats = {"method": "none", "pairs_in": len(kept), "kept": len(kept), "rejected": 0, "failed": 0}
        elif args.uid_list:
            if not args.uid_list.exists():
                raise FileNotFoundError(f"{args.uid_list}: uid list not found")
            read = [args.uid_list] + ([args.samples] if args.samples else [])
            uids = samples_uids(args.samples) if args.samples else shard_uids(args.shards)
            listed = read_uid_list(args.uid_list)
            kept = uids[uids.isin(listed)]
            stats = {"method": "uid_list", "pairs_in": len(uids), "kept": len(kept),
                     "rejected": len(uids) - len(kept), "failed": 0}
        elif args.user_scores:
            read = [args.user_scores]
            scores, not_in_shards = scores_of_shards(args.user_scores, args.shards)
            mask = keep_by_score(scores, args.threshold, args.fraction)
            kept = scores.loc[mask, "uid"]
            stats = {"method": "threshold" if args.threshold is not None else "fraction",
                     "threshold": args.threshold, "fraction": args.fraction,
                     "pairs_in": len(scores), "kept": int(mask.sum()), "rejected": int((~mask).sum()),
                     "failed": 0, "no_score": int(scores["score"].isna().sum()),
                     "not_in_shards": not_in_shards,
                     "min_kept_score": float(scores.loc[mask, "score"].min()) if mask.any() else None}
        else:
            read = [args.scores, args.failures]
            scores = pd.read_parquet(args.scores)
            failed = pd.read_parquet(args.failures)
            absent = 0
            unscored = 0
            if args.shards:  # scores made elsewhere (imported) may cover pairs these shards lack
                uids = shard_uids(args.shards)
                scores, failed, absent = present_in(uids, scores, failed)
                # ... and lack pairs these shards hold: each is a pair without a score, rejected
                seen = set(scores["uid"].astype(str)) | set(failed["uid"].astype(str))
                missing = sorted(set(uids) - seen)
                unscored = len(missing)
                scores = pd.concat([scores, pd.DataFrame({"uid": missing, "score": np.nan})], ignore_index=True)
            mask = keep_by_score(scores, args.threshold, args.fraction)
            kept = scores.loc[mask, "uid"]
            stats = {"method": "threshold" if args.threshold is not None else "fraction",
                     "threshold": args.threshold, "fraction": args.fraction,
                     "pairs_in": len(scores) + len(failed), "kept": int(mask.sum()),
                     "rejected": int((~mask).sum()), "failed": len(failed),
                     "no_score": int(scores["score"].isna().sum()),
                     "min_kept_score": float(scores.loc[mask, "score"].min()) if mask.any() else None}
            if args.shards:
                stats.update(scored_absent=absent, not_scored=unscored)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    assert stats["pairs_in"] == stats["kept"] + stats["rejected"] + stats["failed"]
    write_parquet(pd.DataFrame({"uid": kept.astype(str).tolist()}), args.out)
    write_json(args.stats, stats)
    write_manifest(manifest_path(args.out), "keep", work=(stats["pairs_in"], "pairs"),
                   config=args_config(args), files=[args.out, args.stats], counts=stats,
                   inputs={str(f): sha256_file(f) for f in read})
    print(f"{args.out}: {stats}")


if __name__ == "__main__":
    main()
