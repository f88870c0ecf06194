"""Conversations as token ids: the Qwen2 chat template, image placeholders and assistant-only labels.

One function per use, shared by SFT, the MLM-Filter and evaluation, so a prompt is encoded the same
way everywhere:

    encode_conversation(tok, [{"role": "user", "content": "<image>\\nWhat colour is the circle?"},
                              {"role": "assistant", "content": "red"}], visual_tokens=64)
        -> (input_ids, labels)   labels: -100 except the assistant turns' content and <|im_end|>
    encode_prompt(tok, "<image>\\nIs there a cross?", visual_tokens=64)
        -> input_ids ending with "<|im_start|>assistant\\n" (the generation prompt)
    encode_raw_prompt(tok, "<image>\\nQuestion: Is there a cross?...\\nAnswer:", 64, bos_id)
        -> [bos_id] + the text's ids, no chat template (the `paper` evaluation protocol)

The text is rendered exactly as the tokenizer's chat template renders it (a test checks this), with
the newline before `<|im_start|>assistant` that the reference code lacked. Each `<image>` in a
message becomes `visual_tokens` copies of `<|image_pad|>`, the slots the model writes visual tokens
into (`image_text`); with Qwen2-VL's projector (`projector="merger2x2"`) the slots are framed by
`<|vision_start|>` ... `<|vision_end|>`, as Qwen2-VL lays an image out.
"""

from __future__ import annotations

import numpy as np

from .config import frames_images
from .tokenizer import (
    DEFAULT_SYSTEM,
    IM_END,
    IM_START,
    IMAGE_TOKEN,
    VISION_END,
    VISION_START,
)

IMAGE_PLACEHOLDER = "<image>"
IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")


def render(messages: list[dict], add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """The chat-template text, and the character spans that carry a loss (assistant content and
    its <|im_end|>). A missing system turn gets Qwen's default system prompt, as the template does."""
    if not messages:
        raise ValueError("empty conversation")
    for m in messages:
        if m.get("role") not in ROLES:
            raise ValueError(f"unsupported role {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message content must be a string, got {type(m.get('content')).__name__}")
    if messages[0]["role"] != "system":
        messages = [{"role": "system", "content": DEFAULT_SYSTEM}, *messages]
    text, spans = "", []
    for m in messages:
        text += f"{IM_START}{m['role']}\n"
        start = len(text)
        text += m["content"] + IM_END
        if m["role"] == "assistant":
            spans.append((start, len(text)))
        text += "\n"
    if add_generation_prompt:
        text += f"{IM_START}assistant\n"
    return text, spans


def image_text(visual_tokens: int, projector: str = "avgpool") -> str:
    """The text one image occupies: its `visual_tokens` slots, framed by <|vision_start|> ...
    <|vision_end|> where the projector's design has them (Qwen2-VL's: the LM is told where an
    image begins and ends). The one layout of an image; the packer's ids follow it
    (oqvl.pack.sequence.image_ids)."""
    slots = IMAGE_TOKEN * visual_tokens
    return VISION_START + slots + VISION_END if frames_images(projector) else slots


def vision_ids(tokenizer, projector: str) -> tuple[int, int] | None:
    """The (<|vision_start|>, <|vision_end|>) ids that frame each image with this projector, or None."""
    if not frames_images(projector):
        return None
    start, end = tokenizer.convert_tokens_to_ids([VISION_START, VISION_END])
    return start, end


def expand_images(text: str, visual_tokens: int, projector: str = "avgpool") -> str:
    return text.replace(IMAGE_PLACEHOLDER, image_text(visual_tokens, projector))


def encode_conversation(tokenizer, messages: list[dict], visual_tokens: int,
                        projector: str = "avgpool") -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, labels) as int64 arrays; labels keep only the assistant turns' tokens."""
    text, spans = render(messages)
    # Expand placeholders span by span so the loss spans move with the text.
    pieces, new_spans, pos = [], [], 0
    for start, end in spans:
        pieces.append(expand_images(text[pos:start], visual_tokens, projector))
        offset = sum(map(len, pieces))
        body = expand_images(text[start:end], visual_tokens, projector)
        pieces.append(body)
        new_spans.append((offset, offset + len(body)))
        pos = end
    pieces.append(expand_images(text[pos:], visual_tokens, projector))
    full = "".join(pieces)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    labels = np.full_like(ids, IGNORE_INDEX)
    for i, (a, b) in enumerate(enc["offset_mapping"]):
        if any(s <= a and b <= e for s, e in new_spans) and b > a:
            labels[i] = ids[i]
    return ids, labels


def encode_prompt(tokenizer, prompt: str, visual_tokens: int, system: str | None = None,
                  projector: str = "avgpool") -> list[int]:
    """Token ids of a single user turn followed by the assistant generation prompt."""
    messages = ([{"role": "system", "content": system}] if system is not None else []) + \
        [{"role": "user", "content": prompt}]
    text, _ = render(messages, add_generation_prompt=True)
    return tokenizer(expand_images(text, visual_tokens, projector), add_special_tokens=False)["input_ids"]


def encode_raw_prompt(tokenizer, prompt: str, visual_tokens: int, bos_id: int,
                      projector: str = "avgpool") -> list[int]:
    """BOS, then the prompt as it is, each `<image>` as `visual_tokens` image slots. As the
    reference's evaluation encodes it (prismatic-vlms/prismatic/util/data_utils.py:387-411, then
    models/vlms/prismatic.py:641-642): the text between images is tokenized piece by piece, which
    the image slots, special tokens, also force here."""
    return [bos_id] + tokenizer(expand_images(prompt, visual_tokens, projector),
                                add_special_tokens=False)["input_ids"]


RAW_ANSWER_END = "\n"  # one of the reference's stop tokens (oqvl.evaluate.paper.REFERENCE_STOP_IDS)


def encode_raw_example(tokenizer, prompt: str, answer: str, visual_tokens: int, bos_id: int,
                       projector: str = "avgpool") -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, labels) of one question as the `paper` protocol asks it: `encode_raw_prompt`,
    then " " + answer + a newline; labels keep only the answer and the newline."""
    prompt_ids = encode_raw_prompt(tokenizer, prompt, visual_tokens, bos_id, projector)
    answer_ids = tokenizer(" " + answer + RAW_ANSWER_END, add_special_tokens=False)["input_ids"]
    ids = np.asarray(prompt_ids + answer_ids, dtype=np.int64)
    labels = np.full_like(ids, IGNORE_INDEX)
    labels[len(prompt_ids):] = ids[len(prompt_ids):]
    return ids, labels
