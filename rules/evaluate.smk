# Stage 7, evaluate: the benchmark files (toy world or real releases), then each run's checkpoint
# on each benchmark through lmms-eval, under both protocols, with the shuffled-image control.

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
    container: config["containers"]["model"]
    log:
        L.log("eval_data"),
    benchmark:
        L.benchmark("eval_data")
    shell:
        "$PY {params.command} --seed {params.seed} {params.control} --out {params.out} > {log} 2>&1"


rule evaluate:
    """One run's SFT checkpoint on one benchmark: lmms-eval under each protocol (results JSON and
    samples JSONL in eval/<benchmark>/<protocol>/) and the tidy rows in eval/<benchmark>.json."""
    input:
        checkpoint=L.final_model(stage="sft"),
        data=lambda w: [L.eval_data(w.benchmark)]
        + ([L.eval_data(w.benchmark, shuffled=True)] if EVAL["shuffled_control"] else []),
    output:
        rows=L.eval_rows(),
        details=directory(L.eval_details()),
        manifest=L.manifest("evaluate"),
    wildcard_constraints:
        benchmark=alternatives(BENCHMARKS),
    params:
        checkpoint=lambda w, input: os.path.dirname(input.checkpoint),
        data_dir=lambda w, input: os.path.dirname(input.data[0]),
        protocols=",".join(EVAL["protocols"]),
        control="" if EVAL["shuffled_control"] else "--no-control",
        batch_size=EVAL["batch_size"],
        max_new_tokens=f"--max-new-tokens {EVAL['max_new_tokens']}" if EVAL["max_new_tokens"] else "",
        device=EVAL["device"],
    threads: 1
    resources:
        gpu=SCALE.gpus["evaluate"],
        mem_mb=4000,
    container: config["containers"]["model"]
    log:
        L.log("evaluate"),
    benchmark:
        L.benchmark("evaluate")
    shell:
        "$PY -m oqvl.evaluate --checkpoint {params.checkpoint:q} --run {wildcards.run:q}"
        " --benchmark {wildcards.benchmark} --data-dir {params.data_dir} --protocols {params.protocols}"
        " {params.control} --batch-size {params.batch_size} {params.max_new_tokens}"
        " --device {params.device} --threads {threads} --out {output.rows:q} > {log} 2>&1"


rule run_results:
    """One run's tidy rows on every benchmark, as one CSV (the target that reproduces one run)."""
    input:
        lambda w: [L.eval_rows(w.run, b) for b in BENCHMARKS],
    output:
        csv=L.run_results(),
        manifest=L.manifest("run_results"),
    container: config["containers"]["data"]
    log:
        L.log("run_results"),
    benchmark:
        L.benchmark("run_results")
    shell:
        "$PY -m oqvl.evaluate.tidy {input:q} --out {output.csv:q} > {log} 2>&1"
