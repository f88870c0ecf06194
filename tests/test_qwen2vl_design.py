"""Qwen2-VL's adapter as a projector switch (merger2x2): the 2x2 merge's token count and patch
order and its one-line errors; an image's <|vision_start|> ... <|vision_end|> layout in the chat
encoding, the packer and the trainer's batches (and the default layout left as it was);
checkpoints that keep the switch; the workflow config's entry for it."""

import io
import json
import os
import tarfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchMerger

from conftest import REPO
from oqvl.config import ConfigError, validate
from oqvl.model.chat import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    encode_conversation,
    encode_prompt,
    expand_images,
    image_text,
    render,
    vision_ids,
)
from oqvl.model.config import PROJECTORS, VLMConfig
from oqvl.model.tokenizer import (
    IMAGE_TOKEN,
    VISION_END,
    VISION_START,
    build_qwen2_tokenizer,
    load_tokenizer,
)
from oqvl.model.vlm import (
    CONFIG_FILE,
    MergerProjector,
    OpenQwen2VL,
    merge_order,
    merged_tokens,
)
from oqvl.pack import build
from oqvl.pack.sequence import image_ids, pretrain_labels, sequence_tokens
from oqvl.train.data import PackedCaptions

TOY_VOCAB = 8192


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "toy"
    build_qwen2_tokenizer(out, TOY_VOCAB)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


def toy_model(projector="avgpool", **tokens) -> OpenQwen2VL:
    """The toy preset with a random tower (8x8 patch grid) and a random LM."""
    torch.manual_seed(0)
    return OpenQwen2VL.from_preset("toy", projector=projector, **tokens).eval()


@pytest.fixture(scope="module")
def merger():
    return toy_model("merger2x2", visual_tokens_pretrain=16, visual_tokens_sft=16)


