"""img2dataset's Resizer with two checks before OpenCV decodes an image.

- An image of more than MAX_PIXELS is refused from its header, never decoded: OpenCV alone would
  decode up to 2^30 pixels (a few KB of PNG can claim 20000x20000, 1.2 GB decoded).
- A 16-bit PNG is brought to 8 bits (its high byte) first: OpenCV decodes it as uint16 and its JPEG
  encoder then saturates every value over 255, a white image kept as if it were good.

Imported by the download stage only (it pulls in OpenCV and albumentations); img2dataset's
workers are spawned processes, which unpickle this class from here.
"""

from __future__ import annotations

import io
import os

from PIL import Image

from ..images import open_image, to_rgb

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # it would phone home on import
from img2dataset.resizer import Resizer

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def is_16bit_png(data: bytes) -> bool:
    return data[:8] == PNG_SIGNATURE and len(data) > 24 and data[24] == 16  # IHDR's bit depth


def to_8bit_png(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # PIL reads 16-bit RGB(A) as 8-bit RGB(A) already, 16-bit grey as 16 bits
        out = io.BytesIO()
        (to_rgb(im) if im.mode.startswith("I") else im).save(out, format="PNG")
    return out.getvalue()


class ScreenedResizer(Resizer):
    def __call__(self, img_stream, blurring_bbox_list=None):
        img_stream.seek(0)
        data = img_stream.read()
        _, problem = open_image(data)
        if problem and problem[0] == "too_many_pixels":  # any other problem: OpenCV may still read it
            return None, None, None, None, None, f"too_many_pixels: {problem[1]}"
        if is_16bit_png(data):
            try:
                data = to_8bit_png(data)
            except Exception as e:  # noqa: BLE001 (damaged beyond its header)
                return None, None, None, None, None, f"image decoding error: {type(e).__name__}: {e}"
        return super().__call__(io.BytesIO(data), blurring_bbox_list)
