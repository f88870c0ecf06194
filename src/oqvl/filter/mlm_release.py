"""The released MLM-Filter (a LLaVA-Unified LlavaQwen checkpoint) as this project's checkpoint.

    python -m oqvl.filter.mlm_release --release models/mlm-filter-qwen2.5-1.5b-gpt4o \\
        --vision models/siglip-so400m-patch14-384 --out results/filter/mlm_release

writes OUT/config.json + OUT/model.safetensors (`OpenQwen2VL.save_pretrained`) and the tokenizer
files, so `OpenQwen2VL.from_pretrained(OUT)` and `load_tokenizer(OUT)` read it like our own; the
`score` subcommand of oqvl.filter.mlm_filter then scores with `--prompt official`. References:
LLaVA-Unified (Victorwz/LLaVA-Unified, the model code, paths under llava/) and MLM_Filter
(Victorwz/MLM_Filter, v2 = mlm_filter_scoring_datacomp_batch_inference_v2.py, the scoring script
for Qwen2.5 models).

The release (weizhiwang/mlm-filter-qwen2.5-1.5b-gpt4o, read by load_pretrained_model,
model/builder.py:115-117, since its name holds "mlm-filter" and "qwen", builder.py:48):
  RELEASE/config.json        a LlavaQwenConfig (language_model/llava_qwen.py:35-36): the Qwen2
                             fields plus mm_vision_tower, mm_projector_type, mm_hidden_size,
                             mm_num_image_tokens, mm_vision_select_layer, mm_vision_select_feature,
                             mm_use_im_start_end, mm_use_im_patch_token, tokenizer_model_max_length.
  RELEASE/*.safetensors      a LlavaQwenForCausalLM state dict (one file or an index of shards).
  RELEASE/tokenizer files    AutoTokenizer.from_pretrained(RELEASE) (builder.py:116).
The vision tower is not taken from the release: LlavaMetaModel builds it with delay_load=True
(llava_arch.py:35), so SiglipVisionTower holds no weights at load (siglip_encoder.py:16-21) and
any model.vision_tower.* tensors in the checkpoint are unused; load_model() then reads
SiglipVisionModel from the mm_vision_tower folder (builder.py:165-167, siglip_encoder.py:28-29).
Only with unfreeze_mm_vision_tower is the tower built first (siglip_encoder.py:18-19), and then the
checkpoint's copy is what the model holds. --vision is that folder, downloaded
(google/siglip-so400m-patch14-384: a SiglipModel, config.json + model.safetensors +
preprocessor_config.json); its text_model.*, logit_scale and logit_bias are not read by
SiglipVisionModel and are skipped.

Key map (release: key in RELEASE/*.safetensors, vision: key in VISION/model.safetensors with its
"vision_model." prefix cut; ours: OpenQwen2VL.state_dict()):

  release  model.mm_projector.mlp_projector.0.*  projector.fc1.*   aapool_mlp: Linear GELU Linear
  release  model.mm_projector.mlp_projector.2.*  projector.fc2.*   (multimodal_projector/builder.py:52-56)
  release  model.mm_projector.{0,2}.*            projector.fc{1,2}.*  mlp2x_gelu (builder.py:74-81)
  release  lm_head.weight                        lm.lm_head.weight (absent when tied: the embedding)
  release  model.<rest>                          lm.model.<rest>   (LlavaQwenModel is Qwen2Model)
  release  model.vision_tower.vision_tower.vision_model.<rest>  as vision, only with
                                                 unfreeze_mm_vision_tower (skipped otherwise)
  vision   embeddings.patch_embedding.*          vision.trunk.patch_embed.proj.*
  vision   embeddings.position_embedding.weight  vision.trunk.pos_embed (N, D) -> (1, N, D)
  vision   encoder.layers.i.layer_norm1.*        vision.trunk.blocks.i.norm1.*
  vision   encoder.layers.i.self_attn.{q,k,v}_proj.*  vision.trunk.blocks.i.attn.qkv.* (q, k, v
                                                 concatenated on the output axis: timm's qkv
                                                 Linear splits its output in that order)
  vision   encoder.layers.i.self_attn.out_proj.*  vision.trunk.blocks.i.attn.proj.*
  vision   encoder.layers.i.layer_norm2.*        vision.trunk.blocks.i.norm2.*
  vision   encoder.layers.i.mlp.fc{1,2}.*        vision.trunk.blocks.i.mlp.fc{1,2}.*
  vision   post_layernorm.*                      vision.trunk.norm.*
  vision   head.probe                            vision.trunk.attn_pool.latent
  vision   head.attention.in_proj_{weight,bias}  vision.trunk.attn_pool.q.* (rows :D), .kv.* (D:)
  vision   head.attention.out_proj.*             vision.trunk.attn_pool.proj.*
  vision   head.layernorm.*                      vision.trunk.attn_pool.norm.*
  vision   head.mlp.fc{1,2}.*                    vision.trunk.attn_pool.mlp.fc{1,2}.*
The load is strict: every read key maps to one of ours with the same shape and every one of ours
is filled; the first violation raises ValueError, one line naming the key and the file. (The
post-norm and the pooling head are never used for scoring; they are converted so the tower is
whole.)

Architecture, all of which OpenQwen2VL represents as it is:
  - vision features: SiglipVisionModel's hidden_states[mm_vision_select_layer] with select_feature
    "patch", all tokens (siglip_encoder.py:34-38): an encoder layer's output, before
    post_layernorm. hidden_states[0] is the embeddings, [k] the output of layer k, so a negative
    index s is timm's block s (both count from the end) and a positive k is block k - 1;
  - activation: transformers' SigLIP MLPs use gelu_pytorch_tanh (the config's hidden_act), timm's
    SigLIP the exact GELU, so the converted tower records timm_act_layer gelu_tanh;
  - projector (aapool_mlp): the patch grid row-major, AdaptiveAvgPool2d to sqrt(mm_num_image_tokens)
    squared, then Linear GELU Linear (multimodal_projector/builder.py:48-66, 86-87); mlp2x_gelu is
    the same without pooling (all patches);
  - LM: Qwen2ForCausalLM from the release config, rope_scaling dropped (llava_qwen.py:53);
  - vocabulary: builder.py:157-163 adds "<im_patch>" (mm_use_im_patch_token, default true) and
    resizes the embeddings to len(tokenizer); fewer tokens than rows (Qwen2.5: 151665 of 151936)
    keeps the first rows, so the converted LM has exactly len(tokenizer) rows, as the reference's;
  - preprocessing: v2 calls the SiglipImageProcessor directly (v2.py:105; process_images and
    image_aspect_ratio are not used): resize to size (squash) with its resample, rescale by 1/255,
    normalise by image_mean/image_std; the same as open_clip's squash transform.
The prompt (qwen_instruct, the four metric instructions, the appended whitespace, max_new_tokens 2)
is `oqvl.filter.mlm_filter.official_prompt_ids`; docs/mlm_filter.md says what differs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import time
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import Qwen2Config

from ..io import sha256_file
from ..manifest import args_config, manifest_path, write_manifest
from ..model.config import VisionConfig, VLMConfig, grid_side, lm_config_dict
from ..model.prismatic import Rule, map_keys, reference_name, save_converted, tie_lm_head
from ..model.tokenizer import IMAGE_TOKEN, load_tokenizer
from ..model.vision import build_vision_tower, open_clip_tower_config, vision_width
from ..model.vlm import CONFIG_FILE, OpenQwen2VL

RELEASE = ""  # the release's keys are named as they are (one module)
VISION = "vision"
WEIGHTS_INDEX = "model.safetensors.index.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
IM_PATCH = "<im_patch>"                  # constants.py:10, added by builder.py:159-160
VISION_PREFIX = "vision_model."          # SiglipModel / SiglipVisionModel (transformers 4.x files)
RELEASE_VISION_PREFIX = "model.vision_tower.vision_tower."  # llava_arch.py:35, siglip_encoder.py:29
VISION_SKIPPED = ("text_model.", "logit_scale", "logit_bias")  # not in SiglipVisionModel
HF_ACT = {"gelu_pytorch_tanh": "gelu_tanh", "gelu": None}  # hidden_act -> timm activation (None: timm's own)
RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL resample codes of the image processor

# (image_size, patch_size, hidden_size, num_hidden_layers) -> open_clip model with that timm trunk
SIGLIP_TOWERS = {
    (384, 14, 1152, 27): "ViT-SO400M-14-SigLIP-384",
    (224, 14, 1152, 27): "ViT-SO400M-14-SigLIP",
    (224, 16, 768, 12): "ViT-B-16-SigLIP",
    (256, 16, 768, 12): "ViT-B-16-SigLIP-256",
    (384, 16, 768, 12): "ViT-B-16-SigLIP-384",
}

PROJECTOR_RULES = {
    "aapool_mlp": (Rule(RELEASE, "model.mm_projector.mlp_projector.0.", "projector.fc1."),
                   Rule(RELEASE, "model.mm_projector.mlp_projector.2.", "projector.fc2.")),
    "mlp2x_gelu": (Rule(RELEASE, "model.mm_projector.0.", "projector.fc1."),
                   Rule(RELEASE, "model.mm_projector.2.", "projector.fc2.")),
}
LM_RULES = (Rule(RELEASE, "lm_head.", "lm.lm_head."), Rule(RELEASE, "model.", "lm.model."))

# transformers' SigLIP vision names -> timm's (one tensor each; q/k/v and in_proj below)
_SIGLIP_RENAMES = (
    (r"embeddings\.patch_embedding\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"encoder\.layers\.(\d+)\.layer_norm([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layers\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
    (r"post_layernorm\.(weight|bias)", r"norm.\1"),
    (r"head\.probe", r"attn_pool.latent"),
    (r"head\.attention\.out_proj\.(weight|bias)", r"attn_pool.proj.\1"),
    (r"head\.layernorm\.(weight|bias)", r"attn_pool.norm.\1"),
    (r"head\.mlp\.(fc[12])\.(weight|bias)", r"attn_pool.mlp.\1.\2"),
)
_TIMM_TO_SIGLIP = (  # the same map backwards; q_proj stands for q, k and v
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embedding.\1"),
    (r"pos_embed", "embeddings.position_embedding.weight"),
    (r"blocks\.(\d+)\.norm([12])\.(weight|bias)", r"encoder.layers.\1.layer_norm\2.\3"),
    (r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"encoder.layers.\1.self_attn.q_proj.\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"encoder.layers.\1.self_attn.out_proj.\2"),
    (r"blocks\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", r"encoder.layers.\1.mlp.\2.\3"),
    (r"norm\.(weight|bias)", r"post_layernorm.\1"),
    (r"attn_pool\.latent", "head.probe"),
    (r"attn_pool\.(?:q|kv)\.(weight|bias)", r"head.attention.in_proj_\1"),
    (r"attn_pool\.proj\.(weight|bias)", r"head.attention.out_proj.\1"),
    (r"attn_pool\.norm\.(weight|bias)", r"head.layernorm.\1"),
    (r"attn_pool\.mlp\.(fc[12])\.(weight|bias)", r"head.mlp.\1.\2"),
)
_QKV = re.compile(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")
_IN_PROJ = re.compile(r"head\.attention\.in_proj_(weight|bias)")
_POS = "embeddings.position_embedding.weight"


# ------------------------------------------------------------------------------------ files

def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {what}")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path}: not a JSON object")  # noqa: TRY004 (a bad file)
    return d


def read_safetensors_dir(folder: Path) -> dict[str, tuple[torch.Tensor, Path]]:
    """{key: (tensor, file)} of a Hugging Face folder: model.safetensors or the shards its index
    names. Only .safetensors is read (no pickle)."""
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        files = sorted({folder / f for f in read_json(index, "weights index").get("weight_map", {}).values()})
        if not files:
            raise ValueError(f"{index}: empty weight_map")
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    else:
        bins = sorted(p.name for p in folder.glob("*.bin"))
        why = f" (only {bins[0]}: convert it to .safetensors, no pickle is loaded)" if bins else ""
        raise FileNotFoundError(f"{folder}: no model.safetensors or {WEIGHTS_INDEX}{why}")
    out: dict[str, tuple[torch.Tensor, Path]] = {}
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: weights shard named by {index} is missing")
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if k in out:
                    raise ValueError(f"{f}: key {k} is also in {out[k][1]}")
                out[k] = (st.get_tensor(k), f)
    return out


def weights_file(folder: Path) -> Path:
    """The file a missing key is reported against: the shard index, or the one weights file."""
    return folder / WEIGHTS_INDEX if (folder / WEIGHTS_INDEX).is_file() else folder / "model.safetensors"


def vision_config_of(vision_dir: Path) -> tuple[dict, Path]:
    """The SiglipVisionConfig (as a dict) of a SiglipModel or SiglipVisionModel folder."""
    path = vision_dir / CONFIG_FILE
    d = read_json(path, "vision tower config (--vision is the SigLIP folder)")
    if d.get("model_type") == "siglip":
        d = d.get("vision_config") or {}
    elif d.get("model_type") != "siglip_vision_model":
        raise ValueError(f"{path}: model_type {d.get('model_type')!r}, not siglip or siglip_vision_model")
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(**{k: v for k, v in d.items() if k != "model_type"}).to_dict(), path


# ------------------------------------------------------------------------------------ vision

def siglip_to_timm(sd: dict, source) -> dict[str, tuple[torch.Tensor, str]]:
    """transformers SigLIP vision keys (prefix cut) -> {timm key: (tensor, the key it came from)}."""
    out: dict[str, tuple[torch.Tensor, str]] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in sd.items():
        if key == _POS:
            out["pos_embed"] = (tensor[None], key)
            continue
        if m := _QKV.fullmatch(key):
            qkv.setdefault((m[1], m[3]), {})[m[2]] = tensor
            continue
        if m := _IN_PROJ.fullmatch(key):
            d = tensor.shape[0] // 3
            out[f"attn_pool.q.{m[1]}"] = (tensor[:d], key)
            out[f"attn_pool.kv.{m[1]}"] = (tensor[d:], key)
            continue
        for pattern, target in _SIGLIP_RENAMES:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, target, key)] = (tensor, key)
                break
        else:
            raise ValueError(f"{source}: unused key {VISION_PREFIX}{key} (no timm tensor for it)")
    for (layer, kind), parts in sorted(qkv.items()):
        for p in "qkv":
            if p not in parts:
                raise ValueError(f"{source}: missing key {VISION_PREFIX}encoder.layers.{layer}."
                                 f"self_attn.{p}_proj.{kind}")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = (torch.cat([parts[p] for p in "qkv"]),
                                                  f"encoder.layers.{layer}.self_attn.q_proj.{kind}")
    return out


def siglip_name(timm_key: str) -> str:
    """The transformers key that fills timm's `timm_key` (for a missing-key message)."""
    for pattern, name in _TIMM_TO_SIGLIP:
        if re.fullmatch(pattern, timm_key):
            return VISION_PREFIX + re.sub(pattern, name, timm_key)
    return timm_key


