# Stage 8, report: compute accounting, result tables beside the paper's, plots, the run summary,
# and the outputs `snakemake --report results/report.html` shows (captions in report/). Every file
# a report job reads is a declared input, named by oqvl.layout: a renamed output fails the DAG.
from oqvl.report.plots import PLOTS
from oqvl.report.tables import table3_runs


def source_jobs(source, kept):
    """The jobs behind one source's kept set (`filter`, `mlm` or `union`)."""
    wc = {"source": source}
    jobs = [("generate_pairs" if source in SCALE.generated else "import_pairs", wc), ("download", wc)]
    if config["filter"]["sources"][source]["method"] == "clip":
        jobs.append(("clip_score", wc))
    jobs.append(("keep", wc))
    if kept in ("mlm", "union"):
        jobs += [("mlm_import" if SCALE.mlm == "import" else "mlm_score", wc), ("keep_mlm", wc)]
    if kept == "union":
        jobs.append(("keep_union", wc))
    return jobs


def toy_jobs(*rules):
    return [(r, {}) for r in rules if SCALE.has(r)]


def run_jobs(run):
    """Every job one run's results rest on, from the raw pairs to its evaluations."""
    mixture = config["runs"][run]["mixture"]
    mix = config["mixtures"][mixture]
    jobs = [j for s in mix["sources"] for j in source_jobs(s, mix["kept"].get(s, "filter"))]
    if any(r == "mlm_score" for r, _ in jobs):
        jobs += toy_jobs("mlm_filter_seed", "train_mlm_filter")
    jobs += toy_jobs("train_clip", "tokenizer", "sft_data")
    jobs += [("mixture", {"mixture": mixture}), ("pack", {"mixture": mixture}),
             ("pretrain", {"run": run}), ("sft", {"run": run}), ("eval_data", {})]
    jobs += [("evaluate", {"run": run, "benchmark": b}) for b in BENCHMARKS]
    return jobs


def unique(jobs):
    seen, out = set(), []
    for rule, wc in jobs:
        key = (rule, tuple(sorted(wc.items())))
        if key not in seen:
            seen.add(key)
            out.append((rule, wc))
    return out


def all_jobs():
    """Every accounted job of the configured runs, every packed mixture and (toy) the filter report."""
    jobs = [j for run in config["runs"] for j in run_jobs(run)]
    for m in config["mixtures"]:
        jobs += [("mixture", {"mixture": m}), ("pack", {"mixture": m})]
    return unique(jobs + toy_jobs("filter_quality"))


def job_records(jobs):
    """[benchmark file, manifest] of each job: what the accounting reads of it."""
    return [[L.benchmark(rule, **wc), L.manifest(rule, **wc)] for rule, wc in jobs]


def run_record(run):
    """What a table reads of one run: its evaluation rows, its pretraining (summary and job), and
    the manifests its rows' provenance lists."""
    mixture = config["runs"][run]["mixture"]
    return {
        "mixture": mixture,
        "evals": [L.eval_rows(run, b) for b in BENCHMARKS],
        "pretrain_summary": L.train_summary(run, "pretrain"),
        "pretrain_job": job_records([("pretrain", {"run": run})])[0],
        "manifests": [L.manifest(r, **wc) for r, wc in
                      [("mixture", {"mixture": mixture}), ("pack", {"mixture": mixture}),
                       ("pretrain", {"run": run}), ("sft", {"run": run}),
                       *[("evaluate", {"run": run, "benchmark": b}) for b in BENCHMARKS]]],
    }


def record_files(record):
    return [*record["evals"], record["pretrain_summary"], *record["pretrain_job"], *record["manifests"]]


def table_inputs(runs):
    return [f for run in runs for f in record_files(run_record(run))]


def compute_inputs():
    records = job_records(all_jobs())
    pretrain = {run: {"summary": L.train_summary(run, "pretrain"),
                      "packed_stats": L.packed_stats(config["runs"][run]["mixture"])} for run in config["runs"]}
    return {"jobs": records, "pretrain": pretrain}


def flat(inputs):
    return [*(f for pair in inputs["jobs"] for f in pair),
            *(f for p in inputs["pretrain"].values() for f in p.values())]


def report_config():
    """The config keys the report reads (the params show what the rule depends on)."""
    return {k: config.get(k) for k in ("scale", "model", "mixtures", "runs", "table4_run", "report")}


