"""Colour agreement: do the colour words of a caption name the colours the image shows?

    filter:
      extra:
        colour: {source: datacomp, method: scorer,
                 scorer: "oqvl.filter.examples.colour_agreement:score", threshold: 0.99}

The image's colours are the hue names that cover at least `min_share` of its saturated pixels
(saturation >= `min_saturation`, value >= 0.2: grey, black and white say no colour); the
caption's are the colour words it contains. The score is their Jaccard overlap, 1.0 when they
agree exactly; NaN (no score) when neither names a colour, so there is nothing to compare.

It knows nothing of shapes, counts or text, and reads colours only: a caption with the right
colours and a wrong shape scores like a true one, and an image in colours with no name here
scores 0 against a caption that names them. The quality report shows what it catches.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from PIL import Image

# Hue ranges in degrees [start, end) of each colour word; red wraps around 0.
HUES = {"red": [(0, 15), (345, 360)], "orange": [(15, 40)], "yellow": [(40, 70)],
        "green": [(70, 170)], "cyan": [(170, 200)], "blue": [(200, 260)], "purple": [(260, 345)]}
WORD = re.compile(r"[a-z]+")


def caption_colours(caption: str) -> set[str]:
    return set(WORD.findall(caption.lower())) & set(HUES)


def image_colours(image: Image.Image, min_share: float = 0.03, min_saturation: float = 0.35) -> set[str]:
    hsv = np.asarray(image.convert("HSV"), dtype=np.float32) / 255.0
    hue, sat, val = hsv[..., 0].ravel() * 360, hsv[..., 1].ravel(), hsv[..., 2].ravel()
    hue = hue[(sat >= min_saturation) & (val >= 0.2)]
    if hue.size == 0:
        return set()
    share = {name: sum(((hue >= a) & (hue < b)).sum() for a, b in ranges) / hue.size
             for name, ranges in HUES.items()}
    return {name for name, s in share.items() if s >= min_share}


def score(images: list[Image.Image], captions: list[str], uids: list[str],
          min_share: float = 0.03, min_saturation: float = 0.35) -> Sequence[float]:
    """One score per pair in [0, 1] (the Scorer contract of oqvl.filter.user)."""
    out = []
    for image, caption in zip(images, captions):
        said, seen = caption_colours(caption), image_colours(image, min_share, min_saturation)
        union = said | seen
        out.append(len(said & seen) / len(union) if union else float("nan"))
    return out
