# Names and helpers shared by the rules. The scale (which rules exist, where every input comes
# from) is oqvl.scale's, resolved once; every path is oqvl.layout's.
import json
import os
import re

from oqvl import cluster
from oqvl import layout as L
from oqvl.plan import Plan, as_json, compute_files, job_files, record_files
from oqvl.scale import resolve

SCALE = resolve(config)
P = Plan(config, SCALE)
BENCHMARKS = P.benchmarks
SITE = cluster.load_site(cluster.site_path())  # the SLURM site's partition, account, QoS
TRAINING = {"pretrain", "sft", "train_mlm_filter"}


def asks(rule, gpus=0):
    """What a rule's jobs ask the scheduler for (oqvl.cluster): its label's CPUs, memory and time,
    its GPUs, the nodes of a training job (train.nodes), the site's partition."""
    nodes = config["train"]["nodes"] if rule in TRAINING else 1
    return cluster.job_resources(config, rule, gpus=gpus, nodes=nodes, site=SITE)


def preset_file(name):
    """A model preset's JSON: an input of the rules that build a model from it, so editing it (an
    LM init scale, a width) reruns them."""
    return os.path.join(workflow.basedir, "src", "oqvl", "model", "model_configs", f"{name}.json")


def alternatives(names):
    """A wildcard pattern matching exactly these names (never matches when empty)."""
    return "|".join(re.escape(n) for n in names) if names else "(?!x)x"


def world_args():
    """The toy world's generator settings, as the toy stages' command-line flags."""
    w = config["world"]
    return f"--image-size {w['image_size']} --max-objects {w['max_objects']} --glyph-prob {w['glyph_prob']}"


def train_launch():
    """torchrun on train.nodes nodes (several: srun inside a SLURM allocation), train.nproc processes
    per node (one per GPU, or CPU ranks), running `python -m oqvl.train` (oqvl.train.launch); the
    trainer's arguments follow."""
    t = config["train"]
    return f"$PY -m oqvl.train.launch --nodes {t['nodes']} --nproc-per-node {t['nproc']} --"


def train_world():
    """Training processes in all: nodes x processes per node."""
    return config["train"]["nodes"] * config["train"]["nproc"]


def train_threads():
    return max(1, config["train"]["nproc"] * max(1, config["train"]["threads"]))


def folder_of(output_name):
    """The folder an output file lies in: a stage's --out, derived from its outputs (not a second path)."""
    return lambda wildcards, output: os.path.dirname(output[output_name])


def model_folder(input_name):
    """The model a job loads, from its input: a user's folder or weights file itself, or the folder
    of the file a toy rule builds (the input is then `<folder>/config.json` or the like)."""
    def folder(wildcards, input):
        path = input[input_name]
        return path if path in SCALE.user_inputs() else os.path.dirname(path)
    return folder


def benchmark_files(wildcards):
    """A split's benchmark files and their shuffled-image twins (the control), as evaluate reads them."""
    control = config["evaluate"]["shuffled_control"]
    return [L.eval_data(b, wildcards.split, shuffled=s) for b in BENCHMARKS
            for s in ((False, True) if control else (False,))]
