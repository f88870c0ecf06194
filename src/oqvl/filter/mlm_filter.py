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
hold for the image, times 100 (`fact_score`), then for its true caption. Paper scale: the
released mlm-filter-qwen2.5-1.5b-gpt4o (a LLaVA-Unified model), converted to this project's
checkpoint by `python -m oqvl.filter.mlm_release`, is run by `score --prompt official`: the
official scoring script's prompt, conversation and decoding (`official_prompt_ids`, max_new_tokens
2; docs/mlm_filter.md says what differs from the reference code). Or (`import`) the scores that
script wrote (one parquet per shard, a `<metric>_score` text column) are read and parsed by the
same `parse_score`.

Resumable: scores are written in chunks of --chunk pairs under OUT.parts-<hash>/ (the hash of the
model path, the content of its folder, the metric, the decoding length and a non-default prompt
style or dtype); a crashed run keeps its finished chunks and restarts at the first pair no chunk
holds. Each job writes its manifest:
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


# ------------------------------------------------------------------------- official prompt
# The released model's prompt, verbatim from MLM_Filter's
# mlm_filter_scoring_datacomp_batch_inference_v2.py (v2.py:32-53: LLAVA_INSTRUCTION_TEMPLATE and
# the criteria_* strings), in LLaVA-Unified's qwen_instruct conversation (llava/conversation.py:394-403).
OFFICIAL_TEMPLATE = """Text Caption: {caption}

{criteria} A higher score indicates higher level of {aspect}. Ensure that your scoring is nuanced and uses the entire range from 0 to 100, reflecting the subtle differences. The score should be given as an integer, with each number between 0 and 100 considered as a potential score, avoiding the tendency to round to multiples of 5 or 10. Please first output a single line containing the value indicating the scores. In the subsequent line, please provide a comprehensive explanation of your evaluation, avoiding any potential bias."""

OFFICIAL_CRITERIA_IMAGE_TEXT_MATCHING = "Please evaluate if the provided text caption accurately represents the main features and objects of the image. The caption doesn't need to detail every aspect of the image, but it should capture its primary theme. Rate the overall quality of the text caption's match to the image on a scale of 1-100, considering the criteria mentioned."

OFFICIAL_CRITERIA_OBJECT_DETAIL_FULFILLMENT = "Please evaluate the text caption to determine if it provides detailed descriptions of objects that align with the image. Specifically, assess if the caption sufficiently describes the color, size, position, shape, material, etc., of the objects. Afterward, rate the caption's overall accuracy in capturing object details from the image on a scale of 1-100, based on the criteria provided."

OFFICIAL_CRITERIA_CAPTION_TEXT_QUALITY = "Please evaluate the text caption based on the following criteria: Grammatical Correctness, Diversity of Vocabulary (e.g., the range and uniqueness of words used), Fluency (e.g., smoothness and natural flow of sentences), Readability, Length, and Structure. Assign an overall quality score on a scale of 1-100."

