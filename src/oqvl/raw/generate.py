"""Generate a toy source: image files, a pair list pointing at them, and the truth table.

    python -m oqvl.raw.generate --source ccs --n-pairs 3000 --rates '{"empty_caption": 0.01}' \
        --out results/raw/ccs

Writes OUT/images/<uid>.png, OUT/pairs.parquet (url, caption, uid, source: what a web release
gives), OUT/truth.parquet (what the toy world knows and filters never read) and
OUT/pairs.manifest.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from ..io import write_parquet
from ..manifest import args_config, manifest_path, write_manifest
from ..world.source import WorldConfig, generate_source


def generate(source: str, n_pairs: int, rates: dict, seed: int, world: WorldConfig, out: Path):
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    pairs, truth = [], []
    for pair in tqdm(generate_source(seed, source, n_pairs, rates, world), total=n_pairs,
                     desc=f"generate {source}", unit="pair", mininterval=2):
        path = images / f"{pair.uid}.png"
        path.write_bytes(pair.image)
        pairs.append({"url": path.resolve().as_uri(), "caption": pair.caption, "uid": pair.uid,
                      "source": source})
        truth.append(pair.truth)
    write_parquet(pd.DataFrame(truth), out / "truth.parquet")
    write_parquet(pd.DataFrame(pairs), out / "pairs.parquet")  # last: it marks a complete source
    return pd.DataFrame(truth)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", required=True)
    ap.add_argument("--n-pairs", type=int, required=True)
    ap.add_argument("--rates", default="{}", help="JSON: corruption kind -> fraction")
    ap.add_argument("--seed", type=int, default=0)
    WorldConfig.add_args(ap)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    world = WorldConfig.from_args(args)
    truth = generate(args.source, args.n_pairs, json.loads(args.rates), args.seed, world, args.out)
    counts = {k: int(v) for k, v in truth["corruption"].value_counts().items()}
    pairs = args.out / "pairs.parquet"
    write_manifest(manifest_path(pairs), "generate_pairs", work=(len(truth), "pairs"),
                   config=args_config(args), files=[pairs, args.out / "truth.parquet"],
                   counts={"pairs": len(truth), "by_corruption": counts})
    print(f"{args.source}: {len(truth)} pairs, caption true {truth['caption_true'].mean():.3f}, "
          f"kinds {json.dumps(counts, sort_keys=True)}")


if __name__ == "__main__":
    main()
