"""The `paper` protocol: how Open-Qwen2VL's published numbers were computed, as lmms-eval task
functions. The source is the reference's vendored, modified TRI-ML vlm-evaluation (Victorwz/Open-
Qwen2VL at 0d76f9f); every rule below names the file and line it comes from (paths under
vlm-evaluation/vlm_eval/).

- Prompt: a raw string, no chat template. Each harness builds a chat prompt and then overwrites it
  with a raw one (tasks/harnesses/mmbench.py:187-190, seedbench.py:189-192, mmstar.py:169-173,
  pope.py:168-169, mathvista.py:282). The strings, with "<image>" where the image goes:
    MMBench     "<image>\\n" + question + "\\nA. ..." for A-D (all four, a missing one printed as
                it is stored) + MC_SUFFIX; no hint (mmbench.py:46-54)
    SEED-Bench  the same with choice_a..choice_d (seedbench.py:47-55)
    MMStar      "<image>\\nQuestion: {question}\\n" + MC_SUFFIX (mmstar.py:173)
    MathVista   "<image>\\n" + question, then for multi_choice the lettered choices + MC_SUFFIX, else
                SHORT_SUFFIX; no unit line (mathvista.py:47-63)
    POPE        "<image>\\nQuestion: {question}\\n" + SHORT_SUFFIX (pope.py:169)
- Decoding (the model adapter, oqvl.evaluate.adapter, for every task of this protocol): the model's
  BOS id in front (prismatic-vlms/prismatic/models/vlms/prismatic.py:641-642), greedy, at most 16
  new tokens, stopped by the token ids in REFERENCE_STOP_IDS (models/prismatic.py:47), decoded with
  special tokens skipped and stripped (prismatic.py:665). The stop token is part of the output:
  "Yes." stays "Yes.".
- MMBench, SEED-Bench: right if the lower-cased right letter occurs in the lower-cased output
  (mmbench.py:330, seedbench.py:332): "The answer is B" is right for B and also for A, whose letter
  occurs in "answer". Every MMBench row counts on its own (circular copies are plain questions).
- MMStar: the same test, case-sensitive (mmstar.py:313).
- MathVista: MMMU-style rule parsing, no judge (mathvista.py:426-600); its answer for multi_choice
  is the letter of the answer's text (mathvista.py:171-177). The parser falls back to a random
  letter; the reference's is unseeded, ours is seeded by the question id so reruns agree.
- POPE: by generation (PopeScorer, pope.py:373-455): the output with "," then "." stripped,
  lower-cased, must equal "yes" / "no" exactly; accuracy and F1 of "yes" per split (adversarial,
  popular, random); the final accuracy and F1 are the means over the splits. The reference's
  likelihood scorer (PopeProbScorer, pope.py:278-371: argmax of p(Yes) vs p(No), AUC-ROC) did not
  produce the published numbers (its call is commented out, pope.py:250-253); it runs here as the
  extra task `oqvl_pope_paper_likelihood`, reported as the metrics `likelihood_accuracy` and
  `likelihood_auc`.

Every aggregate is a percentage (0-100).
"""

from __future__ import annotations

import ast
import bisect
import random
import re

LETTERS = "ABCDEFGHI"  # mathvista.py:38
MC_SUFFIX = "\nAnswer with the option's letter from the given choices directly.\nAnswer:"
SHORT_SUFFIX = "\nAnswer the question using a single word or phrase.\nAnswer:"
IMAGE = "<image>"
# vlm_eval/models/prismatic.py:47, as listed there: "." "," and newline in several vocabularies.
# In Qwen2's, 11 is ",", 13 "." and 198 "\n"; the others are ordinary Qwen2 tokens that stop
# generation too (a quirk of the list, kept).
REFERENCE_STOP_IDS = (13, 29889, 29892, 32000, 32001, 32002, 32007, 32011, 128009, 128256, 128257, 11, 198)
MAX_NEW_TOKENS = 16  # models/prismatic.py:47
POPE_SPLITS = ("adversarial", "popular", "random")


