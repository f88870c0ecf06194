"""Named ways a web image-text pair goes wrong, applied to toy pairs at configured rates.

Caption corruptions change what the caption says; image corruptions break the image bytes and
leave a true caption. Every corrupted pair records its kind in the truth table.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .captions import GENERIC_CAPTIONS
from .scene import CELLS, COLOURS, SHAPES, SIZES, Obj, Scene

CAPTION_KINDS = (
    "wrong_attribute",  # one object's colour (or its stated size) is wrong
    "wrong_object",  # one object's shape is wrong
    "wrong_count",  # an object is added to, or left out of, the caption
    "generic_caption",  # boilerplate that says nothing about the image
    "empty_caption",  # the empty string
    "other_caption",  # the true caption of another image of the same source
)
IMAGE_KINDS = (
    "broken_truncated",  # the image file cut in half
    "broken_empty",  # a zero-length file
    "broken_not_image",  # an HTML error page where the image should be
)
KINDS = CAPTION_KINDS + IMAGE_KINDS
CLEAN = "clean"

NOT_AN_IMAGE = b"<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n"


def _other(rng: np.random.Generator, options, current):
    choices = [x for x in options if x != current]
    return choices[rng.integers(len(choices))]


def corrupt_scene(kind: str, scene: Scene, mention_size: bool, rng: np.random.Generator) -> Scene:
    """The scene a corrupted caption of `kind` describes instead of the true one."""
    objs = list(scene.objects)
    i = int(rng.integers(len(objs)))
    if kind == "wrong_attribute":
        if mention_size and rng.random() < 0.3:
            objs[i] = dataclasses.replace(objs[i], size=_other(rng, SIZES, objs[i].size))
        else:
            objs[i] = dataclasses.replace(objs[i], colour=_other(rng, list(COLOURS), objs[i].colour))
    elif kind == "wrong_object":
        objs[i] = dataclasses.replace(objs[i], shape=_other(rng, SHAPES, objs[i].shape))
    elif kind == "wrong_count":
        used = {o.cell for o in objs} | ({scene.glyph.cell} if scene.glyph else set())
        free = [c for c in CELLS if c not in used]
        if free and (len(objs) == 1 or rng.random() < 0.5):
            objs.append(
                Obj(
                    shape=SHAPES[rng.integers(len(SHAPES))],
                    colour=list(COLOURS)[rng.integers(len(COLOURS))],
                    size=SIZES[rng.integers(len(SIZES))],
                    cell=free[rng.integers(len(free))],
                )
            )
        elif len(objs) > 1:
            objs.pop(i)
        else:  # one object, no free cell: cannot happen with 4 cells, kept for safety
            raise ValueError("wrong_count needs a free cell or two objects")
    else:
        raise ValueError(f"{kind!r} is not a scene corruption")
    return Scene(tuple(objs), scene.glyph)


def generic_caption(rng: np.random.Generator) -> str:
    return GENERIC_CAPTIONS[rng.integers(len(GENERIC_CAPTIONS))]


def break_image(kind: str, image_bytes: bytes) -> bytes:
    if kind == "broken_truncated":
        return image_bytes[: len(image_bytes) // 2]
    if kind == "broken_empty":
        return b""
    if kind == "broken_not_image":
        return NOT_AN_IMAGE
    raise ValueError(f"{kind!r} is not an image corruption")


def assign_kinds(n: int, rates: dict[str, float], rng: np.random.Generator) -> list[str]:
    """Exactly round(rate * n) pairs of each kind, at random positions; the rest are clean."""
    unknown = set(rates) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown corruption kinds: {sorted(unknown)}")
    counts = {k: int(round(rates.get(k, 0.0) * n)) for k in KINDS}
    if sum(counts.values()) > n:
        raise ValueError(f"corruption rates sum above 1: {rates}")
    kinds = [k for k in KINDS for _ in range(counts[k])]
    kinds += [CLEAN] * (n - len(kinds))
    return [kinds[j] for j in rng.permutation(n)]