def vision_layer(select_layer: int, num_layers: int, source) -> int:
    """Our feature_layer (a timm block index) for hidden_states[select_layer] of SiglipVisionModel."""
    if -num_layers <= select_layer <= -1:
        return select_layer  # both count from the end: hidden_states[-1] is the last block's output
    if 1 <= select_layer <= num_layers:
        return select_layer - 1  # hidden_states[0] is the embeddings
    raise ValueError(f"{source}: mm_vision_select_layer {select_layer} is not an encoder layer's "
                     f"output (1..{num_layers} or -{num_layers}..-1)")


def preprocess_of(vision_dir: Path, image_size: int) -> dict:
    """open_clip preprocessing equal to the folder's SiglipImageProcessor (v2.py:105)."""
    from open_clip.transform import PreprocessCfg

    path = vision_dir / PREPROCESSOR_FILE
    p = read_json(path, "image processor config")
    size = p.get("size", {})
    checks = {"do_resize": p.get("do_resize", True) is True,
              "size": size == {"height": image_size, "width": image_size},
              "resample": p.get("resample", 3) in RESAMPLE,
              "do_rescale": p.get("do_rescale", True) is True
              and abs(p.get("rescale_factor", 1 / 255) - 1 / 255) < 1e-12,
              "do_normalize": p.get("do_normalize", True) is True}
    for name, ok in checks.items():
        if not ok:
            raise ValueError(f"{path}: {name} {p.get(name)!r} has no open_clip equivalent here "
                             f"(resize to {image_size}x{image_size}, rescale 1/255, normalise)")
    pp = dataclasses.asdict(PreprocessCfg())
    pp.update(size=[image_size, image_size], mean=list(p.get("image_mean", [0.5] * 3)),
              std=list(p.get("image_std", [0.5] * 3)), interpolation=RESAMPLE[p.get("resample", 3)],
              resize_mode="squash")
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in pp.items()}


