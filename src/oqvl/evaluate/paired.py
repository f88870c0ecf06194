"""The test of a headline score against chance and against the shuffled-image control.

The control asks the same questions as the benchmark with every image moved to another question
(oqvl.evaluate.schemas.shuffle_images), so the two scores are paired: question u has a score x_u
with its own image and y_u with another. Questions come in clusters that share an image (MMBench's
circular copies, POPE's questions per image; one question each elsewhere, `image_groups`), and a
cluster's questions are not independent draws. So the control test is on the paired differences
d_u = x_u - y_u with a cluster-robust standard error,

    mean d = sum_u d_u / N,    se = sqrt(G / (G - 1) * sum_g (D_g - n_g * mean d)^2) / N,

(D_g the sum of d over cluster g's n_g questions, G clusters, N questions), and the score beats
the control if mean d > Z * se. A metric that averages per category first (lmms-eval's MMStar:
the mean of its L2 categories' accuracies; the paper protocol's POPE: the mean of its three
splits') weighs each question by 1 / (categories x its
category's questions), and the means and sums above are weighted alike. Against chance (a fixed level c, not a measurement) the same
cluster-robust standard error of mean x is used, never below the binomial one at c:
mean x - c > Z * max(se_x, sqrt(c (1 - c) / N)).

Per-question scores are read back from lmms-eval's per-sample logs (`samples_<task>.jsonl`), as
each protocol's headline metric counts a question right: the paper protocol's `correct` flags
(oqvl.evaluate.paper), lmms-eval's own item scores, and for MMBench under lmms-eval (circular
scoring: a question is right only if all its copies are) lmms-eval's own `eval_sub_data` on each
question's copies, so a question is the unit and the cluster.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from .schemas import CIRCULAR_OFFSET

Z = 2.0


def _paper_correct(key: str):
    return lambda s: float(bool(s[key]["correct"]))


ROW_SCORE = {  # (benchmark, protocol) -> a sample's score under the headline metric
    ("MMBench", "paper"): _paper_correct("accuracy"),
    ("SEEDBench", "paper"): _paper_correct("accuracy"),
    ("MMStar", "paper"): _paper_correct("accuracy"),
    ("MathVista", "paper"): _paper_correct("accuracy"),
    ("POPE", "paper"): lambda s: float(s["accuracy"]["pred"] == s["accuracy"]["answer"]),
    # lmms-eval's seed_aggregation_result, item by item
    ("SEEDBench", "lmms"): lambda s: float(s["seed_image"]["pred"].lower().strip()
                                           == s["seed_image"]["answer"].lower().strip()),
    ("MMStar", "lmms"): lambda s: float(s["average"]["score"]),
    ("MathVista", "lmms"): lambda s: float(bool(s["llm_as_judge_eval"]["true_false"])),
    ("POPE", "lmms"): lambda s: float(s["pope_accuracy"]["score"]),
}


def read_samples(path: Path) -> list[dict]:
    with open(path) as f:
        return sorted((json.loads(line) for line in f if line.strip()), key=lambda s: s["doc_id"])


def mmbench_circular_scores(samples: list[dict]) -> dict[int, float]:
    """Per MMBench question (index mod 1e6), 1.0 if lmms-eval's static circular scoring counts it
    right: its own `eval_sub_data` over the question's copies."""
    import pandas as pd
    from lmms_eval.tasks.mmbench.en_utils import mmbench_evaluator

    items = pd.DataFrame([s["gpt_eval_score"] for s in samples])
    items["prediction"] = [str(x) for x in items["prediction"]]
    answer_map = dict(zip(items["index"], items["answer"]))
    out = {}
    for question, copies in items.groupby(items["index"] % CIRCULAR_OFFSET, sort=True):
        out[int(question)] = float(mmbench_evaluator.eval_sub_data(copies.sort_values("index"), answer_map,
                                                                   static_only=True))
    return out


