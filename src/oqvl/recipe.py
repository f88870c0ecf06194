"""The paper-scale config against the reference's recipe, value by value.

    python -m oqvl.recipe                      # the table: key, reference, full.yaml, source, match
    python -m oqvl.recipe --check              # exit 1 if a value that should match does not

config/full.reference.csv holds, for every recipe value of config/full.yaml, the reference's value
(JSON) and where it comes from (a file and line of the reference code, or the paper). Its status:
  same     full.yaml must hold the reference's value (checked, schema defaults included);
  unfixed  the reference leaves it to the user (a script argument) or has no such setting;
  differs  a deliberate difference, said in the note (improvements are switches, named runs).
Every other value of full.yaml is a path to a download or a setting outside the recipe
(`NOT_RECIPE`, each with its reason), so a new recipe value without a source is an error.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from .config import load

REPO = Path(__file__).resolve().parents[2]
FULL = REPO / "config" / "full.yaml"
TABLE = REPO / "config" / "full.reference.csv"
STATUSES = ("same", "unfixed", "differs")

# full.yaml keys (glob patterns) that are not recipe values, and why.
NOT_RECIPE = {
    "scale": "selects paper scale",
    "seed": "this project's data-order seed (the reference's is in its run config)",
    "sources.*.pair_list": "where the user put the release",
    "sources.*.paper_id": "the row number of the paper's Table 3",
    "sources.*.revision": "the hub revision downloaded (recorded)",
    "sources.*.shards": "where the user put the released shards",
    "filter.clip.pretrained": "where the user put the CLIP weights",
    "filter.clip.batch_size": "throughput only",
    "filter.sources.*.uid_list": "where the user put the released uid list",
    "filter.mlm.scores_dir": "where the user put the official scorer's outputs",
    "filter.mlm.release.*": "where the user put the released MLM-Filter",
    "filter.mlm.batch_size": "throughput only",
    "filter.mlm.chunk": "resume granularity only",
    "mixtures.*.paper_id": "the row number of the paper's Table 3",
    "mixtures.*.samples_per_shard": "shard size of the mixture (not read by training)",
    "model.tokenizer.path": "where the user put the tokenizer",
    "model.vision_weights": "where the user put the vision weights",
    "model.lm_path": "where the user put the LLM",
    "raw.processes": "download parallelism only",
    "raw.threads": "download parallelism only",
    "raw.timeout_s": "download robustness only",
    "raw.retries": "download robustness only",
    "sources.*.download.processes": "download parallelism only",
    "sources.*.download.threads": "download parallelism only",
    "train.threads": "CPU threads per process (0: torch's default)",
    "train.tensorboard": "logging only",
    "train.wandb": "logging only",
    "train.nodes": "machines the processes run on (the global batch, not the world size, is the recipe)",
    "cluster.*": "what each job asks the cluster for (the paper ran on its own machines)",
    "sft_data.path": "where the user put the SFT data",
    "sft_data.image_root": "where the user put the SFT images",
    "runs.*.sft_data.path": "where the user put the SFT data",
    "runs.*.sft_data.image_root": "where the user put the SFT images",
    "runs.*.mixture": "names a mixture (the mixtures' own rows are the recipe)",
    "runs.ccs+datacomp_mlm+isolation.*": "this project's ablation, not the reference's",
    "released.*": "the released checkpoints (Open-Qwen2VL, the Qwen2-VL baseline) scored as they are",
    "evaluate.*": "the protocols are code (oqvl.evaluate.paper, shared/reference paper-protocol.md)",
    "report.*": "the paper's reported compute and this project's projection",
    "containers.*": "this project's images",
}


@dataclass(frozen=True)
class Row:
    key: str
    status: str
    reference: object
    source: str
    note: str


def read_table(path: Path = TABLE) -> list[Row]:
    rows = []
    with open(path, newline="") as f:
        for n, r in enumerate(csv.DictReader(f), 2):
            if r["status"] not in STATUSES:
                raise ValueError(f"{path}:{n}: status {r['status']!r} is not one of {STATUSES}")
            try:
                ref = json.loads(r["reference"])
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{n}: reference {r['reference']!r} is not JSON") from None
            rows.append(Row(r["key"], r["status"], ref, r["source"], r["note"]))
    return rows


def get(config: dict, key: str):
    """The value at a dotted key; mixture and run names hold dots' neighbours ('+', '_') only."""
    value = config
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(key)
        value = value[part]
    return value


def leaves(d: dict, prefix: str = ""):
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            yield from leaves(v, key)
        else:
            yield key, v


def compare(config: dict, rows: list[Row]) -> list[dict]:
    out = []
    for r in rows:
        try:
            value = get(config, r.key)
        except KeyError:
            value = "(absent)"
        match = value == r.reference if r.status == "same" else None
        out.append({"key": r.key, "reference": r.reference, "full.yaml": value, "status": r.status,
                    "match": match, "source": r.source, "note": r.note})
    return out


def unsourced(raw: dict, rows: list[Row]) -> list[str]:
    """full.yaml keys that are neither in the table nor outside the recipe."""
    known = {r.key for r in rows}
    return [k for k, _ in leaves(raw)
            if k not in known and not any(fnmatch.fnmatchcase(k, p) for p in NOT_RECIPE)]


def markdown(compared: list[dict]) -> str:
    def cell(v):
        return json.dumps(v).replace("|", "\\|")

    lines = ["| key | reference | full.yaml | match | source | note |", "|---|---|---|---|---|---|"]
    for c in compared:
        mark = {True: "yes", False: "**NO**", None: c["status"]}[c["match"]]
        lines.append(f"| {c['key']} | {cell(c['reference'])} | {cell(c['full.yaml'])} | {mark} | "
                     f"{c['source']} | {c['note']} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=FULL)
    ap.add_argument("--table", type=Path, default=TABLE)
    ap.add_argument("--check", action="store_true", help="exit 1 on a mismatch or an unsourced value")
    args = ap.parse_args(argv)
    rows = read_table(args.table)
    compared = compare(load(args.config), rows)
    print(markdown(compared))
    bad = [c["key"] for c in compared if c["match"] is False]
    missing = unsourced(yaml.safe_load(args.config.read_text()), rows)
    if bad:
        print(f"\n{args.config}: differs from the reference at {bad}", file=sys.stderr)
    if missing:
        print(f"\n{args.config}: values without a source in {args.table}: {missing}", file=sys.stderr)
    if args.check and (bad or missing):
        sys.exit(1)


if __name__ == "__main__":
    main()
