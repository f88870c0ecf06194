"""Reading and writing webdataset shards (tar files of samples sharing a key).

Samples are dicts of raw bytes by extension plus "__key__"; nothing is decoded here, so a bad
image reaches the stage that can say what is wrong with it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

import webdataset as wds


def shard_paths(folder: str | Path) -> list[Path]:
    paths = sorted(Path(folder).glob("*.tar"))
    if not paths:
        raise FileNotFoundError(f"{folder}: no .tar shards")
    return paths


def iter_samples(paths: Iterable[str | Path]) -> Iterator[dict]:
    """Raw samples of the given shards, in order."""
    urls = [str(p) for p in paths]
    if not urls:
        return
    yield from wds.WebDataset(urls, shardshuffle=False, empty_check=False)


def sample_meta(sample: dict) -> dict:
    return json.loads(sample["json"]) if "json" in sample else {}


def sample_uid(sample: dict) -> str:
    """The pair's uid from its JSON (img2dataset's save_additional_columns), else the tar key (no
    json, an unreadable one, or one without a uid)."""
    try:
        meta = sample_meta(sample)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return str(sample["__key__"])
    return str(meta["uid"]) if isinstance(meta, dict) and meta.get("uid") is not None else str(sample["__key__"])


def sample_caption(sample: dict) -> str:
    return sample["txt"].decode("utf-8") if isinstance(sample.get("txt"), bytes) else sample.get("txt", "")


class ShardSink:
    """Write samples into OUT/%05d.tar, maxcount per shard, with fixed mtimes (same bytes every run)."""

    def __init__(self, folder: str | Path, maxcount: int):
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.writer = wds.ShardWriter(str(Path(folder) / "%05d.tar"), maxcount=maxcount,
                                      verbose=0, mtime=0, encoder=False)
        self.count = 0

    def write(self, sample: dict) -> None:
        self.writer.write(sample)
        self.count += 1

    def close(self) -> None:
        self.writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
