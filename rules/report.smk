# Stage 8, report: compute accounting, result tables beside the paper's, plots, the run summary,
# and the outputs `snakemake --report results/report.html` shows (captions in report/). Every file
# a report job reads is a declared input, named by oqvl.layout: a renamed output fails the DAG.
from oqvl.report.plots import PLOTS
from oqvl.report.tables import table3_runs


TABLE4_RUN = config["table4_run"]
TABLE3_RUNS = table3_runs(config)
# "run seed k" -> stage -> the manifest of that training job (its loss log); a run that fine-tunes
# another's pretraining shows that pretraining.
TRAIN_MANIFESTS = {f"{run} seed {seed}": {"pretrain": L.manifest("pretrain", run=P.pretrain_run(run), seed=seed),
                                          "sft": L.manifest("sft", run=run, seed=seed)}
                   for run in config["runs"] for seed in P.seeds(run)}


rule compute:
    """GPU-hours, CPU-hours, peak memory and throughput per job; paper-scale projection."""
    input:
        compute_files(P.compute_inputs()),
    output:
        csv=report(L.COMPUTE, caption="../report/compute.rst", category="Compute"),
        html=report(f"{L.REPORT_HTML}/compute.html", caption="../report/compute.rst", category="Compute"),
    params:
        inputs=as_json(P.compute_inputs()),
        config=as_json(P.report_config()),
    resources:
        **asks("compute"),
    container: config["containers"]["data"]
    log:
        L.log("compute"),
    benchmark:
        L.benchmark("compute")
    shell:
        "$PY -m oqvl.report.compute --inputs-json {params.inputs:q} --config-json {params.config:q}"
        " --out {output.csv:q} --html {output.html:q} > {log} 2>&1"


rule table4:
    """The final model (config table4_run) beside the paper's Table 4, and the run's summary:
    its scores against chance and the shuffled-image control, what each job took, provenance."""
    input:
        record_files(P.run_record(TABLE4_RUN)),
        [f for job in P.run_jobs(TABLE4_RUN) for f in job_files(job)],
        [f for name in P.released() for f in record_files(P.released_record(name))],
    output:
        csv=report(L.TABLE4, caption="../report/table4.rst", category="Tables"),
        html=report(f"{L.REPORT_HTML}/table4.html", caption="../report/table4.rst", category="Tables"),
        summary=L.SUMMARY,
    params:
        runs=as_json({TABLE4_RUN: P.run_record(TABLE4_RUN)}),
        released=as_json({name: P.released_record(name) for name in P.released()}),
        jobs=as_json([job_files(job) for job in P.run_jobs(TABLE4_RUN)]),
        config=as_json(config),
        report_config=as_json(P.report_config()),
    resources:
        **asks("table4"),
    container: config["containers"]["data"]
    log:
        L.log("table4"),
    benchmark:
        L.benchmark("table4")
    shell:
        "$PY -m oqvl.report.tables table4 --runs-json {params.runs:q} --released-json {params.released:q}"
        " --config-json {params.config:q} --out {output.csv:q} --html {output.html:q} > {log} 2>&1"
        " && $PY -m oqvl.report.summary --table4 {output.csv:q} --runs-json {params.runs:q} --jobs-json {params.jobs:q}"
        " --config-json {params.report_config:q} --out {output.summary:q} >> {log} 2>&1"


rule table3:
    """The data-mixture ablation (1+2, 1+3, 1+2+3, 1+4) beside the paper's Table 3."""
    input:
        [f for run in TABLE3_RUNS for f in record_files(P.run_record(run))],
    output:
        csv=report(L.TABLE3, caption="../report/table3.rst", category="Tables"),
        html=report(f"{L.REPORT_HTML}/table3.html", caption="../report/table3.rst", category="Tables"),
    params:
        runs=as_json({run: P.run_record(run) for run in TABLE3_RUNS}),
        config=as_json(config),
    resources:
        **asks("table3"),
    container: config["containers"]["data"]
    log:
        L.log("table3"),
    benchmark:
        L.benchmark("table3")
    shell:
        "$PY -m oqvl.report.tables table3 --runs-json {params.runs:q} --config-json {params.config:q}"
        " --out {output.csv:q} --html {output.html:q} > {log} 2>&1"


rule plots:
    """Scores per mixture beside the paper's, loss curves of every run, hours by stage."""
    input:
        table3=L.TABLE3,
        compute=L.COMPUTE,
        manifests=[m for stages in TRAIN_MANIFESTS.values() for m in stages.values()],
    output:
        scores=report(f"{L.PLOTS}/{PLOTS['scores']}", caption="../report/scores.rst", category="Plots"),
        loss=report(f"{L.PLOTS}/{PLOTS['loss']}", caption="../report/loss.rst", category="Plots"),
        compute=report(f"{L.PLOTS}/{PLOTS['compute']}", caption="../report/compute_plot.rst", category="Plots"),
    params:
        # Each training job's manifest lists its loss log (with its hash).
        manifests=as_json(TRAIN_MANIFESTS),
        out=folder_of("scores"),
    resources:
        **asks("plots"),
    container: config["containers"]["data"]
    log:
        L.log("plots"),
    benchmark:
        L.benchmark("plots")
    shell:
        "$PY -m oqvl.report.plots --table3 {input.table3:q} --compute {input.compute:q}"
        " --train-manifests-json {params.manifests:q} --out-dir {params.out} > {log} 2>&1"