def vision_tower_of(vcfg_hf: dict, cfg_path: Path, release_cfg: dict, release_path: Path,
                    vision_dir: Path, arch: str | None):
    """(VisionConfig, tower): the open_clip/timm tower with transformers' SigLIP's architecture."""
    shape = (vcfg_hf["image_size"], vcfg_hf["patch_size"], vcfg_hf["hidden_size"], vcfg_hf["num_hidden_layers"])
    if arch is None:
        if shape not in SIGLIP_TOWERS:
            raise ValueError(f"{cfg_path}: SigLIP (image, patch, width, layers) {shape} has no open_clip "
                             f"tower here (known: {sorted(SIGLIP_TOWERS)}); name one with --vision-arch")
        arch = SIGLIP_TOWERS[shape]
    oc_cfg = open_clip_tower_config(arch)
    if not oc_cfg["vision_cfg"].get("timm_model_name"):
        raise ValueError(f"open_clip {arch} has no timm trunk; transformers' SigLIP converts to timm's ViT")
    act = vcfg_hf.get("hidden_act")
    if act not in HF_ACT:
        raise ValueError(f"{cfg_path}: hidden_act {act!r} is not converted (known: {sorted(HF_ACT)})")
    if HF_ACT[act]:
        oc_cfg["vision_cfg"]["timm_act_layer"] = HF_ACT[act]
    select = release_cfg.get("mm_vision_select_layer", -2)
    feature = release_cfg.get("mm_vision_select_feature", "patch")
    if feature != "patch":
        raise ValueError(f"{release_path}: mm_vision_select_feature {feature!r}; only \"patch\" (a patch "
                         f"grid, siglip_encoder.py:36-38) is what OpenQwen2VL's projector pools")
    vcfg = VisionConfig(open_clip_model=arch, model_cfg=oc_cfg,
                        feature_layer=vision_layer(select, vcfg_hf["num_hidden_layers"], release_path),
                        preprocess=preprocess_of(vision_dir, vcfg_hf["image_size"]), source=str(vision_dir))
    tower = build_vision_tower(vcfg)
    t = tower.trunk
    have = {"image_size": t.patch_embed.img_size[0], "patch_size": t.patch_embed.patch_size[0],
            "hidden_size": t.embed_dim, "num_hidden_layers": len(t.blocks),
            "num_attention_heads": t.blocks[0].attn.num_heads,
            "intermediate_size": t.blocks[0].mlp.fc1.out_features,
            "layer_norm_eps": t.blocks[0].norm1.eps}
    for k, v in have.items():
        if k in vcfg_hf and vcfg_hf[k] != v:
            raise ValueError(f"{cfg_path}: {k} {vcfg_hf[k]}, but open_clip {arch}'s trunk has {v}")
    if t.num_prefix_tokens or t.global_pool != "map" or not isinstance(t.blocks[0].ls1, torch.nn.Identity):
        raise ValueError(f"open_clip {arch}: its trunk is not SigLIP's (no class token, no layer "
                         f"scale, attention-pool head)")
    return vcfg, tower


