"""Download a pair list into webdataset shards with img2dataset, and account for every pair.

    python -m oqvl.raw.download --pairs results/raw/ccs/pairs.parquet --out results/raw/ccs/shards

The same call serves both scales: toy pair lists hold file:// URLs, paper ones http(s) URLs.
OPTIONS are the config's raw section with the source's own `download` entries over it (DataComp:
its download script's resize mode and face blurring); blur_faces blurs the pair list's
face_bboxes (img2dataset's bbox_col).
Before img2dataset, pairs it must not fetch are refused (`screen`): a URL it cannot fetch, a
file:// URL outside the data roots (the pair list's folder and the raw section's file_roots), a
uid more than one pair has. After it, every pair is either a sample in a shard or a failure with
its reason, a name from oqvl.reasons, and the library's message (OUT/failures.parquet);
ACCOUNTING holds the counts and the check in = out + failures, and the job's manifest lies
beside it (accounting.manifest.json: a file inside OUT, a directory output, could not be declared
an output of its own).

A killed download resumes. img2dataset writes into WORK (default OUT.partial, on OUT's
filesystem), which is no output, so a rerun finds it: its finished shards are kept (img2dataset's
incremental mode skips them) and its unfinished ones removed and downloaded again. Only a
complete, accounted WORK is moved to OUT. SIGTERM (a wall-clock limit, scancel) stops the
download and its worker processes and exits non-zero, the finished shards left in WORK.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
import tarfile
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..io import sha256_file, write_json, write_parquet, write_text
from ..manifest import args_config, manifest_path, write_manifest
from ..reasons import check, from_download_message
from .import_pairs import BBOX


class AccountingError(RuntimeError):
    """Pairs went missing between the pair list and the shards."""


class Terminated(BaseException):
    """SIGTERM, raised in the main thread (a BaseException: no `except Exception` swallows it)."""


RESUME_KEY = "resume_key.txt"  # in WORK: what its shards were made from (not .json: img2dataset's)
SCREENED = "screened_pairs.parquet"  # in WORK: the pairs img2dataset is given, when some were refused
SHARD_FILE = re.compile(r"(\d+)(?:\.tar|\.parquet|_stats\.json)")  # img2dataset's files of a shard
SPEED_ONLY = ("processes", "threads")  # options that change how fast, not what is downloaded


def resume_key(pairs_sha256: str, opts: dict) -> str:
    options = {k: v for k, v in opts.items() if k not in SPEED_ONLY}
    return json.dumps({"pairs_sha256": pairs_sha256, "options": options}, sort_keys=True)


def shard_finished(work: Path, name: str) -> bool:
    """img2dataset writes a shard's stats file last, after closing its tar and parquet, and its
    incremental mode trusts any stats file; but it writes it in place, so a kill can cut it short."""
    try:
        json.loads((work / f"{name}_stats.json").read_text())
        pq.read_metadata(work / f"{name}.parquet")  # its footer: written on close
        return (work / f"{name}.tar").is_file()
    except (OSError, ValueError):  # missing or cut short (json's and arrow's errors are ValueErrors)
        return False


def prepare_work(work: Path, key: str) -> None:
    """Keep WORK's finished shards for img2dataset to skip, remove the files of any other shard
    (img2dataset then downloads it again); a WORK made from another pair list or other options
    is started over."""
    key_file = work / RESUME_KEY
    if key_file.is_file() and key_file.read_text() != key:
        print(f"{work}: made from another pair list or other options, starting over")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    for f in work.glob("*.tmp"):  # an atomic write (failures.parquet, the key) a kill cut short
        f.unlink()
    write_text(key_file, key)
    shards: dict[str, list[Path]] = {}
    for f in work.iterdir():
        if m := SHARD_FILE.fullmatch(f.name):
            shards.setdefault(m.group(1), []).append(f)
    unfinished = [name for name in sorted(shards) if not shard_finished(work, name)]
    for name in unfinished:
        for f in shards[name]:
            f.unlink()
    if shards:
        print(f"{work}: resuming, {len(shards) - len(unfinished)} finished shards kept, "
              f"{len(unfinished)} unfinished removed")


def move_into_place(work: Path, out: Path) -> None:
    # The key first: a kill between the two leaves a WORK without one, which a rerun resumes.
    (work / RESUME_KEY).unlink()
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(work, out)


def stop_children(timeout_s: float = 10) -> None:
    """End every child process still running: img2dataset's logger process outlives its pool (and
    would keep this one from exiting), and none may write into WORK once this process is gone."""
    children = multiprocessing.active_children()
    for p in children:
        p.terminate()
    for p in children:
        p.join(timeout_s)
        if p.is_alive():
            p.kill()
            p.join()


@contextmanager
def sigterm_raises():
    """SIGTERM raises Terminated in the main thread, which unwinds img2dataset: leaving its `with
    Pool` terminates the workers (a shard they were writing has no stats file: it is redone)."""
    def handler(signum, frame):
        signal.signal(signal.SIGTERM, lambda *_: None)  # a second SIGTERM must not cut the cleanup short
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except Terminated:
        stop_children()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def url_problem(url, roots: list[Path]) -> tuple[str, str] | None:
    """(reason, message) when img2dataset must not be given this URL, else None."""
    if not isinstance(url, str) or not url.strip():
        return "invalid_url", "no URL"
    try:
        parts = urlsplit(url)
    except ValueError as e:
        return "invalid_url", f"{url[:200]}: {e}"
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        return None if parts.hostname else ("invalid_url", f"{url[:200]}: no host")
    if scheme != "file":
        return "invalid_url", f"{url[:200]}: not an http, https or file URL"
    if parts.netloc not in ("", "localhost"):
        return "invalid_url", f"{url[:200]}: a file URL on another host"
    path = Path(os.path.realpath(url2pathname(unquote(parts.path))))  # links resolved: none leads out
    if not any(path.is_relative_to(root) for root in roots):
        return "outside_data_roots", f"{path} is outside the data roots {', '.join(map(str, roots))}"
    return None


def data_roots(pairs: Path, opts: dict) -> list[Path]:
    """Where file:// URLs may point: the pair list's folder and the raw section's file_roots."""
    return [Path(os.path.realpath(p)) for p in [pairs.parent, *opts.get("file_roots", [])]]


