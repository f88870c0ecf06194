"""Toy benchmarks drawn from the toy world, written in the five real column schemas.

    python -m oqvl.evaluate.toy --out results/eval_data --seed 0 \
        --sizes '{"MMBench": 100, "SEEDBench": 300, "MMStar": 300, "MathVista": 350, "POPE": 60}' \
        --exclude ccs:3000 --exclude datacomp:8000 --exclude laion:5000 --exclude clip_seed:12000 \
        --exclude sft:8000

Three splits, each a folder of the five files (and their shuffled-image twins):
    test/     the reported benchmark, asked in the training phrasing
    heldout/  the same images, questions and answers, asked in the held-out phrasing
              (oqvl.world.questions.TEMPLATES: wording no training data uses), also reported
    dev/      instances for tuning: images from their own streams ("bench_mmbench_dev", ...), none
              equal to a test image, in the training phrasing; never reported

Every benchmark draws its images from its own stream ("bench_mmbench", ...). A stream name alone
does not keep images apart in a world this small (about one scene in five of one stream also
occurs, jitter included, among the 36k training images of the default config), so each image
whose scene equals one of the excluded training streams' scenes is redrawn: no benchmark image is
byte-identical to a training image. The same objects in the same cells with another sub-cell
jitter can still occur (a 2x2 world has few scenes); docs/evaluation.md gives the rate.

Questions come from `oqvl.world.questions.ask`, the facts SFT trains on. Answers are balanced:
each letter is the answer of n/4 questions (to within one), yes and no are exactly half of POPE.

    MMBench    colour / shape / position / count / character, 4 options, hint on a quarter of the
               questions, 4 circular copies per question (options rotated, index + k * 1e6)
    SEEDBench  the same kinds, choice_a..choice_d, question_type_id by SEED's dimensions
    MMStar     the same kinds, options inline ("Options: A: red, B: ..."), categories and
               l2 categories from MMStar's taxonomy
    MathVista  counting and arithmetic over shapes: integer answers (totals, per colour, per shape,
               "Subtract all red objects. How many objects are left?"), float answers (fraction of
               the four grid cells holding a shape, precision 2), and multiple choice
    POPE       "Is there a {colour} {shape} in the image?" on images with 3 distinct objects (fewer
               when max_objects < 3): each image's objects as yes questions, as many absent objects
               as no questions, chosen as POPE chooses them: random (uniform), popular (most
               frequent objects over the benchmark's images), adversarial (most frequent
               co-occurring with the image's objects)
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from collections.abc import Callable
from itertools import combinations
from pathlib import Path

import numpy as np

from ..io import sha256_file
from ..manifest import manifest_path, write_manifest
from ..world.questions import FLOAT_KINDS, Question, ask, letters, phrase
from ..world.scene import COLOURS, SHAPES, Scene, png_bytes, render, sample_scene
from ..world.source import WorldConfig, stream_rng
from . import BENCHMARKS, SPLITS
from .schemas import CIRCULAR_OFFSET, data_file, questions_written, shuffle_images, write_rows

DEFAULT_SIZES = {"MMBench": 100, "SEEDBench": 300, "MMStar": 300, "MathVista": 350, "POPE": 60}
"""MMBench: questions (x4 circular rows); POPE: images (x 2k questions x 3 settings); others: rows."""

SOURCE = "oqvl-toy"
MC_KINDS = ("colour", "shape", "position", "count", "character")
HINT = "The image shows coloured shapes on a grey background, one in each occupied cell of a 2x2 grid."

MMBENCH_CATEGORY = {  # kind -> (category, L2-category), in MMBench's vocabulary where it fits
    "colour": ("attribute_recognition", "finegrained_perception (instance-level)"),
    "shape": ("object_recognition", "finegrained_perception (instance-level)"),
    "position": ("object_localization", "finegrained_perception (instance-level)"),
    "count": ("object_counting", "finegrained_perception (cross-instance)"),
    "character": ("ocr", "finegrained_perception (instance-level)"),
}
SEED_DIMENSION = {"shape": 2, "colour": 3, "position": 4, "count": 5, "character": 9}
"""SEED-Bench's question_type_id: 2 instance identity, 3 attributes, 4 location, 5 counting, 9 text."""
MMSTAR_CATEGORY = {
    "colour": ("fine-grained perception", "recognition"),
    "shape": ("fine-grained perception", "recognition"),
    "character": ("fine-grained perception", "recognition"),
    "position": ("fine-grained perception", "localization"),
    "count": ("fine-grained perception", "object counting"),
}
POPE_CATEGORIES = ("adversarial", "popular", "random")


