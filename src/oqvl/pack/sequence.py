"""The packed-sequence layout: token ids, and the masks, positions and labels read from it.

The trainer turns one packed sequence of the index back into token ids (`sequence_tokens`):
documents are laid out at their offsets as `BOS <image>*visual_tokens text_ids` (text_ids end
with EOS; `image_ids` lays out the image as oqvl.model.chat.image_text does: with Qwen2-VL's
projector, framed by <|vision_start|> ... <|vision_end|>), and the tail is filled with the
tokenizer's own pad token (Qwen2: `<|endoftext|>`, a token the model knows; the reference added a
new pad token the training tokenizer did not know).
doc_ids mark each token's document (-1 = padding), which is what document isolation and label
masking need:

- `document_attention_mask`, `document_position_ids`: block-diagonal causal attention and
  positions restarting at 0 per document (the model's document isolation);
- `doc_ids_from_lengths`: doc_ids from the `lengths` column of sequences.parquet;
- `pretrain_labels`: the caption loss (image tokens and their frame, BOS and padding masked).

SFT labels (assistant turns only) come from oqvl.model.chat.encode_conversation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..model.chat import IGNORE_INDEX


def image_ids(visual_tokens: int, image_token_id: int, vision_ids: tuple[int, int] | None = None) -> np.ndarray:
    """The ids one image occupies: `visual_tokens` image tokens, framed by vision_ids =
    (<|vision_start|>, <|vision_end|>) when given (oqvl.model.chat.vision_ids)."""
    slots = [image_token_id] * visual_tokens
    return np.asarray(slots if vision_ids is None else [vision_ids[0], *slots, vision_ids[1]], dtype=np.int64)


def sequence_tokens(docs: list[int], documents_text_ids: list, context_len: int, visual_tokens: int,
                    bos_id: int, image_token_id: int, pad_id: int,
                    vision_ids: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, doc_ids), each int64 of length context_len, for the documents `docs` in order."""
    input_ids = np.full(context_len, pad_id, dtype=np.int64)
    doc_ids = np.full(context_len, -1, dtype=np.int64)
    image = image_ids(visual_tokens, image_token_id, vision_ids)
    pos = 0
    for d, row in enumerate(docs):
        text = np.asarray(documents_text_ids[row], dtype=np.int64)
        n = 1 + len(image) + len(text)
        if pos + n > context_len:
            raise ValueError(f"documents {docs} need more than context_len {context_len} tokens")
        input_ids[pos] = bos_id
        input_ids[pos + 1:pos + 1 + len(image)] = image
        input_ids[pos + 1 + len(image):pos + n] = text
        doc_ids[pos:pos + n] = d
        pos += n
    return input_ids, doc_ids


def document_position_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token within its document (restarts at 0 wherever doc_ids changes)."""
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    start = torch.ones_like(doc_ids, dtype=torch.bool)
    start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=-1).values
    return idx - first


def document_attention_mask(doc_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive (B,1,T,T) mask: 0 where key k <= query q and both are in the same document, else the
    dtype's minimum. Every row keeps its diagonal, so no row is fully masked (no NaN)."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    allowed = (doc_ids[:, :, None] == doc_ids[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=doc_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)


def doc_ids_from_lengths(lengths: Sequence[Sequence[int]], context_len: int) -> torch.Tensor:
    """(B, context_len) document index per token from per-sequence document lengths (the
    `lengths` column of sequences.parquet); padding after the last document gets -1."""
    out = torch.full((len(lengths), context_len), -1, dtype=torch.long)
    for b, lens in enumerate(lengths):
        if sum(lens) > context_len:
            raise ValueError(f"sequence {b}: documents of {sum(lens)} tokens exceed {context_len}")
        out[b, :sum(lens)] = torch.repeat_interleave(torch.arange(len(lens)), torch.as_tensor(lens))
    return out


def pretrain_labels(input_ids: torch.Tensor, image_token_id: int, pad_id: int,
                    doc_ids: torch.Tensor | None = None, eos_id: int | None = None,
                    vision_ids: tuple[int, int] | None = None) -> torch.Tensor:
    """Labels for packed caption documents `BOS <image tokens> "\\n" caption EOS`, right-padded.

    Masked (-100): image tokens (and their vision_ids frame, as `image_ids` lays it out: part of
    the image, not the caption), padding and each document's BOS; kept: "\\n", caption and EOS.
    In Qwen2 BOS = EOS = pad = <|endoftext|>, so the ids alone cannot tell them apart:
    - with doc_ids (padding -1): BOS is a document's first token, padding is doc_ids < 0;
    - without: BOS is an `eos_id` (BOS = EOS; default `pad_id`) token followed by an image
      token; padding is the run of `pad_id` at the end of the sequence except its first token
      (the last document's EOS). If `eos_id` differs from `pad_id`, every `pad_id` is padding.
    """
    labels = input_ids.clone()
    ignore = input_ids == image_token_id
    for marker in vision_ids or ():
        ignore |= input_ids == marker
    if doc_ids is not None:
        pad = doc_ids < 0
        first = torch.ones_like(pad)
        first[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        ignore |= pad | (first & ~pad)
    else:
        eos_id = pad_id if eos_id is None else eos_id
        is_pad = input_ids == pad_id
        bos = torch.zeros_like(is_pad)
        image_start = image_token_id if vision_ids is None else vision_ids[0]
        bos[:, :-1] = (input_ids[:, :-1] == eos_id) & (input_ids[:, 1:] == image_start)
        # trailing[t]: every token from t to the end is pad_id
        trailing = is_pad.flip(-1).cumprod(-1).flip(-1).bool()
        if eos_id == pad_id:
            before = torch.zeros_like(trailing)
            before[:, 1:] = trailing[:, :-1]
            padding = trailing & before  # the run minus its first token
        else:
            padding = is_pad
        ignore |= bos | padding
    labels[ignore] = IGNORE_INDEX
    return labels
