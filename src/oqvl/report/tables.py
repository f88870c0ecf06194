"""Result tables beside the paper's published numbers.

    python -m oqvl.report.tables table4 --out results/table4.csv --html results/report/table4.html \
        --runs-json '{RUN: {"mixture", "evals", "pretrain_summary", "pretrain_job", "manifests"}}' \
        --config-json '{...}'

The runs' files are named by the workflow (rules/report.smk, from oqvl.layout) and declared as the
rule's inputs; the table reads nothing else of results/.

Rows carry their scale and protocol explicitly: the paper's rows are `scale=paper,
protocol=paper`; reproduced rows say which scale and protocol produced them, and on which benchmark
split (`split`: test, or at toy scale heldout, the test items in a wording no training data uses).
A run has one row per protocol, split and seed (`seed` 0, 1, ...: its own pretrain -> SFT ->
evaluate chain) and, first, the row `seed=mean`: each benchmark's mean over the seeds, its standard deviation (`<B>_std`, n - 1 in
the denominator; empty for one seed) and how many seeds cleared the bar (`<B>_over_bar`, "k/n":
above chance and the shuffled-image control, oqvl.evaluate.tidy); its `not_above_chance` lists the
benchmarks that not every seed cleared. Rows of runs that the workflow has not evaluated are
absent, never filled in; a benchmark a run has no score for stays empty and its average with it.

table4: the final model (config `table4_run`) beside the paper's Table 4, and beside the paper's
Table 3 row of the same data mixture: the paper's Table 4 model is fine-tuned on MAmmoTH-VL 10M,
its Table 3 rows on LLaVA-665k, and the `sft_data` column says which data every row used, so a
reproduction is read against the row fine-tuned like it. table3: the data-mixture ablation (1+2,
1+3, 1+2+3, 1+4), each mixture's runs beside the paper's row of the same id.
Every reproduced row carries its provenance: code version, config hash, lock-file hash, container
image id (when one ran), and the sha256 of the files it was computed from.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import config_hash
from ..evaluate import BENCHMARKS, PROTOCOLS, SPLITS
from ..io import sha256_file
from ..layout import PAPER_TABLES as PAPER_TABLES_PATH
from ..manifest import REPO_ROOT, code_version
from . import html as html_page
from .compute import job_rows, report_settings

PAPER_TABLES = REPO_ROOT / PAPER_TABLES_PATH
LOCK_FILE = REPO_ROOT / "requirements.lock"

TABLE3_IDS = ["1+2", "1+3", "1+2+3", "1+4"]
PROVENANCE = ["code_version", "config_hash", "lock_hash", "container_image", "input_hashes"]
MEAN = "mean"  # the seed column of a run's row over its seeds
SEED_COLUMNS = [f"{b}_{k}" for k in ("std", "over_bar") for b in BENCHMARKS]
COLUMNS = ["table", "row", "run", "scale", "protocol", "split", "seed", "pretrain_data", "pretrain_tokens", "sft_data",
           *BENCHMARKS, "avg_5", "paper_avg_8", *SEED_COLUMNS, "pretrain_gpu_hours", "pretrain_wall_hours",
           "pretrain_device", "not_above_chance", "source", *PROVENANCE]
SOURCE = "Wang et al. 2025, Open-Qwen2VL"
# The SFT data of the paper's rows (prismatic-vlms/fine_tune_mammoth.sh for Table 4's model; Table
# 3's mixtures are all fine-tuned on LLaVA-665k); the baselines are others' finished models.
PAPER_FINAL = "Open-Qwen2VL-2B"
PAPER_SFT = {"table4": {PAPER_FINAL: "MAmmoTH-VL-10M (single-image)"}, "table3": "LLaVA-665k"}


# ------------------------------------------------------------------------------------ paper rows

def paper_rows(table: str, config: dict | None = None) -> pd.DataFrame:
    ref = pd.read_csv(PAPER_TABLES, dtype={"pretrain_tokens": str, "row": str})
    rows = ref[ref["table"] == table].copy()
    if rows.empty:
        raise ValueError(f"{PAPER_TABLES}: no rows for table {table!r}")
    rows["scale"] = "paper"
    rows["protocol"] = "paper"
    rows["run"] = ""
    rows["paper_avg_8"] = rows["Avg"]  # the paper's average is over 8 benchmarks, 3 not reproduced
    rows["source"] = f"{SOURCE}, " + ("Table 4" if table == "table4" else "Table 3")
    sft = PAPER_SFT[table]
    rows["sft_data"] = rows["row"].map(lambda r: sft.get(r, "its own") if isinstance(sft, dict) else sft)
    if table == "table4":
        rep = report_settings(config or {})
        hours = rep["paper_gpu_hours"]
        ours = rows["row"] == "Open-Qwen2VL-2B"
        latest = list(hours)[-1]
        rows.loc[ours, "pretrain_gpu_hours"] = float(hours[latest])
        rows.loc[ours, "pretrain_device"] = rep["paper_device"]
        rows.loc[ours, "source"] += "; GPU-hours " + ", ".join(f"{v} ({k})" for k, v in hours.items())
    return rows.reindex(columns=COLUMNS)


# ----------------------------------------------------------------------------- reproduced rows

def sft_data_name(config: dict) -> str:
    """What the workflow fine-tuned on: config sft_data.name, else its file's name."""
    sft = config.get("sft_data") or {}
    if sft.get("name"):
        return sft["name"]
    return Path(sft["path"]).name if sft.get("path") else "toy conversations (generated)"


