# Stage 2b, MLM-Filter (the paper's mixture 4): a multimodal LLM scores each pair of the listed
# sources 0-100; kept_mlm = score >= threshold, kept_union = kept_mlm | the source's own filter.
# The scores come from the toy MLM-Filter trained here (toy), the released MLM-Filter converted
# here, a user's model folder, or the official scoring outputs (SCALE.mlm: train, release, model,
# import).

MLM = config["filter"].get("mlm")
MLM_SOURCES = MLM["sources"] if MLM else []


if SCALE.has("mlm_filter_seed"):

    rule mlm_filter_seed:
        """Toy scale: scoring conversations on seed pairs (scores from the truth) + the new model."""
        input:
            clip=f"{L.CLIP_MODEL}/config.json",
            tokenizer=SCALE.tokenizer_input(),
            preset=preset_file("toy"),
        output:
            seed=f"{L.MLM_MODEL}/seed.parquet",
            init=f"{L.MLM_MODEL}/init/config.json",
            manifest=L.manifest("mlm_filter_seed"),
        params:
            n=MLM["train"]["n_pairs"],
            metric=MLM["metric"],
            tokenizer=model_folder("tokenizer"),
            visual=MLM["visual_tokens"],
            seed=config["seed"],
            world=world_args(),
            out=folder_of("seed"),
            clip=lambda w, input: os.path.dirname(input.clip),
        resources:
            **asks("mlm_filter_seed"),
        container: config["containers"]["model"]
        log:
            L.log("mlm_filter_seed"),
        benchmark:
            L.benchmark("mlm_filter_seed")
        shell:
            "$PY -m oqvl.filter.mlm_filter seed --out {params.out} --n {params.n} --metric {params.metric}"
            " --vision-weights {params.clip} --tokenizer {params.tokenizer:q} --visual-tokens {params.visual}"
            " --seed {params.seed} {params.world} > {log} 2>&1"

if SCALE.has("train_mlm_filter"):

    rule train_mlm_filter:
        """Toy scale: fine-tune the toy MLM-Filter with the SFT trainer on the seed conversations."""
        input:
            seed=f"{L.MLM_MODEL}/seed.parquet",
            init=f"{L.MLM_MODEL}/init/config.json",
            tokenizer=SCALE.tokenizer_input(),
        output:
            model=f"{SCALE.mlm_model}/config.json",
            summary=f"{L.MLM_MODEL}/train/summary.json",
            manifest=L.manifest("train_mlm_filter"),
        params:
            out=folder_of("summary"),
            init=lambda w, input: os.path.dirname(input.init),
            tokenizer=model_folder("tokenizer"),
            train=MLM["train"],
            micro=MLM["train"]["global_batch"] // train_world(),
            threads=config["train"]["threads"],
            seed=config["seed"],
            launch=train_launch(),
        resources:
            **asks("train_mlm_filter", gpus=SCALE.gpus["train"]),
        threads: train_threads()
        container: config["containers"]["model"]
        log:
            L.log("train_mlm_filter"),
        benchmark:
            L.benchmark("train_mlm_filter")
        shell:
            "{params.launch} sft --out {params.out} --init-from {params.init}"
            " --sft-data {input.seed} --tokenizer {params.tokenizer:q} --steps {params.train[steps]}"
            " --global-batch {params.train[global_batch]} --micro-batch {params.micro}"
            " --lr {params.train[lr]} --min-lr-ratio 0.1 --weight-decay 0.01 --warmup-frac 0.05"
            " --save-every 100 --max-len 512 --threads {params.threads} --seed {params.seed} > {log} 2>&1"


if SCALE.mlm == "release":

    rule convert_mlm_filter:
        """The released MLM-Filter (config filter.mlm.release: the LLaVA-Unified folder and its
        SigLIP tower) converted to this project's format, with an explicit key map and a strict
        load (oqvl.filter.mlm_release)."""
        input:
            release=MLM["release"]["path"],
            vision=MLM["release"]["vision"],
        output:
            model=f"{SCALE.mlm_model}/config.json",
            manifest=L.manifest("convert_mlm_filter"),
        params:
            out=folder_of("model"),
        resources:
            **asks("convert_mlm_filter"),
        container: config["containers"]["model"]
        log:
            L.log("convert_mlm_filter"),
        benchmark:
            L.benchmark("convert_mlm_filter")
        shell:
            "$PY -m oqvl.filter.mlm_release --release {input.release:q} --vision {input.vision:q}"
            " --out {params.out:q} > {log} 2>&1"

