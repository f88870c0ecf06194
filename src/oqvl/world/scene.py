"""The toy world: scenes of a few coloured shapes (and sometimes a character) on a 2x2 grid.

A scene is plain data (JSON-serialisable); `render` draws it, `captions.py` describes it.
Everything is a pure function of a numpy Generator, so the same seed gives the same bytes.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (215, 45, 40),
    "green": (45, 165, 65),
    "blue": (45, 85, 215),
    "yellow": (230, 200, 45),
}
SIZES = ("small", "large")
CELLS = ("top left", "top right", "bottom left", "bottom right")
GLYPHS = "ABEFHKMRTX23457"
BACKGROUND = (128, 128, 128)


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    cell: str


@dataclass(frozen=True)
class Glyph:
    char: str
    cell: str


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    glyph: Glyph | None = None
    # Sub-cell jitter of each object's centre, in pixels at 64 px; rendering detail, not a fact.
    jitter: tuple[tuple[int, int], ...] = field(default=(), compare=False)

    def to_dict(self) -> dict:
        return {
            "objects": [asdict(o) for o in self.objects],
            "glyph": asdict(self.glyph) if self.glyph else None,
        }

    @staticmethod
    def from_dict(d: dict) -> "Scene":
        glyph = Glyph(**d["glyph"]) if d.get("glyph") else None
        return Scene(tuple(Obj(**o) for o in d["objects"]), glyph)


def sample_scene(rng: np.random.Generator, max_objects: int = 3, glyph_prob: float = 0.25) -> Scene:
    """Draw 1..max_objects objects in distinct cells, plus a glyph in a free cell with glyph_prob."""
    n_obj = int(rng.integers(1, max_objects + 1))
    with_glyph = bool(rng.random() < glyph_prob) and n_obj < len(CELLS)
    cells = [CELLS[i] for i in rng.permutation(len(CELLS))]
    objects = tuple(
        Obj(
            shape=SHAPES[rng.integers(len(SHAPES))],
            colour=list(COLOURS)[rng.integers(len(COLOURS))],
            size=SIZES[rng.integers(len(SIZES))],
            cell=cells[i],
        )
        for i in range(n_obj)
    )
    glyph = Glyph(GLYPHS[rng.integers(len(GLYPHS))], cells[n_obj]) if with_glyph else None
    jitter = tuple((int(rng.integers(-3, 4)), int(rng.integers(-3, 4))) for _ in range(n_obj))
    return Scene(objects, glyph, jitter)


def _cell_centre(cell: str, size: int) -> tuple[float, float]:
    col = 0 if cell.endswith("left") else 1
    row = 0 if cell.startswith("top") else 1
    half = size / 2
    return (col + 0.5) * half, (row + 0.5) * half


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draw the scene as an RGB image of size x size pixels."""
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    scale = size / 64
    jitter = scene.jitter or ((0, 0),) * len(scene.objects)
    for obj, (jx, jy) in zip(scene.objects, jitter):
        cx, cy = _cell_centre(obj.cell, size)
        cx, cy = cx + jx * scale, cy + jy * scale
        r = (11 if obj.size == "large" else 6) * scale
        fill = COLOURS[obj.colour]
        box = (cx - r, cy - r, cx + r, cy + r)
        if obj.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(box, fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        elif obj.shape == "cross":
            w = r / 2.5
            draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
            draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
        else:
            raise ValueError(f"unknown shape {obj.shape!r}")
    if scene.glyph:
        cx, cy = _cell_centre(scene.glyph.cell, size)
        font = ImageFont.load_default(size=int(22 * scale))
        draw.text((cx, cy), scene.glyph.char, fill=(0, 0, 0), font=font, anchor="mm")
    return img


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()
