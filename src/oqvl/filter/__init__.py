"""Stage 2, filter: CLIP-score filter and MLM-Filter; per-sample scores and kept uids."""
