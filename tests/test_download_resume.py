"""A download killed by SIGTERM (a SLURM wall-clock limit) resumes: the rerun fetches no URL of a
shard finished before the kill, redoes the shard it was writing, and ends with the shards of an
uninterrupted run. The images are served over HTTP on 127.0.0.1, slowly, with every request counted."""

import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import psutil
import pytest
from conftest import REPO
from test_raw import OPTIONS, RATES

from oqvl.io import sha256_file
from oqvl.raw import download, generate

N_PAIRS, PER_SHARD, DELAY_S = 20, 4, 0.05  # 5 shards, one request at a time (a pool worker does 5)
OPTS = {**OPTIONS, "samples_per_shard": PER_SHARD, "threads": 1}


class ImageServer:
    """A folder over HTTP on 127.0.0.1: `delay_s` before each response, requests counted by path;
    the response to path `hold` waits until `released` is set."""

    def __init__(self, root: Path):
        self.requests: Counter = Counter()
        self.delay_s = DELAY_S
        self.hold, self.released = None, threading.Event()
        self.lock, server = threading.Lock(), self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self):
                with server.lock:
                    server.requests[self.path] += 1
                time.sleep(server.delay_s)
                if self.path == server.hold:
                    server.released.wait(60)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.httpd.handle_error = lambda *args: None  # a client killed mid-response
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def counts(self) -> Counter:
        with self.lock:
            return Counter(self.requests)


def start_download(pairs: Path, out: Path) -> subprocess.Popen:
    src = os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": src,
           "NO_PROXY": "*", "no_proxy": "*"}  # urllib must not send 127.0.0.1 to a proxy
    cmd = [sys.executable, "-m", "oqvl.raw.download", "--pairs", str(pairs), "--out", str(out),
           "--options", json.dumps(OPTS), "--accounting", str(out.parent / "accounting.json")]
    with open(out.parent / f"{out.parent.name}.log", "ab") as log:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def log_tail(out: Path) -> str:
    return (out.parent / f"{out.parent.name}.log").read_text()[-3000:]


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)
    return value


def finished_shards(work: Path) -> set[str]:
    """Shards whose img2dataset stats file (written after the shard's tar and parquet) reads whole."""
    done = set()
    for stats in work.glob("*_stats.json"):
        try:
            json.loads(stats.read_text())
            done.add(stats.name.split("_")[0])
        except (OSError, ValueError):  # being written this instant
            pass
    return done


def running(procs: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for p in procs:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def tar_members(shards: Path) -> dict[str, dict[str, bytes]]:
    """Every shard's files (image, caption, json) by name, whatever the tar headers' mtimes."""
    out = {}
    for tar in sorted(shards.glob("*.tar")):
        with tarfile.open(tar) as tf:
            out[tar.name] = {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}
    return out


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    generate.main(["--source", "laion", "--n-pairs", str(N_PAIRS), "--rates", json.dumps(RATES),
                   "--seed", "1", "--out", str(root / "toy")])
    server = ImageServer(root / "toy" / "images")
    procs = []
    try:
        yield run_interrupted_and_resumed(root, server, procs)
    finally:
        for proc in procs:  # a failed run's download: SIGTERM, so that it ends its workers too
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=60)
        server.httpd.shutdown()


def run_interrupted_and_resumed(root: Path, server: ImageServer, procs: list) -> dict:
    pairs = pd.read_parquet(root / "toy" / "pairs.parquet")
    paths = [f"/{u.rsplit('/', 1)[1]}" for u in pairs["url"]]
    pairs["url"] = [server.url + p for p in paths]
    pairs.to_parquet(root / "pairs.parquet")

    # An uninterrupted run, the reference (here in-process, without delay: only its result matters).
    server.delay_s = 0
    ref = root / "uninterrupted" / "shards"
    download.main(["--pairs", str(root / "pairs.parquet"), "--out", str(ref),
                   "--options", json.dumps(OPTS), "--accounting", str(ref.parent / "accounting.json")])
    server.delay_s = DELAY_S
    server.requests.clear()

    # The same download, killed with shard 0 finished and shard 1 half-written: the response to
    # shard 1's last URL is held back until the kill (pairs are sharded in order, one at a time).
    server.hold = paths[2 * PER_SHARD - 1]
    out = root / "resumed" / "shards"
    out.parent.mkdir()
    work = out.with_name("shards.partial")
    proc = start_download(root / "pairs.parquet", out)
    procs.append(proc)
    wait_for(lambda: server.requests[server.hold] or proc.poll() is not None, 120,
             f"shard 1's last request:\n{log_tail(out)}")
    assert proc.poll() is None, log_tail(out)
    children = psutil.Process(proc.pid).children(recursive=True)
    finished_at_kill = finished_shards(work)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    returncode = proc.wait(timeout=60)
    exit_s = time.monotonic() - t0
    server.hold = None
    server.released.set()
    wait_for(lambda: not running(children), 30, "the download's child processes to end")
    first = server.counts()
    finished_at_exit = finished_shards(work)
    urls_finished = {name: pd.read_parquet(work / f"{name}.parquet")["url"].tolist()
                     for name in finished_at_kill}

    proc = start_download(root / "pairs.parquet", out)
    procs.append(proc)
    assert proc.wait(timeout=240) == 0, log_tail(out)
    second = server.counts() - first
    return {"server": server, "out": out, "ref": ref, "work": work, "returncode": returncode,
            "exit_s": exit_s, "children": children, "finished_at_kill": finished_at_kill,
            "finished_at_exit": finished_at_exit, "urls_finished": urls_finished, "first": first,
            "second": second}


