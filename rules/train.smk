# Stages 5-6: pretrain each run's model on its packed mixture, then SFT it on instruction data.
# Both launch `torchrun -m oqvl.train` (FSDP2); a killed job resumes from its last checkpoint
# (checkpoints/ is kept across reruns because the final outputs are written last).

TRAIN = config["train"]
SFT_DATA = config["sft_data"]
TOY_SFT_DATA = "results/sft_data/toy.parquet"


def run_train_flags(run):
    """Train switches of a run: the train section, overridden by the run's own entry."""
    spec = {k: TRAIN[k] for k in ("freeze_vision", "doc_isolation", "grad_checkpointing")}
    spec.update({k: v for k, v in config["runs"][run].items() if k != "mixture"})
    return " ".join(f"--{'' if on else 'no-'}{k.replace('_', '-')}" for k, on in spec.items())


def optim_flags(stage):
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in TRAIN[stage].items()
                    if not (stage == "pretrain" and k == "max_len"))


TRAIN_LAUNCH = f"{PY} -m torch.distributed.run --standalone --nproc-per-node {TRAIN['nproc']} -m oqvl.train"


def sft_data_path():
    return TOY_SFT_DATA if SFT_DATA["path"] is None else SFT_DATA["path"]


def vision_weights():
    w = config["model"]["vision_weights"]
    return TOY_CLIP_DIR if w is None and GENERATED else w


rule sft_data:
    """Toy scale: conversations about toy-world images (their own stream), LLaVA format."""
    output:
        TOY_SFT_DATA,
    params:
        n=SFT_DATA["n_conversations"],
        turns=SFT_DATA["turns"],
        mix={k: SFT_DATA[k] for k in ("caption_share", "lookup_share")},
        weights=f"--kind-weights {as_json(SFT_DATA['kind_weights'])!r}" if SFT_DATA["kind_weights"] else "",
        seed=config["seed"],
        world=config["world"],
    container: config["containers"]["model"]
    log:
        "results/logs/train/sft_data.log",
    benchmark:
        "results/benchmarks/train/sft_data.tsv"
    shell:
        "{PY} -m oqvl.train.sft_data --out {output} --n {params.n} --turns {params.turns}"
        " --seed {params.seed} --image-size {params.world[image_size]}"
        " --max-objects {params.world[max_objects]} --glyph-prob {params.world[glyph_prob]}"
        " --caption-share {params.mix[caption_share]} --lookup-share {params.mix[lookup_share]}"
        " {params.weights} > {log} 2>&1"


rule pretrain:
    input:
        packed=lambda w: f"results/packed/{config['runs'][w.run]['mixture']}/sequences.parquet",
        shards=lambda w: f"results/mixtures/{config['runs'][w.run]['mixture']}/shards",
        tokenizer=lambda w: [f"{TOY_TOKENIZER_DIR}/tokenizer.json"] if TOKENIZER["path"] is None else [],
        vision=lambda w: [f"{TOY_CLIP_DIR}/config.json"] if config["model"]["vision_weights"] is None else [],
        preset=preset_file(config["model"]["preset"]),
    output:
        model="results/runs/{run}/pretrain/final/config.json",
        summary="results/runs/{run}/pretrain/summary.json",
    params:
        tokenizer=tokenizer_dir(),
        preset=config["model"]["preset"],
        vision=vision_weights(),
        lm=lambda w: f"--lm-path {config['model']['lm_path']}" if config["model"]["lm_path"] else "",
        visual=f"--visual-tokens-pretrain {config['model']['visual_tokens_pretrain']}"
               f" --visual-tokens-sft {config['model']['visual_tokens_sft']}",
        switches=lambda w: run_train_flags(w.run),
        optim=optim_flags("pretrain"),
        threads=TRAIN["threads"],
        seed=config["seed"],
    resources:
        gpu=TRAIN["gpus"],
    threads: max(1, TRAIN["nproc"] * max(1, TRAIN["threads"]))
    container: config["containers"]["model"]
    log:
        "results/logs/train/{run}/pretrain.log",
    benchmark:
        "results/benchmarks/train/{run}_pretrain.tsv"
    shell:
        "{TRAIN_LAUNCH} pretrain --out results/runs/{wildcards.run}/pretrain"
        " --packed $(dirname {input.packed}) --shards {input.shards} --tokenizer {params.tokenizer:q}"
        " --preset {params.preset} --vision-weights {params.vision:q} {params.lm} {params.visual}"
        " {params.switches} {params.optim} --threads {params.threads} --seed {params.seed} > {log} 2>&1"


rule sft:
    input:
        pretrained="results/runs/{run}/pretrain/final/config.json",
        data=sft_data_path(),
    output:
        model="results/runs/{run}/sft/final/config.json",
        summary="results/runs/{run}/sft/summary.json",
    params:
        tokenizer=tokenizer_dir(),
        image_root=f"--image-root {SFT_DATA['image_root']}" if SFT_DATA["image_root"] else "",
        switches=lambda w: run_train_flags(w.run),
        optim=optim_flags("sft"),
        threads=TRAIN["threads"],
        seed=config["seed"],
    resources:
        gpu=TRAIN["gpus"],
    threads: max(1, TRAIN["nproc"] * max(1, TRAIN["threads"]))
    container: config["containers"]["model"]
    log:
        "results/logs/train/{run}/sft.log",
    benchmark:
        "results/benchmarks/train/{run}_sft.tsv"
    shell:
        "{TRAIN_LAUNCH} sft --out results/runs/{wildcards.run}/sft --init-from $(dirname {input.pretrained})"
        " --sft-data {input.data:q} {params.image_root} --tokenizer {params.tokenizer:q}"
        " {params.switches} {params.optim} --threads {params.threads} --seed {params.seed} > {log} 2>&1"