def same_mixture_row(config: dict) -> pd.DataFrame:
    """The paper's Table 3 row of the final run's mixture, its model fine-tuned on LLaVA-665k."""
    run = (config.get("runs") or {}).get(config.get("table4_run")) or {}
    paper_id = ((config.get("mixtures") or {}).get(run.get("mixture")) or {}).get("paper_id")
    rows = paper_rows("table3")
    rows = rows[rows["row"] == paper_id].copy()
    rows["row"] = f"{PAPER_FINAL} ({paper_id}, Table 3)"
    rows["table"] = "table4"
    return rows


def canonical_benchmark(name: str) -> str | None:
    for b in BENCHMARKS:
        if b.lower() == str(name).lower():
            return b
    return None


def load_eval(files: list) -> pd.DataFrame:
    """All tidy evaluation rows of a run's evaluation files (eval/<benchmark>.json), with their file."""
    frames = []
    for path in map(Path, files):
        rows = json.loads(path.read_text())
        if not isinstance(rows, list):
            raise TypeError(f"{path}: an evaluation file holds a JSON list of rows")
        df = pd.DataFrame(rows)
        if df.empty:
            continue
        df["file"] = str(path)
        frames.append(df)
    if not frames:
        return pd.DataFrame(columns=["run", "seed", "split", "benchmark", "protocol", "metric", "value", "n",
                                     "chance", "control", "above_chance", "file"])
    df = pd.concat(frames, ignore_index=True)
    if "seed" not in df:  # rows of a released checkpoint, or written before seeds
        df["seed"] = None
    df["split"] = df["split"].fillna("test") if "split" in df else "test"  # written before splits
    df["benchmark"] = df["benchmark"].map(canonical_benchmark)
    return df[df["benchmark"].notna()]


def pick_metric(rows: pd.DataFrame, preferred: str | None) -> pd.Series:
    """The one score shown for a benchmark: the preferred metric (config report.metrics) if the
    file has it, else the protocol's first row, its headline metric."""
    if preferred is not None and (rows["metric"] == preferred).any():
        return rows[rows["metric"] == preferred].iloc[0]
    return rows.iloc[0]


def _seed_key(seed):
    return -1 if seed is None or (isinstance(seed, float) and math.isnan(seed)) else int(seed)


