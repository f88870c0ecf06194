"""Toy SFT data: the turn mix (captions, text-only option lookups, question kinds) and its checks."""

import json
import re

import numpy as np
import pandas as pd
import pytest

from oqvl.train import sft_data
from oqvl.train.sft_data import FLOAT, INTEGER, SHORT, Mix, direct_prompt, load_records, lookup_turn, toy_conversation
from oqvl.world.questions import KINDS, ask
from oqvl.world.scene import sample_scene
from oqvl.world.source import WorldConfig


def test_lookup_answer_is_the_letter_of_the_named_option():
    rng = np.random.default_rng(0)
    letters_seen = set()
    for _ in range(200):
        text, answer = lookup_turn(rng)
        named = re.match(r"Which option is (.+)\?\n", text).group(1)
        options = dict(re.findall(r"(?:\n|, |Options: )([A-D])[.:] ([^,\n]+)", text))
        assert options[answer] == named
        assert sum(v == named for v in options.values()) == 1
        letters_seen.add(answer)
    assert letters_seen == {"A", "B", "C", "D"}


def test_mix_controls_what_turns_ask():
    world = WorldConfig()
    only_exists = Mix(caption_share=0.0, lookup_share=0.0,
                      kind_weights=tuple(float(k == "exists") for k in KINDS))
    for i in range(20):
        _, conv, _ = toy_conversation(0, i, world, 3, only_exists)
        for user, gpt in zip(conv[::2], conv[1::2]):
            assert "Is there a" in user["value"]
            assert gpt["value"] in ("Yes", "No")
    lookups = Mix(caption_share=0.0, lookup_share=0.999)
    _, conv, _ = toy_conversation(0, 0, world, 4, lookups)
    assert all("Which option is" in t["value"] for t in conv[::2])
    assert conv[0]["value"].startswith("<image>\n")  # the image still opens the conversation


def test_raw_share_writes_single_questions_in_the_paper_protocols_prompt_shapes():
    from oqvl.evaluate import paper

    world, mix = WorldConfig(), Mix(caption_share=0.0, raw_share=0.5)
    made = [toy_conversation(0, i, world, 3, mix) for i in range(200)]
    raw = [(conv, fmt) for _, conv, fmt in made if fmt == "raw"]
    assert 70 < len(raw) < 130  # about half
    for conv, _ in raw:
        assert len(conv) == 2
        prompt, answer = conv[0]["value"], conv[1]["value"]
        assert prompt.startswith("<image>\n") and prompt.endswith(("\nAnswer:"))
        assert prompt.endswith((paper.MC_SUFFIX, paper.SHORT_SUFFIX))
        if prompt.endswith(paper.MC_SUFFIX):
            assert answer in "ABCD" and len(answer) == 1
    shapes = {("Question: " in c[0]["value"], c[0]["value"].endswith(paper.MC_SUFFIX)) for c, _ in raw}
    assert shapes == {(True, True), (True, False), (False, True), (False, False)}
    # The chat conversations are those raw_share = 0 makes: the format has its own random stream.
    plain = [toy_conversation(0, i, world, 3, Mix(caption_share=0.0)) for i in range(200)]
    assert all(m == p for m, p in zip(made, plain) if m[2] == "chat")


def test_cli_rejects_a_bad_mix(tmp_path):
    with pytest.raises(SystemExit, match="sum below 1"):
        sft_data.main(["--out", str(tmp_path / "x.parquet"), "--n", "2", "--caption-share", "0.6",
                       "--lookup-share", "0.5"])
    with pytest.raises(SystemExit, match="raw-share"):
        sft_data.main(["--out", str(tmp_path / "x.parquet"), "--n", "2", "--raw-share", "1.5"])
    with pytest.raises(SystemExit, match="kind-weights"):
        sft_data.main(["--out", str(tmp_path / "x.parquet"), "--n", "2", "--kind-weights", '{"colur": 1}'])
    sft_data.main(["--out", str(tmp_path / "x.parquet"), "--n", "3", "--kind-weights", '{"count": 1}',
                   "--caption-share", "0"])
    convs = [json.loads(c) for c in pd.read_parquet(tmp_path / "x.parquet")["conversations"]]
    assert all("How many objects" in t["value"] for c in convs for t in c[::2])
    manifest = json.loads((tmp_path / "x.manifest.json").read_text())  # beside the file it describes
    assert manifest["stage"] == "sft_data" and manifest["work"] == {"amount": 3, "unit": "conversations"}
    assert list(manifest["files"]) == ["x.parquet"] and manifest["config"]["kind_weights"] == '{"count": 1}'
    assert not (tmp_path / "manifest.json").exists()


def test_numbers_are_asked_with_either_hint():
    rng = np.random.default_rng(3)
    scene = sample_scene(rng, 3, 0.0)
    count, fraction, colour = (ask(scene, k, rng) for k in ("subtract", "fraction", "colour"))
    assert direct_prompt(count, True) == (f"{count.question}\n{INTEGER}", count.answer)
    assert direct_prompt(count, False) == (f"{count.question}\n{SHORT}", count.answer)
    # lmms-eval's MathVista format prompt asks floats with two decimals; the answer follows it.
    text, answer = direct_prompt(fraction, True)
    assert text.endswith(FLOAT) and answer == f"{len(scene.objects) / 4:.2f}"
    assert direct_prompt(fraction, False)[1] == str(round(len(scene.objects) / 4, 2))
    assert direct_prompt(colour, True) == (f"{colour.question}\n{SHORT}", colour.answer)


def test_math_kinds_reach_the_data(tmp_path):
    weights = json.dumps({"count_colour": 1, "subtract": 1, "fraction": 1})
    sft_data.main(["--out", str(tmp_path / "x.parquet"), "--n", "40", "--kind-weights", weights,
                   "--caption-share", "0", "--turns", "3"])
    users = [t["value"] for c in pd.read_parquet(tmp_path / "x.parquet")["conversations"]
             for t in json.loads(c)[::2]]
    for pattern in (r"How many (red|green|blue|yellow) objects", "Subtract all", "What fraction"):
        assert any(re.search(pattern, u) for u in users), pattern
    assert not any("What colour" in u or "Is there a" in u for u in users)


@pytest.mark.parametrize("image", ["../outside.png", "a/../../outside.png", "/etc/hostname"])
def test_llava_image_path_outside_the_image_root_is_refused(tmp_path, image):
    """A path taken from data stays under its folder: a LLaVA record cannot make the trainer read
    another file of the machine."""
    data = tmp_path / "llava.json"
    data.write_text(json.dumps([{"id": "r1", "image": image, "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A square."}]}]))
    with pytest.raises(ValueError, match=rf"^{data} id r1: path '{re.escape(image)}' is outside {tmp_path / 'images'}$"):
        load_records(data, tmp_path / "images")


def test_llava_image_path_inside_the_image_root_is_read(tmp_path):
    (tmp_path / "images" / "sub").mkdir(parents=True)
    (tmp_path / "images" / "sub" / "a.png").write_bytes(b"png bytes")
    data = tmp_path / "llava.json"
    data.write_text(json.dumps([{"id": "r1", "image": "sub/./a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A square."}]}]))
    (rec,) = load_records(data, tmp_path / "images")
    assert rec.image() == b"png bytes"
