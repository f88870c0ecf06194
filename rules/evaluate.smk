# Stage 7, evaluate: the benchmark files (toy world or real releases), then each seed's checkpoint
# of each run on each benchmark through lmms-eval, under both protocols, with the shuffled-image
# control; per split: test (and at toy scale heldout, the test items reworded; dev on request).

EVAL = config["evaluate"]


rule eval_data:
    """The benchmark files in the real column schemas: drawn from the toy world (no image equal to a
    training image), or converted from the downloaded releases; each with its shuffled-image twin."""
    input:
        [SCALE.real_benchmarks[b] for b in BENCHMARKS] if SCALE.real_benchmarks is not None else [],
    output:
        P.eval_data_files(),
        manifest=L.manifest("eval_data"),
    params:
        command=P.eval_data_command(world_args()),
        seed=config["seed"],
        control="" if EVAL["shuffled_control"] else "--no-control",
        out=folder_of("manifest"),
    resources:
        **asks("eval_data"),
    container: config["containers"]["model"]
    log:
        L.log("eval_data"),
    benchmark:
        L.benchmark("eval_data")
    shell:
        "$PY {params.command} --seed {params.seed} {params.control} --out {params.out} > {log} 2>&1"


RELEASED = P.released()
CONVERTED = P.released("prismatic")  # the others (qwen2_vl) are evaluated as downloaded

if CONVERTED:

    rule convert_released:
        """A released checkpoint (config `released`: a prismatic-vlms run directory) converted to
        this project's format, with an explicit key map and a strict load (oqvl.model.prismatic)."""
        input:
            run_dir=lambda w: CONVERTED[w.name]["run_dir"],
            lm=lambda w: CONVERTED[w.name]["lm"],
            vision_weights=lambda w: CONVERTED[w.name].get("vision_weights") or [],
        output:
            model=L.released_model(),
            manifest=L.manifest("convert_released"),
        wildcard_constraints:
            name=alternatives(CONVERTED),
        params:
            out=lambda w: L.released_dir(w.name),
            vision=lambda w, input: f"--vision-weights {shlex.quote(str(input.vision_weights))}"
            if input.vision_weights else "",
        resources:
            **asks("convert_released"),
        container: config["containers"]["model"]
        log:
            L.log("convert_released"),
        benchmark:
            L.benchmark("convert_released")
        shell:
            "$PY -m oqvl.model.prismatic --run-dir {input.run_dir:q} --lm {input.lm:q} {params.vision}"
            " --out {params.out:q} > {log} 2>&1"


rule evaluate:
    """One seed of a run on one benchmark split: its SFT checkpoint, loaded once, on every benchmark
    through lmms-eval under each protocol (results JSON and samples JSONL in
    eval/<split>/<benchmark>/<protocol>/), the tidy rows in eval/<split>/<benchmark>.json."""
    input:
        checkpoint=lambda w: L.final_model(w.run, "sft", w.seed),
        data=benchmark_files,
    output:
        rows=[L.eval_rows(benchmark=b) for b in BENCHMARKS],
        details=[directory(L.eval_details(benchmark=b)) for b in BENCHMARKS],
        manifest=L.manifest("evaluate"),
    wildcard_constraints:
        seed=r"\d+",
        split=alternatives(P.data_splits()),
    params:
        checkpoint=lambda w, input: os.path.dirname(input.checkpoint),
        data_dir=lambda w, input: os.path.dirname(input.data[0]),
        label=lambda w: f"--run {shlex.quote(w.run)} --seed {w.seed} --split {w.split}",
        benchmarks=",".join(BENCHMARKS),
        protocols=",".join(EVAL["protocols"]),
        control="" if EVAL["shuffled_control"] else "--no-control",
        batch_size=EVAL["batch_size"],
        max_new_tokens=f"--max-new-tokens {EVAL['max_new_tokens']}" if EVAL["max_new_tokens"] else "",
        device=EVAL["device"],
        out=folder_of("manifest"),
    resources:
        **asks("evaluate", gpus=SCALE.gpus["evaluate"]),
    threads: 1
    container: config["containers"]["model"]
    log:
        L.log("evaluate"),
    benchmark:
        L.benchmark("evaluate")
    shell:
        "$PY -m oqvl.evaluate --checkpoint {params.checkpoint:q} {params.label}"
        " --benchmarks {params.benchmarks} --data-dir {params.data_dir} --protocols {params.protocols}"
        " {params.control} --batch-size {params.batch_size} {params.max_new_tokens}"
        " --device {params.device} --threads {threads} --out {params.out:q} > {log} 2>&1"


if RELEASED:

    use rule evaluate as evaluate_released with:
        input:  # the converted checkpoint, or a Qwen2-VL download itself (model oqvl_qwen2_vl)
            checkpoint=lambda w: P.released_checkpoint(w.name),
            data=benchmark_files,
        output:
            rows=[L.released_eval_rows(benchmark=b) for b in BENCHMARKS],
            details=[directory(L.released_eval_details(benchmark=b)) for b in BENCHMARKS],
            manifest=L.manifest("evaluate_released"),
        wildcard_constraints:
            name=alternatives(RELEASED),
            split="test",
        params:  # merged into evaluate's: only the label differs
            label=lambda w: f"--run {shlex.quote(w.name)} --split {w.split}",
        log:
            L.log("evaluate_released"),
        benchmark:
            L.benchmark("evaluate_released")


rule run_results:
    """Every seed's tidy rows of one run on every benchmark and reported split, as one CSV (the
    target that reproduces one run)."""
    input:
        lambda w: P.eval_rows(w.run),
    output:
        csv=L.run_results(),
        manifest=L.manifest("run_results"),
    resources:
        **asks("run_results"),
    container: config["containers"]["data"]
    log:
        L.log("run_results"),
    benchmark:
        L.benchmark("run_results")
    shell:
        "$PY -m oqvl.evaluate.tidy {input:q} --out {output.csv:q} > {log} 2>&1"
