"""Opening an image from bytes the way every stage must: its header checked before any decode
(a decompression bomb is refused, never decoded), any decoder error a named reason."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

from .reasons import MAX_PIXELS

Problem = tuple[str, str]  # (reason from oqvl.reasons, the library's message)


def open_image(data: bytes | None) -> tuple[Image.Image | None, Problem | None]:
    """(the image with only its header read, None), or (None, its problem)."""
    if data is None:
        return None, ("no_image", "no image in the sample")
    if not data:
        return None, ("empty_file", "zero bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            return None, ("too_many_pixels", str(e))
        except Exception as e:  # noqa: BLE001 (any decoder's error: the sample is bad, the stage goes on)
            return None, ("undecodable", f"{type(e).__name__}: {e}")
    width, height = image.size
    if width * height > MAX_PIXELS:
        return None, ("too_many_pixels", f"{width}x{height} is over {MAX_PIXELS} pixels, not decoded")
    return image, None


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. PIL's own conversion clips a 16-bit grey image (mode I;16, I) at 255, a white
    image; its high byte is taken instead. Alpha is dropped as PIL drops it."""
    if image.mode.startswith("I"):
        image = Image.fromarray((np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8))
    return image.convert("RGB")


def decode(data: bytes | None) -> tuple[Image.Image | None, Problem | None]:
    """(the decoded 8-bit RGB image, None), or (None, its problem)."""
    image, problem = open_image(data)
    if problem:
        return None, problem
    try:
        image.load()
        return to_rgb(image), None
    except Exception as e:  # noqa: BLE001 (truncated data and the like)
        return None, ("undecodable", f"{type(e).__name__}: {e}")