# ------------------------------------------------------------------------------ scenes

def scene_key(scene: Scene) -> str:
    """Everything that decides a rendered image: objects, glyph and jitter."""
    return json.dumps([scene.to_dict(), [list(j) for j in scene.jitter]], sort_keys=True)


def training_keys(seed: int, streams: dict[str, int], world: WorldConfig) -> set[str]:
    """Scene keys of images 0..n-1 of each training stream (image i of a stream is the scene
    drawn first from stream_rng(seed, stream, i), as oqvl.world.source.true_pair draws it)."""
    keys = set()
    for stream, n in streams.items():
        for i in range(n):
            keys.add(scene_key(sample_scene(stream_rng(seed, stream, i), world.max_objects,
                                            world.glyph_prob)))
    return keys


class Draw:
    """Scenes of one benchmark stream, skipping excluded (training) scenes and scenes a question
    cannot be asked about. Item i is a pure function of (seed, stream, i, excluded set)."""

    def __init__(self, seed: int, stream: str, world: WorldConfig, excluded: set[str], phrasing: str = "train"):
        self.seed, self.stream, self.world, self.excluded = seed, stream, world, excluded
        self.phrasing = phrasing  # the wording of every question (oqvl.world.questions.PHRASINGS)
        self.redrawn_training = 0
        self.drawn: set[str] = set()  # keys of the scenes this benchmark shows

    def __call__(self, i: int, accept: Callable[[Scene, np.random.Generator], object]):
        for attempt in range(10_000):
            rng = stream_rng(self.seed, self.stream, i, attempt)
            scene = sample_scene(rng, self.world.max_objects, self.world.glyph_prob)
            if scene_key(scene) in self.excluded:
                self.redrawn_training += 1
                continue
            got = accept(scene, rng)
            if got is not None:
                self.drawn.add(scene_key(scene))
                return scene, rng, got
        raise RuntimeError(f"{self.stream} item {i}: no acceptable scene in 10000 draws")

    def png(self, scene: Scene) -> dict:
        return {"bytes": png_bytes(render(scene, self.world.image_size)), "path": None}


def balanced(n: int, k: int, rng: np.random.Generator) -> list[int]:
    """n answer positions in [0, k), each used n // k or n // k + 1 times, in random order."""
    return [int(x) for x in rng.permutation(np.arange(n) % k)]


def mc_kinds(world: WorldConfig) -> tuple[str, ...]:
    """The lettered kinds this world can ask (no character questions without glyphs)."""
    return tuple(k for k in MC_KINDS if k != "character" or world.glyph_prob > 0)


def mc_question(draw: Draw, i: int, kind: str, answer_index: int) -> tuple[Scene, Question, list[str]]:
    scene, rng, q = draw(i, lambda s, r: ask(s, kind, r, phrasing=draw.phrasing))
    options, _ = q.options(rng, 4, answer_index=answer_index)
    return scene, q, options


# ---------------------------------------------------------------------------- builders

