# Names and helpers shared by the rules. The scale (which rules exist, where every input comes
# from) is oqvl.scale's, resolved once; every path is oqvl.layout's.
import json
import os
import re

from oqvl import layout as L
from oqvl.scale import resolve

SCALE = resolve(config)
BENCHMARKS = config["evaluate"]["benchmarks"]


def preset_file(name):
    """A model preset's JSON: an input of the rules that build a model from it, so editing it (an
    LM init scale, a width) reruns them."""
    return os.path.join(workflow.basedir, "src", "oqvl", "model", "model_configs", f"{name}.json")


def as_json(obj):
    """A config fragment as one compact JSON string for a command line (quote with :q)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def alternatives(names):
    """A wildcard pattern matching exactly these names (never matches when empty)."""
    return "|".join(re.escape(n) for n in names) if names else "(?!x)x"


def world_args():
    """The toy world's generator settings, as the toy stages' command-line flags."""
    w = config["world"]
    return f"--image-size {w['image_size']} --max-objects {w['max_objects']} --glyph-prob {w['glyph_prob']}"


def train_launch():
    """torchrun on one node, one process per GPU (or CPU rank), running `python -m oqvl.train`."""
    return f"{PY} -m torch.distributed.run --standalone --nproc-per-node {config['train']['nproc']} -m oqvl.train"


def train_threads():
    return max(1, config["train"]["nproc"] * max(1, config["train"]["threads"]))
