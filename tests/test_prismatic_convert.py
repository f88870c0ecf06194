"""Converting Open-Qwen2VL's released checkpoint (prismatic-vlms layout) into ours, on a tiny release
with the real key names, nesting and file format (tests/prismatic_fixture.py)."""

import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import timm
import torch
from PIL import Image
from prismatic_fixture import (
    ARCH,
    IMAGE_SIZE,
    LM,
    TOKENIZER_LEN,
    VISION_WIDTH,
    VISUAL_TOKENS,
    VOCAB_ROWS,
    AvgPoolProjector,
    LLMBackbone,
    VisionBackbone,
    convert_tiny_release,
    write_tiny_release,
)
from safetensors.torch import load_file
from torchvision.transforms import Compose, Resize
from transformers import Qwen2Config

from oqvl.model import prismatic
from oqvl.model.prismatic import KEY_MAP, visual_tokens_of
from oqvl.model.tokenizer import IMAGE_TOKEN, load_tokenizer
from oqvl.model.vlm import OpenQwen2VL


def checkpoint_of(run_dir):
    return run_dir / "checkpoints" / "latest-checkpoint.pt"


def modules_of(run_dir):
    return torch.load(checkpoint_of(run_dir), map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return root, write_tiny_release(root)


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory):
    root, _ = release
    out = tmp_path_factory.mktemp("ckpt")
    convert_tiny_release(root, out)
    return out


def reference_modules(run_dir, root):
    """The reference's modules with the release's weights (the tower: the pretrained file's)."""
    m = modules_of(run_dir)
    llm = LLMBackbone(Qwen2Config.from_pretrained(root / "qwen2"))
    llm.load_state_dict(m["llm_backbone"])
    proj = AvgPoolProjector(VISION_WIDTH, LM["hidden_size"], VISUAL_TOKENS)
    proj.load_state_dict(m["projector"])
    vis = VisionBackbone()
    if "vision_backbone" in m:
        vis.load_state_dict(m["vision_backbone"])
    else:
        pre = load_file(root / "siglip" / "open_clip_model.safetensors")
        vis.load_state_dict({"featurizer." + k[len("visual.trunk."):]: v for k, v in pre.items()})
    return llm.eval(), proj.eval(), vis.eval()


def assert_weights_follow_the_key_map(model, modules, vision_file=None):
    ours = model.state_dict()
    used = set()
    for module, sd in modules.items():
        for key, tensor in sd.items():
            rule = next(r for r in KEY_MAP if r.module == module and key.startswith(r.ref))
            target = rule.ours + key[len(rule.ref):]
            assert torch.equal(ours[target], tensor.float()), (module, key)
            used.add(target)
    for key, tensor in (vision_file or {}).items():
        target = "vision." + key[len("visual."):]
        assert torch.equal(ours[target], tensor), key
        used.add(target)
    assert used == set(ours)


# ------------------------------------------------------------------------------------ conversion

