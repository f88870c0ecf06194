"""Questions about a toy scene with their true answers: the facts SFT data and benchmarks ask about.

`ask(scene, kind, rng)` returns a `Question` (text, answer, distractors) or None when the kind does
not apply to the scene (e.g. "what colour is the circle?" needs exactly one circle). The formats
(direct answer, yes/no, lettered options, benchmark schemas) are built on top of this by SFT data
and the toy benchmarks; the facts live here once, so training and evaluation ask the same world.

Each kind is worded by one template per phrasing (`TEMPLATES`): `train`, the wording SFT data and
the toy benchmarks' test and dev splits use, and `heldout`, a wording no training data ever uses,
for the benchmarks' held-out phrasing (a score above the control there shows the skill transfers
beyond the training wording). The phrasing changes the words only: the same rng draws give the
same fact and answer.

Kinds:
- colour     "What colour is the circle?"               red     (the shape occurs exactly once)
- shape      "What shape is the red object?"            circle  (the colour occurs exactly once)
- position   "Where is the red circle?"                 top left
- count      "How many objects are there?"              2
- character  "Which character is shown in the image?"   K       (the scene has a glyph)
- exists     "Is there a red circle in the image?"      yes|no  (a true object, or one absent)

and the counting and arithmetic of MathVista-style math questions (answers are numbers):
- count_colour  "How many red objects are there?"                       0
- count_shape   "How many circles are there?"                           1
- subtract      "Subtract all red objects. How many objects are left?"  2
- fraction      "What fraction of the four grid cells contain a shape?" 0.5
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .scene import CELLS, COLOURS, GLYPHS, SHAPES, Scene

KINDS = ("colour", "shape", "position", "count", "character", "exists",
         "count_colour", "count_shape", "subtract", "fraction")
INTEGER_KINDS = ("count", "count_colour", "count_shape", "subtract")
FLOAT_KINDS = ("fraction",)
COUNT_CHOICES = ("1", "2", "3", "4")
NUMBER_CHOICES = ("0", "1", "2", "3", "4")
FRACTION_CHOICES = ("0.25", "0.5", "0.75", "1.0")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
PHRASINGS = ("train", "heldout")
TEMPLATES = {  # kind -> (train, heldout) wording; slots: colour, shape, shapes (plural)
    "colour": ("What colour is the {shape}?", "The {shape} in this picture has which colour?"),
    "shape": ("What shape is the {colour} object?", "Name the form of the {colour} item."),
    "position": ("Where is the {colour} {shape}?", "In which part of the picture does the {colour} {shape} lie?"),
    "count": ("How many objects are there?", "Count the items in this picture."),
    "character": ("Which character is shown in the image?", "Read the symbol printed in this picture."),
    "exists": ("Is there a {colour} {shape} in the image?", "Does this picture contain a {colour} {shape}?"),
    "count_colour": ("How many {colour} objects are there?", "Count the {colour} items in this picture."),
    "count_shape": ("How many {shapes} are there?", "Count the {shapes} in this picture."),
    "subtract": ("Subtract all {colour} objects. How many objects are left?",
                 "Take away every {colour} item. Count the items that remain."),
    "fraction": ("What fraction of the four grid cells contain a shape?",
                 "Of the four grid cells, what share holds an item?"),
}


def phrase(kind: str, phrasing: str = "train", **slots) -> str:
    """A question of `kind` in one phrasing, its slots filled."""
    if phrasing not in PHRASINGS:
        raise ValueError(f"unknown phrasing {phrasing!r}; known: {PHRASINGS}")
    return TEMPLATES[kind][PHRASINGS.index(phrasing)].format(**slots)


@dataclass(frozen=True)
class Question:
    kind: str
    question: str
    answer: str
    distractors: tuple[str, ...] = ()
    """Wrong answers of the same type (for multiple choice); empty for yes/no."""
    meta: dict = field(default_factory=dict, compare=False)
    """What the question is about (e.g. {"object": "red circle"}), for benchmark metadata."""

    def options(self, rng: np.random.Generator, n: int = 4, answer_index: int | None = None
                ) -> tuple[list[str], int]:
        """n options holding the answer at answer_index (random if None) and n-1 distractors."""
        if len(self.distractors) < n - 1:
            raise ValueError(f"{self.kind} question has {len(self.distractors)} distractors, needs {n - 1}")
        picked = [self.distractors[i] for i in rng.permutation(len(self.distractors))[: n - 1]]
        k = int(rng.integers(n)) if answer_index is None else answer_index
        return picked[:k] + [self.answer] + picked[k:], k


def _others(values, keep) -> tuple[str, ...]:
    return tuple(v for v in values if v != keep)


def ask(scene: Scene, kind: str, rng: np.random.Generator, exists_answer: bool | None = None,
        phrasing: str = "train") -> Question | None:
    """A question of `kind` about `scene`, or None if the scene cannot answer it.

    exists_answer: for "exists", force a yes (True) or no (False) question (balanced sets ask for
    each half); None draws one. phrasing: the template set that words it (`PHRASINGS`).
    """
    objs = scene.objects

    def say(**slots) -> str:
        return phrase(kind, phrasing, **slots)

    if kind == "colour":
        shapes = [o.shape for o in objs]
        unique = [o for o in objs if shapes.count(o.shape) == 1]
        if not unique:
            return None
        o = unique[rng.integers(len(unique))]
        return Question(kind, say(shape=o.shape), o.colour, _others(COLOURS, o.colour),
                        {"object": o.shape})
    if kind == "shape":
        colours = [o.colour for o in objs]
        unique = [o for o in objs if colours.count(o.colour) == 1]
        if not unique:
            return None
        o = unique[rng.integers(len(unique))]
        return Question(kind, say(colour=o.colour), o.shape, _others(SHAPES, o.shape),
                        {"object": f"{o.colour} object"})
    if kind == "position":
        names = [(o.colour, o.shape) for o in objs]
        unique = [o for o in objs if names.count((o.colour, o.shape)) == 1]
        if not unique:
            return None
        o = unique[rng.integers(len(unique))]
        return Question(kind, say(colour=o.colour, shape=o.shape), o.cell, _others(CELLS, o.cell),
                        {"object": f"{o.colour} {o.shape}"})
    if kind == "count":
        n = str(len(objs))
        return Question(kind, say(), n, _others(COUNT_CHOICES, n), {"count": len(objs)})
    if kind == "character":
        if scene.glyph is None:
            return None
        c = scene.glyph.char
        return Question(kind, say(), c, _others(GLYPHS, c),
                        {"object": c})
    if kind == "exists":
        yes = bool(rng.random() < 0.5) if exists_answer is None else exists_answer
        present = {(o.colour, o.shape) for o in objs}
        if yes:
            colour, shape = sorted(present)[rng.integers(len(present))]
        else:
            absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
            colour, shape = absent[rng.integers(len(absent))]
        return Question(kind, say(colour=colour, shape=shape), "yes" if yes else "no", (),
                        {"object": f"{colour} {shape}"})
    if kind == "count_colour":
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        n = str(sum(o.colour == colour for o in objs))
        return Question(kind, say(colour=colour), n, _others(NUMBER_CHOICES, n),
                        {"object": f"{colour} object"})
    if kind == "count_shape":
        shape = SHAPES[rng.integers(len(SHAPES))]
        n = str(sum(o.shape == shape for o in objs))
        return Question(kind, say(shapes=PLURAL[shape]), n, _others(NUMBER_CHOICES, n),
                        {"object": shape})
    if kind == "subtract":
        # Half the time a colour in the scene, so the answer is not always the total.
        present = sorted({o.colour for o in objs})
        colour = (present[rng.integers(len(present))] if rng.random() < 0.5
                  else list(COLOURS)[rng.integers(len(COLOURS))])
        n = str(sum(o.colour != colour for o in objs))
        return Question(kind, say(colour=colour), n,
                        _others(NUMBER_CHOICES, n), {"object": f"{colour} object"})
    if kind == "fraction":
        value = str(round(len(objs) / 4, 2))
        return Question(kind, say(), value,
                        _others(FRACTION_CHOICES, value), {"count": len(objs)})
    raise ValueError(f"unknown question kind {kind!r}; known: {KINDS}")


def letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]
