"""Config validation: every shipped config passes; bad values stop with one line naming the key."""


import pytest
import yaml

from conftest import REPO, snakemake
from oqvl.config import ConfigError, config_hash, load, validate


@pytest.mark.parametrize("name", ["default.yaml", "ci.yaml", "full.yaml"])
def test_shipped_configs_validate(name):
    cfg = load(REPO / "config" / name)
    assert cfg["sources"]


def test_paper_clip_scorer_has_the_activation_its_openai_weights_were_trained_with():
    """OpenAI's ViT-L/14 uses QuickGELU; open_clip builds it only for the -quickgelu config."""
    import open_clip

    clip = load(REPO / "config" / "full.yaml")["filter"]["clip"]
    assert "openai" in clip["pretrained"]
    assert open_clip.get_model_config(clip["model"])["quick_gelu"] is True


def test_paper_optimizer_is_the_references_adamw():
    """The reference's AdamW keeps torch's default betas (fsdp.py:283); the toy default differs."""
    train = load(REPO / "config" / "full.yaml")["train"]
    assert train["pretrain"]["betas"] == train["sft"]["betas"] == [0.9, 0.999]
    assert load(REPO / "config" / "default.yaml")["train"]["sft"]["betas"] == [0.9, 0.95]


def ci():
    return yaml.safe_load((REPO / "config" / "ci.yaml").read_text())


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c.update(bogus=1), "unknown key bogus"),
    (lambda c: c["raw"].update(threads="eight"), "raw.threads: 'eight' is not of type 'integer'"),
    (lambda c: c["sources"]["ccs"].update(n_pairs=-3), "sources.ccs.n_pairs: -3 is less than the minimum of 1"),
    (lambda c: c["sources"]["ccs"]["corruption"].update(wrong_objekt=0.1),
     "unknown key sources.ccs.corruption.wrong_objekt"),
    (lambda c: c["sources"]["ccs"]["corruption"].update(empty_caption=1.5),
     "sources.ccs.corruption.empty_caption: 1.5 is greater than the maximum of 1"),
    (lambda c: c["sources"]["ccs"]["corruption"].update(empty_caption=0.7, generic_caption=0.7),
     "sources.ccs.corruption: fractions sum to"),
    (lambda c: c.update(scale="huge"), "scale: 'huge' is not one of"),
    (lambda c: c["world"].update(image_size=8), "world.image_size: 8 is less than the minimum of 16"),
    (lambda c: c["runs"].update(extra={"mixture": "ccs+nothing"}), "runs.extra.mixture: no mixture named"),
    (lambda c: c.update(table4_run="nope"), "table4_run: no run named 'nope'"),
    (lambda c: c["train"]["pretrain"].update(global_batch=6), "train.pretrain.global_batch 6 is not a multiple"),
    (lambda c: c["train"].update(nodes=2),  # world 2 x 2, micro batch 4: 16 per step at least
     "train.pretrain.global_batch 8 is not a multiple of train.nodes x train.nproc x micro_batch"),
    (lambda c: c["train"].update(nodes=0), "train.nodes: 0 is less than the minimum of 1"),
    (lambda c: c["train"]["sft"].update(lr=0), "train.sft.lr: 0 is less than or equal to the minimum of 0"),
    (lambda c: c["filter"]["mlm"].update(threshold=101), "filter.mlm.threshold: 101 is greater than the maximum"),
    (lambda c: c["filter"]["mlm"].update(metric="clip"), "filter.mlm.metric: 'clip' is not one of"),
    (lambda c: c["filter"]["mlm"].update(sources=["cc12m"]), "filter.mlm.sources: no source named 'cc12m'"),
    (lambda c: c["filter"]["mlm"]["train"].update(global_batch=7), "filter.mlm.train.global_batch 7 is not a multiple"),
    (lambda c: c["mixtures"]["ccs+laion"].update(kept={"laion": "union"}),
     "mixtures.ccs+laion.kept.laion: 'union' needs 'laion' in filter.mlm.sources"),
    (lambda c: c["mixtures"]["ccs+laion"].update(kept={"datacomp": "mlm"}),
     "mixtures.ccs+laion.kept: 'datacomp' is not one of the mixture's sources"),
    (lambda c: c["mixtures"]["ccs+laion"].update(kept={"laion": "best"}), "mixtures.ccs+laion.kept.laion: 'best' is none of filter, mlm, union or a name in filter.extra"),
])
def test_bad_values_name_the_key(mutate, message):
    cfg = ci()
    mutate(cfg)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_defaults_are_filled():
    cfg = ci()
    del cfg["raw"]["retries"], cfg["world"]
    validate(cfg)
    assert cfg["raw"]["retries"] == 0 and cfg["world"]["image_size"] == 64


def test_config_hash_is_order_independent():
    a = {"x": 1, "y": [1, 2]}
    assert config_hash(a) == config_hash(dict(reversed(list(a.items()))))
    assert config_hash(a) != config_hash({"x": 2, "y": [1, 2]})


def test_snakemake_stops_before_any_job(tmp_path):
    cfg = ci()
    cfg["sources"]["laion"]["n_pairs"] = 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    proc = snakemake(tmp_path, "-n", configfile=bad, check=False)
    assert proc.returncode != 0
    lines = [l for l in (proc.stdout + proc.stderr).splitlines() if "config error" in l]
    assert lines == [f"config error: {bad}: sources.laion.n_pairs: 0 is less than the minimum of 1"]
    assert not (tmp_path / "results").exists()


def test_a_release_has_no_heldout_split():
    import yaml

    from oqvl.config import ConfigError, validate

    cfg = yaml.safe_load((REPO / "config" / "full.yaml").read_text())
    assert validate(dict(cfg))["evaluate"]["splits"] is None  # every split the scale has: test
    cfg["evaluate"]["splits"] = ["test", "heldout"]
    with pytest.raises(ConfigError, match="evaluate.splits: heldout is a toy split"):
        validate(cfg)
