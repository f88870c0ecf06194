"""MLM-Filter: score parsing, the toy truth score, threshold and union semantics, and scoring that
survives a crash mid-run without duplicated or lost uids (in process and through the CLI)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
from conftest import raw_toy_source
from PIL import Image, ImageFile
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from oqvl.filter import keep, mlm_filter
from oqvl.filter.clip_model import TOY_MODEL, save_checkpoint
from oqvl.filter.mlm_filter import fact_score, parse_score, score_source
from oqvl.model.tokenizer import build_qwen2_tokenizer
from oqvl.shards import ShardSink, iter_samples, sample_caption, sample_meta, shard_paths
from oqvl.world.source import WorldConfig

RATES = {"empty_caption": 0.1, "generic_caption": 0.1, "wrong_attribute": 0.1, "broken_truncated": 0.05}


# ------------------------------------------------------------------------------------ parsing

@pytest.mark.parametrize("text, expected", [
    ("85", (85.0, "ok")),
    ("  85\n", (85.0, "ok")),
    ("0", (0.0, "ok")),
    ("100", (100.0, "ok")),
    ("Score: 85/100", (85.0, "ok")),
    ("The answer is 72.\nThe caption names both objects.", (72.0, "ok")),
    ("85.6", (86.0, "ok")),
    ("85.5", (86.0, "ok")),
    ("eighty-five", (85.0, "ok")),
    ("Eighty five.", (85.0, "ok")),
    ("seventy", (70.0, "ok")),
    ("one hundred", (100.0, "ok")),
    ("zero", (0.0, "ok")),
    ("nine", (9.0, "ok")),
    ("150", (None, "out_of_range")),
    ("-3", (None, "out_of_range")),
    ("100.7", (None, "out_of_range")),
    ("", (None, "empty")),
    ("   \n", (None, "empty")),
    (None, (None, "empty")),
    ("good caption", (None, "unparsable")),
    ("<|im_end|>", (None, "unparsable")),
])
def test_parse_score(text, expected):
    assert parse_score(text) == expected


def test_prompt_names_the_metric_and_holds_the_caption():
    p = mlm_filter.prompt("a red circle", "semantic_understanding")
    assert p.startswith("Text Caption: a red circle\n") and "semantic understanding" in p
    with pytest.raises(ValueError, match="unknown MLM-Filter metric 'clip'"):
        mlm_filter.prompt("x", "clip")


# ---------------------------------------------------------------------------------- toy truth

STYLE = {"mention_size": False, "mention_position": False}


def obj(colour, shape, cell="top left", size="small"):
    return {"colour": colour, "shape": shape, "cell": cell, "size": size}


def test_fact_score_is_the_share_of_true_facts():
    scene = {"objects": [obj("red", "circle"), obj("blue", "square", "top right")], "glyph": None}
    assert fact_score(scene, scene, STYLE) == 100
    wrong_colour = {"objects": [obj("green", "circle"), obj("blue", "square")], "glyph": None}
    assert fact_score(scene, wrong_colour, STYLE) == 50
    added = {"objects": [*scene["objects"], obj("red", "cross", "bottom left")], "glyph": None}
    assert fact_score(scene, added, STYLE) == 67
    left_out = {"objects": scene["objects"][:1], "glyph": None}
    assert fact_score(scene, left_out, STYLE) == 50
    assert fact_score(scene, None, STYLE) == 0  # generic or empty caption: no fact of the image
    # a stated position is a fact too
    moved = {"objects": [obj("red", "circle", "bottom right"), obj("blue", "square", "top right")], "glyph": None}
    assert fact_score(scene, moved, STYLE) == 100
    assert fact_score(scene, moved, {"mention_size": False, "mention_position": True}) == 50


def test_seed_scores_follow_the_corruption_kinds():
    df = mlm_filter.seed_conversations(300, 0, WorldConfig(), "image_text_matching")
    by_kind = df.groupby("corruption")["score"]
    assert (by_kind.get_group("clean") == 100).all()
    for kind in ("empty_caption", "generic_caption"):
        assert (by_kind.get_group(kind) == 0).all()
    for kind in ("wrong_attribute", "wrong_object", "wrong_count"):
        assert (by_kind.get_group(kind) < 100).all()
    conv = json.loads(df["conversations"].iloc[0])
    assert conv[0]["value"].startswith("<image>\nText Caption: ") and conv[1]["value"] == str(df["score"].iloc[0])
    assert len(conv) == 4 and "<image>" not in conv[2]["value"]  # the caption turn comes after the score


# ---------------------------------------------------------------------- threshold and union

def test_threshold_keeps_at_or_above_and_never_a_missing_score():
    scores = pd.DataFrame({"uid": list("abcde"), "score": [85.0, 84.0, np.nan, 100.0, 0.0]})
    assert keep.keep_by_score(scores, threshold=85).tolist() == [True, False, False, True, False]
    # a fraction ranks the scored pairs only: 4 of 5 rows keeps the 4 scored ones, never the NaN
    assert keep.keep_by_score(scores, fraction=0.8).tolist() == [True, True, False, True, True]
    assert keep.keep_by_score(scores, fraction=1.0).tolist() == [True, True, False, True, True]


def test_keep_counts_pairs_without_a_score(tmp_path):
    pd.DataFrame({"uid": ["a", "b", "c"], "score": [90.0, np.nan, 10.0]}).to_parquet(tmp_path / "s.parquet")
    pd.DataFrame({"uid": ["d"], "reason": ["undecodable"]}).to_parquet(tmp_path / "f.parquet")
    keep.main(["--scores", str(tmp_path / "s.parquet"), "--failures", str(tmp_path / "f.parquet"),
               "--threshold", "85", "--out", str(tmp_path / "k.parquet"), "--stats", str(tmp_path / "k.json")])
    stats = json.loads((tmp_path / "k.json").read_text())
    assert pd.read_parquet(tmp_path / "k.parquet")["uid"].tolist() == ["a"]
    assert (stats["pairs_in"], stats["kept"], stats["rejected"], stats["failed"], stats["no_score"]) == (4, 1, 2, 1, 1)
    manifest = json.loads((tmp_path / "k.manifest.json").read_text())
    assert manifest["stage"] == "keep" and manifest["work"] == {"amount": 4.0, "unit": "pairs"}


def test_keep_judges_only_the_pairs_the_shards_hold(tmp_path):
    # imported scores of a run over another download: x and y were never downloaded here, c failed to
    shards = tmp_path / "shards"
    shards.mkdir()
    pd.DataFrame({"uid": ["a", "b", "c", "d", "e"],
                  "status": ["success", "success", "failed_to_download", "success", "success"]}
                 ).to_parquet(shards / "00000.parquet")  # e: downloaded here, never scored there
    pd.DataFrame({"uid": ["a", "b", "c", "x"], "score": [90.0, 10.0, 95.0, 99.0]}).to_parquet(tmp_path / "s.parquet")
    pd.DataFrame({"uid": ["d", "y"], "reason": ["undecodable"] * 2}).to_parquet(tmp_path / "f.parquet")
    keep.main(["--scores", str(tmp_path / "s.parquet"), "--failures", str(tmp_path / "f.parquet"),
               "--threshold", "85", "--shards", str(shards), "--out", str(tmp_path / "k.parquet"),
               "--stats", str(tmp_path / "k.json")])
    stats = json.loads((tmp_path / "k.json").read_text())
    assert pd.read_parquet(tmp_path / "k.parquet")["uid"].tolist() == ["a"]
    assert (stats["pairs_in"], stats["kept"], stats["rejected"], stats["failed"], stats["scored_absent"]) == \
        (4, 1, 2, 1, 3)
    assert stats["not_scored"] == 1 and stats["no_score"] == 1
    # the union with the source's own filter then holds only uids of its shards
    pd.DataFrame({"uid": ["b", "d"]}).to_parquet(tmp_path / "dfn.parquet")
    keep.main(["--union", str(tmp_path / "dfn.parquet"), str(tmp_path / "k.parquet"),
               "--out", str(tmp_path / "u.parquet"), "--stats", str(tmp_path / "u.json")])
    assert set(pd.read_parquet(tmp_path / "u.parquet")["uid"]) == {"a", "b", "d"} <= set(keep.shard_uids(shards))


def test_union_keeps_what_either_set_keeps(tmp_path):
    pd.DataFrame({"uid": ["u1", "u2", "u3"]}).to_parquet(tmp_path / "a.parquet")
    pd.DataFrame({"uid": ["u3", "u4"]}).to_parquet(tmp_path / "b.parquet")
    keep.main(["--union", str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet"),
               "--out", str(tmp_path / "u.parquet"), "--stats", str(tmp_path / "u.json")])
    assert pd.read_parquet(tmp_path / "u.parquet")["uid"].tolist() == ["u1", "u2", "u3", "u4"]
    stats = json.loads((tmp_path / "u.json").read_text())
    assert (stats["kept_a"], stats["kept_b"], stats["both"], stats["only_a"], stats["only_b"], stats["kept"]) == \
        (3, 2, 1, 2, 1, 4)
    manifest = json.loads((tmp_path / "u.manifest.json").read_text())
    assert manifest["work"] == {"amount": 4.0, "unit": "pairs"}
    assert set(manifest["inputs"]) == {str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")}


def test_union_names_a_missing_kept_set(tmp_path):
    pd.DataFrame({"uid": ["u1"]}).to_parquet(tmp_path / "a.parquet")
    with pytest.raises(SystemExit, match=r"nope.parquet: kept set not found"):
        keep.main(["--union", str(tmp_path / "a.parquet"), str(tmp_path / "nope.parquet"),
                   "--out", str(tmp_path / "u.parquet"), "--stats", str(tmp_path / "u.json")])


# ------------------------------------------------------------------------- scoring and resume

@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    out = raw_toy_source(tmp_path_factory.mktemp("mlm_raw") / "datacomp", "datacomp", 60, 4, RATES)
    assert len(shard_paths(out / "shards")) == 3
    return out


def shard_uids(shards) -> list[str]:
    return [str(sample_meta(s)["uid"]) for s in iter_samples(shard_paths(shards))]


def fake_model(log: list, crash_after_calls: int | None = None):
    """A stand-in scorer: answers from the caption alone (empty -> "", generic words -> text)."""
    def score(images, captions):
        if crash_after_calls is not None and len(log) >= crash_after_calls:
            raise RuntimeError("killed")
        log.append(len(captions))
        return ["" if not c else (f"{len(c)}" if " a " in f" {c} " else "not sure") for c in captions]
    return score


def test_every_pair_is_scored_or_failed(raw, tmp_path):
    calls = []
    stats = score_source(raw / "shards", fake_model(calls), {"model": "fake"}, tmp_path / "s.parquet",
                         tmp_path / "f.parquet", batch_size=8, chunk=10)
    scores, fails = pd.read_parquet(tmp_path / "s.parquet"), pd.read_parquet(tmp_path / "f.parquet")
    assert sorted([*scores["uid"], *fails["uid"]]) == sorted(shard_uids(raw / "shards"))
    truth = pd.read_parquet(raw / "truth.parquet").set_index("uid")
    assert fails.empty  # img2dataset already set the broken images aside (test below for the rest)
    by_status = scores.set_index("uid")["status"]
    assert (by_status[truth.loc[by_status.index, "corruption"] == "empty_caption"] == "empty").all()
    assert set(by_status) <= set(mlm_filter.STATUSES) and (by_status == "unparsable").any()
    assert scores.loc[scores["status"] != "ok", "score"].isna().all()  # never 0 or 100
    assert stats["scored"] + stats["no_score"] + stats["failed"] == len(shard_uids(raw / "shards"))
    assert not any(tmp_path.glob("s.parquet.parts-*"))


def test_crash_mid_scoring_resumes_without_duplicates_or_losses(raw, tmp_path):
    calls = []
    with pytest.raises(RuntimeError, match="killed"):
        score_source(raw / "shards", fake_model(calls, crash_after_calls=4), {"model": "fake"},
                     tmp_path / "s.parquet", tmp_path / "f.parquet", batch_size=4, chunk=10)
    parts = next(tmp_path.glob("s.parquet.parts-*"))
    kept_over = sum(len(pd.read_parquet(p)) for p in parts.glob("*.parquet"))
    n = len(shard_uids(raw / "shards"))
    assert 0 < kept_over < n
    resumed = []
    score_source(raw / "shards", fake_model(resumed), {"model": "fake"}, tmp_path / "s.parquet",
                 tmp_path / "f.parquet", batch_size=4, chunk=10)
    out = pd.concat([pd.read_parquet(tmp_path / "s.parquet"), pd.read_parquet(tmp_path / "f.parquet")])
    assert not out["uid"].duplicated().any()
    assert sorted(out["uid"]) == sorted(shard_uids(raw / "shards"))
    # only the pairs no chunk held were scored again
    assert 0 < sum(resumed) < n - kept_over + 4  # the rest, plus at most the batch the crash lost
    whole = tmp_path / "whole"
    whole.mkdir()
    score_source(raw / "shards", fake_model([]), {"model": "fake"}, whole / "s.parquet", whole / "f.parquet",
                 batch_size=4, chunk=10)
    a = pd.read_parquet(tmp_path / "s.parquet").sort_values("uid").reset_index(drop=True)
    b = pd.read_parquet(whole / "s.parquet").sort_values("uid").reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)


def test_undecodable_images_are_failures_and_empty_captions_are_scored(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)  # lmms-eval, if imported, sets it
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(good, format="JPEG")
    good = good.getvalue()
    with ShardSink(tmp_path / "shards", maxcount=10) as sink:
        sink.write({"__key__": "k0", "jpg": good, "txt": b"a red square", "json": b'{"uid": "u-good"}'})
        sink.write({"__key__": "k1", "jpg": good[: len(good) // 2], "txt": b"a red square", "json": b'{"uid": "u-trunc"}'})
        sink.write({"__key__": "k2", "jpg": good, "txt": b"", "json": b'{"uid": "u-empty"}'})
    score_source(tmp_path / "shards", fake_model([]), {"model": "fake"}, tmp_path / "s.parquet",
                 tmp_path / "f.parquet", batch_size=2, chunk=2)
    scores = pd.read_parquet(tmp_path / "s.parquet").set_index("uid")
    fails = pd.read_parquet(tmp_path / "f.parquet").set_index("uid")["reason"].to_dict()
    assert sorted(scores.index) == ["u-empty", "u-good"] and scores.loc["u-empty", "status"] == "empty"
    assert list(fails) == ["u-trunc"] and fails["u-trunc"] == "undecodable"


def test_other_settings_start_over(raw, tmp_path):
    with pytest.raises(RuntimeError):
        score_source(raw / "shards", fake_model([], crash_after_calls=2), {"model": "fake", "metric": "a"},
                     tmp_path / "s.parquet", tmp_path / "f.parquet", batch_size=4, chunk=4)
    calls = []
    score_source(raw / "shards", fake_model(calls), {"model": "fake", "metric": "b"},
                 tmp_path / "s.parquet", tmp_path / "f.parquet", batch_size=4, chunk=4)
    assert sum(calls) == len(shard_uids(raw / "shards"))  # nothing reused from the other metric's chunks


def test_import_reads_the_official_outputs(tmp_path):
    d = tmp_path / "scores"
    d.mkdir()
    pd.DataFrame({"uid": ["a", "b"], "semantic_understanding_score": ["88", "x"], "url": ["u", "v"]}).to_parquet(
        d / "00000000_semantic_understanding.parquet")
    pd.DataFrame({"uid": ["c"], "semantic_understanding_score": ["101"]}).to_parquet(
        d / "00000001_semantic_understanding.parquet")
    mlm_filter.main(["import", "--scores-dir", str(d), "--metric", "semantic_understanding",
                     "--out", str(tmp_path / "s.parquet"), "--failures", str(tmp_path / "f.parquet"),
                     "--stats", str(tmp_path / "st.json")])
    s = pd.read_parquet(tmp_path / "s.parquet").set_index("uid")
    assert s.loc["a", "score"] == 88 and s.loc["b", "status"] == "unparsable" and s.loc["c", "status"] == "out_of_range"
    manifest = json.loads((tmp_path / "s.manifest.json").read_text())
    assert manifest["stage"] == "mlm_import" and manifest["work"] == {"amount": 3.0, "unit": "pairs"}
    assert set(manifest["files"]) == {"s.parquet", "f.parquet", "st.json"} and len(manifest["inputs"]) == 2
    with pytest.raises(SystemExit, match=r"missing columns \['image_text_matching_score'\]"):
        mlm_filter.main(["import", "--scores-dir", str(d), "--metric", "image_text_matching",
                         "--out", str(tmp_path / "s2.parquet"), "--failures", str(tmp_path / "f2.parquet"),
                         "--stats", str(tmp_path / "st2.json")])


# ------------------------------------------------------------ the real model through the CLI

@pytest.fixture(scope="module")
def toy_model(tmp_path_factory):
    """An untrained toy MLM-Filter made by the `seed` command (its answers are noise: fine here)."""
    root = tmp_path_factory.mktemp("mlm_model")
    build_qwen2_tokenizer(root / "tok", vocab_size=8192)
    torch.manual_seed(0)
    save_checkpoint(open_clip.create_model(TOY_MODEL), root / "clip", {"model_name": TOY_MODEL})
    mlm_filter.main(["seed", "--out", str(root / "m"), "--n", "20", "--metric", "image_text_matching",
                     "--vision-weights", str(root / "clip"), "--tokenizer", str(root / "tok")])
    assert len(pd.read_parquet(root / "m" / "seed.parquet")) == 20
    manifest = json.loads((root / "m" / "seed.manifest.json").read_text())
    assert manifest["stage"] == "mlm_filter_seed" and manifest["work"] == {"amount": 20.0, "unit": "pairs"}
    assert {"seed.parquet", "seed_stats.json", "init/config.json", "init/model.safetensors"} <= set(manifest["files"])
    return root / "m" / "init"


def score_cmd(raw, model, out):
    return [sys.executable, "-m", "oqvl.filter.mlm_filter", "score", "--shards", str(raw / "shards"),
            "--model", str(model), "--metric", "image_text_matching", "--batch-size", "8",
            "--chunk", "8", "--max-new-tokens", "2", "--out", str(out / "s.parquet"),
            "--failures", str(out / "f.parquet"), "--stats", str(out / "st.json")]


def test_cli_killed_mid_run_resumes(raw, toy_model, tmp_path):
    cmd = score_cmd(raw, toy_model, tmp_path)
    env = {**os.environ, mlm_filter.FAULT_ENV: "3"}
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert killed.returncode == 17, killed.stderr[-2000:]
    assert not (tmp_path / "s.parquet").exists()
    parts = next(tmp_path.glob("s.parquet.parts-*"))
    first = pd.concat([pd.read_parquet(p) for p in parts.glob("*.parquet")])
    assert len(first) == 20  # three chunks: 8 + 8 + the first shard's last 4
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    out = pd.concat([pd.read_parquet(tmp_path / "s.parquet"), pd.read_parquet(tmp_path / "f.parquet")])
    assert sorted(out["uid"]) == sorted(shard_uids(raw / "shards")) and not out["uid"].duplicated().any()
    s = pd.read_parquet(tmp_path / "s.parquet").set_index("uid")
    # the chunks written before the kill are kept as they were
    pd.testing.assert_series_equal(s.loc[first.loc[first["text"].notna(), "uid"], "text"],
                                   first.loc[first["text"].notna()].set_index("uid")["text"])
    stats = json.loads((tmp_path / "st.json").read_text())
    assert sum(stats["by_status"].values()) == len(s)
    manifest = json.loads((tmp_path / "s.manifest.json").read_text())
    assert manifest["stage"] == "mlm_score" and manifest["counts"] == stats
    assert manifest["work"] == {"amount": float(len(out)), "unit": "pairs"}
    assert manifest["device"] == {"type": "cpu", "gpus": 0}
    assert set(manifest["files"]) == {"s.parquet", "f.parquet", "st.json"}


def test_cli_model_retrained_under_the_same_path_starts_over(raw, toy_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(toy_model, model)
    env = {**os.environ, mlm_filter.FAULT_ENV: "1"}
    assert subprocess.run(score_cmd(raw, model, tmp_path), env=env, capture_output=True).returncode == 17
    stale = next(tmp_path.glob("s.parquet.parts-*"))
    # Other weights of the same size and mtime: a size-and-mtime key would take them for the old ones.
    weights = model / "model.safetensors"
    stat = weights.stat()
    with safe_open(weights, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(weights)
    name = next(k for k, v in tensors.items() if v.is_floating_point() and v.numel() > 1)
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, weights, metadata)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights.stat().st_size == stat.st_size
    done = subprocess.run(score_cmd(raw, model, tmp_path), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    # A resumed run ends by removing its parts folder: the stale one is still there, as it was.
    assert stale.is_dir() and len(list(stale.glob("*.parquet"))) == 1
    key = pd.read_parquet(tmp_path / "s.parquet")["config_hash"].unique().tolist()
    assert len(key) == 1 and stale.name != f"s.parquet.parts-{key[0]}"


def test_captions_reach_the_prompt(raw):
    caption = next(sample_caption(s) for s in iter_samples(shard_paths(raw / "shards")) if sample_caption(s))
    assert f"Text Caption: {caption}\n" in mlm_filter.prompt(caption, "image_text_matching")


def test_quality_report_takes_a_filter_without_any_score(raw, tmp_path):
    """An MLM-Filter whose answers held no number (all NaN) is judged; its histogram says so."""
    from oqvl.filter import quality

    uids = shard_uids(raw / "shards")
    pd.DataFrame({"uid": uids, "score": [np.nan] * len(uids)}).to_parquet(tmp_path / "s.parquet")
    pd.DataFrame({"uid": pd.Series(dtype=str)}).to_parquet(tmp_path / "k.parquet")
    quality.main(["--entry", "datacomp", "mlm", str(raw / "truth.parquet"), str(tmp_path / "s.parquet"),
                  str(tmp_path / "k.parquet"), "--out", str(tmp_path / "q")])
    summary = pd.read_csv(tmp_path / "q" / "summary.csv")
    assert summary.loc[0, "kept"] == 0 and summary.loc[0, "recall"] == 0
    assert (tmp_path / "q" / "hist_datacomp_mlm.png").read_bytes()[:4] == b"\x89PNG"