OFFICIAL_CRITERIA_SEMANTIC_UNDERSTANDING = """Evaluate the given text caption in relation to its corresponding image. Your goal is to determine if the text caption provides additional semantic information that isn't readily apparent just from the image itself.

For example:

1. If the image mentions "a man" but the caption elaborates he is a "homeless man" or a "businessman," then the caption is enriching the semantic context.
2. If the caption introduces concepts like the mathematical tangent function, which require in-depth knowledge to deduce, it is imparting external semantics.
3. Captions revealing specific location addresses, festival details, or other nuanced data not easy to infer from the image also provide external semantic information.
4. Directly identifying specific entities in the image such as buildings, people, bird species, animal breeds, car models, engines, etc., in the caption introduces additional insights.
5. Should the image act as a contextual backdrop and the caption describes elements not explicitly showcased in the image, it has semantic depth.
6. Lastly, if the caption depicts relationships between the subjects in the image, which need commonsense knowledge to understand, it should be considered semantically rich.

Please assess and determine the extent of semantic enrichment the caption provides over the image. Rate the text caption's semantic depth on a scale from 1 to 100."""
OFFICIAL_CRITERIA = {
    "image_text_matching": OFFICIAL_CRITERIA_IMAGE_TEXT_MATCHING,
    "object_detail_fulfillment": OFFICIAL_CRITERIA_OBJECT_DETAIL_FULFILLMENT,
    "caption_text_quality": OFFICIAL_CRITERIA_CAPTION_TEXT_QUALITY,
    "semantic_understanding": OFFICIAL_CRITERIA_SEMANTIC_UNDERSTANDING,
}  # v2.py:150-155
OFFICIAL_SYSTEM = "<|im_start|>system\nYou are a helpful assistant"        # conversation.py:395-396
OFFICIAL_ROLES = ("<|im_start|>user\n", "<|im_start|>assistant\n")        # conversation.py:397
OFFICIAL_SEP = "<|im_end|>"                                                 # conversation.py:402 (MPT style)
OFFICIAL_IMAGE = "<image>"                 # llava/constants.py:9, in front of the text (v2.py:70-73)
OFFICIAL_MAX_LEN = 2040                    # v2.py:230, the prompt's ids cut to it (v2.py:100)
OFFICIAL_MAX_NEW_TOKENS = 2                # v2.py:136-138 for qwen models
PROMPTS = ("toy", "official")


def official_prompt(caption: str, metric: str) -> str:
    """The text v2.py's format_text builds (v2.py:68-80): the instruction, "<image>\\n" in front,
    then the qwen_instruct conversation in the MPT separator style (conversation.py:65-73):
    system + sep, role + message + sep, the assistant role with no message."""
    if metric not in OFFICIAL_CRITERIA:
        raise ValueError(f"unknown MLM-Filter metric {metric!r}; known: {sorted(OFFICIAL_CRITERIA)}")
    text = OFFICIAL_TEMPLATE.format(caption=caption, criteria=OFFICIAL_CRITERIA[metric],
                                    aspect=metric.replace("_", " "))
    return (OFFICIAL_SYSTEM + OFFICIAL_SEP + OFFICIAL_ROLES[0] + OFFICIAL_IMAGE + "\n" + text
            + OFFICIAL_SEP + OFFICIAL_ROLES[1])


def official_prompt_ids(tok, caption: str, metric: str, visual_tokens: int, image_token_id: int) -> list[int]:
    """Token ids of the official prompt, as the reference feeds them to its model.

    tokenizer_image_token (llava/mm_utils.py:185-204): each piece around "<image>" tokenized alone
    (a leading BOS kept once), the image index between them; cut to OFFICIAL_MAX_LEN (v2.py:100);
    then the whitespace token (tok(" ")'s last id, v2.py:66, 103-104) appended; the image index
    becomes its `visual_tokens` slots (llava_arch.py:247-267) and the whole is cut to the
    tokenizer's model_max_length (tokenizer_model_max_length, llava_arch.py:278-281). Only the
    "<image>" put in front is an image: one inside a caption stays text.
    """
    head, tail = official_prompt(caption, metric).split(OFFICIAL_IMAGE, 1)
    chunks = [tok(head).input_ids, tok(tail).input_ids]
    bos = tok.bos_token_id
    offset = int(bos is not None and len(chunks[0]) > 0 and chunks[0][0] == bos)
    ids = chunks[0] + [None] + chunks[1][offset:]  # None: the image index
    ids = ids[:OFFICIAL_MAX_LEN] + [tok(" ").input_ids[-1]]
    out: list[int] = []
    for t in ids:
        out.extend([image_token_id] * visual_tokens if t is None else [t])
    limit = tok.model_max_length
    return out[:limit] if isinstance(limit, int) and limit < len(out) else out


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
    import torch

    from ..model.tokenizer import load_tokenizer
    from ..model.vlm import OpenQwen2VL

    out.mkdir(parents=True, exist_ok=True)
    df = seed_conversations(n, seed, world, metric)
    write_parquet(df, out / "seed.parquet")
    torch.manual_seed(seed)  # the untrained LM's weights: the same in every run of this config
    model = OpenQwen2VL.from_preset("toy", vision_weights=vision_weights, visual_tokens_pretrain=visual_tokens,
                                    visual_tokens_sft=visual_tokens)
    model.save_pretrained(out / "init")
    load_tokenizer(tokenizer).save_pretrained(out / "init")
    return {"pairs": len(df), "by_corruption": df["corruption"].value_counts().to_dict(),
            "mean_score": round(float(df["score"].mean()), 2)}


