"""The vision tower of Open-Qwen2VL: an open_clip visual tower alone, built and loaded offline.

Two kinds of weights give a tower:
- a toy CLIP checkpoint directory (config.json + model.safetensors, as `oqvl.filter.train_clip`
  writes it): its `visual.*` weights and the architecture they were trained with;
- an open_clip model name (e.g. `ViT-SO400M-14-SigLIP-384`, timm-backed) with a local
  .safetensors file, or a directory holding open_clip_model.safetensors (none: random weights).

Only .safetensors weights are read (no pickle), and timm never fetches weights. The tower's
patch grid (its `forward_intermediates` at `feature_layer`) is what the projector pools.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..filter.clip_model import CONFIG_FILE as CLIP_CONFIG_FILE
from ..filter.clip_model import WEIGHTS_FILE as CLIP_WEIGHTS_FILE
from ..filter.clip_model import open_clip, register_model_configs
from .config import VisionConfig

register_model_configs()  # the toy open_clip config must be known before any tower is built

OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"  # the file name in open_clip's hub repositories


def is_clip_checkpoint(path: str | os.PathLike | None) -> bool:
    """A toy CLIP checkpoint directory (not an open_clip model name or weights file)."""
    return path is not None and (Path(path) / CLIP_CONFIG_FILE).is_file()


def load_vision_tower(vision: str | os.PathLike, vision_pretrained: str | os.PathLike | None = None, *,
                      feature_layer: int = -1, preprocess: dict | None = None, depth: int = 0
                      ) -> tuple[VisionConfig, nn.Module]:
    """(config, tower) from a toy CLIP checkpoint directory, or from an open_clip model name with
    `vision_pretrained` weights (None: random); `preprocess` None: what open_clip would use;
    `depth` > 0 keeps only the first `depth` blocks (and their weights)."""
    if is_clip_checkpoint(vision):
        vision_path = Path(vision)
        meta = json.loads((vision_path / CLIP_CONFIG_FILE).read_text())
        name, source = meta["model_name"], str(vision_path)
        model_cfg = {k: meta["model_cfg"][k] for k in ("embed_dim", "vision_cfg", "quick_gelu")
                     if k in meta["model_cfg"]}
        state = read_open_clip_visual_state(vision_path / CLIP_WEIGHTS_FILE)
    else:
        name, model_cfg = str(vision), open_clip_tower_config(str(vision))
        source = None if vision_pretrained is None else str(vision_pretrained)
        state = None if vision_pretrained is None else read_open_clip_visual_state(vision_pretrained)
    vcfg = with_depth(VisionConfig(open_clip_model=name, model_cfg=model_cfg, feature_layer=feature_layer,
                                   preprocess=preprocess or default_preprocess(name, model_cfg), source=source),
                      depth)
    tower = build_vision_tower(vcfg)
    if state is not None:
        if depth:
            state = drop_removed_blocks(state, depth)
        tower.load_state_dict(state, strict=True)
    return vcfg, tower


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
    # open_clip passes no activation to timm; a tower converted from another port names its own
    # (transformers' SigLIP: gelu_tanh where timm's SigLIP has the exact GELU)
    act = vision_cfg.pop("timm_act_layer", None)
    depth = vision_cfg.pop("depth", None)  # reduced-depth smoke configurations: the first N blocks
    if vision_cfg.get("timm_model_name"):
        vision_cfg["timm_model_pretrained"] = False  # never fetch timm weights; ours are loaded after
    tower = _build_vision_tower(mc["embed_dim"], vision_cfg, quick_gelu=mc.get("quick_gelu", False))
    if act is not None:
        set_timm_activation(tower, act)
    if depth is not None:
        keep_blocks(tower, int(depth))
    return tower


def tower_blocks(tower: nn.Module) -> nn.Sequential:
    """The transformer blocks of an open_clip tower (timm trunk or native ViT)."""
    trunk = getattr(tower, "trunk", None)
    return trunk.blocks if trunk is not None else tower.transformer.resblocks


def keep_blocks(tower: nn.Module, n: int) -> None:
    """Keep the first n blocks (full width): the published architecture at reduced depth."""
    blocks = tower_blocks(tower)
    if not 1 <= n <= len(blocks):
        raise ValueError(f"vision depth {n} outside 1..{len(blocks)}")
    trunk = getattr(tower, "trunk", None)
    if trunk is not None:
        trunk.blocks = blocks[:n]
        if hasattr(trunk, "feature_info"):
            trunk.feature_info = trunk.feature_info[:n]
    else:
        tower.transformer.resblocks = blocks[:n]
        tower.transformer.layers = n


def with_depth(vcfg: VisionConfig, depth: int) -> VisionConfig:
    """The same tower config with only its first `depth` blocks (0: unchanged)."""
    if not depth:
        return vcfg
    model_cfg = json.loads(json.dumps(vcfg.model_cfg))
    model_cfg["vision_cfg"]["depth"] = int(depth)
    return dataclasses.replace(vcfg, model_cfg=model_cfg)


def drop_removed_blocks(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """A full tower's weights for its first `depth` blocks (the rest dropped)."""
    pattern = re.compile(r"^(?:trunk\.blocks|transformer\.resblocks)\.(\d+)\.")
    return {k: v for k, v in state.items() if not ((m := pattern.match(k)) and int(m.group(1)) >= depth)}


def set_timm_activation(tower: nn.Module, act: str) -> None:
    """Every GELU of a timm trunk replaced by timm's activation `act` (no weights change)."""
    from timm.layers import get_act_layer

    trunk = getattr(tower, "trunk", None)
    if trunk is None:
        raise ValueError(f"timm_act_layer {act!r} needs a timm trunk")
    layer = get_act_layer(act)
    for module in list(trunk.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.GELU):
                setattr(module, name, layer())


def vision_width(visual: nn.Module) -> int:
    """Channels C of the tower's patch grid (timm trunk or native open_clip ViT)."""
    trunk = getattr(visual, "trunk", None)
    if trunk is not None:
        return int(trunk.num_features)
    return int(visual.transformer.width)


def patch_grid(visual: nn.Module) -> tuple[int, int]:
    """(h, w) of the tower's patch grid (timm trunk or native open_clip ViT)."""
    trunk = getattr(visual, "trunk", None)
    h, w = trunk.patch_embed.grid_size if trunk is not None else visual.grid_size
    return int(h), int(w)


def read_open_clip_visual_state(path) -> dict[str, torch.Tensor]:
    """The `visual.*` weights of an open_clip checkpoint (.safetensors file, or a directory holding
    model.safetensors or open_clip_model.safetensors), prefix stripped."""
    path = Path(path)
    if path.is_dir():
        for name in (CLIP_WEIGHTS_FILE, OPEN_CLIP_WEIGHTS):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise FileNotFoundError(f"{path} holds neither {CLIP_WEIGHTS_FILE} nor {OPEN_CLIP_WEIGHTS}")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: only .safetensors weights are loaded (no pickle); convert it first")
    with safe_open(str(path), framework="pt") as f:
        state = {k[len("visual."):]: f.get_tensor(k) for k in f.keys() if k.startswith("visual.")}  # noqa: SIM118
    if not state:
        raise ValueError(f"{path} has no visual.* weights: not an open_clip CLIP checkpoint")
    return state
