"""Every output path of the workflow, named once: the rules, the stages and the report read them here.

Path functions take their wildcards as arguments and default to the wildcard itself, so
`clip_scores()` is the rule's pattern `results/filter/{source}/clip_scores.parquet` and
`clip_scores("ccs")` one job's file. `JOBS` names, for every rule that does accounted work, its
log, its benchmark record (Snakemake's extended format: the GPU-hour accounting) and its manifest
(what the job did: `oqvl.manifest`).
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from .manifest import manifest_path

RESULTS = "results"


def _fill(pattern: str, wildcards: dict) -> str:
    """`pattern` with the given wildcards filled in and the others left as `{name}`."""
    names = {f for _, f, _, _ in string.Formatter().parse(pattern) if f}
    return pattern.format(**{n: wildcards.get(n, "{" + n + "}") for n in names})


# ------------------------------------------------------------------------------ stage 1: raw
def raw_dir(source="{source}"):
    return f"{RESULTS}/raw/{source}"


def pairs(source="{source}"):
    return f"{raw_dir(source)}/pairs.parquet"


def truth(source="{source}"):
    return f"{raw_dir(source)}/truth.parquet"


def images(source="{source}"):
    return f"{raw_dir(source)}/images"


def shards(source="{source}"):
    return f"{raw_dir(source)}/shards"


def shards_partial(source="{source}"):
    """The download's working folder: not an output (Snakemake would delete it before a rerun),
    so a killed download resumes from its finished shards; moved to `shards()` when complete."""
    return f"{raw_dir(source)}/shards.partial"


def accounting(source="{source}"):
    return f"{raw_dir(source)}/accounting.json"


def samples(source="{source}"):
    """An ingested source's samples (released shards): one row each, valid or failed with its reason."""
    return f"{raw_dir(source)}/samples.parquet"


# --------------------------------------------------------------------------- stage 2: filter
CLIP_MODEL = f"{RESULTS}/filter/clip_model"     # the toy CLIP model (rule train_clip)
MLM_MODEL = f"{RESULTS}/filter/mlm_model"       # the toy MLM-Filter: seed.parquet, init/, train/
MLM_RELEASE = f"{RESULTS}/filter/mlm_release"   # the released MLM-Filter, converted (rule convert_mlm_filter)
QUALITY = f"{RESULTS}/filter/quality"           # filters judged against the toy world's truth


def filter_dir(source="{source}"):
    return f"{RESULTS}/filter/{source}"


def clip_scores(source="{source}"):
    return f"{filter_dir(source)}/clip_scores.parquet"


def clip_failures(source="{source}"):
    return f"{filter_dir(source)}/clip_failures.parquet"


def clip_stats(source="{source}"):
    return f"{filter_dir(source)}/clip_score_stats.json"


def mlm_scores(source="{source}"):
    return f"{filter_dir(source)}/mlm_scores.parquet"


def mlm_failures(source="{source}"):
    return f"{filter_dir(source)}/mlm_failures.parquet"


def mlm_stats(source="{source}"):
    return f"{filter_dir(source)}/mlm_score_stats.json"


def user_scores(source="{source}", which="{which}"):
    """Scores of a user's scorer (method scorer) for one of a source's filters: its own
    (`which` = filter) or a named one of filter.extra."""
    return f"{filter_dir(source)}/user_scores_{which}.parquet"


def user_failures(source="{source}", which="{which}"):
    return f"{filter_dir(source)}/user_failures_{which}.parquet"


def user_stats(source="{source}", which="{which}"):
    return f"{filter_dir(source)}/user_score_stats_{which}.json"


def kept(source="{source}", which="filter"):
    """A source's kept set: its own filter's (`kept.parquet`), the MLM-Filter's, their union, or
    a named filter's of filter.extra (`kept_<name>.parquet`)."""
    return f"{filter_dir(source)}/kept{'' if which == 'filter' else '_' + which}.parquet"


def kept_stats(source="{source}", which="filter"):
    return kept(source, which).replace(".parquet", "_stats.json")


