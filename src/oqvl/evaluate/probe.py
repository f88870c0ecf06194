"""What a toy model has learned, per question kind and answer format, against shuffled images.

    python -m oqvl.evaluate.probe --model results/runs/ccs+datacomp/seed0/sft/final --n 400

Draws n fresh scenes (their own stream, never trained on), asks each a question of every kind it
can answer in three formats (a short direct answer, lettered options answered with the letter, and
yes/no), decodes greedily, and scores exact answers. The same prompts are then asked with the
images shuffled across questions: a format counts as learned only where the true images beat the
shuffled ones. Faster and finer-grained than the benchmarks; the benchmarks stay the reference.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np
import torch

from ..model.chat import encode_prompt
from ..model.tokenizer import ENDOFTEXT, IM_END, load_tokenizer
from ..model.vlm import OpenQwen2VL
from ..train.sft_data import LETTER, SHORT, direct_prompt, options_block
from ..world.questions import KINDS, ask, letters
from ..world.scene import render, sample_scene
from ..world.source import WorldConfig, stream_rng

STREAM = "probe"
FORMATS = ("direct", "letter", "yesno")


def probe_items(n: int, seed: int, world: WorldConfig) -> list[dict]:
    """Questions in every format about n fresh scenes: {image, prompt, answer, kind, format}."""
    items = []
    for i in range(n):
        rng = stream_rng(seed, STREAM, i)
        scene = sample_scene(rng, world.max_objects, world.glyph_prob)
        image = render(scene, world.image_size)
        for kind in KINDS:
            q = ask(scene, kind, rng)
            if q is None:
                continue
            if kind == "exists":
                items.append(dict(image=image, kind=kind, format="yesno", answer=q.answer.capitalize(),
                                  prompt=f"{q.question}\n{SHORT}"))
                continue
            prompt, answer = direct_prompt(q, numeric_hint=True)
            items.append(dict(image=image, kind=kind, format="direct", answer=answer, prompt=prompt))
            options, k = q.options(rng)
            items.append(dict(image=image, kind=kind, format="letter", answer=letters(len(options))[k],
                              prompt=f"{q.question}\n{options_block(options, 'lines')}\n{LETTER}"))
    return items


@torch.no_grad()
def answers(model: OpenQwen2VL, tok, items: list[dict], images: list, batch_size: int = 64) -> list[str]:
    transform = model.image_transform()
    stops = [tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(ENDOFTEXT)]
    pad = tok.convert_tokens_to_ids(ENDOFTEXT)
    visual_tokens = model.config.visual_tokens_sft
    out = []
    for s in range(0, len(items), batch_size):
        chunk = items[s: s + batch_size]
        ids = [encode_prompt(tok, "<image>\n" + it["prompt"], visual_tokens, projector=model.config.projector)
               for it in chunk]
        width = max(map(len, ids))
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        pixels = torch.stack([transform(im) for im in images[s: s + batch_size]])
        new = model.generate(input_ids, pixels, max_new_tokens=6, stop_token_ids=stops,
                             attention_mask=mask, visual_tokens=visual_tokens)
        out += [tok.decode([t for t in x if t not in stops]).strip() for x in new]
    return out


def probe(model_dir: str, n: int, seed: int, world: WorldConfig, threads: int = 0) -> dict:
    if threads:
        torch.set_num_threads(threads)
    model = OpenQwen2VL.from_pretrained(model_dir).eval()
    tok = load_tokenizer(model_dir)
    items = probe_items(n, seed, world)
    true_images = [it["image"] for it in items]
    shuffled = [true_images[j] for j in np.random.default_rng(seed).permutation(len(items))]
    result = defaultdict(lambda: {"n": 0, "true": 0, "shuffled": 0})
    for condition, images in (("true", true_images), ("shuffled", shuffled)):
        for it, a in zip(items, answers(model, tok, items, images)):
            for key in (f"{it['format']}/{it['kind']}", f"{it['format']}/all"):
                result[key][condition] += int(a == it["answer"])
                result[key]["n"] += condition == "true"
    return {k: {"n": v["n"], "true": round(100 * v["true"] / v["n"], 1),
                "shuffled": round(100 * v["shuffled"] / v["n"], 1)} for k, v in sorted(result.items())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory (an SFT final/)")
    ap.add_argument("--n", type=int, default=400, help="fresh scenes")
    ap.add_argument("--seed", type=int, default=0)
    WorldConfig.add_args(ap)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", help="also write the table here")
    args = ap.parse_args(argv)
    table = probe(args.model, args.n, args.seed, WorldConfig.from_args(args), args.threads)
    print(f"{'format/kind':<22}{'n':>6}{'true %':>9}{'shuffled %':>12}")
    for k, v in table.items():
        print(f"{k:<22}{v['n']:>6}{v['true']:>9}{v['shuffled']:>12}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table, f, indent=1)


if __name__ == "__main__":
    main()
