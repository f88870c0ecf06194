"""Where a finished run's time went: each rule's jobs, their wall time and share, and the DAG's span.

    .venv/bin/python benchmarks/dag_time.py [WORKDIR]      # default: the checkout (results/ here)

Reads Snakemake's benchmark records (results/benchmarks/**.tsv, one per job, as the accounting
does) and the newest Snakemake log (.snakemake/log/) for the span from the first job's start to
the last job's end. Jobs can overlap on the cores, so the summed job time can exceed the span; the
share is of the summed job time.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from datetime import datetime
from pathlib import Path

from oqvl.report.compute import parse_job

STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")


def dag_span_s(workdir: Path) -> float | None:
    """Seconds between the first and the last timestamp of the newest Snakemake log."""
    logs = sorted((workdir / ".snakemake" / "log").glob("*.snakemake.log"))
    if not logs:
        return None
    stamps = [datetime.strptime(" ".join(m.group(1).split()), "%a %b %d %H:%M:%S %Y")
              for line in logs[-1].read_text().splitlines() if (m := STAMP.match(line.strip()))]
    return (stamps[-1] - stamps[0]).total_seconds() if len(stamps) > 1 else None


def rule_times(workdir: Path) -> dict[str, list[float]]:
    """Rule -> the wall seconds of each of its jobs."""
    root = workdir / "results" / "benchmarks"
    out = defaultdict(list)
    for path in sorted(root.rglob("*.tsv")):
        job = parse_job(path, root)
        if job is not None:
            out[job.rule].append(job.wall_s)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir", nargs="?", type=Path, default=Path("."))
    args = ap.parse_args(argv)
    times = rule_times(args.workdir)
    if not times:
        raise SystemExit(f"{args.workdir / 'results' / 'benchmarks'}: no benchmark records (run the workflow first)")
    total = sum(map(sum, times.values()))
    print(f"{'rule':<20} {'jobs':>4} {'wall s':>9} {'share':>7}")
    for rule, walls in sorted(times.items(), key=lambda kv: -sum(kv[1])):
        print(f"{rule:<20} {len(walls):>4} {sum(walls):>9.1f} {100 * sum(walls) / total:>6.1f}%")
    print(f"{'all jobs':<20} {sum(map(len, times.values())):>4} {total:>9.1f}")
    span = dag_span_s(args.workdir)
    if span is not None:
        print(f"DAG span (newest Snakemake log): {span:.0f} s = {span / 60:.1f} min")


if __name__ == "__main__":
    main()
