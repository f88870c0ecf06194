"""Paper-scale sources as released: BLIP's JSON, DataComp's metadata folder and LAION's parquet
imported; method none for pre-filtered releases; per-source download options (DataComp's face
blurring) reaching img2dataset; released webdataset shards ingested, checked and mixed."""

import io
import json
import tarfile

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from conftest import REPO, raw_toy_source, snakemake
from oqvl import layout, mixture
from oqvl.config import ConfigError, validate
from oqvl.filter import keep
from oqvl.plan import Plan
from oqvl.raw import download, import_pairs, ingest
from oqvl.scale import resolve
from oqvl.shards import iter_samples, sample_caption, sample_uid, shard_paths
from test_workflow import paper_downloads


def raw(name):
    return yaml.safe_load((REPO / "config" / name).read_text())


def keep_main(tmp_path, *args):
    out, stats = tmp_path / "kept.parquet", tmp_path / "kept_stats.json"
    keep.main([*map(str, args), "--out", str(out), "--stats", str(stats)])
    return pd.read_parquet(out)["uid"].tolist(), json.loads(stats.read_text())


# ------------------------------------------------------------------------ pair lists as released
def test_blip_json_is_imported(tmp_path):
    # BLIP's ccs_filtered.json: one JSON array of {url, caption}; no uid, so uids are row numbers.
    release = tmp_path / "ccs_filtered.json"
    release.write_text(json.dumps([{"url": "http://x/1.jpg", "caption": "a cat"},
                                   {"caption": "no url here"},
                                   {"url": "http://x/3.jpg", "caption": None},
                                   {"url": "http://x/4.jpg", "caption": "a dog", "extra": 1}]))
    out = tmp_path / "pairs.parquet"
    import_pairs.main(["--source", "ccs", "--pair-list", str(release), "--format", "json",
                       "--url-col", "url", "--caption-col", "caption", "--out", str(out)])
    df = pd.read_parquet(out)
    assert list(df.columns) == ["url", "caption", "uid", "source"]
    assert df["uid"].tolist() == ["ccs-000000000", "ccs-000000002", "ccs-000000003"]
    assert df["caption"].tolist() == ["a cat", "", "a dog"] and set(df["source"]) == {"ccs"}
    manifest = json.loads((tmp_path / "pairs.manifest.json").read_text())
    assert manifest["counts"] == {"rows_in": 4, "pairs_out": 3, "dropped_no_url": 1, "files": 1}
    assert list(manifest["inputs"]) == [str(release)]


def datacomp_metadata(folder):
    """DataComp's metadata as download_upstream.py leaves it: parquet files of uid, url, text,
    face_bboxes and more."""
    folder.mkdir()
    pd.DataFrame({"uid": ["b1", "b2"], "url": ["http://x/b1.jpg", "http://x/b2.jpg"], "text": ["t b1", "t b2"],
                  "original_width": [640, 320], "face_bboxes": [[], [[0.1, 0.2, 0.3, 0.4]]]}
                 ).to_parquet(folder / "0001.parquet")
    pd.DataFrame({"uid": ["a1", "a2", "a3"], "url": ["http://x/a1.jpg", None, "http://x/a3.jpg"],
                  "text": ["t a1", "t a2", "t a3"], "original_width": [1, 2, 3],
                  "face_bboxes": [[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]], [], []]}
                 ).to_parquet(folder / "0000.parquet")
    (folder / "README.txt").write_text("not a parquet: ignored")
    return folder


