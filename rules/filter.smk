# Stage 2, filter: CLIP scores per source, then a keep decision per source (threshold, kept
# fraction, or a released uid list), then a quality report against the toy world's truth.

CLIP = config["filter"]["clip"]
TOY_CLIP_DIR = "results/filter/clip_model"


def clip_weights(wildcards=None):
    """The CLIP weights a scoring job reads: the trained toy checkpoint, or the configured ones."""
    return TOY_CLIP_DIR if CLIP["pretrained"] is None else CLIP["pretrained"]


def filter_spec(source):
    return config["filter"]["sources"][source]


rule train_clip:
    """Toy scale: train the tiny open_clip model on a clean seed set of the toy world."""
    output:
        weights=f"{TOY_CLIP_DIR}/model.safetensors",
        config=f"{TOY_CLIP_DIR}/config.json",
    params:
        train=CLIP["train"],
        seed=config["seed"],
        world=config["world"],
    threads: 2
    container: config["containers"]["model"]
    log:
        "results/logs/filter/train_clip.log",
    benchmark:
        "results/benchmarks/filter/train_clip.tsv"
    shell:
        "{PY} -m oqvl.filter.train_clip --out {TOY_CLIP_DIR}"
        " --n-pairs {params.train[n_pairs]} --steps {params.train[steps]}"
        " --batch-size {params.train[batch_size]} --lr {params.train[lr]} --seed {params.seed}"
        " --threads {threads} --image-size {params.world[image_size]}"
        " --max-objects {params.world[max_objects]} --glyph-prob {params.world[glyph_prob]}"
        " > {log} 2>&1"


rule clip_score:
    """Score every pair of a source; undecodable images and empty captions are listed, not scored."""
    input:
        shards="results/raw/{source}/shards",
        accounting="results/raw/{source}/accounting.json",
        weights=lambda w: [f"{TOY_CLIP_DIR}/model.safetensors"] if CLIP["pretrained"] is None else [],
    output:
        scores="results/filter/{source}/clip_scores.parquet",
        failures="results/filter/{source}/clip_failures.parquet",
        stats="results/filter/{source}/clip_score_stats.json",
    params:
        model=CLIP["model"],
        pretrained=clip_weights(),
        batch_size=CLIP["batch_size"],
        expected=lambda w, input: json.load(open(input.accounting))["samples_in_shards"],
    threads: 2
    resources:
        gpu=1 if config["scale"] == "paper" else 0,
    container: config["containers"]["model"]
    log:
        "results/logs/filter/clip_score_{source}.log",
    benchmark:
        "results/benchmarks/filter/clip_score_{source}.tsv"
    shell:
        "{PY} -m oqvl.filter.clip_score --shards {input.shards} --model {params.model}"
        " --pretrained {params.pretrained:q} --batch-size {params.batch_size} --threads {threads}"
        " --expected {params.expected} --out {output.scores} --failures {output.failures}"
        " --stats {output.stats} > {log} 2>&1"


def keep_inputs(wildcards):
    spec = filter_spec(wildcards.source)
    if spec["method"] == "uid_list":
        return {"uid_list": spec["uid_list"], "shards": f"results/raw/{wildcards.source}/shards"}
    return {"scores": f"results/filter/{wildcards.source}/clip_scores.parquet",
            "failures": f"results/filter/{wildcards.source}/clip_failures.parquet"}


def keep_args(wildcards, input):
    spec = filter_spec(wildcards.source)
    if spec["method"] == "uid_list":
        return f"--uid-list {input.uid_list} --shards {input.shards}"
    rule_arg = f"--threshold {spec['threshold']}" if "threshold" in spec else f"--fraction {spec['fraction']}"
    return f"--scores {input.scores} --failures {input.failures} {rule_arg}"


rule keep:
    """The kept uids of a source under its configured filter."""
    input:
        unpack(keep_inputs),
    output:
        kept="results/filter/{source}/kept.parquet",
        stats="results/filter/{source}/kept_stats.json",
    params:
        spec=lambda w: filter_spec(w.source),
        args=keep_args,
    container: config["containers"]["data"]
    log:
        "results/logs/filter/keep_{source}.log",
    benchmark:
        "results/benchmarks/filter/keep_{source}.tsv"
    shell:
        "{PY} -m oqvl.filter.keep {params.args} --out {output.kept} --stats {output.stats} > {log} 2>&1"


def quality_entries():
    """(source, filter name, scores or '-', kept set) of every filter to judge (toy sources)."""
    out = [(s, filter_spec(s)["method"], f"results/filter/{s}/clip_scores.parquet",
            f"results/filter/{s}/kept.parquet") for s in GENERATED]
    mlm = config["filter"].get("mlm")
    for s in (mlm["sources"] if mlm else []):
        if s in GENERATED:
            out += [(s, "mlm", f"results/filter/{s}/mlm_scores.parquet", f"results/filter/{s}/kept_mlm.parquet"),
                    (s, "union", "-", f"results/filter/{s}/kept_union.parquet")]
    return out


rule filter_quality:
    """Toy scale: precision/recall of every filter against the truth tables, by corruption kind."""
    input:
        truth=expand("results/raw/{source}/truth.parquet", source=GENERATED),
        scores=[e[2] for e in quality_entries() if e[2] != "-"],
        kept=[e[3] for e in quality_entries()],
    output:
        summary="results/filter/quality/summary.csv",
        by_kind="results/filter/quality/by_corruption.csv",
        report="results/filter/quality/report.md",
    params:
        entries=" ".join(f"--entry {s} {f} results/raw/{s}/truth.parquet {sc} {k}"
                         for s, f, sc, k in quality_entries()),
    container: config["containers"]["data"]
    log:
        "results/logs/filter/quality.log",
    benchmark:
        "results/benchmarks/filter/quality.tsv"
    shell:
        "{PY} -m oqvl.filter.quality {params.entries} --out results/filter/quality > {log} 2>&1"
