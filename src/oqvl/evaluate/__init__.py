"""Evaluation: the five benchmarks through lmms-eval, under two protocols, with a shuffled-image control.

    python -m oqvl.evaluate.toy       toy benchmarks in the real column schemas -> results/eval_data/<split>/
    python -m oqvl.evaluate.convert   the real releases -> the same files of the test split (paper scale)
    python -m oqvl.evaluate.tasks     lmms-eval task directory bound to a data directory
    python -m oqvl.evaluate           one checkpoint on one benchmark: both protocols, the control,
                                      lmms-eval's results and samples, and tidy rows

Modules: schemas (columns, files, the shuffled-image control), toy, convert, paper (the scorers
behind the published numbers), lmms (lmms-eval's own scorers, reused), adapter (the lmms-eval
model), plugin (its registration), tasks (task YAMLs), tidy (rows, chance levels), run (the entry
point), paired (the paired, clustered test against the control). See docs/evaluation.md.
"""

BENCHMARKS = ("MMBench", "SEEDBench", "MMStar", "MathVista", "POPE")
PROTOCOLS = ("paper", "lmms")
# Benchmark splits: test (reported), heldout (the test items in wording no training data uses;
# reported, toy only), dev (toy instances for tuning, their own images; never reported).
SPLITS = ("test", "heldout", "dev")