# ------------------------------------------------------------------------------------ LM

def lm_config_of(release_cfg: dict, path: Path, vocab_rows: int) -> Qwen2Config:
    if release_cfg.get("model_type") not in ("llava_qwen", "qwen2"):
        raise ValueError(f"{path}: model_type {release_cfg.get('model_type')!r}, not llava_qwen")
    qwen_keys = set(Qwen2Config().to_dict()) | {"rope_theta"}
    # rope_scaling is dropped: LlavaQwenForCausalLM sets it to None (llava_qwen.py:53)
    d = {k: v for k, v in release_cfg.items()
         if k in qwen_keys and k not in ("model_type", "architectures", "rope_scaling", "rope_parameters")}
    if isinstance(release_cfg.get("rope_parameters"), dict) and "rope_theta" not in d:  # a 5.x file
        d["rope_theta"] = release_cfg["rope_parameters"].get("rope_theta", 10000.0)
    d["vocab_size"] = vocab_rows
    return Qwen2Config.from_dict(d)


def release_tokenizer(release: Path, release_cfg: dict, rows: int):
    """The release's tokenizer with the tokens load_pretrained_model adds (builder.py:157-162)."""
    tok = load_tokenizer(release)
    if release_cfg.get("mm_use_im_patch_token", True):
        tok.add_tokens([IM_PATCH], special_tokens=True)
    if release_cfg.get("mm_use_im_start_end", False):
        raise ValueError(f"{release / CONFIG_FILE}: mm_use_im_start_end true; the official prompt with "
                         f"<im_start><image><im_end> is not built here (the Qwen2.5 release has false)")
    if len(tok) > rows:
        raise ValueError(f"{release}: {len(tok)} tokens but the checkpoint has {rows} embedding rows "
                         f"(resize_token_embeddings would add new, untrained rows)")
    limit = release_cfg.get("tokenizer_model_max_length")
    # the reference truncates the spliced sequence to it (llava_arch.py:278-281); None: it does not
    tok.model_max_length = int(limit) if limit else int(1e30)
    return tok


