"""Benchmark files: the toy benchmarks in the real column schemas, balanced answers, POPE's negative
sampling, images disjoint from training, the shuffled-image control, the converters of the real
releases (on tiny fixtures in their schemas) and the task YAMLs."""

import base64
import io
import json
from collections import Counter, defaultdict
from itertools import combinations

import pandas as pd
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, Features, Image, List, Value, load_dataset
from PIL import Image as PILImage

from oqvl.evaluate import BENCHMARKS, SPLITS, toy
from oqvl.evaluate.convert import convert
from oqvl.evaluate.schemas import (
    FEATURES,
    check_schema,
    data_file,
    derangement,
    image_groups,
)
from oqvl.evaluate.tasks import task_name, write_task_dir
from oqvl.world.scene import COLOURS, SHAPES, png_bytes, render, sample_scene
from oqvl.world.source import WorldConfig, stream_rng

SIZES = {"MMBench": 20, "SEEDBench": 40, "MMStar": 40, "MathVista": 56, "POPE": 12}


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_data")
    toy.main(["--out", str(out), "--sizes", json.dumps(SIZES), "--exclude", "ccs:200"])
    return out / "test"


def table(path) -> pd.DataFrame:
    return pq.read_table(path).to_pandas()


# ------------------------------------------------------------------------------------ schemas

@pytest.mark.parametrize("benchmark", BENCHMARKS)
def test_toy_files_have_the_real_schemas_and_load_as_lmms_eval_loads_them(toy_dir, benchmark, tmp_path):
    for shuffled in (False, True):
        path = data_file(toy_dir, benchmark, shuffled)
        check_schema(path, benchmark)
        ds = load_dataset("parquet", data_files={"test": str(path)}, split="test", cache_dir=str(tmp_path))
        assert ds.features == FEATURES[benchmark]
        image = ds[0]["image" if benchmark != "MathVista" else "decoded_image"]
        image = image[0] if benchmark == "SEEDBench" else image
        assert isinstance(image, PILImage.Image) and image.size == (64, 64)


def test_schema_check_rejects_near_misses(tmp_path):
    good = FEATURES["POPE"]
    row = {"id": "0", "question_id": "1", "question": "q", "answer": "yes", "image_source": "s",
           "image": {"bytes": png_bytes(PILImage.new("RGB", (4, 4))), "path": None}, "category": "random"}
    Dataset.from_list([row], features=good).to_parquet(str(tmp_path / "ok.parquet"))
    check_schema(tmp_path / "ok.parquet", "POPE")
    renamed = Features({("questionid" if k == "question_id" else k): v for k, v in good.items()})
    Dataset.from_list([{("questionid" if k == "question_id" else k): v for k, v in row.items()}],
                      features=renamed).to_parquet(str(tmp_path / "renamed.parquet"))
    with pytest.raises(ValueError, match="columns"):
        check_schema(tmp_path / "renamed.parquet", "POPE")
    plain = pd.DataFrame([dict(row, image=row["image"])])  # image as a plain struct, no features
    plain.to_parquet(tmp_path / "plain.parquet")
    with pytest.raises(ValueError):
        check_schema(tmp_path / "plain.parquet", "POPE")


# ---------------------------------------------------------------------------------- balance

