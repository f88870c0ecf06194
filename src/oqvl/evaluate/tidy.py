"""Tidy result rows: one per (benchmark, protocol, metric), with chance level and control.

    {"run": "ccs+laion", "seed": 0, "split": "test", "benchmark": "POPE", "protocol": "paper", "metric": "accuracy",
     "value": 71.2, "n": 1800, "chance": 50.0, "control": 50.4, "above_chance": true}

Values, chance levels and controls are percentages (0-100). The first row of a protocol is its
headline metric. `chance` is the best score an answerer that never looks at the image can expect
on this data, counting only answers a model can produce under the protocol: 1/options for lettered
questions ((1/k)^k for MMBench's circular scoring, which needs all k copies right); for MathVista's
free-form questions the share of the most common reachable answer of their answer type (integer,
float, ...): under the paper protocol generation stops at "." so only whole numbers are reachable
("1" scores 1.0, nothing scores 0.25), under lmms-eval's no float or list answer ever scores
(oqvl.evaluate.lmms); for POPE the majority answer's share (accuracy) and the F1 of always
answering "yes"; 50 for AUC. What a model can learn from the question text alone
(e.g. that "How many red objects are there?" is most often 0) is what the control measures.
Metrics that describe rather than score (precision, recall, yes-ratio) have no chance level and
`above_chance` null. `control` is the same metric with every
image moved to another question (null when the control was not run).

`above_chance` is true only if the value beats both the chance level and the control by more than
two standard errors: a model that ignores the image, or an answer bias, cannot pass it. For the
headline metric the test is paired and clustered (oqvl.evaluate.paired: the same questions with
and without their images, questions sharing an image as one cluster), and its row says so
(`test`, `control_diff` and its `control_diff_se`, `clusters`); the other metrics (F1, per-split
scores, AUC) keep the unpaired binomial test over n questions (`test`: binomial).
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from typing import NamedTuple

import pyarrow.parquet as pq

from .paired import Z, headline_test
from .schemas import CIRCULAR_OFFSET
from .tasks import task_name

class Metric(NamedTuple):
    key: str  # lmms-eval's metric key
    name: str  # the tidy metric name
    factor: float  # to percent
    rule: str | None  # chance rule (chance_level)
    variant: str | None = None  # the extra task it comes from (tasks.VARIANTS)


M = Metric
# The first of each list is the headline.
METRICS: dict[tuple[str, str], list[Metric]] = {
    ("MMBench", "paper"): [M("accuracy", "accuracy", 1, "options")],
    ("SEEDBench", "paper"): [M("accuracy", "accuracy", 1, "options")],
    ("MMStar", "paper"): [M("accuracy", "accuracy", 1, "options")],
    ("MathVista", "paper"): [M("accuracy", "accuracy", 1, "mathvista_paper")],
    ("POPE", "paper"): [
        M("accuracy", "accuracy", 1, "majority"), M("f1", "f1", 1, "yes_f1"),
        M("yes_ratio", "yes_ratio", 1, None),
        *(M(f"{m}_{s}", f"{m}_{s}", 1, f"{rule}:{s}") for s in ("adversarial", "popular", "random")
          for m, rule in (("accuracy", "majority"), ("f1", "yes_f1"))),
        M("likelihood_accuracy", "likelihood_accuracy", 1, "majority", "likelihood"),
        M("likelihood_auc", "likelihood_auc", 1, "auc", "likelihood"),
    ],
    ("MMBench", "lmms"): [M("gpt_eval_score", "circular_accuracy", 1, "circular")],
    ("SEEDBench", "lmms"): [M("seed_image", "accuracy", 100, "options")],
    ("MMStar", "lmms"): [M("average", "accuracy", 100, "options")],
    ("MathVista", "lmms"): [M("llm_as_judge_eval", "accuracy", 1, "mathvista_lmms"),
                            M("share_float_never_scored", "share_float_never_scored", 1, None),
                            M("share_choice_by_shortest", "share_choice_by_shortest", 1, None)],
    ("POPE", "lmms"): [
        M("pope_accuracy", "accuracy", 100, "majority"), M("pope_f1_score", "f1", 100, "yes_f1"),
        M("pope_precision", "precision", 100, None), M("pope_recall", "recall", 100, None),
        M("pope_yes_ratio", "yes_ratio_ground_truth", 100, None),
    ],
}

TEXT_COLUMNS = {
    "MMBench": ["index", "A", "B", "C", "D"],
    "SEEDBench": ["choice_a", "choice_b", "choice_c", "choice_d"],
    "MMStar": ["question"],
    "MathVista": ["choices", "answer", "answer_type"],
    "POPE": ["answer", "category"],
}


def _present(v) -> bool:
    return v is not None and str(v).strip() not in ("", "nan")


def read_answers(path, benchmark: str) -> list[dict]:
    """The benchmark's rows without images (enough for chance levels and counts)."""
    return pq.read_table(path, columns=TEXT_COLUMNS[benchmark]).to_pylist()


