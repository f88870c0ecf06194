"""The Open-Qwen2VL model at both scales: open_clip vision tower -> pool + MLP projector -> Qwen2 LM.

    images (N,3,H,W) --vision tower (frozen)--> patch grid (N,C,h,w)      toy 8x8,   paper 27x27
                     --AdaptiveAvgPool2d(g)--> (N, g*g, C)                toy 4x4|8x8, paper 12x12|27x27
                     --Linear(C,D) GELU Linear(D,D)--> visual tokens (N, g*g, D)
    input_ids (B,T) --embed--> scatter visual tokens into the <|image_pad|> positions, in order
                    --Qwen2 decoder (inputs_embeds)--> hidden (B,T,D)
                    --LM head at loss positions only--> cross-entropy

One code path for both scales; only the components differ (model_configs/*.json):
- toy: the toy CLIP checkpoint that `oqvl.filter.train_clip` writes (its `visual`, 64 px, 8x8
  grid) and a fresh tiny `Qwen2Config`;
- paper (`open-qwen2vl`): open_clip `ViT-SO400M-14-SigLIP-384` (timm-backed, 27x27 grid) and
  Qwen2.5-1.5B-Instruct, both from local files (no hub at run time). Download them once, e.g.

      huggingface-cli download timm/ViT-SO400M-14-SigLIP-384 open_clip_model.safetensors \\
          --revision <sha> --local-dir models/ViT-SO400M-14-SigLIP-384
      huggingface-cli download Qwen/Qwen2.5-1.5B-Instruct --revision <sha> \\
          --local-dir models/Qwen2.5-1.5B-Instruct

  and record the snapshot's commit in the preset's `revision` fields (null until pinned).

The number of visual tokens per image is a forward-time argument (or the `visual_tokens`
attribute), so the same weights run at 144 tokens in pretraining and 729 in SFT (low-to-high).

Packed sequences: with `doc_ids` (B,T) (document index per token, padding -1) attention is
block-diagonal causal and positions restart at 0 per document; without it, attention is causal
over the whole packed sequence, as in the reference code.

Checkpoints: `save_pretrained(dir)` writes dir/model.safetensors (all weights, vision included,
tied embeddings stored once) and then dir/config.json (a `VLMConfig`, marks completion);
`OpenQwen2VL.from_pretrained(dir)` rebuilds it offline, without pickle.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.cache_utils import DynamicCache

from ..filter.clip_model import register_model_configs

register_model_configs()  # the toy open_clip config must be known before any tower is built

IGNORE_INDEX = -100
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FORMAT = "oqvl-vlm/1"
PRESET_DIR = Path(__file__).parent / "model_configs"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"  # the file name in open_clip's hub repositories

# Generic PretrainedConfig keys that only add noise to config.json.
_LM_CONFIG_NOISE = ("transformers_version", "_name_or_path", "id2label", "label2id", "architectures",
                    "problem_type", "chunk_size_feed_forward", "output_hidden_states",
                    "output_attentions", "return_dict", "dtype")


# --------------------------------------------------------------------------------------- config

@dataclass
class VisionConfig:
    """The open_clip vision tower: enough to rebuild it with no registry and no network."""

    open_clip_model: str
    """open_clip model name (provenance; the tower is built from `model_cfg`)."""
    model_cfg: dict
    """open_clip model config: embed_dim, vision_cfg (and quick_gelu)."""
    feature_layer: int = -1
    """Transformer block whose output is the patch grid; negative counts from the end."""
    preprocess: dict = field(default_factory=dict)
    """Image preprocessing the tower expects (size, mean, std, interpolation, resize_mode)."""
    source: str | None = None
    """Where the weights came from when the model was assembled (provenance only)."""


@dataclass
class VLMConfig:
    vision: VisionConfig
    lm: dict
    """Qwen2Config as a dict (Qwen2Config.to_dict())."""
    image_token_id: int
    """Id of <|image_pad|>: every visual-token position holds it."""
    visual_tokens_pretrain: int
    """Visual tokens per image in pretraining (a square: the pooled grid's cells)."""
    visual_tokens_sft: int
    """Visual tokens per image in SFT."""
    projector_in: int
    """Vision width C (channels of the patch grid)."""
    projector_out: int
    """LM hidden size D: the projector is Linear(C, D) -> GELU -> Linear(D, D)."""
    freeze_vision: bool = True
    attn_implementation: str = "sdpa"
    lm_source: str | None = None
    """Where the LM weights came from when the model was assembled (provenance only)."""

    def __post_init__(self):
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        for key in ("visual_tokens_pretrain", "visual_tokens_sft"):
            grid_side(getattr(self, key))
        if self.projector_out != self.lm["hidden_size"]:
            raise ValueError(f"projector_out {self.projector_out} != LM hidden size {self.lm['hidden_size']}")
        if not 0 <= self.image_token_id < self.lm["vocab_size"]:
            raise ValueError(f"image_token_id {self.image_token_id} outside the LM vocabulary "
                             f"({self.lm['vocab_size']})")

    def to_dict(self) -> dict:
        return {"format": CONFIG_FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> VLMConfig:
        d = dict(d)
        fmt = d.pop("format", None)
        if fmt != CONFIG_FORMAT:
            raise ValueError(f"not an {CONFIG_FORMAT} config (format {fmt!r})")
        return cls(**d)


def grid_side(visual_tokens: int) -> int:
    """Side of the square pooled grid that gives `visual_tokens` tokens (144 -> 12)."""
    side = round(max(visual_tokens, 0) ** 0.5)
    if visual_tokens < 1 or side * side != visual_tokens:
        raise ValueError(f"visual tokens per image must be a square number, got {visual_tokens}")
    return side


def lm_config_dict(cfg: Qwen2Config) -> dict:
    d = cfg.to_dict()
    for k in _LM_CONFIG_NOISE:
        d.pop(k, None)
    return d


def make_lm_config(d: dict, attn_implementation: str) -> Qwen2Config:
    cfg = Qwen2Config.from_dict(dict(d))
    cfg._attn_implementation = attn_implementation
    return cfg


# ------------------------------------------------------------------------------------- presets

def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_preset(name: str) -> dict:
    """A preset (model_configs/NAME.json): the components and settings of one model scale."""
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise KeyError(f"no model preset {name!r}; known: {list_presets()}")
    preset = json.loads(path.read_text())
    required = {"vision", "lm", "visual_tokens_pretrain", "visual_tokens_sft", "image_token_id",
                "freeze_vision", "attn_implementation"}
    missing = required - set(preset)
    if missing:
        raise ValueError(f"preset {name}: missing {sorted(missing)}")
    if ("config" in preset["lm"]) == ("hf_hub" in preset["lm"]):
        raise ValueError(f"preset {name}: lm needs exactly one of config (fresh) and hf_hub (local dir)")
    return preset


# ---------------------------------------------------------------------------------- components

def open_clip_tower_config(model_name: str) -> dict:
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise KeyError(f"open_clip has no model config {model_name!r}")
    return {k: cfg[k] for k in ("embed_dim", "vision_cfg", "quick_gelu") if k in cfg}


def default_preprocess(model_name: str, model_cfg: dict) -> dict:
    """What open_clip would preprocess with: its defaults, then the first pretrained tag's
    mean/std/resize (SigLIP: 0.5/0.5, squash), at the tower's image size."""
    from open_clip.transform import PreprocessCfg

    pp = dataclasses.asdict(PreprocessCfg())
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if tags:
        tag_cfg = open_clip.get_pretrained_cfg(model_name, tags[0])
        pp.update({k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg})
    size = model_cfg["vision_cfg"].get("image_size", 224)
    pp["size"] = [size, size] if isinstance(size, int) else list(size)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in pp.items()}


def build_vision_tower(vcfg: VisionConfig) -> nn.Module:
    """The open_clip visual tower alone (no text tower: SO400M's would be 400M wasted params)."""
    from open_clip.model import _build_vision_tower

    mc = vcfg.model_cfg
    vision_cfg = dict(mc["vision_cfg"])
    if vision_cfg.get("timm_model_name"):
        vision_cfg["timm_model_pretrained"] = False  # never fetch timm weights; ours are loaded after
    return _build_vision_tower(mc["embed_dim"], vision_cfg, quick_gelu=mc.get("quick_gelu", False))


def vision_width(visual: nn.Module) -> int:
    """Channels C of the tower's patch grid (timm trunk or native open_clip ViT)."""
    trunk = getattr(visual, "trunk", None)
    if trunk is not None:
        return int(trunk.num_features)
    return int(visual.transformer.width)


def read_open_clip_visual_state(path) -> dict[str, torch.Tensor]:
    """The `visual.*` weights of an open_clip checkpoint (.safetensors file, or a directory holding
    model.safetensors or open_clip_model.safetensors), prefix stripped."""
    path = Path(path)
    if path.is_dir():
        for name in (WEIGHTS_FILE, OPEN_CLIP_WEIGHTS):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise FileNotFoundError(f"{path} holds neither {WEIGHTS_FILE} nor {OPEN_CLIP_WEIGHTS}")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: only .safetensors weights are loaded (no pickle); convert it first")
    with safe_open(str(path), framework="pt") as f:
        state = {k[len("visual."):]: f.get_tensor(k) for k in f.keys() if k.startswith("visual.")}  # noqa: SIM118
    if not state:
        raise ValueError(f"{path} has no visual.* weights: not an open_clip CLIP checkpoint")
    return state


# ------------------------------------------------------------------------------------ packing

def document_position_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token within its document (restarts at 0 wherever doc_ids changes)."""
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    start = torch.ones_like(doc_ids, dtype=torch.bool)
    start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=-1).values
    return idx - first


def document_attention_mask(doc_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive (B,1,T,T) mask: 0 where key k <= query q and both are in the same document, else the
    dtype's minimum. Every row keeps its diagonal, so no row is fully masked (no NaN)."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    allowed = (doc_ids[:, :, None] == doc_ids[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=doc_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)


def doc_ids_from_lengths(lengths: Sequence[Sequence[int]], context_len: int) -> torch.Tensor:
    """(B, context_len) document index per token from per-sequence document lengths (the
    `lengths` column of sequences.parquet); padding after the last document gets -1."""
    out = torch.full((len(lengths), context_len), -1, dtype=torch.long)
    for b, lens in enumerate(lengths):
        if sum(lens) > context_len:
            raise ValueError(f"sequence {b}: documents of {sum(lens)} tokens exceed {context_len}")
        out[b, :sum(lens)] = torch.repeat_interleave(torch.arange(len(lens)), torch.as_tensor(lens))
    return out


# ------------------------------------------------------------------------------------- labels

def pretrain_labels(input_ids: torch.Tensor, image_token_id: int, pad_id: int,
                    doc_ids: torch.Tensor | None = None, eos_id: int | None = None) -> torch.Tensor:
    """Labels for packed caption documents `BOS <image tokens> "\\n" caption EOS`, right-padded.

    Masked (-100): image tokens, padding and each document's BOS; kept: "\\n", caption and EOS.
    In Qwen2 BOS = EOS = pad = <|endoftext|>, so the ids alone cannot tell them apart:
    - with doc_ids (padding -1): BOS is a document's first token, padding is doc_ids < 0;
    - without: BOS is an `eos_id` (BOS = EOS; default `pad_id`) token followed by an image
      token; padding is the run of `pad_id` at the end of the sequence except its first token
      (the last document's EOS). If `eos_id` differs from `pad_id`, every `pad_id` is padding.
    """
    labels = input_ids.clone()
    ignore = input_ids == image_token_id
    if doc_ids is not None:
        pad = doc_ids < 0
        first = torch.ones_like(pad)
        first[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        ignore |= pad | (first & ~pad)
    else:
        eos_id = pad_id if eos_id is None else eos_id
        is_pad = input_ids == pad_id
        bos = torch.zeros_like(is_pad)
        bos[:, :-1] = (input_ids[:, :-1] == eos_id) & (input_ids[:, 1:] == image_token_id)
        # trailing[t]: every token from t to the end is pad_id
        trailing = is_pad.flip(-1).cumprod(-1).flip(-1).bool()
        if eos_id == pad_id:
            before = torch.zeros_like(trailing)
            before[:, 1:] = trailing[:, :-1]
            padding = trailing & before  # the run minus its first token
        else:
            padding = is_pad
        ignore |= bos | padding
    labels[ignore] = IGNORE_INDEX
    return labels
# SFT labels (assistant turns only) come from oqvl.model.chat.encode_conversation.


# -------------------------------------------------------------------------------------- model

class Projector(nn.Module):
    """AdaptiveAvgPool2d(grid) of the patch grid, flattened row-major to tokens, then
    Linear(C, D) -> GELU -> Linear(D, D). The pool has no weights, so any grid reuses them."""

    def __init__(self, vision_dim: int, lm_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, lm_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(lm_dim, lm_dim)

    def forward(self, patch_grid: torch.Tensor, visual_tokens: int) -> torch.Tensor:
        side = grid_side(visual_tokens)
        x = F.adaptive_avg_pool2d(patch_grid, side)  # (N, C, side, side); identity at full size
        x = x.flatten(2).transpose(1, 2)              # (N, side*side, C)
        return self.fc2(self.act(self.fc1(x)))


@dataclass
class VLMOutput:
    loss: torch.Tensor | None
    """Cross-entropy over the loss tokens (mean or sum, per `reduction`); None without labels."""
    n_loss_tokens: torch.Tensor
    """Number of positions that carried a loss (shifted labels != -100)."""
    hidden_states: torch.Tensor
    """(B, T, D) last hidden state (after the final norm); logits = model.lm.lm_head(hidden)."""


class OpenQwen2VL(nn.Module):
    def __init__(self, config: VLMConfig, vision: nn.Module | None = None,
                 lm: Qwen2ForCausalLM | None = None):
        """Built from the config (random weights), or around an already loaded tower and LM."""
        super().__init__()
        self.config = config
        self.vision = vision if vision is not None else build_vision_tower(config.vision)
        width = vision_width(self.vision)
        if width != config.projector_in:
            raise ValueError(f"vision tower width {width} != projector_in {config.projector_in}")
        self.projector = Projector(config.projector_in, config.projector_out)
        self.lm = lm if lm is not None else Qwen2ForCausalLM(
            make_lm_config(config.lm, config.attn_implementation))
        self.visual_tokens = config.visual_tokens_pretrain
        """Visual tokens per image used when forward() is not told otherwise."""
        self.set_vision_frozen(config.freeze_vision)

    # ---- assembly

    @classmethod
    def from_components(
        cls,
        vision: str | os.PathLike,
        lm: str | os.PathLike | Qwen2Config | dict,
        *,
        image_token_id: int,
        visual_tokens_pretrain: int,
        visual_tokens_sft: int,
        vision_pretrained: str | os.PathLike | None = None,
        feature_layer: int = -1,
        freeze_vision: bool = True,
        attn_implementation: str = "sdpa",
        preprocess: dict | None = None,
    ) -> OpenQwen2VL:
        """A fresh model from its parts (fp32).

        vision: a toy CLIP checkpoint directory (config.json + model.safetensors from
            oqvl.filter.train_clip), or an open_clip model name; with a name, `vision_pretrained`
            is a .safetensors file or a directory holding open_clip_model.safetensors (None: random).
        lm: a local Hugging Face directory of a Qwen2ForCausalLM (e.g. Qwen2.5-1.5B-Instruct),
            loaded offline; or a Qwen2Config (or its kwargs) for a freshly initialised LM.
        """
        vision_path = Path(vision)
        if (vision_path / CONFIG_FILE).is_file():  # toy CLIP checkpoint directory
            meta = json.loads((vision_path / CONFIG_FILE).read_text())
            name, source = meta["model_name"], str(vision_path)
            model_cfg = {k: meta["model_cfg"][k] for k in ("embed_dim", "vision_cfg", "quick_gelu")
                         if k in meta["model_cfg"]}
            state = read_open_clip_visual_state(vision_path / WEIGHTS_FILE)
        else:
            name, model_cfg = str(vision), open_clip_tower_config(str(vision))
            source = None if vision_pretrained is None else str(vision_pretrained)
            state = None if vision_pretrained is None else read_open_clip_visual_state(vision_pretrained)
        vcfg = VisionConfig(open_clip_model=name, model_cfg=model_cfg, feature_layer=feature_layer,
                            preprocess=preprocess or default_preprocess(name, model_cfg), source=source)
        tower = build_vision_tower(vcfg)
        if state is not None:
            tower.load_state_dict(state, strict=True)

        if isinstance(lm, (Qwen2Config, dict)):
            lm_cfg = copy.deepcopy(lm) if isinstance(lm, Qwen2Config) else Qwen2Config(**lm)
            lm_cfg._attn_implementation = attn_implementation
            lm_model, lm_source = Qwen2ForCausalLM(lm_cfg), None
        else:
            lm_dir = Path(lm)
            if not (lm_dir / CONFIG_FILE).is_file():
                raise FileNotFoundError(f"{lm_dir} is not a local Hugging Face model directory "
                                        f"(no {CONFIG_FILE}); download the LM there first")
            lm_model = Qwen2ForCausalLM.from_pretrained(
                str(lm_dir), local_files_only=True, dtype=torch.float32,
                attn_implementation=attn_implementation)
            lm_source = str(lm_dir)

        config = VLMConfig(
            vision=vcfg, lm=lm_config_dict(lm_model.config), image_token_id=image_token_id,
            visual_tokens_pretrain=visual_tokens_pretrain, visual_tokens_sft=visual_tokens_sft,
            projector_in=vision_width(tower), projector_out=lm_model.config.hidden_size,
            freeze_vision=freeze_vision, attn_implementation=attn_implementation, lm_source=lm_source)
        return cls(config, vision=tower, lm=lm_model)

    @classmethod
    def from_preset(cls, name: str, vision_weights=None, lm_path=None, **overrides) -> OpenQwen2VL:
        """A fresh model from a preset (model_configs/NAME.json).

        toy: vision_weights = the toy CLIP checkpoint directory (None: random tower); the LM is
        new from the preset's Qwen2Config unless lm_path is given.
        open-qwen2vl: vision_weights = the local SigLIP open_clip_model.safetensors (or its
        directory); lm_path = the local Qwen2.5-1.5B-Instruct directory (required).
        """
        p = load_preset(name)
        v, lm = p["vision"], p["lm"]
        if lm_path is None and "config" not in lm:
            raise ValueError(f"preset {name}: download {lm['hf_hub']} (revision {lm.get('revision')}) "
                             f"to a local directory and pass it as lm_path")
        is_ckpt = vision_weights is not None and (Path(vision_weights) / CONFIG_FILE).is_file()
        kwargs = {"image_token_id": p["image_token_id"],
                  "visual_tokens_pretrain": p["visual_tokens_pretrain"],
                  "visual_tokens_sft": p["visual_tokens_sft"],
                  "feature_layer": v.get("feature_layer", -1),
                  "freeze_vision": p["freeze_vision"],
                  "attn_implementation": p["attn_implementation"],
                  "preprocess": v.get("preprocess")}
        kwargs.update(overrides)
        return cls.from_components(
            vision_weights if is_ckpt else v["open_clip_model"],
            lm_path if lm_path is not None else dict(lm["config"]),
            vision_pretrained=None if is_ckpt else vision_weights, **kwargs)

    # ---- checkpoints

    def save_pretrained(self, out_dir) -> None:
        """OUT/model.safetensors (every weight; tied LM head stored once), then OUT/config.json."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_model(self, str(out / WEIGHTS_FILE), metadata={"format": CONFIG_FORMAT})
        tmp = out / (CONFIG_FILE + ".tmp")
        tmp.write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        os.replace(tmp, out / CONFIG_FILE)

    @classmethod
    def from_pretrained(cls, ckpt_dir, device: str | torch.device = "cpu") -> OpenQwen2VL:
        ckpt = Path(ckpt_dir)
        if not (ckpt / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{ckpt} is not a complete checkpoint (no {CONFIG_FILE})")
        model = cls(VLMConfig.from_dict(json.loads((ckpt / CONFIG_FILE).read_text())))
        load_model(model, ckpt / WEIGHTS_FILE, strict=True)
        return model.to(device)

    # ---- freezing

    def set_vision_frozen(self, frozen: bool = True) -> None:
        """Frozen: no grads, eval mode (kept by train()), features computed under no_grad."""
        self.config.freeze_vision = bool(frozen)
        self.vision.requires_grad_(not frozen)
        if frozen:
            self.vision.eval()
        else:
            self.vision.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.config.freeze_vision:
            self.vision.eval()
        return self

    # ---- forward pieces

    def encode_images(self, images: torch.Tensor, visual_tokens: int | None = None) -> torch.Tensor:
        """(N,3,H,W) preprocessed images -> (N, visual_tokens, D) visual tokens."""
        visual_tokens = visual_tokens or self.visual_tokens
        dtype = next(self.vision.parameters()).dtype
        grad = torch.no_grad() if self.config.freeze_vision else contextlib.nullcontext()
        with grad:
            out = self.vision.forward_intermediates(
                images.to(dtype), indices=[self.config.vision.feature_layer], stop_early=True,
                intermediates_only=True, output_fmt="NCHW")
        return self.projector(out["image_intermediates"][-1], visual_tokens)

    def embed_inputs(self, input_ids: torch.Tensor, images: torch.Tensor | None,
                     visual_tokens: int | None = None) -> torch.Tensor:
        """Token embeddings with the visual tokens written, in order, into the <|image_pad|> slots."""
        visual_tokens = visual_tokens or self.visual_tokens
        embeds = self.lm.get_input_embeddings()(input_ids)
        slots = input_ids == self.config.image_token_id
        n_slots = int(slots.sum())
        n_images = 0 if images is None else images.shape[0]
        if n_slots != n_images * visual_tokens:
            raise ValueError(f"{n_slots} image tokens in input_ids but {n_images} images x "
                             f"{visual_tokens} visual tokens = {n_images * visual_tokens}")
        if n_images == 0:
            return embeds
        feats = self.encode_images(images, visual_tokens).to(embeds.dtype)
        return embeds.masked_scatter(slots.unsqueeze(-1), feats)

    def attention_inputs(self, embeds, position_ids=None, doc_ids=None):
        """(attention_mask, position_ids) for the Qwen2 decoder.

        doc_ids: a 4-D additive mask (block-diagonal causal) that transformers passes through
        unchanged, and positions restarting per document. Flash-attention kernels take no 4-D
        mask; there the restarting positions alone make transformers isolate documents.
        No doc_ids: no mask (causal over the whole sequence). If position_ids are given, a 2-D
        all-ones mask is passed, because transformers otherwise reads restarting positions as
        packed documents and would isolate them silently.
        """
        B, T = embeds.shape[:2]
        if doc_ids is not None:
            if doc_ids.shape != (B, T):
                raise ValueError(f"doc_ids shape {tuple(doc_ids.shape)} != input shape {(B, T)}")
            doc_ids = doc_ids.to(embeds.device)
            if position_ids is None:
                position_ids = document_position_ids(doc_ids)
            if self.lm.config._attn_implementation.startswith("flash"):
                return None, position_ids
            return document_attention_mask(doc_ids, embeds.dtype), position_ids
        if position_ids is None:
            return None, torch.arange(T, device=embeds.device).expand(B, T)
        return torch.ones(B, T, dtype=torch.long, device=embeds.device), position_ids

    def forward(self, input_ids: torch.Tensor, images: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, visual_tokens: int | None = None,
                reduction: str = "mean") -> VLMOutput:
        """input_ids (B,T); images (N,3,H,W) in order of appearance; labels (B,T) aligned with
        input_ids (-100: no loss; shifted inside); doc_ids (B,T) for document isolation."""
        embeds = self.embed_inputs(input_ids, images, visual_tokens)
        mask, position_ids = self.attention_inputs(embeds, position_ids, doc_ids)
        hidden = self.lm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                               use_cache=False).last_hidden_state
        if labels is None:
            return VLMOutput(None, torch.zeros((), dtype=torch.long), hidden)
        loss, n = self.loss_from_hidden(hidden, labels, reduction)
        return VLMOutput(loss, n, hidden)

    def loss_from_hidden(self, hidden: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"):
        """Next-token cross-entropy with the LM head applied only where a loss is due (the output
        layer over the vocabulary dominates the step otherwise). Returns (loss, n_loss_tokens)."""
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be mean or sum, got {reduction!r}")
        targets = labels[:, 1:].to(hidden.device)
        keep = targets != IGNORE_INDEX
        logits = self.lm.lm_head(hidden[:, :-1][keep]).float()
        n = keep.sum()
        loss = F.cross_entropy(logits, targets[keep], reduction="sum")
        if reduction == "mean":
            loss = loss / n.clamp(min=1)
        return loss, n

    # ---- evaluation

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, images: torch.Tensor | None = None,
                 max_new_tokens: int = 16, stop_token_ids: Sequence[int] = (),
                 attention_mask: torch.Tensor | None = None,
                 visual_tokens: int | None = None) -> list[list[int]]:
        """Greedy decoding with a KV cache. input_ids (B,T) (left-padded, with attention_mask, if
        prompts differ in length). Returns per prompt the new tokens, up to and including the
        first stop token."""
        was_training = self.training
        self.eval()
        try:
            embeds = self.embed_inputs(input_ids, images, visual_tokens)
            B, T = input_ids.shape
            if attention_mask is None:
                positions = torch.arange(T, device=embeds.device).expand(B, T)
            else:
                attention_mask = attention_mask.to(embeds.device).long()
                positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            cache = DynamicCache(config=self.lm.config)
            stops = {int(s) for s in stop_token_ids}
            out: list[list[int]] = [[] for _ in range(B)]
            done = [False] * B
            for _ in range(max_new_tokens):
                hidden = self.lm.model(inputs_embeds=embeds, attention_mask=attention_mask,
                                       position_ids=positions, past_key_values=cache,
                                       use_cache=True).last_hidden_state
                nxt = self.lm.lm_head(hidden[:, -1]).argmax(-1)
                for b, tok in enumerate(nxt.tolist()):
                    if not done[b]:
                        out[b].append(tok)
                        done[b] = tok in stops
                if all(done):
                    break
                embeds = self.lm.get_input_embeddings()(nxt[:, None])
                positions = positions[:, -1:] + 1
                if attention_mask is not None:
                    attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
            return out
        finally:
            self.train(was_training)

    @torch.no_grad()
    def loglikelihood(self, context_ids, continuation_ids, images: torch.Tensor | None = None,
                      visual_tokens: int | None = None) -> tuple[float, bool]:
        """(sum of log p(continuation | context, images), whether greedy decoding gives it)."""
        ctx = torch.as_tensor(context_ids, dtype=torch.long).flatten()
        cont = torch.as_tensor(continuation_ids, dtype=torch.long).flatten()
        if len(ctx) == 0 or len(cont) == 0:
            raise ValueError("context and continuation must both be non-empty")
        was_training = self.training
        self.eval()
        try:
            device = self.lm.lm_head.weight.device
            ids = torch.cat([ctx, cont])[None].to(device)
            hidden = self.forward(ids, images, visual_tokens=visual_tokens).hidden_states[0]
            h = hidden[len(ctx) - 1: len(ctx) - 1 + len(cont)]
            logp = F.log_softmax(self.lm.lm_head(h).float(), dim=-1)
            cont = cont.to(device)
            total = logp.gather(-1, cont[:, None]).sum()
            return float(total), bool((logp.argmax(-1) == cont).all())
        finally:
            self.train(was_training)

    # ---- data helpers

    def image_transform(self):
        """The inference preprocessing (PIL image -> normalised tensor) the vision tower expects."""
        from open_clip.transform import PreprocessCfg, image_transform_v2

        pp = dict(self.config.vision.preprocess)
        pp = {k: tuple(v) if isinstance(v, list) else v for k, v in pp.items()}
        return image_transform_v2(PreprocessCfg(**pp), is_train=False)

    def num_parameters(self) -> dict[str, int]:
        """Unique parameters per part (tied embeddings counted once)."""
        def count(m):
            return sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())
        parts = {"vision": count(self.vision), "projector": count(self.projector), "lm": count(self.lm)}
        parts["total"] = count(self)
        return parts
