# Stage 8, report: compute accounting from the benchmark files, result tables beside the paper's,
# plots, and the outputs `snakemake --report results/report.html` shows (captions in report/).
# The tables read the evaluation files of the configured runs (`runs`, `table4_run`); while a
# config names no run, they depend on the furthest stages the DAG has and hold the paper's rows.
from oqvl.report.plots import PLOTS
from oqvl.report.tables import BENCHMARKS as EVAL_BENCHMARKS, table3_runs

PLOT_FILES = [f"results/plots/{name}" for name in PLOTS.values()]
REPORT_TARGETS = ["results/table4.csv", "results/table3.csv", "results/compute.csv", *PLOT_FILES]


def runs_config():
    return dict(config.get("runs") or {})


def produced(path):
    """Whether a rule of this workflow writes path (a stage not written yet has no rule)."""
    return any(r.is_producer(path) for r in workflow.rules)


def eval_files(run):
    """The run's evaluation files, as the evaluation rule names them (MMBench.json or mmbench.json)."""
    names = ([f"results/runs/{run}/eval/{n}.json" for n in (b, b.lower())] for b in EVAL_BENCHMARKS)
    return [f for f in (next((p for p in cands if produced(p)), None) for cands in names) if f]


def run_inputs(runs):
    """What a table needs of its runs: every evaluation file and the pretraining summary; nothing
    while no rule evaluates (a table row needs scores, so training alone would be wasted)."""
    out = []
    for run in runs:
        evals = eval_files(run)
        out += [*evals, f"results/runs/{run}/pretrain/summary.json"] if evals else []
    return out


def upstream_inputs():
    """The furthest stages every config has: each packed mixture, and the filter report (toy)."""
    return [*expand("results/packed/{mixture}/stats.json", mixture=config["mixtures"]),
            *(["results/filter/quality/report.md"] if GENERATED else [])]


def table4_inputs(wildcards):
    run = config.get("table4_run")
    return run_inputs([run]) or upstream_inputs() if run else upstream_inputs()


def table3_inputs(wildcards):
    return [*run_inputs(table3_runs(config)), *upstream_inputs()]


def compute_inputs(wildcards):
    # Every job to be accounted must have finished: each run's evaluations and training (as far as
    # the workflow has rules for them) and every packed mixture.
    trained = [f"results/runs/{run}/{stage}/summary.json" for run in runs_config() for stage in ("pretrain", "sft")]
    return [*run_inputs(runs_config()), *(f for f in trained if produced(f)), *upstream_inputs()]


def compute_config():
    """The config keys the accounting reads (the params show what the rule depends on)."""
    return as_json({k: config.get(k) for k in ("scale", "model", "mixtures", "runs", "report")})


rule compute:
    """GPU-hours, CPU-hours, peak memory and throughput per job; paper-scale projection."""
    input:
        compute_inputs,
    output:
        csv=report("results/compute.csv", caption="../report/compute.rst", category="Compute"),
        html=report("results/report/compute.html", caption="../report/compute.rst", category="Compute"),
    params:
        config=compute_config(),
    container: config["containers"]["data"]
    log:
        "results/logs/report/compute.log",
    benchmark:
        "results/benchmarks/report/compute.tsv"
    shell:
        "{PY} -m oqvl.report.compute --benchmarks results/benchmarks --results results"
        " --config-json {params.config:q} --out {output.csv:q} --html {output.html:q} > {log} 2>&1"


rule table4:
    """The final model (config table4_run) beside the paper's Table 4."""
    input:
        table4_inputs,
    output:
        csv=report("results/table4.csv", caption="../report/table4.rst", category="Tables"),
        html=report("results/report/table4.html", caption="../report/table4.rst", category="Tables"),
    params:
        config=as_json(config),
    container: config["containers"]["data"]
    log:
        "results/logs/report/table4.log",
    benchmark:
        "results/benchmarks/report/table4.tsv"
    shell:
        "{PY} -m oqvl.report.tables table4 --results results --config-json {params.config:q}"
        " --out {output.csv:q} --html {output.html:q} > {log} 2>&1"


rule table3:
    """The data-mixture ablation (1+2, 1+3, 1+2+3, 1+4) beside the paper's Table 3."""
    input:
        table3_inputs,
    output:
        csv=report("results/table3.csv", caption="../report/table3.rst", category="Tables"),
        html=report("results/report/table3.html", caption="../report/table3.rst", category="Tables"),
    params:
        config=as_json(config),
    container: config["containers"]["data"]
    log:
        "results/logs/report/table3.log",
    benchmark:
        "results/benchmarks/report/table3.tsv"
    shell:
        "{PY} -m oqvl.report.tables table3 --results results --config-json {params.config:q}"
        " --out {output.csv:q} --html {output.html:q} > {log} 2>&1"


rule plots:
    """Scores per mixture beside the paper's, loss curves of every run, hours by stage."""
    input:
        table3="results/table3.csv",
        compute="results/compute.csv",
    output:
        scores=report(f"results/plots/{PLOTS['scores']}", caption="../report/scores.rst", category="Plots"),
        loss=report(f"results/plots/{PLOTS['loss']}", caption="../report/loss.rst", category="Plots"),
        compute=report(f"results/plots/{PLOTS['compute']}", caption="../report/compute_plot.rst", category="Plots"),
    params:
        config=compute_config(),
    container: config["containers"]["data"]
    log:
        "results/logs/report/plots.log",
    benchmark:
        "results/benchmarks/report/plots.tsv"
    shell:
        "{PY} -m oqvl.report.plots --table3 {input.table3:q} --compute {input.compute:q}"
        " --results results --config-json {params.config:q} --out-dir results/plots > {log} 2>&1"