# ------------------------------------------------------------------------------------ convert

def convert_state(release_sd: dict, vision_sd: dict, ours: dict, projector_type: str, tied: bool,
                  rows: int, vision_from_release: bool, release_dir: Path, vision_dir: Path) -> dict:
    """Our full state dict from the release's tensors and the SigLIP folder's."""
    out: dict = {}
    rules = PROJECTOR_RULES[projector_type] + LM_RULES
    release_vision, by_file = {}, {}
    for key, (tensor, f) in release_sd.items():
        if key.startswith(RELEASE_VISION_PREFIX):
            if vision_from_release:
                release_vision[key[len(RELEASE_VISION_PREFIX):]] = (tensor, f)
            continue  # unused by the reference: its tower comes from the vision folder
        by_file.setdefault(f, {})[key] = tensor
    for sd in by_file.values():  # resized to len(tokenizer) <= rows: the first rows (builder.py:163)
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            if name in sd:
                sd[name] = sd[name][:rows]
    for f, sd in by_file.items():
        map_keys(sd, RELEASE, rules, ours, f, out)
    vision_src = release_vision if vision_from_release else vision_sd
    prefix = RELEASE_VISION_PREFIX if vision_from_release else ""
    by_vfile: dict = {}
    for key, (tensor, f) in vision_src.items():
        if not key.startswith(VISION_PREFIX):
            if not vision_from_release and key.startswith(VISION_SKIPPED):
                continue  # SiglipVisionModel reads only the vision model
            raise ValueError(f"{f}: unused key {prefix}{key} (not under {VISION_PREFIX})")
        by_vfile.setdefault(f, {})[key[len(VISION_PREFIX):]] = tensor
    for f, sd in by_vfile.items():
        for timm_key, (tensor, ref) in siglip_to_timm(sd, f).items():
            target = f"vision.trunk.{timm_key}"
            if target not in ours:
                raise ValueError(f"{f}: unused key {prefix}{VISION_PREFIX}{ref} (OpenQwen2VL has no {target})")
            if tuple(tensor.shape) != tuple(ours[target].shape):
                raise ValueError(f"{f}: {prefix}{VISION_PREFIX}{ref} gives {target} shape {tuple(tensor.shape)}, "
                                 f"it needs {tuple(ours[target].shape)}")
            out[target] = tensor
    tie_lm_head(out, tied, weights_file(release_dir), "lm_head.weight", "model.embed_tokens.weight")
    for key in ours:
        if key not in out:
            if key.startswith("vision.trunk."):
                where = weights_file(release_dir if vision_from_release else vision_dir)
                name = prefix + siglip_name(key[len("vision.trunk."):])
            else:
                where, name = weights_file(release_dir), reference_name(key, rules)
            raise ValueError(f"{where}: missing key {name} (for {key})")
    return out