def score_rows(ev: pd.DataFrame, metrics: dict) -> list[dict]:
    """One dict per protocol, split and seed: benchmark -> score, and the benchmarks not above
    chance (`below`, a list). Scores are percentages (0-100), as the evaluation stage writes them
    and the paper prints them."""
    if ev.empty:
        return []
    out = []
    protocols = [p for p in PROTOCOLS if p in set(ev["protocol"])] + sorted(set(ev["protocol"]) - set(PROTOCOLS))
    splits = [s for s in SPLITS if s in set(ev["split"])]
    seeds = sorted({_seed_key(s) for s in ev["seed"]})
    for protocol, split, seed in ((p, sp, se) for p in protocols for sp in splits for se in seeds):
        sub = ev[(ev["protocol"] == protocol) & (ev["split"] == split) & (ev["seed"].map(_seed_key) == seed)]
        if sub.empty:
            continue
        row = {"protocol": protocol, "split": split, "seed": None if seed < 0 else seed, "below": []}
        for bench in BENCHMARKS:
            rows = sub[sub["benchmark"] == bench]
            if rows.empty:
                continue
            chosen = pick_metric(rows, metrics.get(bench))
            row[bench] = round(float(chosen["value"]), 2)
            # False is a verdict; None (a metric with no chance level) is none.
            if chosen.get("above_chance") is False or chosen.get("above_chance") is np.False_:
                row["below"].append(bench)
        out.append(row)
    return out


def over_seeds(rows: list[dict]) -> dict:
    """The `seed=mean` row of one protocol's seed rows: mean, std and k/n over the bar per benchmark."""
    out = {"seed": MEAN, "below": []}
    for bench in BENCHMARKS:
        values = [r[bench] for r in rows if bench in r]
        if not values:
            continue
        out[bench] = round(float(np.mean(values)), 2)
        out[f"{bench}_std"] = round(float(np.std(values, ddof=1)), 2) if len(values) > 1 else None
        k = sum(bench not in r["below"] for r in rows if bench in r)
        out[f"{bench}_over_bar"] = f"{k}/{len(values)}"
        if k < len(values):
            out["below"].append(bench)
    return out


def seed_rows(scores: list[dict]) -> list[dict]:
    """Per protocol and split, the mean row over the seeds, then each seed's row."""
    out = []
    for protocol, split in dict.fromkeys((s["protocol"], s["split"]) for s in scores):
        rows = [s for s in scores if (s["protocol"], s["split"]) == (protocol, split)]
        out += [{"protocol": protocol, "split": split, **over_seeds(rows)}, *rows]
    return out


def human_count(n) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return ""
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{int(n)}"


def _json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def provenance(record: dict, config: dict) -> dict:
    """Code version, config hash, lock hash, container image and input hashes of one run's rows:
    its evaluation files, its pretraining summary and every manifest the record names."""
    summary = record.get("pretrain_summaries") or []  # none: a release
    files = sorted(map(Path, [*record["evals"], *summary, *record["manifests"]]))
    manifests = [m for p in map(Path, record["manifests"]) if (m := _json(p)) and isinstance(m, dict)]
    summaries = [s for s in [_json(Path(p)) for p in summary] if s]
    versions = sorted({m["code_version"] for m in manifests if m.get("code_version")}) or [code_version()]
    images = sorted({str(d[k]) for d in manifests + summaries for k in ("container_image", "image_id") if d.get(k)})
    images = images or ([os.environ["OQVL_CONTAINER_IMAGE"]] if os.environ.get("OQVL_CONTAINER_IMAGE") else [])

    def rel(p):
        return os.path.relpath(p)  # relative to the workflow's directory, where the rule runs

    return {
        "code_version": ";".join(versions),
        # The report section only changes how results are shown, not what was computed.
        "config_hash": config_hash({k: v for k, v in config.items() if k != "report"}),
        "lock_hash": sha256_file(LOCK_FILE)[:16] if LOCK_FILE.is_file() else "",
        "container_image": ";".join(images),
        "input_hashes": " ".join(f"{rel(p)}:{sha256_file(p)[:16]}" for p in files),
    }


