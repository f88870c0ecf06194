"""The Open-Qwen2VL model: projector, image-token scatter, labels, loss, document isolation,
freezing, checkpoints, the paper-scale loaders (on tiny local checkpoints) and greedy decoding."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from oqvl.filter.clip_model import TOY_MODEL, save_checkpoint
from oqvl.model.chat import IGNORE_INDEX
from oqvl.model.config import VLMConfig, grid_side, list_presets, load_preset
from oqvl.model.tokenizer import IMAGE_TOKEN, N_BPE, SPECIAL_TOKENS
from oqvl.model.vlm import CONFIG_FILE, WEIGHTS_FILE, OpenQwen2VL, Projector
from oqvl.pack.sequence import (
    doc_ids_from_lengths,
    document_attention_mask,
    document_position_ids,
    pretrain_labels,
)

TOY_VOCAB = 8192
VOCAB = TOY_VOCAB + len(SPECIAL_TOKENS)  # 8214
IMG = TOY_VOCAB + [t for t, _ in SPECIAL_TOKENS].index(IMAGE_TOKEN)  # 8204
EOT = TOY_VOCAB  # <|endoftext|>: BOS = EOS = pad
NL = 198  # "\n" in Qwen2's BPE
V = 16  # visual tokens per image (toy pretraining)


def tiny_lm_config(**kw) -> Qwen2Config:
    cfg = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
           "tie_word_embeddings": True,
           "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    cfg.update(kw)
    return Qwen2Config(**cfg)


def build(vision, attn="sdpa", lm_cfg=None, **kw) -> OpenQwen2VL:
    torch.manual_seed(0)
    return OpenQwen2VL.from_components(vision, lm_cfg or tiny_lm_config(), image_token_id=IMG,
                                       visual_tokens_pretrain=16, visual_tokens_sft=64,
                                       attn_implementation=attn, **kw)


@pytest.fixture(scope="module")
def clip_ckpt(tmp_path_factory):
    """A toy CLIP checkpoint directory, as oqvl.filter.train_clip writes it (random weights)."""
    out = tmp_path_factory.mktemp("clip")
    torch.manual_seed(1)
    save_checkpoint(open_clip.create_model(TOY_MODEL), out, {"model_name": TOY_MODEL})
    return out


@pytest.fixture(scope="module")
def model(clip_ckpt):
    return build(clip_ckpt).eval()


@pytest.fixture(scope="module")
def untied(clip_ckpt):
    """With a random tied head a model echoes its last token; an untied one says varied things."""
    return build(clip_ckpt, lm_cfg=tiny_lm_config(tie_word_embeddings=False)).eval()


def document(caption):
    """Token ids of one packed document: BOS <image tokens> "\\n" caption EOS."""
    return [EOT] + [IMG] * V + [NL] + list(caption) + [EOT]


def packed(docs_per_seq, T):
    """(input_ids, doc_ids) of right-padded packed sequences."""
    ids = torch.full((len(docs_per_seq), T), EOT)
    for b, docs in enumerate(docs_per_seq):
        flat = [t for d in docs for t in d]
        ids[b, :len(flat)] = torch.tensor(flat)
    return ids, doc_ids_from_lengths([[len(d) for d in docs] for docs in docs_per_seq], T)


def images(n, seed=0):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------- presets, config

def test_presets_parse_and_match_the_tokenizer():
    assert {"toy", "open-qwen2vl"} <= set(list_presets())
    toy, paper = load_preset("toy"), load_preset("open-qwen2vl")
    assert toy["image_token_id"] == IMG
    assert paper["image_token_id"] == N_BPE + [t for t, _ in SPECIAL_TOKENS].index(IMAGE_TOKEN) == 151655
    assert toy["lm"]["config"]["vocab_size"] == VOCAB
    assert "pad_token_id" not in toy["lm"]["config"]  # a padding_idx would freeze <|endoftext|>'s embedding
    assert [grid_side(toy[k]) for k in ("visual_tokens_pretrain", "visual_tokens_sft")] == [4, 8]
    assert [grid_side(paper[k]) for k in ("visual_tokens_pretrain", "visual_tokens_sft")] == [12, 27]
    assert paper["vision"]["open_clip_model"] == "ViT-SO400M-14-SigLIP-384"
    assert paper["vision"]["hf_hub"] == "timm/ViT-SO400M-14-SigLIP-384"
    assert paper["lm"]["hf_hub"] == "Qwen/Qwen2.5-1.5B-Instruct" and "revision" in paper["lm"]
    assert "ViT-SO400M-14-SigLIP-384" in open_clip.list_models()
    with pytest.raises(ValueError, match="download Qwen/Qwen2.5-1.5B-Instruct"):
        OpenQwen2VL.from_preset("open-qwen2vl")
    with pytest.raises(ValueError, match="square"):
        grid_side(150)


def test_toy_preset_builds_with_the_toy_clip_checkpoint(clip_ckpt):
    torch.manual_seed(0)
    m = OpenQwen2VL.from_preset("toy", vision_weights=clip_ckpt)
    assert m.config.projector_in == 128 and m.visual_tokens == 16
    assert m.lm.model.embed_tokens.padding_idx is None
    assert m.lm.lm_head.weight is m.lm.model.embed_tokens.weight
    ckpt = safe_open(str(clip_ckpt / WEIGHTS_FILE), framework="pt")
    key = "visual.conv1.weight"
    assert torch.equal(m.vision.state_dict()["conv1.weight"], ckpt.get_tensor(key))


# ----------------------------------------------------------------------------------- projector

def test_projector_visual_token_counts_at_both_resolutions(model):
    x = images(3)
    D = model.config.projector_out
    assert model.encode_images(x).shape == (3, 16, D)
    assert model.encode_images(x, visual_tokens=64).shape == (3, 64, D)
    model.visual_tokens = 64
    try:
        assert model.encode_images(x).shape == (3, 64, D)
    finally:
        model.visual_tokens = 16


def test_projector_pools_row_major_and_is_identity_at_full_grid():
    torch.manual_seed(0)
    proj = Projector(8, 16)
    grid = torch.randn(2, 8, 27, 27)  # a SigLIP-shaped 27x27 patch grid
    assert proj(grid, 144).shape == (2, 144, 16)  # 27x27 -> 12x12
    assert proj(grid, 729).shape == (2, 729, 16)

    def mlp(t):
        return proj.fc2(proj.act(proj.fc1(t)))

    torch.testing.assert_close(proj(grid, 729), mlp(grid.flatten(2).transpose(1, 2)))
    # 8x8 -> 4x4: token r*4+c is the mean of cells [2r:2r+2, 2c:2c+2]
    g8 = torch.randn(1, 8, 8, 8)
    r, c = 2, 3
    cell = g8[0, :, 2 * r:2 * r + 2, 2 * c:2 * c + 2].mean(dim=(1, 2))
    torch.testing.assert_close(proj(g8, 16)[0, r * 4 + c], mlp(cell))


# ------------------------------------------------------------------------------ image tokens

def test_image_tokens_replaced_in_order_and_count_checked(model):
    ids, _ = packed([[document([10, 11]), document([12])], [document([13, 14, 15])]], 80)
    x = images(3)
    with torch.no_grad():
        embeds = model.embed_inputs(ids, x)
        feats = model.encode_images(x)
        tok = model.lm.get_input_embeddings()(ids)
    slots = ids == IMG
    torch.testing.assert_close(embeds[slots], feats.reshape(-1, feats.shape[-1]))
    torch.testing.assert_close(embeds[~slots], tok[~slots])
    # the first sequence's second image fills its second run of image tokens
    start = len(document([10, 11])) + 1
    torch.testing.assert_close(embeds[0, start:start + V], feats[1])
    with pytest.raises(ValueError, match=r"48 image tokens in input_ids but 2 images x 16"):
        model.embed_inputs(ids, x[:2])
    with pytest.raises(ValueError, match="0 images"):
        model.embed_inputs(ids, None)
    bad = ids.clone()
    bad[1, -1] = IMG
    with pytest.raises(ValueError, match="49 image tokens"):
        model(bad, x)


# ------------------------------------------------------------------------------------- labels

def test_pretrain_labels_mask_image_bos_padding_and_keep_caption_and_eos():
    docs = [document([10, 11, 12]), document([20, 21])]
    ids, doc_ids = packed([docs], 64)
    first, second = len(docs[0]), len(docs[0]) + len(docs[1])
    expected = torch.full((1, 64), IGNORE_INDEX)
    expected[0, 1 + V:first] = torch.tensor([NL, 10, 11, 12, EOT])
    expected[0, first + 1 + V:second] = torch.tensor([NL, 20, 21, EOT])
    assert torch.equal(pretrain_labels(ids, IMG, EOT, doc_ids=doc_ids), expected)
    assert torch.equal(pretrain_labels(ids, IMG, EOT), expected)  # from the ids alone
    # a sequence filled exactly (no padding) keeps its final EOS
    full, full_docs = packed([docs], second)
    assert torch.equal(pretrain_labels(full, IMG, EOT), expected[:, :second])
    assert torch.equal(pretrain_labels(full, IMG, EOT, doc_ids=full_docs), expected[:, :second])
    # a distinct pad token: every pad is padding, EOS kept
    PAD = 8205
    ids2 = ids.clone()
    ids2[0, second:] = PAD
    assert torch.equal(pretrain_labels(ids2, IMG, PAD, eos_id=EOT), expected)


def test_document_positions_and_ids():
    doc_ids = doc_ids_from_lengths([[3, 2], [4]], 6)
    assert doc_ids.tolist() == [[0, 0, 0, 1, 1, -1], [0, 0, 0, 0, -1, -1]]
    assert document_position_ids(doc_ids).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]
    mask = document_attention_mask(doc_ids)
    assert mask.shape == (2, 1, 6, 6)
    allowed = (mask[0, 0] == 0).int().tolist()
    assert allowed[4] == [0, 0, 0, 1, 1, 0] and allowed[2] == [1, 1, 1, 0, 0, 0]
    with pytest.raises(ValueError, match="exceed"):
        doc_ids_from_lengths([[4, 4]], 6)


# --------------------------------------------------------------------------------------- loss

def test_loss_at_label_positions_equals_full_lm_head_loss(model):
    docs = [[document([10, 11, 12]), document([20, 21, 22, 23])], [document([30, 31])]]
    ids, doc_ids = packed(docs, 72)
    labels = pretrain_labels(ids, IMG, EOT, doc_ids=doc_ids)
    x = images(3)
    with torch.no_grad():
        out = model(ids, x, labels=labels)
        logits = model.lm.lm_head(out.hidden_states)
        full = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1),
                               ignore_index=IGNORE_INDEX)
        hf = model.lm(inputs_embeds=model.embed_inputs(ids, x), labels=labels).loss
        summed = model(ids, x, labels=labels, reduction="sum")
    n = int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert int(out.n_loss_tokens) == n == 5 + 6 + 4
    assert abs(out.loss.item() - full.item()) < 1e-5
    assert abs(out.loss.item() - hf.item()) < 1e-5  # transformers' own shifted loss
    assert abs(summed.loss.item() / n - full.item()) < 1e-5
    no_loss = model(ids, x, labels=torch.full_like(labels, IGNORE_INDEX))
    assert int(no_loss.n_loss_tokens) == 0 and no_loss.loss.item() == 0


# -------------------------------------------------------------------------- document isolation

@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_document_isolation(clip_ckpt, attn):
    m = build(clip_ckpt, attn=attn).eval()
    a, b = document([10, 11, 12]), document([20, 21])
    ids, doc_ids = packed([[a, b]], 48)
    ids2 = ids.clone()
    ids2[0, 1 + V + 1:len(a) - 1] = torch.tensor([40, 41, 42])  # change document 0's caption
    x, x2 = images(2), images(2)
    x2[0] = images(1, seed=7)[0]  # and its image
    sl = slice(len(a), len(a) + len(b))
    with torch.no_grad():
        iso = m(ids, x, doc_ids=doc_ids).hidden_states
        iso2 = m(ids2, x2, doc_ids=doc_ids).hidden_states
        shared = m(ids, x).hidden_states
        shared2 = m(ids2, x2).hidden_states
        alone = m(ids[:, sl], x[1:]).hidden_states  # document 1 as its own sequence
    assert not torch.allclose(iso[0, :len(a)], iso2[0, :len(a)])
    torch.testing.assert_close(iso[0, sl], iso2[0, sl], atol=1e-6, rtol=0)  # unaffected
    torch.testing.assert_close(iso[0, sl], alone[0], atol=1e-5, rtol=1e-5)  # positions restart
    assert not torch.allclose(shared[0, sl], shared2[0, sl], atol=1e-4)  # shared causal attention
    # given positions without doc_ids keep shared attention (transformers would isolate otherwise)
    with torch.no_grad():
        given = m(ids, x, position_ids=document_position_ids(doc_ids)).hidden_states
    assert not torch.allclose(given[0, sl], iso[0, sl], atol=1e-4)


# ------------------------------------------------------------------------------------ freezing

def test_frozen_vision_gets_no_grads(clip_ckpt):
    m = build(clip_ckpt).train()
    assert not m.vision.training and m.lm.training
    ids, doc_ids = packed([[document([10, 11]), document([12, 13])]], 48)
    out = m(ids, images(2), labels=pretrain_labels(ids, IMG, EOT, doc_ids=doc_ids), doc_ids=doc_ids)
    out.loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in m.vision.parameters())
    assert all(p.grad is not None for p in m.projector.parameters())
    assert all(p.grad is not None for p in m.lm.parameters())
    m.zero_grad()
    m.set_vision_frozen(False)
    assert m.vision.training
    m(ids, images(2), labels=ids).loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.vision.parameters())


# --------------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("which", ["model", "untied"])
def test_save_load_round_trip_is_identical(which, request, tmp_path):
    model = request.getfixturevalue(which)
    tied = model.config.lm["tie_word_embeddings"]
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert cfg["vision"]["open_clip_model"] == TOY_MODEL and cfg["image_token_id"] == IMG
    assert VLMConfig.from_dict(cfg) == model.config
    with safe_open(str(tmp_path / WEIGHTS_FILE), framework="pt") as f:
        keys = set(f.keys())
    assert any(k.startswith("vision.") for k in keys) and any(k.startswith("projector.") for k in keys)
    # tied: stored once
    assert len({"lm.lm_head.weight", "lm.model.embed_tokens.weight"} & keys) == (1 if tied else 2)
    loaded = OpenQwen2VL.from_pretrained(tmp_path).eval()
    assert (loaded.lm.lm_head.weight is loaded.lm.model.embed_tokens.weight) == tied
    ids, doc_ids = packed([[document([10, 11]), document([12])]], 48)
    labels = pretrain_labels(ids, IMG, EOT, doc_ids=doc_ids)
    with torch.no_grad():
        a = model(ids, images(2), labels=labels, doc_ids=doc_ids)
        b = loaded(ids, images(2), labels=labels, doc_ids=doc_ids)
    assert torch.equal(a.hidden_states, b.hidden_states) and torch.equal(a.loss, b.loss)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_paper_path_loaders_on_tiny_local_checkpoints(tmp_path):
    """The code path that loads Qwen2.5-1.5B-Instruct and SigLIP weights, on tiny stand-ins: a
    Qwen2ForCausalLM saved with save_pretrained, and an open_clip hub-style weights file."""
    torch.manual_seed(3)
    lm = Qwen2ForCausalLM(tiny_lm_config())
    lm.save_pretrained(tmp_path / "lm")
    clip = open_clip.create_model(TOY_MODEL)
    (tmp_path / "clip").mkdir()
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()},
              str(tmp_path / "clip" / "open_clip_model.safetensors"))
    m = OpenQwen2VL.from_components(TOY_MODEL, tmp_path / "lm", vision_pretrained=tmp_path / "clip",
                                    image_token_id=IMG, visual_tokens_pretrain=16, visual_tokens_sft=64)
    for k, v in lm.state_dict().items():
        assert torch.equal(m.lm.state_dict()[k], v), k
    for k, v in clip.visual.state_dict().items():
        assert torch.equal(m.vision.state_dict()[k], v), k
    assert m.config.lm_source == str(tmp_path / "lm")
    assert m.config.lm["hidden_size"] == 64 and m.config.projector_out == 64
    ids, _ = packed([[document([10, 11])]], 24)
    assert m(ids, images(1), labels=ids).loss.isfinite()


def test_timm_backed_tower_gives_its_patch_grid(tmp_path):
    """A SigLIP-like timm tower through the same open_clip path (tiny: vit_tiny, 14x14 grid)."""
    name = "test-timm-vit-tiny"
    (tmp_path / f"{name}.json").write_text(json.dumps({
        "embed_dim": 64,
        "vision_cfg": {"image_size": 224, "timm_model_name": "vit_tiny_patch16_224",
                       "timm_model_pretrained": False, "timm_pool": "", "timm_proj": "none"},
        "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 64, "heads": 2, "layers": 1}}))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    torch.manual_seed(0)
    m = OpenQwen2VL.from_components(name, tiny_lm_config(), image_token_id=IMG,
                                    visual_tokens_pretrain=49, visual_tokens_sft=196, feature_layer=-2)
    assert m.config.projector_in == 192
    x = torch.randn(2, 3, 224, 224)
    assert m.encode_images(x).shape == (2, 49, 64)
    assert m.encode_images(x, visual_tokens=196).shape == (2, 196, 64)


# ---------------------------------------------------------------------------------- evaluation

def test_greedy_generate_is_deterministic_matches_full_forward_and_stops(untied):
    model = untied
    prompt = torch.tensor([[EOT] + [IMG] * V + [NL, 10, 11, 12]])
    x = images(1)
    free = model.generate(prompt, x, max_new_tokens=6)[0]
    assert len(free) == 6 and free == model.generate(prompt, x, max_new_tokens=6)[0]
    seq = prompt
    with torch.no_grad():  # the KV-cache loop agrees with recomputing the whole sequence
        for tok in free:
            hidden = model(seq, x).hidden_states
            assert int(model.lm.lm_head(hidden[0, -1]).argmax()) == tok
            seq = torch.cat([seq, torch.tensor([[tok]])], dim=1)
    k = max(i for i, t in enumerate(free) if t not in free[:i])
    assert k >= 2  # a stop in mid-sequence
    assert model.generate(prompt, x, max_new_tokens=6, stop_token_ids=[free[k]])[0] == free[:k + 1]
    # left-padded batch of two prompts of different lengths = each prompt alone
    short = torch.tensor([[EOT] + [IMG] * V + [NL, 20]])
    batch = torch.cat([prompt, torch.cat([torch.full((1, 2), EOT), short], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :2] = 0
    both = model.generate(batch, torch.cat([x, images(1, seed=5)]), max_new_tokens=4, attention_mask=mask)
    assert both == [free[:4], model.generate(short, images(1, seed=5), max_new_tokens=4)[0]]


def test_loglikelihood_matches_forward(untied):
    model = untied
    ctx = [EOT] + [IMG] * V + [NL, 10, 11]
    x = images(1)
    greedy = model.generate(torch.tensor([ctx]), x, max_new_tokens=3)[0]
    lp, is_greedy = model.loglikelihood(ctx, greedy, x)
    assert is_greedy and lp < 0
    cont = [5, 6, 7]
    lp2, g2 = model.loglikelihood(ctx, cont, x)
    with torch.no_grad():
        logits = model.lm.lm_head(model(torch.tensor([ctx + cont]), x).hidden_states[0])
    ref = F.log_softmax(logits, -1)[len(ctx) - 1:-1].gather(-1, torch.tensor(cont)[:, None]).sum()
    assert abs(lp2 - ref.item()) < 1e-4 and (g2 == (cont == greedy))