if SCALE.mlm == "import":

    rule mlm_import:
        """The official MLM-Filter scoring outputs, parsed like the toy model's text."""
        input:
            lambda w: f"{MLM['scores_dir']}/{w.source}",
        output:
            scores=L.mlm_scores(),
            failures=L.mlm_failures(),
            stats=L.mlm_stats(),
            manifest=L.manifest("mlm_import"),
        wildcard_constraints:
            source=alternatives(MLM_SOURCES),
        params:
            metric=MLM["metric"],
        resources:
            **asks("mlm_import"),
        container: config["containers"]["data"]
        log:
            L.log("mlm_import"),
        benchmark:
            L.benchmark("mlm_import")
        shell:
            "$PY -m oqvl.filter.mlm_filter import --scores-dir {input:q} --metric {params.metric}"
            " --out {output.scores} --failures {output.failures} --stats {output.stats} > {log} 2>&1"

if SCALE.mlm in ("train", "release", "model"):

    rule mlm_score:
        """Score every pair of a source with the MLM-Filter (batched greedy decoding, resumable)."""
        input:
            shards=L.shards(),
            accounting=L.accounting(),
            model=f"{SCALE.mlm_model}/config.json",
        output:
            scores=L.mlm_scores(),
            failures=L.mlm_failures(),
            stats=L.mlm_stats(),
            manifest=L.manifest("mlm_score"),
        wildcard_constraints:
            source=alternatives(MLM_SOURCES),
        params:
            model=lambda w, input: os.path.dirname(input.model),
            spec=MLM,
            expected=lambda w, input: json.load(open(input.accounting))["samples_in_shards"],
            prompt=SCALE.mlm_prompt,
        resources:
            **asks("mlm_score", gpus=SCALE.gpus["score"]),
        threads: 2
        container: config["containers"]["model"]
        log:
            L.log("mlm_score"),
        benchmark:
            L.benchmark("mlm_score")
        shell:
            "$PY -m oqvl.filter.mlm_filter score --shards {input.shards} --model {params.model:q}"
            " --metric {params.spec[metric]} --batch-size {params.spec[batch_size]}"
            " --max-new-tokens {params.spec[max_new_tokens]} --chunk {params.spec[chunk]}"
            " --prompt {params.prompt} --dtype {params.spec[dtype]}"
            " --threads {threads} --expected {params.expected} --out {output.scores}"
            " --failures {output.failures} --stats {output.stats} > {log} 2>&1"


if MLM:

    rule keep_mlm:
        """The pairs the MLM-Filter keeps: score >= threshold (no score: rejected, and counted).
        Only pairs of the source's shards are judged: imported scores of uids this download lacks
        are counted (scored_absent) and left out, so the union and the mixture hold none."""
        input:
            scores=L.mlm_scores(),
            failures=L.mlm_failures(),
            shards=L.shards(),
        output:
            kept=L.kept(which="mlm"),
            stats=L.kept_stats(which="mlm"),
            manifest=L.manifest("keep_mlm"),
        params:
            threshold=MLM["threshold"],
        resources:
            **asks("keep_mlm"),
        container: config["containers"]["data"]
        log:
            L.log("keep_mlm"),
        benchmark:
            L.benchmark("keep_mlm")
        shell:
            "$PY -m oqvl.filter.keep --scores {input.scores} --failures {input.failures}"
            " --threshold {params.threshold} --shards {input.shards} --out {output.kept}"
            " --stats {output.stats} > {log} 2>&1"

    rule keep_union:
        """Mixture 4's kept set: pairs kept by the MLM-Filter or by the source's own filter."""
        input:
            a=L.kept(),
            b=L.kept(which="mlm"),
        output:
            kept=L.kept(which="union"),
            stats=L.kept_stats(which="union"),
            manifest=L.manifest("keep_union"),
        resources:
            **asks("keep_union"),
        container: config["containers"]["data"]
        log:
            L.log("keep_union"),
        benchmark:
            L.benchmark("keep_union")
        shell:
            "$PY -m oqvl.filter.keep --union {input.a} {input.b} --out {output.kept} --stats {output.stats} > {log} 2>&1"
