"""The `paper` protocol: the rules behind Open-Qwen2VL's published numbers (a modified TRI-ML
vlm-evaluation), as lmms-eval task functions.

- Prompt: the question, its options one per line, "Answer with the option's letter from the given
  choices directly." and a last line "Answer:" (free-form questions: "Answer the question using a
  single word or phrase." instead). The model adapter puts "<image>\\n" in front and encodes it with
  the chat template, as SFT does.
- Greedy decoding, at most 16 new tokens, stopped at "," "." or a newline (the task YAMLs).
- MMBench, SEED-Bench: right if the lower-cased right letter occurs anywhere in the lower-cased
  output (a substring test: "The answer is B" is right for B and also for A, whose letter occurs in
  "answer"). Every MMBench row counts on its own: the circular copies are plain extra questions.
- MMStar: the same test, case-sensitive ("(b)" is wrong for B; "The answer is B" is not right for A).
- MathVista: MMMU's rule-based parsing, no judge: multiple choice by `parse_multi_choice_response`
  (a letter in brackets, a lone letter, else an option's text in a longer answer, else a random
  letter, seeded by the question id so reruns agree); free-form by `parse_open_response` and
  `eval_open` (numbers rounded to 2 decimals, strings by containment).
- POPE: no generation; "Yes" if log p("Yes" | prompt) > log p("No" | prompt). Accuracy, precision,
  recall and F1 of "yes", the model's yes-ratio, AUC of the log-likelihood margin, and accuracy per
  negative-sampling setting.

Every aggregate is a percentage (0-100).
"""

from __future__ import annotations

import ast
import bisect
import math
import random
import re

LETTERS = "ABCDEFGH"
MC_SUFFIX = "Answer with the option's letter from the given choices directly."
SHORT_SUFFIX = "Answer the question using a single word or phrase."
ANSWER = "Answer:"


def _present(value) -> bool:
    """A hint or option that is really there (not None, NaN or the string "nan")."""
    if value is None:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    return str(value).strip() not in ("", "nan")


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

def mmbench_options(doc) -> list[tuple[str, str]]:
    return [(c, str(doc[c])) for c in "ABCD" if c in doc and _present(doc[c])]


def mmbench_doc_to_text(doc):
    lines = [str(doc["hint"])] if _present(doc.get("hint")) else []
    lines += [doc["question"]] + [f"{c}. {o}" for c, o in mmbench_options(doc)]
    return "\n".join(lines + [MC_SUFFIX, ANSWER])


def seedbench_doc_to_text(doc):
    options = [f"{c.upper()}. {doc[f'choice_{c}']}" for c in "abcd"]
    return "\n".join([doc["question"], *options, MC_SUFFIX, ANSWER])


def mmstar_doc_to_text(doc):
    return "\n".join([doc["question"].strip(), MC_SUFFIX, ANSWER])


def mathvista_doc_to_text(doc):
    question = doc["question"]
    if _present(doc.get("unit")):
        question += f" (Unit: {doc['unit']})"
    choices = doc.get("choices") or []
    if choices:
        lines = [question] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)] + [MC_SUFFIX]
    else:
        lines = [question, SHORT_SUFFIX]
    return "\n".join(lines + [ANSWER])


def pope_doc_to_text(doc):
    return "\n".join([doc["question"].strip(), SHORT_SUFFIX, ANSWER])


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


# ------------------------------------------------------------- MMMU rule-based parsing

def parse_multi_choice_response(response: str, all_choices: list[str], index2ans: dict[str, str],
                                rng: random.Random) -> str:
    """MMMU's multiple-choice parser (a letter in brackets, then a lone letter, then an option's
    text in an answer of more than five words; the last occurrence wins; a random letter if none)."""
    for char in (",", ".", "!", "?", ";", ":", "'"):
        response = response.strip(char)
    response = " " + response + " "
    index_ans, ans_with_brack, candidates = True, False, []
    for choice in all_choices:
        if f"({choice})" in response:
            candidates.append(choice)
            ans_with_brack = True
    if not candidates:
        for choice in all_choices:
            if f" {choice} " in response:
                candidates.append(choice)
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
    return candidates[max(range(len(starts)), key=lambda i: (starts[i], -i))]


def check_is_number(string: str) -> bool:
    try:
        float(string.replace(",", ""))
        return True
    except ValueError:
        return False


def normalize_str(string: str) -> list:
    """A number becomes [float rounded to 2 decimals]; a string is lower-cased (a one-letter string
    gets spaces on either side, so it only matches as a word)."""
    string = string.strip()
    if check_is_number(string):
        return [round(float(string.replace(",", "")), 2)]
    string = string.lower()
    if len(string) == 1:
        return [" " + string, string + " "]
    return [string]


