"""The scale, resolved once: which rules exist at each scale, where every input comes from, and
half-toy configs refused at load with one line naming the key."""

import pytest
import yaml

from conftest import REPO, snakemake
from oqvl import layout
from oqvl.config import ConfigError, validate
from oqvl.scale import TOY_RULES, USER_PATHS, resolve


def raw(name):
    return yaml.safe_load((REPO / "config" / name).read_text())


def resolved(cfg):
    return resolve(validate(cfg))


def set_key(cfg, dotted, value):
    *parents, last = dotted.split(".")
    node = cfg
    for key in parents:
        node = node.setdefault(key, {}) if node.get(key) is not None else node.setdefault(key, {})
    node[last] = value


def test_toy_scale_builds_everything_itself():
    s = resolved(raw("default.yaml"))
    assert s.toy and set(s.rules) == set(TOY_RULES)
    assert s.generated == ("ccs", "datacomp", "laion") and s.imported == ()
    assert (s.clip_weights, s.vision_weights) == (layout.CLIP_MODEL, layout.CLIP_MODEL)
    assert (s.tokenizer, s.sft_data, s.mlm) == (layout.TOKENIZER, layout.TOY_SFT_DATA, "train")
    assert s.tokenizer_input() == f"{layout.TOKENIZER}/tokenizer.json"
    assert s.real_benchmarks is None and s.lm_path is None
    assert s.gpus == {"score": 0, "train": 0, "evaluate": 0}


def test_paper_scale_builds_nothing_toy():
    s = resolved(raw("full.yaml"))
    assert not s.toy and s.rules == frozenset()
    assert s.generated == () and s.imported == ("ccs", "datacomp", "laion")
    assert s.clip_weights.startswith("models/") and s.vision_weights.startswith("models/")
    assert s.tokenizer_input() == s.tokenizer == "models/Qwen2.5-1.5B-Instruct" == s.lm_path
    assert s.sft_data == "data/llava_v1_5_mix665k.json"
    # the released MLM-Filter, converted here, with its official prompt
    assert (s.mlm, s.mlm_model, s.mlm_prompt) == ("release", layout.MLM_RELEASE, "official")
    assert s.gpus["score"] == 1 and s.gpus["train"] == 8 and s.gpus["evaluate"] == 1


# A paper path left in a toy config (each user path, the MLM-Filter's, a pair list, a uid list).
TOY_WITH_A_PAPER_PATH = [
    *[(key, lambda c, k=key: set_key(c, k, "some/path" if k != "evaluate.real" else {"POPE": "x"})) for key in USER_PATHS],
    ("filter.mlm.scores_dir", lambda c: set_key(c, "filter.mlm.scores_dir", "data/mlm_filter")),
    ("filter.mlm.model", lambda c: set_key(c, "filter.mlm.model", "models/mlm")),
    ("filter.mlm.release", lambda c: set_key(c, "filter.mlm.release", {"path": "models/m", "vision": "models/s"})),
    ("sources.laion.pair_list", lambda c: c["sources"].update(laion={"paper_id": 3, "pair_list": "l.parquet"})),
    ("filter.sources.datacomp.uid_list",
     lambda c: c["filter"]["sources"].update(datacomp={"method": "uid_list", "uid_list": "d.npy"})),
]


@pytest.mark.parametrize("key, mutate", TOY_WITH_A_PAPER_PATH, ids=[k for k, _ in TOY_WITH_A_PAPER_PATH])
def test_toy_scale_with_a_paper_path_is_refused_by_name(key, mutate):
    cfg = raw("ci.yaml")
    mutate(cfg)
    if key == "evaluate.real":  # a complete set of releases, so the schema accepts it
        cfg["evaluate"]["real"] = {b: f"data/{b}" for b in cfg["evaluate"]["benchmarks"]}
    with pytest.raises(ConfigError) as e:
        resolved(cfg)
    assert str(e.value).startswith(f"{key}: scale toy") and "\n" not in str(e.value)
    assert "mixed_inputs: true" in str(e.value)


@pytest.mark.parametrize("key", [*USER_PATHS, "filter.mlm"])
def test_paper_scale_missing_a_path_is_refused_by_name(key):
    cfg = raw("full.yaml")
    if key == "filter.mlm":
        cfg["filter"]["mlm"]["release"] = None
    else:
        set_key(cfg, key, None)
    with pytest.raises(ConfigError) as e:
        resolved(cfg)
    assert str(e.value).startswith(f"{key}: scale paper needs") and "\n" not in str(e.value)


