"""Bad inputs into the raw and filter stages, tried on purpose: one pair list holding every kind of
bad pair the web gives, downloaded by img2dataset and CLIP-scored. Each pair is either used
correctly or skipped with its named reason (oqvl.reasons) and the library's message beside it;
both stages complete, and pairs in = samples + failures, exactly. docs/reliability.md lists
these cases by test name.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import toy_clip_checkpoint
from PIL import Image, ImageFile

from oqvl import reasons
from oqvl.filter import clip_score
from oqvl.filter.clip_model import TOY_MODEL
from oqvl.raw import download, ingest
from oqvl.shards import iter_samples, sample_uid, shard_paths

OPTIONS = {"image_size": 512, "resize_mode": "keep_ratio", "resize_only_if_bigger": True, "encode_format": "jpg",
           "encode_quality": 95, "samples_per_shard": 40, "processes": 1, "threads": 4, "timeout_s": 5,
           "retries": 0}
LONG_CAPTION = ("a red circle on a blue square " * 3500)[:100_000]
CONTROL_CAPTION = "a red\x00 circle\x1b[31m on\ta blue\r\nsquare\x7f"


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A valid PNG header claiming width x height grey pixels over a tiny IDAT: a decoder that
    trusts it allocates width x height bytes (400 MB here) before it finds the data short."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def scene(size=(64, 64)) -> np.ndarray:
    """A red disc on blue: colour that a wrong decode (saturated, channels swapped) would change."""
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    img = np.zeros((h, w, 3), np.uint8)
    img[...] = (30, 40, 200)
    img[(yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 3) ** 2] = (220, 30, 30)
    return img


def cmyk_red() -> bytes:
    return jpeg(Image.new("CMYK", (48, 48), (0, 255, 255, 0)))  # CMYK (0,255,255,0) is red


GOOD = scene()
GREY16 = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)  # a ramp: high byte 0-255

# uid -> (file name or None for a URL, image bytes or URL, caption, expected download outcome,
#         expected CLIP-scoring outcome). "ok" = used; otherwise the reason name.
CASES = {
    "good": ("good.png", png(GOOD), "a red circle", "ok", "ok"),
    "rgba": ("rgba.png", png(np.dstack([GOOD, np.full(GOOD.shape[:2], 128, np.uint8)])), "a red circle", "ok", "ok"),
    "grey16": ("grey16.png", png(GREY16), "a grey ramp", "ok", "ok"),
    "rgb16": ("rgb16.png", None, "a red circle", "ok", "ok"),  # written by cv2 below (PIL cannot)
    "cmyk": ("cmyk.jpg", cmyk_red(), "a red square", "ok", "ok"),
    "grey": ("grey.png", png(GOOD[..., 0]), "a grey circle", "ok", "ok"),
    "one_pixel": ("one.png", png(GOOD[:1, :1]), "a red dot", "ok", "ok"),
    "tall": ("tall.png", png(scene((5000, 1))), "a blue line", "ok", "ok"),
    "wide": ("wide.png", png(scene((1, 5000))), "a blue line", "ok", "ok"),
    "truncated": ("truncated.jpg", jpeg(Image.fromarray(GOOD))[:300], "a red circle", "undecodable", None),
    "zero_bytes": ("zero.jpg", b"", "a red circle", "empty_file", None),
    "html": ("page.jpg", b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "a red circle", "undecodable", None),
    "text": ("notes.jpg", b"just some text, no image here\n" * 4, "a red circle", "undecodable", None),
    "bomb": ("bomb.png", bomb_png(), "a grey field", "too_many_pixels", None),
    "missing": ("absent.png", "MISSING", "a red circle", "missing_file", None),
    "unreachable": (None, "http://127.0.0.1:9/image.jpg", "a red circle", "unreachable", None),
    "invalid_url": (None, "not a url at all", "a red circle", "invalid_url", None),
    "ftp_url": (None, "ftp://example.org/image.jpg", "a red circle", "invalid_url", None),
    "no_host": (None, "http:///image.jpg", "a red circle", "invalid_url", None),
    "outside": (None, "OUTSIDE", "a red circle", "outside_data_roots", None),
    "escape": (None, "ESCAPE", "a red circle", "outside_data_roots", None),
    "empty_caption": ("empty_caption.png", png(GOOD), "", "ok", "empty_caption"),
    "blank_caption": ("blank_caption.png", png(GOOD), " \t\n ", "ok", "empty_caption"),
    "long_caption": ("long.png", png(GOOD), LONG_CAPTION, "ok", "ok"),
    "control_chars": ("control.png", png(GOOD), CONTROL_CAPTION, "ok", "ok"),
    "dup": ("dup_a.png", png(GOOD), "a red circle", "duplicate_uid", None),
}


@pytest.fixture(scope="module")
def bad_source(tmp_path_factory):
    """The pair list (one of every case, and a second pair with uid `dup`), downloaded."""
    import cv2

    root = tmp_path_factory.mktemp("bad_inputs")
    folder, images = root / "list", root / "list" / "img"
    images.mkdir(parents=True)
    outside = root / "elsewhere" / "secret.png"
    outside.parent.mkdir()
    outside.write_bytes(png(GOOD))
    rows = []
    for uid, (name, data, caption, _, _) in CASES.items():
        if name is None:
            url = {"OUTSIDE": outside.as_uri(), "ESCAPE": f"file://{images}/../../elsewhere/secret.png"}.get(data, data)
        elif data == "MISSING":
            url = (images / name).as_uri()
        else:
            if uid == "rgb16":
                cv2.imwrite(str(images / name), (GOOD[..., ::-1].astype(np.uint16) * 257))
            else:
                (images / name).write_bytes(data)
            url = (images / name).as_uri()
        rows.append({"url": url, "caption": caption, "uid": uid, "source": "bad"})
    (images / "dup_b.png").write_bytes(png(GOOD))
    rows.append({"url": (images / "dup_b.png").as_uri(), "caption": "a red circle", "uid": "dup", "source": "bad"})
    pairs = folder / "pairs.parquet"
    pd.DataFrame(rows).to_parquet(pairs)
    download.main(["--pairs", str(pairs), "--out", str(folder / "shards"), "--options", json.dumps(OPTIONS),
                   "--accounting", str(folder / "accounting.json")])
    return folder


def downloaded(folder: Path) -> dict[str, dict]:
    return {sample_uid(s): s for s in iter_samples(shard_paths(folder / "shards"))}


def test_every_bad_pair_is_used_or_skipped_with_its_reason_and_counted(bad_source):
    acc = json.loads((bad_source / "accounting.json").read_text())
    failures = pd.read_parquet(bad_source / "shards" / "failures.parquet")
    samples = downloaded(bad_source)
    n_pairs = len(CASES) + 1  # the second `dup`
    assert acc["pairs_in"] == n_pairs == acc["samples_in_shards"] + acc["failures"]
    assert len(samples) == acc["samples_in_shards"] and len(failures) == acc["failures"]
    expected_fail = {uid: case[3] for uid, case in CASES.items() if case[3] != "ok"}
    got = failures.groupby("uid")["reason"].agg(set).to_dict()
    assert got == {uid: {r} for uid, r in expected_fail.items()}, failures[["uid", "reason", "error_message"]]
    assert (failures["uid"] == "dup").sum() == 2  # every copy of a duplicated uid, never a pick
    assert set(samples) == {uid for uid, case in CASES.items() if case[3] == "ok"}
    assert set(failures["reason"]) <= set(reasons.REASONS) and "other" not in set(failures["reason"])
    assert failures["error_message"].str.len().gt(0).all()  # the message kept beside the reason
    assert acc["failures_by_reason"] == failures["reason"].value_counts().sort_index().to_dict()
    assert not (bad_source / "shards" / download.SCREENED).exists()  # the screened list is scratch


def decoded(sample: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB")).astype(int)


def test_unusual_images_are_downloaded_as_what_they_show(bad_source):
    samples = downloaded(bad_source)
    red, blue = np.array([220, 30, 30]), np.array([30, 40, 200])
    for uid in ("good", "rgb16", "grey", "rgba"):
        img = decoded(samples[uid])
        assert img.shape == (64, 64, 3), uid
    assert np.abs(decoded(samples["good"])[32, 32] - red).max() < 12
    assert np.abs(decoded(samples["rgb16"])[32, 32] - red).max() < 12  # 16 bits to 8, not saturated white
    assert np.abs(decoded(samples["rgb16"])[2, 2] - blue).max() < 12
    ramp = decoded(samples["grey16"])[..., 0]
    assert 100 < ramp.mean() < 156 and ramp.min() < 20 and ramp.max() > 235  # the ramp, not white
    # alpha 128 matted on white, as img2dataset does: halfway between the colour and white
    assert np.abs(decoded(samples["rgba"])[32, 32] - (red * 128 / 255 + 255 - 128)).max() < 12
    assert np.abs(decoded(samples["cmyk"])[24, 24] - [255, 0, 0]).max() < 40
    assert decoded(samples["one_pixel"]).shape == (1, 1, 3)
    assert decoded(samples["tall"]).shape == (5000, 1, 3) and decoded(samples["wide"]).shape == (1, 5000, 3)
    assert samples["long_caption"]["txt"].decode() == LONG_CAPTION  # kept whole: the tokenizer truncates
    assert samples["control_chars"]["txt"].decode() == CONTROL_CAPTION  # kept as given


def test_file_urls_are_refused_outside_the_data_roots_unless_configured(bad_source, tmp_path):
    refused = download.screen(bad_source / "pairs.parquet", download.data_roots(bad_source / "pairs.parquet", {}))
    assert set(refused.loc[refused["reason"] == "outside_data_roots", "uid"]) == {"outside", "escape"}
    roots = download.data_roots(bad_source / "pairs.parquet", {"file_roots": [str(bad_source.parent / "elsewhere")]})
    refused = download.screen(bad_source / "pairs.parquet", roots)
    assert "outside_data_roots" not in set(refused["reason"])  # a configured root: fetched


@pytest.fixture(scope="module")
def clip_ckpt(tmp_path_factory):
    return toy_clip_checkpoint(tmp_path_factory.mktemp("clip"))


def test_clip_scoring_scores_every_usable_sample_and_names_the_rest(bad_source, clip_ckpt, tmp_path):
    stats = clip_score.score_source(bad_source / "shards", TOY_MODEL, str(clip_ckpt), tmp_path / "s.parquet",
                                    tmp_path / "f.parquet", batch_size=8)
    scores, failed = pd.read_parquet(tmp_path / "s.parquet"), pd.read_parquet(tmp_path / "f.parquet")
    expected = {uid: case[4] for uid, case in CASES.items() if case[3] == "ok"}
    assert set(scores["uid"]) == {u for u, r in expected.items() if r == "ok"}
    assert dict(failed[["uid", "reason"]].values.tolist()) == {u: r for u, r in expected.items() if r != "ok"}
    assert len(scores) + len(failed) == len(downloaded(bad_source))  # every sample in = scored + failed
    assert scores["score"].between(-1 - 1e-5, 1 + 1e-5).all()
    assert stats["failed_by_reason"] == {"empty_caption": 2}


def write_tar(path: Path, samples: list[dict]) -> None:
    with tarfile.open(path, "w") as tf:
        for s in samples:
            for ext, data in s.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def shard_of_bad_samples(folder: Path) -> Path:
    """A released shard (no pair list: bytes as they are) with what a pair list cannot hold."""
    good = jpeg(Image.fromarray(GOOD))
    folder.mkdir(parents=True)
    write_tar(folder / "00000.tar", [
        {"__key__": "k0", "jpg": good, "txt": b"a red circle", "json": b'{"uid": "u-good"}'},
        {"__key__": "k1", "jpg": good, "txt": b"a red \xff\xfe circle", "json": b'{"uid": "u-latin"}'},
        {"__key__": "k2", "png": bomb_png(), "txt": b"a grey field", "json": b'{"uid": "u-bomb"}'},
        {"__key__": "k3", "png": png(GREY16), "txt": b"a grey ramp", "json": b'{"uid": "u-grey16"}'},
        {"__key__": "k4", "jpg": b"", "txt": b"a red circle", "json": b'{"uid": "u-zero"}'},
        {"__key__": "k5", "jpg": good, "txt": b"a red circle", "json": b'{"uid": '},
    ])
    return folder


def test_released_shards_name_invalid_utf8_bombs_and_unreadable_metadata(tmp_path):
    folder = shard_of_bad_samples(tmp_path / "release")
    table, counts, _ = ingest.ingest(folder)
    got = dict(table[["key", "reason"]].values.tolist())
    assert got == {"k0": "", "k1": "caption_not_utf8", "k2": "too_many_pixels", "k3": "", "k4": "empty_file",
                   "k5": "metadata_unreadable"}
    assert counts["pairs_in"] == 6 == counts["samples_in_shards"] + counts["failures"]
    assert table.loc[table["status"] == "failed", "message"].str.len().gt(0).all()


def test_clip_scoring_refuses_a_bomb_from_its_header_and_names_bad_captions_and_metadata(tmp_path, clip_ckpt, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)  # lmms-eval, if imported, sets it
    folder = shard_of_bad_samples(tmp_path / "shards")
    decodes, load = [], ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decodes.append(self.size) or load(self))
    clip_score.score_source(folder, TOY_MODEL, str(clip_ckpt), tmp_path / "s.parquet", tmp_path / "f.parquet")
    failed = dict(pd.read_parquet(tmp_path / "f.parquet")[["uid", "reason"]].values.tolist())
    assert failed == {"u-latin": "caption_not_utf8", "u-bomb": "too_many_pixels", "u-zero": "empty_file",
                      "k5": "metadata_unreadable"}  # unreadable json: the key is the uid
    assert (20000, 20000) not in decodes  # its pixels never decoded
    scores = pd.read_parquet(tmp_path / "s.parquet")
    assert set(scores["uid"]) == {"u-good", "u-grey16"}


def test_every_reason_has_a_description_and_messages_map_to_names():
    assert all(name.isidentifier() and text for name, text in reasons.REASONS.items())
    assert reasons.from_download_message("<urlopen error [Errno 111] Connection refused>") == "unreachable"
    assert reasons.from_download_message("HTTP Error 404: Not Found") == "http_error"
    assert reasons.from_download_message("something new") == "other"
    with pytest.raises(ValueError, match="unknown skip reason 'undecodeable'"):
        reasons.check("undecodeable")