def category_weights(categories: dict) -> dict:
    """unit -> weight of a mean of per-category means (unit -> its category)."""
    sizes = defaultdict(int)
    for c in categories.values():
        sizes[c] += 1
    return {u: 1 / (len(sizes) * sizes[c]) for u, c in categories.items()}


def unit_scores(benchmark: str, protocol: str, samples: list[dict], groups: list) -> tuple[dict, dict, dict | None]:
    """(unit -> score, unit -> cluster, unit -> weight or None for equal weights) of the headline
    metric: a unit is a row (its doc_id) and its cluster the image it asks about (`groups`, per
    row); under MMBench's circular scoring a unit is a question, its own cluster."""
    if (benchmark, protocol) == ("MMBench", "lmms"):
        scores = mmbench_circular_scores(samples)
        return scores, {u: u for u in scores}, None
    score = ROW_SCORE[(benchmark, protocol)]
    scores = {s["doc_id"]: score(s) for s in samples}
    weights = None
    if (benchmark, protocol) == ("MMStar", "lmms"):  # mmstar_aggregate_results: mean over L2 categories
        weights = category_weights({s["doc_id"]: s["average"]["l2_category"] for s in samples})
    if (benchmark, protocol) == ("POPE", "paper"):  # paper.pope_accuracy: mean over the splits
        weights = category_weights({s["doc_id"]: s["accuracy"]["category"] for s in samples})
    return scores, {u: groups[u] for u in scores}, weights


def clustered_se(values: dict, clusters: dict, weights: dict | None = None) -> float:
    """The cluster-robust standard error of the (weighted) mean of `values` (unit -> value)."""
    if not values:
        return float("nan")
    w = weights or {u: 1.0 for u in values}
    total = sum(w[u] for u in values)
    mean = sum(w[u] * v for u, v in values.items()) / total
    sums = defaultdict(float)
    for u, v in values.items():
        sums[clusters[u]] += w[u] * (v - mean)
    g = len(sums)
    if g < 2:
        return float("inf")
    return math.sqrt(g / (g - 1) * sum(x * x for x in sums.values())) / total


def paired_test(true: dict, shuffled: dict, clusters: dict, chance: float | None, weights: dict | None = None) -> dict:
    """The headline's tests: scores in [0, 1] per unit with the true and the shuffled images (the
    same units), clusters per unit, the chance level in percent, optional weights per unit (a mean
    of category means). Percent in, percent out."""
    if set(true) != set(shuffled):
        raise ValueError(f"the control scored other questions than the benchmark "
                         f"({len(set(true) ^ set(shuffled))} differ)")
    n = len(true)
    w = weights or {u: 1.0 for u in true}
    total = sum(w[u] for u in true)
    diff = {u: true[u] - shuffled[u] for u in true}
    mean_x = sum(w[u] * true[u] for u in true) / total
    mean_d = sum(w[u] * diff[u] for u in true) / total
    se_d = clustered_se(diff, clusters, w)
    out = {"test": "paired_clustered", "units": n, "clusters": len({clusters[u] for u in true}),
           "control_diff": round(100 * mean_d, 4), "control_diff_se": round(100 * se_d, 4),
           "beats_control": bool(mean_d > Z * se_d)}
    if chance is not None:
        c = chance / 100
        se_x = max(clustered_se(true, clusters, w), math.sqrt(c * (1 - c) / n))
        out["beats_chance"] = bool(mean_x - c > Z * se_x)
    return out


def headline_test(benchmark: str, protocol: str, true_samples: Path, shuffled_samples: Path, groups: list,
                  chance: float | None) -> dict:
    """paired_test on a task's and its control's per-sample logs."""
    true, clusters, weights = unit_scores(benchmark, protocol, read_samples(true_samples), groups)
    shuffled, _, _ = unit_scores(benchmark, protocol, read_samples(shuffled_samples), groups)
    return paired_test(true, shuffled, clusters, chance, weights)
