"""MLM-Filter: a multimodal LLM reads each image-text pair and writes a 0-100 quality score.

    python -m oqvl.filter.mlm_filter seed --out results/filter/mlm_model --vision-weights CLIP_DIR \
        --tokenizer TOK_DIR --n 6000 --metric image_text_matching
    python -m oqvl.filter.mlm_filter score --shards results/raw/datacomp/shards --model DIR \
        --metric image_text_matching --out results/filter/datacomp/mlm_scores.parquet ...
    python -m oqvl.filter.mlm_filter import --scores-dir DIR --metric semantic_understanding ...

Scoring: the pair's caption goes into the instruction of one of the four MLM-Filter metrics, the
model decodes greedily, and `parse_score` reads the integer 0-100 from its text. An answer with no
readable number, or one outside 0-100, keeps its text and gets status `unparsable` or
`out_of_range` with no score: it is never read as 0 or 100, and a threshold rejects it. Pairs whose
image does not decode are listed in the failures table, as for the CLIP score.

Toy scale (`seed`): the toy MLM-Filter is the project's tiny VLM (toy CLIP tower, frozen; a new
LM) fine-tuned by the SFT trainer on seed pairs of the toy world (their own stream), each asked the
scoring prompt and answered with a score from the truth: the share of the caption's facts that
hold for the image, times 100 (`fact_score`), then for its true caption. Paper scale (`import`):
the released checkpoint is a LLaVA model (docs/mlm_filter.md says what this project's model code lacks to load it), so the
scores its official scoring script writes (one parquet per shard, a `<metric>_score` text column)
are read instead and parsed by the same `parse_score`.

Resumable: scores are written in chunks of --chunk pairs under OUT.parts-<hash>/ (the hash of the
model path, the content of its folder, the metric and the decoding length); a crashed run keeps its
finished chunks and restarts at the first pair no chunk holds. Each job writes its manifest:
OUT/seed.manifest.json (`seed`), beside the scores for `score` and `import` (mlm_scores.manifest.json).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import config_hash
from ..io import sha256_file, weights_identity, write_json, write_parquet
from ..manifest import args_config, manifest_path, write_manifest
from ..world.source import WorldConfig

FAULT_ENV = "OQVL_FAULT_AFTER_CHUNKS"  # tests: exit 17 after writing this many chunks
STATUSES = ("ok", "empty", "unparsable", "out_of_range")

# The four MLM-Filter quality metrics, each an instruction in the same frame (our wording).
METRICS = {
    "image_text_matching": "Judge how well the caption matches the main objects and theme of "
                           "the image.",
    "object_detail_fulfillment": "Judge how accurately the caption describes the details of the "
                                 "objects in the image: colour, size, position, shape and count.",
    "caption_text_quality": "Judge the caption as text: grammar, fluency, vocabulary, readability "
                            "and structure.",
    "semantic_understanding": "Judge how much semantic information the caption adds beyond what "
                              "the image shows at a glance: names of entities, context, "
                              "relations that need knowledge to see.",
}
TEMPLATE = ("Text Caption: {caption}\n\n{criteria} A higher score means a higher level of {aspect}. "
            "Give the score as one integer from 0 to 100 on the first line.")


def prompt(caption: str, metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"unknown MLM-Filter metric {metric!r}; known: {sorted(METRICS)}")
    return TEMPLATE.format(caption=caption, criteria=METRICS[metric], aspect=metric.replace("_", " "))


# ------------------------------------------------------------------------------------ parsing

_UNITS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen".split())}
_TENS = {w: 10 * i for i, w in enumerate("_ _ twenty thirty forty fifty sixty seventy eighty ninety".split())
         if w != "_"}
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
_WORDS = re.compile(r"[a-z]+")


def _words_number(text: str) -> int | None:
    """The first number written in English words (0-100), e.g. "eighty-five", "one hundred"."""
    words = _WORDS.findall(text.lower().replace("-", " "))
    for i, w in enumerate(words):
        nxt = words[i + 1] if i + 1 < len(words) else ""
        if w == "hundred" or (w in ("one", "a") and nxt == "hundred"):
            return 100
        if w in _TENS:
            return _TENS[w] + (_UNITS[nxt] if 0 < _UNITS.get(nxt, 0) < 10 else 0)
        if w in _UNITS:
            return _UNITS[w]
    return None


def parse_score(text: str | None) -> tuple[float | None, str]:
    """(score, status) of a model's answer: the first number in it, in digits or in words.

    "85" -> 85, "Score: 85/100" -> 85, "eighty-five" -> 85, "85.6" -> 86 (scores are integers),
    "" -> (None, "empty"), "good" -> (None, "unparsable"), "150" or "-3" -> (None, "out_of_range").
    """
    text = (text or "").strip()
    if not text:
        return None, "empty"
    m = _NUMBER.search(text)
    if m:
        value = float(m.group())
        value = float(np.floor(value + 0.5))
    else:
        words = _words_number(text)
        if words is None:
            return None, "unparsable"
        value = float(words)
    if not 0 <= value <= 100:
        return None, "out_of_range"
    return value, "ok"


# --------------------------------------------------------------------------------- toy truth

def fact_score(scene: dict, caption_scene: dict | None, style: dict) -> int:
    """100 x the share of the caption's facts that hold for the image (the toy MLM-Filter's
    target). Facts: each object phrase (colour, shape, and the size and position when the style
    says them) and the glyph; a fact the image has but the caption leaves out counts as missed,
    so the denominator is the larger of the two fact lists."""
    if caption_scene is None:
        return 0

    def facts(s: dict) -> list[tuple]:
        out = [(o["colour"], o["shape"], o["size"] if style["mention_size"] else None,
                o["cell"] if style["mention_position"] else None) for o in s["objects"]]
        if s.get("glyph"):
            out.append(("glyph", s["glyph"]["char"], None,
                        s["glyph"]["cell"] if style["mention_position"] else None))
        return out

    said, true = facts(caption_scene), Counter(facts(scene))
    hits = 0
    for f in said:
        if true[f] > 0:
            true[f] -= 1
            hits += 1
    return int(round(100 * hits / max(len(said), len(facts(scene)), 1)))


SEED_STREAM = "mlm_seed"
CAPTION_PROMPT = "Describe the image briefly."
SEED_RATES = {"wrong_attribute": 0.12, "wrong_object": 0.12, "wrong_count": 0.12,
              "generic_caption": 0.06, "empty_caption": 0.04, "other_caption": 0.12}
"""Corruption rates of the seed set (the rest clean): every way a caption goes wrong is seen."""


def seed_conversations(n: int, seed: int, world, metric: str) -> pd.DataFrame:
    """Scoring conversations in the SFT data format (id, image bytes, conversations JSON)."""
    from ..world.source import generate_source

    rows = []
    for pair in generate_source(seed, SEED_STREAM, n, SEED_RATES, world):
        t = pair.truth
        score = fact_score(json.loads(t["scene"]), json.loads(t["caption_scene"]) if t["caption_scene"] else None,
                           json.loads(t["caption_style"]))
        # After the score, the image's true caption: dense grounding signal for a new LM (a score
        # is 1-3 tokens). It comes second so the score can never be read off it.
        conv = [{"from": "human", "value": "<image>\n" + prompt(pair.caption, metric)},
                {"from": "gpt", "value": str(score)},
                {"from": "human", "value": CAPTION_PROMPT},
                {"from": "gpt", "value": t["true_caption"]}]
        rows.append({"id": pair.uid, "image": pair.image, "conversations": json.dumps(conv),
                     "corruption": t["corruption"], "score": score})
    return pd.DataFrame(rows)


def make_seed(out: Path, n: int, seed: int, world, metric: str, vision_weights: str, tokenizer: str,
              visual_tokens: int) -> dict:
    """OUT/seed.parquet (the training conversations) and OUT/init/ (the untrained toy VLM)."""
    from ..model.tokenizer import load_tokenizer
    from ..model.vlm import OpenQwen2VL

    out.mkdir(parents=True, exist_ok=True)
    df = seed_conversations(n, seed, world, metric)
    write_parquet(df, out / "seed.parquet")
    model = OpenQwen2VL.from_preset("toy", vision_weights=vision_weights, visual_tokens_pretrain=visual_tokens,
                                    visual_tokens_sft=visual_tokens)
    model.save_pretrained(out / "init")
    load_tokenizer(tokenizer).save_pretrained(out / "init")
    return {"pairs": len(df), "by_corruption": df["corruption"].value_counts().to_dict(),
            "mean_score": round(float(df["score"].mean()), 2)}


# ---------------------------------------------------------------------------------- scoring

class Scorer:
    """Batched greedy scoring with one model (visual tokens at the model's SFT resolution)."""

    def __init__(self, model_dir: str, metric: str, max_new_tokens: int, device: str):
        import torch

        from ..model.tokenizer import ENDOFTEXT, IM_END, load_tokenizer
        from ..model.vlm import OpenQwen2VL

        self.torch = torch
        self.model = OpenQwen2VL.from_pretrained(model_dir, device).eval()
        self.tok = load_tokenizer(model_dir)
        self.transform = self.model.image_transform()
        self.stops = [self.tok.convert_tokens_to_ids(IM_END), self.tok.convert_tokens_to_ids(ENDOFTEXT)]
        self.pad = self.tok.convert_tokens_to_ids(ENDOFTEXT)
        self.metric, self.max_new_tokens, self.device = metric, max_new_tokens, device

    def __call__(self, images: list, captions: list[str]) -> list[str]:
        from ..model.chat import encode_prompt

        torch = self.torch
        v = self.model.config.visual_tokens_sft
        ids = [encode_prompt(self.tok, "<image>\n" + prompt(c, self.metric), v) for c in captions]
        width = max(map(len, ids))
        input_ids = torch.tensor([[self.pad] * (width - len(x)) + x for x in ids], device=self.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=self.device)
        pixels = torch.stack([self.transform(im) for im in images]).to(self.device)
        with torch.inference_mode():
            new = self.model.generate(input_ids, pixels, self.max_new_tokens, self.stops, mask, v)
        return [self.tok.decode([t for t in x if t not in self.stops]) for x in new]


def score_source(shards: Path, score_batch, key: dict, out: Path, failures: Path,
                 batch_size: int = 64, chunk: int = 1024, expected: int | None = None) -> dict:
    """Score every pair of a source's shards with score_batch(images, captions) -> texts."""
    from tqdm import tqdm

    from ..shards import iter_samples, sample_uid, shard_paths
    from .clip_score import decode, parts_dir

    parts = parts_dir(out, key)
    parts.mkdir(parents=True, exist_ok=True)
    fault = int(os.environ.get(FAULT_ENV, "0"))
    written = 0
    paths = shard_paths(shards)
    with tqdm(total=expected, desc=f"mlm-filter {shards.parent.name}", unit="pair", mininterval=2) as bar:
        for path in paths:
            done = sorted(parts.glob(f"{path.stem}.*.parquet"))
            skip = sum(len(pd.read_parquet(p)) for p in done)  # pairs this shard's chunks hold
            bar.update(skip)
            rows, batch = [], []

            def flush_batch():
                if batch:
                    texts = score_batch([b[1] for b in batch], [b[2] for b in batch])
                    for (uid, _, _), text in zip(batch, texts):
                        score, status = parse_score(text)
                        rows.append({"uid": uid, "text": text, "score": score, "status": status})
                    bar.update(len(batch))
                    batch.clear()

            def flush_chunk():
                nonlocal written
                flush_batch()
                if rows:
                    write_parquet(pd.DataFrame(rows, columns=["uid", "text", "score", "status"]),
                                  parts / f"{path.stem}.{len(done):05d}.parquet")
                    done.append(parts / f"{path.stem}.{len(done):05d}.parquet")
                    rows.clear()
                    written += 1
                    if fault and written == fault:
                        os._exit(17)  # no cleanup: what a killed job leaves behind

            for i, sample in enumerate(iter_samples([path])):
                if i < skip:
                    continue
                uid = sample_uid(sample)
                image, caption, reason = decode(sample)
                if image is None:  # a bad image is listed with its reason (an empty caption is scored)
                    rows.append({"uid": uid, "text": None, "score": None, "status": f"failed: {reason}"})
                    bar.update(1)
                else:
                    batch.append((uid, image, caption))
                    if len(batch) == batch_size:
                        flush_batch()
                if len(rows) + len(batch) >= chunk:
                    flush_chunk()
            flush_chunk()
    table = pd.concat([pd.read_parquet(p) for p in sorted(parts.glob("*.parquet"))], ignore_index=True)
    if table["uid"].duplicated().any():
        raise RuntimeError(f"{parts}: duplicated uids {table.loc[table['uid'].duplicated(), 'uid'].head(3).tolist()}")
    failed = table["status"].str.startswith("failed: ")
    scores = table.loc[~failed].reset_index(drop=True).assign(score=lambda d: d["score"].astype(float))
    fails = pd.DataFrame({"uid": table.loc[failed, "uid"], "reason": table.loc[failed, "status"].str[8:]})
    scores["model"] = str(key.get("model"))
    scores["config_hash"] = config_hash(key)
    write_parquet(fails, failures)
    write_parquet(scores, out)
    for p in parts.iterdir():
        p.unlink()
    parts.rmdir()
    return summarize(scores, fails)


def summarize(scores: pd.DataFrame, fails: pd.DataFrame) -> dict:
    ok = scores["status"] == "ok"
    return {"scored": int(ok.sum()), "no_score": int((~ok).sum()), "failed": len(fails),
            "by_status": {s: int((scores["status"] == s).sum()) for s in STATUSES},
            "failed_by_reason": {k: int(v) for k, v in fails["reason"].value_counts().items()},
            "mean_score": round(float(scores.loc[ok, "score"].mean()), 2) if ok.any() else None}


def import_scores(files: list[Path], metric: str, out: Path, failures: Path) -> dict:
    """Scores written by the official MLM-Filter scoring script: parquet files with a `uid`
    column and a `<metric>_score` column holding the model's text."""
    if not files:
        raise FileNotFoundError("no score files given")
    col = f"{metric}_score"
    frames = []
    for f in files:
        df = pd.read_parquet(f)
        missing = {"uid", col} - set(df.columns)
        if missing:
            raise ValueError(f"{f}: missing columns {sorted(missing)} (an MLM-Filter output for {metric}?)")
        frames.append(df[["uid", col]].rename(columns={col: "text"}))
    table = pd.concat(frames, ignore_index=True).drop_duplicates("uid", keep="first")
    table["text"] = table["text"].map(lambda x: None if x is None else str(x))
    parsed = table["text"].map(parse_score)
    scores = table.assign(score=[p[0] for p in parsed], status=[p[1] for p in parsed])
    scores["score"] = scores["score"].astype(float)
    scores["model"] = f"imported:{metric}"
    scores["config_hash"] = config_hash({"files": sorted(map(str, files)), "metric": metric})
    fails = pd.DataFrame({"uid": pd.Series(dtype=str), "reason": pd.Series(dtype=str)})
    write_parquet(fails, failures)
    write_parquet(scores, out)
    return summarize(scores, fails)


# ------------------------------------------------------------------------------------- CLI

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("seed", help="toy: seed conversations + the untrained toy MLM-Filter model")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--n", type=int, required=True)
    s.add_argument("--metric", required=True, choices=sorted(METRICS))
    s.add_argument("--vision-weights", required=True)
    s.add_argument("--tokenizer", required=True)
    s.add_argument("--visual-tokens", type=int, default=16)
    s.add_argument("--seed", type=int, default=0)
    WorldConfig.add_args(s)
    c = sub.add_parser("score", help="score a source's shards with a model")
    c.add_argument("--shards", type=Path, required=True)
    c.add_argument("--model", required=True, help="checkpoint directory (config.json, weights, tokenizer)")
    c.add_argument("--metric", required=True, choices=sorted(METRICS))
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--max-new-tokens", type=int, default=4)
    c.add_argument("--chunk", type=int, default=1024, help="pairs per resumable chunk")
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--device", default=None)
    c.add_argument("--expected", type=int, default=None)
    i = sub.add_parser("import", help="paper scale: read the official scoring script's parquet files")
    i.add_argument("--scores-dir", type=Path, required=True)
    i.add_argument("--metric", required=True, choices=sorted(METRICS))
    for p in (c, i):
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--failures", type=Path, required=True)
        p.add_argument("--stats", type=Path, required=True)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "seed":
            world = WorldConfig.from_args(args)
            stats = make_seed(args.out, args.n, args.seed, world, args.metric, args.vision_weights,
                              args.tokenizer, args.visual_tokens)
            write_json(args.out / "seed_stats.json", stats)
            seed = args.out / "seed.parquet"
            init = sorted(p for p in (args.out / "init").rglob("*") if p.is_file())
            write_manifest(manifest_path(seed), "mlm_filter_seed", work=(stats["pairs"], "pairs"),
                           config=args_config(args), files=[seed, args.out / "seed_stats.json", *init],
                           counts=stats, inputs={p: weights_identity(p) for p in (args.vision_weights, args.tokenizer)})
        else:
            if args.cmd == "score":
                import torch

                torch.set_num_threads(args.threads)
                device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
                scorer = Scorer(args.model, args.metric, args.max_new_tokens, device)
                weights = weights_identity(args.model)  # content: a retrained model starts over
                key = {"model": args.model, "weights": weights, "metric": args.metric,
                       "max_new_tokens": args.max_new_tokens}
                stats = score_source(args.shards, scorer, key, args.out, args.failures, args.batch_size,
                                     args.chunk, args.expected)
                inputs = {args.model: weights}
            else:
                if not args.scores_dir.is_dir():
                    raise FileNotFoundError(f"{args.scores_dir}: MLM-Filter scores folder not found")
                files = sorted(args.scores_dir.glob(f"*_{args.metric}.parquet")) or sorted(args.scores_dir.glob("*.parquet"))
                stats = import_scores(files, args.metric, args.out, args.failures)
                device, inputs = "cpu", {str(f): sha256_file(f) for f in files}
            write_json(args.stats, stats)
            cuda = device.startswith("cuda")
            write_manifest(manifest_path(args.out), f"mlm_{args.cmd}",
                           work=(stats["scored"] + stats["no_score"] + stats["failed"], "pairs"),
                           config=args_config(args), files=[args.out, args.failures, args.stats],
                           counts=stats, inputs=inputs, device="cuda" if cuda else "cpu", gpus=int(cuda))
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"{args.cmd}: {stats}")


if __name__ == "__main__":
    main()
