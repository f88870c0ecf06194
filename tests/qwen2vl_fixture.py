"""A tiny random-weight Qwen2-VL checkpoint saved through transformers' own classes, in the layout
of a downloaded release (Qwen/Qwen2-VL-2B-Instruct), for tests that need one.

    ckpt = write_tiny_qwen2vl(tmp_path / "qwen2vl")   # config.json, model.safetensors,
                                                      # generation_config.json, the tokenizer, the
                                                      # processor (image processor, chat template)

Qwen2VLForConditionalGeneration from a Qwen2VLConfig with a 2-block vision tower (width 32, 14-px
patches, 2x2 merge) and a 2-layer text model (width 64, M-RoPE sections 2+3+3 of a 16-wide head),
tied embeddings as the 2B release; the toy Qwen2-format tokenizer (512 BPE ranks, then Qwen's
special tokens: <|vision_start|>, <|image_pad|>, ... at their toy ids), no BOS, <|im_end|> as EOS,
<|endoftext|> as pad, left padding, as the release's tokenizer_config; Qwen2VLImageProcessor with
small pixel limits (a 64-px toy image becomes 56x56: 4x4 patches, 4 visual tokens); the release's
chat template; and a generation_config.json that samples as the release's does (top_k 1), which
the evaluation must override to greedy.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
)
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

from oqvl.model.tokenizer import ENDOFTEXT, IM_END, build_qwen2_tokenizer

TOY_BPE = 512
VOCAB_ROWS = 544  # more rows than the 534 tokens, as the release's 151936 for 151657
MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112

# Qwen2-VL-Instruct's chat template (the release's chat_template.json).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_tiny_qwen2vl(out: Path, seed: int = 0) -> Path:
    out = Path(out)
    tok = build_qwen2_tokenizer(out, vocab_size=TOY_BPE)
    tok.chat_template = CHAT_TEMPLATE
    ids = {t: tok.convert_tokens_to_ids(t) for t in
           (ENDOFTEXT, IM_END, "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS),
        tokenizer=tok, video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(out)
    tok_config = out / "tokenizer_config.json"  # as the release's (transformers writes no padding side)
    tok_config.write_text(json.dumps({**json.loads(tok_config.read_text()), "padding_side": "left"}, indent=2))
    config = Qwen2VLConfig(
        text_config={"vocab_size": VOCAB_ROWS, "hidden_size": 64, "intermediate_size": 128,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
                     "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
                     # wider than the default 0.02, so the random model says varied, image-dependent things
                     "initializer_range": 0.2,
                     "bos_token_id": ids[ENDOFTEXT], "eos_token_id": ids[IM_END]},
        vision_config={"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                       "initializer_range": 0.2},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True, initializer_range=0.2)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=ids[ENDOFTEXT], eos_token_id=[ids[IM_END], ids[ENDOFTEXT]], pad_token_id=ids[ENDOFTEXT],
        do_sample=True, top_k=1, top_p=0.001, temperature=0.1)
    model.save_pretrained(out)
    return out
