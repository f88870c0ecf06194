"""The filter stage: CLIP scoring of real toy shards (with resume), keep rules, uid lists, quality."""

import io
import json
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
from conftest import toy_clip_checkpoint
from PIL import Image

from oqvl.filter import clip_score, keep, quality
from oqvl.filter.clip_model import TOY_MODEL, save_checkpoint
from oqvl.io import weights_identity
from oqvl.raw import download, generate
from oqvl.shards import ShardSink, iter_samples, sample_meta, shard_paths

OPTIONS = {"image_size": 512, "resize_mode": "keep_ratio", "resize_only_if_bigger": True,
           "encode_format": "jpg", "encode_quality": 95, "samples_per_shard": 25, "processes": 1,
           "threads": 4, "timeout_s": 10, "retries": 0}
RATES = {"empty_caption": 0.1, "wrong_object": 0.1, "generic_caption": 0.05,
         "broken_truncated": 0.05, "broken_not_image": 0.05}
N_PAIRS = 60


# ---------------------------------------------------------------------------------------------
# fixtures: 60 real toy pairs downloaded into 3 shards, a toy CLIP model, one full scoring run


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    out = tmp_path_factory.mktemp("raw") / "ccs"
    generate.main(["--source", "ccs", "--n-pairs", str(N_PAIRS), "--rates", json.dumps(RATES),
                   "--seed", "3", "--out", str(out)])
    download.main(["--pairs", str(out / "pairs.parquet"), "--out", str(out / "shards"),
                   "--options", json.dumps(OPTIONS), "--accounting", str(out / "accounting.json")])
    assert len(shard_paths(out / "shards")) == 3
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return toy_clip_checkpoint(tmp_path_factory.mktemp("clip"))


def parts_of(out_dir: Path, ckpt) -> Path:
    return clip_score.parts_dir(out_dir / "scores.parquet", clip_score.weights_key(TOY_MODEL, str(ckpt)))


def run_scoring(raw, ckpt, out_dir: Path, batch_size=16):
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = clip_score.score_source(raw / "shards", TOY_MODEL, str(ckpt), out_dir / "scores.parquet",
                                    out_dir / "failures.parquet", batch_size=batch_size)
    assert not parts_of(out_dir, ckpt).exists()  # a finished run leaves no parts
    return (stats, pd.read_parquet(out_dir / "scores.parquet"),
            pd.read_parquet(out_dir / "failures.parquet"))


@pytest.fixture(scope="module")
def scored(raw, ckpt, tmp_path_factory):
    return run_scoring(raw, ckpt, tmp_path_factory.mktemp("scored"))


def shard_sample_uids(shards: Path) -> list[str]:
    return [str(sample_meta(s)["uid"]) for s in iter_samples(shard_paths(shards))]


# ---------------------------------------------------------------------------------------------
# keep_by_score semantics


def test_threshold_keeps_scores_at_or_above_it():
    df = pd.DataFrame({"uid": list("abcde"), "score": [0.1, 0.25, 0.5, 0.2499, 0.9]})
    mask = keep.keep_by_score(df, threshold=0.25)
    assert mask.dtype == bool and mask.index.equals(df.index)
    assert df.loc[mask, "uid"].tolist() == ["b", "c", "e"]  # 0.25 itself is kept
    assert not keep.keep_by_score(df, threshold=0.95).any()
    assert keep.keep_by_score(df, threshold=-1.0).all()


