"""How long the toy LM takes to learn the letter step of multiple choice, text only.

    .venv/bin/python benchmarks/letter_step.py --tokenizer results/model/tokenizer \
        [--steps 2400] [--init-std 0.06] [--mix 1,1,2]

Trains the toy preset's LM (`model_configs/toy.json`, a fresh Qwen2ForCausalLM) on text-only
items over four options whose values are single-token words of the tokenizer (a pool of 400):

- restate (the forward copy): "A. apple\\nB. river\\n...\\nAgain:\\nA. apple\\nB." -> " river";
  the option named by its letter, an induction-head step;
- near lookup: the options, then "Which option is river?" -> "B"; the word just before the answer;
- far lookup: "Which option is river?", the options, the benchmarks' instruction -> "B"; the
  layout of the toy benchmarks and of the SFT lookups (question first).

The loss covers the answer tokens only. Every `--every` steps it prints the accuracy on 200
held-out items of each kind (greedy, first token), and on 200 of the SFT data's chat-format lookups
over toy-world values (`oqvl.train.sft_data.lookup_turn`), a transfer measure: those are never
trained here. Chance is 25% for the lookups; restate has 400 candidates.
"""

from __future__ import annotations

import argparse
import re
import time

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

from oqvl.model.chat import encode_prompt
from oqvl.model.config import load_preset
from oqvl.model.tokenizer import load_tokenizer
from oqvl.train.sft_data import LETTER, lookup_turn

LETTERS = "ABCD"
KINDS = ("restate", "near", "far")


def word_pool(tok, n: int, rng: np.random.Generator) -> list[str]:
    """n lowercase words that are one token with their leading space (so every option is one token)."""
    words = sorted({t[1:] for t in tok.get_vocab() if t.startswith("Ġ") and re.fullmatch(r"[a-z]{3,}", t[1:])})
    words = [w for w in words if len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1]
    if len(words) < n:
        raise SystemExit(f"error: the tokenizer has {len(words)} one-token words, fewer than --pool {n}")
    rng.shuffle(words)
    return words[:n]


def item(kind: str, pool: list[str], rng: np.random.Generator) -> tuple[str, str]:
    """(prompt, answer) of one item; the answer is what follows the prompt."""
    options = [pool[j] for j in rng.choice(len(pool), len(LETTERS), replace=False)]
    k = int(rng.integers(len(options)))
    block = "\n".join(f"{l}. {o}" for l, o in zip(LETTERS, options))
    if kind == "restate":
        before = "".join(f"{l}. {o}\n" for l, o in zip(LETTERS[:k], options[:k]))
        return f"{block}\nAgain:\n{before}{LETTERS[k]}.", f" {options[k]}"
    if kind == "near":
        return f"{block}\nWhich option is {options[k]}?\n", LETTERS[k]
    if kind == "far":
        return f"Which option is {options[k]}?\n{block}\n{LETTER}\n", LETTERS[k]
    raise ValueError(f"unknown item kind {kind!r}")


class Items:
    def __init__(self, tok, pool, weights, seed):
        self.tok, self.pool, self.rng = tok, pool, np.random.default_rng(seed)
        self.p = np.asarray(weights, float) / sum(weights)
        self.bos = tok.convert_tokens_to_ids("<|endoftext|>")
        self.end = tok.convert_tokens_to_ids("<|im_end|>")

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def batch(self, n: int, per_sequence: int):
        """Token ids, labels (answers and their end token only) and the attention mask."""
        seqs = []
        for _ in range(n):
            x, y = [self.bos], [-100]
            for _ in range(per_sequence):
                prompt, answer = item(KINDS[self.rng.choice(len(KINDS), p=self.p)], self.pool, self.rng)
                p, a = self.ids(prompt), self.ids(answer) + [self.end]
                x += p + a
                y += [-100] * len(p) + a
            seqs.append((x, y))
        width = max(len(x) for x, _ in seqs)
        ids = torch.zeros((n, width), dtype=torch.long)
        labels = torch.full((n, width), -100)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, (x, y) in enumerate(seqs):
            ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
        return ids, labels, mask


def accuracy(lm, evals) -> float:
    lm.eval()
    with torch.inference_mode():
        right = sum(int(lm(torch.tensor([ids])).logits[0, -1].argmax()) == gold for ids, gold in evals)
    lm.train()
    return right / len(evals)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="the toy tokenizer directory (results/model/tokenizer)")
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--batch", type=int, default=32, help="sequences per step")
    ap.add_argument("--per-sequence", type=int, default=2, help="items per sequence")
    ap.add_argument("--mix", default="1,1,2", help="weights of restate, near, far")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--init-std", type=float, default=0.06,
                    help="initializer_range of the fresh LM (Qwen2's default is 0.02)")
    ap.add_argument("--heads", type=int, help="attention heads (default: the preset's)")
    ap.add_argument("--kv-heads", type=int, help="key/value heads (default: the preset's)")
    ap.add_argument("--pool", type=int, default=400, help="distinct option words")
    ap.add_argument("--every", type=int, default=300, help="steps between evaluations")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    weights = [float(w) for w in args.mix.split(",")]
    if len(weights) != len(KINDS) or min(weights) < 0 or sum(weights) <= 0:
        raise SystemExit(f"error: --mix {args.mix!r}: need {len(KINDS)} non-negative weights ({', '.join(KINDS)})")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    tok = load_tokenizer(args.tokenizer)
    cfg = dict(load_preset("toy")["lm"]["config"], initializer_range=args.init_std)
    cfg.update({k: v for k, v in (("num_attention_heads", args.heads), ("num_key_value_heads", args.kv_heads)) if v})
    lm = Qwen2ForCausalLM(Qwen2Config(**cfg))
    pool = word_pool(tok, args.pool, np.random.default_rng(args.seed))
    train = Items(tok, pool, weights, args.seed + 1)

    held_out = np.random.default_rng(args.seed + 2)
    evals = {}
    for kind in KINDS:
        rows = [item(kind, pool, held_out) for _ in range(200)]
        evals[kind] = [([train.bos] + train.ids(p), train.ids(a)[0]) for p, a in rows]
    chat = [lookup_turn(held_out) for _ in range(200)]
    evals["sft lookups"] = [(encode_prompt(tok, u, 0), train.ids(a)[0]) for u, a in chat]

    opt = torch.optim.AdamW(lm.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    print(f"toy LM, {cfg['num_attention_heads']}/{cfg['num_key_value_heads']} heads, init std {args.init_std}, "
          f"lr {args.lr}, {args.batch} x {args.per_sequence} items per step, "
          f"mix restate:near:far = {args.mix}; held-out accuracy (%)")
    print(f"{'step':>6} {'loss':>6} " + " ".join(f"{k:>11}" for k in evals) + f" {'seconds':>8}")
    t0, loss = time.time(), float("nan")
    for step in range(args.steps + 1):
        if step % args.every == 0 or step == args.steps:
            accs = " ".join(f"{100 * accuracy(lm, e):11.1f}" for e in evals.values())
            print(f"{step:6d} {loss:6.3f} {accs} {time.time() - t0:8.0f}", flush=True)
        if step == args.steps:
            break
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 50)
        ids, labels, mask = train.batch(args.batch, args.per_sequence)
        hidden = lm.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
        target = labels[:, 1:]
        keep = target != -100  # logits at the answer positions only: most of the step's time otherwise
        loss_t = F.cross_entropy(lm.lm_head(hidden[keep]), target[keep])
        opt.zero_grad()
        loss_t.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        loss = loss_t.item()


if __name__ == "__main__":
    main()
