"""A user's own filter: a Python function that scores pairs, run over a source's shards.

    python -m oqvl.filter.user --shards results/raw/datacomp/shards \
        --scorer oqvl.filter.examples.colour_agreement:score --options '{}' \
        --out results/filter/datacomp/user_scores_colour.parquet --failures F.parquet --stats S.json

The scorer is named `module:function` (an importable module, or a .py file's path) and follows
`Scorer`, the one contract (docs/filters.md, "Your own filter"): it gets a batch of decoded
pairs and returns one float per pair, NaN for "no score". Samples whose image does not decode or
whose caption is empty go to --failures with their reason, as in CLIP scoring (the scorer never
sees them). Scores are written per shard into OUT.parts-<key>/ first, so a crashed run resumes at
the first unfinished shard; the key is the scorer's name, options and module file's sha256, so an
edited scorer starts over. The job's manifest lies beside OUT.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from PIL import Image

from ..io import sha256_file, write_json
from ..manifest import args_config, manifest_path, write_manifest

BATCH_SIZE = 64  # pairs per call when the filter's config gives no batch_size


class Scorer(Protocol):
    """A user filter: one float per pair of the batch, in order (higher = keep first); NaN means
    no score (the pair is rejected by any rule, and counted). `options` are the config's
    `options:` mapping, as keyword arguments. Images are decoded RGB; captions are non-empty."""

    def __call__(self, images: list[Image.Image], captions: list[str], uids: list[str],
                 **options) -> Sequence[float]: ...


class ScorerError(ValueError):
    """A scorer that cannot be found, or that broke the contract; str() is one line naming it."""


def _split(ref: str) -> tuple[str, str]:
    module, sep, function = ref.rpartition(":")
    if not sep or not module or not function.isidentifier():
        raise ScorerError(f"scorer {ref!r}: not of the form module:function (or path/to/file.py:function)")
    return module, function


def scorer_file(ref: str) -> Path:
    """The file of the scorer's module, found without importing it (the Snakefile reads it: an
    edited scorer reruns its scores)."""
    module, _ = _split(ref)
    if module.endswith(".py"):
        path = Path(module)
        if not path.is_file():
            raise ScorerError(f"scorer {ref!r}: no file {module}")
        return path
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as e:
        raise ScorerError(f"scorer {ref!r}: cannot find module {module!r} ({e})") from None
    if spec is None or not spec.origin or not Path(spec.origin).is_file():
        raise ScorerError(f"scorer {ref!r}: no importable module {module!r} (is it on PYTHONPATH?)")
    return Path(spec.origin)


def load_scorer(ref: str) -> Scorer:
    module, function = _split(ref)
    if module.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(module).stem, scorer_file(ref))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    else:
        scorer_file(ref)  # the one-line error for a missing module
        mod = importlib.import_module(module)
    fn = getattr(mod, function, None)
    if not callable(fn):
        raise ScorerError(f"scorer {ref!r}: module {module!r} has no function {function!r}")
    return fn


def scorer_key(ref: str, options: dict) -> dict:
    """What decides the scores: the scorer's name, its options and its module file's content."""
    return {"scorer": ref, "options": options, "code": sha256_file(scorer_file(ref))}


def call_scorer(fn: Scorer, ref: str, images, captions, uids, options: dict) -> list[float]:
    """The scorer on one batch, its answer checked against the contract."""
    out = fn(images, captions, uids, **options)
    try:
        scores = [float(x) for x in out]
    except (TypeError, ValueError) as e:
        raise ScorerError(f"scorer {ref!r}: returned {type(out).__name__}, not one float per pair ({e})") from None
    if len(scores) != len(uids):
        raise ScorerError(f"scorer {ref!r}: returned {len(scores)} scores for a batch of {len(uids)} pairs")
    if any(math.isinf(s) for s in scores):
        raise ScorerError(f"scorer {ref!r}: returned an infinite score (NaN is 'no score')")
    return scores


def score_shard(path: Path, fn: Scorer, ref: str, options: dict, batch_size: int, bar):
    from .clip_score import score_batches  # the same failures as CLIP scoring

    return score_batches(path, lambda images, captions, uids: call_scorer(
        fn, ref, images, captions, uids, options), batch_size, bar)


def score_source(shards: Path, ref: str, options: dict, out: Path, failures: Path,
                 batch_size: int = BATCH_SIZE, expected: int | None = None) -> dict:
    """Score every pair of the shards with the user's scorer (resumable per shard)."""

    from .clip_score import score_shards

    fn = load_scorer(ref)
    key = scorer_key(ref, options)
    scores, failed = score_shards(shards, out, failures, key, lambda path, bar: score_shard(
        path, fn, ref, options, batch_size, bar), {"scorer": ref}, expected, "user score")
    return {"scored": len(scores), "failed": len(failed), "no_score": int(scores["score"].isna().sum()),
            "failed_by_reason": {k: int(v) for k, v in failed["reason"].value_counts().items()}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=Path, required=True)
    ap.add_argument("--scorer", required=True, help="module:function (or path/to/file.py:function)")
    ap.add_argument("--options", default="{}", help="JSON object: the scorer's keyword arguments")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--failures", type=Path, required=True)
    ap.add_argument("--stats", type=Path, required=True)
    ap.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    ap.add_argument("--expected", type=int, default=None, help="samples in the shards (progress bar total)")
    args = ap.parse_args(argv)
    try:
        options = json.loads(args.options)
        if not isinstance(options, dict):
            raise ScorerError(f"scorer {args.scorer!r}: --options is not a JSON object")
        stats = score_source(args.shards, args.scorer, options, args.out, args.failures,
                             args.batch_size, args.expected)
        code = {str(scorer_file(args.scorer)): scorer_key(args.scorer, options)["code"]}
    except (ScorerError, FileNotFoundError, json.JSONDecodeError) as e:
        sys.exit(f"error: {e}")
    write_json(args.stats, stats)
    torch = sys.modules.get("torch")  # a scorer that put a model on a GPU: the accounting counts it
    cuda = bool(torch is not None and torch.cuda.is_initialized())
    write_manifest(manifest_path(args.out), "user_score", work=(stats["scored"] + stats["failed"], "pairs"),
                   config=args_config(args), files=[args.out, args.failures, args.stats],
                   counts=stats, inputs=code, device="cuda" if cuda else "cpu", gpus=int(cuda))
    print(f"{args.shards}: {stats}")


if __name__ == "__main__":
    main()
