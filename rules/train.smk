# Stages 5-6: pretrain each run's model on its packed mixture, then SFT it on instruction data,
# once per seed of the run (train.seeds, or the run's own): the seed sets the init and data order.
# Both launch `torchrun -m oqvl.train` (FSDP2) through oqvl.train.launch (one node, or several
# under SLURM); a killed or SIGTERMed job resumes from its last checkpoint (checkpoints/ is kept
# across reruns because the final outputs are written last).

TRAIN = config["train"]
SFT_DATA = config["sft_data"]


if SCALE.has("sft_data"):

    rule sft_data:
        """Toy scale: conversations about toy-world images (their own stream), LLaVA format."""
        output:
            data=L.TOY_SFT_DATA,
            manifest=L.manifest("sft_data"),
        params:
            n=SFT_DATA["n_conversations"],
            turns=SFT_DATA["turns"],
            mix={k: SFT_DATA[k] for k in ("caption_share", "lookup_share", "raw_share")},
            weights=f"--kind-weights {as_json(SFT_DATA['kind_weights'])!r}" if SFT_DATA["kind_weights"] else "",
            seed=config["seed"],
            world=world_args(),
        resources:
            **asks("sft_data"),
        container: config["containers"]["model"]
        log:
            L.log("sft_data"),
        benchmark:
            L.benchmark("sft_data")
        shell:
            "$PY -m oqvl.train.sft_data --out {output.data} --n {params.n} --turns {params.turns}"
            " --seed {params.seed} {params.world}"
            " --caption-share {params.mix[caption_share]} --lookup-share {params.mix[lookup_share]}"
            " --raw-share {params.mix[raw_share]} {params.weights} > {log} 2>&1"


rule pretrain:
    input:
        packed=lambda w: L.packed_sequences(P.run_mixture(w.run)),
        shards=lambda w: L.mixture_shards(P.run_mixture(w.run)),
        tokenizer=SCALE.tokenizer_input(),
        vision=SCALE.vision_input(),
        lm=[SCALE.lm_path] if SCALE.lm_path else [],
        preset=preset_file(SCALE.preset_name),
    output:
        model=L.final_model(stage="pretrain"),
        summary=L.train_summary(stage="pretrain"),
        manifest=L.manifest("pretrain"),
    wildcard_constraints:
        seed=r"\d+",
    params:
        out=folder_of("summary"),
        packed=lambda w, input: os.path.dirname(input.packed),
        tokenizer=model_folder("tokenizer"),
        preset=SCALE.preset_name,
        vision=model_folder("vision"),
        lm=f"--lm-path {SCALE.lm_path}" if SCALE.lm_path else "",
        visual=f"--visual-tokens-pretrain {config['model']['visual_tokens_pretrain']}"
               f" --visual-tokens-sft {config['model']['visual_tokens_sft']}",
        switches=lambda w: P.train_flags(w.run),
        optim=P.optim_flags("pretrain"),
        threads=TRAIN["threads"],
        launch=train_launch(),
    resources:
        **asks("pretrain", gpus=SCALE.gpus["train"]),
    threads: train_threads()
    container: config["containers"]["model"]
    log:
        L.log("pretrain"),
    benchmark:
        L.benchmark("pretrain")
    shell:
        "{params.launch} pretrain --out {params.out:q}"
        " --packed {params.packed:q} --shards {input.shards:q} --tokenizer {params.tokenizer:q}"
        " --preset {params.preset} --vision-weights {params.vision:q} {params.lm} {params.visual}"
        " {params.switches} {params.optim} --threads {params.threads} --seed {wildcards.seed} > {log} 2>&1"


rule sft:
    input:
        pretrained=lambda w: L.final_model(P.pretrain_run(w.run), "pretrain", w.seed),
        data=lambda w: P.sft_data(w.run)["path"],
        tokenizer=SCALE.tokenizer_input(),
    output:
        model=L.final_model(stage="sft"),
        summary=L.train_summary(stage="sft"),
        manifest=L.manifest("sft"),
    wildcard_constraints:
        seed=r"\d+",
    params:
        out=folder_of("summary"),
        init=lambda w, input: os.path.dirname(input.pretrained),
        tokenizer=model_folder("tokenizer"),
        image_root=lambda w: (f"--image-root {shlex.quote(root)}" if (root := P.sft_data(w.run)["image_root"])
                              else ""),
        switches=lambda w: P.train_flags(w.run),
        optim=lambda w: P.optim_flags("sft", w.run),
        threads=TRAIN["threads"],
        launch=train_launch(),
    resources:
        **asks("sft", gpus=SCALE.gpus["train"]),
    threads: train_threads()
    container: config["containers"]["model"]
    log:
        L.log("sft"),
    benchmark:
        L.benchmark("sft")
    shell:
        "{params.launch} sft --out {params.out:q} --init-from {params.init:q}"
        " --sft-data {input.data:q} {params.image_root} --tokenizer {params.tokenizer:q}"
        " {params.switches} {params.optim} --threads {params.threads} --seed {wildcards.seed} > {log} 2>&1"
