# Stage 8, report: result tables beside the paper's.
# Until the evaluation stage exists, table4 depends on the furthest stage the DAG has (the raw
# shards of every source) and holds the paper's rows only.


rule table4:
    input:
        expand("results/raw/{source}/accounting.json", source=config["sources"]),
    output:
        "results/table4.csv",
    log:
        "results/logs/report/table4.log",
    benchmark:
        "results/benchmarks/report/table4.tsv"
    shell:
        "{PY} -m oqvl.report.tables table4 --out {output:q} > {log} 2>&1"
