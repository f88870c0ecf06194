"""The toy CLIP-score filter model: open_clip registration, checkpoints, scoring, training CLI."""

import json

import numpy as np
import open_clip
import pytest
import torch
from safetensors import safe_open

from oqvl.filter import train_clip
from oqvl.filter.clip_model import (CONFIG_FILE, TOY_MODEL, WEIGHTS_FILE, image_batch, load_clip,
                                    model_config, save_checkpoint, score_pairs)
from oqvl.world.scene import render
from oqvl.world.source import WorldConfig, true_pair

WORLD = WorldConfig()


def toy_pairs(n, stream="test_clip"):
    scenes_captions = [true_pair(0, stream, i, WORLD) for i in range(n)]
    return [render(s, WORLD.image_size) for s, _, _ in scenes_captions], [c for _, _, c in scenes_captions]


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    return load_clip(TOY_MODEL, None)  # random weights: enough for plumbing


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("clip")
    train_clip.main(["--out", str(out), "--n-pairs", "48", "--steps", "3", "--batch-size", "16",
                     "--lr", "1e-3", "--seed", "0", "--threads", "1", "--log-every", "1"])
    return out


def test_config_registered_and_model_builds(toy):
    assert TOY_MODEL in open_clip.list_models()
    model, _, tokenizer = toy
    cfg = model_config()
    assert "timm_model_name" not in cfg["vision_cfg"]  # native open_clip ViT
    assert isinstance(model.visual, open_clip.transformer.VisionTransformer)
    assert model.visual.grid_size == (8, 8)
    assert model.logit_bias is not None  # sigmoid loss
    assert isinstance(tokenizer, open_clip.tokenizer.SimpleTokenizer)  # bundled BPE, offline
    assert tokenizer(["a red circle"]).shape == (1, cfg["text_cfg"]["context_length"])


def test_training_normalisation_matches_inference_preprocess(toy):
    model, preprocess, _ = toy
    images, _ = toy_pairs(4)
    pp = model.visual.preprocess_cfg
    arr = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2)
    x = (arr.float() / 255 - torch.tensor(pp["mean"]).view(1, 3, 1, 1)) / torch.tensor(pp["std"]).view(1, 3, 1, 1)
    torch.testing.assert_close(x, image_batch(preprocess, images), atol=1e-6, rtol=0)


def test_forward_intermediates_is_an_8x8_patch_grid(toy):
    model, preprocess, _ = toy
    images, _ = toy_pairs(2)
    with torch.inference_mode():
        out = model.visual.forward_intermediates(image_batch(preprocess, images), indices=1,
                                                 output_fmt="NCHW", intermediates_only=True)
    (grid,) = out["image_intermediates"]
    assert grid.shape == (2, model_config()["vision_cfg"]["width"], 8, 8)


def test_scores_are_deterministic_cosines(toy):
    model, preprocess, tokenizer = toy
    images, captions = toy_pairs(10)
    a = score_pairs(model, preprocess, tokenizer, images, captions, "cpu")
    b = score_pairs(model, preprocess, tokenizer, images, captions, "cpu")
    c = score_pairs(model, preprocess, tokenizer, images, captions, "cpu", batch_size=3)
    assert a.shape == (10,) and a.dtype == np.float32
    assert np.array_equal(a, b)
    np.testing.assert_allclose(a, c, atol=1e-5)
    assert np.all(np.abs(a) <= 1 + 1e-5)


def test_save_load_round_trip_gives_identical_scores(toy, tmp_path):
    model, preprocess, tokenizer = toy
    images, captions = toy_pairs(6)
    before = score_pairs(model, preprocess, tokenizer, images, captions)
    save_checkpoint(model, tmp_path, {"model_name": TOY_MODEL})
    with safe_open(str(tmp_path / WEIGHTS_FILE), "pt") as f:  # plain tensors, no pickle
        assert "visual.conv1.weight" in f.keys()
    for args in [(str(tmp_path), None), (TOY_MODEL, str(tmp_path))]:
        loaded, pre2, tok2 = load_clip(*args)
        assert np.array_equal(before, score_pairs(loaded, pre2, tok2, images, captions))


def test_checkpoint_is_rebuilt_with_its_own_architecture(tmp_path):
    # The checkpoint's config.json, not the packaged JSON, decides the architecture, so weights
    # trained before a config change still load (and a wrong model name is refused).
    small = open_clip.create_model(TOY_MODEL, embed_dim=64)
    save_checkpoint(small, tmp_path, {"model_name": TOY_MODEL, "model_cfg": {**model_config(), "embed_dim": 64}})
    model, _, _ = load_clip(str(tmp_path), None)
    assert model.text_projection.shape[-1] == 64 != model_config()["embed_dim"]
    with pytest.raises(ValueError, match="holds"):
        load_clip("ViT-B-32", str(tmp_path))


