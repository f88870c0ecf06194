"""Config loading and validation: JSON Schema (schemas/config.schema.yaml), one-line errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """A config value the schema rejects; str() is one line naming the key."""


def _with_defaults(cls):
    """A validator class that also fills in schema defaults (the jsonschema FAQ recipe)."""
    validate_props = cls.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if "default" in sub:
                    instance.setdefault(key, json.loads(json.dumps(sub["default"])))
        yield from validate_props(validator, properties, instance, schema)

    return jsonschema.validators.extend(cls, {"properties": set_defaults})


def _key_path(error: jsonschema.ValidationError) -> str:
    path = ".".join(str(p) for p in error.absolute_path)
    return path or "<top level>"


def _describe(error: jsonschema.ValidationError) -> str:
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        keys = ", ".join(
            (f"{_key_path(error)}.{k}" if error.absolute_path else k) for k in extra
        )
        return f"unknown key {keys}"
    return f"{_key_path(error)}: {error.message}"


def validate(config: dict, schema_path: Path = SCHEMA_PATH) -> dict:
    """Validate `config` in place (filling defaults) and return it; raise ConfigError."""
    schema = yaml.safe_load(schema_path.read_text())
    validator_cls = _with_defaults(jsonschema.validators.validator_for(schema))
    errors = sorted(validator_cls(schema).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError(_describe(jsonschema.exceptions.best_match(errors)))
    _check_downloads(config, schema)
    _check_semantics(config)
    return config


def _check_downloads(config: dict, schema: dict) -> None:
    """A source's download options: raw's keys and types (checked without raw's defaults, which
    would turn an override of one key into an override of all), and what img2dataset needs."""
    raw = dict(schema["properties"]["raw"], required=[])
    check = jsonschema.validators.validator_for(schema)(raw)
    for name, source in config["sources"].items():
        if "shards" in source:  # released shards: nothing to download
            continue
        key = f"sources.{name}.download"
        errors = sorted(check.iter_errors(source.get("download", {})), key=lambda e: list(e.absolute_path))
        if errors:
            e = jsonschema.exceptions.best_match(errors)
            raise ConfigError(f"{key}: {_describe(e)}" if e.validator != "additionalProperties" else
                              f"{key}: {_describe(e)} (the keys are raw's)")
        opts = {**config["raw"], **source.get("download", {})}
        blur = f"{key}.blur_faces" if "blur_faces" in source.get("download", {}) else "raw.blur_faces"
        if opts["blur_faces"] and not source.get("bbox_col"):
            raise ConfigError(f"{blur}: needs sources.{name}.bbox_col (the pair list's face boxes)")
        if opts["blur_faces"] and opts["skip_reencode"]:
            raise ConfigError(f"{blur}: needs skip_reencode false for sources.{name} (img2dataset writes "
                              f"an unresized image's original bytes, unblurred)")


def _check_semantics(config: dict) -> None:
    """What JSON Schema cannot say (what each scale needs is oqvl.scale's to check)."""
    world = config["train"]["nodes"] * config["train"]["nproc"]  # training processes in all
    for name, source in config["sources"].items():
        total = sum(source.get("corruption", {}).values())
        if total > 1 + 1e-9:
            raise ConfigError(f"sources.{name}.corruption: fractions sum to {total:g}, above 1")
        if "n_pairs" in source and config["scale"] == "paper":
            raise ConfigError(f"sources.{name}: a generated source needs scale: toy")
    filt = config["filter"]
    for name, spec in filt["sources"].items():
        key = f"filter.sources.{name}"
        if name not in config["sources"]:
            raise ConfigError(f"{key}: no source named {name!r}")
        if "source" in spec:
            raise ConfigError(f"{key}.source: a source's own filter reads that source (source is for filter.extra)")
        _check_filter(key, spec)
        if "shards" in config["sources"].get(name, {}) and spec["method"] not in ("none", "uid_list"):
            raise ConfigError(f"{key}: sources.{name} is released shards (already filtered, not downloaded "
                              f"here): method none or uid_list, not {spec['method']}")
    for name, spec in filt.get("extra", {}).items():
        key = f"filter.extra.{name}"
        if spec["source"] not in config["sources"]:
            raise ConfigError(f"{key}.source: no source named {spec['source']!r}")
        _check_filter(key, spec)
    missing = set(config["sources"]) - set(filt["sources"])
    if missing:
        raise ConfigError(f"filter.sources: no filter for source(s) {sorted(missing)}")
    mlm = filt.get("mlm")
    if mlm:
        for src in mlm["sources"]:
            if src not in config["sources"]:
                raise ConfigError(f"filter.mlm.sources: no source named {src!r}")
            if "shards" in config["sources"][src]:
                raise ConfigError(f"filter.mlm.sources: {src!r} is released shards (already filtered); "
                                  f"the MLM-Filter scores downloaded sources")
        if mlm["train"] and mlm["train"].get("global_batch", 0) % world:
            raise ConfigError(f"filter.mlm.train.global_batch {mlm['train']['global_batch']} is not a "
                              f"multiple of train.nodes x train.nproc")
    mlm_sources = set(mlm["sources"]) if mlm else set()
    for name, mix in config["mixtures"].items():
        for src in mix["sources"]:
            if src not in config["sources"]:
                raise ConfigError(f"mixtures.{name}.sources: no source named {src!r}")
        for src, kept in mix.get("kept", {}).items():
            if src not in mix["sources"]:
                raise ConfigError(f"mixtures.{name}.kept: {src!r} is not one of the mixture's sources")
            extra = filt.get("extra", {})
            if kept in extra:
                if extra[kept]["source"] != src:
                    raise ConfigError(f"mixtures.{name}.kept.{src}: filter.extra.{kept} filters "
                                      f"{extra[kept]['source']!r}, not {src!r}")
            elif kept in ("mlm", "union"):
                if src not in mlm_sources:
                    raise ConfigError(f"mixtures.{name}.kept.{src}: {kept!r} needs {src!r} in filter.mlm.sources")
            elif kept != "filter":
                raise ConfigError(f"mixtures.{name}.kept.{src}: {kept!r} is none of filter, mlm, union "
                                  f"or a name in filter.extra")
    for name, run in config["runs"].items():
        base = run.get("pretrained_from")
        if base is not None:
            if "mixture" in run:
                raise ConfigError(f"runs.{name}: give mixture or pretrained_from, not both "
                                  f"(the pretraining it shares fixes the mixture)")
            if base not in config["runs"] or config["runs"][base].get("pretrained_from"):
                raise ConfigError(f"runs.{name}.pretrained_from: no run named {base!r} that pretrains itself")
            if "doc_isolation" in run:
                raise ConfigError(f"runs.{name}.doc_isolation: a pretraining switch; the run shares "
                                  f"{base!r}'s pretraining")
        elif "mixture" not in run:
            raise ConfigError(f"runs.{name}: give its mixture (or pretrained_from: another run)")
        elif run["mixture"] not in config["mixtures"]:
            raise ConfigError(f"runs.{name}.mixture: no mixture named {run['mixture']!r}")
        if "/" in name:
            raise ConfigError(f"runs.{name}: a run name is a directory name, no '/'")
    if config["table4_run"] not in config["runs"]:
        raise ConfigError(f"table4_run: no run named {config['table4_run']!r}")
    for name in config.get("released", {}):
        if name in config["runs"] or "/" in name:
            raise ConfigError(f"released.{name}: a released checkpoint's name is a directory name, "
                              "no '/', and no run's name")
    ev = config["evaluate"]
    if ev["real"] is not None and "heldout" in (ev["splits"] or []):
        raise ConfigError("evaluate.splits: heldout is a toy split (the test items reworded); "
                          "a real release has its test split only")
    if config["model"]["projector"] != "avgpool":
        raise ConfigError(f"model.projector: {config['model']['projector']} is a switch of oqvl.pack and "
                          f"oqvl.train (--projector) that the workflow's rules do not pass yet; use avgpool")
    sd = config["sft_data"]
    if sd["caption_share"] + sd["lookup_share"] >= 1:
        raise ConfigError("sft_data: caption_share + lookup_share must be below 1 (no image questions left)")
    if sd["kind_weights"] is not None and not any(v > 0 for v in sd["kind_weights"].values()):
        raise ConfigError("sft_data.kind_weights: at least one weight must be positive")
    for stage in ("pretrain", "sft"):
        opt = config["train"][stage]
        if opt["global_batch"] % (world * opt["micro_batch"]):
            raise ConfigError(f"train.{stage}.global_batch {opt['global_batch']} is not a multiple of "
                              f"train.nodes x train.nproc x micro_batch")


def run_seeds(config: dict, run: str) -> list[int]:
    """The seeds of a run's chains: its own `seeds`, else train.seeds."""
    own = config["runs"][run].get("seeds")
    return list(own if own is not None else config["train"]["seeds"])


# What each filter method needs besides its method (the keep rule: one of threshold and fraction).
METHOD_KEYS = {"clip": (), "uid_list": ("uid_list",), "none": (), "scores": ("scores",), "scorer": ("scorer",)}
UNSCORED = ("uid_list", "none")  # methods that keep by a list or keep all: no threshold or fraction


def _check_filter(key: str, spec: dict) -> None:
    """One filter entry (filter.sources.<s> or filter.extra.<name>): what its method needs."""
    method = spec["method"]
    for need in METHOD_KEYS[method]:
        if need not in spec:
            raise ConfigError(f"{key}: method {method} needs {need}")
    if method in UNSCORED:
        if "threshold" in spec or "fraction" in spec:
            raise ConfigError(f"{key}: method {method} scores nothing, so it takes no threshold or fraction")
    elif ("threshold" in spec) == ("fraction" in spec):
        raise ConfigError(f"{key}: a {method} filter needs exactly one of threshold and fraction")
    stray = sorted({"options", "batch_size"} & set(spec)) if method != "scorer" else []
    if stray:
        raise ConfigError(f"{key}.{stray[0]}: only a scorer filter takes {stray[0]}")


def load(path: str | Path) -> dict:
    with open(path) as f:
        config = yaml.safe_load(f)
    try:
        return validate(config)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def config_hash(obj) -> str:
    """A short, stable hash of any JSON-serialisable config fragment."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
