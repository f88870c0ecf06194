# Stage 8, report: result tables beside the paper's.
# Until the evaluation stage exists, table4 depends on the furthest stages the DAG has (every
# packed mixture, and the filter-quality report at toy scale) and holds the paper's rows only.


rule table4:
    input:
        expand("results/packed/{mixture}/stats.json", mixture=config["mixtures"]),
        ["results/filter/quality/report.md"] if GENERATED else [],
    output:
        "results/table4.csv",
    log:
        "results/logs/report/table4.log",
    benchmark:
        "results/benchmarks/report/table4.tsv"
    shell:
        "{PY} -m oqvl.report.tables table4 --out {output:q} > {log} 2>&1"
