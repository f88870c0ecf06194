"""Open-Qwen2VL's released checkpoint (a prismatic-vlms run directory) as this project's checkpoint.

    python -m oqvl.model.prismatic --run-dir models/Open-Qwen2VL --lm models/Qwen2.5-1.5B-Instruct \\
        --vision-weights models/ViT-SO400M-14-SigLIP-384/open_clip_model.safetensors \\
        --out results/models/open-qwen2vl

writes OUT/config.json + OUT/model.safetensors (`OpenQwen2VL.save_pretrained`) and the tokenizer
files, so `OpenQwen2VL.from_pretrained(OUT)` and `load_tokenizer(OUT)` read it like our own.
Reference line numbers are those of Open-Qwen2VL's prismatic-vlms folder.

The release (weizhiwang/Open-Qwen2VL on the hub, what `prismatic.load` reads, load.py:55):
  RUN/config.json   the run config, a JSON copy of config.yaml (scripts/pretrain.py:158-161); its
                    "model" (load.py:70) names vision_backbone_id, llm_backbone_id, arch_specifier,
                    image_resize_strategy and llm_max_length (conf/models.py:21-30).
  RUN/checkpoints/latest-checkpoint.pt
                    torch.save({"model": {module: state_dict}}) (training/strategies/fsdp.py:131),
                    each module's keys with the "module." prefix cut (fsdp.py:117-118). Only the
                    trained modules are in it: "projector" and "llm_backbone" (prismatic.py:169),
                    plus "vision_backbone" when the tower was trained or taken from a full-pretrain
                    checkpoint (fsdp.py:106, scripts/pretrain.py:226). DDP runs also store
                    "optimizer" (ddp.py:52), which is skipped. It is read with weights_only=True.
The base LLM's config and tokenizer are not in it: the reference builds both from the base model
directory (base_llm.py:173-174, 195), so --lm is that local directory (Qwen2.5-1.5B-Instruct for
the release). Without "vision_backbone" the tower is the pretrained SigLIP (base_vision.py:110)
and --vision-weights is its local open_clip weights file: the same tensors, timm loads its SigLIP
from that file by cutting the "visual.trunk." prefix.

Key map (reference: key inside checkpoint["model"][module]; ours: OpenQwen2VL.state_dict()):

  module            reference key                ours                       from
  projector         mlp_projector.0.{weight,bias} projector.fc1.{weight,bias} nn_utils.py:76-80
  projector         mlp_projector.2.{weight,bias} projector.fc2.{weight,bias} (Linear GELU Linear)
  llm_backbone      llm.<rest>                   lm.<rest>                  base_llm.py:174
  vision_backbone   featurizer.<rest>            vision.trunk.<rest>        base_vision.py:110
  --vision-weights  visual.<rest>                vision.<rest>              (open_clip file)

With tied embeddings (Qwen2.5-1.5B) the reference's state dict repeats the embedding as
llm.lm_head.weight; it must equal llm.model.embed_tokens.weight (it is stored once). The load is
strict: every reference key maps to one of ours with the same shape and every one of ours is
filled; the first violation raises ValueError, one line naming the key and the file.

Architecture, all of which OpenQwen2VL represents as it is:
  - vision features: the output of block len(blocks) - 2, no final norm (base_vision.py:127),
    i.e. feature_layer -2 (timm counts negative indices from the end the same way);
  - projector: AdaptiveAvgPool2d of the patch grid to `query_num` tokens, then Linear GELU Linear
    (nn_utils.py:57-90); query_num comes from arch_specifier (prismatic.py:67-72): "...+avgpool"
    144, "...+729-avgpool" 729. Both visual token counts of the converted model are query_num;
  - LM: Qwen2ForCausalLM from the base config (base_llm.py:173-174). An added token that the
    vocabulary lacks takes the next id, inside the embedding's rows: with Qwen2.5's tokenizer only
    "<|endofchunk|>" is new (151665 < 151936), while "<s>" is already one of Qwen2's BPE tokens
    (128245, tests/test_paper_prompts.py); the reference does not resize the embeddings
    (qwen2.py:57), so vocab_size stays the base's;
  - preprocessing: the timm data config of the tower (base_vision.py:137) at the backbone's image
    size; resize-naive squashes to it (base_vision.py:155-165), resize-crop resizes the short side
    and crops (only where timm's crop_pct does not enlarge first).
Tokenizer: the base tokenizer plus "<|endofchunk|>" and "<s>" as special tokens, bos_token "<s>"
(qwen2.py:58-59) and model_max_length = llm_max_length (base_llm.py:195). Like the Qwen2 tokenizer
it adds no BOS by itself; the reference puts it in front of every sequence (datasets.py:455-456).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Qwen2Config

from ..io import sha256_file
from ..manifest import args_config, manifest_path, write_manifest
from .config import VisionConfig, VLMConfig, grid_side, lm_config_dict
from .tokenizer import (
    IMAGE_TOKEN,
    REFERENCE_ADDED_TOKENS,
    add_reference_tokens,
    load_tokenizer,
)
from .vision import (
    build_vision_tower,
    open_clip_tower_config,
    read_open_clip_visual_state,
    vision_width,
)
from .vlm import CONFIG_FILE, OpenQwen2VL

RUN_CONFIG = "config.json"
CHECKPOINT = Path("checkpoints") / "latest-checkpoint.pt"

# vision_backbone_id -> (timm model, image size, the open_clip model with that trunk):
# siglip_vit.py:7-13 and materialize.py:31,41-44.
VISION_BACKBONES = {
    "siglip-vit-so400m-384px": ("vit_so400m_patch14_siglip_384", 384, "ViT-SO400M-14-SigLIP-384"),
    "siglip-vit-so400m": ("vit_so400m_patch14_siglip_224", 224, "ViT-SO400M-14-SigLIP"),
    "siglip-vit-b16-224px": ("vit_base_patch16_siglip_224", 224, "ViT-B-16-SigLIP"),
    "siglip-vit-b16-256px": ("vit_base_patch16_siglip_256", 256, "ViT-B-16-SigLIP-256"),
    "siglip-vit-b16-384px": ("vit_base_patch16_siglip_384", 384, "ViT-B-16-SigLIP-384"),
}
QWEN2_BACKBONES = ("qwen2.5-1.5b", "qwen2.5-1.5b-instruct", "qwen2.5-3b", "qwen2.5-7b-instruct")  # qwen2.py:21-35
DEFAULT_LLM_MAX_LENGTH = 4096             # load.py:95
FEATURE_LAYER = -2                        # base_vision.py:127
MODULES = ("projector", "llm_backbone", "vision_backbone")  # prismatic.py:80
SKIPPED_TOP_LEVEL = ("optimizer",)        # ddp.py:52: not weights


@dataclass(frozen=True)
class Rule:
    """Keys of `module` starting with `ref` are ours starting with `ours` (the rest unchanged)."""

    module: str
    ref: str
    ours: str


KEY_MAP = (
    Rule("projector", "mlp_projector.0.", "projector.fc1."),
    Rule("projector", "mlp_projector.2.", "projector.fc2."),
    Rule("llm_backbone", "llm.", "lm."),
    Rule("vision_backbone", "featurizer.", "vision.trunk."),
)
VISION_FILE = "vision weights"
VISION_FILE_MAP = (Rule(VISION_FILE, "visual.", "vision."),)  # open_clip's own prefix


# ------------------------------------------------------------------------------------ release

def read_release(run_dir, checkpoint=None) -> tuple[dict, Path, dict[str, dict]]:
    """(the run config's "model", the checkpoint path, {module: state_dict}) of a run directory."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / RUN_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: no run config (a prismatic run directory has one)")
    run_cfg = json.loads(cfg_path.read_text())
    model_cfg = run_cfg.get("model") if isinstance(run_cfg, dict) else None
    if not isinstance(model_cfg, dict):
        raise ValueError(f"{cfg_path}: no \"model\" section")  # noqa: TRY004 (a bad file)
    for key in ("arch_specifier", "vision_backbone_id", "llm_backbone_id", "image_resize_strategy"):
        if not isinstance(model_cfg.get(key), str):
            raise ValueError(f"{cfg_path}: model.{key} missing")  # noqa: TRY004 (a bad file)
    ckpt = Path(checkpoint) if checkpoint is not None else run_dir / CHECKPOINT
    if not ckpt.is_file():
        raise FileNotFoundError(f"{ckpt}: no checkpoint")
    try:
        obj = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors are long and of several types; keep the telling line
        lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "WeightsUnpickler error" in ln), lines[0] if lines else "")
        raise ValueError(f"{ckpt}: not readable with weights_only=True ({type(e).__name__}: {why})") from e
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise ValueError(f"{ckpt}: not a prismatic checkpoint (no \"model\" dict)")  # noqa: TRY004 (a bad file)
    for key in obj:
        if key != "model" and key not in SKIPPED_TOP_LEVEL:
            raise ValueError(f"{ckpt}: unused top-level key {key!r}")
    modules = obj["model"]
    for name, sd in modules.items():
        if name not in MODULES:
            raise ValueError(f"{ckpt}: unused module {name!r} (known: {', '.join(MODULES)})")
        if not isinstance(sd, dict):
            raise ValueError(f"{ckpt}: module {name!r} is not a state dict")  # noqa: TRY004 (a bad file)
    for name in ("projector", "llm_backbone"):  # prismatic.py:114-116
        if name not in modules:
            raise ValueError(f"{ckpt}: missing module {name!r}")
    return model_cfg, ckpt, modules


