"""The toy world: determinism, caption truth, and corruption kinds at their configured rates."""

import io
import json

import numpy as np
import pytest
from PIL import Image, ImageFile

from oqvl.world.captions import describe
from oqvl.world.corrupt import CAPTION_KINDS, CLEAN, IMAGE_KINDS, KINDS, assign_kinds
from oqvl.world.questions import PLURAL, ask
from oqvl.world.scene import COLOURS, SHAPES, Scene, sample_scene
from oqvl.world.source import WorldConfig, generate_source, make_pair, stream_rng, true_pair

WORLD = WorldConfig()
RATES = {k: 0.06 for k in KINDS}  # 54% corrupted, 6% of each kind


def test_same_seed_same_bytes():
    a = list(generate_source(7, "ccs", 60, RATES, WORLD))
    b = list(generate_source(7, "ccs", 60, RATES, WORLD))
    assert [p.image for p in a] == [p.image for p in b]
    assert [p.caption for p in a] == [p.caption for p in b]
    assert [p.truth for p in a] == [p.truth for p in b]


def test_other_seed_or_stream_differs():
    base = [p.image for p in generate_source(7, "ccs", 30, {}, WORLD)]
    assert base != [p.image for p in generate_source(8, "ccs", 30, {}, WORLD)]
    assert base != [p.image for p in generate_source(7, "laion", 30, {}, WORLD)]


def test_pair_does_not_depend_on_source_size():
    # Pair i is a function of (seed, stream, i): a CI subset is a prefix of the full world.
    assert make_pair(0, "ccs", 5, 100, CLEAN, WORLD).image == make_pair(0, "ccs", 5, 9999, CLEAN, WORLD).image


@pytest.mark.parametrize("i", range(40))
def test_clean_caption_states_only_true_facts(i):
    scene, style, caption = true_pair(0, "ccs", i, WORLD)
    for obj in scene.objects:
        assert f"{obj.colour} {obj.shape}" in caption
        if style.mention_position:
            assert obj.cell in caption
        if style.mention_size:
            assert f"{obj.size} {obj.colour}" in caption
    # No colour-shape pair the scene lacks.
    present = {(o.colour, o.shape) for o in scene.objects}
    for colour in COLOURS:
        for shape in SHAPES:
            if (colour, shape) not in present:
                assert f"{colour} {shape}" not in caption
    if scene.glyph:
        assert f" {scene.glyph.char}" in caption


def test_image_is_decodable_and_sized():
    pair = make_pair(0, "ccs", 3, 10, CLEAN, WORLD)
    img = Image.open(io.BytesIO(pair.image))
    assert img.size == (64, 64) and img.mode == "RGB"
    # Not a blank canvas: the shapes' colours are there.
    assert len(set(img.getdata())) >= 2


def test_every_kind_at_its_rate_and_truth_consistent(monkeypatch):
    # Some libraries (lmms-eval among them) switch PIL to decoding truncated files process-wide.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    n = 500
    pairs = list(generate_source(3, "datacomp", n, RATES, WORLD))
    kinds = [p.truth["corruption"] for p in pairs]
    for kind in KINDS:
        assert abs(kinds.count(kind) / n - RATES[kind]) <= 0.01, kind
    assert abs(kinds.count(CLEAN) / n - (1 - 0.06 * len(KINDS))) <= 0.01
    for p in pairs:
        t = p.truth
        scene = Scene.from_dict(json.loads(t["scene"]))
        if t["corruption"] in (CLEAN, *IMAGE_KINDS):
            assert t["caption_true"] and p.caption == t["true_caption"]
        if t["corruption"] in ("wrong_attribute", "wrong_object", "wrong_count",
                               "generic_caption", "empty_caption"):
            assert not t["caption_true"], (t["corruption"], p.caption, t["true_caption"])
        if t["corruption"] == "empty_caption":
            assert p.caption == ""
        if t["corruption"] == "wrong_count":
            shown = Scene.from_dict(json.loads(t["caption_scene"]))
            assert len(shown.objects) != len(scene.objects)
        if t["corruption"] in IMAGE_KINDS:
            assert not t["image_ok"]
            with pytest.raises(Exception):
                Image.open(io.BytesIO(p.image)).load()
        else:
            assert t["image_ok"]
    # "other" captions are almost always false; the truth table says which are not.
    other = [p.truth["caption_true"] for p in pairs if p.truth["corruption"] == "other_caption"]
    assert sum(other) <= len(other) * 0.1


def test_assign_kinds_exact_counts_and_errors():
    kinds = assign_kinds(1000, {"empty_caption": 0.123}, stream_rng(0, "x"))
    assert kinds.count("empty_caption") == 123 and kinds.count(CLEAN) == 877
    with pytest.raises(ValueError, match="unknown"):
        assign_kinds(10, {"typo": 0.1}, stream_rng(0, "x"))
    with pytest.raises(ValueError, match="sum above 1"):
        assign_kinds(10, {"empty_caption": 0.6, "generic_caption": 0.6}, stream_rng(0, "x"))


def test_describe_changes_with_corrupted_scene():
    from oqvl.world.corrupt import corrupt_scene

    for i in range(30):
        scene, style, caption = true_pair(0, "laion", i, WORLD)
        for kind in ("wrong_attribute", "wrong_object", "wrong_count"):
            bad = corrupt_scene(kind, scene, style.mention_size, np.random.default_rng(i))
            assert describe(bad, style) != caption
    assert set(CAPTION_KINDS) | set(IMAGE_KINDS) == set(KINDS)


@pytest.mark.parametrize("seed", range(3))
def test_math_questions_are_true_of_the_scene(seed):
    rng = np.random.default_rng(seed)
    subtracted_present = 0
    for _ in range(100):
        scene = sample_scene(rng, 3, 0.25)
        colours = [o.colour for o in scene.objects]
        shapes = [o.shape for o in scene.objects]
        q = ask(scene, "count_colour", rng)
        colour = q.question.split()[2]
        assert q.answer == str(colours.count(colour)) and q.answer not in q.distractors
        q = ask(scene, "count_shape", rng)
        shape = next(s for s in SHAPES if f" {PLURAL[s]} " in q.question)
        assert q.answer == str(shapes.count(shape))
        q = ask(scene, "subtract", rng)
        colour = q.question.split()[2]
        assert q.answer == str(len(colours) - colours.count(colour))
        subtracted_present += colour in colours
        q = ask(scene, "fraction", rng)
        assert float(q.answer) == len(scene.objects) / 4 and len(q.distractors) == 3
    assert subtracted_present > 50  # half the time a colour in the scene, by design
