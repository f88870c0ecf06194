"""Natural captions of toy scenes, drawn from varied templates.

A caption is `describe(scene, style)`: the style (template, which optional facts to mention, object
order) is drawn once per pair, so a corrupted caption can say a different scene in the same words.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .scene import Scene

COUNT_WORDS = ("no", "one", "two", "three", "four", "five")
TEMPLATES = (
    "{objects}",
    "{Count} {shape_noun}: {objects}",
    "a picture of {objects} on a gray background",
    "there {is_are} {count} {object_noun} in this image: {objects}",
    "a simple drawing with {objects}",
    "{objects}, drawn on gray",
)
POSITION_PREPOSITIONS = ("in the", "at the")
GENERIC_CAPTIONS = (
    "an image",
    "stock photo",
    "click to enlarge",
    "image may contain: art",
    "untitled",
    "view full size",
    "photo 1 of 3",
    "abstract background pattern",
    "free download",
    "best seller",
)


@dataclass(frozen=True)
class CaptionStyle:
    template: int
    mention_size: bool
    mention_position: bool
    preposition: int
    order: tuple[int, ...]  # a permutation of object indices (extra indices are ignored)

    def to_dict(self) -> dict:
        return asdict(self)


def sample_style(rng: np.random.Generator, max_objects: int = 4) -> CaptionStyle:
    return CaptionStyle(
        template=int(rng.integers(len(TEMPLATES))),
        mention_size=bool(rng.random() < 0.5),
        mention_position=bool(rng.random() < 0.5),
        preposition=int(rng.integers(len(POSITION_PREPOSITIONS))),
        order=tuple(int(i) for i in rng.permutation(max_objects + 1)),
    )


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def describe(scene: Scene, style: CaptionStyle) -> str:
    """The caption that `style` gives `scene`; every fact it states is a fact of `scene`."""
    prep = POSITION_PREPOSITIONS[style.preposition]
    order = [i for i in style.order if i < len(scene.objects)]
    order += [i for i in range(len(scene.objects)) if i not in order]
    phrases = []
    for i in order:
        o = scene.objects[i]
        words = ([o.size] if style.mention_size else []) + [o.colour, o.shape]
        phrase = "a " + " ".join(words)
        if style.mention_position:
            phrase += f" {prep} {o.cell}"
        phrases.append(phrase)
    n = len(scene.objects)
    text = TEMPLATES[style.template].format(
        objects=_join(phrases),
        Count=COUNT_WORDS[n].capitalize(),
        count=COUNT_WORDS[n],
        shape_noun="shape" if n == 1 else "shapes",
        object_noun="object" if n == 1 else "objects",
        is_are="is" if n == 1 else "are",
    )
    if scene.glyph:
        kind = "digit" if scene.glyph.char.isdigit() else "letter"
        text += f", with the {kind} {scene.glyph.char}"
        if style.mention_position:
            text += f" {prep} {scene.glyph.cell}"
    return text