def visual_tokens_of(arch_specifier: str) -> int:
    """Tokens per image of an average-pool projector (prismatic.py:67-72), e.g.
    "no-align+avgpool" -> 144, "full-align+729-avgpool" -> 729."""
    if not arch_specifier.endswith("avgpool"):
        raise ValueError(f"arch_specifier {arch_specifier!r}: only the average-pool projector "
                         f"(...avgpool) is converted, as OpenQwen2VL's projector is that one")
    head = arch_specifier.split("+")[-1].split("-")[0]
    if head != "avgpool" and not head.isdigit():
        raise ValueError(f"arch_specifier {arch_specifier!r}: no token count before -avgpool")
    n = 144 if head == "avgpool" else int(head)
    grid_side(n)  # the pool is square
    return n


def preprocess_of(trunk, image_size: int, resize_strategy: str) -> dict:
    """open_clip preprocessing equal to the reference's transform of this timm tower
    (base_vision.py:137-168)."""
    import timm
    from open_clip.transform import PreprocessCfg

    data = timm.data.resolve_model_data_config(trunk)
    if resize_strategy == "resize-naive":
        mode = "squash"
    elif resize_strategy == "resize-crop":
        # timm resizes to size / crop_pct before its center crop; the reference undoes that for
        # SigLIP and IN1K towers only (base_vision.py:144-152)
        name = getattr(trunk, "default_cfg", {}).get("architecture", "")
        if data.get("crop_pct", 1.0) != 1.0 and "siglip" not in name and "in1k" not in name:
            raise ValueError(f"image_resize_strategy resize-crop with crop_pct {data['crop_pct']} "
                             f"has no open_clip equivalent")
        mode = "shortest"
    else:
        raise ValueError(f"image_resize_strategy {resize_strategy!r} has no open_clip equivalent "
                         f"(resize-naive and resize-crop are converted)")
    pp = dataclasses.asdict(PreprocessCfg())
    pp.update(size=[image_size, image_size], mean=list(data["mean"]), std=list(data["std"]),
              interpolation=data["interpolation"], resize_mode=mode)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in pp.items()}


