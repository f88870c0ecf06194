# Stage 7, evaluate: the benchmark files (toy world or real releases), then each run's checkpoint
# on each benchmark through lmms-eval, under both protocols, with the shuffled-image control.
import shlex

EVAL = config["evaluate"]
EVAL_DATA = "results/eval_data"
BENCHMARKS_EVALUATED = EVAL["benchmarks"]


def eval_data_files():
    files = [f"{EVAL_DATA}/{b}.parquet" for b in BENCHMARKS_EVALUATED]
    if EVAL["shuffled_control"]:
        files += [f"{EVAL_DATA}/{b}_shuffled.parquet" for b in BENCHMARKS_EVALUATED]
    return files


def training_streams():
    """Toy-world streams a model trains on (name -> images): no benchmark image may equal one."""
    streams = {s: c["n_pairs"] for s, c in config["sources"].items() if "n_pairs" in c}
    train = config["filter"]["clip"].get("train") or {}
    if config["filter"]["clip"]["pretrained"] is None and train:
        streams["clip_seed"] = train["n_pairs"]  # the toy vision tower's training images
    sft = config.get("sft_data") or {}
    if sft.get("path") is None and sft.get("n_conversations"):
        streams["sft"] = sft["n_conversations"]
    return streams


def eval_data_command(wildcards, output):
    if EVAL["real"] is not None:
        sources = " ".join(f"--source {b}={shlex.quote(EVAL['real'][b])}" for b in BENCHMARKS_EVALUATED)
        return f"-m oqvl.evaluate.convert {sources}"
    world = config["world"]
    excludes = " ".join(f"--exclude {s}:{n}" for s, n in training_streams().items())
    sizes = as_json({b: EVAL["toy_sizes"][b] for b in BENCHMARKS_EVALUATED})
    return (f"-m oqvl.evaluate.toy --sizes {shlex.quote(sizes)} --image-size {world['image_size']}"
            f" --max-objects {world['max_objects']} --glyph-prob {world['glyph_prob']} {excludes}")


rule eval_data:
    """The benchmark files in the real column schemas: drawn from the toy world (no image equal to a
    training image), or converted from the downloaded releases; each with its shuffled-image twin."""
    input:
        lambda w: [EVAL["real"][b] for b in BENCHMARKS_EVALUATED] if EVAL["real"] is not None else [],
    output:
        eval_data_files(),
        manifest=f"{EVAL_DATA}/manifest.json",
    params:
        command=eval_data_command,
        seed=config["seed"],
        control="" if EVAL["shuffled_control"] else "--no-control",
        real=EVAL["real"],
        sizes=EVAL["toy_sizes"],
        world=config["world"],
        streams=training_streams(),
    container: config["containers"]["model"]
    log:
        "results/logs/evaluate/eval_data.log",
    benchmark:
        "results/benchmarks/evaluate/eval_data.tsv"
    shell:
        "{PY} {params.command} --seed {params.seed} {params.control} --out {EVAL_DATA} > {log} 2>&1"


rule evaluate:
    """One run's SFT checkpoint on one benchmark: lmms-eval under each protocol (results JSON and
    samples JSONL in eval/<benchmark>/<protocol>/) and the tidy rows in eval/<benchmark>.json."""
    input:
        checkpoint="results/runs/{run}/sft/final/config.json",
        data=lambda w: [f"{EVAL_DATA}/{w.benchmark}.parquet"]
        + ([f"{EVAL_DATA}/{w.benchmark}_shuffled.parquet"] if EVAL["shuffled_control"] else []),
    output:
        rows="results/runs/{run}/eval/{benchmark}.json",
        details=directory("results/runs/{run}/eval/{benchmark}"),
    wildcard_constraints:
        benchmark=alternatives(BENCHMARKS_EVALUATED),
    params:
        protocols=",".join(EVAL["protocols"]),
        control="" if EVAL["shuffled_control"] else "--no-control",
        batch_size=EVAL["batch_size"],
        max_new_tokens=f"--max-new-tokens {EVAL['max_new_tokens']}" if EVAL["max_new_tokens"] else "",
        device=EVAL["device"],
    threads: 1
    resources:
        gpu=1 if EVAL["device"].startswith("cuda") else 0,
        mem_mb=4000,
    container: config["containers"]["model"]
    log:
        "results/logs/evaluate/{run}_{benchmark}.log",
    benchmark:
        "results/benchmarks/evaluate/{run}_{benchmark}.tsv"
    shell:
        "{PY} -m oqvl.evaluate --checkpoint $(dirname {input.checkpoint:q}) --run {wildcards.run:q}"
        " --benchmark {wildcards.benchmark} --data-dir {EVAL_DATA} --protocols {params.protocols}"
        " {params.control} --batch-size {params.batch_size} {params.max_new_tokens}"
        " --device {params.device} --threads {threads} --out {output.rows:q} > {log} 2>&1"


rule run_results:
    """One run's tidy rows on every benchmark, as one CSV (the target that reproduces one run)."""
    input:
        lambda w: expand("results/runs/{run}/eval/{benchmark}.json", run=w.run, benchmark=BENCHMARKS_EVALUATED),
    output:
        "results/runs/{run}/eval/tidy.csv",
    container: config["containers"]["data"]
    log:
        "results/logs/evaluate/{run}_tidy.log",
    benchmark:
        "results/benchmarks/evaluate/{run}_tidy.tsv"
    shell:
        "{PY} -m oqvl.evaluate.tidy {input:q} --out {output:q} > {log} 2>&1"