# ---------------------------------------------------------------------------------- scoring

class Scorer:
    """Batched greedy scoring with one model (visual tokens at the model's SFT resolution).

    prompt "toy": the toy model's own prompt in this project's chat template (what it was trained
    on); "official": the released model's (`official_prompt_ids`), answers decoded with special
    tokens skipped (v2.py:202). Prompts are left-padded with an attention mask either way.
    """

    def __init__(self, model_dir: str, metric: str, max_new_tokens: int, device: str,
                 prompt: str = "toy", dtype: str = "float32"):
        import torch

        from ..model.tokenizer import ENDOFTEXT, IM_END, load_tokenizer
        from ..model.vlm import OpenQwen2VL

        if prompt not in PROMPTS:
            raise ValueError(f"unknown prompt style {prompt!r}; known: {', '.join(PROMPTS)}")
        self.torch = torch
        self.model = OpenQwen2VL.from_pretrained(model_dir, device).to(getattr(torch, dtype)).eval()
        self.tok = load_tokenizer(model_dir)
        self.transform = self.model.image_transform()
        self.stops = [self.tok.convert_tokens_to_ids(IM_END), self.tok.convert_tokens_to_ids(ENDOFTEXT)]
        self.pad = self.tok.convert_tokens_to_ids(ENDOFTEXT)
        self.metric, self.max_new_tokens, self.device, self.prompt = metric, max_new_tokens, device, prompt

    def encode(self, caption: str) -> list[int]:
        from ..model.chat import encode_prompt

        v = self.model.config.visual_tokens_sft
        if self.prompt == "official":
            return official_prompt_ids(self.tok, caption, self.metric, v, self.model.config.image_token_id)
        return encode_prompt(self.tok, "<image>\n" + prompt(caption, self.metric), v,
                             projector=self.model.config.projector)

    def __call__(self, images: list, captions: list[str]) -> list[str]:
        torch = self.torch
        v = self.model.config.visual_tokens_sft
        ids = [self.encode(c) for c in captions]
        width = max(map(len, ids))
        input_ids = torch.tensor([[self.pad] * (width - len(x)) + x for x in ids], device=self.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=self.device)
        pixels = torch.stack([self.transform(im) for im in images]).to(self.device)
        with torch.inference_mode():
            new = self.model.generate(input_ids, pixels, self.max_new_tokens, self.stops, mask, v)
        if self.prompt == "official":
            return [self.tok.decode(x, skip_special_tokens=True) for x in new]
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
                image, caption, problem = decode(sample)
                if problem and problem[0] != "empty_caption":  # an empty caption is scored, as the reference does
                    rows.append({"uid": uid, "text": problem[1], "score": None, "status": f"failed: {problem[0]}"})
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
    fails = pd.DataFrame({"uid": table.loc[failed, "uid"], "reason": table.loc[failed, "status"].str[8:],
                          "message": table.loc[failed, "text"]})  # a failed row's text: the message
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
    fails = pd.DataFrame({c: pd.Series(dtype=str) for c in ("uid", "reason", "message")})
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
    c.add_argument("--prompt", choices=PROMPTS, default="toy",
                   help="toy: the toy model's prompt; official: the released MLM-Filter's")
    c.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="weights and activations (the reference scores in float16)")
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
                scorer = Scorer(args.model, args.metric, args.max_new_tokens, device, args.prompt, args.dtype)
                weights = weights_identity(args.model)  # content: a retrained model starts over
                key = {"model": args.model, "weights": weights, "metric": args.metric,
                       "max_new_tokens": args.max_new_tokens}
                # only where not the defaults, so the toy model's keys stay as they were
                key.update({k: getattr(args, k) for k, d in (("prompt", "toy"), ("dtype", "float32"))
                            if getattr(args, k) != d})
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
