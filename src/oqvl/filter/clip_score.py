"""CLIP-score every pair of a source's shards (cosine of image and caption embeddings).

    python -m oqvl.filter.clip_score --shards results/raw/ccs/shards --model NAME \
        --pretrained WEIGHTS --out results/filter/ccs/clip_scores.parquet

A sample whose image does not decode (or is over oqvl.reasons.MAX_PIXELS: refused from its
header) or whose caption is missing, not UTF-8 or empty is not scored: it goes to --failures
with its reason (a name from oqvl.reasons) and the decoder's message. Scores are written per shard into OUT.parts-<key>/ first, so a crashed
run resumes at the first unfinished shard; the key is the model name and the content of its
weights (`weights_key`), so a model retrained under the same path starts over. The job's manifest
lies beside OUT (clip_scores.manifest.json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

from .. import images
from ..config import config_hash
from ..images import Problem
from ..io import weights_identity, write_json, write_parquet
from ..manifest import args_config, manifest_path, write_manifest
from ..shards import iter_samples, sample_meta, sample_uid, shard_paths
from .clip_model import load_clip, score_pairs

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
FAILURE_COLUMNS = ["uid", "reason", "message"]  # reason: a name from oqvl.reasons; message: the library's


def decode(sample: dict) -> tuple[Image.Image | None, str, Problem | None]:
    """(image, caption, None), or (image or None, caption, (reason, message)) for a sample that
    cannot be scored: its image (oqvl.images.decode) or its caption (no_caption, caption_not_utf8,
    empty_caption) is bad."""
    image, problem = images.decode(next((sample[e] for e in IMAGE_EXTS if e in sample), None))
    if problem:
        return None, "", problem
    raw = sample.get("txt")
    if raw is None:
        return image, "", ("no_caption", "no txt in the sample")
    try:
        caption = raw.decode("utf-8").strip() if isinstance(raw, bytes) else str(raw).strip()
    except UnicodeDecodeError as e:
        return image, "", ("caption_not_utf8", str(e))
    if not caption:
        return image, caption, ("empty_caption", "the caption is empty or white space")
    try:
        sample_meta(sample)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return image, caption, ("metadata_unreadable", f"{type(e).__name__}: {e}")
    return image, caption, None


def score_batches(path: Path, score_batch, batch_size: int, bar) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(scores, failures) of one shard: `score_batch(images, captions, uids)` gives one float per
    pair of each batch; a sample that does not decode (or has no caption) is a failure with its
    reason and never reaches it. Shared by every scorer that runs over shards."""
    scored, failed = [], []
    batch: list[tuple[str, Image.Image, str]] = []

    def flush():
        if batch:
            uids, images, captions = map(list, zip(*batch))
            scored.extend({"uid": u, "score": float(x)} for u, x in zip(uids, score_batch(images, captions, uids)))
            bar.update(len(batch))
            batch.clear()

    for sample in iter_samples([path]):
        uid = sample_uid(sample)
        image, caption, problem = decode(sample)
        if problem:
            failed.append({"uid": uid, "reason": problem[0], "message": problem[1]})
            bar.update(1)
            continue
        batch.append((uid, image, caption))
        if len(batch) == batch_size:
            flush()
    flush()
    return (pd.DataFrame(scored, columns=["uid", "score"]).astype({"score": float}),
            pd.DataFrame(failed, columns=FAILURE_COLUMNS))


def score_shard(path: Path, clip, batch_size: int, device: str, bar) -> tuple[pd.DataFrame, pd.DataFrame]:
    model, preprocess, tokenizer = clip
    return score_batches(path, lambda images, captions, _: score_pairs(
        model, preprocess, tokenizer, images, captions, device), batch_size, bar)


