"""Both protocols' scorers on hand-written model outputs with known right answers, lmms-eval's
known quirks pinned in the `lmms` protocol, and the tidy rows' chance levels and verdicts."""

import argparse
import json
import math
import random

import pytest

from oqvl.evaluate import paper, tidy
from oqvl.evaluate.tidy import beats, chance_level, reachable_answer, scored_items

# ---------------------------------------------------------------------------- paper: letters

MMBENCH_DOC = {"index": 7, "question": "What colour is the circle?", "hint": None,
               "A": "red", "B": "blue", "C": "green", "D": "yellow", "answer": "B"}


@pytest.mark.parametrize("output, answer, right", [
    ("B", "B", True),
    ("b", "B", True),
    ("(b)", "B", True),
    ("The answer is B", "B", True),
    ("The answer is B", "A", True),   # substring rule: "a" occurs in "answer"
    ("The answer is B", "C", False),
    ("C", "B", False),
    ("", "B", False),
])
def test_paper_letter_match_is_a_case_insensitive_substring_test(output, answer, right):
    doc = dict(MMBENCH_DOC, answer=answer)
    assert paper.mmbench_process_results(doc, [output])["accuracy"]["correct"] is right
    seed = {"answer": answer, "question_id": "1"}
    assert paper.seedbench_process_results(seed, [output])["accuracy"]["correct"] is right


@pytest.mark.parametrize("output, answer, right", [
    ("B", "B", True),
    ("(b)", "B", False),             # case-sensitive for MMStar
    ("b", "B", False),
    ("The answer is B", "B", True),
    ("The answer is B", "A", False),  # no capital A in it
    ("(B) blue", "B", True),
])
def test_paper_mmstar_is_case_sensitive(output, answer, right):
    doc = {"index": 1, "answer": answer}
    assert paper.mmstar_process_results(doc, [output])["accuracy"]["correct"] is right


def test_paper_accuracy_is_a_percentage():
    assert paper.accuracy([{"correct": True}, {"correct": False}, {"correct": True}, {"correct": True}]) == 75.0


# ------------------------------------------------------------------------- paper: MathVista

def mv_doc(answer, answer_type, choices=None, pid="1"):
    return {"pid": pid, "answer": answer, "answer_type": answer_type, "choices": choices,
            "question_type": "multi_choice" if choices else "free_form"}


@pytest.mark.parametrize("output, doc, right", [
    ("3", mv_doc("3", "integer"), True),
    ("The answer is 3.", mv_doc("3", "integer"), True),
    ("There are 3 objects", mv_doc("2", "integer"), False),
    ("0.50", mv_doc("0.5", "float"), True),       # numbers compared after rounding to 2 decimals
    ("0.5", mv_doc("0.75", "float"), False),
    ("3.", mv_doc("3.14", "float"), False),       # decoding stops at ".": a float answer cannot come out
    ("1,000", mv_doc("1000", "integer"), True),
    ("[1, 2]", mv_doc("[1, 2]", "list"), True),
    ("[2, 1]", mv_doc("[1, 2]", "list"), False),
    ("B", mv_doc("3", "text", ["2", "3", "4", "1"]), True),
    ("B.", mv_doc("3", "text", ["2", "3", "4", "1"]), True),
    ("(B) 3", mv_doc("3", "text", ["2", "3", "4", "1"]), True),
    ("The answer is (C)", mv_doc("3", "text", ["2", "3", "4", "1"]), False),
    ("I think the correct option is the one that says blue", mv_doc("blue", "text", ["red", "blue", "green", "yellow"]), True),
    # the reference's quirks (mathvista.py:445-452): "A " and "B." match inside words
    ("DATA", mv_doc("2", "text", ["2", "3", "4", "1"]), True),
    ("xB.y", mv_doc("3", "text", ["2", "3", "4", "1"]), True),
    # the right letter of repeated option texts is the last one (mathvista.py:58, 177)
    ("A", mv_doc("3", "text", ["3", "3", "4"]), False),
    ("B", mv_doc("3", "text", ["3", "3", "4"]), True),
])
def test_paper_mathvista_uses_the_references_rules(output, doc, right):
    assert paper.mathvista_process_results(doc, [output])["accuracy"]["correct"] is right


