"""Which rule a model's POPE answers follow: the truth, or colour alone, or shape alone.

    .venv/bin/python benchmarks/pope_policy.py results/eval_data/test/POPE.parquet \
        results/runs/ccs+datacomp/seed*/eval/test/POPE/paper/samples_oqvl_pope_paper.jsonl

A toy POPE image shows three distinct objects and its yes questions name all three, so the image's
colours and shapes are known from its questions. For each sample log (the paper protocol's
generated answers) this prints how often the model's yes/no agrees with
- the truth (the accuracy, over answers that read yes or no),
- "yes if the named colour is in the image" (colour only),
- "yes if the named shape is in the image" (shape only),
and the accuracy each rule itself scores per POPE split. A model whose answers agree with the
colour rule on (nearly) every question scores exactly what that rule scores, whatever else it can
do: its POPE number measures colour, not objects.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq

from oqvl.evaluate.paper import pope_label
from oqvl.world.questions import TEMPLATES
from oqvl.world.scene import COLOURS, SHAPES

ASKED = [re.compile("^" + re.escape(t).replace(r"\{colour\}", r"(?P<colour>\w+)").replace(r"\{shape\}", r"(?P<shape>\w+)")
                    + "$") for t in TEMPLATES["exists"]]


def asked_object(question: str) -> tuple[str, str]:
    for pattern in ASKED:
        if m := pattern.match(question.strip()):
            return m["colour"], m["shape"]
    raise ValueError(f"not a POPE question of either phrasing: {question!r}")


def rules(rows: list[dict]) -> dict[int, dict]:
    """Per row: the asked object, its split, the truth, and the colour-only and shape-only answers."""
    present = defaultdict(set)
    for r in rows:
        if r["answer"] == "yes":
            present[r["image_source"]].add(asked_object(r["question"]))
    out = {}
    for i, r in enumerate(rows):
        colour, shape = asked_object(r["question"])
        objs = present[r["image_source"]]
        assert colour in COLOURS and shape in SHAPES, r["question"]
        out[i] = {"split": r["category"], "truth": r["answer"],
                  "colour": "yes" if colour in {c for c, _ in objs} else "no",
                  "shape": "yes" if shape in {s for _, s in objs} else "no"}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pope", type=Path, help="the POPE benchmark file")
    ap.add_argument("samples", type=Path, nargs="+", help="samples_oqvl_pope_paper.jsonl files")
    args = ap.parse_args(argv)
    rows = pq.read_table(args.pope, columns=["question", "answer", "image_source", "category"]).to_pylist()
    truth = rules(rows)
    print(f"{args.pope}: {len(rows)} questions")
    for rule in ("colour", "shape"):
        per_split = defaultdict(list)
        for t in truth.values():
            per_split[t["split"]].append(t[rule] == t["truth"])
        acc = {s: 100 * sum(v) / len(v) for s, v in sorted(per_split.items())}
        print(f"  the {rule}-only rule scores " + ", ".join(f"{s} {a:.1f}" for s, a in acc.items())
              + f"; mean {sum(acc.values()) / len(acc):.2f}")
    for path in args.samples:
        answers = {}
        for line in path.read_text().splitlines():
            s = json.loads(line)
            answers[s["doc_id"]] = pope_label(s["filtered_resps"] if isinstance(s["filtered_resps"], str)
                                              else s["filtered_resps"][0])
        if len(answers) != len(rows) or max(answers) >= len(rows):
            raise SystemExit(f"{path}: {len(answers)} samples, but {args.pope} has {len(rows)} questions "
                             f"(a sample log of another POPE file?)")
        read = [i for i, a in answers.items() if a in ("yes", "no")]
        agree = {k: sum(answers[i] == truth[i][k] for i in read) for k in ("truth", "colour", "shape")}
        print(f"{path}: {len(read)} of {len(answers)} answers read yes/no; agreement with "
              + ", ".join(f"{k} {v} ({100 * v / max(len(read), 1):.1f}%)" for k, v in agree.items()))


if __name__ == "__main__":
    main()