def pretrain_compute(record: dict, seed=MEAN) -> dict:
    """GPU-hours, wall hours and device of a run's pretraining job of one seed (its benchmark and
    manifest), or their mean over the seeds."""
    pairs = dict(zip(record["seeds"], record["pretrain_jobs"]))
    jobs = job_rows(list(pairs.values()) if seed == MEAN else [pairs[seed]] if seed in pairs else [])
    if jobs.empty:
        return {}
    n = len(jobs)
    return {"pretrain_gpu_hours": round(float(jobs["gpu_h"].sum()) / n, 6),
            "pretrain_wall_hours": round(float(jobs["wall_h"].sum()) / n, 6),
            "pretrain_device": ";".join(sorted(set(jobs["device"].dropna().astype(str)) - {""}))}


def reproduced_rows(table: str, runs: dict, config: dict, label=None) -> pd.DataFrame:
    """Rows of the runs (name -> record of its declared files); a run whose evaluation files hold
    no rows gives none."""
    rep = report_settings(config)
    metrics = rep.get("metrics") or {}
    all_runs = config.get("runs") or {}
    mixtures = config.get("mixtures") or {}
    out = []
    for run, record in runs.items():
        scores = score_rows(load_eval(record["evals"]), metrics)
        if not scores:
            continue
        mixture = record.get("mixture") or (all_runs.get(run) or {}).get("mixture")
        mix_cfg = mixtures.get(mixture) or {}
        summary = _json(Path(record["pretrain_summaries"][0])) or {}  # every seed trains the same tokens
        mixture_manifest = next((m for p in record["manifests"] if (m := _json(Path(p))) and m.get("stage") == "mixture"), {})
        pairs = mixture_manifest.get("counts", {}).get("total")
        data = f"{mixture} ({mix_cfg.get('paper_id', '?')})" if mixture else ""
        if pairs:
            data += f", {human_count(pairs)} pairs"
        base = {
            "table": table, "run": run, "scale": config.get("scale", "toy"),
            "row": label(run, mix_cfg) if label else run,
            "pretrain_data": data, "pretrain_tokens": human_count(summary.get("tokens")),
            "sft_data": record.get("sft_data") or sft_data_name(config),
            "source": f"this workflow, {config.get('scale', 'toy')} scale",
            **provenance(record, config),
        }
        for s in seed_rows(scores):
            out.append({**base, **pretrain_compute(record, s["seed"]), **_cells(s)})
    return pd.DataFrame(out).reindex(columns=COLUMNS)


def _cells(score: dict) -> dict:
    """A score dict's table cells: `below` as the not_above_chance column."""
    return {**{k: v for k, v in score.items() if k != "below"}, "not_above_chance": ";".join(score["below"])}


def released_rows(released: dict, config: dict) -> pd.DataFrame:
    """Rows of released checkpoints the workflow evaluated without training them (config
    `released`): scale paper, one row per protocol, labelled as measured here."""
    metrics = report_settings(config).get("metrics") or {}
    out = []
    for name, record in released.items():
        scores = score_rows(load_eval(record["evals"]), metrics)
        base = {"table": "table4", "run": name, "scale": "paper",
                "row": f"{record.get('paper_row') or name} (released checkpoint, measured)",
                "sft_data": record.get("sft_data") or "",
                "source": "this workflow: the released checkpoint, evaluated"
                          + (f" (revision {record['revision']})" if record.get("revision") else ""),
                **provenance(record, config)}
        out += [{**base, **_cells(s)} for s in scores]
    return pd.DataFrame(out).reindex(columns=COLUMNS)


def with_average(df: pd.DataFrame) -> pd.DataFrame:
    vals = df[list(BENCHMARKS)].apply(pd.to_numeric, errors="coerce")
    # The mean of the five reproduced benchmarks, only where all five exist (never a partial mean).
    df["avg_5"] = vals.mean(axis=1).where(vals.notna().all(axis=1)).round(2)
    return df