def _percent(values) -> float:
    values = list(values)
    return 100.0 * sum(values) / len(values) if values else 0.0


# ------------------------------------------------------------------------------ visuals

def image_doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def seedbench_doc_to_visual(doc):
    return [im.convert("RGB") for im in doc["image"]]


def mathvista_doc_to_visual(doc):
    return [doc["decoded_image"].convert("RGB")]


# ------------------------------------------------------------------------------ prompts

def _lettered(question: str, options) -> str:
    """Every option printed as "{}".format prints it, a missing one too ("None", or "nan" where the
    release stores that string), as the reference formats its pandas cells."""
    return f"{IMAGE}\n{question}" + "".join(f"\n{l}. {o}" for l, o in zip(LETTERS, options)) + MC_SUFFIX


def mmbench_doc_to_text(doc):
    return _lettered(doc["question"], [doc[c] for c in "ABCD"])


def seedbench_doc_to_text(doc):
    return _lettered(doc["question"], [doc[f"choice_{c}"] for c in "abcd"])


def mmstar_doc_to_text(doc):
    return f"{IMAGE}\nQuestion: {doc['question']}" + MC_SUFFIX


def mathvista_doc_to_text(doc):
    if doc["question_type"] == "multi_choice":
        return _lettered(doc["question"], doc["choices"])
    return f"{IMAGE}\n{doc['question']}" + SHORT_SUFFIX


def pope_doc_to_text(doc):
    return f"{IMAGE}\nQuestion: {doc['question']}" + SHORT_SUFFIX


def pope_doc_to_choice(doc):
    return ["Yes", "No"]


# ---------------------------------------------------------------------- letter matching

def letter_match(output: str, letter: str, case_sensitive: bool) -> bool:
    """The paper's rule: the right letter occurs anywhere in the output."""
    if case_sensitive:
        return letter in output
    return letter.lower() in output.lower()


def _letter_result(doc, results, answer_key, case_sensitive, qid_key):
    output = results[0]
    correct = letter_match(output, doc[answer_key], case_sensitive)
    return {"accuracy": {"id": doc[qid_key], "output": output, "answer": doc[answer_key],
                         "correct": bool(correct)}}


def mmbench_process_results(doc, results):
    return _letter_result(doc, results, "answer", False, "index")


def seedbench_process_results(doc, results):
    return _letter_result(doc, results, "answer", False, "question_id")


def mmstar_process_results(doc, results):
    return _letter_result(doc, results, "answer", True, "index")


def accuracy(items):
    return _percent(it["correct"] for it in items)


# ------------------------------------------------- MathVista: the reference's rule parsing

def parse_multi_choice_response(response: str, all_choices: list[str], index2ans: dict[str, str],
                                rng: random.Random) -> str:
    """mathvista.py:426-485: a letter in brackets "(B)", else a letter followed by a space, else a
    letter followed by "."; else, in an answer of more than five words, an option's text; the last
    occurrence wins among several; a random letter if none."""
    for char in (",", ".", "!", "?", ";", ":", "'"):
        response = response.strip(char)
    response = " " + response + " "
    index_ans, ans_with_brack, candidates = True, False, []
    for choice in all_choices:
        if f"({choice})" in response:
            candidates.append(choice)
            ans_with_brack = True
    if not candidates:
        candidates = [c for c in all_choices if f"{c} " in response]
    if not candidates:
        candidates = [c for c in all_choices if f"{c}." in response]
    if not candidates and len(response.split()) > 5:
        for index, ans in index2ans.items():
            if ans.lower() in response.lower():
                candidates.append(index)
                index_ans = False
    if not candidates:
        return rng.choice(all_choices)
    if len(candidates) == 1:
        return candidates[0]
    if index_ans:
        pattern = "({})" if ans_with_brack else " {} "
        starts = [response.rfind(pattern.format(c)) for c in candidates]
    else:
        starts = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
    return candidates[starts.index(max(starts))]  # np.argmax: the first of equal maxima


def check_is_number(string: str) -> bool:
    try:
        float(string.replace(",", ""))
        return True
    except ValueError:
        return False