def vision_tower_of(model_cfg: dict, vision: str | None, source: str | None):
    """(VisionConfig, tower) of the release's vision backbone; `vision` names another open_clip
    model (with a timm trunk) to use instead of the one matching vision_backbone_id."""
    backbone = model_cfg["vision_backbone_id"]
    if vision is None:
        if backbone not in VISION_BACKBONES:
            raise ValueError(f"vision_backbone_id {backbone!r} has no open_clip tower here "
                             f"(known: {', '.join(VISION_BACKBONES)}); name one with --vision")
        timm_name, image_size, vision = VISION_BACKBONES[backbone]
        oc_cfg = open_clip_tower_config(vision)
        if oc_cfg["vision_cfg"].get("timm_model_name") != timm_name:
            raise ValueError(f"open_clip {vision} is not timm {timm_name} (vision_backbone_id {backbone})")
    else:
        oc_cfg = open_clip_tower_config(vision)
        image_size = oc_cfg["vision_cfg"].get("image_size", 224)
    if oc_cfg["vision_cfg"].get("image_size", 224) != image_size:
        raise ValueError(f"open_clip {vision} takes {oc_cfg['vision_cfg'].get('image_size')} px, "
                         f"the reference {image_size} px")
    vcfg = VisionConfig(open_clip_model=vision, model_cfg=oc_cfg, feature_layer=FEATURE_LAYER,
                        source=source)
    tower = build_vision_tower(vcfg)
    if getattr(tower, "trunk", None) is None:
        raise ValueError(f"open_clip {vision} has no timm trunk; the reference's featurizer is a "
                         f"timm VisionTransformer (base_vision.py:131)")
    vcfg.preprocess = preprocess_of(tower.trunk, image_size, model_cfg["image_resize_strategy"])
    return vcfg, tower


