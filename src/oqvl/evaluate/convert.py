"""Paper scale: the real benchmark releases, downloaded beforehand, into the local benchmark files.

    python -m oqvl.evaluate.convert --out results/eval_data \
        --source MMBench=data/benchmarks/MMBench/en --source SEEDBench=data/benchmarks/SEED-Bench/data \
        --source MMStar=data/benchmarks/MMStar --source MathVista=data/benchmarks/MathVista/data \
        --source POPE=data/benchmarks/POPE/data

The files go to OUT/test/ (a release is the test split). A source is a parquet file, a directory
of parquet files, or a glob, as the releases come on the Hugging Face hub (fetch them once, e.g.
`huggingface-cli download lmms-lab/MMBench --repo-type dataset --revision <sha> --local-dir
data/benchmarks/MMBench`):

    MMBench    lmms-lab/MMBench, en/dev-*.parquet (or the official MMBench_DEV_EN.tsv, images in
               base64); rows of split "dev" are kept
    SEEDBench  lmms-lab/SEED-Bench, data/test-*.parquet; image questions only (the paper reports
               SEED-Bench image)
    MMStar     Lin-Chen/MMStar, mmstar.parquet
    MathVista  AI4Math/MathVista, data/testmini-*.parquet (rows of split testmini)
    POPE       lmms-lab/POPE, data/test-*.parquet (adversarial, popular, random)

Columns are taken by name, in the schema's order, and cast to its types (a column missing from a
release that lmms-eval does not read, such as MMBench's comment, is filled with nulls); anything
else a release carries is dropped. Each file is written with its shuffled-image control.
"""

from __future__ import annotations

import argparse
import base64
import glob
import tempfile
import time
from pathlib import Path

import pandas as pd

from ..manifest import manifest_path, write_manifest
from . import BENCHMARKS
from .schemas import (
    FEATURES,
    check_schema,
    data_file,
    questions_written,
    shuffle_images,
    write_rows,
    write_table,
)

OPTIONAL = {"MMBench": {"hint", "comment", "source", "split", "L2-category", "category"},
            "SEEDBench": {"data_id", "question_type_id"},
            "MMStar": {"meta_info"},
            "MathVista": {"unit", "precision", "image", "query"},
            "POPE": {"id", "image_source", "category"}}
RENAME = {"MMBench": {"l2-category": "L2-category"}}


def source_files(source) -> list[str]:
    path = Path(source)
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*.parquet")) or sorted(str(p) for p in path.rglob("*.tsv"))
    elif path.is_file():
        files = [str(path)]
    else:
        files = sorted(glob.glob(str(source)))
    if not files:
        raise FileNotFoundError(f"no parquet or tsv files at {source}")
    return files


def mmbench_tsv_rows(path) -> list[dict]:
    """The official MMBench TSV: images in base64; a short image cell names the row whose image it
    shares (how the release stores circular copies)."""
    df = pd.read_csv(path, sep="\t", keep_default_na=False, na_values=[""])
    df = df.rename(columns=RENAME["MMBench"])
    images = {str(i): im for i, im in zip(df["index"], df["image"]) if isinstance(im, str) and len(im) > 64}
    rows = []
    for rec in df.to_dict("records"):
        im = str(rec["image"])
        im = images.get(im, im) if len(im) <= 64 else im
        rec["image"] = {"bytes": base64.b64decode(im), "path": None}
        rows.append({k: (None if isinstance(rec.get(k), float) and pd.isna(rec.get(k)) else rec.get(k))
                     for k in FEATURES["MMBench"]})
    return [r for r in rows if r["split"] in (None, "dev")]


def convert_parquet(benchmark: str, files: list[str], out: Path, cache_dir: str) -> Path:
    from datasets import load_dataset

    ds = load_dataset("parquet", data_files={"test": files}, split="test", cache_dir=cache_dir)
    ds = ds.rename_columns({k: v for k, v in RENAME.get(benchmark, {}).items() if k in ds.column_names})
    if benchmark == "SEEDBench" and "data_type" in ds.column_names:
        ds = ds.filter(lambda t: [x == "image" for x in t], input_columns="data_type", batched=True)
    if benchmark == "MMBench" and "split" in ds.column_names:
        ds = ds.filter(lambda s: [x in (None, "dev") for x in s], input_columns="split", batched=True)
    if benchmark == "MathVista":
        ds = ds.filter(lambda m: [x is None or x.get("split") in (None, "testmini") for x in m],
                       input_columns="metadata", batched=True)
    features = FEATURES[benchmark]
    missing = [c for c in features if c not in ds.column_names]
    required = [c for c in missing if c not in OPTIONAL[benchmark]]
    if required:
        raise ValueError(f"{benchmark}: {files[0]}... lacks columns {required} (has {ds.column_names})")
    for c in missing:
        ds = ds.add_column(c, [None] * len(ds))
    ds = ds.select_columns(list(features)).cast(features)
    table = ds.flatten_indices().data.table
    return write_table(table.cast(features.arrow_schema), out)


def convert(benchmark: str, source, out_dir: Path, control: bool, seed: int) -> dict:
    files = source_files(source)
    out = data_file(out_dir, benchmark)
    if benchmark == "MMBench" and all(f.endswith(".tsv") for f in files):
        rows = [r for f in files for r in mmbench_tsv_rows(f)]
        write_rows(rows, benchmark, out)
    else:
        with tempfile.TemporaryDirectory(prefix="oqvl_convert_") as cache:
            convert_parquet(benchmark, [f for f in files if f.endswith(".parquet")], out, cache)
    check_schema(out, benchmark)
    import pyarrow.parquet as pq
    counts = {"rows": pq.read_metadata(out).num_rows, "source_files": len(files)}
    if control:
        counts["control"] = shuffle_images(out, data_file(out_dir, benchmark, True), benchmark, seed)
    return counts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--source", action="append", default=[], metavar="BENCHMARK=PATH")
    ap.add_argument("--seed", type=int, default=0, help="seed of the image shuffle of the control")
    ap.add_argument("--no-control", action="store_true")
    args = ap.parse_args(argv)
    sources = {}
    for item in args.source:
        name, _, path = item.partition("=")
        if name not in BENCHMARKS or not path:
            raise SystemExit(f"--source wants BENCHMARK=PATH with BENCHMARK in {BENCHMARKS}, got {item!r}")
        sources[name] = path
    test = args.out / "test"  # a release is the test split (no held-out phrasing, no dev split)
    test.mkdir(parents=True, exist_ok=True)
    files, counts = [], {}
    for benchmark in BENCHMARKS:
        if benchmark not in sources:
            continue
        t0 = time.time()
        counts[benchmark] = convert(benchmark, sources[benchmark], test, not args.no_control, args.seed)
        files.append(data_file(test, benchmark))
        if not args.no_control:
            files.append(data_file(test, benchmark, True))
        print(f"{benchmark}: {counts[benchmark]} in {time.time() - t0:.1f}s")
    config = {"converter": "real", "sources": sources, "seed": args.seed, "control": not args.no_control}
    write_manifest(manifest_path(args.out), "eval_data", work=(questions_written(counts), "questions"),
                   config=config, files=files, counts=counts, inputs=sources)


if __name__ == "__main__":
    main()