def build_mmbench(n: int, draw: Draw, rng: np.random.Generator) -> list[dict]:
    answers, rows, kinds = balanced(n, 4, rng), [], mc_kinds(draw.world)
    for i in range(n):
        kind = kinds[i % len(kinds)]
        scene, q, options = mc_question(draw, i, kind, answers[i])
        image = draw.png(scene)
        hint = HINT if stream_rng(draw.seed, draw.stream + "_hint", i).random() < 0.25 else None
        category, l2 = MMBENCH_CATEGORY[kind]
        for k in range(4):  # circular copy k: option at letter L is the original option L + k
            rotated = [options[(j + k) % 4] for j in range(4)]
            rows.append({
                "index": i + k * CIRCULAR_OFFSET, "question": q.question, "hint": hint,
                "answer": letters(4)[rotated.index(q.answer)],
                **dict(zip(letters(4), rotated)), "category": category, "image": image,
                "source": SOURCE, "L2-category": l2, "comment": None, "split": "dev",
            })
    return rows


def build_seedbench(n: int, draw: Draw, rng: np.random.Generator) -> list[dict]:
    answers, rows, kinds = balanced(n, 4, rng), [], mc_kinds(draw.world)
    for i in range(n):
        kind = kinds[i % len(kinds)]
        scene, q, options = mc_question(draw, i, kind, answers[i])
        rows.append({
            "answer": letters(4)[answers[i]],
            **{f"choice_{c}": o for c, o in zip("abcd", options)},
            "data_id": f"{draw.stream}/{i:06d}.png", "data_type": "image", "question": q.question,
            "question_id": str(i), "question_type_id": SEED_DIMENSION[kind],
            "image": [draw.png(scene)],
        })
    return rows


def build_mmstar(n: int, draw: Draw, rng: np.random.Generator) -> list[dict]:
    answers, rows, kinds = balanced(n, 4, rng), [], mc_kinds(draw.world)
    for i in range(n):
        kind = kinds[i % len(kinds)]
        scene, q, options = mc_question(draw, i, kind, answers[i])
        inline = ", ".join(f"{c}: {o}" for c, o in zip(letters(4), options))
        category, l2 = MMSTAR_CATEGORY[kind]
        rows.append({
            "index": i, "question": f"{q.question}\nOptions: {inline}", "image": draw.png(scene),
            "answer": letters(4)[answers[i]], "category": category, "l2_category": l2,
            "meta_info": {"source": SOURCE, "split": "val", "image_path": f"images/{i}.png"},
        })
    return rows


# MathVista's query hints, as the released `query` column words them.
MV_HINT = {
    "integer": "Hint: Please answer the question requiring an integer answer and provide the final "
               "value, e.g., 1, 2, 3, at the end.",
    "float": "Hint: Please answer the question requiring a floating-point number with two decimal "
             "places and provide the final value, e.g., 1.23, 1.34, 1.45, at the end.",
    "text": "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, "
            "D, at the end.",
}
# Free-form items are question kinds of oqvl.world.questions; "mc_<kind>" items are lettered.
MV_ITEMS = ("count", "count_colour", "count_shape", "subtract", "fraction", "mc_count", "mc_colour")
MV_SKILLS = {"count": ["numeric commonsense"], "count_colour": ["numeric commonsense"],
             "count_shape": ["numeric commonsense"], "subtract": ["arithmetic reasoning"],
             "fraction": ["arithmetic reasoning", "numeric commonsense"]}


def _mathvista_item(kind: str, scene: Scene, rng: np.random.Generator, phrasing: str):
    """(question, answer, answer_type, skills) for one free-form MathVista item."""
    q = ask(scene, kind, rng, phrasing=phrasing)
    return q.question, q.answer, "float" if kind in FLOAT_KINDS else "integer", MV_SKILLS[kind]