def test_paper_mathvista_unparsed_choice_is_a_seeded_random_letter():
    doc = mv_doc("3", "text", ["2", "3", "4", "1"], pid="42")
    got = {paper.mathvista_process_results(doc, ["(b)"])["accuracy"]["parsed"] for _ in range(5)}
    assert len(got) == 1  # the same guess every time for a question
    expected = random.Random("mathvista-42").choice(list("ABCD"))
    assert got == {expected}
    picks = {paper.mathvista_process_results(mv_doc("3", "text", ["2", "3", "4", "1"], pid=str(i)),
                                             ["no idea"])["accuracy"]["parsed"] for i in range(40)}
    assert picks == set("ABCD")  # but not one fixed letter across questions


def test_mathvista_parsers_directly():
    assert paper.parse_multi_choice_response("(A) or (C)? (C)", list("ABCD"), {}, random.Random(0)) == "C"
    assert paper.parse_multi_choice_response("A B", list("ABCD"), {}, random.Random(0)) == "B"
    assert paper.normalize_str("2.345") == [2.35] and paper.normalize_str("b") == [" b", "b "]
    # the three patterns, pieces of "1,234" and "1e3" included
    assert paper.extract_numbers("1,234 and 5.5 and 1e3") == ["1,234", "1e3", "234", "5.5", "3"]
    assert paper.extract_numbers("12ab") == []  # "\\d+\\b": a number ends at a word boundary
    assert 12.0 in paper.parse_open_response("so the result is 12")


# ------------------------------------------------------------------------------ paper: POPE

def pope_item(answer, output, category="random"):
    doc = {"question_id": "1", "category": category, "answer": answer}
    return paper.pope_process_results(doc, [output])["accuracy"]


@pytest.mark.parametrize("output, label", [
    ("Yes", "yes"), ("yes.", "yes"), ("No,", "no"), ("No.", "no"), ("YES", "yes"),
    ("Yes, there is", "yes, there is"), ("yes!", "yes!"), (".no,", "no"), ("No,.", "no,"), ("", ""),  # "," first, then "."
])
def test_paper_pope_strips_comma_then_period_and_lower_cases(output, label):
    assert paper.pope_label(output) == label


def test_paper_pope_scores_generated_answers_by_exact_match_per_split():
    items = [pope_item("yes", "Yes."), pope_item("yes", "Yes, a dog"), pope_item("no", "No"),
             pope_item("no", "no", "adversarial"), pope_item("yes", "yes", "adversarial")]
    assert [it["pred"] == it["answer"] for it in items] == [True, False, True, True, True]
    assert paper.pope_accuracy_random(items) == pytest.approx(200 / 3)
    assert paper.pope_accuracy_adversarial(items) == 100.0 and paper.pope_accuracy_popular(items) is None
    # the final accuracy is the mean of the splits' (as pope.py:436), not of all questions (80)
    assert paper.pope_accuracy(items) == pytest.approx((200 / 3 + 100) / 2)
    # F1 of "yes" per split (random: tp 1, one yes missed, no false yes), then their mean
    assert paper.pope_f1_random(items) == pytest.approx(100 * 2 * 1 / (1 + 2))
    assert paper.pope_f1_adversarial(items) == 100.0
    assert paper.pope_f1(items) == pytest.approx((200 / 3 + 100) / 2)
    assert paper.pope_yes_ratio(items) == 40.0  # the outputs that read "yes" (2 of 5)
    never_yes = [pope_item("no", "No"), pope_item("yes", "Maybe")]
    assert paper.pope_f1(never_yes) == 0.0  # sklearn's value when nothing is predicted "yes"


def likelihood_item(answer, ll_yes, ll_no, category="random", as_str=False):
    res = [(ll_yes, False), (ll_no, False)]
    if as_str:  # what lmms-eval 0.7.3 hands over
        res = [str(r) for r in res]
    doc = {"question_id": "1", "category": category, "answer": answer}
    return paper.pope_likelihood_process_results(doc, res)["likelihood_auc"]


