"""The `lmms` protocol: lmms-eval 0.7.3's own rule-based scoring, reused, with no API key.

The task YAMLs (tasks/oqvl_*_lmms.yaml) point straight at lmms-eval's functions for MMBench
(`mmbench_en_dev_static`: circular, `can_infer` then the regex extractor), SEED-Bench, MMStar and
POPE, with lmms-eval's prompts and generation settings. MathVista's functions live in a module that
cannot be imported offline as shipped (it builds an OpenAI client at import, which wants a key, and
imports python-Levenshtein); this module imports it and replaces the evaluator its functions use by
one whose answer extractor (the GPT judge) returns nothing, which is what lmms-eval does when the
judge cannot be reached, minus the retries.

Known quirks of lmms-eval kept here on purpose (tests pin each one):
- SEED-Bench credits only the first character of the output: "The answer is B" is wrong.
- POPE needs the whole lower-cased output to be "yes" or "no": "Yes." is wrong, and counts neither
  as a yes nor as a no in precision and recall. Its `pope_yes_ratio` is the share of "yes" in the
  ground truth, not in the model's answers (0.5 on balanced data whatever the model says).
- MathVista without the judge: a multiple-choice output counts only if it is the option's text
  exactly; a letter ("B") goes to the judge, comes back empty, and is replaced by the option
  closest to "" (the shortest, the first of equal ones). Float answers never score: the released
  `precision` column is a float (2.0) and round(x, 2.0) raises, so the prediction becomes None.
  List answers go to the judge and never score. An accuracy of 0 is reported as None. The real
  release triggers both as our files do: AI4Math/MathVista declares `precision` float64 (its
  dataset card), and the judge is lmms-eval's only route from a letter to an option. Two extra,
  descriptive metrics say how many rows each affects: `share_float_never_scored` (free-form float
  rows, which no output can get right) and `share_choice_by_shortest` (multiple-choice rows whose
  output was not an option's text, so the shortest option was scored instead).
- MMBench circular scoring needs every copy of a question right; a copy whose answer no rule can
  read makes the question wrong (no random fallback without the API).
"""

from __future__ import annotations

import os
import sys
import types


def _edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions), as python-Levenshtein's."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _import_mathvista_utils():
    try:
        import Levenshtein  # noqa: F401
    except ImportError:  # lmms-eval uses only Levenshtein.distance; an exact stand-in keeps its behaviour
        sys.modules["Levenshtein"] = types.SimpleNamespace(distance=_edit_distance)
    placeholder = "OPENAI_API_KEY" not in os.environ
    if placeholder:  # never used: the evaluator below makes no request
        os.environ["OPENAI_API_KEY"] = "unused-no-judge"
    try:
        from lmms_eval.tasks.mathvista import mathvista_evals, utils
    finally:
        if placeholder:
            del os.environ["OPENAI_API_KEY"]
    return mathvista_evals, utils


_mathvista_evals, _mathvista_utils = _import_mathvista_utils()


class NoJudgeMathVistaEvaluator(_mathvista_evals.MathVistaEvaluator):
    """lmms-eval's MathVista evaluator with the judge answering nothing."""

    def get_chat_response(self, *args, **kwargs):
        return ""


_mathvista_utils.mathvista_evaluator = NoJudgeMathVistaEvaluator(quick_extract=False)

# lmms-eval's own functions, now bound to the evaluator above.
mathvista_doc_to_visual = _mathvista_utils.mathvista_doc_to_visual
mathvista_doc_to_text = _mathvista_utils.mathvista_doc_to_text
mathvista_aggregate_results = _mathvista_utils.mathvista_aggregate_results


def mathvista_process_results(doc, results):
    """lmms-eval's scoring, plus the rows its two quirks above decide."""
    out = _mathvista_utils.mathvista_process_results(doc, results)
    # round(x, 2.0) raises for any float precision, 2.0 included
    float_never = doc["answer_type"] == "float" and doc["question_type"] != "multi_choice" \
        and isinstance(doc.get("precision"), float)
    by_shortest = doc["question_type"] == "multi_choice" and results[0].strip() not in (doc["choices"] or [])
    out["share_float_never_scored"] = bool(float_never)
    out["share_choice_by_shortest"] = bool(by_shortest)
    return out


def share(flags) -> float:
    """The percentage of rows flagged."""
    flags = list(flags)
    return 100.0 * sum(flags) / len(flags) if flags else 0.0