def normalize_str(string: str) -> list:
    """mathvista.py:103-126: a number becomes [float rounded to 2 decimals]; a string is lower-cased
    (a one-letter string gets spaces on either side, so it only matches as a word)."""
    string = string.strip()
    if check_is_number(string):
        return [round(float(string.replace(",", "")), 2)]
    string = string.lower()
    if len(string) == 1:
        return [" " + string, string + " "]
    return [string]


def extract_numbers(string: str) -> list[str]:
    """mathvista.py:67-87."""
    with_commas = re.findall(r"-?\b\d{1,3}(?:,\d{3})+\b", string)
    scientific = re.findall(r"-?\d+(?:\.\d+)?[eE][+-]?\d+", string)
    simple = re.findall(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])", string)
    return with_commas + scientific + simple


def parse_open_response(response: str) -> list:
    """mathvista.py:487-556: the shortest text after a key phrase ("is", "answer", "=" ...) in each
    sentence, plus every number in it, normalised."""
    def key_subresponses(response):
        response = response.strip().strip(".").lower()
        subs = re.split(r"\.\s(?=[A-Z])|\n", response)
        indicators = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]
        keys = []
        for index, resp in enumerate(subs):
            if index == len(subs) - 1:
                indicators = indicators + ["="]
            shortest = None
            for indicator in indicators:
                if indicator in resp:
                    tail = resp.split(indicator)[-1].strip()
                    if not shortest or len(tail) < len(shortest):
                        shortest = tail
            if shortest and shortest.strip() not in (":", ",", ".", "!", "?", ";", "'"):
                keys.append(shortest)
        return keys or [response]

    keys = key_subresponses(response)
    preds = list(keys)
    for resp in keys:
        preds.extend(extract_numbers(resp))
    normalized = []
    for p in preds:
        normalized.extend(normalize_str(p))
    return list(dict.fromkeys(normalized))  # the reference's set(), in a stable order


def eval_open(gold, preds: list) -> bool:
    """mathvista.py:576-600: a string answer is right if it occurs in a predicted string, a number
    if it equals a predicted number (after rounding to 2 decimals)."""
    golds = []
    for g in (gold if isinstance(gold, list) else [gold]):
        golds.extend(normalize_str(str(g)))
    for pred in preds:
        if isinstance(pred, str):
            if any(isinstance(g, str) and g in pred for g in golds):
                return True
        elif pred in golds:
            return True
    return False


def mathvista_process_results(doc, results):
    output = results[0]
    if doc["question_type"] == "multi_choice":
        choices = list(doc["choices"])
        letters = list(LETTERS[:len(choices)])
        gold = {c: l for c, l in zip(choices, letters)}[doc["answer"]]  # the last letter of equal texts
        rng = random.Random(f"mathvista-{doc['pid']}")
        pred = parse_multi_choice_response(output, letters, dict(zip(letters, choices)), rng)
        correct = pred == gold
    else:
        pred = parse_open_response(output)
        correct = eval_open(doc["answer"], pred)
    return {"accuracy": {"id": doc["pid"], "output": output, "answer": doc["answer"],
                         "parsed": str(pred), "answer_type": doc["answer_type"],
                         "correct": bool(correct)}}


# ------------------------------------------------------------------ POPE: by generation

POPE_METRICS = ("accuracy", "f1", "yes_ratio", *(f"{m}_{s}" for s in POPE_SPLITS for m in ("accuracy", "f1")))


def pope_label(output: str) -> str:
    """pope.py:414: the output with "," then "." stripped from its ends, lower-cased. Only an exact
    "yes" or "no" can be right ("Yes, there is" is neither)."""
    return output.strip(",").strip(".").lower()


def pope_process_results(doc, results):
    item = {"question_id": doc["question_id"], "category": doc["category"],
            "answer": doc["answer"].strip().lower(), "output": results[0], "pred": pope_label(results[0])}
    return {m: item for m in POPE_METRICS}


def _split_accuracy(items) -> float:
    return _percent(it["pred"] == it["answer"] for it in items)