def test_release_layout_is_the_references(release):
    _, run = release
    assert (run / "config.json").is_file() and (run / "config.yaml").is_file()
    m = modules_of(run)
    assert set(m) == {"projector", "llm_backbone"}
    assert set(m["projector"]) == {f"mlp_projector.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    assert "llm.model.layers.0.self_attn.q_proj.weight" in m["llm_backbone"]
    assert "llm.lm_head.weight" in m["llm_backbone"]  # the tied head is repeated in a state dict


def test_converted_weights_equal_the_release_through_the_key_map(release, converted):
    root, run = release
    model = OpenQwen2VL.from_pretrained(converted)
    assert model.lm.lm_head.weight.data_ptr() == model.lm.model.embed_tokens.weight.data_ptr()
    assert_weights_follow_the_key_map(model, modules_of(run),
                                      load_file(root / "siglip" / "open_clip_model.safetensors"))
    c = model.config
    assert c.visual_tokens_pretrain == c.visual_tokens_sft == VISUAL_TOKENS
    assert c.vision.feature_layer == -2 and c.lm["vocab_size"] == VOCAB_ROWS
    assert c.image_token_id == load_tokenizer(converted).convert_tokens_to_ids(IMAGE_TOKEN)


def test_forward_matches_the_reference_computation(release, converted):
    """Second-to-last block's patches -> pool -> MLP, spliced between the text embeddings, through the
    LM: the reference's steps on its own modules give our model's logits."""
    root, run = release
    llm, proj, vis = reference_modules(run, root)
    model = OpenQwen2VL.from_pretrained(converted).eval()
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = vis.featurizer.get_intermediate_layers(x, n={len(vis.featurizer.blocks) - 2})[0]
        n, hw, c = feats.shape
        side = round(hw ** 0.5)
        grid = feats.transpose(1, 2).reshape(n, c, side, side)
        ref_tokens = proj.mlp_projector(proj.sampler(grid).flatten(2).transpose(1, 2))
        ours_tokens = model.encode_images(x)
        assert ours_tokens.shape == (2, VISUAL_TOKENS, LM["hidden_size"])
        assert torch.allclose(ours_tokens, ref_tokens, atol=1e-5)

        bos, img = TOKENIZER_LEN + 1, model.config.image_token_id  # <s>, <|image_pad|>
        before, after = [bos, 10, 11], [12, 13, 14]
        embed = llm.llm.get_input_embeddings()
        ref_embeds = torch.cat([embed(torch.tensor(before)), ref_tokens[0], embed(torch.tensor(after))])
        ref_logits = llm.llm(inputs_embeds=ref_embeds[None]).logits[0]
        ids = torch.tensor([before + [img] * VISUAL_TOKENS + after])
        hidden = model(ids, x[:1]).hidden_states
        assert torch.allclose(model.lm.lm_head(hidden)[0], ref_logits, atol=1e-4)


def test_image_preprocessing_matches_the_references(converted):
    """resize-naive: timm's eval transform of the tower with its resize made a squash to the size."""
    model = OpenQwen2VL.from_pretrained(converted)
    trunk = VisionBackbone().featurizer
    data = timm.data.resolve_model_data_config(trunk)
    data["input_size"] = (3, IMAGE_SIZE, IMAGE_SIZE)
    default = timm.data.create_transform(**data, is_training=False)
    ref = Compose([Resize((IMAGE_SIZE, IMAGE_SIZE), interpolation=default.transforms[0].interpolation),
                   *default.transforms[1:]])
    g = torch.Generator().manual_seed(1)
    image = Image.fromarray(torch.randint(0, 256, (90, 210, 3), generator=g, dtype=torch.uint8).numpy())
    ours = model.image_transform()(image)
    assert ours.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.allclose(ours, ref(image), atol=1e-6)


def test_tokenizer_gets_the_references_added_tokens_and_bos(release, converted):
    root, _ = release
    base, tok = load_tokenizer(root / "qwen2"), load_tokenizer(converted)
    assert len(base) == TOKENIZER_LEN and len(tok) == TOKENIZER_LEN + 2 <= VOCAB_ROWS
    assert tok.convert_tokens_to_ids(["<|endofchunk|>", "<s>"]) == [TOKENIZER_LEN, TOKENIZER_LEN + 1]
    assert tok.bos_token == "<s>" and tok.bos_token_id == TOKENIZER_LEN + 1
    assert tok.model_max_length == 4096
    text = "<s>Describe the image.<|endofchunk|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == TOKENIZER_LEN + 1 and ids[-1] == TOKENIZER_LEN
    # every other id, specials included, is the base tokenizer's; no BOS is added by itself
    plain = "<|im_start|>user\nhi<|im_end|>"
    assert tok(plain)["input_ids"] == base(plain)["input_ids"]
    assert tok.eos_token == base.eos_token and tok.pad_token == base.pad_token


def test_release_with_a_trained_tower_takes_it_from_the_checkpoint(tmp_path):
    run = write_tiny_release(tmp_path / "tiny", with_vision_backbone=True, seed=1)
    modules = modules_of(run)
    assert "featurizer.attn_pool.latent" in modules["vision_backbone"]
    model = convert_tiny_release(tmp_path / "tiny", tmp_path / "ckpt")
    assert_weights_follow_the_key_map(model, modules)
    loaded = OpenQwen2VL.from_pretrained(tmp_path / "ckpt")
    pretrained = load_file(tmp_path / "tiny" / "siglip" / "open_clip_model.safetensors")
    key = "blocks.0.attn.qkv.weight"
    assert torch.equal(loaded.vision.trunk.state_dict()[key], modules["vision_backbone"]["featurizer." + key])
    assert not torch.equal(loaded.vision.trunk.state_dict()[key], pretrained["visual.trunk." + key])
    with pytest.raises(ValueError, match="holds vision_backbone"):
        convert_tiny_release(tmp_path / "tiny", tmp_path / "ckpt2",
                             vision_weights=tmp_path / "tiny" / "siglip" / "open_clip_model.safetensors")


def test_visual_tokens_follow_the_arch_specifier():
    assert ARCH == "full-align+25-avgpool" and visual_tokens_of(ARCH) == 25
    assert visual_tokens_of("no-align+avgpool") == 144          # pretraining (train.sh)
    assert visual_tokens_of("full-align+729-avgpool") == 729    # SFT (fine_tune.sh)
    with pytest.raises(ValueError, match="average-pool"):
        visual_tokens_of("no-align+gelu-mlp")
    with pytest.raises(ValueError, match="square"):
        visual_tokens_of("full-align+150-avgpool")


def test_reference_vision_backbones_are_the_open_clip_towers_with_that_trunk():
    from oqvl.model.prismatic import VISION_BACKBONES
    from oqvl.model.vision import open_clip_tower_config

    for timm_name, size, name in VISION_BACKBONES.values():
        cfg = open_clip_tower_config(name)["vision_cfg"]
        assert (cfg["timm_model_name"], cfg["image_size"], cfg["timm_pool"], cfg["timm_proj"]) == \
            (timm_name, size, "map", "none")


def test_resize_strategies_without_an_open_clip_equivalent_stop():
    trunk = VisionBackbone().featurizer  # crop_pct 0.95: timm would enlarge before cropping
    assert prismatic.preprocess_of(trunk, IMAGE_SIZE, "resize-naive")["resize_mode"] == "squash"
    with pytest.raises(ValueError, match="crop_pct 0.95"):
        prismatic.preprocess_of(trunk, IMAGE_SIZE, "resize-crop")
    with pytest.raises(ValueError, match="letterbox"):
        prismatic.preprocess_of(trunk, IMAGE_SIZE, "letterbox")


# ------------------------------------------------------------------------------ strict key map

def corrupt(run_dir, edit):
    path = checkpoint_of(run_dir)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    edit(obj["model"])
    torch.save(obj, path)
    return path


CORRUPTIONS = {
    "deleted": (lambda m: m["llm_backbone"].pop("llm.model.layers.1.mlp.down_proj.weight"),
                "missing key llm_backbone/llm.model.layers.1.mlp.down_proj.weight"),
    "wrong shape": (lambda m: m["projector"].__setitem__("mlp_projector.0.weight", torch.zeros(64, 95)),
                    "projector/mlp_projector.0.weight has shape (64, 95)"),
    "unknown": (lambda m: m["llm_backbone"].__setitem__("llm.model.layers.0.self_attn.extra.weight",
                                                        torch.zeros(3)),
                "unused key llm_backbone/llm.model.layers.0.self_attn.extra.weight"),
    "unknown projector layer": (lambda m: m["projector"].__setitem__("mlp_projector.4.weight", torch.zeros(3)),
                                "unused key projector/mlp_projector.4.weight"),
    "unknown module": (lambda m: m.__setitem__("vision_tower", {}), "unused module 'vision_tower'"),
    "untied head": (lambda m: m["llm_backbone"].__setitem__(
        "llm.lm_head.weight", m["llm_backbone"]["llm.lm_head.weight"] + 1),
        "llm_backbone/llm.lm_head.weight differs from llm.model.embed_tokens.weight"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupted_checkpoint_stops_with_one_line_naming_key_and_file(case, release, tmp_path):
    root = tmp_path / "tiny"
    shutil.copytree(release[0], root)
    run = root / "release"
    edit, expected = CORRUPTIONS[case]
    path = corrupt(run, edit)
    with pytest.raises(ValueError) as err:
        convert_tiny_release(root, tmp_path / "ckpt")
    msg = str(err.value)
    assert expected in msg and str(path) in msg and "\n" not in msg
    assert not (tmp_path / "ckpt" / "config.json").exists()
    # the CLI ends with that same line
    with pytest.raises(SystemExit) as exit_:
        prismatic.main(["--run-dir", str(run), "--lm", str(root / "qwen2"), "--vision", "oqvl-tiny-siglip-test",
                        "--vision-weights", str(root / "siglip" / "open_clip_model.safetensors"),
                        "--out", str(tmp_path / "cli")])
    assert exit_.value.code == msg


def test_checkpoint_is_read_weights_only(release, tmp_path):
    import argparse

    root = tmp_path / "tiny"
    shutil.copytree(release[0], root)
    path = checkpoint_of(root / "release")
    torch.save({"model": modules_of(root / "release"), "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(ValueError, match=f"{path}: not readable with weights_only=True"):
        convert_tiny_release(root, tmp_path / "ckpt")


def test_vision_weights_file_is_checked_and_required(release, tmp_path):
    from safetensors.torch import save_file

    root = release[0]
    with pytest.raises(ValueError, match="no vision_backbone .*--vision-weights"):
        convert_tiny_release(root, tmp_path / "a", vision_weights=None)
    weights = load_file(root / "siglip" / "open_clip_model.safetensors")
    del weights["visual.trunk.attn_pool.latent"]
    bad = tmp_path / "bad.safetensors"
    save_file(weights, str(bad))
    with pytest.raises(ValueError, match=f"{bad}: missing key vision weights/visual.trunk.attn_pool.latent"):
        convert_tiny_release(root, tmp_path / "b", vision_weights=bad)


def test_cli_converts(release, tmp_path, capsys):
    root, run = release
    prismatic.main(["--run-dir", str(run), "--lm", str(root / "qwen2"), "--vision", "oqvl-tiny-siglip-test",
                    "--vision-weights", str(root / "siglip" / "open_clip_model.safetensors"),
                    "--out", str(tmp_path / "cli")])
    assert "25 visual tokens" in capsys.readouterr().out
    model = OpenQwen2VL.from_pretrained(tmp_path / "cli")
    assert_weights_follow_the_key_map(model, modules_of(run),
                                      load_file(root / "siglip" / "open_clip_model.safetensors"))