def test_fraction_keeps_the_best_with_ties_by_uid():
    # 10 rows; 0.5 is shared by four uids, so the cut at 3 and at 5 falls inside a tie.
    df = pd.DataFrame({"uid": [f"u{i}" for i in [7, 3, 9, 1, 5, 0, 2, 8, 4, 6]],
                       "score": [0.5, 0.9, 0.5, 0.1, 0.5, 0.3, 0.5, 0.8, 0.2, 0.0]})
    kept = set(df.loc[keep.keep_by_score(df, fraction=0.3), "uid"])
    assert kept == {"u3", "u8", "u2"}  # 0.9, 0.8, then the lowest uid among the 0.5s
    kept5 = set(df.loc[keep.keep_by_score(df, fraction=0.5), "uid"])
    assert kept5 == {"u3", "u8", "u2", "u5", "u7"}
    # the kept set does not depend on the row order
    for seed in range(5):
        shuffled = df.sample(frac=1, random_state=seed)
        mask = keep.keep_by_score(shuffled, fraction=0.5)
        assert mask.index.equals(shuffled.index) and int(mask.sum()) == 5
        assert set(shuffled.loc[mask, "uid"]) == kept5
        shuffled = shuffled.reset_index(drop=True)
        assert set(shuffled.loc[keep.keep_by_score(shuffled, fraction=0.3), "uid"]) == kept


@pytest.mark.parametrize("fraction, n_kept", [(0.0, 0), (1.0, 7), (0.7, 5), (0.2, 1)])
def test_fraction_keeps_round_f_times_n(fraction, n_kept):
    df = pd.DataFrame({"uid": [f"u{i}" for i in range(7)], "score": np.linspace(0, 1, 7)})
    mask = keep.keep_by_score(df, fraction=fraction)
    assert int(mask.sum()) == n_kept == round(fraction * 7)
    # the best ones: the kept scores are all above the rejected ones
    if 0 < n_kept < 7:
        assert df.loc[mask, "score"].min() > df.loc[~mask, "score"].max()


def test_keep_by_score_argument_errors():
    df = pd.DataFrame({"uid": ["a"], "score": [0.5]})
    with pytest.raises(ValueError, match="exactly one"):
        keep.keep_by_score(df, threshold=0.1, fraction=0.5)
    with pytest.raises(ValueError, match="exactly one"):
        keep.keep_by_score(df)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"not in \[0, 1\]"):
            keep.keep_by_score(df, fraction=bad)


# ---------------------------------------------------------------------------------------------
# uid lists


def test_read_uid_list_formats(tmp_path):
    strings = tmp_path / "uids.npy"
    np.save(strings, np.array(["ccs-0000001", "ccs-0000002"]))
    assert keep.read_uid_list(strings) == {"ccs-0000001", "ccs-0000002"}
    as_bytes = tmp_path / "bytes.npy"
    np.save(as_bytes, np.array([b"x1", b"x2"]))
    assert keep.read_uid_list(as_bytes) == {"x1", "x2"}

    pairs = np.zeros(3, dtype=[("uid_a", "<u8"), ("uid_b", "<u8")])
    pairs["uid_a"] = [0, 0x0123456789ABCDEF, 2**64 - 1]
    pairs["uid_b"] = [1, 0xFEDCBA9876543210, 0]
    datacomp = tmp_path / "dfn.npy"
    np.save(datacomp, pairs)
    assert keep.read_uid_list(datacomp) == {
        "0" * 31 + "1",
        "0123456789abcdeffedcba9876543210",
        "f" * 16 + "0" * 16,
    }

    text = tmp_path / "uids.txt"
    text.write_text("a1\n\n  b2  \nc3")
    assert keep.read_uid_list(text) == {"a1", "b2", "c3"}

    floats = tmp_path / "floats.npy"
    np.save(floats, np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="unsupported uid dtype"):
        keep.read_uid_list(floats)


