# Stage 3, mixture: the kept pairs of the listed sources, resharded together.


rule mixture:
    input:
        unpack(lambda w: P.mixture_parts(w.mixture)),
    output:
        shards=directory(L.mixture_shards()),
        manifest=L.manifest("mixture"),
    wildcard_constraints:
        mixture=alternatives(config["mixtures"]),
    params:
        parts=lambda w, input: " ".join(
            f"--part {s} {sh} {k}" for s, sh, k in
            zip(config["mixtures"][w.mixture]["sources"], input.shards, input.kept)),
        per_shard=lambda w: config["mixtures"][w.mixture]["samples_per_shard"],
        out=folder_of("manifest"),
    resources:
        **asks("mixture"),
    container: config["containers"]["data"]
    log:
        L.log("mixture"),
    benchmark:
        L.benchmark("mixture")
    shell:
        "$PY -m oqvl.mixture {params.parts} --out {params.out:q}"
        " --samples-per-shard {params.per_shard} > {log} 2>&1"
