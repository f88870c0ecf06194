"""Stage 4, pack: multimodal sequence packing (first-fit-decreasing into context_len)."""
