"""Pack a mixture's samples into training sequences of context_len tokens (first-fit-decreasing).

    python -m oqvl.pack --shards results/mixtures/ccs+laion/shards --tokenizer results/model/tokenizer \
        --visual-tokens 16 --context-len 512 --scope mixture --too-long drop --out results/packed/ccs+laion

A sample (document) is `BOS <image tokens> "\\n" caption EOS`; its length is text tokens + visual
tokens + 2 (+ 2 more with --projector merger2x2: Qwen2-VL's <|vision_start|> and <|vision_end|>
around the image tokens, oqvl.model.chat.image_text). Which tokens BOS and EOS are is --document-tokens (oqvl.model.tokenizer.DOCUMENT_TOKENS):
`project`, both `<|endoftext|>` (Qwen2 has no BOS; it is its document separator), or `reference`,
"<s>" and the tokenizer's eos_token as the reference packs them. Bins are filled first-fit-decreasing; padding (the tokenizer's own pad token) is added
by the training loader, which knows context_len.

Writes OUT/documents.parquet (uid, shard, key, length, text_ids: the tokens after the image
tokens, EOS included), OUT/sequences.parquet (seq, uids, lengths, offsets, shard group: what
the trainer needs to isolate documents or not), OUT/stats.json and OUT/manifest.json. No images
are copied: documents reference their shard and key.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from ..io import sha256_file, write_json, write_parquet
from ..manifest import args_config, manifest_path, write_manifest
from ..model.chat import image_text
from ..model.config import PROJECTORS
from ..model.tokenizer import DOCUMENT_TOKENS, document_eos_id, training_tokenizer
from ..shards import iter_samples, sample_caption, sample_uid, shard_paths
from .ffd import fill_ratio, first_fit_decreasing


def tokenize_documents(shards: Path, tokenizer, visual_tokens: int, batch: int = 1024,
                       document_tokens: str = "project", projector: str = "avgpool") -> pd.DataFrame:
    """One row per sample: uid, shard, key, text_ids ("\\n" caption EOS) and total length."""
    eos = document_eos_id(tokenizer, document_tokens)
    image = len(tokenizer(image_text(visual_tokens, projector), add_special_tokens=False)["input_ids"])
    rows, texts = [], []

    def flush():
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        for row, t in zip(rows[len(rows) - len(texts):], ids):
            row["text_ids"] = np.asarray(t + [eos], dtype=np.int32)
            row["length"] = 1 + image + len(row["text_ids"])  # BOS + image + text + EOS
        texts.clear()

    for path in shard_paths(shards):
        for sample in tqdm(iter_samples([path]), desc=f"tokenize {path.name}", unit="doc", mininterval=2):
            rows.append({"uid": sample_uid(sample),
                         "shard": path.name, "key": sample["__key__"]})
            texts.append("\n" + sample_caption(sample))
            if len(texts) == batch:
                flush()
    if texts:
        flush()
    return pd.DataFrame(rows, columns=["uid", "shard", "key", "text_ids", "length"])


def fit_lengths(docs: pd.DataFrame, context_len: int, too_long: str) -> tuple[pd.DataFrame, int]:
    """Handle documents longer than a sequence: drop them, or cut their caption; count either way."""
    over = docs["length"] > context_len
    n_over = int(over.sum())
    if not n_over:
        return docs, 0
    if too_long == "drop":
        return docs[~over].reset_index(drop=True), n_over
    docs = docs.copy()
    # Build the column as a list: `docs.at[i, "text_ids"] = array` would store a length-1 array
    # (a caption cut down to EOS alone) as a 0-d scalar array.
    text_ids = docs["text_ids"].tolist()
    for i in np.flatnonzero(over.to_numpy()):
        cut = int(docs.at[i, "length"]) - context_len
        ids = text_ids[i]
        if cut >= len(ids):  # not even the image fits: nothing sensible to keep
            raise ValueError(f"context_len {context_len} cannot hold one image plus BOS/EOS")
        text_ids[i] = np.concatenate([ids[: len(ids) - 1 - cut], ids[-1:]])
        docs.at[i, "length"] = context_len
    docs["text_ids"] = pd.Series(text_ids, index=docs.index, dtype=object)
    return docs, n_over


def pack(docs: pd.DataFrame, context_len: int, scope: str) -> pd.DataFrame:
    """Sequences: per sequence, the documents' row indices, lengths and start offsets."""
    groups = [("all", docs.index.to_numpy())] if scope == "mixture" else [
        (shard, idx.to_numpy()) for shard, idx in docs.groupby("shard", sort=True).groups.items()]
    lengths = docs["length"].to_numpy()
    seqs = []
    for group, idx in groups:
        for b in first_fit_decreasing(lengths[idx], context_len):
            members = idx[np.asarray(b)]
            lens = lengths[members]
            seqs.append({"group": group, "docs": members.astype(np.int64),
                         "lengths": lens.astype(np.int32),
                         "offsets": np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int32)})
    out = pd.DataFrame(seqs, columns=["group", "docs", "lengths", "offsets"])
    out.insert(0, "seq", np.arange(len(out)))
    return out