def lm_config_of(lm_dir) -> Qwen2Config:
    path = Path(lm_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no LM config (--lm is the base LLM's local directory)")
    d = json.loads(path.read_text())
    if d.get("model_type") != "qwen2":
        raise ValueError(f"{path}: model_type {d.get('model_type')!r}, not qwen2")
    return Qwen2Config.from_dict(d)


def release_tokenizer(path, vocab_rows: int, max_length: int):
    """The base tokenizer with the reference's added tokens and BOS (qwen2.py:58-59)."""
    tok = load_tokenizer(path)
    if REFERENCE_ADDED_TOKENS[0] in tok.get_vocab():
        raise ValueError(f"{path}: tokenizer already has {REFERENCE_ADDED_TOKENS[0]}; give the base tokenizer")
    add_reference_tokens(tok, path)
    tok.model_max_length = max_length
    if len(tok) > vocab_rows:
        raise ValueError(f"{path}: {len(tok)} tokens with {REFERENCE_ADDED_TOKENS} but the LM has "
                         f"{vocab_rows} embedding rows (the reference does not resize them)")
    return tok


# ------------------------------------------------------------------------------------ key map

def map_keys(sd: dict, module: str, rules, ours: dict, source, out: dict) -> None:
    """Put `sd`'s tensors into `out` under our names; any key without a rule or a target, or of
    another shape, stops with one line."""
    for key, tensor in sd.items():
        name = f"{module}/{key}" if module else key  # a file of one module: its keys as they are
        rule = next((r for r in rules if r.module == module and key.startswith(r.ref)), None)
        target = None if rule is None else rule.ours + key[len(rule.ref):]
        if target is None or target not in ours:
            raise ValueError(f"{source}: unused key {name} (OpenQwen2VL has no "
                             f"{target or 'key for it'})")
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise ValueError(f"{source}: {name} is not a floating-point tensor")
        if tuple(tensor.shape) != tuple(ours[target].shape):
            raise ValueError(f"{source}: {name} has shape {tuple(tensor.shape)}, {target} needs "
                             f"{tuple(ours[target].shape)}")
        if target in out:
            raise ValueError(f"{source}: {name} maps to {target}, which is already filled")
        out[target] = tensor


def reference_name(key: str, rules) -> str:
    """The reference key (module/key) that fills our `key`."""
    for r in rules:
        if key.startswith(r.ours):
            return f"{r.module}/{r.ref}{key[len(r.ours):]}" if r.module else r.ref + key[len(r.ours):]
    return key


def convert_state(modules: dict, ours: dict, source, tied: bool,
                  vision_file: dict | None = None, vision_source=None) -> dict:
    """Our full state dict from the release's modules (and the separate vision weights)."""
    out: dict = {}
    for module, sd in modules.items():
        map_keys(sd, module, KEY_MAP, ours, source, out)
    if vision_file is not None:
        map_keys({f"visual.{k}": v for k, v in vision_file.items()}, VISION_FILE, VISION_FILE_MAP,
                 ours, vision_source, out)
    tie_lm_head(out, tied, source, "llm_backbone/llm.lm_head.weight", "llm.model.embed_tokens.weight")
    for key in ours:
        if key not in out:
            from_file = vision_file is not None and key.startswith("vision.")
            rules = VISION_FILE_MAP if from_file else KEY_MAP
            raise ValueError(f"{vision_source if from_file else source}: missing key "
                             f"{reference_name(key, rules)} (for {key})")
    return out


def tie_lm_head(out: dict, tied: bool, where, head_name: str, embed_name: str) -> None:
    """With tied embeddings (Qwen2.5-1.5B) the LM head is the embedding: a release that stores
    both must store the same tensor; ours is filled from the embedding."""
    head, embed = "lm.lm_head.weight", "lm.model.embed_tokens.weight"
    if tied and embed in out:
        if head in out and not torch.equal(out[head], out[embed]):
            raise ValueError(f"{where}: {head_name} differs from {embed_name} but the LM config ties them")
        out[head] = out[embed]


# ------------------------------------------------------------------------------------ convert

def convert(run_dir, out_dir, *, lm, tokenizer=None, vision_weights=None, vision: str | None = None,
            checkpoint=None) -> OpenQwen2VL:
    """Convert a prismatic run directory into OUT (config.json, model.safetensors, tokenizer).

    lm: the base LLM's local directory (its config.json; also the tokenizer unless `tokenizer`).
    vision_weights: the tower's open_clip weights (.safetensors, or a directory holding
        open_clip_model.safetensors), required exactly when the checkpoint has no vision_backbone.
    vision: an open_clip model name to build the tower from, instead of the one matching the
        release's vision_backbone_id.
    checkpoint: a .pt other than RUN/checkpoints/latest-checkpoint.pt (e.g. a step-... file).
    """
    model_cfg, ckpt, modules = read_release(run_dir, checkpoint)
    if model_cfg["llm_backbone_id"] not in QWEN2_BACKBONES:
        raise ValueError(f"{Path(run_dir) / RUN_CONFIG}: llm_backbone_id "
                         f"{model_cfg['llm_backbone_id']!r} is not a Qwen2 LLM")
    visual_tokens = visual_tokens_of(model_cfg["arch_specifier"])

    has_tower = "vision_backbone" in modules
    if has_tower and vision_weights is not None:
        raise ValueError(f"{ckpt}: holds vision_backbone; the separate vision weights "
                         f"{vision_weights} would be ignored, so do not pass them")
    if not has_tower and vision_weights is None:
        raise ValueError(f"{ckpt}: no vision_backbone (the tower was frozen); pass the pretrained "
                         f"tower's open_clip weights (--vision-weights)")
    vision_state = None if has_tower else read_open_clip_visual_state(vision_weights)
    vcfg, tower = vision_tower_of(model_cfg, vision,
                                  f"{ckpt}:vision_backbone" if has_tower else str(vision_weights))

    lm_cfg = lm_config_of(lm)
    tok = release_tokenizer(tokenizer if tokenizer is not None else lm, lm_cfg.vocab_size,
                            int(model_cfg.get("llm_max_length", DEFAULT_LLM_MAX_LENGTH)))
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    if not isinstance(image_token_id, int) or image_token_id == tok.unk_token_id:
        raise ValueError(f"tokenizer has no {IMAGE_TOKEN}")

    config = VLMConfig(
        vision=vcfg, lm=lm_config_dict(lm_cfg), image_token_id=image_token_id,
        visual_tokens_pretrain=visual_tokens, visual_tokens_sft=visual_tokens,
        projector_in=vision_width(tower), projector_out=lm_cfg.hidden_size,
        freeze_vision=True, attn_implementation="sdpa", lm_source=str(ckpt))
    model = OpenQwen2VL(config, vision=tower)
    ours = model.state_dict()
    state = convert_state(modules, ours, ckpt, bool(lm_cfg.tie_word_embeddings),
                          vision_state, vision_weights)
    return save_converted(model, state, tok, out_dir)


def save_converted(model: OpenQwen2VL, state: dict, tok, out_dir) -> OpenQwen2VL:
    """Load a converted state strictly into `model` and write it with its tokenizer, as
    `OpenQwen2VL.from_pretrained` and `load_tokenizer` read it back."""
    model.load_state_dict(state, strict=True)
    model.eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out, save_jinja_files=False)
    model.save_pretrained(out)  # config.json last: it marks a complete checkpoint
    return model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", type=Path, required=True,
                    help="the release's run directory (config.json, checkpoints/latest-checkpoint.pt)")
    ap.add_argument("--lm", type=Path, required=True,
                    help="local directory of the base LLM it was trained from (config.json, tokenizer)")
    ap.add_argument("--tokenizer", type=Path, default=None, help="base tokenizer directory (default: --lm)")
    ap.add_argument("--vision-weights", type=Path, default=None,
                    help="the frozen tower's open_clip weights, when the checkpoint has no vision_backbone")
    ap.add_argument("--vision", default=None,
                    help="open_clip model of the tower (default: the one matching vision_backbone_id)")
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="the .pt to read (default: RUN/checkpoints/latest-checkpoint.pt)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        model = convert(args.run_dir, args.out, lm=args.lm, tokenizer=args.tokenizer,
                        vision_weights=args.vision_weights, vision=args.vision, checkpoint=args.checkpoint)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise SystemExit(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    c = model.config
    read = [args.checkpoint or args.run_dir / "checkpoints" / "latest-checkpoint.pt",
            args.run_dir / "config.json", *([args.vision_weights] if args.vision_weights else [])]
    write_manifest(manifest_path(args.out), "convert_released",
                   work=(model.num_parameters()["total"], "parameters"), config=args_config(args),
                   files=sorted(p for p in args.out.rglob("*") if p.is_file() and p.name != "manifest.json"),
                   counts={"visual_tokens": c.visual_tokens_sft},
                   inputs={str(p): sha256_file(p) for p in read if Path(p).is_file()})
    print(f"{args.out}: {c.vision.open_clip_model} + Qwen2 ({c.lm['num_hidden_layers']} layers, "
          f"vocab {c.lm['vocab_size']}), {c.visual_tokens_sft} visual tokens, "
          f"{model.num_parameters()['total']:,} parameters in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
