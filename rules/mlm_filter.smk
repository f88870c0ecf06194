# Stage 2b, MLM-Filter (the paper's mixture 4): a multimodal LLM scores each pair of the listed
# sources 0-100; kept_mlm = score >= threshold, kept_union = kept_mlm | the source's own filter.
# Toy scale trains the toy MLM-Filter first; paper scale reads the official scoring outputs.

MLM = config["filter"].get("mlm")
MLM_SOURCES = MLM["sources"] if MLM else []
TOY_MLM_DIR = "results/filter/mlm_model"


def mlm_model_dir():
    return f"{TOY_MLM_DIR}/train/final" if MLM["model"] is None else MLM["model"]


if MLM and MLM["model"] is None and MLM["scores_dir"] is None:

    rule mlm_filter_seed:
        """Toy scale: scoring conversations on seed pairs (scores from the truth) + the new model."""
        input:
            clip=f"{TOY_CLIP_DIR}/config.json",
            tokenizer=lambda w: [f"{TOY_TOKENIZER_DIR}/tokenizer.json"] if TOKENIZER["path"] is None else [],
            preset=preset_file("toy"),
        output:
            seed=f"{TOY_MLM_DIR}/seed.parquet",
            init=f"{TOY_MLM_DIR}/init/config.json",
        params:
            n=MLM["train"]["n_pairs"],
            metric=MLM["metric"],
            tokenizer=tokenizer_dir(),
            visual=MLM["visual_tokens"],
            seed=config["seed"],
            world=config["world"],
        container: config["containers"]["model"]
        log:
            "results/logs/filter/mlm_filter_seed.log",
        benchmark:
            "results/benchmarks/filter/mlm_filter_seed.tsv"
        shell:
            "{PY} -m oqvl.filter.mlm_filter seed --out {TOY_MLM_DIR} --n {params.n} --metric {params.metric}"
            " --vision-weights {TOY_CLIP_DIR} --tokenizer {params.tokenizer:q} --visual-tokens {params.visual}"
            " --seed {params.seed} --image-size {params.world[image_size]}"
            " --max-objects {params.world[max_objects]} --glyph-prob {params.world[glyph_prob]} > {log} 2>&1"

    rule train_mlm_filter:
        """Toy scale: fine-tune the toy MLM-Filter with the SFT trainer on the seed conversations."""
        input:
            seed=f"{TOY_MLM_DIR}/seed.parquet",
            init=f"{TOY_MLM_DIR}/init/config.json",
        output:
            model=f"{TOY_MLM_DIR}/train/final/config.json",
            summary=f"{TOY_MLM_DIR}/train/summary.json",
        params:
            tokenizer=tokenizer_dir(),
            train=MLM["train"],
            micro=MLM["train"]["global_batch"] // TRAIN["nproc"],
            threads=TRAIN["threads"],
            seed=config["seed"],
        resources:
            gpu=TRAIN["gpus"],
        threads: max(1, TRAIN["nproc"] * max(1, TRAIN["threads"]))
        container: config["containers"]["model"]
        log:
            "results/logs/filter/train_mlm_filter.log",
        benchmark:
            "results/benchmarks/filter/train_mlm_filter.tsv"
        shell:
            "{TRAIN_LAUNCH} sft --out {TOY_MLM_DIR}/train --init-from {TOY_MLM_DIR}/init"
            " --sft-data {input.seed} --tokenizer {params.tokenizer:q} --steps {params.train[steps]}"
            " --global-batch {params.train[global_batch]} --micro-batch {params.micro}"
            " --lr {params.train[lr]} --min-lr-ratio 0.1 --weight-decay 0.01 --warmup-frac 0.05"
            " --save-every 100 --max-len 512 --threads {params.threads} --seed {params.seed} > {log} 2>&1"


