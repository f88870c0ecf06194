"""The raw stage: pair lists -> img2dataset -> webdataset shards, every pair accounted for."""

import json

import pandas as pd
import pytest
import webdataset as wds

from oqvl.manifest import manifest_path
from oqvl.raw import download, generate, import_pairs
from oqvl.world.corrupt import IMAGE_KINDS

OPTIONS = {"image_size": 512, "resize_mode": "keep_ratio", "resize_only_if_bigger": True,
           "encode_format": "jpg", "encode_quality": 95, "samples_per_shard": 40, "processes": 1,
           "threads": 4, "timeout_s": 10, "retries": 0}
RATES = {"wrong_attribute": 0.1, "generic_caption": 0.1, "empty_caption": 0.05,
         "broken_truncated": 0.05, "broken_empty": 0.05, "broken_not_image": 0.05}


@pytest.fixture(scope="module")
def raw_source(tmp_path_factory):
    out = tmp_path_factory.mktemp("raw") / "laion"
    generate.main(["--source", "laion", "--n-pairs", "100", "--rates", json.dumps(RATES),
                   "--seed", "1", "--out", str(out)])
    download.main(["--pairs", str(out / "pairs.parquet"), "--out", str(out / "shards"),
                   "--options", json.dumps(OPTIONS), "--accounting", str(out / "accounting.json")])
    return out


def test_in_equals_out_plus_failures(raw_source):
    acc = json.loads((raw_source / "accounting.json").read_text())
    assert acc["pairs_in"] == 100
    assert acc["samples_in_shards"] + acc["failures"] == acc["pairs_in"]
    assert sum(acc["failures_by_reason"].values()) == acc["failures"]
    assert acc["shards"] == 3  # 100 pairs at 40 per shard


def test_failures_are_exactly_the_broken_images(raw_source):
    truth = pd.read_parquet(raw_source / "truth.parquet")
    broken = set(truth.loc[truth["corruption"].isin(IMAGE_KINDS), "uid"])
    failures = pd.read_parquet(raw_source / "shards" / "failures.parquet")
    assert set(failures["uid"]) == broken and len(broken) == 15
    want = {"broken_truncated": "undecodable", "broken_empty": "empty_file", "broken_not_image": "undecodable"}
    kind = truth.set_index("uid")["corruption"]
    assert (failures["reason"] == failures["uid"].map(kind).map(want)).all()
    assert failures["error_message"].str.len().gt(0).all()  # the library's words kept beside the reason


def test_shards_read_back_with_webdataset(raw_source):
    pairs = pd.read_parquet(raw_source / "pairs.parquet").set_index("uid")
    urls = sorted(str(p) for p in (raw_source / "shards").glob("*.tar"))
    n = 0
    for sample in wds.WebDataset(urls, shardshuffle=False).decode("pil"):
        meta = sample["json"]
        assert sample["txt"] == pairs.loc[meta["uid"], "caption"]
        assert meta["source"] == "laion"
        assert sample["jpg"].size == (64, 64)  # smaller than 512: not resized
        n += 1
    assert n == 85


def test_manifest_lists_shards_with_hashes(raw_source):
    # beside accounting.json: a file inside shards/ (a directory output) cannot be declared
    path = raw_source / "accounting.manifest.json"
    assert manifest_path(raw_source / "accounting.json") == path
    manifest = json.loads(path.read_text())
    assert manifest["stage"] == "raw" and manifest["work"] == {"amount": 100.0, "unit": "pairs"}
    assert set(manifest["files"]) == {"shards/00000.tar", "shards/00001.tar", "shards/00002.tar",
                                      "shards/failures.parquet", "accounting.json"}
    assert all(len(h) == 64 for h in manifest["files"].values())
    assert manifest["counts"] == json.loads((raw_source / "accounting.json").read_text())
    assert manifest["config"]["options"] == OPTIONS
    assert list(manifest["inputs"]) == [str(raw_source / "pairs.parquet")]


def test_generate_writes_its_manifest_beside_the_pair_list(raw_source):
    manifest = json.loads((raw_source / "pairs.manifest.json").read_text())
    assert manifest["stage"] == "generate_pairs" and manifest["work"] == {"amount": 100.0, "unit": "pairs"}
    assert set(manifest["files"]) == {"pairs.parquet", "truth.parquet"}
    assert sum(manifest["counts"]["by_corruption"].values()) == manifest["counts"]["pairs"] == 100
    assert manifest["config"]["n_pairs"] == 100 and manifest["device"] == {"type": "cpu", "gpus": 0}


def test_generated_pair_list_has_the_release_columns(raw_source):
    pairs = pd.read_parquet(raw_source / "pairs.parquet")
    assert list(pairs.columns) == ["url", "caption", "uid", "source"]
    assert pairs["url"].str.startswith("file://").all() and pairs["uid"].is_unique


def test_accounting_catches_lost_pairs(raw_source, tmp_path):
    # A pair list with one more row than img2dataset saw must not pass as complete.
    pairs = pd.read_parquet(raw_source / "pairs.parquet")
    extra = pd.concat([pairs, pairs.iloc[:1].assign(uid="laion-extra")])
    bad = tmp_path / "pairs.parquet"
    extra.to_parquet(bad)
    with pytest.raises(download.AccountingError, match="101 pairs in, 0 refused"):
        download.account(bad, raw_source / "shards", download.screen(bad, [raw_source.resolve()]))


def test_import_pairs_normalises_a_release(tmp_path):
    release = tmp_path / "medium.parquet"
    pd.DataFrame({"uid": ["a1", "b2", "c3"], "url": ["http://x/1.jpg", None, "http://x/3.jpg"],
                  "text": ["a cat", "a dog", None]}).to_parquet(release)
    out = tmp_path / "pairs.parquet"
    import_pairs.main(["--source", "datacomp", "--pair-list", str(release), "--url-col", "url",
                       "--caption-col", "text", "--uid-col", "uid", "--out", str(out)])
    manifest = json.loads((tmp_path / "pairs.manifest.json").read_text())
    assert manifest["stage"] == "import_pairs" and manifest["work"] == {"amount": 2.0, "unit": "pairs"}
    assert manifest["counts"] == {"rows_in": 3, "pairs_out": 2, "dropped_no_url": 1, "files": 1}
    assert set(manifest["files"]) == {"pairs.parquet"} and list(manifest["inputs"]) == [str(release)]
    df = pd.read_parquet(out)
    assert list(df.columns) == ["url", "caption", "uid", "source"]
    assert df["uid"].tolist() == ["a1", "c3"] and df["caption"].tolist() == ["a cat", ""]


def test_import_pairs_errors_name_the_file(tmp_path):
    release = tmp_path / "r.parquet"
    pd.DataFrame({"URL": ["u"], "caption": ["c"]}).to_parquet(release)
    with pytest.raises(ValueError, match=r"r.parquet: no column 'url'"):
        import_pairs.import_pairs("x", release, "url", "caption", None, tmp_path / "o.parquet")
    with pytest.raises(FileNotFoundError, match="missing.parquet: pair list not found"):
        import_pairs.import_pairs("x", tmp_path / "missing.parquet", "url", "caption", None,
                                  tmp_path / "o.parquet")