def score_shards(shards: Path, out: Path, failures: Path, key: dict, score_one, columns: dict,
                 expected: int | None, desc: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every shard scored by `score_one(path, bar)` -> (scores, failures), each shard's result kept
    in OUT.parts-<key>/ until all are done (a crashed run resumes at its first unfinished shard);
    then OUT and FAILURES written in uid order with `columns` and the key's hash added."""
    parts = parts_dir(out, key)
    parts.mkdir(parents=True, exist_ok=True)
    paths = shard_paths(shards)
    with tqdm(total=expected, desc=f"{desc} {shards.parent.name}", unit="pair", mininterval=2) as bar:
        for path in paths:
            done_s, done_f = parts / f"{path.stem}.scores.parquet", parts / f"{path.stem}.failed.parquet"
            if done_s.exists() and done_f.exists():  # finished before a crash
                bar.update(len(pd.read_parquet(done_s)) + len(pd.read_parquet(done_f)))
                continue
            s, f = score_one(path, bar)
            write_parquet(f, done_f)
            write_parquet(s, done_s)  # last: both parts there mark a finished shard
    scores = pd.concat([pd.read_parquet(parts / f"{p.stem}.scores.parquet") for p in paths], ignore_index=True)
    failed = pd.concat([pd.read_parquet(parts / f"{p.stem}.failed.parquet") for p in paths], ignore_index=True)
    # uid order: the raw shards' order within a shard is the download's, which varies run to run
    scores = scores.sort_values("uid", kind="stable", ignore_index=True)
    failed = failed.sort_values("uid", kind="stable", ignore_index=True)
    for name, value in columns.items():
        scores[name] = value
    scores["config_hash"] = config_hash(key)
    write_parquet(failed, failures)
    write_parquet(scores, out)
    for p in parts.iterdir():
        p.unlink()
    parts.rmdir()
    return scores, failed


def weights_key(model: str, pretrained: str | None, tag: str | None = None) -> dict:
    """What decides the scores: the model name, the content of its weights (a toy checkpoint
    folder, a weights file or an open_clip tag; the model itself when it is the checkpoint) and
    the tag a weights file is a copy of."""
    key = {"model": model, "weights": weights_identity(pretrained if pretrained is not None else model)}
    return {**key, "tag": tag} if tag is not None else key


def parts_dir(out: Path, key: dict) -> Path:
    """Where finished parts of OUT wait; named by what decides the scores, so a change starts over."""
    return out.with_name(f"{out.name}.parts-{config_hash(key)}")


def score_source(shards: Path, model: str, pretrained: str | None, out: Path, failures: Path,
                 batch_size: int = 256, threads: int = 1, device: str = "cpu",
                 expected: int | None = None, key: dict | None = None, tag: str | None = None) -> dict:
    """Score every pair of the shards; `key` is weights_key(model, pretrained, tag) if already known."""
    torch.set_num_threads(threads)
    key = key or weights_key(model, pretrained, tag)
    clip = load_clip(model, pretrained, device, tag=tag)
    scores, failed = score_shards(shards, out, failures, key, lambda path, bar: score_shard(
        path, clip, batch_size, device, bar), {"model": f"{model}:{pretrained}"}, expected, "clip score")
    return {"scored": len(scores), "failed": len(failed),
            "failed_by_reason": {k: int(v) for k, v in failed["reason"].value_counts().items()}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=Path, required=True)
    ap.add_argument("--model", required=True, help="open_clip model name")
    ap.add_argument("--pretrained", default=None, help="open_clip pretrained tag, weights file or toy checkpoint dir")
    ap.add_argument("--pretrained-tag", default=None,
                    help="the open_clip tag a weights file is a copy of (e.g. openai: QuickGELU)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--failures", type=Path, required=True)
    ap.add_argument("--stats", type=Path, required=True)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--expected", type=int, default=None, help="samples in the shards (progress bar total)")
    args = ap.parse_args(argv)
    key = weights_key(args.model, args.pretrained, args.pretrained_tag)
    try:
        stats = score_source(args.shards, args.model, args.pretrained, args.out, args.failures,
                             args.batch_size, args.threads, args.device, args.expected, key,
                             tag=args.pretrained_tag)
    except ValueError as e:
        sys.exit(f"error: {e}")
    write_json(args.stats, stats)
    cuda = str(args.device).startswith("cuda")
    write_manifest(manifest_path(args.out), "clip_score", work=(stats["scored"] + stats["failed"], "pairs"),
                   config=args_config(args), files=[args.out, args.failures, args.stats],
                   counts=stats, inputs={str(args.pretrained or args.model): key["weights"]},
                   device="cuda" if cuda else "cpu", gpus=int(cuda))
    print(f"{args.shards}: {stats}")


if __name__ == "__main__":
    main()