def test_mlm_filter_modes_and_prompts():
    cfg = raw("full.yaml")
    cfg["filter"]["mlm"]["scores_dir"] = "data/mlm_filter"
    with pytest.raises(ConfigError, match=r"^filter.mlm: give one of release, model, scores_dir, "
                                          r"not release and scores_dir$"):
        resolved(cfg)
    cfg["filter"]["mlm"]["release"] = None
    s = resolved(cfg)
    assert (s.mlm, s.mlm_model, s.mlm_prompt) == ("import", None, None)
    cfg["filter"]["mlm"].update(scores_dir=None, model="results/my_mlm", prompt=None)
    s = resolved(cfg)
    assert (s.mlm, s.mlm_model, s.mlm_prompt) == ("model", "results/my_mlm", "toy")
    cfg = raw("ci.yaml")
    assert resolved(cfg).mlm_prompt == "toy"
    cfg["filter"]["mlm"]["prompt"] = "official"
    with pytest.raises(ConfigError, match=r"^filter.mlm.prompt: the toy MLM-Filter is trained on the toy prompt"):
        resolved(cfg)


def test_paper_scale_refuses_the_toy_preset_and_mixed_inputs():
    cfg = raw("full.yaml")
    cfg["model"]["preset"] = "toy"
    with pytest.raises(ConfigError, match=r"^model.preset: scale paper"):
        resolved(cfg)
    cfg = raw("full.yaml")
    cfg["mixed_inputs"] = True
    with pytest.raises(ConfigError, match=r"^mixed_inputs: only toy scale"):
        resolved(cfg)


def test_mixed_inputs_reads_the_given_paths_and_builds_the_rest():
    # A smoke test of real data through toy models: released pairs for one source and the
    # downloaded benchmarks, everything else toy-built.
    cfg = raw("ci.yaml")
    cfg["mixed_inputs"] = True
    cfg["sources"]["laion"] = {"paper_id": 3, "pair_list": "data/laion.parquet"}
    cfg["evaluate"]["real"] = {b: f"data/{b}" for b in cfg["evaluate"]["benchmarks"]}
    s = resolved(cfg)
    assert s.imported == ("laion",) and s.generated == ("ccs", "datacomp")
    assert s.real_benchmarks["POPE"] == "data/POPE"
    assert {"generate_pairs", "train_clip", "tokenizer", "sft_data", "train_mlm_filter"} <= s.rules


def test_a_toy_model_without_its_train_section_is_refused():
    cfg = raw("ci.yaml")
    cfg["filter"]["mlm"]["train"] = None
    with pytest.raises(ConfigError, match=r"^filter.mlm.train: the toy MLM-Filter is trained here"):
        resolved(cfg)


def test_the_snakefile_stops_a_half_toy_config_with_one_line(tmp_path):
    cfg = raw("ci.yaml")
    cfg["model"]["lm_path"] = "models/Qwen2.5-1.5B-Instruct"
    path = tmp_path / "half.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = snakemake(tmp_path, "-n", "results/table4.csv", configfile=path, check=False)
    assert proc.returncode != 0
    assert f"config error: {path}: model.lm_path: scale toy builds the LLM folder" in proc.stdout + proc.stderr


def test_no_rule_decides_the_scale_by_testing_a_path():
    # The rules ask oqvl.scale; a `... is None` test in a rule file would decide the scale again.
    for path in [REPO / "Snakefile", *sorted((REPO / "rules").glob("*.smk"))]:
        assert " is None" not in path.read_text(), path


def test_the_toy_worlds_defaults_are_the_schemas():
    from oqvl.world.source import WorldConfig

    schema = yaml.safe_load((REPO / "schemas" / "config.schema.yaml").read_text())["properties"]["world"]["properties"]
    assert {k: v["default"] for k, v in schema.items()} == WorldConfig().__dict__


def test_the_benchmark_list_is_the_schemas():
    from oqvl.evaluate import BENCHMARKS

    schema = yaml.safe_load((REPO / "schemas" / "config.schema.yaml").read_text())["properties"]["evaluate"]["properties"]
    assert tuple(schema["benchmarks"]["items"]["enum"]) == tuple(schema["benchmarks"]["default"]) == BENCHMARKS


@pytest.mark.parametrize("vocab_size, document_tokens", [(4096, "project"), (8192, "reference")])
def test_toy_tokenizer_that_does_not_fit_the_preset_is_refused_at_load(vocab_size, document_tokens):
    """The toy preset embeds 8192 + 22 tokens with <|image_pad|> at 8204: another vocabulary size
    (or the reference's two added tokens) would train on wrong or missing embedding rows."""
    cfg = raw("default.yaml")
    cfg["model"]["tokenizer"]["vocab_size"] = vocab_size
    cfg.setdefault("pack", {})["document_tokens"] = document_tokens
    with pytest.raises(ConfigError, match=r"^model\.tokenizer\.vocab_size: .* preset toy \(toy\.json\)"):
        resolved(cfg)
