"""A tiny Open-Qwen2VL release in the real prismatic-vlms layout, for tests that need one.

    root = tmp_path / "tiny"
    run_dir = write_tiny_release(root)             # root/release: config.json, config.yaml,
                                                   #   checkpoints/latest-checkpoint.pt
    model = convert_tiny_release(root, tmp_path / "ckpt")   # -> OpenQwen2VL, ckpt/ ready for
                                                   #   OpenQwen2VL.from_pretrained / lmms-eval

which is `oqvl.model.prismatic.convert(run_dir, out, lm=root / "qwen2",
vision_weights=root / "siglip" / "open_clip_model.safetensors", vision=TINY_VISION)`.

Next to the release, as the real conversion needs them: root/qwen2 (the base LLM directory: a tiny
Qwen2 config.json and a toy Qwen2-format tokenizer) and root/siglip (the frozen tower's open_clip
weights). The weights are random, the key names and nesting are the reference's: its modules are
mirrored here by attribute name (`llm`, `mlp_projector`, `featurizer`), so their state dicts carry
the released keys. The tower is timm's test_vit3, SigLIP-like (no class token, attention-pool
head), 160 px: a 10x10 patch grid, pooled to 5x5 = 25 tokens ("full-align+25-avgpool").
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import open_clip
import timm
import torch
import yaml
from safetensors.torch import save_file
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM

from oqvl.model.prismatic import convert
from oqvl.model.tokenizer import SPECIAL_TOKENS, build_qwen2_tokenizer

TINY_VISION = "oqvl-tiny-siglip-test"  # an open_clip config around timm's test_vit3
TIMM_TRUNK = "test_vit3"
IMAGE_SIZE = 160
VISION_WIDTH = 96
VISUAL_TOKENS = 25
ARCH = f"full-align+{VISUAL_TOKENS}-avgpool"
TOY_BPE = 512
TOKENIZER_LEN = TOY_BPE + len(SPECIAL_TOKENS)  # 534, before the two added tokens
VOCAB_ROWS = 544  # more rows than tokens, as Qwen2.5's 151936 rows for 151665 tokens
LM = {"vocab_size": VOCAB_ROWS, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
      "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
      "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
      "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}


# Stand-ins with the reference modules' attribute names, so state_dict() gives its keys.
class LLMBackbone(nn.Module):  # base_llm.py: the HF causal LM as `llm`
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.llm = Qwen2ForCausalLM(cfg)


class AvgPoolProjector(nn.Module):  # nn_utils.py: `sampler`, `mlp_projector` (layer_num=2)
    def __init__(self, vision_dim: int, lm_dim: int, tokens: int):
        super().__init__()
        self.sampler = nn.AdaptiveAvgPool2d(round(tokens ** 0.5))
        self.mlp_projector = nn.Sequential(nn.Linear(vision_dim, lm_dim), nn.GELU(),
                                           nn.Linear(lm_dim, lm_dim))


class VisionBackbone(nn.Module):  # base_vision.py: the timm ViT as `featurizer`
    def __init__(self):
        super().__init__()
        self.featurizer = timm.create_model(TIMM_TRUNK, pretrained=False, num_classes=0)
        # test_vit3's layer scales start at 1e-5, which would make every block's output alike
        # (SigLIP has none); at ~1 the feature layer a test compares is a distinct one
        with torch.no_grad():
            for name, p in self.featurizer.named_parameters():
                if name.endswith(".gamma"):
                    p.uniform_(0.5, 1.5)


def register_tiny_vision(root: Path) -> None:
    """Make TINY_VISION known to open_clip (converting builds the tower from its config)."""
    path = Path(root) / "open_clip" / f"{TINY_VISION}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "embed_dim": VISION_WIDTH,
        "vision_cfg": {"image_size": IMAGE_SIZE, "timm_model_name": TIMM_TRUNK,
                       "timm_model_pretrained": False, "timm_pool": "map", "timm_proj": "none"},
        "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 64, "heads": 2, "layers": 1}}))
    open_clip.add_model_config(path)


def run_config(with_vision_backbone: bool) -> dict:
    """The run's config as the reference dumps it (draccus -> yaml -> json), Open-Qwen2VL's values."""
    stage = "full-finetune" if with_vision_backbone else "finetune"
    model_id = "qwen2.5-1.5b-instruct-continue-training-tiny"
    return {
        "model": {
            "type": "one-stage+7b", "model_id": model_id, "arch_specifier": ARCH,
            "vision_backbone_id": "siglip-vit-so400m-384px", "llm_backbone_id": "qwen2.5-1.5b-instruct",
            "image_resize_strategy": "resize-naive", "llm_max_length": 4096,
            "finetune_global_batch_size": 128, "finetune_per_device_batch_size": 2,
            "finetune_train_strategy": "fsdp-full-shard", "enable_gradient_checkpointing": True,
            "enable_mixed_precision_training": True, "reduce_in_full_precision": False,
        },
        "dataset": {"type": "llava-v15", "dataset_id": "llava-v15"},
        "stage": stage,
        "pretrained_checkpoint": "checkpoints/pretrain/checkpoints/latest-checkpoint.pt",
        "run_id": f"{model_id}+stage-{stage}+x7", "run_root_dir": "checkpoints", "seed": 7,
        "mount_path": "Qwen", "trackers": ["jsonl", "wandb"], "wandb_project": "mmpretrain",
        "wandb_entity": None,
    }


def write_tiny_release(root, with_vision_backbone: bool = False, seed: int = 0) -> Path:
    """Write root/release (the run directory), root/qwen2 and root/siglip; return the run directory.

    with_vision_backbone: the checkpoint also holds the tower (as when it was trained), with other
    weights than root/siglip's pretrained ones.
    """
    root = Path(root)
    register_tiny_vision(root)
    torch.manual_seed(seed)
    lm_cfg = Qwen2Config(**LM)
    llm, projector = LLMBackbone(lm_cfg), AvgPoolProjector(VISION_WIDTH, LM["hidden_size"], VISUAL_TOKENS)
    pretrained_tower = VisionBackbone()

    base = root / "qwen2"
    build_qwen2_tokenizer(base, vocab_size=TOY_BPE)
    lm_cfg.save_pretrained(base)
    (root / "siglip").mkdir(parents=True, exist_ok=True)
    save_file({f"visual.trunk.{k}": v.contiguous() for k, v in pretrained_tower.featurizer.state_dict().items()},
              str(root / "siglip" / "open_clip_model.safetensors"))

    modules = {"projector": OrderedDict(projector.state_dict()),
               "llm_backbone": OrderedDict(llm.state_dict())}
    if with_vision_backbone:
        modules = {"vision_backbone": OrderedDict(VisionBackbone().state_dict()), **modules}
    run = root / "release"
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    cfg = run_config(with_vision_backbone)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (run / "config.json").write_text(json.dumps(cfg, indent=2))
    name = "step-000010-epoch-00-loss=1.2345.pt"
    torch.save({"model": modules}, run / "checkpoints" / name)
    (run / "checkpoints" / "latest-checkpoint.pt").write_bytes((run / "checkpoints" / name).read_bytes())
    return run


def convert_tiny_release(root, out, **kwargs):
    """Convert root's tiny release (written by write_tiny_release) into `out`; the OpenQwen2VL."""
    root = Path(root)
    register_tiny_vision(root)
    run = root / "release"
    # the stage it was written for says whether the checkpoint holds the tower (see run_config)
    has_tower = json.loads((run / "config.json").read_text())["stage"] == "full-finetune"
    kwargs.setdefault("vision_weights", None if has_tower else root / "siglip" / "open_clip_model.safetensors")
    return convert(run, out, lm=root / "qwen2", vision=TINY_VISION, **kwargs)