rule compute:
    """GPU-hours, CPU-hours, peak memory and throughput per job; paper-scale projection."""
    input:
        flat(compute_inputs()),
    output:
        csv=report(L.COMPUTE, caption="../report/compute.rst", category="Compute"),
        html=report(f"{L.REPORT_HTML}/compute.html", caption="../report/compute.rst", category="Compute"),
    params:
        inputs=as_json(compute_inputs()),
        config=as_json(report_config()),
    container: config["containers"]["data"]
    log:
        L.log("compute"),
    benchmark:
        L.benchmark("compute")
    shell:
        "{PY} -m oqvl.report.compute --inputs-json {params.inputs:q} --config-json {params.config:q}"
        " --out {output.csv:q} --html {output.html:q} > {log} 2>&1"


rule table4:
    """The final model (config table4_run) beside the paper's Table 4, and the run's summary:
    its scores against chance and the shuffled-image control, what each job took, provenance."""
    input:
        table_inputs([config["table4_run"]]),
        flat({"jobs": job_records(run_jobs(config["table4_run"])), "pretrain": {}}),
    output:
        csv=report(L.TABLE4, caption="../report/table4.rst", category="Tables"),
        html=report(f"{L.REPORT_HTML}/table4.html", caption="../report/table4.rst", category="Tables"),
        summary=L.SUMMARY,
    params:
        runs=as_json({config["table4_run"]: run_record(config["table4_run"])}),
        jobs=as_json(job_records(run_jobs(config["table4_run"]))),
        config=as_json(config),
        report_config=as_json(report_config()),
    container: config["containers"]["data"]
    log:
        L.log("table4"),
    benchmark:
        L.benchmark("table4")
    shell:
        "{PY} -m oqvl.report.tables table4 --runs-json {params.runs:q} --config-json {params.config:q}"
        " --out {output.csv:q} --html {output.html:q} > {log} 2>&1"
        " && {PY} -m oqvl.report.summary --table4 {output.csv:q} --runs-json {params.runs:q} --jobs-json {params.jobs:q}"
        " --config-json {params.report_config:q} --out {output.summary:q} >> {log} 2>&1"


rule table3:
    """The data-mixture ablation (1+2, 1+3, 1+2+3, 1+4) beside the paper's Table 3."""
    input:
        table_inputs(table3_runs(config)),
    output:
        csv=report(L.TABLE3, caption="../report/table3.rst", category="Tables"),
        html=report(f"{L.REPORT_HTML}/table3.html", caption="../report/table3.rst", category="Tables"),
    params:
        runs=as_json({run: run_record(run) for run in table3_runs(config)}),
        config=as_json(config),
    container: config["containers"]["data"]
    log:
        L.log("table3"),
    benchmark:
        L.benchmark("table3")
    shell:
        "{PY} -m oqvl.report.tables table3 --runs-json {params.runs:q} --config-json {params.config:q}"
        " --out {output.csv:q} --html {output.html:q} > {log} 2>&1"


rule plots:
    """Scores per mixture beside the paper's, loss curves of every run, hours by stage."""
    input:
        table3=L.TABLE3,
        compute=L.COMPUTE,
        summaries=[L.train_summary(run, stage) for run in config["runs"] for stage in L.TRAIN_STAGES],
    output:
        scores=report(f"{L.PLOTS}/{PLOTS['scores']}", caption="../report/scores.rst", category="Plots"),
        loss=report(f"{L.PLOTS}/{PLOTS['loss']}", caption="../report/loss.rst", category="Plots"),
        compute=report(f"{L.PLOTS}/{PLOTS['compute']}", caption="../report/compute_plot.rst", category="Plots"),
    params:
        # Each training stage's loss log lies beside its summary, complete once the summary is.
        logs=as_json({run: {stage: L.train_log(run, stage) for stage in L.TRAIN_STAGES} for run in config["runs"]}),
        out=L.PLOTS,
    container: config["containers"]["data"]
    log:
        L.log("plots"),
    benchmark:
        L.benchmark("plots")
    shell:
        "{PY} -m oqvl.report.plots --table3 {input.table3:q} --compute {input.compute:q}"
        " --train-logs-json {params.logs:q} --out-dir {params.out} > {log} 2>&1"
