"""The scale of a config, resolved once: which rules exist and where every input comes from.

`scale: toy` builds every model and data file the DAG needs from the toy world (the toy CLIP,
tokenizer, MLM-Filter, SFT conversations and benchmarks); `scale: paper` reads every one of them
from a path the user downloaded. The rules ask `resolve(config)` and never test a path for None.

A half-toy config is refused at load, naming the key: `scale: toy` with a user path (a paper
path left in by accident), or `scale: paper` missing one. Toy models on real data (a smoke test
of downloaded pairs or benchmarks through the toy chain) is the explicit switch
`mixed_inputs: true` at toy scale: every path it gives is read, everything else is toy-built.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from . import layout
from .config import ConfigError

# User-provided inputs: each is toy-built when null at toy scale and required at paper scale.
# key (dotted) -> what a user gives there.
USER_PATHS = {
    "filter.clip.pretrained": "the CLIP scorer's weights (open_clip), e.g. ViT-L-14's",
    "model.tokenizer.path": "the Qwen2 tokenizer folder",
    "model.vision_weights": "the vision tower's weights (SigLIP-SO400M-14-384)",
    "model.lm_path": "the LLM folder (Qwen2.5-1.5B-Instruct)",
    "sft_data.path": "the SFT data (LLaVA-format JSON)",
    "evaluate.real": "the downloaded benchmark releases",
}
TOY_RULES = ("generate_pairs", "train_clip", "tokenizer", "sft_data", "mlm_filter_seed",
             "train_mlm_filter", "filter_quality")


def _get(config: dict, dotted: str):
    value = config
    for key in dotted.split("."):
        value = (value or {}).get(key)
    return value


@dataclass(frozen=True)
class Scale:
    """What the DAG needs of a config: the rules that exist and every input's path."""
    name: str                       # toy or paper
    generated: tuple[str, ...]      # sources drawn from the toy world (rule generate_pairs)
    imported: tuple[str, ...]       # sources read from a released pair list (rule import_pairs)
    ingested: tuple[str, ...]       # sources read as released, filtered shards (rule ingest_shards)
    clip_weights: str               # what CLIP scoring loads: the toy model folder or the user's weights
    vision_weights: str             # the VLM's vision tower: the toy CLIP folder or the user's weights
    lm_path: str | None             # a released LLM folder, or None for the preset's fresh LM
    tokenizer: str                  # the toy tokenizer folder or the user's
    sft_data: str                   # the toy conversations or the user's JSON
    sft_image_root: str | None
    mlm: str | None                 # MLM-Filter scores: "train" (toy model), "release" (the released
                                    # model, converted), "model" (a folder), "import", None
    mlm_model: str | None           # the folder `mlm_score` loads
    real_benchmarks: dict | None    # benchmark -> downloaded release, or None for toy benchmarks
    preset_name: str
    rules: frozenset = field(default_factory=frozenset)   # the toy-only rules that exist
    gpus: dict = field(default_factory=dict)              # GPUs a job of each kind asks for
    mlm_prompt: str | None = None   # mlm_score's prompt style: "toy" or "official" (the released model's)

    @property
    def toy(self) -> bool:
        return self.name == "toy"

    @property
    def downloaded(self) -> tuple[str, ...]:
        """Sources whose shards img2dataset writes (rule download): generated and imported ones."""
        return self.generated + self.imported

    def has(self, rule: str) -> bool:
        """Whether a toy-only rule exists in this config's DAG (other rules always exist)."""
        return rule in self.rules

    def user_inputs(self) -> set[str]:
        """The model paths this config takes from the user (not toy-built)."""
        built = {layout.CLIP_MODEL, layout.TOKENIZER}
        return {p for p in (self.clip_weights, self.vision_weights, self.tokenizer) if p not in built}

    # Inputs a job reads, each either built by a toy rule or given by the user (so a missing
    # download stops the DAG before the job, naming the file).
    def tokenizer_input(self) -> str:
        return f"{layout.TOKENIZER}/tokenizer.json" if self.has("tokenizer") else self.tokenizer

    def clip_input(self) -> str:
        return f"{layout.CLIP_MODEL}/model.safetensors" if self.clip_weights == layout.CLIP_MODEL else self.clip_weights

    def vision_input(self) -> str:
        return f"{layout.CLIP_MODEL}/config.json" if self.vision_weights == layout.CLIP_MODEL else self.vision_weights


