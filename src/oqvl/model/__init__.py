"""The Open-Qwen2VL model: vision encoder, projector, Qwen2 LM, tokenizer."""
