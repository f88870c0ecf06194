"""A toy data source: n image-caption pairs with a known fraction corrupted in named ways.

Pair i of a source is a pure function of (seed, source name, i), so a pair never depends on how
many pairs are drawn, and two streams with different names never share an image.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass

import numpy as np

from .captions import describe, sample_style
from .corrupt import CLEAN, IMAGE_KINDS, assign_kinds, break_image, corrupt_scene, generic_caption
from .scene import Scene, png_bytes, render, sample_scene


def stream_rng(seed: int, stream: str, *ids: int) -> np.random.Generator:
    """An independent generator for one named stream (and optional indices within it)."""
    return np.random.default_rng([seed, zlib.crc32(stream.encode()), *ids])


@dataclass(frozen=True)
class WorldConfig:
    """The toy world's generator settings; the defaults are config `world:`'s (the schema's)."""
    image_size: int = 64
    max_objects: int = 3
    glyph_prob: float = 0.25

    @staticmethod
    def add_args(ap) -> None:
        """The world's command-line flags, as every toy stage takes them (rules pass config `world:`)."""
        d = WorldConfig()
        ap.add_argument("--image-size", type=int, default=d.image_size, help="side of the square images (px)")
        ap.add_argument("--max-objects", type=int, default=d.max_objects, help="most shapes in one image")
        ap.add_argument("--glyph-prob", type=float, default=d.glyph_prob, help="chance of a rendered letter or digit")

    @classmethod
    def from_args(cls, args) -> "WorldConfig":
        return cls(args.image_size, args.max_objects, args.glyph_prob)


@dataclass
class Pair:
    uid: str
    caption: str
    image: bytes
    truth: dict  # one row of the truth table (never read by filters)


def true_pair(seed: int, stream: str, i: int, world: WorldConfig) -> tuple[Scene, object, str]:
    """The scene, caption style and true caption of pair i of a stream."""
    rng = stream_rng(seed, stream, i)
    scene = sample_scene(rng, world.max_objects, world.glyph_prob)
    style = sample_style(rng, world.max_objects + 1)
    return scene, style, describe(scene, style)


def make_pair(seed: int, stream: str, i: int, n: int, kind: str, world: WorldConfig) -> Pair:
    scene, style, caption = true_pair(seed, stream, i, world)
    image = png_bytes(render(scene, world.image_size))
    rng = stream_rng(seed, stream, i, 1)  # the corruption's own randomness
    caption_scene: Scene | None = scene
    caption_style = style
    if kind in ("wrong_attribute", "wrong_object", "wrong_count"):
        caption_scene = corrupt_scene(kind, scene, style.mention_size, rng)
        caption = describe(caption_scene, style)
    elif kind == "generic_caption":
        caption_scene, caption = None, generic_caption(rng)
    elif kind == "empty_caption":
        caption_scene, caption = None, ""
    elif kind == "other_caption":
        j = (i + 1 + int(rng.integers(max(n - 1, 1)))) % max(n, 2)
        caption_scene, caption_style, caption = true_pair(seed, stream, j, world)
    elif kind in IMAGE_KINDS:
        image = break_image(kind, image)
    elif kind != CLEAN:
        raise ValueError(f"unknown kind {kind!r}")
    true_caption = describe(scene, style)
    truth = {
        "uid": f"{stream}-{i:07d}",
        "source": stream,
        "corruption": kind,
        # True when every fact the caption states holds for the image: saying this image in the
        # caption's words gives the caption (an "other" caption can happen to be true).
        "caption_true": caption_scene is not None and describe(scene, caption_style) == caption,
        "image_ok": kind not in IMAGE_KINDS,
        "caption": caption,
        "true_caption": true_caption,
        "scene": json.dumps(scene.to_dict(), sort_keys=True),
        "caption_scene": json.dumps(caption_scene.to_dict(), sort_keys=True) if caption_scene else "",
        "caption_style": json.dumps(caption_style.to_dict(), sort_keys=True),
    }
    return Pair(truth["uid"], caption, image, truth)


def generate_source(
    seed: int, stream: str, n: int, rates: dict[str, float], world: WorldConfig
):
    """Yield the n pairs of a source, corruption kinds assigned at exact rates."""
    kinds = assign_kinds(n, rates, stream_rng(seed, stream, 2**31))
    for i, kind in enumerate(kinds):
        yield make_pair(seed, stream, i, n, kind, world)
