"""The released MLM-Filter: strict conversion of a tiny checkpoint in the real LLaVA-Unified layout,
the tower's features and preprocessing against transformers' SigLIP, the official prompt pinned,
and scoring with the official prompt equal to the reference's computation rebuilt from
transformers' own classes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import raw_toy_source
from mlm_release_fixture import ROWS, TINY_VISION, VISUAL_TOKENS, register_tiny_vision, write_tiny_mlm_release
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionModel

try:  # transformers >= 5: the PIL processor the reference's 4.50 calls SiglipImageProcessor
    from transformers import SiglipImageProcessorPil
except ImportError:
    from transformers import SiglipImageProcessor as SiglipImageProcessorPil

from oqvl.filter import mlm_filter, mlm_release
from oqvl.filter.mlm_filter import OFFICIAL_CRITERIA, official_prompt, official_prompt_ids
from oqvl.model.tokenizer import ENDOFTEXT, IM_END, IMAGE_TOKEN, build_qwen2_tokenizer, load_tokenizer
from oqvl.model.vlm import OpenQwen2VL
from oqvl.shards import iter_samples, sample_uid, shard_paths

METRIC = "image_text_matching"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlm_release")
    release, vision = write_tiny_mlm_release(root / "tiny")
    out = root / "ckpt"
    mlm_release.main(["--release", str(release), "--vision", str(vision), "--vision-arch", TINY_VISION,
                      "--out", str(out)])
    return release, vision, out


def convert_error(release, vision, tmp_path) -> str:
    with pytest.raises(SystemExit) as e:
        mlm_release.main(["--release", str(release), "--vision", str(vision), "--vision-arch", TINY_VISION,
                          "--out", str(tmp_path / "out")])
    return str(e.value.code)


# ------------------------------------------------------------------------------------ convert

def test_converted_checkpoint_holds_the_release(tiny):
    release, vision, out = tiny
    model = OpenQwen2VL.from_pretrained(out)
    tok = load_tokenizer(out)
    ref = load_file(release / "model.safetensors")
    ours = model.state_dict()
    # the reference adds <im_patch> and resizes the embeddings to len(tokenizer) (builder.py:158-163)
    assert "<im_patch>" in tok.get_vocab() and len(tok) == model.config.lm["vocab_size"] < ROWS
    assert torch.equal(ours["lm.model.embed_tokens.weight"], ref["model.embed_tokens.weight"][:len(tok)])
    assert torch.equal(ours["lm.lm_head.weight"], ours["lm.model.embed_tokens.weight"])  # tied
    assert torch.equal(ours["lm.model.layers.1.mlp.down_proj.weight"], ref["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(ours["projector.fc2.bias"], ref["model.mm_projector.mlp_projector.2.bias"])
    # the tower is the SigLIP folder's, not the checkpoint's unused copy (llava_arch.py:35)
    siglip = load_file(vision / "model.safetensors")
    patch = "vision_model.embeddings.patch_embedding.weight"
    assert torch.equal(ours["vision.trunk.patch_embed.proj.weight"], siglip[patch])
    assert not torch.equal(siglip[patch], ref[f"model.vision_tower.vision_tower.{patch}"])
    q, k, v = (siglip[f"vision_model.encoder.layers.2.self_attn.{p}_proj.weight"] for p in "qkv")
    assert torch.equal(ours["vision.trunk.blocks.2.attn.qkv.weight"], torch.cat([q, k, v]))
    c = model.config
    assert (c.visual_tokens_sft, c.vision.feature_layer, c.vision.model_cfg["vision_cfg"]["timm_act_layer"]) == \
        (VISUAL_TOKENS, -2, "gelu_tanh")
    assert tok.model_max_length == 2048  # tokenizer_model_max_length
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "convert_mlm_filter" and manifest["counts"]["vocab"] == len(tok)
    assert any(p.endswith("release/model.safetensors") for p in manifest["inputs"])


@pytest.mark.parametrize("select_layer", [-2, 2])
def test_features_equal_siglip_hidden_states(tiny, tmp_path, select_layer):
    release, vision, out = tiny
    if select_layer != -2:
        cfg = json.loads((release / "config.json").read_text())
        cfg["mm_vision_select_layer"] = select_layer
        other = tmp_path / "release"
        other.mkdir()
        for p in release.iterdir():
            (other / p.name).write_bytes(p.read_bytes())
        (other / "config.json").write_text(json.dumps(cfg))
        mlm_release.convert(other, vision, tmp_path / "ckpt", vision_arch=TINY_VISION)
        out = tmp_path / "ckpt"
    model = OpenQwen2VL.from_pretrained(out).eval()
    hf = SiglipVisionModel.from_pretrained(vision).eval()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ours = model.vision.forward_intermediates(x, indices=[model.config.vision.feature_layer], stop_early=True,
                                                  intermediates_only=True, output_fmt="NCHW")["image_intermediates"][-1]
        ref = hf(pixel_values=x, output_hidden_states=True)
        # siglip_encoder.py:38: hidden_states[select_layer], all 16 tokens, row-major
        want = ref.hidden_states[select_layer].transpose(1, 2).reshape(2, -1, 4, 4)
        torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)
        # the whole tower converted: post-norm and attention-pool head give the pooled output
        t = model.vision.trunk
        torch.testing.assert_close(t.forward_head(t.forward_features(x)), ref.pooler_output, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ref.hidden_states[-2], ref.hidden_states[-1])  # the layer matters


def test_image_transform_equals_siglip_image_processor(tiny):
    _, vision, out = tiny
    model = OpenQwen2VL.from_pretrained(out)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (70, 45, 3), dtype=np.uint8))  # not square: squashed
    want = SiglipImageProcessorPil.from_pretrained(vision)(image, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(model.image_transform()(image), want, atol=1e-5, rtol=0)


def test_strict_load_names_the_key_and_file(tiny, tmp_path):
    release, _, _ = tiny
    copy = tmp_path / "tiny"
    for d in ("release", "siglip"):
        (copy / d).mkdir(parents=True)
        for p in (release.parent / d).iterdir():
            (copy / d / p.name).write_bytes(p.read_bytes())
    weights = copy / "release" / "model.safetensors"
    sd = load_file(weights)
    missing = sd.pop("model.layers.0.mlp.up_proj.weight")
    save_file(sd, str(weights), metadata={"format": "pt"})
    msg = convert_error(copy / "release", copy / "siglip", tmp_path)
    assert msg == f"error: {weights}: missing key model.layers.0.mlp.up_proj.weight (for lm.model.layers.0.mlp.up_proj.weight)"

    sd["model.layers.0.mlp.up_proj.weight"] = missing
    sd["model.image_newline"] = torch.zeros(64)  # an "unpad" merge's parameter: no place for it
    save_file(sd, str(weights), metadata={"format": "pt"})
    msg = convert_error(copy / "release", copy / "siglip", tmp_path)
    assert msg.startswith(f"error: {weights}: unused key model.image_newline") and "\n" not in msg

    del sd["model.image_newline"]
    save_file(sd, str(weights), metadata={"format": "pt"})
    vweights = copy / "siglip" / "model.safetensors"
    vsd = load_file(vweights)
    del vsd["vision_model.encoder.layers.1.self_attn.k_proj.bias"]
    vsd["vision_model.encoder.layers.1.extra.weight"] = torch.zeros(3)
    save_file(vsd, str(vweights))
    msg = convert_error(copy / "release", copy / "siglip", tmp_path)
    assert msg == f"error: {vweights}: unused key vision_model.encoder.layers.1.extra.weight (no timm tensor for it)"
    del vsd["vision_model.encoder.layers.1.extra.weight"]
    save_file(vsd, str(vweights))
    msg = convert_error(copy / "release", copy / "siglip", tmp_path)
    assert msg == f"error: {vweights}: missing key vision_model.encoder.layers.1.self_attn.k_proj.bias"
    assert not (tmp_path / "out" / "config.json").exists()


def test_bad_release_config_is_one_line(tiny, tmp_path):
    release, vision, _ = tiny
    other = tmp_path / "release"
    other.mkdir()
    for p in release.iterdir():
        (other / p.name).write_bytes(p.read_bytes())
    cfg = json.loads((release / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "mm_vision_select_layer": 0}))
    assert convert_error(other, vision, tmp_path) == (
        f"error: {other / 'config.json'}: mm_vision_select_layer 0 is not an encoder layer's output (1..3 or -3..-1)")
    (other / "config.json").write_text(json.dumps({**cfg, "mm_projector_type": "qformer"}))
    assert "mm_projector_type 'qformer'" in convert_error(other, vision, tmp_path)


# ------------------------------------------------------------------------------------ prompt

GOLDEN_TEXT = (
    "<|im_start|>system\nYou are a helpful assistant<|im_end|><|im_start|>user\n<image>\n"
    "Text Caption: a red circle above a blue square\n\n"
    "Please evaluate if the provided text caption accurately represents the main features and objects "
    "of the image. The caption doesn't need to detail every aspect of the image, but it should capture "
    "its primary theme. Rate the overall quality of the text caption's match to the image on a scale of "
    "1-100, considering the criteria mentioned. A higher score indicates higher level of image text "
    "matching. Ensure that your scoring is nuanced and uses the entire range from 0 to 100, reflecting "
    "the subtle differences. The score should be given as an integer, with each number between 0 and "
    "100 considered as a potential score, avoiding the tendency to round to multiples of 5 or 10. "
    "Please first output a single line containing the value indicating the scores. In the subsequent "
    "line, please provide a comprehensive explanation of your evaluation, avoiding any potential bias."
    "<|im_end|><|im_start|>assistant\n")


def test_official_prompt_golden(tmp_path):
    caption = "a red circle above a blue square"
    assert official_prompt(caption, METRIC) == GOLDEN_TEXT  # v2.py:32-36, 68-80; conversation.py:394-403
    assert set(OFFICIAL_CRITERIA) == set(mlm_filter.METRICS)
    tok = build_qwen2_tokenizer(tmp_path / "tok", vocab_size=512)
    image = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    ids = official_prompt_ids(tok, caption, METRIC, 3, image)
    golden = json.loads((Path(__file__).parent / "golden" / "mlm_official_prompt.json").read_text())
    assert ids == golden["ids"]
    # what the ids are: the pieces around <image> tokenized alone, 3 slots between, then " "
    head, tail = GOLDEN_TEXT.split("<image>")
    n = len(tok(head).input_ids)
    assert ids[:n] == tok(head).input_ids and ids[n:n + 3] == [image] * 3
    assert ids[n + 3:-1] == tok(tail).input_ids and ids[-1] == tok(" ").input_ids[-1]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.decode(ids) == head + IMAGE_TOKEN * 3 + tail + " "
    # the prompt's ids are cut at 2040 (v2.py:100, 230) before the whitespace is appended
    long = official_prompt_ids(tok, "word " * 3000, METRIC, 3, image)
    assert len(long) == 2040 - 1 + 3 + 1 and long[-1] == ids[-1]


# ------------------------------------------------------------------------------------ scoring

def reference_answers(release, vision, images, captions) -> tuple[list[str], list[torch.Tensor]]:
    """The reference's computation for each pair alone, from transformers' classes and the release
    files: SiglipImageProcessor, SiglipVisionModel hidden_states[-2], AvgPoolProjector, the spliced
    embeddings into Qwen2ForCausalLM resized to len(tokenizer), greedy generate of 2 tokens.
    Returns the answers and the logits of each answer's first token."""
    cfg = json.loads((release / "config.json").read_text())
    tok = load_tokenizer(release)
    tok.add_tokens(["<im_patch>"], special_tokens=True)  # builder.py:158-160
    sd = load_file(release / "model.safetensors")
    lm_cfg = Qwen2Config(**{k: cfg[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                 "num_hidden_layers", "num_attention_heads",
                                                 "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings",
                                                 "max_position_embeddings", "rope_theta")})
    lm = Qwen2ForCausalLM(lm_cfg).eval()
    lm.load_state_dict({k: v for k, v in sd.items() if not k.startswith(("model.mm_projector", "model.vision_tower"))},
                       strict=False)
    lm.tie_weights()
    lm.resize_token_embeddings(len(tok))  # builder.py:163
    proj = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))
    proj.load_state_dict({k[len("model.mm_projector.mlp_projector."):]: v for k, v in sd.items()
                          if k.startswith("model.mm_projector.")})
    tower, processor = SiglipVisionModel.from_pretrained(vision).eval(), SiglipImageProcessorPil.from_pretrained(vision)
    answers, logits = [], []
    for image, caption in zip(images, captions):
        text = official_prompt(caption, METRIC)
        head, tail = (tok(c).input_ids for c in text.split("<image>"))  # mm_utils.py:185-198
        tail = tail + [tok(" ")["input_ids"][-1]]  # v2.py:104
        with torch.no_grad():
            feats = tower(processor(image, return_tensors="pt")["pixel_values"], output_hidden_states=True).hidden_states[-2]
            grid = feats.transpose(1, 2).reshape(1, 32, 4, 4)  # "b (h w) d -> b d h w"
            feats = proj(F.adaptive_avg_pool2d(grid, 2).flatten(2).transpose(1, 2))
            emb = lm.get_input_embeddings()
            embeds = torch.cat([emb(torch.tensor([head])), feats, emb(torch.tensor([tail]))], dim=1)
            logits.append(lm(inputs_embeds=embeds).logits[0, -1])
            new = lm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                              max_new_tokens=2, do_sample=False, pad_token_id=tok.convert_tokens_to_ids(ENDOFTEXT),
                              eos_token_id=[tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(ENDOFTEXT)])
        answers.append(tok.decode(new[0], skip_special_tokens=True))
    return answers, logits


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return raw_toy_source(tmp_path_factory.mktemp("mlm_release_raw") / "datacomp", "datacomp", 8, 3,
                          samples_per_shard=4) / "shards"


