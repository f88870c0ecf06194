"""Instruction data for SFT: records of (image, conversation) at both scales.

    python -m oqvl.train.sft_data --out results/sft_data/toy.parquet --n 6000 --seed 0

Paper scale reads LLaVA-format JSON (LLaVA-665k): a list of {"id", "image": relative path,
"conversations": [{"from": "human"|"gpt", "value": ...}]} with images under an image root; a
record without "image" is text-only. MAmmoTH-VL's single-image 10M is read as the reference's
split script leaves it (Open-Qwen2VL data_prepare/split_mammoth_10m.py): a .jsonl index of
{"path", "length"} lines beside a folder instruction_si_split/ holding one such LLaVA record per
JSON file (prismatic-vlms datasets.py:240-266 reads it the same way), images under the image root
(the reference's single_image_data/, fine_tune_mammoth.sh).

Toy scale generates the same format from the toy world (stream "sft": its images are never
those of the web sources, the CLIP seed set or the benchmarks), stored as parquet with the image
bytes inline. Each conversation has one image and a few turns, each a question about a true fact
of the scene (colours, shapes, positions, counts, characters, existence) asked in one of the
formats evaluation uses: a short direct answer, a yes/no answer, or lettered options answered with
the letter. Some turns ask for a caption, so captioning is not forgotten; some (`lookup_share`) are
text-only option lookups ("Which option is red?"), the letter step of multiple choice on its own.
Answer letters and yes/no are drawn uniformly, so no answer bias is learned.

A share of the toy conversations (`raw_share`) is a single question written as the `paper`
evaluation protocol writes its prompts (oqvl.evaluate.paper: no chat template, the model's BOS in
front, "...\nAnswer:" and the answer after a space, ended by a newline, one of the reference's
stop tokens): the reference evaluates its chat-tuned model on such raw prompts, which a model of
Qwen2.5's size answers from its pretraining and a toy one has never seen. These records carry
`prompt_format: raw`; LLaVA-format records are chat conversations.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from ..evaluate.paper import MC_SUFFIX, SHORT_SUFFIX
from ..io import inside, write_parquet
from ..manifest import args_config, manifest_path, write_manifest
from ..world.captions import describe, sample_style
from ..world.questions import (
    COUNT_CHOICES,
    FLOAT_KINDS,
    INTEGER_KINDS,
    KINDS,
    ask,
    letters,
)
from ..world.scene import CELLS, COLOURS, SHAPES, png_bytes, render, sample_scene
from ..world.source import WorldConfig, stream_rng

STREAM = "sft"
SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."
INTEGER = "Answer the question using a single integer number."
FLOAT = "Answer the question using a single floating-point number with two decimal places."
CAPTION_PROMPTS = ("Describe the image briefly.", "What is in this picture?",
                   "Write a short caption for this image.")
ROLE = {"human": "user", "gpt": "assistant", "system": "system"}


PROMPT_FORMATS = ("chat", "raw")


@dataclass
class Record:
    id: str
    messages: list[dict]
    """[{"role": "user"|"assistant"|"system", "content": str}], "<image>" where the image goes."""
    image: Callable[[], bytes] | None
    """Reads the image bytes (lazily: paper-scale sets are large); None for text-only records."""
    prompt_format: str = "chat"
    """chat: the chat template (oqvl.model.chat.encode_conversation); raw: one question and its
    answer as the paper protocol sends it (oqvl.model.chat.encode_raw_example)."""

    def load(self) -> Record:
        return self


@dataclass
class SplitRecord:
    """A MAmmoTH-VL record whose conversation lies in a JSON file of its own, read when batched
    (10M conversations do not fit in memory at once)."""
    path: Path
    image_root: Path

    def load(self) -> Record:
        try:
            item = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{self.path}: not a readable conversation JSON ({type(e).__name__}: {e})") from e
        return llava_record(item, self.image_root, str(self.path))


def to_messages(conversations: list[dict], where: str) -> list[dict]:
    out = []
    for turn in conversations:
        role = ROLE.get(turn.get("from"))
        if role is None or not isinstance(turn.get("value"), str):
            raise ValueError(f"{where}: bad turn {turn!r} (need from=human|gpt|system and a string value)")
        out.append({"role": role, "content": turn["value"]})
    return out


# --------------------------------------------------------------------------------- formats

def options_block(options: list[str], style: str) -> str:
    ls = letters(len(options))
    if style == "inline":  # MMStar writes its options into the question
        return "Options: " + ", ".join(f"{l}: {o}" for l, o in zip(ls, options))
    return "\n".join(f"{l}. {o}" for l, o in zip(ls, options))


def direct_prompt(q, numeric_hint: bool) -> tuple[str, str]:
    """(user text, answer) asking for the answer itself. Numbers are asked either with the
    generic hint (the paper protocol's) or with their type's (lmms-eval's MathVista format
    prompt: an integer, a float with two decimals)."""
    if numeric_hint and q.kind in INTEGER_KINDS:
        return f"{q.question}\n{INTEGER}", q.answer
    if numeric_hint and q.kind in FLOAT_KINDS:
        return f"{q.question}\n{FLOAT}", f"{float(q.answer):.2f}"
    return f"{q.question}\n{SHORT}", q.answer


def question_turn(q, rng: np.random.Generator) -> tuple[str, str]:
    """(user text, assistant answer) for one question in a randomly chosen format."""
    if q.kind == "exists":
        text, answer = f"{q.question}\n{SHORT}", q.answer.capitalize()
    elif rng.choice(["short", "letter", "letter"]) == "short":
        text, answer = direct_prompt(q, q.kind == "count" or rng.random() < 0.5)
    else:
        options, k = q.options(rng)
        style = rng.choice(["lines", "lines_spaced", "inline"])
        block = options_block(options, "inline" if style == "inline" else "lines")
        sep = " There are several options:\n" if style == "lines_spaced" else "\n"
        text, answer = f"{q.question}{sep}{block}\n{LETTER}", letters(len(options))[k]
    # The paper protocol's prompts end with "Answer:" in every format (yes/no and free-form
    # included); half the turns do, so both protocols' prompts are ones the model has seen.
    if rng.random() < 0.5:
        text += "\nAnswer:"
    return text, answer


def raw_turn(q, rng: np.random.Generator) -> tuple[str, str]:
    """(raw prompt, answer) for one question, in one of the paper protocol's prompt shapes, with
    its own closing lines (oqvl.evaluate.paper): POPE's and MMStar's ("Question: ..."),
    MathVista's free-form one, or lettered options as MMBench, SEED-Bench and MathVista's
    multiple choice list them."""
    if q.kind == "exists":
        return f"<image>\nQuestion: {q.question}{SHORT_SUFFIX}", q.answer.capitalize()
    shape = rng.choice(["short", "lines", "lines", "inline"])
    if shape == "short":
        answer = f"{float(q.answer):.2f}" if q.kind in FLOAT_KINDS else q.answer
        return f"<image>\n{q.question}{SHORT_SUFFIX}", answer
    options, k = q.options(rng)
    head = f"<image>\nQuestion: {q.question}" if shape == "inline" else f"<image>\n{q.question}"
    block = options_block(options, "inline" if shape == "inline" else "lines")
    return f"{head}\n{block}{MC_SUFFIX}", letters(len(options))[k]


LOOKUP_VALUES = (tuple(COLOURS), SHAPES, CELLS, COUNT_CHOICES)


def lookup_turn(rng: np.random.Generator) -> tuple[str, str]:
    """A text-only option lookup ("Which option is red?" over lettered options): the letter step of
    multiple choice on its own, with the answer named in the question."""
    values = LOOKUP_VALUES[rng.integers(len(LOOKUP_VALUES))]
    options = [values[j] for j in rng.permutation(len(values))]
    k = int(rng.integers(len(options)))
    block = options_block(options, "inline" if rng.random() < 0.3 else "lines")
    return f"Which option is {options[k]}?\n{block}\n{LETTER}", letters(len(options))[k]


@dataclass(frozen=True)
class Mix:
    """What the turns of a toy conversation are: a caption request, a text-only option lookup, or
    a question about the image whose kind is drawn with kind_weights (None: uniform)."""
    caption_share: float = 0.15
    lookup_share: float = 0.0
    kind_weights: tuple[float, ...] | None = None
    raw_share: float = 0.0  # conversations that are one raw-prompt question (see the module docstring)


def _kind(rng, p):
    return KINDS[rng.integers(len(KINDS)) if p is None else rng.choice(len(KINDS), p=p)]


def toy_conversation(seed: int, i: int, world: WorldConfig, turns: int, mix: Mix = Mix()
                     ) -> tuple[bytes, list[dict], str]:
    """(image, conversation, prompt format)."""
    rng = stream_rng(seed, STREAM, i)
    scene = sample_scene(rng, world.max_objects, world.glyph_prob)
    p = None if mix.kind_weights is None else np.asarray(mix.kind_weights, float) / sum(mix.kind_weights)
    # Its own stream, so raw_share = 0 leaves every other conversation as it was.
    if mix.raw_share and stream_rng(seed, STREAM + "_format", i).random() < mix.raw_share:
        q = None
        while q is None:
            q = ask(scene, _kind(rng, p), rng)
        user, answer = raw_turn(q, rng)
        conv = [{"from": "human", "value": user}, {"from": "gpt", "value": answer}]
        return png_bytes(render(scene, world.image_size)), conv, "raw"
    conv = []
    for t in range(turns):
        r = rng.random()
        if r < mix.caption_share:
            user = str(rng.choice(CAPTION_PROMPTS))
            answer = describe(scene, sample_style(rng, world.max_objects + 1))
        elif r < mix.caption_share + mix.lookup_share:
            user, answer = lookup_turn(rng)
        else:
            q = None
            while q is None:
                q = ask(scene, _kind(rng, p), rng)
            user, answer = question_turn(q, rng)
        if t == 0:
            user = "<image>\n" + user
        conv += [{"from": "human", "value": user}, {"from": "gpt", "value": answer}]
    return png_bytes(render(scene, world.image_size)), conv, "chat"


def generate(out: Path, n: int, seed: int, world: WorldConfig, turns: int, mix: Mix = Mix()) -> dict:
    rows = []
    for i in tqdm(range(n), desc="sft data", unit="conv", mininterval=5):
        image, conv, prompt_format = toy_conversation(seed, i, world, turns, mix)
        rows.append({"id": f"{STREAM}-{i:07d}", "image": image, "conversations": json.dumps(conv),
                     "prompt_format": prompt_format})
    df = pd.DataFrame(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_parquet(df, out)
    n_turns = sum(len(json.loads(c)) // 2 for c in df["conversations"])
    return {"conversations": n, "turns": n_turns, "raw": int((df["prompt_format"] == "raw").sum())}


# ---------------------------------------------------------------------------------- loading

def load_records(path, image_root=None) -> list[Record]:
    """Records from a toy parquet (images inline) or a LLaVA-format JSON (+ image_root)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: SFT data not found")
    if path.suffix == ".parquet":
        df = pd.read_parquet(path)
        missing = {"id", "image", "conversations"} - set(df.columns)
        if missing:
            raise ValueError(f"{path}: missing columns {sorted(missing)}")
        if "prompt_format" not in df.columns:
            df["prompt_format"] = "chat"
        bad = sorted(set(df["prompt_format"]) - set(PROMPT_FORMATS))
        if bad:
            raise ValueError(f"{path}: unknown prompt_format {bad} (choose from {list(PROMPT_FORMATS)})")
        return [Record(str(r.id), to_messages(json.loads(r.conversations), f"{path} id {r.id}"),
                       (lambda b=r.image: b) if r.image is not None else None, r.prompt_format)
                for r in df.itertuples()]
    root = Path(image_root) if image_root else path.parent
    if path.suffix == ".json":
        items = json.loads(path.read_text())
        if not isinstance(items, list):
            raise ValueError(f"{path}: expected a JSON list of LLaVA records")
        return [llava_record(item, root, f"{path} id {item.get('id')}") for item in items]
    if path.suffix == ".jsonl":
        return split_records(path, root)
    raise ValueError(f"{path}: SFT data must be .parquet (toy), .json (LLaVA format) or .jsonl "
                     f"(MAmmoTH-VL's split index)")


def llava_record(item: dict, image_root: Path, where: str) -> Record:
    if not isinstance(item, dict) or not isinstance(item.get("conversations"), list):
        raise ValueError(f"{where}: a LLaVA record needs a conversations list")
    img = item.get("image")
    image = inside(image_root, img, where) if img else None  # checked now, read when trained on
    reader = image.read_bytes if image else None
    return Record(str(item.get("id")), to_messages(item["conversations"], where), reader)


def split_records(index: Path, image_root: Path) -> list[SplitRecord]:
    """MAmmoTH-VL's index: one {"path", "length"} line per conversation file in instruction_si_split/."""
    folder = index.parent / "instruction_si_split"
    if not folder.is_dir():
        raise FileNotFoundError(f"{index}: no instruction_si_split/ folder beside the index")
    records = []
    with open(index) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rel = json.loads(line)["path"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{index}:{n}: not a {{\"path\": ..., \"length\": ...}} line") from None
            records.append(SplitRecord(inside(folder, rel, f"{index}:{n}"), image_root))
    return records


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, required=True, help="conversations")
    ap.add_argument("--turns", type=int, default=3, help="question turns per conversation")
    ap.add_argument("--seed", type=int, default=0)
    WorldConfig.add_args(ap)
    ap.add_argument("--caption-share", type=float, default=Mix.caption_share, help="turns asking for a caption")
    ap.add_argument("--lookup-share", type=float, default=Mix.lookup_share, help="text-only option lookups")
    ap.add_argument("--raw-share", type=float, default=Mix.raw_share,
                    help="conversations that are one question in the paper protocol's raw prompt format")
    ap.add_argument("--kind-weights", default=None,
                    help=f"JSON {{kind: weight}} over {', '.join(KINDS)} (default: uniform)")
    args = ap.parse_args(argv)
    if args.n < 1 or args.turns < 1:
        raise SystemExit("error: --n and --turns must be at least 1")
    if not (0 <= args.caption_share and 0 <= args.lookup_share and args.caption_share + args.lookup_share < 1):
        raise SystemExit("error: --caption-share and --lookup-share must be >= 0 and sum below 1")
    if not 0 <= args.raw_share <= 1:
        raise SystemExit(f"error: --raw-share must be in [0, 1], got {args.raw_share}")
    weights = None
    if args.kind_weights:
        given = json.loads(args.kind_weights)
        unknown = set(given) - set(KINDS)
        if unknown or not any(given.get(k, 0) > 0 for k in KINDS) or any(v < 0 for v in given.values()):
            raise SystemExit(f"error: --kind-weights: weights >= 0 over {list(KINDS)}, one positive; got {given}")
        weights = tuple(float(given.get(k, 0)) for k in KINDS)
    world = WorldConfig.from_args(args)
    counts = generate(args.out, args.n, args.seed, world, args.turns,
                      Mix(args.caption_share, args.lookup_share, weights, args.raw_share))
    write_manifest(manifest_path(args.out), "sft_data", work=(counts["conversations"], "conversations"),
                   config=args_config(args), files=[args.out], counts=counts)
    print(f"{args.out}: {counts}")


if __name__ == "__main__":
    main()
