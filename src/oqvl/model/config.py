"""What an Open-Qwen2VL model is made of: its config (saved as a checkpoint's config.json) and the
model presets (model_configs/NAME.json) that name the components of one scale.

A `VLMConfig` holds everything needed to rebuild a model with no registry and no network: the
open_clip vision tower's config (`VisionConfig`), the Qwen2 LM's config as a dict, the
<|image_pad|> id, the visual tokens per image in pretraining and SFT, and the projector's kind and
widths.

The projector is one of two designs (`PROJECTORS`, oqvl.model.vlm says how each maps patches to
tokens): `avgpool`, Open-Qwen2VL's, whose token count is chosen per stage (a square), and
`merger2x2`, Qwen2-VL's, whose token count is fixed by the patch grid, (h/2) x (w/2), in both stages.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import Qwen2Config

CONFIG_FORMAT = "oqvl-vlm/1"
PROJECTORS = ("avgpool", "merger2x2")
PRESET_DIR = Path(__file__).parent / "model_configs"

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
    """Visual tokens per image in pretraining (avgpool: a square, the pooled grid's cells;
    merger2x2: the merged grid's cells, (h/2) x (w/2))."""
    visual_tokens_sft: int
    """Visual tokens per image in SFT."""
    projector_in: int
    """Vision width C (channels of the patch grid)."""
    projector_out: int
    """LM hidden size D: the projector's output width."""
    projector: str = "avgpool"
    """One of PROJECTORS; a config.json without it (saved before the choice existed) is avgpool."""
    freeze_vision: bool = True
    attn_implementation: str = "sdpa"
    lm_source: str | None = None
    """Where the LM weights came from when the model was assembled (provenance only)."""

    def __post_init__(self):
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        if self.projector not in PROJECTORS:
            raise ValueError(f"projector must be one of {PROJECTORS}, got {self.projector!r}")
        if self.projector == "avgpool":  # the merger's count is the tower's, checked by the model
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


def frames_images(projector: str) -> bool:
    """Whether an image's tokens are framed by <|vision_start|> ... <|vision_end|>: Qwen2-VL's
    layout, part of its merger design; Open-Qwen2VL's avgpool layout has the image tokens alone."""
    return projector == "merger2x2"


def lm_config_dict(cfg: Qwen2Config) -> dict:
    d = cfg.to_dict()
    for k in _LM_CONFIG_NOISE:
        d.pop(k, None)
    return d


def make_lm_config(d: dict, attn_implementation: str) -> Qwen2Config:
    # Imported here: oqvl.model.chat imports this module and stays light (no transformers).
    from transformers import Qwen2Config

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
