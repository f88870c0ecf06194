"""Pretraining and SFT: data, the FSDP2 training loop, checkpoints, SFT data."""