if MLM and MLM["scores_dir"] is not None:

    rule mlm_import:
        """Paper scale: the official MLM-Filter scoring outputs, parsed like the toy model's text."""
        output:
            scores="results/filter/{source}/mlm_scores.parquet",
            failures="results/filter/{source}/mlm_failures.parquet",
            stats="results/filter/{source}/mlm_score_stats.json",
        wildcard_constraints:
            source=alternatives([re.escape(s) for s in MLM_SOURCES]),
        params:
            scores_dir=lambda w: f"{MLM['scores_dir']}/{w.source}",
            metric=MLM["metric"],
        container: config["containers"]["data"]
        log:
            "results/logs/filter/mlm_import_{source}.log",
        benchmark:
            "results/benchmarks/filter/mlm_import_{source}.tsv"
        shell:
            "{PY} -m oqvl.filter.mlm_filter import --scores-dir {params.scores_dir:q} --metric {params.metric}"
            " --out {output.scores} --failures {output.failures} --stats {output.stats} > {log} 2>&1"

elif MLM:

    rule mlm_score:
        """Score every pair of a source with the MLM-Filter (batched greedy decoding, resumable)."""
        input:
            shards="results/raw/{source}/shards",
            accounting="results/raw/{source}/accounting.json",
            model=f"{mlm_model_dir()}/config.json",
        output:
            scores="results/filter/{source}/mlm_scores.parquet",
            failures="results/filter/{source}/mlm_failures.parquet",
            stats="results/filter/{source}/mlm_score_stats.json",
        wildcard_constraints:
            source=alternatives([re.escape(s) for s in MLM_SOURCES]),
        params:
            model=mlm_model_dir(),
            spec=MLM,
            expected=lambda w, input: json.load(open(input.accounting))["samples_in_shards"],
        threads: 2
        resources:
            gpu=1 if config["scale"] == "paper" else 0,
        container: config["containers"]["model"]
        log:
            "results/logs/filter/mlm_score_{source}.log",
        benchmark:
            "results/benchmarks/filter/mlm_score_{source}.tsv"
        shell:
            "{PY} -m oqvl.filter.mlm_filter score --shards {input.shards} --model {params.model:q}"
            " --metric {params.spec[metric]} --batch-size {params.spec[batch_size]}"
            " --max-new-tokens {params.spec[max_new_tokens]} --chunk {params.spec[chunk]}"
            " --threads {threads} --expected {params.expected} --out {output.scores}"
            " --failures {output.failures} --stats {output.stats} > {log} 2>&1"


rule keep_mlm:
    """The pairs the MLM-Filter keeps: score >= threshold (no score: rejected, and counted)."""
    input:
        scores="results/filter/{source}/mlm_scores.parquet",
        failures="results/filter/{source}/mlm_failures.parquet",
    output:
        kept="results/filter/{source}/kept_mlm.parquet",
        stats="results/filter/{source}/kept_mlm_stats.json",
    params:
        threshold=MLM["threshold"] if MLM else None,
    container: config["containers"]["data"]
    log:
        "results/logs/filter/keep_mlm_{source}.log",
    benchmark:
        "results/benchmarks/filter/keep_mlm_{source}.tsv"
    shell:
        "{PY} -m oqvl.filter.keep --scores {input.scores} --failures {input.failures}"
        " --threshold {params.threshold} --out {output.kept} --stats {output.stats} > {log} 2>&1"


rule keep_union:
    """Mixture 4's kept set: pairs kept by the MLM-Filter or by the source's own filter."""
    input:
        a="results/filter/{source}/kept.parquet",
        b="results/filter/{source}/kept_mlm.parquet",
    output:
        kept="results/filter/{source}/kept_union.parquet",
        stats="results/filter/{source}/kept_union_stats.json",
    container: config["containers"]["data"]
    log:
        "results/logs/filter/keep_union_{source}.log",
    benchmark:
        "results/benchmarks/filter/keep_union_{source}.tsv"
    shell:
        "{PY} -m oqvl.filter.keep --union {input.a} {input.b} --out {output.kept} --stats {output.stats} > {log} 2>&1"
