"""results/summary.md: what the main command produced, from the run's own files.

    python -m oqvl.report.summary --table4 results/table4.csv --runs-json '{RUN: {...}}' \
        --jobs-json '[[BENCHMARK, MANIFEST], ...]' --config-json '{...}' --out results/summary.md

Written by the table4 rule, beside the table: the table-4 run's scores under each protocol with
their chance level and shuffled-image control, the paper's row, what each job of the run did and
how long it took (Snakemake's benchmark files and the jobs' manifests), and the provenance. Nothing
in it is copied by hand; rerunning `snakemake --cores all results/table4.csv` regenerates it.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pandas as pd

from ..evaluate import BENCHMARKS, SPLITS
from ..io import write_text
from .compute import job_rows
from .tables import MEAN, load_eval

COMMAND = "snakemake --cores all results/table4.csv"


def _fmt(v, digits=1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def scores_section(table4: pd.DataFrame, records: dict) -> list[str]:
    """Per run and protocol, each seed's headline score with its chance level and control, then
    the mean over the seeds, its standard deviation and how many seeds cleared the bar."""
    lines = []
    paper = table4[table4["row"] == "Open-Qwen2VL-2B"]
    for run, record in records.items():
        ev = load_eval(record["evals"])
        if ev.empty:
            lines += [f"Run `{run}` has no evaluation rows.", ""]
            continue
        lines += [f"### Run `{run}`", "",
                  "Per seed: score (chance, shuffled-image control); **bold**: above both by more than 2 "
                  "standard errors (against the control: paired, clustered by image). Per protocol and "
                  "split: the mean over the seeds ± their standard deviation, [seeds over the bar]. Split "
                  "`test` asks in the training phrasing, `heldout` the same items in a wording no "
                  "training data uses. The headline metric of each benchmark and protocol is its first "
                  "row.", "",
                  "| protocol | split | seed | " + " | ".join(BENCHMARKS) + " |",
                  "|---|---|---|" + "---|" * len(BENCHMARKS)]
        ours = table4[(table4["run"] == run) & (table4["scale"] != "paper")]
        for protocol in sorted(set(ev["protocol"]), key=lambda p: (p != "paper", p)):
            for split in [s for s in SPLITS if s in set(ev["split"])]:
                lines += _seed_lines(ev[(ev["protocol"] == protocol) & (ev["split"] == split)], protocol, split)
                mean = ours[(ours["protocol"] == protocol) & (ours["split"] == split)
                            & (ours["seed"].astype(str) == MEAN)]
                if len(mean):
                    m = mean.iloc[0]
                    cells = [" ".join(x for x in (_fmt(m.get(b)), std and f"± {std}", f"[{m.get(f'{b}_over_bar')}]") if x)
                             for b in BENCHMARKS for std in [_fmt(m.get(f"{b}_std"))]]
                    lines.append(f"| {protocol} | {split} | mean | " + " | ".join(cells) + " |")
        if len(paper):
            lines.append("| paper's Open-Qwen2VL-2B | | | " + " | ".join(_fmt(paper.iloc[0].get(b)) for b in BENCHMARKS) + " |")
        lines.append("")
    return lines


def _seed_lines(ev: pd.DataFrame, protocol: str, split: str) -> list[str]:
    """One table line per seed: each benchmark's headline score (chance, control), bold if above both."""
    lines = []
    for seed in sorted({int(x) for x in ev["seed"].dropna()}) or [None]:
        cells = []
        for b in BENCHMARKS:
            rows = ev[(ev["benchmark"] == b) & ((ev["seed"] == seed) if seed is not None else True)]
            if rows.empty:
                cells.append("")
                continue
            r = rows.iloc[0]
            value = _fmt(float(r["value"]))
            cell = f"**{value}**" if r.get("above_chance") is True else value
            extra = ", ".join(x for x in (_fmt(r.get("chance")), _fmt(r.get("control"))) if x)
            cells.append(f"{cell} ({extra})" if extra else cell)
        lines.append(f"| {protocol} | {split} | {'' if seed is None else seed} | " + " | ".join(cells) + " |")
    return lines


def jobs_section(jobs: list) -> list[str]:
    df = job_rows(jobs)
    if df.empty:
        return ["No job records.", ""]
    lines = [f"{len(df)} jobs, {df['wall_h'].sum() * 60:.1f} minutes of job wall time in all, "
             f"{df['gpu_h'].sum():.3f} GPU-hours (from `results/benchmarks/`; every job's row is in "
             "`results/compute.csv` once that target is built).", "",
             "| job | device | wall (s) | work | throughput |", "|---|---|---|---|---|"]
    for _, r in df.iterrows():
        work = f"{r['work']:.0f} {r['work_unit']}" if not math.isnan(r["work"]) else ""
        thr = f"{r['throughput']:.4g} {r['throughput_unit']}" if not math.isnan(r["throughput"]) else ""
        lines.append(f"| {r['job']} | {r['device']} | {r['wall_h'] * 3600:.0f} | {work} | {thr} |")
    return lines + [""]


def provenance_section(table4: pd.DataFrame) -> list[str]:
    ours = table4[table4["scale"] != "paper"]
    if ours.empty:
        return []
    r = ours.iloc[0].where(ours.iloc[0].notna(), "")  # an empty CSV cell reads back as NaN
    return ["## Provenance", "",
            f"- code version: `{r.get('code_version', '')}`",
            f"- config hash: `{r.get('config_hash', '')}`; lock-file hash: `{r.get('lock_hash', '')}`",
            f"- container image: `{r.get('container_image') or 'none (host)'}`",
            "- input hashes: the `input_hashes` column of `results/table4.csv`", ""]


def build(table4: pd.DataFrame, records: dict, jobs: list, config: dict) -> str:
    scale = config.get("scale", "toy")
    lines = [f"# Summary: `{config.get('table4_run', '')}` at {scale} scale", "",
             f"Regenerate with `{COMMAND}` (and the same `--configfile`, if one was given). "
             "Tables: `results/table4.csv` (all rows, provenance), `results/report/table4.html`.", "",
             "## Scores", "", *scores_section(table4, records),
             "## Jobs of this run", "", *jobs_section(jobs), *provenance_section(table4)]
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table4", type=Path, required=True)
    ap.add_argument("--runs-json", required=True, help="run -> the files of its rows (rules/report.smk)")
    ap.add_argument("--jobs-json", required=True, help="[[benchmark, manifest], ...] of the run's jobs")
    ap.add_argument("--config-json", default="{}")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    table4 = pd.read_csv(args.table4, dtype={"row": str, "seed": str})
    text = build(table4, json.loads(args.runs_json), json.loads(args.jobs_json), json.loads(args.config_json))
    write_text(args.out, text)
    print(f"{args.out}: {len(text.splitlines())} lines")


if __name__ == "__main__":
    main()