def test_paper_pope_likelihood_scorer_compares_yes_and_no():
    assert likelihood_item("yes", -0.1, -2.0)["pred"] == "yes"
    assert likelihood_item("yes", -2.0, -0.1)["pred"] == "no"
    assert likelihood_item("no", -0.25, -3.5, as_str=True) == likelihood_item("no", -0.25, -3.5)
    assert paper.loglikelihood_result("(-1.2345678901234567, True)") == (-1.2345678901234567, True)
    items = [likelihood_item("yes", 0, -1), likelihood_item("yes", -1, 0), likelihood_item("no", 0, -1),
             likelihood_item("no", -1, 0, "adversarial")]
    assert paper.pope_likelihood_accuracy(items) == pytest.approx((100 / 3 + 100) / 2)


def test_paper_pope_auc():
    perfect = [likelihood_item("yes", 0, -m) for m in (1, 2)] + [likelihood_item("no", -m, 0) for m in (1, 2)]
    assert paper.pope_auc(perfect) == 100.0
    tied = [likelihood_item(a, 0, 0) for a in ("yes", "no")]
    assert paper.pope_auc(tied) == 50.0
    assert paper.pope_auc([likelihood_item("yes", 0, 1)]) is None


# -------------------------------------------------------------------- lmms: reused, quirks kept

def test_lmms_seedbench_credits_only_the_first_character():
    from lmms_eval.tasks.seedbench.utils import (
        seed_aggregation_result,
        seed_process_result,
    )

    doc = {"answer": "B", "data_type": "image", "question_id": "1"}
    score = [seed_aggregation_result([seed_process_result(doc, [o])["seed_image"]])
             for o in ("B", "b", "B. blue", "The answer is B", "(B)")]
    assert score == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_lmms_pope_needs_the_exact_word_and_reports_the_ground_truths_yes_ratio():
    from lmms_eval.tasks.pope import utils as pope

    items = [pope.pope_process_results({"answer": a, "question_id": str(i)}, [o])["pope_accuracy"]
             for i, (a, o) in enumerate([("yes", "Yes."), ("yes", "yes"), ("no", "No"), ("no", "yes")])]
    assert pope.pope_aggregate_accuracy(items) == 0.5     # "Yes." is wrong
    assert pope.pope_aggregate_precision(items) == 0.5
    assert pope.pope_aggregate_recall(items) == 1.0       # "Yes." is not a false negative either
    assert pope.pope_aggregate_yes_ratio(items) == 0.5    # the ground truth's share, not the model's


def test_lmms_mmstar_extracts_letters():
    from lmms_eval.tasks.mmstar.utils import (
        mmstar_aggregate_results,
        mmstar_process_results,
    )

    doc = {"answer": "B", "category": "fine-grained perception", "l2_category": "recognition", "index": 1}
    got = [mmstar_process_results(doc, [o])["average"]["score"]
           for o in ("(B)", "The answer is B", "B. blue", "b", "(b)")]
    assert got == [1.0, 1.0, 1.0, 0.0, 0.0]
    items = [{"score": s, "l2_category": c} for s, c in [(1, "x"), (0, "x"), (1, "y")]]
    assert mmstar_aggregate_results(items) == 0.75  # mean of the l2 means, not of the items


def test_lmms_mmbench_circular_static_scoring(tmp_path):
    from lmms_eval.tasks.mmbench import en_utils

    def rows(q, answers_and_outputs):
        out = []
        for k, (answer, output) in enumerate(answers_and_outputs):
            doc = {"index": q + k * 1_000_000, "question": "Q?", "answer": answer, "hint": None,
                   "source": "t", "split": "dev", "category": "c", "L2-category": "l",
                   "A": "red", "B": "blue", "C": "green", "D": "yellow"}
            out.append(en_utils.mmbench_process_results(doc, [output])["gpt_eval_score"])
        return out

    right = rows(0, [("B", "B"), ("A", "The answer is A"), ("D", "D."), ("C", "(C)")])
    one_wrong = rows(1, [("B", "B"), ("A", "A"), ("D", "B"), ("C", "C")])
    unreadable = rows(2, [("B", "B"), ("A", "A"), ("D", "D"), ("C", "no idea")])
    args = argparse.Namespace(output_path=str(tmp_path))
    score = en_utils.mmbench_aggregate_dev_results_static(right + one_wrong + unreadable, args)
    assert score == pytest.approx(100 / 3)