def test_uid_list_keeps_the_listed_uids_in_the_shards(raw, tmp_path):
    in_shards = shard_sample_uids(raw / "shards")
    failed = pd.read_parquet(raw / "shards" / "failures.parquet")["uid"].tolist()
    assert failed and not set(failed) & set(in_shards)
    listed = in_shards[::3] + failed[:2] + ["ccs-9999999"]  # some never made it into the shards
    expected = set(in_shards[::3])
    for path in (tmp_path / "list.npy", tmp_path / "list.txt"):
        if path.suffix == ".npy":
            np.save(path, np.array(listed))
        else:
            path.write_text("\n".join(listed) + "\n")
        out, stats = tmp_path / f"kept_{path.suffix[1:]}.parquet", tmp_path / "stats.json"
        keep.main(["--uid-list", str(path), "--shards", str(raw / "shards"), "--out", str(out),
                   "--stats", str(stats)])
        kept = pd.read_parquet(out)["uid"]
        assert kept.is_unique and set(kept) == expected
        s = json.loads(stats.read_text())
        assert s == {"method": "uid_list", "pairs_in": len(in_shards), "kept": len(expected),
                     "rejected": len(in_shards) - len(expected), "failed": 0}
        manifest = json.loads(out.with_name(out.stem + ".manifest.json").read_text())
        assert manifest["work"] == {"amount": float(len(in_shards)), "unit": "pairs"}
        assert list(manifest["inputs"]) == [str(path)]


def test_uid_list_of_datacomp_pairs_end_to_end(tmp_path):
    # keep reads only img2dataset's per-shard parquet, so a shard folder of hex uids is enough.
    shards = tmp_path / "shards"
    shards.mkdir()
    hexes = [f"{i:016x}{i * 7:016x}" for i in range(1, 7)]
    pd.DataFrame({"uid": hexes[:4], "status": ["success", "success", "failed_to_download", "success"]}
                 ).to_parquet(shards / "00000.parquet")
    pd.DataFrame({"uid": hexes[4:], "status": ["success", "success"]}).to_parquet(shards / "00001.parquet")
    pd.DataFrame({"uid": ["ignored"], "status": ["success"]}).to_parquet(shards / "failures.parquet")
    arr = np.zeros(4, dtype=[("a", "<u8"), ("b", "<u8")])
    arr["a"], arr["b"] = [1, 3, 5, 99], [7, 21, 35, 0]  # uids 1, 3 (failed), 5, and one not present
    np.save(tmp_path / "dfn.npy", arr)
    keep.main(["--uid-list", str(tmp_path / "dfn.npy"), "--shards", str(shards),
               "--out", str(tmp_path / "kept.parquet"), "--stats", str(tmp_path / "stats.json")])
    assert pd.read_parquet(tmp_path / "kept.parquet")["uid"].tolist() == [hexes[0], hexes[4]]
    assert json.loads((tmp_path / "stats.json").read_text())["pairs_in"] == 5


def test_missing_uid_list_names_the_file(raw, tmp_path):
    missing = tmp_path / "nowhere" / "dfn_uids.npy"
    with pytest.raises(SystemExit) as e:
        keep.main(["--uid-list", str(missing), "--shards", str(raw / "shards"),
                   "--out", str(tmp_path / "k.parquet"), "--stats", str(tmp_path / "s.json")])
    assert str(missing) in str(e.value.code) and "not found" in str(e.value.code)
    assert not (tmp_path / "k.parquet").exists()


# ---------------------------------------------------------------------------------------------
# CLIP scoring of real shards


def test_every_sample_is_scored_or_failed_with_its_reason(raw, scored):
    stats, scores, failures = scored
    truth = pd.read_parquet(raw / "truth.parquet")
    in_shards = shard_sample_uids(raw / "shards")
    assert len(in_shards) == len(set(in_shards)) == N_PAIRS - 6  # 3 + 3 broken images dropped
    assert scores["uid"].is_unique and failures["uid"].is_unique
    assert not set(scores["uid"]) & set(failures["uid"])
    assert sorted([*scores["uid"], *failures["uid"]]) == sorted(in_shards)
    empty = set(truth.loc[truth["corruption"] == "empty_caption", "uid"])
    assert len(empty) == 6 and set(failures["uid"]) == empty
    assert set(failures["reason"]) == {"empty_caption"}
    assert stats == {"scored": len(in_shards) - 6, "failed": 6, "failed_by_reason": {"empty_caption": 6}}
    assert scores["score"].between(-1 - 1e-5, 1 + 1e-5).all() and scores["score"].notna().all()
    assert scores["model"].nunique() == 1 and scores["config_hash"].nunique() == 1