def test_sigterm_exits_promptly_nonzero_and_leaves_no_process(resumed):
    assert resumed["returncode"] != 0
    assert resumed["exit_s"] < 10, resumed["exit_s"]
    assert resumed["children"]  # img2dataset's pool worker and logger process at least
    assert not running(resumed["children"])
    assert "terminated (SIGTERM)" in log_tail(resumed["out"])


def test_rerun_fetches_no_url_of_a_shard_finished_before_the_kill(resumed):
    urls = [u for shard in resumed["urls_finished"].values() for u in shard]
    assert len(urls) == len(resumed["finished_at_kill"]) * PER_SHARD
    paths = [u.removeprefix(resumed["server"].url) for u in urls]
    assert all(resumed["first"][p] == 1 for p in paths)
    assert not any(resumed["second"][p] for p in paths)


def test_rerun_redoes_every_unfinished_shard(resumed):
    # The rerun fetches every URL of a shard without a whole stats file at the exit, among them
    # those the killed run had fetched for the shard it was writing.
    shards = resumed["out"]
    unfinished = {t.stem for t in shards.glob("*.tar")} - resumed["finished_at_exit"]
    assert resumed["finished_at_kill"] == resumed["finished_at_exit"] == {"00000"}
    assert len(unfinished) == N_PAIRS // PER_SHARD - 1
    server = resumed["server"]
    for name in unfinished:
        for url in pd.read_parquet(shards / f"{name}.parquet")["url"]:
            assert resumed["second"][url.removeprefix(server.url)] == 1
    refetched = {p for p in resumed["second"] if resumed["first"][p]}
    assert len(refetched) == PER_SHARD  # shard 1's, half-written when killed


def test_resumed_shards_equal_an_uninterrupted_run(resumed):
    got, want = tar_members(resumed["out"]), tar_members(resumed["ref"])
    assert len(want) == N_PAIRS // PER_SHARD and got == want  # keys, captions, image bytes, json
    cols = ["uid", "url", "status", "reason"]
    assert pd.read_parquet(resumed["out"] / "failures.parquet")[cols].equals(
        pd.read_parquet(resumed["ref"] / "failures.parquet")[cols])


def test_resumed_accounting_and_manifest(resumed):
    acc = json.loads((resumed["out"].parent / "accounting.json").read_text())
    assert acc == json.loads((resumed["ref"].parent / "accounting.json").read_text())
    assert acc["pairs_in"] == N_PAIRS == acc["samples_in_shards"] + acc["failures"]
    assert acc["failures"] > 0  # the toy world's broken images
    manifest = json.loads((resumed["out"].parent / "accounting.manifest.json").read_text())
    files = {f"shards/{t.name}" for t in resumed["out"].glob("*.tar")} | {"shards/failures.parquet",
                                                                         "accounting.json"}
    assert set(manifest["files"]) == files  # hashed in the working dir, named as moved
    assert all(sha256_file(resumed["out"].parent / f) == h for f, h in manifest["files"].items())


def test_working_dir_is_gone_after_success(resumed):
    assert not resumed["work"].exists() and not resumed["ref"].with_name("shards.partial").exists()
    assert not list(resumed["out"].glob("_tmp")) and not (resumed["out"] / download.RESUME_KEY).exists()


def write_shard(work: Path, name: str, stats: str | None, parquet: bytes | None):
    (work / f"{name}.tar").write_bytes(b"\0" * 1024)
    if parquet is not None:
        (work / f"{name}.parquet").write_bytes(parquet)
    if stats is not None:
        (work / f"{name}_stats.json").write_text(stats)


def test_prepare_work_keeps_finished_shards_only(tmp_path):
    work = tmp_path / "shards.partial"
    work.mkdir()
    pd.DataFrame({"uid": ["a"]}).to_parquet(tmp_path / "p.parquet")
    whole = (tmp_path / "p.parquet").read_bytes()
    write_shard(work, "00000", '{"count": 1}', whole)        # finished
    write_shard(work, "00001", None, whole[:20])              # killed while writing: no stats
    write_shard(work, "00002", '{"count"', whole)             # killed while writing its stats
    write_shard(work, "00003", '{"count": 1}', whole[:-10])   # a parquet cut short
    (work / "failures.parquet").write_bytes(whole)
    (work / "failures.parquet.tmp").write_bytes(b"")
    download.prepare_work(work, "key")
    assert sorted(f.name for f in work.iterdir()) == [
        "00000.parquet", "00000.tar", "00000_stats.json", "failures.parquet", download.RESUME_KEY]


def test_prepare_work_starts_over_for_other_options(tmp_path):
    work = tmp_path / "shards.partial"
    download.prepare_work(work, download.resume_key("abc", OPTS))
    pd.DataFrame({"uid": ["a"]}).to_parquet(work / "00000.parquet")
    write_shard(work, "00000", '{"count": 1}', None)
    # Other processes or threads download the same shards: the work is kept ...
    download.prepare_work(work, download.resume_key("abc", {**OPTS, "processes": 8, "threads": 64}))
    assert (work / "00000_stats.json").exists()
    # ... another image size or pair list would make other ones: started over.
    download.prepare_work(work, download.resume_key("abc", {**OPTS, "image_size": 256}))
    assert sorted(f.name for f in work.iterdir()) == [download.RESUME_KEY]