def extract_numbers(string: str) -> list[str]:
    with_commas = re.findall(r"-?\b\d{1,3}(?:,\d{3})+\b", string)
    scientific = re.findall(r"-?\d+(?:\.\d+)?[eE][+-]?\d+", string)
    simple = re.findall(r"-?(?:\d+\.\d+|\.\d+|\d+)(?![eE][+-]?\d+)(?![,\d])", string)
    return with_commas + scientific + simple


def parse_open_response(response: str) -> list:
    """MMMU's open-answer parser: the shortest text after a key phrase ("is", "answer", "=" ...) in
    each sentence, plus every number in it, normalised."""
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
                    if shortest is None or len(tail) < len(shortest):
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
    return list(dict.fromkeys(normalized))


def eval_open(gold, preds: list) -> bool:
    """MMMU: a string answer is right if it occurs in a predicted string, a number if it equals a
    predicted number (after rounding to 2 decimals)."""
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
    choices = doc.get("choices") or []
    if doc["question_type"] == "multi_choice" and choices:
        letters = list(LETTERS[:len(choices)])
        index2ans = dict(zip(letters, choices))
        rng = random.Random(f"mathvista-{doc['pid']}")
        pred = parse_multi_choice_response(output, letters, index2ans, rng)
        correct = index2ans[pred] == doc["answer"]
    else:
        pred = parse_open_response(output)
        correct = eval_open(doc["answer"], pred)
    return {"accuracy": {"id": doc["pid"], "output": output, "answer": doc["answer"],
                         "parsed": str(pred), "answer_type": doc["answer_type"],
                         "correct": bool(correct)}}


# ------------------------------------------------------------------------------- POPE

POPE_METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio", "auc",
                "accuracy_adversarial", "accuracy_popular", "accuracy_random")


def loglikelihood_result(x) -> tuple[float, bool]:
    """A model's (log-likelihood, is_greedy). lmms-eval 0.7.3 passes every response through
    `unwrap_generation_output`, which turns this tuple into its str(); repr of a float round-trips,
    so reading it back loses nothing."""
    if isinstance(x, str):
        x = ast.literal_eval(x)
    ll, greedy = x
    return float(ll), bool(greedy)


def pope_process_results(doc, results):
    """results: [(log p(Yes), greedy), (log p(No), greedy)], in pope_doc_to_choice's order."""
    (ll_yes, _), (ll_no, _) = loglikelihood_result(results[0]), loglikelihood_result(results[1])
    item = {"question_id": doc["question_id"], "category": doc["category"],
            "answer": doc["answer"].strip().lower(), "pred": "yes" if ll_yes > ll_no else "no",
            "margin": float(ll_yes - ll_no)}
    return {m: item for m in POPE_METRICS}


def _confusion(items):
    tp = sum(it["pred"] == "yes" and it["answer"] == "yes" for it in items)
    fp = sum(it["pred"] == "yes" and it["answer"] == "no" for it in items)
    fn = sum(it["pred"] == "no" and it["answer"] == "yes" for it in items)
    return tp, fp, fn


def pope_accuracy(items):
    return _percent(it["pred"] == it["answer"] for it in items)


def pope_precision(items):
    tp, fp, _ = _confusion(items)
    return 100.0 * tp / (tp + fp) if tp + fp else 0.0


def pope_recall(items):
    tp, _, fn = _confusion(items)
    return 100.0 * tp / (tp + fn) if tp + fn else 0.0


def pope_f1(items):
    p, r = pope_precision(items), pope_recall(items)
    return 2 * p * r / (p + r) if p + r else 0.0


def pope_yes_ratio(items):
    """The share of the model's answers that are "yes" (not of the ground truth)."""
    return _percent(it["pred"] == "yes" for it in items)


def pope_auc(items):
    """Area under the ROC curve of the margin log p(Yes) - log p(No), ties counted half."""
    pos = sorted(it["margin"] for it in items if it["answer"] == "yes")
    neg = sorted(it["margin"] for it in items if it["answer"] == "no")
    if not pos or not neg:
        return None
    wins = sum(bisect.bisect_left(neg, p) + 0.5 * (bisect.bisect_right(neg, p) - bisect.bisect_left(neg, p))
               for p in pos)
    return 100.0 * wins / (len(pos) * len(neg))


def _category_accuracy(category):
    def aggregate(items):
        chosen = [it for it in items if it["category"] == category]
        return pope_accuracy(chosen) if chosen else None
    aggregate.__name__ = f"pope_accuracy_{category}"
    return aggregate


pope_accuracy_adversarial = _category_accuracy("adversarial")
pope_accuracy_popular = _category_accuracy("popular")
pope_accuracy_random = _category_accuracy("random")