def test_datacomp_metadata_folder_is_imported_with_its_face_boxes(tmp_path):
    release = datacomp_metadata(tmp_path / "medium")
    out = tmp_path / "pairs.parquet"
    import_pairs.main(["--source", "datacomp", "--pair-list", str(release), "--format", "parquet_dir",
                       "--url-col", "url", "--caption-col", "text", "--uid-col", "uid",
                       "--bbox-col", "face_bboxes", "--out", str(out)])
    df = pd.read_parquet(out)
    assert list(df.columns) == ["url", "caption", "uid", "source", "face_bboxes"]
    assert df["uid"].tolist() == ["a1", "a3", "b1", "b2"]  # files in name order, a2 had no URL
    assert df["caption"].tolist() == ["t a1", "t a3", "t b1", "t b2"]
    assert [len(b) for b in df["face_bboxes"]] == [2, 0, 0, 1]
    assert list(df["face_bboxes"][3][0]) == [0.1, 0.2, 0.3, 0.4]
    manifest = json.loads((tmp_path / "pairs.manifest.json").read_text())
    assert manifest["counts"] == {"rows_in": 5, "pairs_out": 4, "dropped_no_url": 1, "files": 2}
    assert sorted(manifest["inputs"]) == [str(release / "0000.parquet"), str(release / "0001.parquet")]


@pytest.mark.parametrize("case, fmt, match", [
    ("missing", "json", r"nope.json: pair list not found"),
    ("bad_json", "json", r"bad.json: not valid JSON"),
    ("not_array", "json", r"obj.json: expected a JSON array of objects, got dict"),
    ("no_field", "json", r"nourl.json: no field 'url' in any entry"),
    ("not_object", "json", r"mixed.json: entry 1 is str, not an object"),
    ("no_column", "parquet_dir", r"1.parquet: no column 'text'"),
    ("empty_dir", "parquet_dir", r"empty: no .parquet files in the folder"),
    ("dir_as_file", "parquet", r"medium: a folder; format parquet reads one file"),
])
def test_a_bad_release_is_one_line_naming_the_file(tmp_path, capsys, case, fmt, match):
    files = {"bad_json": ("bad.json", '[{"url": "u", "caption": "c"},'),
             "not_array": ("obj.json", '{"url": "u"}'),
             "no_field": ("nourl.json", '[{"URL": "u", "caption": "c"}]'),
             "not_object": ("mixed.json", '[{"url": "u", "caption": "c"}, "x"]')}
    if case in files:
        name, text = files[case]
        path = tmp_path / name
        path.write_text(text)
    elif case == "missing":
        path = tmp_path / "nope.json"
    elif case == "no_column":
        path = tmp_path / "medium"
        path.mkdir()
        pd.DataFrame({"url": ["u"], "text": ["c"]}).to_parquet(path / "0.parquet")
        pd.DataFrame({"url": ["u"], "caption": ["c"]}).to_parquet(path / "1.parquet")  # a second schema
    elif case == "empty_dir":
        path = tmp_path / "empty"
        path.mkdir()
    else:
        path = tmp_path / "medium"
        path.mkdir()
    caption = "text" if fmt == "parquet_dir" else "caption"
    with pytest.raises(SystemExit) as e:
        import_pairs.main(["--source", "s", "--pair-list", str(path), "--format", fmt, "--url-col", "url",
                           "--caption-col", caption, "--out", str(tmp_path / "pairs.parquet")])
    message = str(e.value)
    assert message.startswith("error: ") and "\n" not in message
    assert __import__("re").search(match, message), message
    assert not (tmp_path / "pairs.parquet").exists()


# ------------------------------------------------------------------------- the raw and filter rules
def test_method_none_keeps_every_downloaded_pair(tmp_path):
    src = raw_toy_source(tmp_path / "laion", "laion", 30, seed=3,
                         rates={"broken_empty": 0.1, "empty_caption": 0.1}, samples_per_shard=12)
    acc = json.loads((src / "accounting.json").read_text())
    kept, stats = keep_main(tmp_path, "--keep-all", "--shards", src / "shards")
    assert stats == {"method": "none", "pairs_in": 27, "kept": 27, "rejected": 0, "failed": 0}
    # what reached the shards is kept (an empty caption too: the release was filtered before);
    # what did not is the download's failures
    assert acc["samples_in_shards"] == len(kept) == 27 and acc["failures"] == 3
    shard_uids = {sample_uid(s) for s in iter_samples(shard_paths(src / "shards"))}
    assert set(kept) == shard_uids
    manifest = json.loads((tmp_path / "kept.manifest.json").read_text())
    assert manifest["counts"] == stats and manifest["work"] == {"amount": 27.0, "unit": "pairs"}