def screen(pairs: Path, roots: list[Path]) -> pd.DataFrame:
    """The pairs img2dataset must not be given, as failures (position in PAIRS, uid, url, status,
    reason, error_message): an invalid URL, a file:// URL outside `roots`, and every pair of a uid
    more than one pair has (a kept set must never name an ambiguous uid)."""
    try:
        table = pq.read_table(pairs, columns=["uid", "url"])
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{pairs}: not a pair list with uid and url columns ({e})") from None
    # In arrow, not Python: a paper-scale list has 10^8 pairs, nearly all http(s) with a host.
    counts = pc.value_counts(table["uid"])
    dup = pc.is_in(table["uid"], value_set=counts.field("values").filter(pc.greater(counts.field("counts"), 1)))
    plain = pc.fill_null(pc.match_substring_regex(table["url"], r"(?i)^https?://[^/?#\s]"), False)
    suspect = pc.indices_nonzero(pc.or_(dup, pc.invert(plain))).to_pylist()
    uids, urls = (table[c].take(pa.array(suspect, pa.int64())).to_pylist() for c in ("uid", "url"))
    dups = set(pc.indices_nonzero(dup).to_pylist())
    rows = []
    for i, uid, url in zip(suspect, uids, urls):
        problem = ("duplicate_uid", f"uid {uid} is given to more than one pair") if i in dups else url_problem(url, roots)
        if problem:
            rows.append({"position": i, "uid": uid, "url": url, "status": "failed",
                         "reason": check(problem[0]), "error_message": problem[1]})
    return pd.DataFrame(rows, columns=["position", "uid", "url", "status", "reason", "error_message"])


def screened_pairs(pairs: Path, refused: pd.DataFrame, work: Path) -> Path:
    """The pair list img2dataset reads: PAIRS itself, or, when pairs were refused, the others
    written into WORK in PAIRS' order (the shards are then what they would be without them)."""
    if refused.empty:
        return pairs
    table = pq.read_table(pairs)
    keep = np.ones(table.num_rows, bool)
    keep[refused["position"].to_numpy()] = False
    out = work / SCREENED
    pq.write_table(table.filter(pa.array(keep)), out)
    return out


@contextmanager
def screened_resizer():
    """img2dataset's download builds its Resizer from img2dataset.main's name: ours while it runs."""
    import img2dataset.main  # noqa: F401 (the package's `main` is the function: the module is sys.modules')

    from .resizer import ScreenedResizer

    i2d = sys.modules["img2dataset.main"]
    previous, i2d.Resizer = i2d.Resizer, ScreenedResizer
    try:
        yield
    finally:
        i2d.Resizer = previous


def run_img2dataset(pairs: Path, out: Path, opts: dict) -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # it would phone home on import
    from img2dataset import download

    blur = opts.get("blur_faces", False)
    with screened_resizer():
        download(
            url_list=str(pairs),
            input_format="parquet",
            url_col="url",
            caption_col="caption",
            save_additional_columns=["uid", "source"],
            output_format="webdataset",
            output_folder=str(out),
            image_size=opts["image_size"],
            resize_mode=opts["resize_mode"],
            resize_only_if_bigger=opts["resize_only_if_bigger"],
            skip_reencode=opts.get("skip_reencode", False),
            bbox_col=BBOX if blur else None,  # img2dataset blurs these boxes (and keeps them as a column)
            encode_format=opts["encode_format"],
            encode_quality=opts["encode_quality"],
            number_sample_per_shard=opts["samples_per_shard"],
            processes_count=opts["processes"],
            thread_count=opts["threads"],
            timeout=opts["timeout_s"],
            retries=opts["retries"],
            oom_shard_count=opts.get("oom_shard_count", 5),  # digits of a shard's name (img2dataset's default)
            distributor="multiprocessing",
            enable_wandb=False,
            incremental_mode="incremental",  # a rerun skips the shards with a stats file (prepare_work)
        )


