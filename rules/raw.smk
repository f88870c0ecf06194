# Stage 1, raw: a pair list per source (drawn from the toy world, or a released one normalised),
# then img2dataset into webdataset shards; or a source's released, already filtered shards,
# checked and accounted where they lie (ingest_shards).

if SCALE.has("generate_pairs"):

    rule generate_pairs:
        """Toy scale: draw a source from the toy world (images, pair list, truth table)."""
        output:
            pairs=L.pairs(),
            truth=L.truth(),
            images=directory(L.images()),
            manifest=L.manifest("generate_pairs"),
        wildcard_constraints:
            source=alternatives(SCALE.generated),
        params:
            n_pairs=lambda w: config["sources"][w.source]["n_pairs"],
            rates=lambda w: as_json(config["sources"][w.source]["corruption"]),
            seed=config["seed"],
            world=world_args(),
            out=folder_of("pairs"),
        resources:
            **asks("generate_pairs"),
        container: config["containers"]["data"]
        log:
            L.log("generate_pairs"),
        benchmark:
            L.benchmark("generate_pairs")
        shell:
            "$PY -m oqvl.raw.generate --source {wildcards.source} --n-pairs {params.n_pairs}"
            " --rates {params.rates:q} --seed {params.seed} {params.world} --out {params.out:q} > {log} 2>&1"


rule import_pairs:
    """A released pair list (BLIP's JSON, a parquet, DataComp's parquet folder), normalised to
    (url, caption, uid, source[, face_bboxes])."""
    input:
        lambda w: config["sources"][w.source]["pair_list"],
    output:
        pairs=L.pairs(),
        manifest=L.manifest("import_pairs"),
    wildcard_constraints:
        source=alternatives(SCALE.imported),
    params:
        args=lambda w: P.import_args(w.source),
    resources:
        **asks("import_pairs"),
    container: config["containers"]["data"]
    log:
        L.log("import_pairs"),
    benchmark:
        L.benchmark("import_pairs")
    shell:
        "$PY -m oqvl.raw.import_pairs --source {wildcards.source} --pair-list {input:q}"
        " {params.args} --out {output.pairs:q} > {log} 2>&1"


rule download:
    """img2dataset: pair list -> webdataset shards; every pair is a sample or a listed failure.
    It downloads into params.work, no output (Snakemake deletes a failed job's outputs), so a job
    killed at its wall-clock limit resumes there from its finished shards; moved to shards when
    complete and accounted."""
    input:
        L.pairs(),
    output:
        shards=directory(L.shards()),
        accounting=L.accounting(),
        manifest=L.manifest("download"),
    wildcard_constraints:
        source=alternatives(SCALE.downloaded),
    params:
        options=lambda w: as_json(P.download_options(w.source)),
        work=lambda w: L.shards_partial(w.source),
    resources:
        **asks("download"),
    threads: 2
    container: config["containers"]["data"]
    log:
        L.log("download"),
    benchmark:
        L.benchmark("download")
    shell:
        "$PY -m oqvl.raw.download --pairs {input:q} --out {output.shards:q} --work {params.work:q}"
        " --options {params.options:q} --accounting {output.accounting:q} > {log} 2>&1"


rule ingest_shards:
    """Released, already filtered shards (Open-Qwen2VL-Data), read where they lie: every sample
    checked (image, caption, uid), a bad one listed with its reason; the source's accounting."""
    input:
        lambda w: config["sources"][w.source]["shards"],
    output:
        samples=L.samples(),
        accounting=L.accounting(),
        manifest=L.manifest("ingest_shards"),
    wildcard_constraints:
        source=alternatives(SCALE.ingested),
    params:
        args=lambda w: P.ingest_args(w.source),
    resources:
        **asks("ingest_shards"),
    container: config["containers"]["data"]
    log:
        L.log("ingest_shards"),
    benchmark:
        L.benchmark("ingest_shards")
    shell:
        "$PY -m oqvl.raw.ingest --shards {input:q} {params.args}"
        " --samples {output.samples:q} --accounting {output.accounting:q} > {log} 2>&1"
