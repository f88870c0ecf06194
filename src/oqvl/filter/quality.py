"""Filter quality against the toy world's truth: what each filter keeps, by corruption kind.

    python -m oqvl.filter.quality --entry ccs clip results/raw/ccs/truth.parquet \
        results/filter/ccs/clip_scores.parquet results/filter/ccs/clip_kept.parquet --out results/filter/quality

This is the only code that reads a truth table next to a filter's output. For each source and
filter it reports precision (share of kept pairs whose caption is true), recall (share of true
pairs kept), the unfiltered clean rate (precision of keeping everything), and the kept rate of
each corruption kind; plus a score histogram per source and filter. Writes OUT/summary.csv,
OUT/by_corruption.csv, OUT/report.md, OUT/hist_<source>_<filter>.png and OUT/manifest.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from ..io import atomic_path, sha256_file, write_text  # noqa: E402
from ..manifest import args_config, manifest_path, write_manifest  # noqa: E402
from ..world.corrupt import CLEAN, KINDS  # noqa: E402


def judge(truth: pd.DataFrame, kept_uids: set[str]) -> tuple[dict, pd.DataFrame]:
    """Summary metrics and per-kind kept rates of one filter on one source."""
    t = truth.assign(kept=truth["uid"].astype(str).isin(kept_uids))
    true = t["caption_true"] & t["image_ok"]  # a usable pair: decodable image, true caption
    tp = int((t["kept"] & true).sum())
    summary = {
        "pairs": len(t),
        "usable_rate": round(float(true.mean()), 4),
        "kept": int(t["kept"].sum()),
        "precision": round(tp / max(int(t["kept"].sum()), 1), 4),
        "recall": round(tp / max(int(true.sum()), 1), 4),
    }
    rows = []
    for kind in (CLEAN, *KINDS):
        sel = t[t["corruption"] == kind]
        if len(sel):
            rows.append({"corruption": kind, "pairs": len(sel), "kept": int(sel["kept"].sum()),
                         "kept_rate": round(float(sel["kept"].mean()), 4)})
    return summary, pd.DataFrame(rows)


def histogram(truth: pd.DataFrame, scores: pd.DataFrame, kept_uids: set[str], title: str, path: Path) -> None:
    """A score histogram per corruption kind. When no pair has a score (an MLM-Filter whose
    answers held no number) the plot says so: every scored filter has its figure, whatever its
    model learned, so the report's files do not depend on a borderline model."""
    df = scores.merge(truth[["uid", "corruption"]], on="uid", how="left")
    df = df[df["score"].notna()]
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    if df.empty:
        ax.text(0.5, 0.5, f"no pair has a score ({len(scores)} answers without a number in 0-100)",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        ax.set_title(title)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        return
    cut = df.loc[df["uid"].isin(kept_uids), "score"].min() if kept_uids else None
    lo, hi = df["score"].min(), df["score"].max()
    bins = [lo + (hi - lo) * i / 40 for i in range(41)] if hi > lo else 10
    for kind, sel in df.groupby("corruption"):
        ax.hist(sel["score"], bins=bins, histtype="step", linewidth=2.2 if kind == CLEAN else 1.2,
                label=f"{kind} ({len(sel)})", density=True)
    if cut is not None:
        ax.axvline(cut, color="black", linestyle="--", linewidth=1, label="lowest kept score")
    ax.set_xlabel("score")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entry", nargs=5, action="append", required=True,
                    metavar=("SOURCE", "FILTER", "TRUTH", "SCORES", "KEPT"),
                    help="SCORES may be '-' for filters without scores (uid lists)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    summaries, kinds, hists, read = [], [], [], set()
    for source, filt, truth_p, scores_p, kept_p in args.entry:
        read |= {truth_p, kept_p} | ({scores_p} - {"-"})
        truth = pd.read_parquet(truth_p)
        kept = set(pd.read_parquet(kept_p)["uid"].astype(str))
        summary, by_kind = judge(truth, kept)
        summaries.append({"source": source, "filter": filt, **summary})
        kinds.append(by_kind.assign(source=source, filter=filt))
        hist = args.out / f"hist_{source}_{filt}.png"
        if scores_p != "-":
            histogram(truth, pd.read_parquet(scores_p), kept, f"{filt} scores, {source}", hist)
            hists.append(hist)
    summary = pd.DataFrame(summaries)
    by_kind = pd.concat(kinds, ignore_index=True)[["source", "filter", "corruption", "pairs", "kept", "kept_rate"]]
    write_text(args.out / "summary.csv", summary.to_csv(index=False))
    write_text(args.out / "by_corruption.csv", by_kind.to_csv(index=False))
    wide = by_kind.pivot_table(index="corruption", columns=["source", "filter"], values="kept_rate")
    wide = wide.reindex([k for k in (CLEAN, *KINDS) if k in wide.index])
    md = ["# Filter quality against the toy world's truth", "",
          "precision = share of kept pairs that are usable (true caption, decodable image); "
          "recall = share of usable pairs kept; usable_rate = precision with no filter.", "",
          summary.to_markdown(index=False), "", "## Kept rate by corruption kind", "",
          wide.to_markdown(floatfmt=".3f"), ""]
    md += [f"![{p.stem}]({p.name})" for p in sorted(args.out.glob("hist_*.png"))]
    write_text(args.out / "report.md", "\n".join(md) + "\n")
    judged = int(summary["pairs"].sum())  # the rows of the truth table each entry reads
    files = [args.out / f for f in ("summary.csv", "by_corruption.csv", "report.md")]
    write_manifest(manifest_path(args.out), "filter_quality", work=(judged, "pairs"),
                   config=args_config(args), files=files + hists,
                   counts={"entries": len(summary), "pairs_judged": judged},
                   inputs={p: sha256_file(p) for p in sorted(read)})
    print(summary.to_string(index=False))
    print(wide.to_string(float_format=lambda x: f"{x:.3f}"))


if __name__ == "__main__":
    main()
