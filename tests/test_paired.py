"""The headline test against the shuffled-image control: paired, clustered by image
(oqvl.evaluate.paired), with per-question scores read back from lmms-eval's sample logs."""

from __future__ import annotations

import json
import math

import pytest

from oqvl.evaluate.paired import clustered_se, headline_test, paired_test, unit_scores
from oqvl.evaluate.tidy import beats


def test_pairing_finds_a_gain_the_unpaired_test_misses():
    """The control gets right a subset of what the model gets right with its images: 10 points on
    100 questions is 3.3 paired standard errors, but under 2 unpaired ones."""
    true = {u: float(u < 60) for u in range(100)}
    shuffled = {u: float(u < 50) for u in range(100)}
    test = paired_test(true, shuffled, {u: u for u in true}, chance=25.0)
    assert test["control_diff"] == pytest.approx(10.0)
    assert test["control_diff_se"] == pytest.approx(100 * math.sqrt(0.09 / 99), abs=1e-4)
    assert test["beats_control"] and test["beats_chance"]
    assert not beats(60.0, 50.0, 100, True)  # the binomial test of the same two scores


def test_clusters_sharing_an_image_count_once():
    """POPE-like: 10 images x 18 questions; the whole gain sits on one image. Unclustered, 10 points
    on 180 questions would pass; clustered, one image's worth of evidence does not."""
    clusters = {u: u // 18 for u in range(180)}
    shuffled = {u: float(u % 2) for u in range(180)}
    true = {u: 1.0 if clusters[u] == 0 else shuffled[u] for u in range(180)}
    clustered = paired_test(true, shuffled, clusters, chance=None)
    flat = paired_test(true, shuffled, {u: u for u in range(180)}, chance=None)
    assert clustered["control_diff"] == flat["control_diff"] == pytest.approx(100 * 9 / 180)
    assert flat["beats_control"] and not clustered["beats_control"]
    assert clustered["clusters"] == 10 and clustered["units"] == 180
    assert "beats_chance" not in clustered


def test_an_image_blind_model_never_beats_its_control():
    answers = {u: float(u % 3 == 0) for u in range(300)}
    test = paired_test(answers, dict(answers), {u: u // 6 for u in answers}, chance=25.0)
    assert test["control_diff"] == 0 and not test["beats_control"]


def test_chance_uses_the_larger_of_the_clustered_and_the_binomial_error():
    # every question right: no spread in the scores, the binomial error at chance still applies
    true = {u: 1.0 for u in range(4)}
    assert not paired_test(true, {u: 0.0 for u in range(4)}, {u: u for u in true}, chance=60.0)["beats_chance"]
    assert paired_test(true, {u: 0.0 for u in range(4)}, {u: u for u in true}, chance=40.0)["beats_chance"]
    assert clustered_se({0: 1.0, 1: 0.0}, {0: "a", 1: "a"}) == math.inf  # one cluster: no evidence


def test_control_of_other_questions_is_refused():
    with pytest.raises(ValueError, match="other questions"):
        paired_test({0: 1.0, 1: 0.0}, {0: 1.0}, {0: 0, 1: 1}, chance=None)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def mmbench_item(index, answer, prediction):
    return {"gpt_eval_score": {"index": index, "question": "What colour is the circle?", "answer": answer,
                               "prediction": prediction, "hint": "nan", "source": "oqvl-toy", "split": "dev",
                               "category": "attribute_recognition", "L2-category": "x",
                               "A": "red", "B": "blue", "C": "green", "D": "yellow", "E": "nan"}}


def test_mmbench_circular_units_use_lmms_evals_own_matcher(tmp_path):
    """Two questions x 2 circular copies: question 0 right in both copies, question 1 in one."""
    rows = [(0, "A", "A"), (1, "B", "B"), (1_000_000, "C", "C"), (1_000_001, "D", "A")]
    samples = [{"doc_id": i, **mmbench_item(*r)} for i, r in enumerate(rows)]
    scores, clusters, weights = unit_scores("MMBench", "lmms", samples, groups=[0, 1, 0, 1])
    assert scores == {0: 1.0, 1: 0.0} and clusters == {0: 0, 1: 1} and weights is None
    scores, clusters, _ = unit_scores("MMBench", "paper", [
        {"doc_id": i, "accuracy": {"correct": r[1] == r[2]}} for i, r in enumerate(rows)], groups=[0, 1, 0, 1])
    assert scores == {0: 1.0, 1: 1.0, 2: 1.0, 3: 0.0} and clusters == {0: 0, 1: 1, 2: 0, 3: 1}


@pytest.mark.parametrize("benchmark, protocol, right, wrong", [
    ("POPE", "paper", {"accuracy": {"pred": "yes", "answer": "yes", "category": "random"}},
     {"accuracy": {"pred": "", "answer": "yes", "category": "random"}}),
    ("POPE", "lmms", {"pope_accuracy": {"score": 1.0}}, {"pope_accuracy": {"score": 0.0}}),
    ("SEEDBench", "lmms", {"seed_image": {"pred": "b", "answer": "B"}}, {"seed_image": {"pred": "T", "answer": "B"}}),
    ("MMStar", "lmms", {"average": {"score": 1.0, "l2_category": "x"}}, {"average": {"score": 0.0, "l2_category": "x"}}),
    ("MathVista", "lmms", {"llm_as_judge_eval": {"true_false": True}}, {"llm_as_judge_eval": {"true_false": False}}),
    ("MathVista", "paper", {"accuracy": {"correct": True}}, {"accuracy": {"correct": False}}),
])
def test_row_scores_from_each_protocols_sample_log(tmp_path, benchmark, protocol, right, wrong):
    # three questions on two images; the control gets the first one wrong
    true = _jsonl(tmp_path / "t.jsonl", [{"doc_id": 2, **right}, {"doc_id": 0, **right}, {"doc_id": 1, **right}])
    ctrl = _jsonl(tmp_path / "s.jsonl", [{"doc_id": 0, **wrong}, {"doc_id": 1, **right}, {"doc_id": 2, **right}])
    test = headline_test(benchmark, protocol, true, ctrl, groups=["img0", "img0", "img1"], chance=None)
    assert test["units"] == 3 and test["clusters"] == 2
    assert test["control_diff"] == pytest.approx(100 / 3, abs=1e-4)


def test_a_mean_of_category_means_weighs_each_question_by_its_category():
    """lmms-eval's MMStar: the mean of the L2 categories' accuracies. Category a has 1 question,
    right only with its image; category b has 3, right either way: the metric gains 50 points."""
    from oqvl.evaluate.paired import category_weights

    cats = {0: "a", 1: "b", 2: "b", 3: "b"}
    weights = category_weights(cats)
    assert weights == {0: 0.5, 1: 1 / 6, 2: 1 / 6, 3: 1 / 6}
    test = paired_test({0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0}, {0: 0.0, 1: 1.0, 2: 1.0, 3: 1.0}, {u: u for u in cats},
                       chance=None, weights=weights)
    assert test["control_diff"] == pytest.approx(50.0)