def test_answer_letters_are_balanced(toy_dir):
    mmb = table(data_file(toy_dir, "MMBench"))
    base = mmb[mmb["index"] < 1_000_000]
    assert Counter(base["answer"]) == {c: SIZES["MMBench"] // 4 for c in "ABCD"}
    assert Counter(mmb["answer"]) == {c: SIZES["MMBench"] for c in "ABCD"}
    for name in ("SEEDBench", "MMStar"):
        assert Counter(table(data_file(toy_dir, name))["answer"]) == {c: SIZES[name] // 4 for c in "ABCD"}
    mv = table(data_file(toy_dir, "MathVista"))
    mc = mv[mv["question_type"] == "multi_choice"]
    letters = [("ABCD")[list(ch).index(a)] for ch, a in zip(mc["choices"], mc["answer"])]
    assert Counter(letters) == {c: len(mc) // 4 for c in "ABCD"}
    assert set(mv["answer_type"]) == {"integer", "float", "text"}
    assert set(mv.loc[mv["answer_type"] == "float", "precision"]) == {2.0}
    assert mv["metadata"].map(lambda m: m["split"]).eq("testmini").all()
    pope = table(data_file(toy_dir, "POPE"))
    for _, part in pope.groupby("category"):
        assert Counter(part["answer"]) == {"yes": len(part) // 2, "no": len(part) // 2}


def test_mmbench_circular_copies_rotate_the_options(toy_dir):
    mmb = table(data_file(toy_dir, "MMBench"))
    for q, group in mmb.groupby(mmb["index"] % 1_000_000):
        assert sorted(group["index"]) == [q + k * 1_000_000 for k in range(4)]
        assert len({r["bytes"] for r in group["image"]}) == 1
        options = [tuple(r[c] for c in "ABCD") for _, r in group.sort_values("index").iterrows()]
        assert all(options[k] == options[0][k:] + options[0][:k] for k in range(4))
        right = {r[r["answer"]] for _, r in group.iterrows()}
        assert len(right) == 1  # the same option text is right in every copy
    assert mmb["hint"].notna().any() and mmb["hint"].isna().any()


def test_manifest_counts_the_questions_written(toy_dir):
    manifest = json.loads((toy_dir.parent / "manifest.json").read_text())
    questions = sum(pq.read_metadata(data_file(toy_dir.parent / split, b)).num_rows
                    for split in SPLITS for b in BENCHMARKS)  # not the twins
    assert manifest["stage"] == "eval_data" and manifest["work"] == {"amount": questions, "unit": "questions"}
    assert manifest["config"]["sizes"] == SIZES and manifest["config"]["exclude"] == {"ccs": 200}
    assert set(manifest["files"]) == {f"{split}/{data_file(toy_dir, b, s).name}" for split in SPLITS
                                      for b in BENCHMARKS for s in (False, True)}


def test_generation_is_deterministic(toy_dir, tmp_path):
    toy.main(["--out", str(tmp_path), "--sizes", json.dumps({"MMStar": SIZES["MMStar"]}), "--exclude", "ccs:200"])
    assert data_file(tmp_path / "test", "MMStar").read_bytes() == data_file(toy_dir, "MMStar").read_bytes()


# -------------------------------------------------------------------------------------- POPE

def test_pope_negatives_follow_pope_rules_on_given_statistics():
    present = [("red", "circle"), ("blue", "square")]
    freq = Counter({("green", "cross"): 9, ("yellow", "cross"): 8, ("red", "circle"): 20, ("red", "cross"): 1})
    cooc = Counter({frozenset({("red", "circle"), ("yellow", "triangle")}): 5,
                    frozenset({("blue", "square"), ("green", "circle")}): 3})
    rng = stream_rng(0, "t")
    assert toy.pope_negatives(present, 2, "popular", freq, cooc, rng) == [("green", "cross"), ("yellow", "cross")]
    assert toy.pope_negatives(present, 2, "adversarial", freq, cooc, rng) == [("yellow", "triangle"), ("green", "circle")]
    for _ in range(20):
        neg = toy.pope_negatives(present, 3, "random", freq, cooc, rng)
        assert len(set(neg)) == 3 and not set(neg) & set(present)


def test_pope_file_matches_pope_sampling_over_its_own_images(toy_dir):
    pope = table(data_file(toy_dir, "POPE"))
    parse = pope["question"].str.extract(r"Is there a (\w+) (\w+) in the image\?")
    pope["object"] = list(zip(parse[0], parse[1]))
    # Every accepted image has 3 distinct objects, all asked as yes: the file holds its truth.
    truth = {img: sorted(set(g.loc[g["answer"] == "yes", "object"]))
             for img, g in pope[pope["category"] == "random"].groupby("image_source")}
    assert all(len(objs) == 3 for objs in truth.values())
    freq = Counter(o for objs in truth.values() for o in objs)
    cooc = Counter(frozenset(p) for objs in truth.values() for p in combinations(objs, 2))
    for (setting, img), g in pope.groupby(["category", "image_source"]):
        yes = sorted(g.loc[g["answer"] == "yes", "object"])
        no = set(g.loc[g["answer"] == "no", "object"])
        assert yes == truth[img] and len(no) == 3 and not no & set(yes)
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in truth[img]]
        if setting == "popular":
            assert no == set(sorted(absent, key=lambda o: (-freq[o], o))[:3])
        elif setting == "adversarial":
            score = {o: sum(cooc[frozenset((t, o))] for t in truth[img]) for o in absent}
            assert no == set(sorted(absent, key=lambda o: (-score[o], -freq[o], o))[:3])
    assert len({tuple(sorted(g["object"])) for _, g in pope.groupby(["category", "image_source"])}) > 1


# --------------------------------------------------------------------------- disjointness

def test_no_benchmark_image_equals_a_training_image(tmp_path):
    # A one-object world is small enough for a 4000-image stream to cover a good part of it.
    world = ["--max-objects", "1", "--glyph-prob", "0"]
    sizes = json.dumps({"SEEDBench": 60, "POPE": 4})
    w = WorldConfig(64, 1, 0.0)
    train = {png_bytes(render(sample_scene(stream_rng(0, "sft", i), 1, 0.0), 64)) for i in range(4000)}

    def images(out):
        seed = table(data_file(out / "test", "SEEDBench"))
        return {im[0]["bytes"] for im in seed["image"]}

    toy.main(["--out", str(tmp_path / "open"), "--sizes", sizes, "--no-control", *world])
    assert images(tmp_path / "open") & train  # without the exclusion, collisions happen
    toy.main(["--out", str(tmp_path / "closed"), "--sizes", sizes, "--no-control", *world,
              "--exclude", "sft:4000"])
    assert not images(tmp_path / "closed") & train
    assert len(toy.training_keys(0, {"sft": 4000}, w)) > 100


def test_training_streams_draw_image_i_as_the_exclusion_assumes():
    # The exclusion lists image i of a stream as the first scene drawn from stream_rng(seed, stream,
    # i); each training stream's generator must keep doing so, or benchmark images could repeat them.
    from oqvl.filter.train_clip import STREAM as CLIP_STREAM
    from oqvl.train.sft_data import STREAM, toy_conversation
    from oqvl.world.corrupt import CLEAN
    from oqvl.world.source import make_pair

    assert (CLIP_STREAM, STREAM) == ("clip_seed", "sft")  # the names rules/evaluate.smk excludes
    w = WorldConfig()
    for i in range(5):
        expected = png_bytes(render(sample_scene(stream_rng(3, STREAM, i), w.max_objects, w.glyph_prob)))
        assert toy_conversation(3, i, w, turns=2)[0] == expected
        web = png_bytes(render(sample_scene(stream_rng(3, "ccs", i), w.max_objects, w.glyph_prob)))
        assert make_pair(3, "ccs", i, 10, CLEAN, w).image == web
        assert toy.scene_key(sample_scene(stream_rng(3, "ccs", i), w.max_objects, w.glyph_prob)) in \
            toy.training_keys(3, {"ccs": 5}, w)


# ------------------------------------------------------------------------------ the control

def test_derangement_has_no_fixed_point():
    for n in (2, 3, 10, 57):
        for seed in range(5):
            perm = derangement(n, stream_rng(seed, "d"))
            assert sorted(perm) == list(range(n)) and all(perm[i] != i for i in range(n))
    with pytest.raises(ValueError):
        derangement(1, stream_rng(0, "d"))


@pytest.mark.parametrize("benchmark", BENCHMARKS)
def test_control_moves_every_image_and_keeps_everything_else(toy_dir, benchmark):
    col = "decoded_image" if benchmark == "MathVista" else "image"
    real, shuf = pq.read_table(data_file(toy_dir, benchmark)), pq.read_table(data_file(toy_dir, benchmark, True))
    assert real.drop([col]).equals(shuf.drop([col]))
    assert real.schema.metadata == shuf.schema.metadata

    def content(t):
        groups, images = image_groups(benchmark, t), t.column(col).to_pylist()
        by_group = defaultdict(set)
        for g, im in zip(groups, images):
            by_group[g].add(json.dumps(im, default=lambda b: base64.b64encode(b).decode()))
        assert all(len(v) == 1 for v in by_group.values())  # a group keeps one image for all rows
        return {g: next(iter(v)) for g, v in by_group.items()}

    a, b = content(real), content(shuf)
    assert all(a[g] != b[g] for g in a)
    assert Counter(a.values()) == Counter(b.values())  # the same pictures, moved


# ------------------------------------------------------------------------ converters (real)

def png(colour=(200, 10, 10)):
    buf = io.BytesIO()
    PILImage.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def img(colour=(200, 10, 10)):
    return {"bytes": png(colour), "path": None}


def write_release(path, rows, features):
    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_list(rows, features=Features(features)).to_parquet(str(path))


S = Value("string")


def test_convert_real_releases(tmp_path):
    src = tmp_path / "releases"
    # MMBench as lmms-lab/MMBench (en) has it, with an extra column; one test-split row to drop.
    mmb = [{"index": i + k * 1_000_000, "question": "Q?", "hint": None if i else "h", "answer": "ABCD"[k],
            "A": "a", "B": "b", "C": "c", "D": None, "category": "ocr", "image": img((i, 0, 0)),
            "source": "s", "L2-category": "l2", "comment": None, "split": "dev", "extra": "x"}
           for i in range(2) for k in range(3)]
    mmb.append(dict(mmb[0], index=99, split="test"))
    write_release(src / "MMBench/en/dev-00000.parquet", mmb,
                  {**{k: S for k in mmb[0]}, "index": Value("int64"), "image": Image()})
    # SEED-Bench: image and video rows, question_type_id int16, a segment column.
    seed = [{"answer": "A", "choice_a": "1", "choice_b": "2", "choice_c": "3", "choice_d": "4",
             "data_id": f"{i}.jpg", "data_type": "image" if i < 3 else "video", "question": "Q?",
             "question_id": str(i), "question_type_id": 5, "image": [img((0, i, 0))], "segment": None}
            for i in range(5)]
    write_release(src / "SEED/data/test-00000.parquet", seed,
                  {**{k: S for k in seed[0]}, "question_type_id": Value("int16"),
                   "image": List(Image()), "segment": List(Value("int64"))})
    star = [{"index": i, "question": "Q?\nOptions: A: x, B: y, C: z, D: w", "image": img((0, 0, i)),
             "answer": "A", "category": "math", "l2_category": "geometry",
             "meta_info": {"source": "s", "split": "val", "image_path": f"{i}.png"}} for i in range(3)]
    write_release(src / "MMStar/mmstar.parquet", star, FEATURES["MMStar"])
    mv_meta = {"category": "math-targeted-vqa", "context": "c", "grade": "g", "img_height": 8,
               "img_width": 8, "language": "english", "skills": ["s"], "source": "s", "task": "t"}
    mv = [{"pid": str(i), "question": "Q?", "image": f"images/{i}.jpg", "decoded_image": img((i, i, 0)),
           "choices": None, "unit": None, "precision": 1.0, "answer": "1.5", "question_type": "free_form",
           "answer_type": "float", "metadata": dict(mv_meta, split="testmini" if i < 2 else "test"),
           "query": "q"} for i in range(3)]
    write_release(src / "MathVista/data/testmini.parquet", mv, FEATURES["MathVista"])
    pope = [{"id": str(i), "question_id": str(i), "question": "Is there a dog in the image?",
             "answer": "yes" if i % 2 else "no", "image_source": f"img{i // 2}", "image": img((i // 2, 9, 9)),
             "category": "random"} for i in range(6)]
    write_release(src / "POPE/data/test-00000.parquet", pope, FEATURES["POPE"])

    out = tmp_path / "eval_data"
    sources = {"MMBench": src / "MMBench/en", "SEEDBench": src / "SEED/data/*.parquet",
               "MMStar": src / "MMStar/mmstar.parquet", "MathVista": src / "MathVista/data", "POPE": src / "POPE/data"}
    expected_rows = {"MMBench": 6, "SEEDBench": 3, "MMStar": 3, "MathVista": 2, "POPE": 6}
    for name, source in sources.items():
        counts = convert(name, str(source), out, control=True, seed=0)
        assert counts["rows"] == expected_rows[name], name
        check_schema(data_file(out, name), name)
        check_schema(data_file(out, name, True), name)
    got = table(data_file(out, "MMBench"))
    assert list(got.columns) == list(FEATURES["MMBench"]) and set(got["split"]) == {"dev"}
    assert got["image"][0]["bytes"] == png((0, 0, 0))
    seed_out = table(data_file(out, "SEEDBench"))
    assert set(seed_out["data_type"]) == {"image"} and seed_out["question_type_id"].dtype == "int64"

    from oqvl.evaluate import convert as convert_cli

    convert_cli.main(["--out", str(tmp_path / "cli"), *(f"--source={b}={s}" for b, s in sources.items())])
    manifest = json.loads((tmp_path / "cli" / "manifest.json").read_text())
    assert manifest["work"] == {"amount": sum(expected_rows.values()), "unit": "questions"}
    assert all(f.startswith("test/") for f in manifest["files"])  # a release is the test split
    assert manifest["stage"] == "eval_data" and len(manifest["files"]) == 2 * len(BENCHMARKS)


def test_convert_official_mmbench_tsv(tmp_path):
    b64 = base64.b64encode(png((1, 2, 3))).decode()
    rows = [{"index": 0, "question": "Q?", "hint": "", "A": "a", "B": "b", "C": "c", "D": "",
             "answer": "B", "category": "ocr", "image": b64, "source": "s", "l2-category": "l2",
             "comment": "", "split": "dev"},
            {"index": 1_000_000, "question": "Q?", "hint": "", "A": "b", "B": "c", "C": "a", "D": "",
             "answer": "A", "category": "ocr", "image": "0", "source": "s", "l2-category": "l2",
             "comment": "", "split": "dev"}]
    (tmp_path / "MMBench_DEV_EN.tsv").write_text(pd.DataFrame(rows).to_csv(sep="\t", index=False))
    convert("MMBench", str(tmp_path / "MMBench_DEV_EN.tsv"), tmp_path / "out", control=False, seed=0)
    got = table(data_file(tmp_path / "out", "MMBench"))
    assert [r["bytes"] for r in got["image"]] == [png((1, 2, 3))] * 2  # "0" names row 0's image
    assert got["hint"].isna().all() and got["D"].isna().all() and list(got["L2-category"]) == ["l2", "l2"]


# ------------------------------------------------------------------------------ task YAMLs

def test_task_dir_binds_the_data_and_adds_controls(tmp_path, toy_dir):
    names = write_task_dir(tmp_path / "tasks", toy_dir)
    assert len(names) == 22 and task_name("POPE", "paper", True, "likelihood") in names
    text = (tmp_path / "tasks" / "oqvl_mmbench_lmms_shuffled.yaml").read_text()
    assert "task: oqvl_mmbench_lmms_shuffled\n" in text
    assert f"test: {data_file(toy_dir.resolve(), 'MMBench', True)}\n" in text
    plain = (tmp_path / "tasks" / "oqvl_mmbench_lmms.yaml").read_text()
    assert f"test: {data_file(toy_dir.resolve(), 'MMBench')}\n" in plain
    assert len(write_task_dir(tmp_path / "tasks", toy_dir, ["POPE"], ["paper"], control=False)) == 2
    assert sorted(p.name for p in (tmp_path / "tasks").glob("*.yaml")) == [
        "oqvl_pope_paper.yaml", "oqvl_pope_paper_likelihood.yaml"]


# ------------------------------------------------------------------------ splits and phrasing

def test_heldout_split_rewords_the_test_items_and_nothing_else(toy_dir):
    for benchmark in BENCHMARKS:
        test, held = table(data_file(toy_dir, benchmark)), table(data_file(toy_dir.parent / "heldout", benchmark))
        assert list(test.columns) == list(held.columns) and len(test) == len(held), benchmark
        question = "query" if benchmark == "MathVista" else "question"
        same = [c for c in test.columns if c not in (question, "question")]
        assert test[same].astype(str).equals(held[same].astype(str)), benchmark  # images, answers, options
        assert not set(test["question"]) & set(held["question"]), benchmark


def test_no_training_data_uses_the_heldout_wording(tmp_path):
    """Every held-out template's fixed words (its text between slots) are absent from the toy SFT
    data and every training template; the test split's wording is the training one."""
    import re

    from oqvl.train.sft_data import generate
    from oqvl.world.questions import TEMPLATES

    generate(tmp_path / "sft.parquet", 400, 0, WorldConfig(64, 3, 0.25), turns=4)
    sft = " ".join(pd.read_parquet(tmp_path / "sft.parquet", columns=["conversations"])["conversations"])
    train = " ".join(t for t, _ in TEMPLATES.values())
    for kind, (trained, heldout) in TEMPLATES.items():
        for piece in (p.strip() for p in re.split(r"\{\w+\}", heldout) if len(p.strip()) > 3):
            assert piece not in sft and piece not in train, (kind, piece)
    assert "What colour is the" in sft  # the training wording is there


def test_dev_split_draws_its_own_images_never_a_test_one(toy_dir):
    for benchmark in BENCHMARKS:
        col = schema_image_column(benchmark)
        test, dev = table(data_file(toy_dir, benchmark)), table(data_file(toy_dir.parent / "dev", benchmark))
        assert len(dev) == len(test)
        test_images = {im["bytes"] for im in _images(test[col])}
        assert not {im["bytes"] for im in _images(dev[col])} & test_images, benchmark


def schema_image_column(benchmark):
    from oqvl.evaluate.schemas import IMAGE_COLUMN
    return IMAGE_COLUMN[benchmark]


def _images(column):
    return [im for cell in column for im in (cell if isinstance(cell, (list, tuple)) or hasattr(cell, "tolist")
                                             and not isinstance(cell, dict) else [cell])]
