# Stage 4, pack: tokenize each mixture's captions and pack documents into context_len sequences.

TOKENIZER = config["model"]["tokenizer"]
TOY_TOKENIZER_DIR = "results/model/tokenizer"


def tokenizer_dir():
    return TOY_TOKENIZER_DIR if TOKENIZER["path"] is None else TOKENIZER["path"]


rule tokenizer:
    """Toy scale: a Qwen2-format tokenizer with a small vocabulary, built offline from Qwen's ranks."""
    output:
        f"{TOY_TOKENIZER_DIR}/tokenizer.json",
        f"{TOY_TOKENIZER_DIR}/tokenizer_config.json",
    params:
        vocab_size=TOKENIZER["vocab_size"],
    container: config["containers"]["model"]
    log:
        "results/logs/model/tokenizer.log",
    benchmark:
        "results/benchmarks/model/tokenizer.tsv"
    shell:
        "{PY} -m oqvl.model.tokenizer --out {TOY_TOKENIZER_DIR} --vocab-size {params.vocab_size} > {log} 2>&1"


rule pack:
    input:
        shards="results/mixtures/{mixture}/shards",
        tokenizer=lambda w: [f"{TOY_TOKENIZER_DIR}/tokenizer.json"] if TOKENIZER["path"] is None else [],
    output:
        documents="results/packed/{mixture}/documents.parquet",
        sequences="results/packed/{mixture}/sequences.parquet",
        stats="results/packed/{mixture}/stats.json",
    params:
        tokenizer=tokenizer_dir(),
        visual_tokens=config["model"]["visual_tokens_pretrain"],
        context_len=config["pack"]["context_len"],
        scope=config["pack"]["scope"],
        too_long=config["pack"]["too_long"],
    resources:
        mem_mb=8000,
    container: config["containers"]["model"]
    log:
        "results/logs/pack/{mixture}.log",
    benchmark:
        "results/benchmarks/pack/{mixture}.tsv"
    shell:
        "{PY} -m oqvl.pack --shards {input.shards} --tokenizer {params.tokenizer:q}"
        " --visual-tokens {params.visual_tokens} --context-len {params.context_len}"
        " --scope {params.scope} --too-long {params.too_long}"
        " --out results/packed/{wildcards.mixture} > {log} 2>&1"