# ----------------------------------------------------------------------- stages 3-4: mixtures
def mixture_dir(mixture="{mixture}"):
    return f"{RESULTS}/mixtures/{mixture}"


def mixture_shards(mixture="{mixture}"):
    return f"{mixture_dir(mixture)}/shards"


TOKENIZER = f"{RESULTS}/model/tokenizer"        # the toy tokenizer (rule tokenizer)


def packed_dir(mixture="{mixture}"):
    return f"{RESULTS}/packed/{mixture}"


def packed_sequences(mixture="{mixture}"):
    return f"{packed_dir(mixture)}/sequences.parquet"


def packed_stats(mixture="{mixture}"):
    return f"{packed_dir(mixture)}/stats.json"


# ---------------------------------------------------------------- stages 5-7: one run's chain
TOY_SFT_DATA = f"{RESULTS}/sft_data/toy.parquet"
EVAL_DATA = f"{RESULTS}/eval_data"
TRAIN_STAGES = ("pretrain", "sft")


def run_dir(run="{run}"):
    return f"{RESULTS}/runs/{run}"


def seed_dir(run="{run}", seed="{seed}"):
    """One seed of a run: its own pretrain -> SFT -> evaluate chain (its own init and data order)."""
    return f"{run_dir(run)}/seed{seed}"


def train_dir(run="{run}", stage="{stage}", seed="{seed}"):
    return f"{seed_dir(run, seed)}/{stage}"


def final_model(run="{run}", stage="{stage}", seed="{seed}"):
    """A training stage's final checkpoint (its config.json: written last, so it marks completion)."""
    return f"{train_dir(run, stage, seed)}/final/config.json"


def train_summary(run="{run}", stage="{stage}", seed="{seed}"):
    return f"{train_dir(run, stage, seed)}/summary.json"


def eval_data(benchmark="{benchmark}", split="{split}", shuffled=False):
    """A benchmark file of one split (oqvl.evaluate.toy.SPLITS: test, heldout, dev)."""
    return f"{EVAL_DATA}/{split}/{benchmark}{'_shuffled' if shuffled else ''}.parquet"


def eval_dir(run="{run}", seed="{seed}", split="{split}"):
    """One seed's evaluation on one benchmark split: one job, every benchmark (its manifest here)."""
    return f"{seed_dir(run, seed)}/eval/{split}"


def eval_rows(run="{run}", benchmark="{benchmark}", seed="{seed}", split="{split}"):
    """One seed's tidy rows on one benchmark of a split (both protocols, with the shuffled-image control)."""
    return f"{eval_dir(run, seed, split)}/{benchmark}.json"


def eval_details(run="{run}", benchmark="{benchmark}", seed="{seed}", split="{split}"):
    """lmms-eval's files behind those rows (task YAMLs, results JSON, sample logs)."""
    return f"{eval_dir(run, seed, split)}/{benchmark}"


def run_results(run="{run}"):
    """Every seed's tidy rows of a run, as one CSV."""
    return f"{run_dir(run)}/eval/tidy.csv"


def released_dir(name="{name}"):
    """A released checkpoint's folder (config `released`): its conversion to this project's format
    (format prismatic; a qwen2_vl release is read where it was downloaded) and its evaluation."""
    return f"{RESULTS}/released/{name}"


def released_model(name="{name}"):
    return f"{released_dir(name)}/config.json"


def released_eval_dir(name="{name}", split="{split}"):
    """A released checkpoint's evaluation on one split (no seeds: nothing of it is trained here)."""
    return f"{released_dir(name)}/eval/{split}"


def released_eval_rows(name="{name}", benchmark="{benchmark}", split="{split}"):
    return f"{released_eval_dir(name, split)}/{benchmark}.json"


def released_eval_details(name="{name}", benchmark="{benchmark}", split="{split}"):
    return f"{released_eval_dir(name, split)}/{benchmark}"


# --------------------------------------------------------------------------- stage 8: report
TABLE4 = f"{RESULTS}/table4.csv"
TABLE3 = f"{RESULTS}/table3.csv"
COMPUTE = f"{RESULTS}/compute.csv"
SUMMARY = f"{RESULTS}/summary.md"
REPORT_HTML = f"{RESULTS}/report"
PLOTS = f"{RESULTS}/plots"
PAPER_TABLES = f"{RESULTS}/reference/paper_tables.csv"   # committed: the paper's own numbers


