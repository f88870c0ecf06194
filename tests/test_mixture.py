"""The mixture stage: kept pairs of several real toy sources gathered into new shards."""

import hashlib
import io
import json
import math

import pandas as pd
import pytest
import webdataset as wds
from PIL import Image

from oqvl import mixture
from oqvl.raw import download, generate
from oqvl.shards import iter_samples, sample_meta, shard_paths

OPTIONS = {"image_size": 512, "resize_mode": "keep_ratio", "resize_only_if_bigger": True,
           "encode_format": "jpg", "encode_quality": 95, "samples_per_shard": 25, "processes": 1,
           "threads": 4, "timeout_s": 10, "retries": 0}
RATES = {"wrong_object": 0.1, "empty_caption": 0.05, "broken_empty": 0.05, "broken_not_image": 0.05}
PER_SHARD = 7


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two real toy sources (ccs 24 pairs, laion 20), downloaded, with kept lists."""
    root = tmp_path_factory.mktemp("mix")
    out = {}
    for name, n, seed in (("ccs", 24, 5), ("laion", 20, 6)):
        d = root / name
        generate.main(["--source", name, "--n-pairs", str(n), "--rates", json.dumps(RATES),
                       "--seed", str(seed), "--out", str(d)])
        download.main(["--pairs", str(d / "pairs.parquet"), "--out", str(d / "shards"),
                       "--options", json.dumps(OPTIONS), "--accounting", str(d / "accounting.json")])
        samples = {str(sample_meta(s)["uid"]): s for s in iter_samples(shard_paths(d / "shards"))}
        uids = list(samples)
        kept = [u for i, u in enumerate(uids) if i % 2 == 0 or i % 3 == 1][::-1]  # a real subset,
        assert 0 < len(kept) < len(uids)  # listed in another order than the shards'
        pd.DataFrame({"uid": kept}).to_parquet(d / "kept.parquet", index=False)
        pd.DataFrame({"uid": kept[: len(kept) // 2]}).to_parquet(d / "kept_small.parquet", index=False)
        out[name] = {"dir": d, "samples": samples, "kept": kept,
                     "failed": pd.read_parquet(d / "shards" / "failures.parquet")["uid"].tolist()}
    return out


def run_mixture(sources, out, kept_name="kept.parquet"):
    argv = []
    for name, s in sources.items():
        argv += ["--part", name, str(s["dir"] / "shards"), str(s["dir"] / kept_name)]
    mixture.main([*argv, "--out", str(out), "--samples-per-shard", str(PER_SHARD)])
    return json.loads((out / "manifest.json").read_text())


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def mixed(sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("ccs+laion")
    return out, run_mixture(sources, out)


def test_shards_hold_exactly_the_kept_pairs(sources, mixed):
    out, _ = mixed
    urls = [str(p) for p in sorted((out / "shards").glob("*.tar"))]
    total = sum(len(s["kept"]) for s in sources.values())
    assert len(urls) == math.ceil(total / PER_SHARD) > 1
    keys = []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        uid = sample["__key__"]
        meta = json.loads(sample["json"])
        assert meta["uid"] == uid  # sample key = uid
        src = sources[meta["source"]]
        orig = src["samples"][uid]
        assert sample["jpg"] == orig["jpg"]  # image bytes copied as they are
        assert sample["txt"] == orig["txt"] and sample["json"] == orig["json"]
        assert {k for k in sample if not k.startswith("__")} == {k for k in orig if not k.startswith("__")}
        keys.append(uid)
    assert len(keys) == len(set(keys)) == total
    assert set(keys) == {u for s in sources.values() for u in s["kept"]}
    # parts in order: every ccs sample before every laion one
    src_of = ["ccs" if k.startswith("ccs-") else "laion" for k in keys]
    assert src_of == sorted(src_of)
    with Image.open(io.BytesIO(next(iter_samples(urls[:1]))["jpg"])) as im:
        assert im.size == (64, 64)


def test_manifest_counts_and_hashes(sources, mixed):
    out, manifest = mixed
    assert manifest["stage"] == "mixture"
    assert manifest["work"] == {"amount": float(manifest["counts"]["total"]), "unit": "pairs"}
    assert manifest["counts"] == {"ccs": len(sources["ccs"]["kept"]),
                                  "laion": len(sources["laion"]["kept"]),
                                  "total": sum(len(s["kept"]) for s in sources.values())}
    files = sorted((out / "shards").glob("*.tar"))
    assert manifest["files"] == {f"shards/{p.name}": sha(p) for p in files}
    assert set(manifest["inputs"]) == {str(s["dir"] / "kept.parquet") for s in sources.values()}


def test_a_kept_uid_missing_from_the_shards_is_an_error(sources, tmp_path):
    ccs = sources["ccs"]
    bad = tmp_path / "kept.parquet"
    # a pair whose image failed to download is not in the shards and cannot be mixed
    pd.DataFrame({"uid": ccs["kept"][:3] + ccs["failed"][:1]}).to_parquet(bad, index=False)
    assert ccs["failed"]
    with pytest.raises(ValueError, match=r"4 kept uids but 3 found"):
        mixture.build_mixture([("ccs", ccs["dir"] / "shards", bad)], tmp_path / "out", PER_SHARD)


def test_a_uid_in_two_parts_is_an_error(sources, tmp_path):
    ccs = sources["ccs"]
    parts = [("a", ccs["dir"] / "shards", ccs["dir"] / "kept.parquet"),
             ("b", ccs["dir"] / "shards", ccs["dir"] / "kept_small.parquet")]
    with pytest.raises(ValueError, match="appears twice"):
        mixture.build_mixture(parts, tmp_path / "out", PER_SHARD)


def test_rerun_is_byte_identical_and_a_smaller_mixture_leaves_no_stale_shards(sources, mixed, tmp_path):
    first, manifest = mixed
    out = tmp_path / "again"
    assert run_mixture(sources, out)["files"] == manifest["files"]
    before = {p.name: sha(p) for p in (out / "shards").glob("*.tar")}
    assert before == {p.name: sha(p) for p in (first / "shards").glob("*.tar")}
    run_mixture(sources, out)  # into the same folder
    assert {p.name: sha(p) for p in (out / "shards").glob("*.tar")} == before

    small = run_mixture(sources, out, "kept_small.parquet")
    n_small = sum(len(s["kept"]) // 2 for s in sources.values())
    assert small["counts"]["total"] == n_small
    shards = sorted((out / "shards").glob("*.tar"))
    assert len(shards) == math.ceil(n_small / PER_SHARD) < len(before)
    assert sum(1 for _ in iter_samples(shards)) == n_small
    assert {f"shards/{p.name}" for p in shards} == set(small["files"])
    fresh = run_mixture(sources, tmp_path / "fresh", "kept_small.parquet")
    assert fresh["files"] == small["files"]  # same bytes as a build into an empty folder


def test_the_download_order_within_a_shard_does_not_change_the_mixture(sources, mixed, tmp_path):
    """img2dataset writes each shard in download-completion order: the mixture must not depend on it."""
    _, manifest = mixed
    parts = []
    for name, s in sources.items():
        shuffled = tmp_path / name / "shards"
        shuffled.mkdir(parents=True)
        for p in shard_paths(s["dir"] / "shards"):
            samples = list(iter_samples([p]))[::-1]  # the same shard, in reverse order
            with wds.TarWriter(str(shuffled / p.name)) as w:
                for smp in samples:
                    w.write({k: v for k, v in smp.items() if k not in ("__url__", "__local_path__")})
        parts += ["--part", name, str(shuffled), str(s["dir"] / "kept.parquet")]
    mixture.main([*parts, "--out", str(tmp_path / "out"), "--samples-per-shard", str(PER_SHARD)])
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["files"] == manifest["files"]
