"""Toy SFT data: the turn mix (captions, text-only option lookups, question kinds) and its checks."""

import json
import re

import numpy as np
import pandas as pd
import pytest

from oqvl.train import sft_data
from oqvl.train.sft_data import Mix, lookup_turn, toy_conversation
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
    only_exists = Mix(caption_share=0.0, lookup_share=0.0, kind_weights=(0, 0, 0, 0, 0, 1))
    for i in range(20):
        _, conv = toy_conversation(0, i, world, 3, only_exists)
        for user, gpt in zip(conv[::2], conv[1::2]):
            assert "Is there a" in user["value"]
            assert gpt["value"] in ("Yes", "No")
    lookups = Mix(caption_share=0.0, lookup_share=0.999)
    _, conv = toy_conversation(0, 0, world, 4, lookups)
    assert all("Which option is" in t["value"] for t in conv[::2])
    assert conv[0]["value"].startswith("<image>\n")  # the image still opens the conversation


def test_cli_rejects_a_bad_mix(tmp_path):
    with pytest.raises(SystemExit, match="sum below 1"):
        sft_data.main(["--out", str(tmp_path / "x.parquet"), "--n", "2", "--caption-share", "0.6",
                       "--lookup-share", "0.5"])
    with pytest.raises(SystemExit, match="kind-weights"):
        sft_data.main(["--out", str(tmp_path / "x.parquet"), "--n", "2", "--kind-weights", '{"colur": 1}'])
    sft_data.main(["--out", str(tmp_path / "x.parquet"), "--n", "3", "--kind-weights", '{"count": 1}',
                   "--caption-share", "0"])
    convs = [json.loads(c) for c in pd.read_parquet(tmp_path / "x.parquet")["conversations"]]
    assert all("How many objects" in t["value"] for c in convs for t in c[::2])