def _refuse_user_paths(config: dict) -> None:
    """Toy scale without mixed_inputs: every user path must be null (the toy chain builds it)."""
    for key in USER_PATHS:
        if _get(config, key) is not None:
            raise ConfigError(f"{key}: scale toy builds {USER_PATHS[key]} itself; remove the path, "
                              f"or set mixed_inputs: true to read it at toy scale")
    mlm = config["filter"].get("mlm")
    for key in MLM_SOURCES:
        if mlm and mlm.get(key) is not None:
            raise ConfigError(f"filter.mlm.{key}: scale toy trains its own MLM-Filter; remove the path, "
                              f"or set mixed_inputs: true to read it at toy scale")
    for name, src in config["sources"].items():
        for key, what in (("pair_list", "pair list"), ("shards", "released shards")):
            if key in src:
                raise ConfigError(f"sources.{name}.{key}: scale toy generates its sources; remove the "
                                  f"{what}, or set mixed_inputs: true to read it at toy scale")
    for name, spec in config["filter"]["sources"].items():
        if spec["method"] == "uid_list":
            raise ConfigError(f"filter.sources.{name}.uid_list: scale toy filters its sources by CLIP score; "
                              f"remove the released uid list, or set mixed_inputs: true to read it at toy scale")


def _require_user_paths(config: dict) -> None:
    """Paper scale: nothing is toy-built, so every input is a user path."""
    for key in USER_PATHS:
        if _get(config, key) is None:
            raise ConfigError(f"{key}: scale paper needs {USER_PATHS[key]} (nothing is toy-built at paper scale)")
    mlm = config["filter"].get("mlm")
    if mlm and all(mlm.get(k) is None for k in MLM_SOURCES):
        raise ConfigError("filter.mlm: scale paper needs release (the downloaded MLM-Filter), model (a "
                          "converted folder) or scores_dir (the official scoring outputs)")
    if config["model"]["preset"] == "toy":
        raise ConfigError("model.preset: scale paper trains the open-qwen2vl preset, not the toy one")
    clip = config["filter"]["clip"]
    uses_clip = any(s.get("method") == "clip" for s in config["filter"]["sources"].values())
    if uses_clip and Path(clip["pretrained"]).suffix and clip.get("pretrained_tag") is None:
        raise ConfigError("filter.clip.pretrained_tag: name the open_clip tag the weights file is a copy of "
                          "(e.g. openai): it decides the activation and preprocessing open_clip builds")
    if config.get("mixed_inputs"):
        raise ConfigError("mixed_inputs: only toy scale mixes toy-built and user-provided inputs")


def _missing_toy_sections(config, clip_weights, vision_weights, mlm_mode) -> str | None:
    """What a toy-built model needs to be trained: its train section."""
    if layout.CLIP_MODEL in (clip_weights, vision_weights) and not config["filter"]["clip"]["train"]:
        return "filter.clip.train: the toy CLIP model is trained here (no pretrained weights given); give its train section"
    if mlm_mode == "train" and not config["filter"]["mlm"]["train"]:
        return "filter.mlm.train: the toy MLM-Filter is trained here (no release, model or scores_dir given); give its train section"
    return None


MLM_SOURCES = ("release", "model", "scores_dir")  # where MLM-Filter scores come from, one at most


def _mlm_mode(mlm: dict | None) -> tuple[str | None, str | None]:
    """(mode, the folder mlm_score loads) of filter.mlm."""
    if mlm is None:
        return None, None
    given = [k for k in MLM_SOURCES if mlm.get(k) is not None]
    if len(given) > 1:
        raise ConfigError(f"filter.mlm: give one of {', '.join(MLM_SOURCES)}, not {' and '.join(given)}")
    if not given:
        return "train", f"{layout.MLM_MODEL}/train/final"
    return {"release": ("release", layout.MLM_RELEASE), "model": ("model", mlm["model"]),
            "scores_dir": ("import", None)}[given[0]]


