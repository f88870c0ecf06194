"""Normalise a released pair list (paper scale) into the raw stage's pair-list format.

    python -m oqvl.raw.import_pairs --source ccs --pair-list ccs_filtered.json --format json \
        --url-col url --caption-col caption --out results/raw/ccs/pairs.parquet
    python -m oqvl.raw.import_pairs --source datacomp --pair-list metadata/medium --format parquet_dir \
        --url-col url --caption-col text --uid-col uid --bbox-col face_bboxes --out results/raw/datacomp/pairs.parquet

Formats, as the lists are released: `json`, one JSON array of objects (BLIP's ccs_filtered.json:
{url, caption}); `parquet`, one file (a LAION subset); `parquet_dir`, a folder of .parquet files
read in name order (DataComp's metadata: uid, url, text, face_bboxes, ...).

Output columns: url, caption, uid, source, and face_bboxes when --bbox-col names the release's
face boxes (img2dataset blurs them at download). Rows without a URL are dropped and counted; a
missing caption becomes "" (the filters then reject it, with its reason). The job's manifest lies
beside OUT (pairs.manifest.json).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..io import atomic_path, sha256_file
from ..manifest import args_config, manifest_path, write_manifest

FORMATS = ("json", "parquet", "parquet_dir")
BBOX = "face_bboxes"  # the pair list's name for the boxes img2dataset blurs (its bbox_col)
BATCH = 1 << 18


def release_files(pair_list: Path, fmt: str) -> list[Path]:
    """The files of a release: itself, or a parquet_dir's .parquet files in name order."""
    if not pair_list.exists():
        raise FileNotFoundError(f"{pair_list}: pair list not found (download the release first)")
    if fmt == "parquet_dir":
        if not pair_list.is_dir():
            raise ValueError(f"{pair_list}: format parquet_dir needs a folder of .parquet files")
        files = sorted(pair_list.glob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"{pair_list}: no .parquet files in the folder")
        return files
    if pair_list.is_dir():
        raise ValueError(f"{pair_list}: a folder; format {fmt} reads one file (parquet_dir reads a folder)")
    return [pair_list]


def parquet_batches(path: Path, cols: list[str]) -> Iterator[pa.RecordBatch]:
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path}: not a parquet file ({e})") from None
    names = set(pf.schema_arrow.names)
    for col in cols:
        if col not in names:
            raise ValueError(f"{path}: no column {col!r} (columns: {sorted(names)})")
    yield from pf.iter_batches(columns=cols, batch_size=BATCH)


def json_batches(path: Path, cols: list[str]) -> Iterator[pa.RecordBatch]:
    """BLIP's release: one JSON array of objects; a field no object has is a missing column."""
    try:
        rows = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON array of objects, got {type(rows).__name__}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: entry {i} is {type(row).__name__}, not an object")
    seen = set().union(*(r.keys() for r in rows[:1000])) if rows else set()
    for col in cols:
        if col not in seen and not any(col in r for r in rows):
            raise ValueError(f"{path}: no field {col!r} in any entry (fields: {sorted(seen)})")
    for start in range(0, len(rows), BATCH):
        chunk = rows[start:start + BATCH]
        yield pa.record_batch([pa.array([r.get(c) for r in chunk]) for c in cols], names=cols)


def import_pairs(source: str, pair_list: Path, url_col: str, caption_col: str,
                 uid_col: str | None, out: Path, fmt: str = "parquet", bbox_col: str | None = None) -> dict:
    if fmt not in FORMATS:
        raise ValueError(f"{pair_list}: unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    files = release_files(pair_list, fmt)
    cols = [url_col, caption_col] + ([uid_col] if uid_col else []) + ([bbox_col] if bbox_col else [])
    batches = json_batches if fmt == "json" else parquet_batches
    with atomic_path(out) as tmp:
        writer, row0, kept, no_url = None, 0, 0, 0
        for path in files:
            try:
                for batch in batches(path, cols):
                    n = batch.num_rows
                    uid = (pc.cast(batch.column(uid_col), pa.string()) if uid_col else
                           pa.array([f"{source}-{i:09d}" for i in range(row0, row0 + n)]))
                    columns = {
                        "url": pc.cast(batch.column(url_col), pa.string()),
                        "caption": pc.fill_null(pc.cast(batch.column(caption_col), pa.string()), ""),
                        "uid": uid,
                        "source": pa.array([source] * n),
                    }
                    if bbox_col:
                        # normalised to a list of [x0, y0, x1, y1] in image fractions (img2dataset's)
                        columns[BBOX] = pc.cast(batch.column(bbox_col), pa.list_(pa.list_(pa.float64())))
                    table = pa.table(columns)
                    has_url = pc.invert(pc.is_null(table["url"]))
                    table = table.filter(has_url)
                    no_url += n - table.num_rows
                    if writer is None:
                        writer = pq.ParquetWriter(tmp, table.schema)
                    writer.write_table(table)
                    kept += table.num_rows
                    row0 += n
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
                raise ValueError(f"{path}: {e}") from None  # a column of the wrong type
        if writer is None:  # an empty release: an empty pair list, not a missing file
            schema = {"url": pa.string(), "caption": pa.string(), "uid": pa.string(), "source": pa.string()}
            if bbox_col:
                schema[BBOX] = pa.list_(pa.list_(pa.float64()))
            writer = pq.ParquetWriter(tmp, pa.schema(list(schema.items())))
        writer.close()
    return {"rows_in": row0, "pairs_out": kept, "dropped_no_url": no_url, "files": len(files)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", required=True)
    ap.add_argument("--pair-list", type=Path, required=True)
    ap.add_argument("--format", choices=FORMATS, default="parquet")
    ap.add_argument("--url-col", default="url")
    ap.add_argument("--caption-col", default="caption")
    ap.add_argument("--uid-col", default=None)
    ap.add_argument("--bbox-col", default=None, help="the release's face boxes, blurred at download")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    try:
        counts = import_pairs(args.source, args.pair_list, args.url_col, args.caption_col,
                              args.uid_col or None, args.out, args.format, args.bbox_col or None)
        read = release_files(args.pair_list, args.format)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    write_manifest(manifest_path(args.out), "import_pairs", work=(counts["pairs_out"], "pairs"),
                   config=args_config(args), files=[args.out], counts=counts,
                   inputs={str(f): sha256_file(f) for f in read})
    print(f"{args.source}: {counts}")


if __name__ == "__main__":
    main()