def _split_f1(items) -> float:
    """sklearn's f1_score of "yes" (pope.py:425): 0 when nothing is predicted or true "yes"."""
    tp = sum(it["pred"] == "yes" and it["answer"] == "yes" for it in items)
    predicted = sum(it["pred"] == "yes" for it in items)
    true = sum(it["answer"] == "yes" for it in items)
    return 100.0 * 2 * tp / (predicted + true) if predicted + true else 0.0


def _by_split(items) -> dict[str, list]:
    return {s: chosen for s in POPE_SPLITS if (chosen := [it for it in items if it["category"] == s])}


def pope_accuracy(items):
    """POPE-final-Accuracy (pope.py:436): the mean of the splits' accuracies."""
    splits = _by_split(items)
    return sum(map(_split_accuracy, splits.values())) / len(splits)


def pope_f1(items):
    """POPE-final-F1 (pope.py:437): the mean of the splits' F1."""
    splits = _by_split(items)
    return sum(map(_split_f1, splits.values())) / len(splits)


def pope_yes_ratio(items):
    """The share of outputs that read "yes" (not of the ground truth)."""
    return _percent(it["pred"] == "yes" for it in items)


def _split_metric(name, metric, split):
    """One split's value of a metric (None when the data has no question of that split)."""
    def aggregate(items):
        chosen = [it for it in items if it["category"] == split]
        return metric(chosen) if chosen else None
    aggregate.__name__ = f"pope_{name}_{split}"  # lmms-eval's results name the aggregation
    return aggregate


pope_accuracy_adversarial = _split_metric("accuracy", _split_accuracy, "adversarial")
pope_accuracy_popular = _split_metric("accuracy", _split_accuracy, "popular")
pope_accuracy_random = _split_metric("accuracy", _split_accuracy, "random")
pope_f1_adversarial = _split_metric("f1", _split_f1, "adversarial")
pope_f1_popular = _split_metric("f1", _split_f1, "popular")
pope_f1_random = _split_metric("f1", _split_f1, "random")


# ------------------------------------------- POPE: the likelihood scorer (not the published)

LIKELIHOOD_METRICS = ("likelihood_accuracy", "likelihood_auc")


def loglikelihood_result(x) -> tuple[float, bool]:
    """A model's (log-likelihood, is_greedy). lmms-eval 0.7.3 passes every response through
    `unwrap_generation_output`, which turns this tuple into its str(); repr of a float round-trips,
    so reading it back loses nothing."""
    if isinstance(x, str):
        x = ast.literal_eval(x)
    ll, greedy = x
    return float(ll), bool(greedy)


def pope_likelihood_process_results(doc, results):
    """results: [(log p(Yes), greedy), (log p(No), greedy)], in pope_doc_to_choice's order. As
    PopeProbScorer: "yes" if p(Yes) > p(No); its AUC ranks by p(Yes) / (p(Yes) + p(No)), which
    orders as the margin log p(Yes) - log p(No)."""
    (ll_yes, _), (ll_no, _) = loglikelihood_result(results[0]), loglikelihood_result(results[1])
    item = {"question_id": doc["question_id"], "category": doc["category"],
            "answer": doc["answer"].strip().lower(), "pred": "yes" if ll_yes > ll_no else "no",
            "margin": float(ll_yes - ll_no)}
    return {m: item for m in LIKELIHOOD_METRICS}


def pope_likelihood_accuracy(items):
    """POPE-final-Accuracy of PopeProbScorer (pope.py:345): the mean over the splits."""
    return pope_accuracy(items)


def pope_auc(items):
    """POPE-final-AUCROC (pope.py:347, over all splits together): area under the ROC curve of the
    margin, ties counted half."""
    pos = sorted(it["margin"] for it in items if it["answer"] == "yes")
    neg = sorted(it["margin"] for it in items if it["answer"] == "no")
    if not pos or not neg:
        return None
    wins = sum(bisect.bisect_left(neg, p) + 0.5 * (bisect.bisect_right(neg, p) - bisect.bisect_left(neg, p))
               for p in pos)
    return 100.0 * wins / (len(pos) * len(neg))
