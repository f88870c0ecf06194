# Stage 2, filter: CLIP scores per source, then a keep decision per source (threshold, kept
# fraction, or a released uid list), then (toy) a quality report against the toy world's truth.
# A user's own filter (docs/filters.md) is a scores file or a scorer function (rule user_score),
# as a source's own filter or a named one of filter.extra (rule keep_extra).
from oqvl.filter.user import ScorerError, scorer_file

CLIP = config["filter"]["clip"]
SCORERS = P.scorer_filters()
EXTRA = P.extra_filters()

for _source, _which in SCORERS:  # a scorer that cannot be found stops the DAG here, in one line
    try:
        scorer_file(P.filter_spec(_source, _which)["scorer"])
    except ScorerError as e:
        sys.exit(f"config error: {CONFIG_FILES}: filter {_which} of {_source}: {e}")


if SCALE.has("train_clip"):

    rule train_clip:
        """Toy scale: train the tiny open_clip model on a clean seed set of the toy world."""
        output:
            weights=f"{L.CLIP_MODEL}/model.safetensors",
            config=f"{L.CLIP_MODEL}/config.json",
            manifest=L.manifest("train_clip"),
        params:
            train=CLIP["train"],
            seed=config["seed"],
            world=world_args(),
            out=folder_of("weights"),
        resources:
            **asks("train_clip"),
        threads: 2
        container: config["containers"]["model"]
        log:
            L.log("train_clip"),
        benchmark:
            L.benchmark("train_clip")
        shell:
            "$PY -m oqvl.filter.train_clip --out {params.out}"
            " --n-pairs {params.train[n_pairs]} --steps {params.train[steps]}"
            " --batch-size {params.train[batch_size]} --lr {params.train[lr]} --seed {params.seed}"
            " --cell-weight {params.train[cell_weight]} --threads {threads} {params.world} > {log} 2>&1"


rule clip_score:
    """Score every pair of a source; undecodable images and empty captions are listed, not scored."""
    input:
        shards=L.shards(),
        accounting=L.accounting(),
        weights=SCALE.clip_input(),
    output:
        scores=L.clip_scores(),
        failures=L.clip_failures(),
        stats=L.clip_stats(),
        manifest=L.manifest("clip_score"),
    params:
        model=CLIP["model"],
        pretrained=model_folder("weights"),
        tag=f"--pretrained-tag {CLIP['pretrained_tag']}" if CLIP["pretrained_tag"] else "",
        batch_size=CLIP["batch_size"],
        expected=lambda w, input: json.load(open(input.accounting))["samples_in_shards"],
    resources:
        **asks("clip_score", gpus=SCALE.gpus["score"]),
    threads: 2
    container: config["containers"]["model"]
    log:
        L.log("clip_score"),
    benchmark:
        L.benchmark("clip_score")
    shell:
        "$PY -m oqvl.filter.clip_score --shards {input.shards} --model {params.model}"
        " --pretrained {params.pretrained:q} {params.tag} --batch-size {params.batch_size} --threads {threads}"
        " --expected {params.expected} --out {output.scores} --failures {output.failures}"
        " --stats {output.stats} > {log} 2>&1"


rule keep:
    """The kept uids of a source under its configured filter."""
    input:
        unpack(lambda w: P.keep_inputs(w.source)),
    output:
        kept=L.kept(),
        stats=L.kept_stats(),
        manifest=L.manifest("keep"),
    params:
        spec=lambda w: P.filter_spec(w.source),
        args=lambda w, input: P.keep_args(w.source, input),
    resources:
        **asks("keep"),
    container: config["containers"]["data"]
    log:
        L.log("keep"),
    benchmark:
        L.benchmark("keep")
    shell:
        "$PY -m oqvl.filter.keep {params.args} --out {output.kept} --stats {output.stats} > {log} 2>&1"


if SCORERS:

    rule user_score:
        """Score every pair of a source with a user's scorer; undecodable images and empty captions
        are listed, not scored (as by clip_score). The scorer's module file is an input: editing it reruns."""
        input:
            shards=L.shards(),
            accounting=L.accounting(),
            code=lambda w: str(scorer_file(P.filter_spec(w.source, w.which)["scorer"])),
        output:
            scores=L.user_scores(),
            failures=L.user_failures(),
            stats=L.user_stats(),
            manifest=L.manifest("user_score"),
        wildcard_constraints:
            source=alternatives(sorted({s for s, _ in SCORERS})),
            which=alternatives(sorted({w for _, w in SCORERS})),
        params:
            args=lambda w: P.scorer_args(w.source, w.which),
            expected=lambda w, input: json.load(open(input.accounting))["samples_in_shards"],
        resources:
            **asks("user_score", gpus=SCALE.gpus["score"]),
        threads: 2
        container: config["containers"]["model"]
        log:
            L.log("user_score"),
        benchmark:
            L.benchmark("user_score")
        shell:
            "$PY -m oqvl.filter.user --shards {input.shards} {params.args} --expected {params.expected}"
            " --out {output.scores} --failures {output.failures} --stats {output.stats} > {log} 2>&1"


if EXTRA:

    rule keep_extra:
        """The kept uids of a named filter of filter.extra (a kept set mixtures can pick by name)."""
        input:
            unpack(lambda w: P.keep_inputs(w.source, w.which)),
        output:
            kept=L.kept(which="{which}"),
            stats=L.kept_stats(which="{which}"),
            manifest=L.manifest("keep_extra"),
        wildcard_constraints:
            source=alternatives(sorted({spec["source"] for spec in EXTRA.values()})),
            which=alternatives(sorted(EXTRA)),
        params:
            spec=lambda w: P.filter_spec(w.source, w.which),
            args=lambda w, input: P.keep_args(w.source, input, w.which),
        resources:
            **asks("keep_extra"),
        container: config["containers"]["data"]
        log:
            L.log("keep_extra"),
        benchmark:
            L.benchmark("keep_extra")
        shell:
            "$PY -m oqvl.filter.keep {params.args} --out {output.kept} --stats {output.stats} > {log} 2>&1"


if SCALE.has("filter_quality"):

    rule filter_quality:
        """Toy scale: precision/recall of every filter against the truth tables, by corruption kind."""
        input:
            truth=[L.truth(s) for s in SCALE.generated],
            scores=[e[2] for e in P.quality_entries() if e[2] != "-"],
            kept=[e[3] for e in P.quality_entries()],
        output:
            summary=f"{L.QUALITY}/summary.csv",
            by_kind=f"{L.QUALITY}/by_corruption.csv",
            report=f"{L.QUALITY}/report.md",
            manifest=L.manifest("filter_quality"),
        params:
            entries=" ".join(f"--entry {s} {f} {L.truth(s)} {sc} {k}" for s, f, sc, k in P.quality_entries()),
            out=folder_of("summary"),
        resources:
            **asks("filter_quality"),
        container: config["containers"]["data"]
        log:
            L.log("filter_quality"),
        benchmark:
            L.benchmark("filter_quality")
        shell:
            "$PY -m oqvl.filter.quality {params.entries} --out {params.out} > {log} 2>&1"
