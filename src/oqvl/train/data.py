"""Training batches: packed caption sequences (pretraining) and chat conversations (SFT).

Both stages read their examples by index, and the order is a pure function of (seed, step):
step s takes the examples at positions [s*G, (s+1)*G) of the concatenated per-epoch
permutations, rank r the r-th 1/W of them. So a resumed run needs only the step to continue with
exactly the batches an uninterrupted run would have seen, and 1 or 2 processes see the same
global batch.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from ..model.chat import IGNORE_INDEX, encode_conversation, encode_raw_example
from ..model.flops import causal_pairs
from ..pack.sequence import pretrain_labels, sequence_tokens

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


# ------------------------------------------------------------------------------------- order

def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def step_indices(seed: int, step: int, global_batch: int, n: int) -> np.ndarray:
    """Example indices of global batch `step` (0-based), crossing epoch boundaries as needed."""
    start, out = step * global_batch, []
    while len(out) < global_batch:
        epoch, pos = divmod(start + len(out), n)
        order = epoch_order(seed, epoch, n)
        out.extend(order[pos: pos + global_batch - len(out)].tolist())
    return np.asarray(out, dtype=np.int64)


def rank_micro_batches(indices: np.ndarray, rank: int, world: int, micro_batch: int) -> list[np.ndarray]:
    """This rank's share of a global batch, cut into micro batches."""
    per_rank = len(indices) // world
    mine = indices[rank * per_rank:(rank + 1) * per_rank]
    return [mine[i:i + micro_batch] for i in range(0, len(mine), micro_batch)]


# ------------------------------------------------------------------------------------- images

class ImageStore:
    """Random access to images in webdataset tars by (shard file, key), without unpacking.

    Uncompressed tars keep each member's bytes at a fixed offset, so one scan of the headers per
    shard gives an index; reads are then one positioned read (pread) each, on a file kept open per
    process: data-loader workers forked from one parent share no file offset.
    """

    def __init__(self, shard_dir: str | Path):
        self.dir = Path(shard_dir)
        self._index: dict[str, dict[str, tuple[int, int]]] = {}
        self._fds: dict[str, int] = {}
        self._pid = os.getpid()

    def _fd(self, shard: str) -> int:
        if self._pid != os.getpid():  # a forked worker: the parent's descriptors are not its own
            self._fds, self._pid = {}, os.getpid()
        if shard not in self._fds:
            self._fds[shard] = os.open(self.dir / shard, os.O_RDONLY)
        return self._fds[shard]

    def __getstate__(self):  # spawned workers open their own files
        return {**self.__dict__, "_fds": {}}

    def __del__(self):
        if getattr(self, "_pid", None) == os.getpid():
            for fd in self._fds.values():
                os.close(fd)

    def _shard_index(self, shard: str) -> dict[str, tuple[int, int]]:
        if shard not in self._index:
            idx = {}
            with tarfile.open(self.dir / shard) as tar:
                for m in tar:
                    key, _, ext = m.name.rpartition(".")
                    if ext.lower() in IMAGE_EXTS:
                        idx[key] = (m.offset_data, m.size)
            self._index[shard] = idx
        return self._index[shard]

    def read(self, shard: str, key: str) -> bytes:
        try:
            offset, size = self._shard_index(shard)[key]
        except KeyError:
            raise KeyError(f"{self.dir / shard}: no image for key {key!r}") from None
        data = os.pread(self._fd(shard), size, offset)
        if len(data) != size:
            raise OSError(f"{self.dir / shard}: {key!r} truncated ({len(data)} of {size} bytes)")
        return data


def decode_image(data: bytes, transform) -> torch.Tensor:
    return transform(Image.open(io.BytesIO(data)).convert("RGB"))


# ---------------------------------------------------------------------------------- batches