def test_the_paper_config_filters_the_prefiltered_releases_no_further():
    cfg = validate(raw("full.yaml"))
    plan = Plan(cfg, resolve(cfg))
    for source in ("ccs", "laion"):
        assert plan.keep_inputs(source) == {"shards": layout.shards(source)}
        assert [r for r, _ in plan.source_jobs(source, "filter")] == ["import_pairs", "download", "keep"]
    assert plan.keep_args("ccs", {"shards": "S"}) == "--keep-all --shards S"
    # a column the release lacks is no flag (an empty one would swallow the next)
    assert plan.import_args("ccs") == "--format json --url-col url --caption-col caption"
    assert plan.import_args("datacomp") == ("--format parquet_dir --url-col url --caption-col text"
                                            " --uid-col uid --bbox-col face_bboxes")
    assert set(plan.keep_inputs("datacomp")) == {"uid_list", "shards"}
    assert (cfg["sources"]["ccs"]["format"], cfg["sources"]["datacomp"]["format"],
            cfg["sources"]["laion"]["format"]) == ("json", "parquet_dir", "parquet")


def test_download_options_are_raw_with_the_source_own_over_them():
    cfg = validate(raw("full.yaml"))
    plan = Plan(cfg, resolve(cfg))
    ccs, datacomp = plan.download_options("ccs"), plan.download_options("datacomp")
    # CCS as the reference's docs/DATA_Filter.md; DataComp as its download_upstream.py
    assert {k: ccs[k] for k in ("image_size", "resize_mode", "resize_only_if_bigger", "skip_reencode",
                                "processes", "threads", "blur_faces")} == \
        {"image_size": 512, "resize_mode": "keep_ratio", "resize_only_if_bigger": True, "skip_reencode": True,
         "processes": 32, "threads": 128, "blur_faces": False}
    assert {k: datacomp[k] for k in ("image_size", "resize_mode", "resize_only_if_bigger", "skip_reencode",
                                     "processes", "threads", "blur_faces", "oom_shard_count",
                                     "samples_per_shard")} == \
        {"image_size": 512, "resize_mode": "keep_ratio_largest", "resize_only_if_bigger": True,
         "skip_reencode": False, "processes": 16, "threads": 128, "blur_faces": True, "oom_shard_count": 8,
         "samples_per_shard": 10000}
    assert cfg["sources"]["datacomp"]["bbox_col"] == "face_bboxes"
    assert plan.download_options("laion") == cfg["raw"]


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["sources"]["datacomp"]["download"].update(resize="x"),
     "sources.datacomp.download: unknown key resize (the keys are raw's)"),
    (lambda c: c["sources"]["datacomp"]["download"].update(threads=0),
     "sources.datacomp.download: threads: 0 is less than the minimum of 1"),
    (lambda c: c["sources"]["datacomp"].update(bbox_col=None),
     "sources.datacomp.download.blur_faces: needs sources.datacomp.bbox_col"),
    (lambda c: c["sources"]["datacomp"]["download"].update(skip_reencode=True),
     "sources.datacomp.download.blur_faces: needs skip_reencode false"),
    (lambda c: c["raw"].update(blur_faces=True), "raw.blur_faces: needs sources.ccs.bbox_col"),
    (lambda c: c["sources"]["ccs"].update(shards="data/x"), "unknown key sources.ccs.shards"),
    (lambda c: c["sources"]["ccs"].update(format="csv"), "sources.ccs.format: 'csv' is not one of"),
])
def test_bad_source_options_are_refused_by_key(mutate, message):
    cfg = raw("full.yaml")
    mutate(cfg)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


def noise_images(folder, n, size=64):
    folder.mkdir()
    rng = np.random.default_rng(0)
    images = []
    for i in range(n):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)  # texture a blur must change
        Image.fromarray(pixels).save(folder / f"{i}.png")
        images.append(pixels.astype(int))
    return images