def n_options(benchmark: str, row: dict) -> int:
    if benchmark == "MMBench":
        return sum(_present(row[c]) for c in "ABCD")
    if benchmark == "SEEDBench":
        return sum(_present(row[f"choice_{c}"]) for c in "abcd")
    if benchmark == "MMStar":
        inline = row["question"].rsplit("Options:", 1)[-1]
        return len(set(re.findall(r"(?:^|[\s,])([A-H]):", inline))) or 4
    raise ValueError(benchmark)


def chance_level(rule: str | None, benchmark: str, rows: list[dict]) -> float | None:
    """The chance level in percent of one metric (see the module docstring)."""
    if rule is None:
        return None
    if rule == "options":
        return 100 * sum(1 / n_options(benchmark, r) for r in rows) / len(rows)
    if rule == "circular":
        groups = defaultdict(list)
        for r in rows:
            groups[r["index"] % CIRCULAR_OFFSET].append(n_options(benchmark, r))
        return 100 * sum((1 / ks[0]) ** len(ks) for ks in groups.values()) / len(groups)
    if rule in ("mathvista_paper", "mathvista_lmms"):
        protocol = rule.split("_")[1]
        by_type = defaultdict(Counter)  # the reachable answers per answer type
        for r in rows:
            if not r["choices"]:
                by_type[r["answer_type"]][reachable_answer(r, protocol)] += 1
        total = 0.0
        for r in rows:
            if r["choices"]:
                total += 1 / len(r["choices"])
            else:  # the best constant reachable answer of the row's type
                answers = by_type[r["answer_type"]]
                best = max((c for a, c in answers.items() if a is not None), default=0)
                total += best / sum(answers.values())
        return 100 * total / len(rows)
    kind, _, category = rule.partition(":")  # POPE's rules, optionally for one split
    if kind in ("majority", "yes_f1"):
        chosen = [r for r in rows if not category or r["category"] == category]
        if not chosen:
            return None
        yes = sum(r["answer"].strip().lower() == "yes" for r in chosen) / len(chosen)
        # the majority answer's share; the F1 of always answering "yes"
        return 100 * (max(yes, 1 - yes) if kind == "majority" else 2 * yes / (1 + yes))
    if rule == "auc":
        return 50.0
    raise ValueError(f"unknown chance rule {rule!r}")


def reachable_answer(row: dict, protocol: str):
    """A free-form MathVista answer as an output that scores it, or None if no output can: the paper
    protocol stops generating at "." and "," (a whole number's digits still match its float, "1"
    scores 1.0); lmms-eval scores no float (its round(x, 2.0) raises) and no list answer."""
    answer = str(row["answer"]).strip()
    if protocol == "lmms":
        return None if row["answer_type"] in ("float", "list") else answer.lower()
    try:
        value = float(answer.replace(",", ""))
    except ValueError:
        return None if ("." in answer or "," in answer) else answer.lower()
    return str(int(value)) if value.is_integer() else None