def images(n, seed=0):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def index_grid(h, w, n=2) -> torch.Tensor:
    """(n, 3, h, w): each patch holds its (image, row, col)."""
    img, row, col = torch.meshgrid(torch.arange(n), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([img, row, col], dim=1).float()


# ------------------------------------------------------------------------------- the merge

@pytest.mark.parametrize("h, w, tokens", [(8, 8, 16), (4, 6, 6), (2, 2, 1)])
def test_token_count_is_one_per_2x2_block(h, w, tokens):
    torch.manual_seed(0)
    proj = MergerProjector(8, 16)
    assert merged_tokens(h, w) == tokens
    assert proj(torch.randn(3, 8, h, w), tokens).shape == (3, tokens, 16)


@pytest.mark.parametrize("h, w", [(8, 8), (4, 6)])
def test_merged_token_k_gets_block_k_in_qwen2vl_patch_order(h, w):
    """Merged token k (blocks row-major) gets the 4 patches of block k, in the order Qwen2-VL's
    image processor lays them out (its own `patchify`), which PatchMerger's view(-1, 4C) expects."""
    grid = index_grid(h, w)
    merged = merge_order(grid).view(2, -1, 4, 3).long()  # (image, merged token, its 4 patches, (i, r, c))
    # By hand: blocks row-major, then within a block (0,0), (0,1), (1,0), (1,1).
    expected = [[[(n, 2 * br + dy, 2 * bc + dx) for dy in (0, 1) for dx in (0, 1)]
                 for br in range(h // 2) for bc in range(w // 2)] for n in range(2)]
    assert merged.tolist() == [[[list(p) for p in block] for block in img] for img in expected]
    # Qwen2-VL's processor: one-pixel patches whose channels are (image, row, col), patchified.
    patches, gh, gw = Qwen2VLImageProcessor().patchify(grid, patch_size=1, merge_size=2, temporal_patch_size=1)
    assert (gh, gw) == (h, w)
    assert torch.equal(merge_order(grid), patches.reshape(-1, 3))


def test_merger_is_transformers_patchmerger_on_each_block():
    torch.manual_seed(0)
    proj = MergerProjector(8, 16)
    assert isinstance(proj.merger, PatchMerger)
    grid = torch.randn(2, 8, 4, 6)
    out = proj(grid, 6)
    m = proj.merger
    n, br, bc = 1, 1, 2  # image 1, block row 1, block col 2: merged token 1 * 3 + 2
    block = [grid[n, :, 2 * br + dy, 2 * bc + dx] for dy in (0, 1) for dx in (0, 1)]
    x = torch.cat([m.ln_q(p) for p in block])
    torch.testing.assert_close(out[n, br * 3 + bc], m.mlp(x))


def test_odd_grids_and_other_counts_are_one_line_errors():
    proj = MergerProjector(8, 16)
    for h, w in [(5, 6), (8, 7), (27, 27)]:
        with pytest.raises(ValueError, match=f"even sides, got {h}x{w}$"):
            proj(torch.randn(1, 8, h, w), 16)
    with pytest.raises(ValueError, match="makes 16 visual tokens of a 8x8 patch grid, not 64"):
        proj(torch.randn(1, 8, 8, 8), 64)
    # The model: the toy preset's 16 / 64 tokens do not fit the merger, which makes 16 in both stages.
    with pytest.raises(ValueError) as err:
        toy_model("merger2x2")
    assert str(err.value) == ("merger2x2 makes 16 visual tokens of the 8x8 patch grid in both stages: "
                              "visual_tokens_pretrain and visual_tokens_sft must be 16, got 16 and 64")
    with pytest.raises(ValueError, match="projector must be one of"):
        toy_model("merger3x3")


def test_merger_model_encodes_16_tokens_per_image(merger):
    assert merger.encode_images(images(3)).shape == (3, 16, merger.config.projector_out)
    with pytest.raises(ValueError, match="not 64"):
        merger.encode_images(images(1), visual_tokens=64)


# ------------------------------------------------------------------------------ the layout

def test_image_text_is_framed_only_with_the_merger():
    V = 4
    assert image_text(V) == IMAGE_TOKEN * V  # the default: the slots alone, as before the switch
    assert image_text(V, "merger2x2") == VISION_START + IMAGE_TOKEN * V + VISION_END
    text = f"{IMAGE_PLACEHOLDER}\nWhat is it?"
    assert expand_images(text, V) == text.replace(IMAGE_PLACEHOLDER, IMAGE_TOKEN * V)


def test_conversation_frames_each_image_once_and_masks_the_frame(tok):
    V = 16
    messages = [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\nWhat is it?"},
                {"role": "assistant", "content": "a red circle"},
                {"role": "user", "content": f"And this? {IMAGE_PLACEHOLDER}"},
                {"role": "assistant", "content": "a cross"}]
    start, end, img = tok.convert_tokens_to_ids([VISION_START, VISION_END, IMAGE_TOKEN])
    ids, labels = encode_conversation(tok, messages, V, "merger2x2")
    ids = ids.tolist()
    starts = [i for i, t in enumerate(ids) if t == start]
    assert len(starts) == 2 and ids.count(end) == 2 and ids.count(img) == 2 * V
    for s in starts:  # each image's tokens, exactly framed
        assert ids[s + 1:s + 1 + V] == [img] * V and ids[s + 1 + V] == end
    assert (labels[np.isin(ids, [start, end, img])] == IGNORE_INDEX).all()
    # Framing changes nothing else: without the frame, the ids and labels are the default's.
    plain, plain_labels = encode_conversation(tok, messages, V)
    keep = ~np.isin(ids, [start, end])
    assert plain.tolist() == np.asarray(ids)[keep].tolist()
    assert plain_labels.tolist() == labels[keep].tolist()


def test_default_prompt_layout_is_unchanged(tok):
    """The default encodes as the code did before the switch: each <image> as V image tokens."""
    V, prompt = 64, f"{IMAGE_PLACEHOLDER}\nIs there a cross?"
    text, _ = render([{"role": "user", "content": prompt}], add_generation_prompt=True)
    before = tok(text.replace(IMAGE_PLACEHOLDER, IMAGE_TOKEN * V), add_special_tokens=False)["input_ids"]
    assert encode_prompt(tok, prompt, V) == encode_prompt(tok, prompt, V, projector="avgpool") == before
    framed = encode_prompt(tok, prompt, V, projector="merger2x2")
    assert len(framed) == len(before) + 2
    assert vision_ids(tok, "avgpool") is None


@pytest.mark.parametrize("projector", ["avgpool", "merger2x2"])
def test_packer_lays_an_image_out_as_the_chat_does(tok, projector):
    img = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    packed = image_ids(16, img, vision_ids(tok, projector))
    assert packed.tolist() == tok(image_text(16, projector), add_special_tokens=False)["input_ids"]


def test_packed_documents_framed_and_their_frame_masked(tok):
    bos = pad = tok.pad_token_id
    img = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    start, end = vision_ids(tok, "merger2x2")
    texts = [np.array([10, 11, pad]), np.array([12, pad])]
    ids, doc_ids = sequence_tokens([1, 0], texts, 20, 2, bos, img, pad, vision_ids=(start, end))
    assert ids.tolist() == [bos, start, img, img, end, 12, pad, bos, start, img, img, end, 10, 11, pad] + [pad] * 5
    assert doc_ids.tolist() == [0] * 7 + [1] * 8 + [-1] * 5
    plain, _ = sequence_tokens([1, 0], texts, 20, 2, bos, img, pad)  # the default: as before the switch
    assert plain.tolist() == [bos, img, img, 12, pad, bos, img, img, 10, 11, pad] + [pad] * 9
    x, d = torch.from_numpy(ids)[None], torch.from_numpy(doc_ids)[None]
    labels = pretrain_labels(x, img, pad, doc_ids=d, vision_ids=(start, end))
    M = IGNORE_INDEX
    assert labels[0].tolist() == [M, M, M, M, M, 12, pad, M, M, M, M, M, 10, 11, pad] + [M] * 5
    assert torch.equal(pretrain_labels(x, img, pad, vision_ids=(start, end)), labels)  # from the ids alone


def write_shard(folder, captions):
    """One webdataset shard of (png, txt, json) samples."""
    folder.mkdir()
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for i, caption in enumerate(captions):
            png = io.BytesIO()
            Image.new("RGB", (64, 64), (40 * i, 0, 0)).save(png, "PNG")
            for ext, data in (("png", png.getvalue()), ("txt", caption.encode()),
                              ("json", json.dumps({"uid": f"u{i}"}).encode())):
                member = tarfile.TarInfo(f"{i:04d}.{ext}")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    return folder


@pytest.fixture(scope="module")
def packings(tok_dir, tmp_path_factory):
    """Four captions packed at 16 visual tokens per image, for each projector: (shards, {projector: dir})."""
    root = tmp_path_factory.mktemp("pack")
    shards = write_shard(root / "shards", ["a red circle", "two blue squares", "a cross", "nothing"])
    for projector in PROJECTORS:
        build.main(["--shards", str(shards), "--tokenizer", str(tok_dir), "--visual-tokens", "16",
                    "--context-len", "64", "--projector", projector, "--out", str(root / projector)])
    return shards, {p: root / p for p in PROJECTORS}


def test_packer_lengths_fit_the_framed_sequences_the_trainer_builds(packings, tok):
    shards, packed = packings
    for projector, out in packed.items():
        assert json.loads((out / "stats.json").read_text())["projector"] == projector
    lengths = {p: pd.read_parquet(out / "documents.parquet")["length"].tolist() for p, out in packed.items()}
    assert [n + 2 for n in lengths["avgpool"]] == lengths["merger2x2"]
    start, end = vision_ids(tok, "merger2x2")
    ds = PackedCaptions(packed["merger2x2"], shards, lambda im: torch.zeros(3, 8, 8), bos_id=tok.pad_token_id,
                        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN), pad_id=tok.pad_token_id,
                        doc_isolation=True, vision_ids=(start, end))
    assert ds.projector == "merger2x2"
    batch = ds.batch(range(len(ds)))
    seqs = pd.read_parquet(packed["merger2x2"] / "sequences.parquet")
    for b, lens in enumerate(seqs["lengths"]):  # each document where the packer put it, framed
        assert torch.bincount(batch.doc_ids[b][batch.doc_ids[b] >= 0]).tolist() == list(lens)
        for offset in seqs["offsets"][b]:
            assert batch.input_ids[b, offset + 1] == start and batch.input_ids[b, offset + 18] == end
    assert int((batch.input_ids == start).sum()) == int((batch.input_ids == end).sum()) == 4
    assert (batch.labels[np.isin(batch.input_ids, [start, end])] == IGNORE_INDEX).all()


def test_pretraining_builds_the_merger_and_its_framed_batches(packings, tok_dir, tmp_path):
    """The trainer's own model and data for a merger2x2 pretraining, and one loss and backward."""
    from oqvl.model.tokenizer import training_tokenizer
    from oqvl.train.trainer import TrainConfig, build_data, build_model

    shards, packed = packings
    cfg = TrainConfig(stage="pretrain", out=str(tmp_path), tokenizer=str(tok_dir), packed=str(packed["merger2x2"]),
                      shards=str(shards), projector="merger2x2", visual_tokens_pretrain=16, visual_tokens_sft=16)
    torch.manual_seed(0)
    model, visual_tokens = build_model(cfg)
    assert isinstance(model.projector, MergerProjector) and visual_tokens == 16
    tokenizer = training_tokenizer(tok_dir)
    batch = build_data(cfg, model, tokenizer, visual_tokens).batch([0])
    out = model(batch.input_ids, batch.images, labels=batch.labels, doc_ids=batch.doc_ids, visual_tokens=16)
    out.loss.backward()
    assert out.loss.isfinite() and model.projector.merger.mlp[0].weight.grad.abs().sum() > 0
    cfg.packed = str(packed["avgpool"])  # packed without the frame: refused
    with pytest.raises(ValueError, match="packed for projector avgpool .* the model's is merger2x2"):
        build_data(cfg, model, tokenizer, visual_tokens)


# ------------------------------------------------------------------------------ checkpoints

def test_merger_checkpoint_round_trip_is_identical(merger, tmp_path, tok):
    merger.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert cfg["projector"] == "merger2x2" and cfg["visual_tokens_sft"] == 16
    loaded = OpenQwen2VL.from_pretrained(tmp_path).eval()
    assert loaded.config == merger.config and isinstance(loaded.projector, MergerProjector)
    assert "projector.merger.mlp.0.weight" in loaded.state_dict()
    for k, v in merger.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    ids = torch.tensor([encode_prompt(tok, f"{IMAGE_PLACEHOLDER}\nWhat is it?", 16, projector="merger2x2")])
    with torch.no_grad():
        a, b = merger(ids, images(1)).hidden_states, loaded(ids, images(1)).hidden_states
    assert torch.equal(a, b)


def test_a_checkpoint_from_before_the_switch_loads_as_avgpool(tmp_path):
    model = toy_model()
    assert [k for k in model.state_dict() if k.startswith("projector.")] == [
        "projector.fc1.weight", "projector.fc1.bias", "projector.fc2.weight", "projector.fc2.bias"]
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert cfg.pop("projector") == "avgpool"
    (tmp_path / CONFIG_FILE).write_text(json.dumps(cfg))  # as config.json was written before
    loaded = OpenQwen2VL.from_pretrained(tmp_path).eval()
    assert loaded.config.projector == "avgpool" and loaded.config == VLMConfig.from_dict(cfg)
    with torch.no_grad():
        assert torch.equal(model.encode_images(images(2), 64), loaded.encode_images(images(2), 64))


# ---------------------------------------------------------------------------------- config

def test_workflow_config_defaults_to_avgpool_and_refuses_the_unwired_merger():
    cfg = yaml.safe_load((REPO / "config" / "ci.yaml").read_text())
    assert validate(dict(cfg))["model"]["projector"] == "avgpool"
    cfg["model"]["projector"] = "merger2x2"
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert str(err.value).startswith("model.projector: merger2x2 is a switch") and "\n" not in str(err.value)


def test_training_resume_key_of_the_default_is_unchanged():
    from oqvl.train.trainer import TrainConfig

    base = {"stage": "pretrain", "out": "o", "tokenizer": "t", "packed": "p", "shards": "s"}
    assert "projector" not in TrainConfig(**base).resume_key()
    assert TrainConfig(**base, projector="merger2x2").resume_key()["projector"] == "merger2x2"