def test_face_boxes_are_blurred_by_img2dataset_and_nothing_else(tmp_path):
    # DataComp's download blurs each image's face_bboxes (img2dataset's bbox_col): a real download
    # of file:// URLs, one image with a box in its middle, one with none.
    originals = noise_images(tmp_path / "img", 2)
    pairs = tmp_path / "pairs.parquet"
    pd.DataFrame({"url": [f"file://{tmp_path}/img/{i}.png" for i in range(2)], "caption": ["a", "b"],
                  "uid": ["boxed", "plain"], "source": ["datacomp"] * 2,
                  "face_bboxes": [[[0.25, 0.25, 0.75, 0.75]], []]}).to_parquet(pairs)
    cfg = validate(raw("full.yaml"))
    opts = {**Plan(cfg, resolve(cfg)).download_options("datacomp"), "processes": 1, "threads": 2,
            "encode_format": "png", "encode_quality": 1, "retries": 0}  # png: no JPEG loss outside
    out = tmp_path / "shards"
    download.main(["--pairs", str(pairs), "--out", str(out), "--options", json.dumps(opts),
                   "--accounting", str(tmp_path / "accounting.json")])
    acc = json.loads((tmp_path / "accounting.json").read_text())
    assert acc["pairs_in"] == acc["samples_in_shards"] == 2 and acc["failures"] == 0
    assert [p.name for p in out.glob("*.tar")] == ["00000000.tar"]  # oom_shard_count 8, DataComp's
    got = {sample_uid(s): np.asarray(Image.open(io.BytesIO(s["png"])).convert("RGB")).astype(int)
           for s in iter_samples(shard_paths(out))}
    boxed = np.abs(got["boxed"] - originals[0])
    assert boxed[16:48, 16:48].mean() > 20           # the box (pixels 16-48): blurred
    # far from the box (its 10% margin and the blur's kernel reach to pixel 9 and 55): untouched
    assert boxed[:8].max() <= 1 and boxed[57:].max() <= 1 and boxed[:, :8].max() <= 1
    assert np.abs(got["plain"] - originals[1]).max() <= 1  # no box, no blur
    meta = json.loads(next(s["json"] for s in iter_samples(shard_paths(out)) if sample_uid(s) == "boxed"))
    assert meta["face_bboxes"] == [[0.25, 0.25, 0.75, 0.75]]


def test_blurring_without_face_boxes_is_one_line(tmp_path):
    pairs = tmp_path / "pairs.parquet"
    pd.DataFrame({"url": ["file:///x.png"], "caption": ["a"], "uid": ["u"], "source": ["s"]}).to_parquet(pairs)
    opts = {**validate(raw("ci.yaml"))["raw"], "blur_faces": True}
    with pytest.raises(SystemExit, match=r"pairs.parquet: blur_faces needs a face_bboxes column"):
        download.main(["--pairs", str(pairs), "--out", str(tmp_path / "shards"), "--options", json.dumps(opts),
                       "--accounting", str(tmp_path / "accounting.json")])


