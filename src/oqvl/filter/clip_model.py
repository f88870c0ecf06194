"""CLIP models for the CLIP-score filter, built and loaded through open_clip at every scale.

Toy scale registers a tiny native open_clip ViT (model_configs/toy-vit-p8-sigmoid.json) and
loads the checkpoint directory that `train_clip` writes; paper scale passes a real open_clip model
name and a pretrained tag or weights file. Both end in `open_clip.create_model_and_transforms`,
so the filter code path is the same.

The toy model: 64 px images in 8 px patches (an 8x8 grid, so `model.visual` doubles as a frozen
vision encoder with a patch grid), its embedding the mean of the patch tokens (pool_type "avg",
not a class token: the contrastive loss then trains the very tokens a VLM reads, and it learned
faster here), a small causal text tower on open_clip's bundled CLIP BPE
tokenizer (offline), and a SigLIP-style sigmoid loss (`init_logit_bias`). Sigmoid rather than
softmax CLIP loss because every image-text cell is its own binary "does this caption fit" term:
hard-negative captions join as extra columns labelled negative with no softmax to rebalance,
the loss does not depend on batch size (small CPU batches), and it matches the SigLIP vision
encoder the paper's VLM uses. Its name must not contain "siglip": open_clip's get_tokenizer
would then pick the SigLIP sentencepiece tokenizer, which needs the hub.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from ..io import write_text


def _import_open_clip():
    """open_clip, imported with wandb hidden: timm (under open_clip) imports wandb eagerly for a
    logger this project never uses, 4-6 s of every process's start-up. A later `import wandb` works."""
    if "wandb" in sys.modules:  # already imported (or hidden) by someone else: nothing to save
        import open_clip
        return open_clip
    sys.modules["wandb"] = None  # `import wandb` raises ImportError, and timm goes on without it
    try:
        import open_clip
    finally:
        del sys.modules["wandb"]
    return open_clip


open_clip = _import_open_clip()

TOY_MODEL = "toy-vit-p8-sigmoid"
MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def register_model_configs() -> None:
    """Make the packaged toy configs known to open_clip (idempotent)."""
    if TOY_MODEL not in open_clip.list_models():
        open_clip.add_model_config(MODEL_CONFIG_DIR)


register_model_configs()


def model_config(model_name: str = TOY_MODEL) -> dict:
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise KeyError(f"open_clip has no model config {model_name!r}")
    return cfg


def save_checkpoint(model, out_dir, meta: dict) -> None:
    """Write OUT/model.safetensors, then OUT/config.json (meta plus the model's name and config);
    config.json goes last, so its presence marks a complete checkpoint."""
    if "model_name" not in meta:
        raise ValueError("meta needs the model_name the weights belong to")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    if "model_cfg" not in meta:
        meta = {**meta, "model_cfg": model_config(meta["model_name"])}
    write_text(out / CONFIG_FILE, json.dumps(meta, indent=2) + "\n")


def _is_checkpoint_dir(path) -> bool:
    return path is not None and (Path(path) / CONFIG_FILE).is_file()


def tag_settings(model_name: str, tag: str | None) -> dict:
    """create_model_and_transforms kwargs that make a local copy of open_clip's `tag` weights load
    as open_clip itself would load the tag: its activation and its preprocessing.

    OpenAI's CLIP weights were trained with QuickGELU; open_clip builds that only for a
    `-quickgelu` config or when it fetches the `openai` tag itself. A local file of those weights
    under plain `ViT-L-14` would run GELU and score wrongly, so the tag's `quick_gelu` forces it;
    a `-quickgelu` config with weights trained with GELU is refused."""
    if tag is None:
        return {}
    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not cfg:
        raise ValueError(f"open_clip has no pretrained tag {tag!r} for {model_name!r} "
                         f"(its tags: {', '.join(open_clip.list_pretrained_tags_by_model(model_name))})")
    quick = bool(cfg.get("quick_gelu", False))
    if model_config(model_name).get("quick_gelu", False) and not quick:
        raise ValueError(f"{model_name} builds QuickGELU but the {tag!r} weights were trained with GELU: "
                         f"use {model_name.removesuffix('-quickgelu')}")
    out = {"force_quick_gelu": True} if quick else {}
    for key in ("mean", "std", "interpolation", "resize_mode"):
        if key in cfg:
            out[f"image_{key}"] = cfg[key]
    return out


def load_clip(model_name: str, pretrained: str | None, device="cpu", tag: str | None = None):
    """(model in eval mode, inference preprocess, tokenizer).

    - a toy checkpoint directory (config.json + model.safetensors from train_clip), given as
      `pretrained` (or as `model_name`, with `pretrained` None);
    - an open_clip model name and a pretrained tag or local weights file, e.g.
      ("ViT-L-14", "datacomp_xl_s13b_b90k"); pretrained None gives random weights. `tag`: the
      open_clip tag a local weights file is a copy of (`tag_settings`).
    """
    if pretrained is None and _is_checkpoint_dir(model_name):
        model_name, pretrained = None, model_name
    overrides, context_length = {}, None
    if _is_checkpoint_dir(pretrained):
        ckpt = Path(pretrained)
        meta = json.loads((ckpt / CONFIG_FILE).read_text())
        if model_name is not None and model_name != meta["model_name"]:
            raise ValueError(f"{ckpt} holds {meta['model_name']!r}, not {model_name!r}")
        model_name = meta["model_name"]
        # Build the architecture the weights were trained with, even if the packaged JSON has
        # changed since: open_clip lets constructor kwargs override the registered config.
        overrides = {k: v for k, v in meta["model_cfg"].items() if k != "custom_text"}
        context_length = meta["model_cfg"]["text_cfg"]["context_length"]
        pretrained = str(ckpt / WEIGHTS_FILE)  # .safetensors: open_clip loads it without pickle
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=pretrained, device=device, **overrides, **tag_settings(model_name, tag)
    )
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(model_name, context_length=context_length)


def image_batch(preprocess, images: list[Image.Image]) -> torch.Tensor:
    return torch.stack([preprocess(im.convert("RGB")) for im in images])


@torch.inference_mode()
def score_pairs(
    model, preprocess, tokenizer, images: list[Image.Image], captions: list[str], device="cpu",
    batch_size: int = 256,
) -> np.ndarray:
    """Cosine similarity of the L2-normalised image and text embeddings of each pair."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    model.eval()
    scores = []
    for start in range(0, len(images), batch_size):
        x = image_batch(preprocess, images[start:start + batch_size]).to(device)
        t = tokenizer(list(captions[start:start + batch_size])).to(device)
        img = model.encode_image(x, normalize=True)
        txt = model.encode_text(t, normalize=True)
        scores.append((img * txt).sum(-1).float().cpu().numpy())
    return np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32)