def build_mathvista(n: int, draw: Draw, rng: np.random.Generator) -> list[dict]:
    kinds = [MV_ITEMS[i % len(MV_ITEMS)] for i in range(n)]
    mc = [i for i, k in enumerate(kinds) if k.startswith("mc_")]
    mc_answer = dict(zip(mc, balanced(len(mc), 4, rng)))
    size = draw.world.image_size
    rows = []
    for i, kind in enumerate(kinds):
        pid = str(i + 1)
        if kind.startswith("mc_"):
            scene, q, choices = mc_question(draw, i, kind[3:], mc_answer[i])
            question, answer, answer_type = q.question, q.answer, "text"
            skills = ["numeric commonsense"] if kind == "mc_count" else ["logical reasoning"]
            lettered = "\n".join(f"({c}) {o}" for c, o in zip(letters(4), choices))
            query = f"{MV_HINT['text']}\nQuestion: {question}\nChoices:\n{lettered}"
            precision = None
        else:
            scene, _, item = draw(i, lambda s, r, k=kind: _mathvista_item(k, s, r, draw.phrasing))
            question, answer, answer_type, skills = item
            choices = None
            query = f"{MV_HINT[answer_type]}\nQuestion: {question}"
            precision = 2.0 if answer_type == "float" else None  # float64, as released
        rows.append({
            "pid": pid, "question": question, "image": f"images/{pid}.jpg",
            "decoded_image": draw.png(scene), "choices": choices, "unit": None,
            "precision": precision, "answer": answer,
            "question_type": "multi_choice" if choices else "free_form", "answer_type": answer_type,
            "metadata": {
                "category": "math-targeted-vqa", "context": "synthetic scene",
                "grade": "elementary school", "img_height": size, "img_width": size,
                "language": "english", "skills": skills, "source": SOURCE, "split": "testmini",
                "task": "math word problem" if kind == "subtract" else "visual question answering",
            },
            "query": query,
        })
    return rows


def pope_objects(scene: Scene) -> list[tuple[str, str]]:
    return sorted({(o.colour, o.shape) for o in scene.objects})


def pope_negatives(present: list, k: int, setting: str, freq: Counter, cooc: Counter,
                   rng: np.random.Generator) -> list:
    """k absent objects for one image, chosen as POPE chooses them."""
    absent = sorted((c, s) for c in COLOURS for s in SHAPES if (c, s) not in set(present))
    if setting == "random":
        return [absent[j] for j in rng.choice(len(absent), size=k, replace=False)]
    if setting == "popular":
        return sorted(absent, key=lambda o: (-freq[o], o))[:k]
    if setting == "adversarial":
        score = {o: sum(cooc[frozenset((g, o))] for g in present) for o in absent}
        return sorted(absent, key=lambda o: (-score[o], -freq[o], o))[:k]
    raise ValueError(setting)


def build_pope(n_images: int, draw: Draw, rng: np.random.Generator) -> list[dict]:
    k = min(3, draw.world.max_objects)
    scenes = [draw(i, lambda s, r: True if len(pope_objects(s)) >= k else None)[:2]
              for i in range(n_images)]
    # Object frequencies and co-occurrences over the benchmark's own images, as POPE counts them.
    freq, cooc = Counter(), Counter()
    for scene, _ in scenes:
        objs = pope_objects(scene)
        freq.update(objs)
        cooc.update(frozenset(p) for p in combinations(objs, 2))
    rows = []
    for setting in POPE_CATEGORIES:
        qid = 0
        for i, (scene, _) in enumerate(scenes):
            r = stream_rng(draw.seed, f"{draw.stream}_{setting}", i)
            present = pope_objects(scene)
            yes = [present[j] for j in r.choice(len(present), size=k, replace=False)]
            no = pope_negatives(present, k, setting, freq, cooc, r)
            asked = [(o, "yes") for o in yes] + [(o, "no") for o in no]
            image = draw.png(scene)
            for j in r.permutation(len(asked)):
                (colour, shape), answer = asked[j]
                qid += 1
                rows.append({
                    "id": str(len(rows)), "question_id": str(qid),
                    "question": phrase("exists", draw.phrasing, colour=colour, shape=shape), "answer": answer,
                    "image_source": f"{draw.stream}_{i:06d}", "image": image, "category": setting,
                })
    return rows


