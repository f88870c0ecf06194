# Stage 1, raw: a pair list per source, then img2dataset into webdataset shards.


rule generate_pairs:
    """Toy scale: draw a source from the toy world (images, pair list, truth table)."""
    output:
        pairs="results/raw/{source}/pairs.parquet",
        truth="results/raw/{source}/truth.parquet",
        images=directory("results/raw/{source}/images"),
    wildcard_constraints:
        source=alternatives(GENERATED),
    params:
        n_pairs=lambda w: config["sources"][w.source]["n_pairs"],
        rates=lambda w: as_json(config["sources"][w.source]["corruption"]),
        seed=config["seed"],
        world=config["world"],
    container: config["containers"]["data"]
    log:
        "results/logs/raw/generate_pairs_{source}.log",
    benchmark:
        "results/benchmarks/raw/generate_pairs_{source}.tsv"
    shell:
        "{PY} -m oqvl.raw.generate --source {wildcards.source} --n-pairs {params.n_pairs}"
        " --rates {params.rates:q} --seed {params.seed} --image-size {params.world[image_size]}"
        " --max-objects {params.world[max_objects]} --glyph-prob {params.world[glyph_prob]}"
        " --out results/raw/{wildcards.source} > {log} 2>&1"


rule import_pairs:
    """Paper scale: normalise the released pair list (url, caption, uid, source)."""
    input:
        lambda w: config["sources"][w.source]["pair_list"],
    output:
        "results/raw/{source}/pairs.parquet",
    wildcard_constraints:
        source=alternatives(IMPORTED),
    params:
        url_col=lambda w: config["sources"][w.source]["url_col"],
        caption_col=lambda w: config["sources"][w.source]["caption_col"],
        uid_col=lambda w: config["sources"][w.source]["uid_col"] or "",
    container: config["containers"]["data"]
    log:
        "results/logs/raw/import_pairs_{source}.log",
    benchmark:
        "results/benchmarks/raw/import_pairs_{source}.tsv"
    shell:
        "{PY} -m oqvl.raw.import_pairs --source {wildcards.source} --pair-list {input:q}"
        " --url-col {params.url_col:q} --caption-col {params.caption_col:q}"
        " --uid-col {params.uid_col:q} --out {output:q} > {log} 2>&1"


rule download:
    """img2dataset: pair list -> webdataset shards; every pair is a sample or a listed failure."""
    input:
        "results/raw/{source}/pairs.parquet",
    output:
        shards=directory("results/raw/{source}/shards"),
        accounting="results/raw/{source}/accounting.json",
    params:
        options=as_json(config["raw"]),
    threads: 2
    resources:
        mem_mb=4000,
    container: config["containers"]["data"]
    log:
        "results/logs/raw/download_{source}.log",
    benchmark:
        "results/benchmarks/raw/download_{source}.tsv"
    shell:
        "{PY} -m oqvl.raw.download --pairs {input:q} --out {output.shards:q}"
        " --options {params.options:q} --accounting {output.accounting:q} > {log} 2>&1"
