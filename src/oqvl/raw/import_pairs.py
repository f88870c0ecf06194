"""Normalise a released pair list (paper scale) into the raw stage's pair-list format.

    python -m oqvl.raw.import_pairs --source datacomp --pair-list medium.parquet \
        --url-col url --caption-col text --uid-col uid --out results/raw/datacomp/pairs.parquet

Output columns: url, caption, uid, source. Rows without a URL are dropped and counted; a
missing caption becomes "" (the filters then reject it, with its reason). The job's manifest
lies beside OUT (pairs.manifest.json).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..io import atomic_path, sha256_file
from ..manifest import args_config, manifest_path, write_manifest


def import_pairs(source: str, pair_list: Path, url_col: str, caption_col: str,
                 uid_col: str | None, out: Path) -> dict:
    if not pair_list.exists():
        raise FileNotFoundError(f"{pair_list}: pair list not found (download the release first)")
    pf = pq.ParquetFile(pair_list)
    names = set(pf.schema_arrow.names)
    for col in [url_col, caption_col] + ([uid_col] if uid_col else []):
        if col not in names:
            raise ValueError(f"{pair_list}: no column {col!r} (columns: {sorted(names)})")
    cols = [url_col, caption_col] + ([uid_col] if uid_col else [])
    with atomic_path(out) as tmp:
        writer, row0, kept, no_url = None, 0, 0, 0
        for batch in pf.iter_batches(columns=cols, batch_size=1 << 18):
            n = batch.num_rows
            uid = (pc.cast(batch.column(uid_col), pa.string()) if uid_col else
                   pa.array([f"{source}-{i:09d}" for i in range(row0, row0 + n)]))
            table = pa.table({
                "url": pc.cast(batch.column(url_col), pa.string()),
                "caption": pc.fill_null(pc.cast(batch.column(caption_col), pa.string()), ""),
                "uid": uid,
                "source": pa.array([source] * n),
            })
            has_url = pc.invert(pc.is_null(table["url"]))
            table = table.filter(has_url)
            no_url += n - table.num_rows
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
            kept += table.num_rows
            row0 += n
        if writer is not None:
            writer.close()
    return {"rows_in": row0, "pairs_out": kept, "dropped_no_url": no_url}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", required=True)
    ap.add_argument("--pair-list", type=Path, required=True)
    ap.add_argument("--url-col", default="url")
    ap.add_argument("--caption-col", default="caption")
    ap.add_argument("--uid-col", default=None)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    try:
        counts = import_pairs(args.source, args.pair_list, args.url_col, args.caption_col,
                              args.uid_col or None, args.out)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    write_manifest(manifest_path(args.out), "import_pairs", work=(counts["pairs_out"], "pairs"),
                   config=args_config(args), files=[args.out], counts=counts,
                   inputs={str(args.pair_list): sha256_file(args.pair_list)})
    print(f"{args.source}: {counts}")


if __name__ == "__main__":
    main()