def test_scores_are_deterministic(raw, ckpt, scored, tmp_path):
    _, scores, failures = scored
    _, again, again_f = run_scoring(raw, ckpt, tmp_path, batch_size=7)  # other batch boundaries
    pd.testing.assert_frame_equal(again_f, failures)
    pd.testing.assert_frame_equal(again.drop(columns="score"), scores.drop(columns="score"))
    np.testing.assert_allclose(again["score"], scores["score"], atol=1e-5, rtol=0)
    _, same, _ = run_scoring(raw, ckpt, tmp_path / "same")
    pd.testing.assert_frame_equal(same, scores)  # same batch size: identical bits


def test_crashed_run_resumes_without_redoing_finished_shards(raw, ckpt, scored, tmp_path, monkeypatch):
    _, scores, failures = scored
    paths = shard_paths(raw / "shards")
    real = clip_score.score_shard
    calls = []

    def crash_on_second(path, *args, **kw):
        calls.append(Path(path).name)
        if Path(path) == paths[1]:
            raise RuntimeError("simulated crash")
        return real(path, *args, **kw)

    monkeypatch.setattr(clip_score, "score_shard", crash_on_second)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_scoring(raw, ckpt, tmp_path)
    parts = parts_of(tmp_path, ckpt)
    assert sorted(p.name for p in parts.iterdir()) == ["00000.failed.parquet", "00000.scores.parquet"]
    assert not (tmp_path / "scores.parquet").exists()

    def refuse_first(path, *args, **kw):
        calls.append(Path(path).name)
        if Path(path) == paths[0]:
            raise AssertionError("the finished first shard was scored again")
        return real(path, *args, **kw)

    calls.clear()
    monkeypatch.setattr(clip_score, "score_shard", refuse_first)
    stats, resumed, resumed_f = run_scoring(raw, ckpt, tmp_path)
    assert calls == ["00001.tar", "00002.tar"]
    pd.testing.assert_frame_equal(resumed, scores)
    pd.testing.assert_frame_equal(resumed_f, failures)
    assert resumed["uid"].is_unique and stats["scored"] + stats["failed"] == N_PAIRS - 6
    assert not parts.exists()


def test_half_written_part_is_redone(raw, ckpt, scored, tmp_path, monkeypatch):
    # A crash between the two part writes leaves only the failures part (and maybe a .tmp):
    # that shard is not finished and must be scored again, not half-counted.
    _, scores, failures = scored
    paths = shard_paths(raw / "shards")
    parts = parts_of(tmp_path, ckpt)
    parts.mkdir(parents=True)
    failures.iloc[:0].to_parquet(parts / "00000.failed.parquet", index=False)  # wrong on purpose
    (parts / "00000.scores.parquet.tmp").write_bytes(b"partial")
    calls = []
    real = clip_score.score_shard
    monkeypatch.setattr(clip_score, "score_shard",
                        lambda path, *a, **k: calls.append(Path(path).name) or real(path, *a, **k))
    _, resumed, resumed_f = run_scoring(raw, ckpt, tmp_path)
    assert calls == [p.name for p in paths]
    # Parts scored with other weights are never reused.
    other = clip_score.parts_dir(tmp_path / "scores.parquet", clip_score.weights_key(TOY_MODEL, "other-weights"))
    assert other != parts
    pd.testing.assert_frame_equal(resumed, scores)
    pd.testing.assert_frame_equal(resumed_f, failures)
    assert not parts.exists()


