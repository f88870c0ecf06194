"""oqvl: the Open-Qwen2VL reproduction harness (data, filtering, packing, training, evaluation)."""

__version__ = "0.1.0"