def convert(release, vision, out_dir, *, vision_arch: str | None = None) -> OpenQwen2VL:
    """Convert the released MLM-Filter folder (with the SigLIP folder it names) into OUT."""
    release, vision = Path(release), Path(vision)
    cfg_path = release / CONFIG_FILE
    rcfg = read_json(cfg_path, "release config (--release is the downloaded MLM-Filter folder)")
    ptype = rcfg.get("mm_projector_type", "linear")
    if ptype not in PROJECTOR_RULES:
        raise ValueError(f"{cfg_path}: mm_projector_type {ptype!r}; converted: {sorted(PROJECTOR_RULES)} "
                         f"(OpenQwen2VL's projector is pool + Linear GELU Linear)")
    for key in ("mm_vision_tower", "mm_hidden_size", "hidden_size", "vocab_size"):
        if key not in rcfg:
            raise ValueError(f"{cfg_path}: {key} missing (not a LLaVA release config)")
    if "unpad" in rcfg.get("mm_patch_merge_type", "flat"):
        raise ValueError(f"{cfg_path}: mm_patch_merge_type {rcfg['mm_patch_merge_type']!r} is not converted")

    vcfg_hf, vcfg_path = vision_config_of(vision)
    if rcfg["mm_hidden_size"] != vcfg_hf["hidden_size"]:
        raise ValueError(f"{cfg_path}: mm_hidden_size {rcfg['mm_hidden_size']}, but {vcfg_path} has "
                         f"hidden_size {vcfg_hf['hidden_size']}")
    n_patches = (vcfg_hf["image_size"] // vcfg_hf["patch_size"]) ** 2
    visual_tokens = int(rcfg.get("mm_num_image_tokens", 256)) if ptype == "aapool_mlp" else n_patches
    try:
        grid_side(visual_tokens)
    except ValueError as e:
        raise ValueError(f"{cfg_path}: mm_num_image_tokens: {e}") from None
    vision_from_release = bool(rcfg.get("unfreeze_mm_vision_tower", False))
    vcfg, tower = vision_tower_of(vcfg_hf, vcfg_path, rcfg, cfg_path, vision, vision_arch)

    release_sd = read_safetensors_dir(release)
    embed = release_sd.get("model.embed_tokens.weight")
    if embed is None:
        raise ValueError(f"{weights_file(release)}: missing key model.embed_tokens.weight")
    tok = release_tokenizer(release, rcfg, embed[0].shape[0])
    lm_cfg = lm_config_of(rcfg, cfg_path, len(tok))
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    if not isinstance(image_token_id, int) or image_token_id == tok.unk_token_id or image_token_id >= len(tok):
        raise ValueError(f"{release}: tokenizer has no {IMAGE_TOKEN} (the slots the visual tokens fill)")
    vision_sd = {} if vision_from_release else read_safetensors_dir(vision)

    config = VLMConfig(
        vision=vcfg, lm=lm_config_dict(lm_cfg), image_token_id=image_token_id,
        visual_tokens_pretrain=visual_tokens, visual_tokens_sft=visual_tokens,
        projector_in=vision_width(tower), projector_out=lm_cfg.hidden_size,
        freeze_vision=True, attn_implementation="sdpa", lm_source=str(release))
    model = OpenQwen2VL(config, vision=tower)
    ours = model.state_dict()
    state = convert_state(release_sd, vision_sd, ours, ptype, bool(lm_cfg.tie_word_embeddings),
                          len(tok), vision_from_release, release, vision)
    return save_converted(model, state, tok, out_dir)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--release", type=Path, required=True,
                    help="the downloaded MLM-Filter folder (config.json, *.safetensors, tokenizer)")
    ap.add_argument("--vision", type=Path, required=True,
                    help="the SigLIP folder its mm_vision_tower names (config.json, model.safetensors, "
                         "preprocessor_config.json)")
    ap.add_argument("--vision-arch", default=None,
                    help="open_clip model of the tower (default: the one with the SigLIP's shape)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        model = convert(args.release, args.vision, args.out, vision_arch=args.vision_arch)
    except (ValueError, FileNotFoundError, OSError, KeyError) as e:
        msg = str(e).strip("'\"")
        raise SystemExit(f"error: {msg.splitlines()[0] if msg else type(e).__name__}") from None
    c = model.config
    read = sorted(p for d in (args.release, args.vision) for p in Path(d).iterdir()
                  if p.is_file() and (p.suffix in (".json", ".safetensors") or p.name.startswith("tokenizer")))
    write_manifest(manifest_path(args.out), "convert_mlm_filter",
                   work=(model.num_parameters()["total"], "parameters"), config=args_config(args),
                   files=sorted(p for p in args.out.rglob("*") if p.is_file() and p.name != "manifest.json"),
                   counts={"visual_tokens": c.visual_tokens_sft, "vocab": c.lm["vocab_size"]},
                   inputs={str(p): sha256_file(p) for p in read})
    print(f"{args.out}: {c.vision.open_clip_model} (feature layer {c.vision.feature_layer}) + Qwen2 "
          f"({c.lm['num_hidden_layers']} layers, vocab {c.lm['vocab_size']}), {c.visual_tokens_sft} "
          f"visual tokens, {model.num_parameters()['total']:,} parameters in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