# ------------------------------------------------------------------------------- released shards
def jpeg(seed):
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), seed * 20 % 256, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def write_release_shard(folder, shard, samples, listed=()):
    """One shard as img2dataset writes it: NNNNNNNN.tar of key.jpg/.txt/.json, NNNNNNNN.parquet of
    every sample's row, and NNNNNNNN_stats.json. `samples`: key -> {ext: bytes}; `listed`: keys the
    table calls downloaded that the tar lacks."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{shard:08d}"
    with tarfile.open(folder / f"{name}.tar", "w") as tf:
        for key, parts in samples.items():
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    keys = [*samples, *listed]
    pd.DataFrame({"url": [f"http://x/{k}.jpg" for k in keys], "caption": ["c"] * len(keys), "key": keys,
                  "status": ["success"] * len(keys), "error_message": [None] * len(keys),
                  "uid": keys}).to_parquet(folder / f"{name}.parquet")
    (folder / f"{name}_stats.json").write_text(json.dumps({"count": len(keys), "successes": len(keys)}))


def sample(key, caption="a photo", uid=None, **drop):
    parts = {"jpg": jpeg(int(key[-2:])), "txt": caption.encode(),
             "json": json.dumps({"uid": uid or f"uid-{key}", "key": key, "status": "success"}).encode()}
    return {k: v for k, v in parts.items() if k not in drop}


@pytest.fixture
def release(tmp_path):
    """Two released shards: 6 good samples and one of each fault, plus a uid given twice."""
    folder = tmp_path / "Open-Qwen2VL-Data" / "ccs_webdataset"
    write_release_shard(folder, 0, {
        "000000000": sample("000000000"), "000000001": sample("000000001"),
        "000000002": sample("000000002", json=True),            # no json: uid from the key
        "000000003": sample("000000003", txt=True),             # no caption
        "000000004": sample("000000004", jpg=True),             # no image
        "000000005": {**sample("000000005"), "jpg": b"not an image"},
        "000000006": sample("000000006", caption="  "),          # empty caption
    }, listed=["000000007"])                                     # in the table, not in the tar
    write_release_shard(folder, 1, {
        "000010000": sample("000010000"), "000010001": sample("000010001"),
        "000010002": sample("000010002", uid="uid-000000000"),   # the uid of shard 0's first
        "000010003": {**sample("000010003", jpg=True), "png": jpeg(3)},  # png is an image too
    })
    return folder


GOOD = {"uid-000000001", "000000002", "uid-000010000", "uid-000010001", "uid-000010003"}
REASONS = {"no_caption": 1, "no_image": 1, "undecodable": 1, "empty_caption": 1, "missing_from_tar": 1,
           "duplicate_uid": 2}


def test_released_shards_are_ingested_with_every_bad_sample_counted(release, tmp_path):
    samples, acc = tmp_path / "samples.parquet", tmp_path / "accounting.json"
    ingest.main(["--shards", str(release), "--revision", "abc123", "--samples", str(samples),
                 "--accounting", str(acc)])
    counts = json.loads(acc.read_text())
    assert counts == {"pairs_in": 12, "samples_in_shards": 5, "failures": 7, "failures_by_reason": REASONS,
                      "shards": 2, "revision": "abc123"}
    table = pd.read_parquet(samples)
    assert set(table.loc[table["status"] == "success", "uid"]) == GOOD and len(table) == 12
    assert table.loc[table["key"] == "000000003", "reason"].item() == "no_caption"
    manifest = json.loads((tmp_path / "accounting.manifest.json").read_text())
    assert manifest["stage"] == "ingest_shards" and manifest["counts"] == counts
    assert set(manifest["files"]) == {"samples.parquet", "accounting.json"}
    # the released tars are the inputs, each with its sha256 (hashed in the same read)
    from oqvl.io import sha256_file
    assert manifest["inputs"] == {str(t): sha256_file(t) for t in sorted(release.glob("*.tar"))}


def test_ingested_shards_are_kept_whole_and_mixed_as_any_source(release, tmp_path):
    samples, acc = tmp_path / "samples.parquet", tmp_path / "accounting.json"
    ingest.main(["--shards", str(release), "--samples", str(samples), "--accounting", str(acc)])
    kept, stats = keep_main(tmp_path, "--keep-all", "--samples", samples)
    assert set(kept) == GOOD and stats == {"method": "none", "pairs_in": 5, "kept": 5, "rejected": 0, "failed": 0}
    # a released uid list selects from the valid samples only
    (tmp_path / "uids.txt").write_text("uid-000000001\nuid-000000000\nuid-000000004\n")
    listed, stats = keep_main(tmp_path, "--uid-list", tmp_path / "uids.txt", "--samples", samples)
    assert listed == ["uid-000000001"] and stats["pairs_in"] == 5 and stats["rejected"] == 4
    keep_main(tmp_path, "--keep-all", "--samples", samples)
    counts = mixture.build_mixture([("ccs", release, tmp_path / "kept.parquet")], tmp_path / "mix", 2)
    assert counts == {"ccs": 5, "total": 5}
    mixed = list(iter_samples(shard_paths(tmp_path / "mix" / "shards")))
    assert {s["__key__"] for s in mixed} == GOOD and len(mixed) == 5
    assert all(("jpg" in s or "png" in s) and sample_caption(s) == "a photo" for s in mixed)


def test_a_missing_release_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: .*nowhere: released shards not found"):
        ingest.main(["--shards", str(tmp_path / "nowhere"), "--samples", str(tmp_path / "s.parquet"),
                     "--accounting", str(tmp_path / "a.json")])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "00000000.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(SystemExit, match=r"00000000.tar: not a readable tar"):
        ingest.main(["--shards", str(tmp_path / "bad"), "--samples", str(tmp_path / "s.parquet"),
                     "--accounting", str(tmp_path / "a.json")])


def released_layer():
    return yaml.safe_load((REPO / "config" / "released_data.yaml").read_text())


def layered(base, layer):
    from snakemake.utils import update_config  # the merge `--configfile A B` does
    update_config(base, layer)
    return base


def test_the_released_layer_trains_the_runs_on_ingested_shards():
    cfg = validate(layered(raw("full.yaml"), released_layer()))
    scale = resolve(cfg)
    assert scale.ingested == ("ccs_released", "datacomp_dfn_released", "datacomp_mlm_released")
    assert scale.imported == ("ccs", "datacomp", "laion") and scale.downloaded == scale.imported
    plan = Plan(cfg, scale)
    mix = plan.run_mixture(cfg["table4_run"])
    assert plan.mixture_parts(mix) == {
        "shards": ["data/Open-Qwen2VL-Data/ccs_webdataset",
                   "data/Open-Qwen2VL-Data/datacomp_medium_mlm_filter_su_85_union_dfn_webdataset"],
        "kept": [layout.kept("ccs_released"), layout.kept("datacomp_mlm_released")]}
    jobs = [r for r, _ in plan.run_jobs(cfg["table4_run"])]
    assert "ingest_shards" in jobs and not {"import_pairs", "download", "clip_score", "mlm_import"} & set(jobs)
    assert plan.keep_args("ccs_released", {"samples": "S"}) == "--keep-all --samples S"


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["filter"]["sources"]["ccs_released"].update(method="clip", threshold=0.3),
     "filter.sources.ccs_released: sources.ccs_released is released shards"),
    (lambda c: c["filter"]["mlm"].update(sources=["datacomp_mlm_released"]),
     "filter.mlm.sources: 'datacomp_mlm_released' is released shards"),
    (lambda c: c["sources"]["ccs_released"].update(url_col="url"), "unknown key sources.ccs_released.url_col"),
])
def test_released_shards_take_no_download_filter(mutate, message):
    cfg = layered(raw("full.yaml"), released_layer())
    mutate(cfg)
    with pytest.raises(ConfigError, match=f"^{message}"):
        validate(cfg)


def test_toy_scale_refuses_released_shards_without_mixed_inputs():
    cfg = raw("ci.yaml")
    cfg["sources"]["ccs"] = {"shards": "data/ccs_webdataset"}
    cfg["filter"]["sources"]["ccs"] = {"method": "none"}
    with pytest.raises(ConfigError, match=r"^sources.ccs.shards: scale toy generates its sources"):
        resolve(validate(cfg))


def test_paper_dag_with_the_released_layer_ingests_instead_of_downloading(tmp_path):
    cfg = paper_downloads(tmp_path)
    for src in released_layer()["sources"].values():
        (tmp_path / src["shards"]).mkdir(parents=True)
    (tmp_path / "released_data.yaml").write_text((REPO / "config" / "released_data.yaml").read_text())
    proc = snakemake(tmp_path, "-n", "-p", "results/table4.csv", "--configfile", str(cfg),
                     str(tmp_path / "released_data.yaml"))
    out = proc.stdout + proc.stderr
    assert "rule ingest_shards:" in out and "rule import_pairs:" not in out and "rule download:" not in out
    assert "--keep-all --samples results/raw/ccs_released/samples.parquet" in out
    assert "--part ccs_released data/Open-Qwen2VL-Data/ccs_webdataset" in out
    # full.yaml alone: the paper's route, CCS downloaded as the reference does, kept whole
    proc = snakemake(tmp_path, "-n", "-p", layout.kept("ccs"), layout.kept("datacomp"), configfile=cfg)
    out = proc.stdout + proc.stderr
    assert "--format json" in out and "--format parquet_dir" in out and "--bbox-col face_bboxes" in out
    assert "--keep-all --shards results/raw/ccs/shards" in out
    assert '"resize_mode":"keep_ratio_largest"' in out and '"blur_faces":true' in out


def test_a_toy_run_packs_a_mixture_of_ingested_shards(release, tmp_path):
    # The DAG from released shards: ingest_shards -> keep (none) -> mixture -> pack, for real.
    cfg = raw("ci.yaml")
    cfg["mixed_inputs"] = True
    cfg["sources"]["ccs_released"] = {"paper_id": 1, "shards": str(release), "revision": "abc123"}
    cfg["filter"]["sources"]["ccs_released"] = {"method": "none"}
    cfg["mixtures"]["released"] = {"sources": ["ccs_released"], "samples_per_shard": 2}
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    work = tmp_path / "work"
    work.mkdir()
    snakemake(work, "results/packed/released/stats.json", configfile=path)
    results = work / "results"
    acc = json.loads((results / "raw/ccs_released/accounting.json").read_text())
    assert acc["pairs_in"] == acc["samples_in_shards"] + acc["failures"] == 12 and acc["revision"] == "abc123"
    kept = json.loads((results / "filter/ccs_released/kept_stats.json").read_text())
    mix = json.loads((results / "mixtures/released/manifest.json").read_text())
    packed = json.loads((results / "packed/released/stats.json").read_text())
    assert kept["kept"] == mix["counts"]["ccs_released"] == packed["documents_in"] == len(GOOD)
    assert not (results / "raw/ccs_released/shards").exists()  # read where they lie, never copied


def test_a_toy_source_kept_whole_beside_clip_filtered_ones(tmp_path):
    # method none at toy scale: no CLIP scoring for it, judged by the quality report all the same
    cfg = raw("ci.yaml")
    cfg["filter"]["sources"]["laion"] = {"method": "none"}
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = snakemake(tmp_path, "-n", "-p", "results/filter/quality/report.md", configfile=path)
    out = proc.stdout + proc.stderr
    assert "--keep-all --shards results/raw/laion/shards" in out
    assert "--scores results/filter/ccs/clip_scores.parquet --failures results/filter/ccs/clip_failures.parquet" \
           " --fraction 0.9" in out
    assert "--entry laion none results/raw/laion/truth.parquet - results/filter/laion/kept.parquet" in out
    assert "oqvl.filter.clip_score --shards results/raw/ccs/shards" in out
    assert "oqvl.filter.clip_score --shards results/raw/laion/shards" not in out


@pytest.mark.slow
def test_a_toy_run_pretrains_on_ingested_shards(tmp_path):
    # img2dataset's own output is the released format: a toy source downloaded, then ingested as
    # released shards and pretrained on (toy CLIP tower, tokenizer, 16 steps on 2 processes).
    release = raw_toy_source(tmp_path / "release", "ccs", 60, seed=5, rates={"broken_empty": 0.05},
                             samples_per_shard=25)
    cfg = raw("ci.yaml")
    cfg["mixed_inputs"] = True
    cfg["sources"]["ccs_released"] = {"paper_id": 1, "shards": str(release / "shards")}
    cfg["filter"]["sources"]["ccs_released"] = {"method": "none"}
    cfg["mixtures"]["released"] = {"sources": ["ccs_released"], "samples_per_shard": 20}
    cfg["runs"]["released"] = {"mixture": "released"}
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    work = tmp_path / "work"
    work.mkdir()
    snakemake(work, "results/runs/released/seed0/pretrain/final/config.json", configfile=path)
    results = work / "results"
    acc = json.loads((results / "raw/ccs_released/accounting.json").read_text())
    assert acc["pairs_in"] == acc["samples_in_shards"] == 57 and acc["failures"] == 0  # 3 never downloaded
    packed = json.loads((results / "packed/released/stats.json").read_text())
    summary = json.loads((results / "runs/released/seed0/pretrain/summary.json").read_text())
    assert packed["documents_packed"] == 57
    assert summary["steps"] == cfg["train"]["pretrain"]["steps"] and summary["tokens"] > 0
