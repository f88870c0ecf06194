# Open-Qwen2VL reproduction harness. Stages live in rules/*.smk; code in src/oqvl.
#   snakemake --cores all results/table4.csv                       (toy scale, config/default.yaml)
#   snakemake --configfile config/full.yaml --profile profiles/slurm results/table4.csv   (paper)
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "src"))
from oqvl.config import ConfigError, validate
from oqvl.scale import resolve

# The toy config unless one is given: a --configfile replaces it rather than being merged over it,
# so config/full.yaml and config/ci.yaml each say everything they mean.
if not workflow.overwrite_configfiles:
    configfile: "config/default.yaml"

report: "report/workflow.rst"

CONFIG_FILES = ", ".join(map(str, workflow.overwrite_configfiles or ["config/default.yaml"]))  # for errors
try:
    resolve(validate(config))  # rules/common.smk keeps the resolved scale as SCALE
except ConfigError as e:
    sys.exit(f"config error: {CONFIG_FILES}: {e}")

# Every job runs `$PY`, the interpreter running Snakemake, so it sees the same pinned packages.
shell.prefix(f"set -euo pipefail; PY={shlex.quote(sys.executable)}; ")

include: "rules/common.smk"
include: "rules/raw.smk"
include: "rules/filter.smk"
include: "rules/mixture.smk"
include: "rules/pack.smk"
include: "rules/train.smk"
include: "rules/mlm_filter.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"

try:
    cluster.check(config, cluster.rule_names(Path(workflow.basedir) / "rules"))
except ConfigError as e:
    sys.exit(f"config error: {CONFIG_FILES}: {e}")


rule all:
    """Everything: every configured run trained and evaluated (table3), table4 and the summary,
    compute.csv, and at toy scale the filter-quality report (CLIP and MLM-Filter against the truth)."""
    default_target: True
    input:
        L.TABLE4,
        L.TABLE3,
        L.COMPUTE,
        *([f"{L.QUALITY}/report.md"] if SCALE.has("filter_quality") else []),
