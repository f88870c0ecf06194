"""Why a pair or a sample is not used: one short, stable name per cause, shared by every stage that
skips one (download, ingest, CLIP and MLM-Filter scoring, user filters). Accounting counts by
these names; the library's own message is kept beside the name (a `message` or `error_message`
column), never used as the name.
"""

from __future__ import annotations

# PIL's decompression-bomb threshold (Image.MAX_IMAGE_PIXELS, about 179 Mpx: 1024^3 / 4 / 3 bytes).
# An image with more pixels is refused from its header, never decoded, in every stage.
MAX_PIXELS = 178_956_970

REASONS = {
    "invalid_url": "a URL with no scheme img2dataset fetches (http, https, file) or no host or path",
    "outside_data_roots": "a file:// URL outside the pair list's folder and raw.file_roots",
    "missing_file": "a file:// URL to no file",
    "unreachable": "the host refused, timed out or did not resolve",
    "http_error": "the server answered with an HTTP error status",
    "empty_file": "a zero-byte image",
    "undecodable": "bytes no image decoder reads: truncated, text or HTML, an unknown format",
    "too_many_pixels": f"more than {MAX_PIXELS} pixels (a decompression bomb): refused from the header",
    "no_image": "a sample with no image file",
    "no_caption": "a sample with no caption file",
    "empty_caption": "a caption that is empty or only white space",
    "caption_not_utf8": "a caption that is not UTF-8",
    "duplicate_uid": "a uid that more than one pair or sample has: every copy is refused",
    "metadata_unreadable": "a sample's json that does not parse",
    "missing_from_tar": "a sample img2dataset's shard table lists as downloaded but its tar lacks",
    "other": "any other error (its message is kept beside it)",
}

# Phrases of img2dataset's messages (its own, urllib's and OpenCV's words), lower case; the first
# reason with a phrase in a message is its reason.
_DOWNLOAD_PHRASES = {
    "too_many_pixels": ("too_many_pixels", "cv_io_max_image_pixels"),
    "empty_file": ("!buf.empty()",),
    "undecodable": ("image decoding error", "cannot identify image"),
    "invalid_url": ("unknown url type", "no host given", "url can't contain control characters",
                    "nonnumeric port", "file:// scheme is supported only on localhost"),
    "http_error": ("http error ",),
    "missing_file": ("no such file or directory", "[errno 2]", "is a directory", "[errno 21]"),
    "unreachable": ("connection refused", "timed out", "name or service not known", "name resolution",
                    "network is unreachable", "no route to host", "connection reset", "remote end closed"),
}


def check(reason: str) -> str:
    """`reason`, refused when it is not one of REASONS (a typo would split a count in two)."""
    if reason not in REASONS:
        raise ValueError(f"unknown skip reason {reason!r} (one of {', '.join(REASONS)})")
    return reason


def from_download_message(message: str | None) -> str:
    """The reason behind one img2dataset error message."""
    text = str(message or "").lower()
    return next((reason for reason, phrases in _DOWNLOAD_PHRASES.items() if any(p in text for p in phrases)),
                "other")
