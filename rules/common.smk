# Names and helpers shared by the rules.
import json
import os
import re

from oqvl.config import config_hash

GENERATED = [s for s, c in config["sources"].items() if "n_pairs" in c]
IMPORTED = [s for s, c in config["sources"].items() if "pair_list" in c]


def preset_file(name):
    """A model preset's JSON: an input of the rules that build a model from it, so editing it (an
    LM init scale, a width) reruns them."""
    return os.path.join(workflow.basedir, "src", "oqvl", "model", "model_configs", f"{name}.json")


def as_json(obj):
    """A config fragment as one compact JSON string for a command line (quote with :q)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def alternatives(names):
    """A wildcard pattern matching exactly these names (never matches when empty)."""
    return "|".join(names) if names else "(?!x)x"
