# Stage 4, pack: tokenize each mixture's captions and pack documents into context_len sequences.

if SCALE.has("tokenizer"):

    rule tokenizer:
        """Toy scale: a Qwen2-format tokenizer with a small vocabulary, built offline from Qwen's ranks."""
        output:
            f"{L.TOKENIZER}/tokenizer.json",
            f"{L.TOKENIZER}/tokenizer_config.json",
            manifest=L.manifest("tokenizer"),
        params:
            vocab_size=config["model"]["tokenizer"]["vocab_size"],
            out=folder_of("manifest"),
        resources:
            **asks("tokenizer"),
        container: config["containers"]["model"]
        log:
            L.log("tokenizer"),
        benchmark:
            L.benchmark("tokenizer")
        shell:
            "$PY -m oqvl.model.tokenizer --out {params.out} --vocab-size {params.vocab_size} > {log} 2>&1"


rule pack:
    input:
        shards=L.mixture_shards(),
        tokenizer=SCALE.tokenizer_input(),
    output:
        documents=f"{L.packed_dir()}/documents.parquet",
        sequences=L.packed_sequences(),
        stats=L.packed_stats(),
        manifest=L.manifest("pack"),
    params:
        tokenizer=model_folder("tokenizer"),
        visual_tokens=config["model"]["visual_tokens_pretrain"],
        context_len=config["pack"]["context_len"],
        scope=config["pack"]["scope"],
        too_long=config["pack"]["too_long"],
        document_tokens=config["pack"]["document_tokens"],
        out=folder_of("stats"),
    resources:
        **asks("pack"),
    container: config["containers"]["model"]
    log:
        L.log("pack"),
    benchmark:
        L.benchmark("pack")
    shell:
        "$PY -m oqvl.pack --shards {input.shards} --tokenizer {params.tokenizer:q}"
        " --visual-tokens {params.visual_tokens} --context-len {params.context_len}"
        " --scope {params.scope} --too-long {params.too_long} --document-tokens {params.document_tokens}"
        " --out {params.out:q} > {log} 2>&1"
