"""The Open-Qwen2VL model at both scales: open_clip vision tower -> projector -> Qwen2 LM.

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

The projector is a config switch (`VLMConfig.projector`), to compare Qwen2-VL's adapter with
Open-Qwen2VL's at toy scale:
- `avgpool` (default, above): Open-Qwen2VL's pool + MLP, any square token count per stage;
- `merger2x2`: Qwen2-VL's PatchMerger (transformers' own class): each 2x2 block of adjacent
  patches -> LayerNorm(C) per patch, the 4 concatenated (4C) -> Linear(4C,4C) GELU Linear(4C,D),
  one token per block, blocks row-major: (N, (h/2)*(w/2), D). Each image's tokens are framed by
  <|vision_start|> ... <|vision_end|> (oqvl.model.chat.image_text), as Qwen2-VL lays them out.
  Its token count is the grid's, not a choice: the merger always merges 2x2 blocks, so only a
  larger grid (larger images) gives more tokens. A merger2x2 model therefore uses (h/2)*(w/2)
  tokens in pretraining and SFT alike; both config counts must say so (toy: 8x8 patches -> 16
  and 16, where avgpool uses 16 and 64: the toy tower, trained at 64 px with fixed position
  embeddings, takes no larger image). Another count, or an odd side (paper: 27x27 has no 2x2
  tiling), is an error.

Packed sequences: with `doc_ids` (B,T) (document index per token, padding -1) attention is
block-diagonal causal and positions restart at 0 per document (`oqvl.pack.sequence`); without
it, attention is causal over the whole packed sequence, as in the reference code.

The config and presets live in `oqvl.model.config`, the vision tower in `oqvl.model.vision`.

Checkpoints: `save_pretrained(dir)` writes dir/model.safetensors (all weights, vision included,
tied embeddings stored once) and then dir/config.json (a `VLMConfig`, marks completion);
`OpenQwen2VL.from_pretrained(dir)` rebuilds it offline, without pickle.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.cache_utils import DynamicCache
from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchMerger

from ..io import write_text
from ..pack.sequence import document_attention_mask, document_position_ids
from .chat import IGNORE_INDEX
from .config import (
    CONFIG_FORMAT,
    VLMConfig,
    grid_side,
    lm_config_dict,
    load_preset,
    make_lm_config,
)
from .vision import (
    build_vision_tower,
    is_clip_checkpoint,
    load_vision_tower,
    patch_grid,
    vision_width,
)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint directory that is incomplete or whose weights do not fit its config."""


