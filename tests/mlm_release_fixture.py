"""A tiny released MLM-Filter in the real LLaVA-Unified layout, for tests that need one.

    release, vision = write_tiny_mlm_release(tmp_path / "tiny")   # tiny/release, tiny/siglip
    model = convert(release, vision, tmp_path / "ckpt", vision_arch=TINY_VISION)

tiny/release is what `load_pretrained_model` reads (a LlavaQwen config.json with the mm_* fields,
model.safetensors with its key names, tokenizer files); tiny/siglip is a SiglipModel folder
(config.json, model.safetensors with vision_model.* and text_model.* keys,
preprocessor_config.json), as google/siglip-so400m-patch14-384 is. The weights are random and
made by transformers' own classes: Qwen2ForCausalLM (its state dict is LlavaQwen's but for the
projector, added under model.mm_projector) and SiglipModel. The tower is 56 px with 14 px patches:
a 4x4 grid, pooled to 2x2 = 4 tokens (aapool_mlp, mm_num_image_tokens 4). Its timm twin is a
registered 3-block SigLIP-shaped ViT with an open_clip config around it (TINY_VISION).
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import timm
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipConfig, SiglipImageProcessor, SiglipModel

from oqvl.model.tokenizer import build_qwen2_tokenizer

TINY_VISION = "oqvl-tiny-hf-siglip-test"
TIMM_TRUNK = "oqvl_test_siglip_56"
IMAGE_SIZE, PATCH, WIDTH, LAYERS, HEADS, MLP = 56, 14, 32, 3, 2, 48
VISUAL_TOKENS = 4
TOY_BPE = 512
ROWS = 544  # more rows than tokens, as Qwen2.5's 151936 rows for 151665 tokens
LM = {"vocab_size": ROWS, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
      "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
      "rms_norm_eps": 1e-6, "tie_word_embeddings": True}
VISION = {"hidden_size": WIDTH, "intermediate_size": MLP, "num_hidden_layers": LAYERS,
          "num_attention_heads": HEADS, "image_size": IMAGE_SIZE, "patch_size": PATCH}
TEXT = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "vocab_size": 64, "max_position_embeddings": 16, "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": 0}


def register_tiny_vision(root: Path) -> None:
    """The timm trunk (SigLIP's shape: no class token, no layer scale, attention-pool head) and
    an open_clip config around it, so the converter can build the twin of the tiny SigLIP."""
    if TIMM_TRUNK not in timm.list_models(TIMM_TRUNK):
        from timm.models import register_model
        from timm.models.vision_transformer import VisionTransformer

        def oqvl_test_siglip_56(pretrained=False, **kwargs):
            return VisionTransformer(**{"img_size": IMAGE_SIZE, "patch_size": PATCH, "embed_dim": WIDTH,
                                        "depth": LAYERS, "num_heads": HEADS, "mlp_ratio": MLP / WIDTH,
                                        "class_token": False, "global_pool": "map",
                                        **{k: v for k, v in kwargs.items() if k in ("num_classes", "global_pool")}})
        register_model(oqvl_test_siglip_56)
    path = Path(root) / "open_clip" / f"{TINY_VISION}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "embed_dim": WIDTH,
        "vision_cfg": {"image_size": IMAGE_SIZE, "timm_model_name": TIMM_TRUNK,
                       "timm_model_pretrained": False, "timm_pool": "map", "timm_proj": "none"},
        "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}}))
    open_clip.add_model_config(path)


def release_config(lm_cfg: Qwen2Config, **overrides) -> dict:
    """config.json as LLaVA-Unified training saves a LlavaQwenConfig (transformers 4.x names)."""
    d = lm_cfg.to_dict()
    d.pop("rope_parameters", None)
    d.update({"model_type": "llava_qwen", "architectures": ["LlavaQwenForCausalLM"],
              "rope_theta": 10000.0, "rope_scaling": None, "use_cache": True,
              "mm_vision_tower": "google/siglip-so400m-patch14-384", "mm_projector_type": "aapool_mlp",
              "mm_hidden_size": WIDTH, "mm_num_image_tokens": VISUAL_TOKENS,
              "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
              "mm_patch_merge_type": "flat", "mm_use_im_start_end": False,
              "image_aspect_ratio": "pad", "tokenizer_padding_side": "right",
              "tokenizer_model_max_length": 2048, "use_mm_proj": True, "tune_mm_mlp_adapter": False})
    d.update(overrides)
    return d


def write_tiny_mlm_release(root, seed: int = 0, vision_in_checkpoint: bool = True,
                           **config_overrides) -> tuple[Path, Path]:
    """Write root/release and root/siglip; return both. vision_in_checkpoint: the checkpoint also
    holds a copy of the tower (other weights), as a LLaVA training run saves it."""
    root = Path(root)
    register_tiny_vision(root)
    torch.manual_seed(seed)
    siglip = SiglipModel(SiglipConfig(vision_config=VISION, text_config=TEXT))
    with torch.no_grad():  # transformers' init leaves norms at 1/0 and biases at 0: make them count
        for name, p in siglip.vision_model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    vision = root / "siglip"
    siglip.save_pretrained(vision)
    SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(vision)

    lm_cfg = Qwen2Config(**LM)
    lm = Qwen2ForCausalLM(lm_cfg)
    projector = nn.Sequential(nn.Linear(WIDTH, LM["hidden_size"]), nn.GELU(),
                              nn.Linear(LM["hidden_size"], LM["hidden_size"]))
    state = {k: v for k, v in lm.state_dict().items() if k != "lm_head.weight"}  # tied: stored once
    state.update({f"model.mm_projector.mlp_projector.{k}": v for k, v in projector.state_dict().items()})
    if vision_in_checkpoint:
        other = SiglipModel(SiglipConfig(vision_config=VISION, text_config=TEXT)).vision_model
        state.update({f"model.vision_tower.vision_tower.vision_model.{k}": v
                      for k, v in other.state_dict().items()})
    release = root / "release"
    release.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(release / "model.safetensors"),
              metadata={"format": "pt"})
    build_qwen2_tokenizer(release, vocab_size=TOY_BPE)
    (release / "config.json").write_text(json.dumps(release_config(lm_cfg, **config_overrides), indent=2))
    return release, vision