def count_tar_samples(tar_path: Path) -> list[str]:
    """Keys of the samples in one webdataset shard (a sample = files sharing a key)."""
    keys = set()
    with tarfile.open(tar_path) as tf:
        for member in tf:
            if member.isfile():
                keys.add(member.name.split(".", 1)[0])
    return sorted(keys)


def account(pairs: Path, out: Path, refused: pd.DataFrame) -> dict:
    """Check that every pair of the list is a shard sample or a listed failure: refused by `screen`
    or failed in img2dataset (its message kept beside the reason)."""
    n_in = pq.ParquetFile(pairs).metadata.num_rows
    shard_rows = [pd.read_parquet(p) for p in sorted(out.glob("*.parquet")) if SHARD_FILE.fullmatch(p.name)]
    rows = pd.concat(shard_rows, ignore_index=True) if shard_rows else pd.DataFrame(
        columns=["uid", "url", "status", "error_message"])
    ok = rows[rows["status"] == "success"]
    failed = rows[rows["status"] != "success"].copy()
    failed["reason"] = [from_download_message(m) for m in failed["error_message"]]
    failed = pd.concat([refused.drop(columns="position"), failed], ignore_index=True)
    in_tars = sum(len(count_tar_samples(t)) for t in sorted(out.glob("*.tar")))
    counts = {
        "pairs_in": n_in,
        "samples_in_shards": in_tars,
        "failures": len(failed),
        "failures_by_reason": {k: int(v) for k, v in failed["reason"].value_counts().sort_index().items()},
        "shards": len(list(out.glob("*.tar"))),
    }
    write_parquet(failed[["uid", "url", "status", "reason", "error_message"]], out / "failures.parquet")
    missing = n_in - len(rows) - len(refused)
    if missing or len(ok) != in_tars:
        raise AccountingError(
            f"{pairs}: {n_in} pairs in, {len(refused)} refused and {len(rows)} rows reported by "
            f"img2dataset, {len(ok)} successes but {in_tars} samples in the shards of {out}")
    return counts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, help="working folder kept across reruns (default OUT.partial)")
    ap.add_argument("--options", required=True, help="JSON of the config's raw section")
    ap.add_argument("--accounting", type=Path, required=True)
    args = ap.parse_args(argv)
    opts = json.loads(args.options)
    args.work = work = args.work or args.out.with_name(args.out.name + ".partial")
    if work.resolve() == args.out.resolve():
        ap.error("--work must not be --out (Snakemake deletes the output before a rerun)")
    pairs_sha256 = sha256_file(args.pairs)
    prepare_work(work, resume_key(pairs_sha256, opts))
    try:
        if opts.get("blur_faces") and BBOX not in pq.ParquetFile(args.pairs).schema_arrow.names:
            raise ValueError(f"{args.pairs}: blur_faces needs a {BBOX} column (give the source's bbox_col)")
        refused = screen(args.pairs, data_roots(args.pairs, opts))
        given = screened_pairs(args.pairs, refused, work)
        with sigterm_raises():
            if len(refused) < pq.ParquetFile(args.pairs).metadata.num_rows:
                run_img2dataset(given, work, opts)
    except ValueError as e:
        sys.exit(f"error: {e}")
    except Terminated:
        sys.exit(f"terminated (SIGTERM): the finished shards stay in {work}, a rerun resumes them")
    counts = account(args.pairs, work, refused)
    (work / SCREENED).unlink(missing_ok=True)
    write_json(args.accounting, counts)
    # Hashed in WORK under their names in OUT: a kill before the move leaves WORK whole.
    shard_files = sorted(work.glob("*.tar")) + [work / "failures.parquet"]
    files = {args.out / f.name: sha256_file(f) for f in shard_files}
    files[args.accounting] = sha256_file(args.accounting)
    write_manifest(manifest_path(args.accounting), "raw", work=(counts["pairs_in"], "pairs"),
                   config={**args_config(args), "options": opts}, files=files, counts=counts,
                   inputs={str(args.pairs): pairs_sha256})
    move_into_place(work, args.out)
    print(f"{args.pairs}: {counts['pairs_in']} in = {counts['samples_in_shards']} in shards "
          f"+ {counts['failures']} failed {counts['failures_by_reason']}")


if __name__ == "__main__":
    main()