def test_score_official_equals_the_reference(tiny, shards, tmp_path):
    release, vision, out = tiny
    register_tiny_vision(tmp_path)
    samples = list(iter_samples(shard_paths(shards)))[:3]
    images = [Image.open(io.BytesIO(s["jpg"])).convert("RGB") for s in samples]
    captions = [s["txt"].decode() if isinstance(s["txt"], bytes) else s["txt"] for s in samples]
    captions[1] = captions[1] + " and a much longer tail so the prompts differ in length"
    want, want_logits = reference_answers(release, vision, images, captions)
    scorer = mlm_filter.Scorer(str(out), METRIC, 2, "cpu", prompt="official")
    assert scorer(images, captions) == want  # left-padded batch == each pair alone
    assert [scorer([im], [c])[0] for im, c in zip(images, captions)] == want
    # the next-token distribution itself, not only its argmax (a random LM answers alike)
    model = scorer.model
    for image, caption, logits in zip(images, captions, want_logits):
        ids = torch.tensor([scorer.encode(caption)])
        with torch.no_grad():
            hidden = model(ids, scorer.transform(image)[None], visual_tokens=VISUAL_TOKENS).hidden_states
        torch.testing.assert_close(model.lm.lm_head(hidden[0, -1]), logits, atol=1e-4, rtol=1e-4)


def test_score_cli_official_prompt(tiny, shards, tmp_path):
    _, _, out = tiny
    # float16, as the reference scores (builder.py:43) and as config/full.yaml runs it
    args = ["score", "--shards", str(shards), "--model", str(out), "--metric", METRIC, "--prompt", "official",
            "--dtype", "float16", "--max-new-tokens", "2", "--batch-size", "3", "--chunk", "4", "--out", str(tmp_path / "s.parquet"),
            "--failures", str(tmp_path / "f.parquet"), "--stats", str(tmp_path / "st.json")]
    mlm_filter.main(args)
    s, f = pd.read_parquet(tmp_path / "s.parquet"), pd.read_parquet(tmp_path / "f.parquet")
    uids = [sample_uid(x) for x in iter_samples(shard_paths(shards))]
    assert sorted([*s["uid"], *f["uid"]]) == sorted(uids)
    assert set(s["status"]) <= set(mlm_filter.STATUSES)
    manifest = json.loads((tmp_path / "s.manifest.json").read_text())
    assert manifest["stage"] == "mlm_score" and manifest["config"]["prompt"] == "official"
    assert manifest["config"]["dtype"] == "float16"