def fills(docs: pd.DataFrame, context_len: int) -> dict:
    """Fill ratio of both packing scopes (packing is cheap; report the one not chosen too)."""
    lengths = docs["length"].to_numpy()
    result = {}
    for scope in ("per_shard", "mixture"):
        seqs = pack(docs, context_len, scope)
        result[scope] = {"sequences": len(seqs),
                         "fill_ratio": round(fill_ratio(lengths, list(seqs["docs"]), context_len), 4)}
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=Path, required=True)
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--visual-tokens", type=int, required=True)
    ap.add_argument("--context-len", type=int, required=True)
    ap.add_argument("--scope", choices=["per_shard", "mixture"], default="per_shard")
    ap.add_argument("--too-long", choices=["drop", "truncate"], default="drop")
    ap.add_argument("--document-tokens", choices=DOCUMENT_TOKENS, default="project",
                    help="BOS/EOS convention of the documents")
    ap.add_argument("--projector", choices=PROJECTORS, default="avgpool",
                    help="the model's projector, whose design sets an image's layout (oqvl.model.config)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        tokenizer = training_tokenizer(args.tokenizer, args.document_tokens)
        docs = tokenize_documents(args.shards, tokenizer, args.visual_tokens,
                                  document_tokens=args.document_tokens, projector=args.projector)
    except (FileNotFoundError, OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    n_in = len(docs)
    docs, n_over = fit_lengths(docs, args.context_len, args.too_long)
    seqs = pack(docs, args.context_len, args.scope)
    uids = docs["uid"].to_numpy()
    seqs.insert(2, "uids", [uids[d].tolist() for d in seqs["docs"]])
    lengths = docs["length"].to_numpy()
    real = int(lengths.sum())
    stats = {
        "documents_in": n_in,
        "documents_packed": len(docs),
        "too_long": {"count": n_over, "handling": args.too_long},
        "sequences": len(seqs),
        "context_len": args.context_len,
        "visual_tokens": args.visual_tokens,
        "document_tokens": args.document_tokens,
        "projector": args.projector,
        "scope": args.scope,
        "real_tokens": real,
        "padding_tokens": len(seqs) * args.context_len - real,
        "fill_ratio": round(real / max(len(seqs) * args.context_len, 1), 4),
        "text_tokens": int(sum(len(t) for t in docs["text_ids"])),
        "fill_by_scope": fills(docs, args.context_len),
    }
    assert sum(len(d) for d in seqs["docs"]) == len(docs)
    files = [args.out / "documents.parquet", args.out / "sequences.parquet", args.out / "stats.json"]
    write_parquet(docs, files[0])
    write_parquet(seqs, files[1])
    write_json(files[2], stats)
    tokenizer_json = args.tokenizer / "tokenizer.json"
    write_manifest(manifest_path(args.out), "pack", work=(stats["documents_packed"], "documents"),
                   config=args_config(args), files=files,
                   counts={k: stats[k] for k in ("documents_in", "documents_packed", "sequences")},
                   inputs={str(tokenizer_json): sha256_file(tokenizer_json)})
    print(f"{args.out}: {stats}")


if __name__ == "__main__":
    main()
