"""What every job asks a SLURM cluster for: resources by label, and the site's own settings.

Each rule has a label (config `cluster.rules`, else `cluster.default`); a label says how many CPUs,
how much memory and how long (config `cluster.labels`: toy-sized in the schema's defaults,
paper-sized in config/full.yaml). The GPUs of a job are its rule's own (`gpu`, from oqvl.scale),
and the nodes of a training job are `train.nodes`. Partition, account and QoS are the site's, read
from a file that is never committed: $OQVL_SLURM_SITE, else profiles/slurm/site.yaml
(profiles/slurm/site.example.yaml documents it). The result is a dict of Snakemake resources in
the names the SLURM executor plugin reads (runtime, mem_mb, cpus_per_task, slurm_partition, ...);
a local run ignores all but `gpu`. docs/cluster.md explains the sizes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from .config import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
SITE_ENV = "OQVL_SLURM_SITE"
DEFAULT_SITE = REPO_ROOT / "profiles" / "slurm" / "site.yaml"
MULTINODE = "gpu-multinode"  # the label of a training job across nodes (train.nodes > 1)
SITE_KEYS = {"account", "qos", "partition", "partitions", "constraint", "slurm_extra"}


def site_path() -> Path | None:
    """The site file in force: $OQVL_SLURM_SITE (which must exist), else the profile's, if any."""
    if env := os.environ.get(SITE_ENV):
        path = Path(env)
        if not path.is_file():
            raise ConfigError(f"{SITE_ENV}={env}: no such file")
        return path
    return DEFAULT_SITE if DEFAULT_SITE.is_file() else None


def load_site(path: Path | None) -> dict:
    """The site's settings ({} without a file); unknown keys and wrong types are one-line errors."""
    if path is None:
        return {}
    site = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(site, dict):
        raise ConfigError(f"{path}: expected a mapping of site settings")
    if unknown := sorted(set(site) - SITE_KEYS):
        raise ConfigError(f"{path}: unknown key {', '.join(unknown)} (known: {', '.join(sorted(SITE_KEYS))})")
    for key in SITE_KEYS - {"partitions"}:
        if key in site and not isinstance(site[key], (str, int)):
            raise ConfigError(f"{path}: {key} must be a string")
    if not isinstance(site.get("partitions", {}), dict):
        raise ConfigError(f"{path}: partitions must map labels to partitions")
    return site


def label_of(config: dict, rule: str) -> str:
    cluster = config["cluster"]
    return cluster["rules"].get(rule, cluster["default"])


def rule_names(rules_dir: Path) -> set[str]:
    """Every rule the workflow defines at some scale (a rule of the other scale is not defined now)."""
    return {m for f in Path(rules_dir).glob("*.smk")
            for m in re.findall(r"^\s*rule (\w+):", f.read_text(), re.M)}


def check(config: dict, rules: set[str]) -> None:
    """Every label named exists, and every rule named in cluster.rules is a rule of the workflow."""
    cluster = config["cluster"]
    named = {cluster["default"], MULTINODE, *cluster["rules"].values()}
    if missing := sorted(named - set(cluster["labels"])):
        raise ConfigError(f"cluster: label {', '.join(missing)} is used but not defined under cluster.labels")
    if unknown := sorted(set(cluster["rules"]) - rules):
        raise ConfigError(f"cluster.rules: no rule named {', '.join(unknown)}")


def job_resources(config: dict, rule: str, gpus: int = 0, nodes: int = 1, site: dict | None = None) -> dict:
    """The Snakemake resources of one rule's jobs: its label's size, its GPUs and nodes, the site's
    partition/account/QoS. On one node the GPUs are `gpu` (sbatch --gpus, and what a local
    `--resources gpu=N` limits); across nodes they are GRES per node, one task per node, and the
    job itself runs `srun` (the plugin's `mpi` mode), which oqvl.train.launch does."""
    label = MULTINODE if nodes > 1 else label_of(config, rule)
    spec = config["cluster"]["labels"][label]
    site = site or {}
    res = {"runtime": spec["runtime"], "mem_mb": spec["mem_mb"]}
    if spec.get("cpus"):  # else the plugin asks for the rule's threads
        res["cpus_per_task"] = spec["cpus"]
    if nodes > 1:
        res |= {"nodes": nodes, "tasks": nodes, "tasks_per_gpu": 0, "mpi": "srun",
                "slurm_extra": "--ntasks-per-node=1"}
        if gpus:
            res["gres"] = f"gpu:{gpus}"
    else:
        res["gpu"] = gpus
    partition = site.get("partitions", {}).get(label, site.get("partition"))
    for key, value in (("slurm_partition", partition), ("slurm_account", site.get("account")),
                       ("qos", site.get("qos")), ("constraint", site.get("constraint"))):
        if value is not None:
            res[key] = str(value)
    extra = [res.get("slurm_extra", "")]
    if spec.get("signal_s"):
        extra.append(f"--signal=TERM@{spec['signal_s']}")
    extra.append(str(site.get("slurm_extra", "")))
    if extra := " ".join(e for e in extra if e):
        res["slurm_extra"] = extra
    return res