def check_weights(model: nn.Module, path: Path) -> None:
    """Every weight of `model` in the safetensors file at `path`, with its shape, and nothing else:
    checked from the file's header, before any tensor is read (a tied weight is stored once)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no weights file (an incomplete checkpoint)")
    try:
        with safe_open(str(path), "pt") as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (no keys view)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    tensors = model.state_dict()
    by_storage: dict[tuple, list[str]] = {}
    for name, t in tensors.items():
        by_storage.setdefault((t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)), []).append(name)
    missing = [names[0] for names in by_storage.values() if not any(n in stored for n in names)]
    unexpected = sorted(set(stored) - set(tensors))
    wrong = [f"{n} {list(stored[n])} in the file, {list(tensors[n].shape)} in the model"
             for n in tensors if n in stored and stored[n] != tuple(tensors[n].shape)]
    problems = ([f"shape of {wrong[0]}" + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else "")] if wrong else []) \
        + ([f"{len(missing)} weights missing (e.g. {missing[0]})"] if missing else []) \
        + ([f"{len(unexpected)} unexpected (e.g. {unexpected[0]})"] if unexpected else [])
    if problems:
        raise CheckpointError(f"{path}: weights do not fit {CONFIG_FILE}: " + "; ".join(problems))


def with_lm_depth(lm: dict, layers: int) -> dict:
    """An LM config's kwargs keeping its first `layers` decoder layers (0: all), its per-layer
    attention types cut to match."""
    d = {k: v for k, v in lm.items() if k not in ("transformers_version", "model_type")}
    if layers:
        d["num_hidden_layers"] = int(layers)
        if d.get("layer_types"):
            d["layer_types"] = d["layer_types"][:layers]
    return d


# transformers attention implementations, by how packed documents are isolated: a dense 4-D mask
# (sdpa, eager) or the kernel's own packed form from restarting positions (no T x T mask).
DENSE_MASK_ATTENTION = ("sdpa", "eager")
PACKED_ATTENTION = ("flex_attention", "flash_attention_2", "flash_attention_3")


def packs_documents(attn_implementation: str) -> bool:
    return attn_implementation in PACKED_ATTENTION or attn_implementation.startswith("flash")


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


def merged_tokens(h: int, w: int) -> int:
    """Visual tokens the 2x2 merger makes of an h x w patch grid: one per 2x2 block."""
    if h % 2 or w % 2:
        raise ValueError(f"merger2x2 merges 2x2 blocks of patches: the patch grid must have even sides, got {h}x{w}")
    return (h // 2) * (w // 2)


def merge_order(patch_grid: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N*h*w, C), the patches in the order PatchMerger's view(-1, 4C) merges:
    images, then 2x2 blocks row-major, then each block's 4 patches row-major (top-left, top-right,
    bottom-left, bottom-right), as Qwen2-VL's image processor lays patches out (`patchify`)."""
    N, C, h, w = patch_grid.shape
    blocks = patch_grid.reshape(N, C, h // 2, 2, w // 2, 2)  # (N, C, block row, dy, block col, dx)
    return blocks.permute(0, 2, 4, 3, 5, 1).reshape(-1, C)


class MergerProjector(nn.Module):
    """Qwen2-VL's adapter: transformers' PatchMerger on each 2x2 block of adjacent patches,
    LayerNorm(C) -> the 4 patches concatenated -> Linear(4C, 4C) -> GELU -> Linear(4C, D).
    `visual_tokens` is only checked: the count is the grid's, (h/2) x (w/2)."""

    def __init__(self, vision_dim: int, lm_dim: int):
        super().__init__()
        self.merger = PatchMerger(dim=lm_dim, context_dim=vision_dim, spatial_merge_size=2)

    def forward(self, patch_grid: torch.Tensor, visual_tokens: int) -> torch.Tensor:
        N, _, h, w = patch_grid.shape
        tokens = merged_tokens(h, w)
        if visual_tokens != tokens:
            raise ValueError(f"merger2x2 makes {tokens} visual tokens of a {h}x{w} patch grid, not {visual_tokens}")
        return self.merger(merge_order(patch_grid)).view(N, tokens, -1)


PROJECTOR_CLASSES = {"avgpool": Projector, "merger2x2": MergerProjector}  # by VLMConfig.projector


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
        if config.projector == "merger2x2":
            h, w = patch_grid(self.vision)
            tokens = merged_tokens(h, w)
            if (config.visual_tokens_pretrain, config.visual_tokens_sft) != (tokens, tokens):
                raise ValueError(
                    f"merger2x2 makes {tokens} visual tokens of the {h}x{w} patch grid in both stages: "
                    f"visual_tokens_pretrain and visual_tokens_sft must be {tokens}, got "
                    f"{config.visual_tokens_pretrain} and {config.visual_tokens_sft}")
        self.projector = PROJECTOR_CLASSES[config.projector](config.projector_in, config.projector_out)
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
        lm_layers: int = 0,
        vision_layers: int = 0,
        projector: str = "avgpool",
    ) -> OpenQwen2VL:
        """A fresh model from its parts (fp32).

        vision: a toy CLIP checkpoint directory (config.json + model.safetensors from
            oqvl.filter.train_clip), or an open_clip model name; with a name, `vision_pretrained`
            is a .safetensors file or a directory holding open_clip_model.safetensors (None: random).
        lm: a local Hugging Face directory of a Qwen2ForCausalLM (e.g. Qwen2.5-1.5B-Instruct),
            loaded offline; or a Qwen2Config (or its kwargs) for a freshly initialised LM.
        lm_layers, vision_layers: > 0 keeps only the first N decoder layers / tower blocks at full
            width (with their weights when loaded): the reduced-depth smoke configuration.
        projector: one of config.PROJECTORS; with merger2x2 both token counts must be the grid's.
        """
        vcfg, tower = load_vision_tower(vision, vision_pretrained, feature_layer=feature_layer,
                                        preprocess=preprocess, depth=vision_layers)

        if isinstance(lm, (Qwen2Config, dict)):
            lm_cfg = Qwen2Config(**with_lm_depth(lm.to_dict() if isinstance(lm, Qwen2Config) else lm, lm_layers))
            lm_cfg._attn_implementation = attn_implementation
            lm_model, lm_source = Qwen2ForCausalLM(lm_cfg), None
        else:
            lm_dir = Path(lm)
            if not (lm_dir / CONFIG_FILE).is_file():
                raise FileNotFoundError(f"{lm_dir} is not a local Hugging Face model directory "
                                        f"(no {CONFIG_FILE}); download the LM there first")
            published = json.loads((lm_dir / CONFIG_FILE).read_text())
            lm_model = Qwen2ForCausalLM.from_pretrained(
                str(lm_dir), local_files_only=True, dtype=torch.float32, attn_implementation=attn_implementation,
                config=Qwen2Config(**with_lm_depth(published, lm_layers)))
            lm_source = str(lm_dir)

        config = VLMConfig(
            vision=vcfg, lm=lm_config_dict(lm_model.config), image_token_id=image_token_id,
            visual_tokens_pretrain=visual_tokens_pretrain, visual_tokens_sft=visual_tokens_sft,
            projector_in=vision_width(tower), projector_out=lm_model.config.hidden_size,
            projector=projector, freeze_vision=freeze_vision, attn_implementation=attn_implementation,
            lm_source=lm_source)
        return cls(config, vision=tower, lm=lm_model)

    @classmethod
    def from_preset(cls, name: str, vision_weights=None, lm_path=None, random_init: bool = False,
                    **overrides) -> OpenQwen2VL:
        """A fresh model from a preset (model_configs/NAME.json).

        toy: vision_weights = the toy CLIP checkpoint directory (None: random tower); the LM is
        new from the preset's Qwen2Config unless lm_path is given.
        open-qwen2vl: vision_weights = the local SigLIP open_clip_model.safetensors (or its
        directory); lm_path = the local Qwen2.5-1.5B-Instruct directory (required), or
        random_init: the LM from its published config.json (`published_config`) with random
        weights, as the smoke tests and benchmarks build it (no download).
        """
        p = load_preset(name)
        v, lm = p["vision"], p["lm"]
        if random_init and lm_path is not None:
            raise ValueError("random_init builds the LM from its published config: give no lm_path")
        if random_init and "config" not in lm:
            if "published_config" not in lm:
                raise ValueError(f"preset {name}: no published_config to build a random LM from")
            lm = {**lm, "config": lm["published_config"]}
        if lm_path is None and "config" not in lm:
            raise ValueError(f"preset {name}: download {lm['hf_hub']} (revision {lm.get('revision')}) "
                             f"to a local directory and pass it as lm_path (or build it with random_init)")
        is_ckpt = is_clip_checkpoint(vision_weights)
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
        write_text(out / CONFIG_FILE, json.dumps(self.config.to_dict(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, ckpt_dir, device: str | torch.device = "cpu") -> OpenQwen2VL:
        """The model saved by save_pretrained; CheckpointError (one line naming the file) when the
        directory is not a complete checkpoint or its weights do not fit its config."""
        ckpt = Path(ckpt_dir)
        if not (ckpt / CONFIG_FILE).is_file():
            raise CheckpointError(f"{ckpt}: not a complete checkpoint (no {CONFIG_FILE})")
        try:
            config = VLMConfig.from_dict(json.loads((ckpt / CONFIG_FILE).read_text()))
        except (ValueError, TypeError, KeyError) as e:
            raise CheckpointError(f"{ckpt / CONFIG_FILE}: not a model config ({type(e).__name__}: {e})") from None
        model = cls(config)
        check_weights(model, ckpt / WEIGHTS_FILE)
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
        unchanged, and positions restarting per document. With the packed-attention kernels
        (PACKED_ATTENTION: flash-attention's varlen kernels, flex attention's block-sparse mask)
        no dense mask is built: the restarting positions alone make transformers isolate
        documents (flash: cu_seqlens; flex: a BlockMask), as the equivalence tests check.
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
            if packs_documents(self.lm.config._attn_implementation):
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
