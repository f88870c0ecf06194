"""How well the CLIP score separates true from corrupted captions on a held-out noisy toy set.

    python -m oqvl.filter.train_clip --out /tmp/clip          # train with the defaults
    python benchmarks/clip_filter_quality.py --ckpt /tmp/clip --n 3000

Generates stream "clip_eval" (never a training stream), scores every pair and prints, per
corruption kind, the mean score and the AUC of score vs caption_true on clean + that kind
(overall: all pairs), then the scoring throughput.
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import pandas as pd
import torch
from PIL import Image

from oqvl.filter.clip_model import load_clip, score_pairs
from oqvl.world.source import WorldConfig, generate_source

RATES = {"wrong_attribute": 0.1, "wrong_object": 0.1, "wrong_count": 0.1, "generic_caption": 0.1,
         "empty_caption": 0.05, "other_caption": 0.1}


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(score of a true pair > score of a false pair), ties counted half (Mann-Whitney U)."""
    labels = labels.astype(bool)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = pd.Series(scores).rank().to_numpy()
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def quality_table(truth: pd.DataFrame, scores: np.ndarray) -> pd.DataFrame:
    df = truth.assign(score=scores)
    rows = []
    for kind in ["clean", *RATES]:
        sub = df[df.corruption == kind]
        both = df[df.corruption.isin(["clean", kind])]
        rows.append({"kind": kind, "n": len(sub), "mean_score": sub.score.mean(),
                     "auc_vs_clean": np.nan if kind == "clean" else auc(both.score.values,
                                                                        both.caption_true.values)})
    rows.append({"kind": "overall", "n": len(df), "mean_score": df.score.mean(),
                 "auc_vs_clean": auc(df.score.values, df.caption_true.values)})
    return pd.DataFrame(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="toy checkpoint dir, or an open_clip model name")
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    pairs = list(generate_source(args.seed, "clip_eval", args.n, RATES, WorldConfig()))
    truth = pd.DataFrame([p.truth for p in pairs])
    model, preprocess, tokenizer = load_clip(args.ckpt, args.pretrained, args.device)
    t0 = time.time()
    images = [Image.open(io.BytesIO(p.image)).convert("RGB") for p in pairs]  # decoding counts
    scores = score_pairs(model, preprocess, tokenizer, images, [p.caption for p in pairs], args.device)
    seconds = time.time() - t0

    table = quality_table(truth, scores)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"scored {len(pairs)} pairs in {seconds:.2f}s: {len(pairs) / seconds:.0f} pairs/s "
          f"({args.threads} threads, {args.device})")
    return table


if __name__ == "__main__":
    main()