BUILDERS = {"MMBench": build_mmbench, "SEEDBench": build_seedbench, "MMStar": build_mmstar,
            "MathVista": build_mathvista, "POPE": build_pope}


def stream_name(benchmark: str, split: str = "test") -> str:
    """The image stream of a benchmark's split: dev draws its own; heldout rewords test's."""
    return f"bench_{benchmark.lower()}" + ("_dev" if split == "dev" else "")


def generate(benchmark: str, n: int, seed: int, world: WorldConfig,
             excluded: set[str], split: str = "test") -> tuple[list[dict], Draw]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {SPLITS}")
    stream = stream_name(benchmark, split)
    draw = Draw(seed, stream, world, excluded, phrasing="heldout" if split == "heldout" else "train")
    rng = stream_rng(seed, stream + "_answers")
    return BUILDERS[benchmark](n, draw, rng), draw


def parse_exclude(items: list[str]) -> dict[str, int]:
    streams = {}
    for item in items:
        name, _, n = item.rpartition(":")
        if not name or not n.isdigit():
            raise ValueError(f"--exclude wants STREAM:N, got {item!r}")
        streams[name] = max(streams.get(name, 0), int(n))
    return streams


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sizes", default=json.dumps(DEFAULT_SIZES), help="JSON: benchmark -> size")
    ap.add_argument("--seed", type=int, default=0)
    WorldConfig.add_args(ap)
    ap.add_argument("--exclude", action="append", default=[], metavar="STREAM:N",
                    help="a training stream whose first N images no benchmark image may equal")
    ap.add_argument("--no-control", action="store_true", help="skip the shuffled-image files")
    args = ap.parse_args(argv)
    sizes = json.loads(args.sizes)
    unknown = set(sizes) - set(BENCHMARKS)
    if unknown:
        raise SystemExit(f"unknown benchmark(s) in --sizes: {sorted(unknown)}")
    world = WorldConfig.from_args(args)
    streams = parse_exclude(args.exclude)
    t0 = time.time()
    excluded = training_keys(args.seed, streams, world)
    print(f"excluded {len(excluded)} training scenes of {json.dumps(streams)} in {time.time() - t0:.1f}s")
    files, counts = [], {}
    test_scenes: set[str] = set()  # dev never shows a test image
    for split in SPLITS:
        counts[split] = {}
        for benchmark in BENCHMARKS:
            if benchmark not in sizes:
                continue
            t0 = time.time()
            avoid = excluded | test_scenes if split == "dev" else excluded
            rows, draw = generate(benchmark, sizes[benchmark], args.seed, world, avoid, split)
            if split == "test":
                test_scenes |= draw.drawn
            path = write_rows(rows, benchmark, data_file(args.out / split, benchmark))
            files.append(path)
            counts[split][benchmark] = {"rows": len(rows), "redrawn_training_scenes": draw.redrawn_training}
            if not args.no_control:
                shuffled = data_file(args.out / split, benchmark, shuffled=True)
                counts[split][benchmark]["control"] = shuffle_images(path, shuffled, benchmark, args.seed)
                files.append(shuffled)
            print(f"{split} {benchmark}: {len(rows)} rows, {draw.redrawn_training} training scenes redrawn, "
                  f"{time.time() - t0:.1f}s -> {path} ({sha256_file(path)[:12]})")
    config = {"generator": "toy", "sizes": sizes, "seed": args.seed, "world": vars(world),
              "exclude": streams, "control": not args.no_control}
    write_manifest(manifest_path(args.out), "eval_data",
                   work=(sum(questions_written(c) for c in counts.values()), "questions"),
                   config=config, files=files, counts=counts)


if __name__ == "__main__":
    main()