def test_short_training_run_writes_a_loadable_checkpoint(trained):
    assert {p.name for p in trained.iterdir()} >= {WEIGHTS_FILE, CONFIG_FILE, "train_log.jsonl"}
    meta = json.loads((trained / CONFIG_FILE).read_text())
    assert meta["model_name"] == TOY_MODEL and meta["model_cfg"] == model_config()
    assert meta["train_args"]["steps"] == 3 and np.isfinite(meta["final_loss"])
    log = [json.loads(line) for line in (trained / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2]
    manifest = json.loads((trained / "manifest.json").read_text())
    assert manifest["stage"] == "train_clip" and manifest["work"] == {"amount": 3.0 * 16, "unit": "pairs"}
    assert manifest["counts"]["final_loss"] == meta["final_loss"]
    model, preprocess, tokenizer = load_clip(str(trained), None)
    images, captions = toy_pairs(4)
    assert np.isfinite(score_pairs(model, preprocess, tokenizer, images, captions)).all()


def test_hard_negatives_are_false_captions_of_their_image():
    scenes, styles, captions, _ = train_clip.seed_set(0, 32, WORLD)
    rng = np.random.default_rng(0)
    idx = np.arange(32)
    hard = train_clip.hard_negatives(idx, scenes, styles, 0.5, rng)
    assert len(hard) == 16
    assert not set(hard) & set(captions)  # not even another image's true caption, here


def test_an_open_clip_tag_decides_the_activation_and_preprocessing():
    from oqvl.filter.clip_model import tag_settings

    # OpenAI's weights under plain ViT-L-14: QuickGELU forced, OpenAI's preprocessing
    openai = tag_settings("ViT-L-14", "openai")
    assert openai["force_quick_gelu"] is True
    assert openai["image_mean"] == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert tag_settings("ViT-L-14-quickgelu", "openai")["force_quick_gelu"] is True
    assert "force_quick_gelu" not in tag_settings("ViT-L-14", "laion2b_s32b_b82k")  # trained with GELU
    assert tag_settings("ViT-L-14", None) == {}
    with pytest.raises(ValueError, match="no pretrained tag 'laion2b_s32b_b82k' for 'ViT-L-14-quickgelu'"):
        tag_settings("ViT-L-14-quickgelu", "laion2b_s32b_b82k")


def test_the_same_weights_score_differently_through_gelu_and_quickgelu(tmp_path, monkeypatch):
    """A tiny CLIP in OpenAI's key layout (open_clip's native one) saved as safetensors: loaded as a
    copy of an OpenAI-like tag it runs QuickGELU, loaded bare it runs GELU, and the scores differ.
    The tag's registry entry is declared for the tiny model as open_clip declares ViT-L-14's."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model(TOY_MODEL)
    weights = tmp_path / "tiny-openai.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    real = open_clip.get_pretrained_cfg
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda name, tag: (
        {"quick_gelu": True}  # no preprocessing of its own: only the activation differs
        if (name, tag) == (TOY_MODEL, "tiny-openai") else real(name, tag)))
    images, captions = toy_pairs(6)
    gelu = load_clip(TOY_MODEL, str(weights))
    quick = load_clip(TOY_MODEL, str(weights), tag="tiny-openai")
    acts = {type(m).__name__ for m in quick[0].modules()}
    assert "QuickGELU" in acts and "QuickGELU" not in {type(m).__name__ for m in gelu[0].modules()}
    # the weights loaded strictly both ways: same tensors
    for (k, a), (_, b) in zip(gelu[0].state_dict().items(), quick[0].state_dict().items()):
        assert torch.equal(a, b), k
    s_gelu, s_quick = score_pairs(*gelu, images, captions), score_pairs(*quick, images, captions)
    assert np.abs(s_gelu - s_quick).max() > 1e-3


def test_cell_labels_name_what_each_cell_holds():
    from oqvl.world.scene import Glyph, Obj, Scene

    scene = Scene((Obj("cross", "red", "small", "bottom right"), Obj("circle", "blue", "large", "top left")),
                  Glyph("A", "top right"))
    classes = train_clip.CELL_CLASSES
    assert train_clip.cell_labels([scene]).tolist() == [[classes.index("circle"), classes.index("character"),
                                                        classes.index("empty"), classes.index("cross")]]


def test_one_tower_pass_gives_encode_image_and_each_cells_mean_tokens(toy):
    model, preprocess, _ = toy
    images, _ = toy_pairs(3)
    x = image_batch(preprocess, images)
    with torch.inference_mode():
        img, cells = train_clip.image_pass(model.visual, x)
        torch.testing.assert_close(img, model.encode_image(x, normalize=True))
        grid = model.visual.forward_intermediates(x, indices=[-1], output_fmt="NCHW",
                                                  intermediates_only=True)["image_intermediates"][-1]
    assert cells.shape == (3, 4, grid.shape[1])
    torch.testing.assert_close(cells[:, 1], grid[:, :, :4, 4:].mean((2, 3)))  # top right: rows 0-3, cols 4-7
    torch.testing.assert_close(cells[:, 2], grid[:, :, 4:, :4].mean((2, 3)))  # bottom left


def test_the_cell_loss_is_logged_and_its_head_left_out_of_the_checkpoint(tmp_path):
    train_clip.main(["--out", str(tmp_path), "--n-pairs", "32", "--steps", "2", "--batch-size", "16",
                     "--seed", "0", "--threads", "1", "--log-every", "1", "--cell-weight", "2"])
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["cell_loss"]) and r["loss"] > 2 * r["cell_loss"] for r in log)
    meta = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert meta["train_args"]["cell_weight"] == 2
    model, _, _ = load_clip(str(tmp_path), None)  # strict load: exactly the open_clip model's keys
    with safe_open(str(tmp_path / WEIGHTS_FILE), "pt") as f:
        assert set(f.keys()) == set(model.state_dict())