@dataclass
class Batch:
    input_ids: torch.Tensor   # (B, T)
    labels: torch.Tensor      # (B, T), -100 where no loss is due
    images: torch.Tensor | None  # (N, 3, H, W) in order of appearance
    doc_ids: torch.Tensor | None  # (B, T) document index per token (-1 padding), for isolation
    n_tokens: int             # real (non-padding) tokens
    n_truncated: int = 0      # SFT examples cut to max_len (too_long truncate)
    attn_pairs: int = 0       # causal (query, key) pairs attended, padding excluded (oqvl.model.flops)

    @property
    def n_loss_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    @property
    def n_images(self) -> int:
        return 0 if self.images is None else int(self.images.shape[0])

    def pin_memory(self) -> Batch:
        """Page-locked copies (the DataLoader calls this with pin_memory=True)."""
        pin = {k: v.pin_memory() for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        return dataclasses.replace(self, **pin)


def attention_pairs(doc_ids: torch.Tensor, isolated: bool) -> int:
    """Causal (query, key) pairs over the real tokens of packed sequences: per document when
    documents are isolated, else per sequence (its real tokens form one causal run)."""
    pairs = 0
    for row in doc_ids:
        real = row[row >= 0]
        lengths = torch.bincount(real).tolist() if isolated else [len(real)]
        pairs += sum(causal_pairs(n) for n in lengths)
    return pairs


class PackedCaptions:
    """Pretraining examples: the packed sequences of one mixture (oqvl.pack's index)."""

    def __init__(self, packed_dir, shards_dir, transform, *, bos_id: int, image_token_id: int,
                 pad_id: int, doc_isolation: bool, vision_ids: tuple[int, int] | None = None):
        """vision_ids: the ids framing each image (oqvl.model.chat.vision_ids), for the model's
        projector; the packing's own (`projector`) must be the same, which the caller checks."""
        packed = Path(packed_dir)
        stats = json.loads((packed / "stats.json").read_text())
        self.context_len, self.visual_tokens = stats["context_len"], stats["visual_tokens"]
        self.document_tokens = stats.get("document_tokens", "project")  # older packings had no choice
        self.projector = stats.get("projector", "avgpool")  # likewise
        self.vision_ids = vision_ids
        docs = pd.read_parquet(packed / "documents.parquet", columns=["shard", "key", "text_ids"])
        self.doc_shard, self.doc_key = docs["shard"].tolist(), docs["key"].tolist()
        self.text_ids = docs["text_ids"].tolist()
        self.seq_docs = pd.read_parquet(packed / "sequences.parquet", columns=["docs"])["docs"].tolist()
        self.images = ImageStore(shards_dir)
        self.transform = transform
        self.ids = {"bos_id": bos_id, "image_token_id": image_token_id, "pad_id": pad_id}
        self.doc_isolation = doc_isolation

    def __len__(self) -> int:
        return len(self.seq_docs)

    def batch(self, indices) -> Batch:
        ids, docs, images = [], [], []
        for i in indices:
            members = [int(d) for d in self.seq_docs[i]]
            x, d = sequence_tokens(members, self.text_ids, self.context_len, self.visual_tokens, **self.ids,
                                   vision_ids=self.vision_ids)
            ids.append(x)
            docs.append(d)
            images += [decode_image(self.images.read(self.doc_shard[m], self.doc_key[m]), self.transform)
                       for m in members]
        input_ids = torch.from_numpy(np.stack(ids))
        doc_ids = torch.from_numpy(np.stack(docs))
        labels = pretrain_labels(input_ids, self.ids["image_token_id"], self.ids["pad_id"], doc_ids=doc_ids,
                                 vision_ids=self.vision_ids)
        return Batch(input_ids, labels, torch.stack(images) if images else None,
                     doc_ids if self.doc_isolation else None, int((doc_ids >= 0).sum()),
                     attn_pairs=attention_pairs(doc_ids, self.doc_isolation))


class Conversations:
    """SFT examples: conversations with at most one image each (oqvl.train.sft_data's records)."""

    def __init__(self, records, tokenizer, transform, *, visual_tokens: int, max_len: int, pad_id: int,
                 bos_id: int, too_long: str = "raise", image_token_id: int | None = None,
                 projector: str = "avgpool"):
        self.records = records
        self.projector = projector  # the model's: it sets an image's layout (oqvl.model.chat.image_text)
        self.too_long, self.image_token_id = too_long, image_token_id
        self.bos_id = bos_id  # raw-format records start with it, as the paper protocol's prompts
        self.tokenizer = tokenizer
        self.transform = transform
        self.visual_tokens = visual_tokens
        self.max_len = max_len
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.records)

    def batch(self, indices) -> Batch:
        seqs, images, n_truncated = [], [], 0
        for i in indices:
            rec = self.records[int(i)].load()
            if rec.prompt_format == "raw":
                if [m["role"] for m in rec.messages] != ["user", "assistant"]:
                    raise ValueError(f"SFT example {rec.id}: a raw-format record holds one user turn and its answer")
                user, assistant = rec.messages
                ids, labels = encode_raw_example(self.tokenizer, user["content"], assistant["content"],
                                                 self.visual_tokens, self.bos_id, self.projector)
            else:
                ids, labels = encode_conversation(self.tokenizer, rec.messages, self.visual_tokens,
                                                  self.projector)
            if self.too_long == "truncate":
                cut = truncate_as_reference(ids, labels, self.max_len, self.image_token_id, rec.id)
                n_truncated += len(cut[0]) < len(ids)
                ids, labels = cut
            elif len(ids) > self.max_len:
                raise ValueError(f"SFT example {rec.id}: {len(ids)} tokens > max_len {self.max_len}")
            seqs.append((ids, labels))
            if rec.image is not None:
                images.append(decode_image(rec.image(), self.transform))
        T = max(len(s[0]) for s in seqs)
        input_ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        labels = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)
        for b, (x, y) in enumerate(seqs):  # right padding: causal attention never looks ahead
            input_ids[b, :len(x)] = torch.from_numpy(x)
            labels[b, :len(y)] = torch.from_numpy(y)
        return Batch(input_ids, labels, torch.stack(images) if images else None, None,
                     sum(len(s[0]) for s in seqs), n_truncated,
                     attn_pairs=sum(causal_pairs(len(s[0])) for s in seqs))


def truncate_as_reference(ids: np.ndarray, labels: np.ndarray, max_len: int, image_token_id: int | None,
                          where) -> tuple[np.ndarray, np.ndarray]:
    """`ids[:max_len]` as the reference cuts an SFT example (prismatic-vlms datasets.py:302), where
    the image is one placeholder id expanded to the visual tokens only in the forward pass: so the
    cut counts the image run as one token. A cut that would split the image run is refused."""
    image = np.flatnonzero(ids == image_token_id) if image_token_id is not None else np.array([], int)
    keep = max_len + (len(image) - 1 if len(image) else 0)
    if len(ids) <= keep:
        return ids, labels
    if len(image) and image[0] < keep <= image[-1]:
        raise ValueError(f"SFT example {where}: max_len {max_len} would cut into its image tokens")
    return ids[:keep], labels[:keep]