def _check_toy_vocabulary(model: dict, document_tokens: str) -> None:
    """The toy-built tokenizer (model.tokenizer.vocab_size) must fit the model preset's embedding
    and give <|image_pad|> the preset's image_token_id: checked here, before any job runs."""
    from .model.tokenizer import toy_token_ids

    preset_file = Path(__file__).parent / "model" / "model_configs" / f"{model['preset']}.json"
    if not preset_file.is_file():
        return  # an unknown preset is refused where the preset is loaded, by name
    preset = json.loads(preset_file.read_text())
    k = model["tokenizer"]["vocab_size"]
    tokens, image_id = toy_token_ids(k, document_tokens)
    vocab, want = preset["lm"].get("config", {}).get("vocab_size"), preset.get("image_token_id")
    if vocab is not None and (tokens > vocab or image_id != want):
        raise ConfigError(
            f"model.tokenizer.vocab_size: {k} gives a tokenizer of {tokens} tokens with <|image_pad|> at "
            f"{image_id}, but preset {model['preset']} ({preset_file.name}) embeds {vocab} with "
            f"image_token_id {want}")


def resolve(config: dict) -> Scale:
    """The Scale of a validated config; ConfigError (one line, naming the key) for a half-toy one."""
    toy = config["scale"] == "toy"
    if toy and not config.get("mixed_inputs"):
        _refuse_user_paths(config)
    if not toy:
        _require_user_paths(config)
    clip, model, sft = config["filter"]["clip"], config["model"], config["sft_data"]
    mlm = config["filter"].get("mlm")
    generated = tuple(s for s, c in config["sources"].items() if "n_pairs" in c)
    imported = tuple(s for s, c in config["sources"].items() if "pair_list" in c)
    ingested = tuple(s for s, c in config["sources"].items() if "shards" in c)

    clip_weights = clip["pretrained"] if clip["pretrained"] is not None else layout.CLIP_MODEL
    vision_weights = model["vision_weights"] if model["vision_weights"] is not None else layout.CLIP_MODEL
    mlm_mode, mlm_model = _mlm_mode(mlm)
    mlm_prompt = None if mlm_mode in (None, "import") else (
        mlm.get("prompt") or ("official" if mlm_mode == "release" else "toy"))
    if mlm_mode == "train" and mlm_prompt != "toy":
        raise ConfigError("filter.mlm.prompt: the toy MLM-Filter is trained on the toy prompt; "
                          "official is the released model's")

    if missing := _missing_toy_sections(config, clip_weights, vision_weights, mlm_mode):
        raise ConfigError(missing)
    if model["preset"] == "open-qwen2vl" and not model["lm_path"]:
        raise ConfigError("model.lm_path: the open-qwen2vl preset needs the local Qwen2.5-1.5B-Instruct directory")

    if model["tokenizer"]["path"] is None:
        _check_toy_vocabulary(model, config["pack"]["document_tokens"])

    rules = set()
    if generated:
        rules |= {"generate_pairs", "filter_quality"}
    if layout.CLIP_MODEL in (clip_weights, vision_weights) or mlm_mode == "train":
        rules.add("train_clip")
    if model["tokenizer"]["path"] is None:
        rules.add("tokenizer")
    if sft["path"] is None:
        rules.add("sft_data")
    if mlm_mode == "train":
        rules |= {"mlm_filter_seed", "train_mlm_filter"}

    on_gpu = 0 if toy else 1
    return Scale(
        name=config["scale"],
        generated=generated,
        imported=imported,
        ingested=ingested,
        clip_weights=clip_weights,
        vision_weights=vision_weights,
        lm_path=model["lm_path"],
        tokenizer=model["tokenizer"]["path"] or layout.TOKENIZER,
        sft_data=sft["path"] or layout.TOY_SFT_DATA,
        sft_image_root=sft.get("image_root"),
        mlm=mlm_mode,
        mlm_model=mlm_model,
        mlm_prompt=mlm_prompt,
        real_benchmarks=config["evaluate"]["real"],
        preset_name=model["preset"],
        rules=frozenset(rules),
        gpus={"score": on_gpu, "train": config["train"]["gpus"],
              "evaluate": 1 if config["evaluate"]["device"].startswith("cuda") else 0},
    )