def test_weights_retrained_under_the_same_path_start_over(raw, ckpt, scored, tmp_path, monkeypatch):
    # A crash leaves the first shard's scores; the model is then retrained under the same path.
    weights = tmp_path / "clip_model"
    shutil.copytree(ckpt, weights)
    paths = shard_paths(raw / "shards")
    real = clip_score.score_shard

    def crash_on_second(path, *args, **kw):
        if Path(path) == paths[1]:
            raise RuntimeError("simulated crash")
        return real(path, *args, **kw)

    monkeypatch.setattr(clip_score, "score_shard", crash_on_second)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_scoring(raw, weights, tmp_path / "a")
    stale = parts_of(tmp_path / "a", weights)
    assert (stale / "00000.scores.parquet").exists()

    torch.manual_seed(1)
    save_checkpoint(open_clip.create_model(TOY_MODEL), weights, {"model_name": TOY_MODEL})
    assert parts_of(tmp_path / "a", weights) != stale
    calls = []
    monkeypatch.setattr(clip_score, "score_shard",
                        lambda path, *a, **k: calls.append(Path(path).name) or real(path, *a, **k))
    _, scores, failures = run_scoring(raw, weights, tmp_path / "a")
    assert calls == [p.name for p in paths]  # the first shard too: its old part is not reused
    _, fresh, fresh_f = run_scoring(raw, weights, tmp_path / "b")
    pd.testing.assert_frame_equal(scores, fresh)
    pd.testing.assert_frame_equal(failures, fresh_f)
    old = scored[1]
    assert scores["config_hash"].iloc[0] != old["config_hash"].iloc[0]
    assert not np.allclose(scores["score"], old["score"], atol=1e-3)


def test_clip_score_cli_writes_stats_and_its_manifest(raw, ckpt, scored, tmp_path):
    stats, scores, failures = scored
    out = tmp_path / "clip_scores.parquet"
    clip_score.main(["--shards", str(raw / "shards"), "--model", TOY_MODEL, "--pretrained", str(ckpt),
                     "--batch-size", "16", "--device", "cpu", "--out", str(out),
                     "--failures", str(tmp_path / "clip_failures.parquet"), "--stats", str(tmp_path / "st.json")])
    assert json.loads((tmp_path / "st.json").read_text()) == stats
    pd.testing.assert_frame_equal(pd.read_parquet(out), scores)
    manifest = json.loads((tmp_path / "clip_scores.manifest.json").read_text())
    assert manifest["stage"] == "clip_score" and manifest["counts"] == stats
    assert manifest["work"] == {"amount": float(len(scores) + len(failures)), "unit": "pairs"}
    assert set(manifest["files"]) == {"clip_scores.parquet", "clip_failures.parquet", "st.json"}
    assert manifest["inputs"] == {str(ckpt): weights_identity(ckpt)}
    assert manifest["device"] == {"type": "cpu", "gpus": 0} and manifest["config"]["pretrained"] == str(ckpt)


def test_clip_training_writes_its_manifest(ckpt):
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["stage"] == "train_clip"
    assert manifest["work"] == {"amount": 2.0 * 16, "unit": "pairs"}  # steps x batch size
    assert set(manifest["files"]) == {"model.safetensors", "config.json", "train_log.jsonl"}