def table3_runs(config: dict) -> list[str]:
    rep = report_settings(config)
    if rep.get("table3_runs"):
        return list(rep["table3_runs"])
    mixtures = config.get("mixtures") or {}
    return [name for name, run in (config.get("runs") or {}).items()
            if (mixtures.get(run.get("mixture")) or {}).get("paper_id") in TABLE3_IDS]


def build(table: str, config: dict | None = None, runs: dict | None = None,
          released: dict | None = None) -> pd.DataFrame:
    """The table: the paper's rows and the rows of `runs` (name -> record of its declared files);
    table4 also the released checkpoints' (name -> oqvl.plan's released record)."""
    config, runs = config or {}, runs or {}
    paper = paper_rows(table, config)
    if table == "table4":
        ours = reproduced_rows(table, runs, config)
        measured = released_rows(released or {}, config)
        df = pd.concat([p for p in (paper, measured, same_mixture_row(config), ours) if len(p)],
                       ignore_index=True)
    else:
        ours = reproduced_rows(table, runs, config, label=lambda run, mix: str(mix.get("paper_id", "")))
        # Each paper row, then the reproduced rows of the same mixture id; others after.
        parts = []
        for pid in paper["row"]:
            parts.append(paper[paper["row"] == pid])
            if len(ours):
                parts.append(ours[ours["row"] == pid])
        if len(ours):
            parts.append(ours[~ours["row"].isin(paper["row"])])
        df = pd.concat([p for p in parts if len(p)], ignore_index=True)
    return with_average(df.reindex(columns=COLUMNS)).reset_index(drop=True)


# ------------------------------------------------------------------------------------------ HTML

def to_html(df: pd.DataFrame, title: str, note: str = "") -> str:
    """A standalone page: the table, paper rows white and reproduced rows tinted, provenance in a
    second table below (its hashes are too wide for the main one)."""
    shown = [c for c in COLUMNS if c not in PROVENANCE and c != "table"]
    hours = {c: (lambda v: f"{v:.4g}") for c in ("pretrain_gpu_hours", "pretrain_wall_hours")}
    body = html_page.table(df, shown, row_class=lambda r: "paper" if r["scale"] == "paper" else "repro",
                           table_id="results", fmt=hours)
    prov = df[df["scale"] != "paper"]
    if len(prov):
        body += ("<h2>Provenance of reproduced rows</h2>"
                 + html_page.table(prov, ["row", "run", "protocol", *PROVENANCE], css_class="prov"))
    return html_page.page(title, note, body)


TITLES = {
    "table4": ("Table 4: the final model beside the paper's",
               ("Scores in percent on five benchmarks the workflow reproduces; scale and protocol on every "
                "row; tinted rows are this workflow's. avg_5 averages those five (paper_avg_8 is the "
                "paper's own average over eight).")),
    "table3": ("Table 3: data-mixture ablation beside the paper's",
               ("Each paper row (1 = CCS, 2 = DataComp-DFN, 3 = LAION, 4 = DataComp-MLM-Filter&DFN) is "
                "followed by the reproduced runs of the same mixture (tinted).")),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("table", choices=["table3", "table4"])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--html", type=Path, default=None, help="also write the table as a standalone page")
    ap.add_argument("--runs-json", default="{}", help="run -> the files of its rows (rules/report.smk)")
    ap.add_argument("--released-json", default="{}",
                    help="table4: released checkpoint -> its evaluation files (rules/report.smk)")
    ap.add_argument("--config-json", default="{}", help="the resolved workflow config as JSON")
    args = ap.parse_args(argv)
    df = build(args.table, json.loads(args.config_json), json.loads(args.runs_json), json.loads(args.released_json))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)
    if args.html:
        args.html.parent.mkdir(parents=True, exist_ok=True)
        args.html.write_text(to_html(df, *TITLES[args.table]))
    n_repro = int((df["scale"] != "paper").sum())
    print(f"{args.out}: {len(df)} rows ({n_repro} reproduced)")


if __name__ == "__main__":
    main()
