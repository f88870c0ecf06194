"""Turn one packed sequence of the index back into token ids, padded to context_len.

The trainer calls this per sequence: documents are laid out at their offsets as
`BOS <image>*visual_tokens text_ids` (text_ids end with EOS), and the tail is filled with the
tokenizer's own pad token (Qwen2: `<|endoftext|>`, a token the model knows; the reference added
a new pad token the training tokenizer did not know). doc_ids mark each token's document
(-1 = padding), which is what document isolation and label masking need.
"""

from __future__ import annotations

import numpy as np


def sequence_tokens(docs: list[int], documents_text_ids: list, context_len: int, visual_tokens: int,
                    bos_id: int, image_token_id: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, doc_ids), each int64 of length context_len, for the documents `docs` in order."""
    input_ids = np.full(context_len, pad_id, dtype=np.int64)
    doc_ids = np.full(context_len, -1, dtype=np.int64)
    pos = 0
    for d, row in enumerate(docs):
        text = np.asarray(documents_text_ids[row], dtype=np.int64)
        n = 1 + visual_tokens + len(text)
        if pos + n > context_len:
            raise ValueError(f"documents {docs} need more than context_len {context_len} tokens")
        input_ids[pos] = bos_id
        input_ids[pos + 1:pos + 1 + visual_tokens] = image_token_id
        input_ids[pos + 1 + visual_tokens:pos + n] = text
        doc_ids[pos:pos + n] = d
        pos += n
    return input_ids, doc_ids