def test_undecodable_and_missing_images_are_failures(ckpt, tmp_path):
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(good, format="JPEG")
    good = good.getvalue()
    samples = [
        {"__key__": "k0", "jpg": good, "txt": b"a red square", "json": b'{"uid": "u-good"}'},
        {"__key__": "k1", "jpg": good[: len(good) // 2], "txt": b"a red square", "json": b'{"uid": "u-trunc"}'},
        {"__key__": "k2", "jpg": b"<html>404</html>", "txt": b"a red square", "json": b'{"uid": "u-html"}'},
        {"__key__": "k3", "txt": b"a red square", "json": b'{"uid": "u-noimg"}'},
        {"__key__": "k4", "jpg": good, "txt": b"   ", "json": b'{"uid": "u-blank"}'},
        {"__key__": "k5", "png": b"", "txt": b"", "json": b'{"uid": "u-both"}'},
        {"__key__": "u-nometa", "jpg": good, "txt": b"a red square"},
    ]
    with ShardSink(tmp_path / "shards", maxcount=4) as sink:
        for s in samples:
            sink.write(s)
    stats = clip_score.score_source(tmp_path / "shards", TOY_MODEL, str(ckpt), tmp_path / "s.parquet",
                                    tmp_path / "f.parquet", batch_size=4)
    scores = pd.read_parquet(tmp_path / "s.parquet")
    reasons = pd.read_parquet(tmp_path / "f.parquet").set_index("uid")["reason"].to_dict()
    assert sorted(scores["uid"]) == ["u-good", "u-nometa"]  # no json: the key is the uid
    assert reasons["u-trunc"] == reasons["u-html"] == "undecodable"
    assert reasons["u-both"] == "empty_file"  # the image is checked first
    assert reasons["u-noimg"] == "no_image"
    assert reasons["u-blank"] == "empty_caption"
    assert len(reasons) == 5 and stats["scored"] == 2 and stats["failed"] == 5


# ---------------------------------------------------------------------------------------------
# keep.main on scores, accounting


@pytest.mark.parametrize("rule", [["--fraction", "0.7"], ["--threshold", "0.0"], ["--fraction", "0"]])
def test_keep_accounting_from_scores(raw, scored, tmp_path, rule):
    _, scores, failures = scored
    d = tmp_path
    scores.to_parquet(d / "scores.parquet", index=False)
    failures.to_parquet(d / "failures.parquet", index=False)
    keep.main(["--scores", str(d / "scores.parquet"), "--failures", str(d / "failures.parquet"),
               *rule, "--out", str(d / "kept.parquet"), "--stats", str(d / "stats.json")])
    stats = json.loads((d / "stats.json").read_text())
    kept = pd.read_parquet(d / "kept.parquet")["uid"]
    assert stats["pairs_in"] == stats["kept"] + stats["rejected"] + stats["failed"]
    manifest = json.loads((d / "kept.manifest.json").read_text())
    assert manifest["stage"] == "keep" and manifest["counts"] == stats
    assert manifest["work"] == {"amount": float(stats["pairs_in"]), "unit": "pairs"}
    assert set(manifest["files"]) == {"kept.parquet", "stats.json"}
    assert set(manifest["inputs"]) == {str(d / "scores.parquet"), str(d / "failures.parquet")}
    assert stats["pairs_in"] == len(shard_sample_uids(raw / "shards"))
    assert stats["failed"] == len(failures) and stats["kept"] == len(kept) and kept.is_unique
    assert set(kept) <= set(scores["uid"])
    if rule[0] == "--fraction":
        assert stats["kept"] == round(float(rule[1]) * len(scores))
        assert stats["method"] == "fraction"
    else:
        assert set(kept) == set(scores.loc[scores["score"] >= 0.0, "uid"])
    if stats["kept"]:
        best = scores.set_index("uid")["score"]
        assert stats["min_kept_score"] == pytest.approx(best[kept].min())
        assert best[kept].min() >= best.drop(kept).max() if stats["rejected"] else True
    else:
        assert stats["min_kept_score"] is None


# ---------------------------------------------------------------------------------------------
# quality against the truth


def test_judge_on_a_hand_made_table():
    truth = pd.DataFrame([
        ("u0", "clean", True, True), ("u1", "clean", True, True), ("u2", "clean", True, True),
        ("u3", "wrong_attribute", False, True), ("u4", "wrong_attribute", False, True),
        ("u5", "other_caption", True, True),  # another image's caption that happens to be true
        ("u6", "empty_caption", False, True),
        ("u7", "broken_empty", True, False),  # true caption, no image: not usable
        ("u8", "broken_truncated", True, False),
        ("u9", "generic_caption", False, True),
    ], columns=["uid", "corruption", "caption_true", "image_ok"])
    kept = {"u0", "u1", "u3", "u5", "u8", "not-in-truth"}
    summary, by_kind = quality.judge(truth, kept)
    # usable: u0 u1 u2 u5; kept (from the table): u0 u1 u3 u5 u8; kept and usable: u0 u1 u5
    assert summary == {"pairs": 10, "usable_rate": 0.4, "kept": 5, "precision": 0.6, "recall": 0.75}
    expected = pd.DataFrame([
        ("clean", 3, 2, 0.6667), ("wrong_attribute", 2, 1, 0.5), ("generic_caption", 1, 0, 0.0),
        ("empty_caption", 1, 0, 0.0), ("other_caption", 1, 1, 1.0), ("broken_truncated", 1, 1, 1.0),
        ("broken_empty", 1, 0, 0.0),
    ], columns=["corruption", "pairs", "kept", "kept_rate"])
    pd.testing.assert_frame_equal(by_kind, expected)

    nothing, _ = quality.judge(truth, set())
    assert nothing["kept"] == 0 and nothing["precision"] == 0 and nothing["recall"] == 0


def test_quality_main_writes_the_report(raw, scored, tmp_path):
    _, scores, _ = scored
    scores_p, kept_p, listed_p = tmp_path / "scores.parquet", tmp_path / "kept.parquet", tmp_path / "l.parquet"
    scores.to_parquet(scores_p, index=False)
    kept = scores.loc[keep.keep_by_score(scores, fraction=0.5), "uid"]
    pd.DataFrame({"uid": kept}).to_parquet(kept_p, index=False)
    pd.DataFrame({"uid": scores["uid"].iloc[::2]}).to_parquet(listed_p, index=False)
    truth_p = raw / "truth.parquet"
    out = tmp_path / "quality"
    quality.main(["--entry", "ccs", "clip", str(truth_p), str(scores_p), str(kept_p),
                  "--entry", "ccs", "dfn", str(truth_p), "-", str(listed_p), "--out", str(out)])
    summary = pd.read_csv(out / "summary.csv")
    truth = pd.read_parquet(truth_p)
    expected, by_kind = quality.judge(truth, set(kept))
    row = summary[summary["filter"] == "clip"].iloc[0]
    for k, v in expected.items():
        assert row[k] == pytest.approx(v)
    assert summary["filter"].tolist() == ["clip", "dfn"] and (summary["pairs"] == N_PAIRS).all()
    by_corr = pd.read_csv(out / "by_corruption.csv")
    assert list(by_corr.columns) == ["source", "filter", "corruption", "pairs", "kept", "kept_rate"]
    clip_rows = by_corr[by_corr["filter"] == "clip"].reset_index(drop=True)
    pd.testing.assert_frame_equal(clip_rows[["corruption", "pairs", "kept", "kept_rate"]], by_kind,
                                  check_dtype=False)
    assert set(by_corr["corruption"]) == set(truth["corruption"])
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["hist_ccs_clip.png"]  # no histogram for the score-less uid list
    assert (out / "hist_ccs_clip.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out / "hist_ccs_clip.png") as im:
        assert im.size[0] > 100 and im.size[1] > 100
    report = (out / "report.md").read_text()
    assert "![hist_ccs_clip](hist_ccs_clip.png)" in report
    assert "precision" in report and "| clip" in report and "dfn" in report
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "filter_quality"
    assert manifest["work"] == {"amount": 2.0 * N_PAIRS, "unit": "pairs"}  # two entries, one truth table each
    assert set(manifest["files"]) == {"summary.csv", "by_corruption.csv", "report.md", "hist_ccs_clip.png"}
    assert set(manifest["inputs"]) == {str(p) for p in (truth_p, scores_p, kept_p, listed_p)}


def test_a_filter_with_no_scored_pair_still_has_its_histogram(tmp_path):
    # a borderline toy MLM-Filter may answer without numbers: the report's files stay the same
    import numpy as np
    import pandas as pd

    from oqvl.filter.quality import histogram

    truth = pd.DataFrame({"uid": ["a", "b"], "corruption": ["clean", "generic_caption"]})
    scores = pd.DataFrame({"uid": ["a", "b"], "score": [np.nan, np.nan]})
    out = tmp_path / "hist_x_mlm.png"
    histogram(truth, scores, set(), "mlm scores, x", out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
