# Stage 3, mixture: the kept pairs of the listed sources, resharded together.


def mixture_parts(wildcards):
    mix = config["mixtures"][wildcards.mixture]
    return {"shards": [f"results/raw/{s}/shards" for s in mix["sources"]],
            "kept": [kept_file(s, mix["kept"].get(s, "filter")) for s in mix["sources"]]}


def kept_file(source, kept):
    """A source's kept set: its own filter's, the MLM-Filter's, or their union."""
    return f"results/filter/{source}/kept{'' if kept == 'filter' else '_' + kept}.parquet"


rule mixture:
    input:
        unpack(mixture_parts),
    output:
        shards=directory("results/mixtures/{mixture}/shards"),
        manifest="results/mixtures/{mixture}/manifest.json",
    wildcard_constraints:
        mixture=alternatives([re.escape(m) for m in config["mixtures"]]),
    params:
        parts=lambda w, input: " ".join(
            f"--part {s} {sh} {k}" for s, sh, k in
            zip(config["mixtures"][w.mixture]["sources"], input.shards, input.kept)),
        per_shard=lambda w: config["mixtures"][w.mixture]["samples_per_shard"],
    container: config["containers"]["data"]
    log:
        "results/logs/mixture/{mixture}.log",
    benchmark:
        "results/benchmarks/mixture/{mixture}.tsv"
    shell:
        "{PY} -m oqvl.mixture {params.parts} --out results/mixtures/{wildcards.mixture}"
        " --samples-per-shard {params.per_shard} > {log} 2>&1"
