"""Plots of the results (PNG): scores per mixture beside the paper's, loss curves, GPU-hours by stage.

    python -m oqvl.report.plots --table3 results/table3.csv --compute results/compute.csv \
        --train-manifests-json '{RUN: {STAGE: MANIFEST}}' --out-dir results/plots

A plot with nothing to show yet (no evaluated run, no training log) says so on its canvas rather
than inventing data.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on workers or CI
import matplotlib.pyplot as plt
import pandas as pd

from .tables import BENCHMARKS, MEAN, TABLE3_IDS

PLOTS = {"scores": "scores_by_mixture.png", "loss": "loss_curves.png", "compute": "compute_by_stage.png"}


def _empty(ax, text):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#555")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_scores(table3: pd.DataFrame, out: Path) -> None:
    """Per benchmark (and the 5-benchmark average): bars per mixture id, the paper's beside ours (the
    mean over the seeds, each seed's score as a dot on it)."""
    names = [*BENCHMARKS, "avg_5"]
    fig, axes = plt.subplots(1, len(names), figsize=(3.0 * len(names), 3.6), sharey=True)
    paper = table3[table3["scale"] == "paper"].set_index("row")
    # Ours: the paper protocol when a run has it, so both bars are scored alike.
    ours = table3[(table3["scale"] != "paper")]
    protocol = "paper" if (ours["protocol"] == "paper").any() else next(iter(ours["protocol"]), None)
    ours = ours[ours["protocol"] == protocol]
    seeds = ours[ours["seed"].astype(str) != MEAN]
    ours = ours[ours["seed"].astype(str) == MEAN]
    ids = [i for i in TABLE3_IDS if i in set(paper.index) | set(ours["row"])]
    width = 0.38
    for ax, name in zip(axes, names):
        xs = range(len(ids))
        p = [pd.to_numeric(paper[name], errors="coerce").get(i, math.nan) for i in ids]
        ax.bar([x - width / 2 for x in xs], p, width, label="paper (paper scale)", color="#9bb7d4")
        o = [pd.to_numeric(ours.loc[ours["row"] == i, name], errors="coerce").mean() for i in ids]
        scale = ",".join(sorted(set(ours["scale"]))) or "none evaluated"
        ax.bar([x + width / 2 for x in xs], o, width, label=f"reproduced ({scale} scale, seed mean)", color="#e3a13b")
        for x, i in zip(xs, ids):
            dots = pd.to_numeric(seeds.loc[seeds["row"] == i, name], errors="coerce").dropna()
            ax.plot([x + width / 2] * len(dots), dots, "o", ms=3, color="#333",
                    label="one seed" if x == 0 and name == names[0] else None)
        ax.set_xticks(list(xs), ids)
        ax.set_title(name)
        ax.set_ylim(0, 100)
    axes[0].set_ylabel("score (%)")
    axes[0].legend(loc="upper left", fontsize=7)
    if ours.empty:
        fig.suptitle("Table 3 mixtures: paper only (no reproduced run evaluated yet)")
    else:
        fig.suptitle("Table 3 mixtures: paper vs reproduced")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def read_train_log(path: Path) -> pd.DataFrame:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return pd.DataFrame(rows)


def train_log_of(manifest: Path) -> Path | None:
    """The training log a training job's manifest lists (and vouches for by its hash)."""
    if not manifest.is_file():
        return None
    files = json.loads(manifest.read_text()).get("files", {})
    name = next((f for f in files if f.endswith("train_log.jsonl")), None)
    return manifest.parent / name if name else None


def plot_losses(train_manifests: dict, out: Path) -> None:
    """Training loss against tokens seen, per run and seed (train_manifests: "run seed k" -> stage
    -> its training job's manifest), for pretraining and SFT."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, stage in zip(axes, ("pretrain", "sft")):
        drawn = 0
        for run in sorted(train_manifests):
            path = train_log_of(Path(train_manifests[run][stage]))
            if path is None or not path.is_file():
                continue
            log = read_train_log(path)
            if log.empty or "loss" not in log:
                continue
            # The trainer logs the tokens of each step; the x axis is tokens seen so far.
            x = log["tokens"].cumsum() if "tokens" in log else log["step"]
            ax.plot(x, log["loss"], label=run, lw=1.2)
            drawn += 1
        ax.set_title(stage)
        if drawn:
            ax.set_xlabel("tokens seen")
            ax.set_ylabel("loss")
            ax.legend(fontsize=7)
        else:
            _empty(ax, f"no {stage} log yet")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_compute(compute: pd.DataFrame, out: Path) -> None:
    """Hours by stage (GPU, wall, CPU), and the projected paper-scale pretraining beside the paper's."""
    jobs = compute[compute["row_type"] == "job"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    ax = axes[0]
    if jobs.empty:
        _empty(ax, "no benchmark records yet")
    else:
        by = jobs.groupby("stage")[["gpu_h", "wall_h", "cpu_h"]].sum()
        xs = range(len(by))
        w = 0.27
        for k, (col, label) in enumerate((("gpu_h", "GPU-hours"), ("wall_h", "wall hours"), ("cpu_h", "CPU-hours"))):
            ax.bar([x + (k - 1) * w for x in xs], by[col], w, label=label)
        ax.set_xticks(list(xs), by.index, rotation=30)
        ax.set_ylabel("hours")
        ax.set_title("measured, by stage")
        ax.legend(fontsize=7)
    ax = axes[1]
    proj = compute[compute["row_type"].isin(["projection", "paper"])].copy()
    proj["hours"] = pd.to_numeric(proj["gpu_h"], errors="coerce")
    on_cpu = proj["row_type"].eq("projection") & proj["hours"].fillna(0).eq(0)
    proj.loc[on_cpu, "hours"] = pd.to_numeric(proj.loc[on_cpu, "wall_h"], errors="coerce")
    proj = proj[proj["hours"].notna() & (proj["hours"] > 0)]
    if proj.empty:
        _empty(ax, "no projection yet")
    else:
        labels = [f"{r['job']}\n{r['run']} on {r['device']}" if r["row_type"] == "projection"
                  else f"{r['job']}\n{r['device']}" for _, r in proj.iterrows()]
        colors = ["#e3a13b" if t == "projection" else "#9bb7d4" for t in proj["row_type"]]
        ax.barh(range(len(proj)), proj["hours"], color=colors)
        ax.set_yticks(range(len(proj)), labels, fontsize=7)
        ax.set_xscale("log")
        ax.set_xlim(proj["hours"].min() / 3, proj["hours"].max() * 8)
        for y, h in enumerate(proj["hours"]):
            ax.text(h * 1.1, y, f"{h:.3g} h", va="center", fontsize=7)
        ax.set_xlabel("device-hours (GPU-hours on a GPU), log scale")
        ax.set_title("5B-token pretraining: projected vs paper")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table3", type=Path, required=True)
    ap.add_argument("--compute", type=Path, required=True)
    ap.add_argument("--train-manifests-json", default="{}", help="run -> stage -> its training manifest")
    ap.add_argument("--out-dir", type=Path, required=True)
    args = ap.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    plot_scores(pd.read_csv(args.table3, dtype={"row": str, "seed": str}), args.out_dir / PLOTS["scores"])
    plot_losses(json.loads(args.train_manifests_json), args.out_dir / PLOTS["loss"])
    plot_compute(pd.read_csv(args.compute), args.out_dir / PLOTS["compute"])
    print(f"{args.out_dir}: {', '.join(PLOTS.values())}")


if __name__ == "__main__":
    main()
