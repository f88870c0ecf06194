"""A user's own filter: a scores file (method scores), a scorer function (method scorer, rule
user_score), named filters of filter.extra, the colour-agreement example, and the DAG around them."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from conftest import CI_CONFIG, raw_toy_source, snakemake
from oqvl import layout as L
from oqvl.config import ConfigError, load, validate
from oqvl.filter import keep, user
from oqvl.filter.clip_score import parts_dir
from oqvl.filter.examples import colour_agreement
from oqvl.plan import Plan
from oqvl.scale import resolve
from oqvl.shards import iter_samples, sample_uid, shard_paths

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve()
EXAMPLE = "oqvl.filter.examples.colour_agreement:score"
RATES = {"wrong_attribute": 0.2, "wrong_object": 0.1, "generic_caption": 0.1, "empty_caption": 0.05,
         "broken_truncated": 0.05, "broken_not_image": 0.05}


# ---------------------------------------------------------------------------------------------
# scorers the tests name by file path (tests/test_user_filter.py:<function>)


def caption_length(images, captions, uids, scale=1.0):
    return [scale * len(c) for c in captions]


def one_short(images, captions, uids):
    return [0.0] * (len(uids) - 1)


def not_numbers(images, captions, uids):
    return ["high"] * len(uids)


def ref(function: str) -> str:
    return f"{HERE}:{function}"


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """40 real toy pairs (2 shards of 20) with caption and image corruptions."""
    out = raw_toy_source(tmp_path_factory.mktemp("raw") / "datacomp", "datacomp", 40, seed=5, rates=RATES)
    assert len(shard_paths(out / "shards")) == 2
    return out


def in_shards(raw) -> list[str]:
    return [sample_uid(s) for s in iter_samples(shard_paths(raw / "shards"))]


def run_keep(tmp_path, *args) -> tuple[list[str], dict]:
    out, stats = tmp_path / "kept.parquet", tmp_path / "stats.json"
    keep.main([*args, "--out", str(out), "--stats", str(stats)])
    return pd.read_parquet(out)["uid"].tolist(), json.loads(stats.read_text())


# ---------------------------------------------------------------------------------------------
# method scores: a user's parquet of uid, score


def test_scores_file_keeps_by_threshold_and_counts_missing_and_unknown_uids(raw, tmp_path):
    uids = sorted(in_shards(raw))  # img2dataset leaves the broken images out of the shards
    n = len(uids)
    scored = uids[:30]  # the other pairs of the shards have no score
    table = pd.DataFrame({"uid": scored + ["datacomp-9999999", "elsewhere-1"],
                          "score": [float(i) for i in range(30)] + [100.0, 100.0]})
    table.loc[3, "score"] = float("nan")  # a user's own "no score"
    table.sample(frac=1, random_state=0).to_parquet(tmp_path / "mine.parquet")  # row order is free
    kept, stats = run_keep(tmp_path, "--user-scores", str(tmp_path / "mine.parquet"),
                           "--shards", str(raw / "shards"), "--threshold", "20")
    assert sorted(kept) == scored[20:30]
    assert stats == {"method": "threshold", "threshold": 20.0, "fraction": None, "pairs_in": n,
                     "kept": 10, "rejected": n - 10, "failed": 0, "no_score": n - 30 + 1, "not_in_shards": 2,
                     "min_kept_score": 20.0}
    manifest = json.loads((tmp_path / "kept.manifest.json").read_text())
    assert list(manifest["inputs"]) == [str(tmp_path / "mine.parquet")]


def test_scores_file_fraction_is_of_the_source_and_ties_break_by_uid(raw, tmp_path):
    uids = sorted(in_shards(raw))
    n = len(uids)
    # Two score levels; the pairs without a row count in the source's n but are never kept.
    pd.DataFrame({"uid": uids[:30], "score": [1.0] * 8 + [0.5] * 22}).to_parquet(tmp_path / "s.parquet")
    kept, stats = run_keep(tmp_path, "--user-scores", str(tmp_path / "s.parquet"),
                           "--shards", str(raw / "shards"), "--fraction", "0.5")
    assert len(kept) == round(0.5 * n) > 8
    assert sorted(kept) == uids[:round(0.5 * n)]  # every 1.0, then the lowest uids among the 0.5s
    assert stats["no_score"] == n - 30 and stats["rejected"] == n - len(kept)


@pytest.mark.parametrize("write, message", [
    (None, "scores file not found"),
    (lambda p: pd.DataFrame({"uid": ["a"], "value": [1.0]}).to_parquet(p), "no score column (columns: uid, value)"),
    (lambda p: pd.DataFrame({"id": ["a"]}).to_parquet(p), "no uid or score column (columns: id)"),
    (lambda p: pd.DataFrame({"uid": ["a"], "score": ["high"]}).to_parquet(p), "column score is object, not numbers"),
    (lambda p: pd.DataFrame({"uid": ["a", "a"], "score": [1.0, 2.0]}).to_parquet(p), "1 uid(s) appear more than once, e.g. 'a'"),
    (lambda p: p.write_text("uid,score\na,1\n"), "not a readable parquet file"),
])
def test_a_bad_scores_file_stops_with_one_line_naming_it(raw, tmp_path, write, message):
    path = tmp_path / "mine.parquet"
    if write:
        write(path)
    with pytest.raises(SystemExit) as e:
        run_keep(tmp_path, "--user-scores", str(path), "--shards", str(raw / "shards"), "--threshold", "0")
    assert str(e.value).startswith(f"error: {path}: {message}") and "\n" not in str(e.value)
    assert not (tmp_path / "kept.parquet").exists()


# ---------------------------------------------------------------------------------------------
# method scorer: the entry point


def score_raw(raw, out: Path, scorer: str, options=None, batch_size=7) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    out.mkdir(parents=True, exist_ok=True)
    stats = user.score_source(raw / "shards", scorer, options or {}, out / "scores.parquet",
                              out / "failures.parquet", batch_size=batch_size)
    return stats, pd.read_parquet(out / "scores.parquet"), pd.read_parquet(out / "failures.parquet")


def test_scorer_scores_every_decodable_pair_and_lists_the_rest_with_reasons(raw, tmp_path):
    stats, scores, failed = score_raw(raw, tmp_path, ref("caption_length"), {"scale": 2.0})
    truth = pd.read_parquet(raw / "truth.parquet").set_index("uid")
    assert sorted(scores["uid"].tolist() + failed["uid"].tolist()) == sorted(in_shards(raw))
    # the scorer saw each pair's own caption (batches of 7 across 2 shards: uids stay aligned)
    assert (scores["score"] == 2.0 * scores["uid"].map(truth["caption"]).str.len()).all()
    assert scores["uid"].is_monotonic_increasing and scores["scorer"].eq(ref("caption_length")).all()
    assert set(failed["uid"]) == set(truth.index[truth["corruption"] == "empty_caption"]) & set(in_shards(raw))
    assert failed["reason"].eq("empty_caption").all()
    assert stats["scored"] + stats["failed"] == len(in_shards(raw)) and stats["no_score"] == 0
    assert stats["failed_by_reason"] == {"empty_caption": len(failed)}


def test_undecodable_and_missing_images_never_reach_the_scorer(tmp_path, monkeypatch):
    import io

    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)  # lmms-eval, if imported, sets it

    from oqvl.shards import ShardSink

    png = io.BytesIO()
    drawn("red").save(png, format="PNG")
    samples = [{"__key__": "good", "png": png.getvalue(), "txt": b"a red circle"},
               {"__key__": "cut", "png": png.getvalue()[: len(png.getvalue()) // 2], "txt": b"a red circle"},
               {"__key__": "html", "jpg": b"<html>404</html>", "txt": b"a red circle"},
               {"__key__": "none", "txt": b"a red circle"}]
    with ShardSink(tmp_path / "shards", 10) as sink:
        for sample in samples:
            sink.write(sample)
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "shards").symlink_to(tmp_path / "shards")
    stats, scores, failed = score_raw(tmp_path / "raw", tmp_path / "out", EXAMPLE)
    assert scores[["uid", "score"]].values.tolist() == [["good", 1.0]]
    reasons = dict(failed[["uid", "reason"]].values.tolist())
    assert reasons == {"cut": "undecodable", "html": "undecodable", "none": "no_image"}
    messages = dict(failed[["uid", "message"]].values.tolist())
    assert messages["cut"].startswith("OSError: ") and messages["html"].startswith("UnidentifiedImageError: ")


def test_a_crashed_scorer_run_resumes_at_its_first_unfinished_shard(raw, tmp_path, monkeypatch):
    _, want, _ = score_raw(raw, tmp_path / "whole", ref("caption_length"))
    real, seen = user.score_shard, []

    def crash_on_second(path, *a):
        seen.append(path.name)
        if len(seen) == 2:
            raise RuntimeError("killed")
        return real(path, *a)

    monkeypatch.setattr(user, "score_shard", crash_on_second)
    with pytest.raises(RuntimeError):
        score_raw(raw, tmp_path / "resumed", ref("caption_length"))
    key = user.scorer_key(ref("caption_length"), {})
    assert len(list(parts_dir(tmp_path / "resumed" / "scores.parquet", key).glob("*.scores.parquet"))) == 1
    seen.clear()
    monkeypatch.setattr(user, "score_shard", lambda path, *a: (seen.append(path.name), real(path, *a))[1])
    _, got, _ = score_raw(raw, tmp_path / "resumed", ref("caption_length"))
    assert seen == ["00001.tar"]  # the first shard was not scored again
    pd.testing.assert_frame_equal(got, want)
    # other options (or an edited module file) are another key: nothing finished is reused
    assert user.scorer_key(ref("caption_length"), {"scale": 2.0}) != key


@pytest.mark.parametrize("scorer, message", [
    ("no_colon", "not of the form module:function"),
    ("no_such_package.filters:score", "cannot find module 'no_such_package.filters'"),
    ("oqvl.filter.examples.no_such_module:score", "no importable module 'oqvl.filter.examples.no_such_module'"),
    ("oqvl.filter.examples.colour_agreement:nope", "has no function 'nope'"),
    ("missing/file.py:score", "no file missing/file.py"),
])
def test_a_bad_scorer_name_stops_with_one_line(raw, tmp_path, scorer, message):
    with pytest.raises(SystemExit) as e:
        user.main(["--shards", str(raw / "shards"), "--scorer", scorer, "--out", str(tmp_path / "s.parquet"),
                   "--failures", str(tmp_path / "f.parquet"), "--stats", str(tmp_path / "st.json")])
    line = str(e.value)
    assert line.startswith(f"error: scorer {scorer!r}: ") and message in line and "\n" not in line


@pytest.mark.parametrize("function, message", [
    ("one_short", "returned 6 scores for a batch of 7 pairs"),
    ("not_numbers", "returned list, not one float per pair"),
])
def test_a_scorer_breaking_the_contract_stops_with_one_line_naming_it(raw, tmp_path, function, message):
    with pytest.raises(SystemExit) as e:
        user.main(["--shards", str(raw / "shards"), "--scorer", ref(function), "--batch-size", "7",
                   "--out", str(tmp_path / "s.parquet"), "--failures", str(tmp_path / "f.parquet"),
                   "--stats", str(tmp_path / "st.json")])
    assert str(e.value).startswith(f"error: scorer {ref(function)!r}: {message}")
    assert not (tmp_path / "s.parquet").exists()


def test_scorer_cli_manifest_hashes_the_scorers_module_file(raw, tmp_path):
    out = tmp_path / "user_scores_colour.parquet"
    user.main(["--shards", str(raw / "shards"), "--scorer", EXAMPLE, "--options", '{"min_share": 0.05}',
               "--out", str(out), "--failures", str(tmp_path / "f.parquet"), "--stats", str(tmp_path / "s.json")])
    manifest = json.loads((tmp_path / "user_scores_colour.manifest.json").read_text())
    module = Path(colour_agreement.__file__)
    assert manifest["inputs"] == {str(module): user.sha256_file(module)}
    assert manifest["stage"] == "user_score" and manifest["config"]["options"] == '{"min_share": 0.05}'
    assert manifest["work"]["amount"] == len(in_shards(raw)) and manifest["device"] == {"type": "cpu", "gpus": 0}


# ---------------------------------------------------------------------------------------------
# the example: colour agreement


def drawn(*colours: str) -> Image.Image:
    from oqvl.world.scene import Obj, Scene, render

    cells = ("top left", "top right", "bottom left")
    return render(Scene(tuple(Obj("circle", c, "small", cell) for c, cell in zip(colours, cells))))


def test_colour_agreement_scores_the_overlap_of_said_and_seen_colours():
    images = [drawn("red"), drawn("red"), drawn("red", "blue"), drawn("red"), Image.new("RGB", (64, 64), (128,) * 3)]
    captions = ["a red circle", "a blue circle", "a red circle and a yellow square", "stock photo", "untitled"]
    got = colour_agreement.score(images, captions, ["u"] * 5)
    assert got[:4] == [1.0, 0.0, 1 / 3, 0.0]  # exact, wrong, {red} of {red, blue, yellow}, generic
    assert math.isnan(got[4])  # grey image, no colour word: nothing to compare
    # a shape the caption gets wrong is invisible to it: the report shows this blind spot
    assert colour_agreement.score([drawn("green")], ["a green triangle"], ["u"]) == [1.0]


# ---------------------------------------------------------------------------------------------
# config and plan


def with_colour(cfg: dict) -> dict:
    cfg["filter"]["extra"] = {"colour": {"source": "datacomp", "method": "scorer", "scorer": EXAMPLE, "threshold": 1.0}}
    cfg["mixtures"]["ccs+datacomp_colour"] = {"sources": ["ccs", "datacomp"], "kept": {"datacomp": "colour"}}
    cfg["runs"]["ccs+datacomp_colour"] = {"mixture": "ccs+datacomp_colour"}
    return cfg


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["filter"]["extra"]["colour"].pop("threshold"), "filter.extra.colour: a scorer filter needs exactly one of threshold and fraction"),
    (lambda c: c["filter"]["extra"]["colour"].pop("scorer"), "filter.extra.colour: method scorer needs scorer"),
    (lambda c: c["filter"]["extra"]["colour"].update(source="nope"), "filter.extra.colour.source: no source named 'nope'"),
    (lambda c: c["filter"]["extra"]["colour"].update(scorer="a b:c"), "filter.extra.colour.scorer: 'a b:c' does not match"),
    (lambda c: c["filter"]["sources"]["ccs"].update(options={}), "filter.sources.ccs.options: only a scorer filter takes options"),
    (lambda c: c["filter"]["sources"]["ccs"].update(source="ccs"), "filter.sources.ccs.source: a source's own filter reads that source"),
    (lambda c: c["filter"]["sources"].update(ccs={"method": "scores", "fraction": 0.5}), "filter.sources.ccs: method scores needs scores"),
    (lambda c: c["filter"]["extra"].update(mlm=c["filter"]["extra"]["colour"]), "filter.extra: 'mlm' should not be valid"),
    (lambda c: c["mixtures"]["ccs+datacomp_colour"].update(kept={"ccs": "colour"}), "mixtures.ccs+datacomp_colour.kept.ccs: filter.extra.colour filters 'datacomp', not 'ccs'"),
    (lambda c: c["mixtures"]["ccs+datacomp_colour"].update(kept={"datacomp": "shape"}), "'shape' is none of filter, mlm, union or a name in filter.extra"),
])
def test_bad_user_filter_configs_are_refused_by_key(mutate, message):
    cfg = with_colour(yaml.safe_load(CI_CONFIG.read_text()))
    validate(cfg)
    cfg = with_colour(yaml.safe_load(CI_CONFIG.read_text()))
    mutate(cfg)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_named_run_rests_on_the_user_filter_and_not_on_datacomps_clip_filter():
    cfg = load(REPO / "config" / "default.yaml")
    plan = Plan(cfg, resolve(cfg))
    run = "ccs+datacomp_colour"
    assert plan.mixture_parts(run)["kept"] == [L.kept("ccs"), "results/filter/datacomp/kept_colour.parquet"]
    jobs = plan.run_jobs(run)
    colour = {"source": "datacomp", "which": "colour"}
    assert ("user_score", colour) in jobs and ("keep_extra", colour) in jobs
    assert ("clip_score", {"source": "ccs"}) in jobs and ("keep", {"source": "ccs"}) in jobs
    assert ("clip_score", {"source": "datacomp"}) not in jobs and ("keep", {"source": "datacomp"}) not in jobs
    # the accounting reads each job's files where the rules write them
    assert L.manifest("user_score", **colour) == "results/filter/datacomp/user_scores_colour.manifest.json"
    assert L.benchmark("keep_extra", **colour) == "results/benchmarks/filter/keep_colour_datacomp.tsv"
    # the quality report judges it beside the built-in filters
    assert ("datacomp", "colour", L.user_scores("datacomp", "colour"), L.kept("datacomp", "colour")) \
        in plan.quality_entries()
    assert plan.scorer_args("datacomp", "colour") == f"--scorer {EXAMPLE} --options '{{}}' --batch-size 64"


def test_a_scores_file_as_a_sources_own_filter_needs_no_scoring_job():
    cfg = yaml.safe_load(CI_CONFIG.read_text())
    cfg["filter"]["sources"]["laion"] = {"method": "scores", "scores": "mine/laion.parquet", "fraction": 0.6}
    cfg["filter"]["sources"]["ccs"] = {"method": "scorer", "scorer": EXAMPLE, "threshold": 0.5}
    plan = Plan(validate(cfg), resolve(cfg))
    jobs = plan.run_jobs("ccs+laion")
    assert [r for r, wc in jobs if wc.get("source") == "laion"] == ["generate_pairs", "download", "keep"]
    assert ("user_score", {"source": "ccs", "which": "filter"}) in jobs
    assert plan.keep_inputs("laion") == {"user_scores": "mine/laion.parquet", "shards": L.shards("laion")}
    assert plan.keep_inputs("ccs")["scores"] == "results/filter/ccs/user_scores_filter.parquet"
    entries = {(s, f): sc for s, f, sc, _ in plan.quality_entries()}
    assert entries[("laion", "scores")] == "mine/laion.parquet"
    assert entries[("ccs", "scorer")] == L.user_scores("ccs", "filter")


# ---------------------------------------------------------------------------------------------
# the rules: a small snakemake run up to the quality report


MY_FILTER = '''
def score(images, captions, uids, words=("red",)):
    return [float(any(w in c for w in words)) for c in captions]
'''


def tiny_config(root: Path) -> Path:
    """One toy source of 60 pairs, its CLIP filter (a 2-step toy CLIP), and three user filters:
    the example scorer, a scorer in a file of the workdir, and a scores file."""
    cfg = yaml.safe_load(CI_CONFIG.read_text())
    cfg["sources"] = {"datacomp": {**cfg["sources"]["datacomp"], "n_pairs": 60, "corruption": RATES}}
    cfg["raw"]["samples_per_shard"] = 30
    cfg["filter"]["clip"]["train"] = {"n_pairs": 32, "steps": 2, "batch_size": 16, "lr": 0.002}
    cfg["filter"]["sources"] = {"datacomp": {"method": "clip", "fraction": 0.5}}
    cfg["filter"]["mlm"] = None
    (root / "my_filter.py").write_text(MY_FILTER)
    pd.DataFrame({"uid": [f"datacomp-{i:07d}" for i in range(0, 60, 2)],  # every other pair
                  "score": np.arange(30.0)}).to_parquet(root / "mine.parquet")
    cfg["filter"]["extra"] = {
        "colour": {"source": "datacomp", "method": "scorer", "scorer": EXAMPLE, "threshold": 1.0, "batch_size": 16},
        "red": {"source": "datacomp", "method": "scorer", "scorer": "my_filter.py:score", "threshold": 1.0,
                "options": {"words": ["red", "blue"]}},
        "mine": {"source": "datacomp", "method": "scores", "scores": "mine.parquet", "fraction": 0.25},
    }
    cfg["mixtures"] = {"datacomp_colour": {"sources": ["datacomp"], "kept": {"datacomp": "colour"},
                                           "samples_per_shard": 30}}
    cfg["runs"] = {"datacomp_colour": {"mixture": "datacomp_colour"}}
    cfg["table4_run"] = "datacomp_colour"
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_user_filters_through_the_rules_to_the_quality_report(tmp_path):
    cfg = tiny_config(tmp_path)
    targets = ["results/filter/quality/report.md", "results/mixtures/datacomp_colour/manifest.json"]
    snakemake(tmp_path, *targets, configfile=cfg)
    res = tmp_path / "results"
    summary = pd.read_csv(res / "filter/quality/summary.csv").set_index("filter")
    assert set(summary.index) == {"clip", "colour", "red", "mine"}
    truth = pd.read_parquet(res / "raw/datacomp/truth.parquet")
    # the example has real signal: what it keeps is cleaner than the source
    assert summary.loc["colour", "precision"] > summary.loc["colour", "usable_rate"] + 0.1
    by_kind = pd.read_csv(res / "filter/quality/by_corruption.csv")
    colour = by_kind[by_kind["filter"] == "colour"].set_index("corruption")["kept_rate"]
    assert colour["generic_caption"] == 0 and colour["clean"] == 1.0
    assert colour["wrong_object"] == 1.0  # its blind spot, shown as it is
    assert (res / "filter/quality/hist_datacomp_colour.png").exists()
    # the scores file: 30 of 60 pairs scored, the best 25% of 60 kept, the rest counted
    mine = json.loads((res / "filter/datacomp/kept_mine_stats.json").read_text())
    in_src = len(pd.read_parquet(res / "filter/datacomp/clip_scores.parquet")) + \
        len(pd.read_parquet(res / "filter/datacomp/clip_failures.parquet"))
    assert mine["pairs_in"] == in_src and mine["kept"] == round(0.25 * in_src)
    assert mine["no_score"] == in_src - 30 + mine["not_in_shards"]
    # the mixture holds exactly the example's kept set
    kept = set(pd.read_parquet(res / "filter/datacomp/kept_colour.parquet")["uid"])
    mixture = json.loads((res / "mixtures/datacomp_colour/manifest.json").read_text())
    assert mixture["counts"]["total"] == len(kept) > 0
    assert truth.set_index("uid").loc[sorted(kept), "caption_true"].mean() > truth["caption_true"].mean()
    # the scorer file's options reached it
    red = pd.read_parquet(res / "filter/datacomp/user_scores_red.parquet").merge(truth, on="uid")
    assert (red["score"] == red["caption"].str.contains("red|blue").astype(float)).all()
    # up to date; editing the scorer's file reruns its scores and nothing else's
    assert "Nothing to be done" in snakemake(tmp_path, "-n", *targets, configfile=cfg).stdout
    (tmp_path / "my_filter.py").write_text(MY_FILTER + "\n# edited\n")
    out = snakemake(tmp_path, "-n", *targets, configfile=cfg).stdout
    assert "wildcards: source=datacomp, which=red" in out and "which=colour" not in out


def test_the_snakefile_stops_an_unimportable_scorer_with_one_line(tmp_path):
    cfg = yaml.safe_load(tiny_config(tmp_path).read_text())
    cfg["filter"]["extra"]["colour"]["scorer"] = "no_such_package.filters:score"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(tmp_path, "-n", configfile=tmp_path / "bad.yaml", check=False)
    assert proc.returncode != 0
    assert (f"config error: {tmp_path / 'bad.yaml'}: filter colour of datacomp: scorer 'no_such_package.filters:score': "
            "cannot find module 'no_such_package.filters'") in proc.stdout + proc.stderr


def test_the_ci_report_judges_the_example_and_accounts_its_jobs():
    cfg = load(CI_CONFIG)
    plan = Plan(cfg, resolve(cfg))
    assert ("datacomp", "colour") in {(s, f) for s, f, _, _ in plan.quality_entries()}
    jobs = plan.all_jobs()
    colour = {"source": "datacomp", "which": "colour"}
    assert ("user_score", colour) in jobs and ("keep_extra", colour) in jobs
    assert not any(wc == colour for run in cfg["runs"] for _, wc in plan.run_jobs(run))