def mv_lmms_doc(answer, answer_type, choices=None, precision=None):
    return {"pid": "1", "question_type": "multi_choice" if choices else "free_form",
            "answer_type": answer_type, "query": "q", "choices": choices, "answer": answer,
            "precision": precision, "metadata": {"split": "testmini"}}


@pytest.mark.parametrize("output, doc, right", [
    ("3", mv_lmms_doc("3", "integer"), True),
    ("3 objects", mv_lmms_doc("3", "integer"), False),           # would need the judge
    ("0.5", mv_lmms_doc("0.5", "float", precision=2.0), False),  # round(x, 2.0) raises: quirk
    ("0.5", mv_lmms_doc("0.5", "float", precision=2), True),     # ... with an int it would pass
    ("[1, 2]", mv_lmms_doc("[1, 2]", "list"), False),            # lists go to the judge
    ("blue", mv_lmms_doc("blue", "text", ["red", "blue", "green", "yellow"]), True),
    ("B", mv_lmms_doc("blue", "text", ["red", "blue", "green", "yellow"]), False),  # -> "red"
    ("B", mv_lmms_doc("red", "text", ["red", "blue", "green", "yellow"]), True),    # shortest wins
    ("C", mv_lmms_doc("1", "text", ["1", "2", "3", "4"]), True),  # equal lengths: the first
])
def test_lmms_mathvista_without_judge_keeps_its_quirks(output, doc, right):
    from oqvl.evaluate import lmms

    assert lmms.mathvista_process_results(doc, [output])["llm_as_judge_eval"]["true_false"] is right


def test_lmms_mathvista_counts_the_rows_its_quirks_decide():
    from oqvl.evaluate import lmms

    def flags(output, doc):
        out = lmms.mathvista_process_results(doc, [output])
        return out["share_float_never_scored"], out["share_choice_by_shortest"]

    colours = ["red", "blue", "green", "yellow"]
    assert flags("0.5", mv_lmms_doc("0.5", "float", precision=2.0)) == (True, False)
    assert flags("0.5", mv_lmms_doc("0.5", "float", precision=2)) == (False, False)
    assert flags("3", mv_lmms_doc("3", "integer")) == (False, False)
    assert flags("B", mv_lmms_doc("blue", "text", colours)) == (False, True)
    assert flags(" blue ", mv_lmms_doc("blue", "text", colours)) == (False, False)
    assert lmms.share([True, False, False, False]) == 25.0 and lmms.share([]) == 0.0


def test_lmms_mathvista_reports_zero_accuracy_as_none():
    from oqvl.evaluate import lmms

    wrong = lmms.mathvista_process_results(mv_lmms_doc("3", "integer"), ["4"])["llm_as_judge_eval"]
    wrong["metadata"] = {k: "x" for k in ("split", "language", "source", "category", "task", "context", "grade")}
    wrong["metadata"]["skills"] = ["s"]
    assert lmms.mathvista_aggregate_results([wrong], None) is None


def test_levenshtein_stand_in_is_exact():
    from oqvl.evaluate.lmms import _edit_distance

    assert _edit_distance("kitten", "sitting") == 3 and _edit_distance("", "abc") == 3
    assert _edit_distance("flaw", "lawn") == 2 and _edit_distance("same", "same") == 0


# --------------------------------------------------------------------------------- tidy rows