# ------------------------------------------------------------------- logs, benchmarks, manifests
@dataclass(frozen=True)
class JobFiles:
    stage: str      # the folder under results/logs/ and results/benchmarks/
    name: str       # the job's file name there (with the rule's wildcards)
    output: str     # the output its manifest lies beside (oqvl.manifest.manifest_path)


JOBS = {
    "generate_pairs": JobFiles("raw", "generate_pairs_{source}", pairs()),
    "import_pairs": JobFiles("raw", "import_pairs_{source}", pairs()),
    "download": JobFiles("raw", "download_{source}", accounting()),  # not inside shards/, a directory output
    "ingest_shards": JobFiles("raw", "ingest_shards_{source}", accounting()),  # the shards are the user's
    "train_clip": JobFiles("filter", "train_clip", CLIP_MODEL),
    "clip_score": JobFiles("filter", "clip_score_{source}", clip_scores()),
    "keep": JobFiles("filter", "keep_{source}", kept()),
    "user_score": JobFiles("filter", "user_score_{source}_{which}", user_scores()),
    "keep_extra": JobFiles("filter", "keep_{which}_{source}", kept(which="{which}")),
    "filter_quality": JobFiles("filter", "quality", QUALITY),
    "mlm_filter_seed": JobFiles("filter", "mlm_filter_seed", f"{MLM_MODEL}/seed.parquet"),
    "train_mlm_filter": JobFiles("filter", "train_mlm_filter", f"{MLM_MODEL}/train"),
    "mlm_score": JobFiles("filter", "mlm_score_{source}", mlm_scores()),
    "mlm_import": JobFiles("filter", "mlm_import_{source}", mlm_scores()),
    "convert_mlm_filter": JobFiles("filter", "convert_mlm_filter", MLM_RELEASE),
    "keep_mlm": JobFiles("filter", "keep_mlm_{source}", kept(which="mlm")),
    "keep_union": JobFiles("filter", "keep_union_{source}", kept(which="union")),
    "mixture": JobFiles("mixture", "{mixture}", mixture_dir()),
    "tokenizer": JobFiles("model", "tokenizer", TOKENIZER),
    "pack": JobFiles("pack", "{mixture}", packed_dir()),
    "sft_data": JobFiles("train", "sft_data", TOY_SFT_DATA),
    "pretrain": JobFiles("train", "{run}_seed{seed}_pretrain", train_dir(stage="pretrain")),
    "sft": JobFiles("train", "{run}_seed{seed}_sft", train_dir(stage="sft")),
    "eval_data": JobFiles("evaluate", "eval_data", EVAL_DATA),
    "evaluate": JobFiles("evaluate", "{run}_seed{seed}_{split}", eval_dir()),
    "evaluate_released": JobFiles("evaluate", "released_{name}_{split}", released_eval_dir()),
    "run_results": JobFiles("evaluate", "{run}_tidy", run_results()),
    "convert_released": JobFiles("model", "released_{name}", released_dir()),
}
# Report rules: logged and benchmarked, not accounted (they summarise the jobs above).
REPORT_JOBS = ("compute", "table4", "table3", "plots")


def _job(rule: str) -> JobFiles:
    if rule in JOBS:
        return JOBS[rule]
    if rule in REPORT_JOBS:
        return JobFiles("report", rule, "")
    raise KeyError(f"no rule {rule!r} in oqvl.layout.JOBS")


def log(rule: str, **wildcards) -> str:
    j = _job(rule)
    return _fill(f"{RESULTS}/logs/{j.stage}/{j.name}.log", wildcards)


def benchmark(rule: str, **wildcards) -> str:
    j = _job(rule)
    return _fill(f"{RESULTS}/benchmarks/{j.stage}/{j.name}.tsv", wildcards)


def manifest(rule: str, **wildcards) -> str:
    return _fill(str(manifest_path(JOBS[rule].output)), wildcards)