def scored_items(rule: str | None, benchmark: str, rows: list[dict]) -> int:
    """Questions a metric is computed over (MMBench circular: questions, not rows)."""
    if rule == "circular":
        return len({r["index"] % CIRCULAR_OFFSET for r in rows})
    if rule and ":" in rule:
        return sum(r["category"] == rule.split(":", 1)[1] for r in rows)
    return len(rows)


def beats(value: float, reference: float, n: int, reference_noisy: bool) -> bool:
    """value > reference by more than Z standard errors (binomial, n items; both noisy if the
    reference is itself measured, as the control is)."""
    v, r = value / 100, reference / 100
    var = r * (1 - r) / n + (v * (1 - v) / n if reference_noisy else 0.0)
    return v - r > Z * math.sqrt(max(var, 1e-12))


def metric_value(results: dict, task: str, key: str, factor: float) -> float | None:
    block = results["results"].get(task)
    if block is None:
        raise KeyError(f"lmms-eval results have no task {task}")
    raw = block.get(f"{key},none")
    if raw is None or raw == "N/A":
        # lmms-eval's MathVista aggregation reports an accuracy of 0 as None.
        return 0.0 if key == "llm_as_judge_eval" else None
    return float(raw) * factor


def rows_for(run: str, benchmark: str, protocol: str, results: dict, answers: list[dict],
             control: bool, seed: int | None = None, samples_dir=None, groups: list | None = None,
             split: str = "test") -> list[dict]:
    """The tidy rows of one protocol's results; with the control's per-sample logs in samples_dir
    and the image group of every row, the headline's test is paired and clustered."""
    out = []
    for i, (key, name, factor, rule, variant) in enumerate(METRICS[(benchmark, protocol)]):
        task = task_name(benchmark, protocol, variant=variant)
        shuffled = task_name(benchmark, protocol, shuffled=True, variant=variant)
        value = metric_value(results, task, key, factor)
        if value is None:
            continue
        ctrl = metric_value(results, shuffled, key, factor) if control else None
        chance = chance_level(rule, benchmark, answers)
        n = scored_items(rule, benchmark, answers)
        above, test = None, {}
        if chance is not None and ctrl is not None:
            if i == 0 and samples_dir is not None and groups is not None:
                test = headline_test(benchmark, protocol, samples_dir / f"samples_{task}.jsonl",
                                     samples_dir / f"samples_{shuffled}.jsonl", groups, chance)
                beats_chance, beats_control = test.pop("beats_chance"), test.pop("beats_control")
                above = beats_chance and beats_control
            else:
                test = {"test": "binomial"}
                above = beats(value, chance, n, False) and beats(value, ctrl, n, True)
        out.append({"run": run, "seed": seed, "split": split, "benchmark": benchmark, "protocol": protocol, "metric": name,
                    "value": round(value, 4), "n": n,
                    "chance": None if chance is None else round(chance, 4),
                    "control": None if ctrl is None else round(ctrl, 4), "above_chance": above, **test})
    return out


def main(argv=None):
    """Gather evaluation rows files (JSON lists written by `python -m oqvl.evaluate`) into one CSV."""
    import argparse
    import json
    import sys
    from pathlib import Path

    import pandas as pd

    from ..io import sha256_file, write_text
    from ..manifest import args_config, manifest_path, write_manifest

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("rows", nargs="+", type=Path, help="eval/<Benchmark>.json files")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    rows = []
    for path in args.rows:
        try:
            got = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            sys.exit(f"error: {path}: not a rows file ({e})")
        if not isinstance(got, list):
            sys.exit(f"error: {path}: expected a JSON list of tidy rows")
        rows += got
    write_text(args.out, pd.DataFrame(rows).to_csv(index=False))
    write_manifest(manifest_path(args.out), "run_results", work=(len(rows), "rows"), config=args_config(args),
                   files=[args.out], counts={"rows": len(rows), "benchmarks": len(args.rows)},
                   inputs={str(path): sha256_file(path) for path in args.rows})
    print(f"{args.out}: {len(rows)} rows")


if __name__ == "__main__":
    main()