def test_chance_levels():
    mc = [{"index": i + k * 1_000_000, "A": "a", "B": "b", "C": "c", "D": "d"} for i in range(3) for k in range(4)]
    assert chance_level("options", "MMBench", mc) == 25.0
    assert chance_level("circular", "MMBench", mc) == pytest.approx(100 / 256)
    assert scored_items("circular", "MMBench", mc) == 3
    three = [dict(r, D=None) for r in mc[:3]]
    assert chance_level("options", "MMBench", three) == pytest.approx(100 / 3)
    star = [{"question": "Q?\nOptions: A: x, B: y"}]
    assert chance_level("options", "MMStar", star) == 50.0
    mv = [{"choices": ["1", "2", "3", "4"], "answer": "1", "answer_type": "text"},
          {"choices": None, "answer": "2", "answer_type": "integer"},
          {"choices": None, "answer": "2", "answer_type": "integer"},
          {"choices": None, "answer": "3", "answer_type": "integer"},
          {"choices": None, "answer": "0.5", "answer_type": "float"}]
    # Only reachable answers count: under the paper protocol generation stops at ".", so "0.5" can
    # never be given (but "1" gives 1.0); under lmms-eval's no float answer ever scores.
    assert chance_level("mathvista_paper", "MathVista", mv) == pytest.approx(100 * (0.25 + 3 * 2 / 3 + 0) / 5)
    assert chance_level("mathvista_lmms", "MathVista", mv) == pytest.approx(100 * (0.25 + 3 * 2 / 3 + 0) / 5)
    whole = mv + [{"choices": None, "answer": "1.0", "answer_type": "float"}]
    assert chance_level("mathvista_paper", "MathVista", whole) == pytest.approx(100 * (0.25 + 2 + 2 * 0.5) / 6)
    assert chance_level("mathvista_lmms", "MathVista", whole) == pytest.approx(100 * (0.25 + 2 + 0) / 6)
    assert reachable_answer({"answer": "1.0", "answer_type": "float"}, "paper") == "1"
    assert reachable_answer({"answer": "0.25", "answer_type": "float"}, "paper") is None
    assert reachable_answer({"answer": "0.25", "answer_type": "float"}, "lmms") is None
    assert reachable_answer({"answer": "3", "answer_type": "integer"}, "lmms") == "3"
    pope = [{"answer": a, "category": c} for a, c in [("yes", "random"), ("no", "random"), ("yes", "popular"), ("yes", "popular")]]
    assert chance_level("majority", "POPE", pope) == 75.0
    assert chance_level("majority:random", "POPE", pope) == 50.0
    assert chance_level("yes_f1", "POPE", pope[:2]) == pytest.approx(200 / 3)
    assert chance_level(None, "POPE", pope) is None


def test_above_chance_needs_a_margin_over_chance_and_control():
    assert beats(60.0, 50.0, 1000, False)               # 10 points, se 1.6
    assert not beats(52.0, 50.0, 1000, False)           # within two standard errors
    assert not beats(60.0, 50.0, 50, False)             # too few questions for 10 points
    assert beats(60.0, 50.0, 1000, True) and not beats(54.0, 50.0, 1000, True)
    se = math.sqrt(0.25 / 400)
    assert beats(50 + 100 * 2.01 * se, 50.0, 400, False) and not beats(50 + 100 * 1.99 * se, 50.0, 400, False)


def test_run_results_gathers_rows_into_one_csv_with_its_manifest(tmp_path):
    row = {"run": "r", "protocol": "paper", "metric": "accuracy", "value": 60.0, "n": 10, "chance": 25.0,
           "control": 24.0, "above_chance": True}
    files = []
    for b, k in (("POPE", 2), ("MMStar", 1)):
        files.append(tmp_path / f"{b}.json")
        files[-1].write_text(json.dumps([dict(row, benchmark=b)] * k))
    tidy.main([*map(str, files), "--out", str(tmp_path / "tidy.csv")])
    assert len((tmp_path / "tidy.csv").read_text().splitlines()) == 1 + 3
    manifest = json.loads((tmp_path / "tidy.manifest.json").read_text())
    assert manifest["stage"] == "run_results" and manifest["work"] == {"amount": 3, "unit": "rows"}
    assert list(manifest["files"]) == ["tidy.csv"] and set(manifest["inputs"]) == set(map(str, files))
