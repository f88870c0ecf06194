"""The report as a person sees it: pages rendered in headless Chromium (Debian's `chromium`),
driven over the DevTools protocol, screenshots checked for the table."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import websocket
from conftest import REPO, snakemake
from PIL import Image
from test_report import CONFIG, bench, effective_config, eval_file, world  # noqa: F401  (world is a fixture)

from oqvl.plan import job_files
from oqvl.report import html as html_page
from oqvl.report import tables

WIDTH, HEIGHT = 1400, 900


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if path is None:
        pytest.fail("no Chromium on PATH: these tests need Debian's package (apt-get install chromium)")
    return path


class Browser:
    """Headless Chromium on a loopback DevTools port; one page; every network request recorded."""

    def __init__(self):
        self.profile = tempfile.mkdtemp(prefix="chromium-")
        self.proc = subprocess.Popen(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--hide-scrollbars",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             f"--user-data-dir={self.profile}", f"--window-size={WIDTH},{HEIGHT}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = os.path.join(self.profile, "DevToolsActivePort")
        page = None
        deadline = time.monotonic() + 60
        while page is None and time.monotonic() < deadline:
            try:
                port = Path(port_file).read_text().split()[0]
                targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5))
                page = next(t for t in targets if t["type"] == "page")
            except (OSError, IndexError, StopIteration, ValueError):
                time.sleep(0.2)
        if page is None:
            self.close()
            raise RuntimeError("Chromium did not open its DevTools port within 60 s")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60)
        self.next_id, self.requests = 0, []
        self.send("Page.enable")
        self.send("Network.enable")

    def send(self, method, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("method") == "Network.requestWillBeSent":
                self.requests.append(msg["params"]["request"]["url"])
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def eval(self, expr, context=None):
        params = {"expression": expr, "returnByValue": True}
        if context is not None:
            params["contextId"] = context
        return self.send("Runtime.evaluate", **params)["result"].get("value")

    def wait_for(self, expr, timeout=30, context=None):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.eval(expr, context):
                return
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {expr}")

    def open(self, path):
        self.send("Page.navigate", url=path.resolve().as_uri())
        self.wait_for("document.readyState === 'complete'")

    def screenshot(self) -> np.ndarray:
        data = self.send("Page.captureScreenshot", format="png")["data"]
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")).astype(int)

    def close(self):
        try:
            if hasattr(self, "ws"):
                self.send("Browser.close")
        except (OSError, RuntimeError, websocket.WebSocketException):
            pass  # already gone: the process is reaped below either way
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture
def browser():
    b = Browser()
    yield b
    b.close()


def bands(img: np.ndarray, rgb, min_pixels=300) -> list[tuple[int, int]]:
    """Runs of screen rows (y0, y1) with at least min_pixels pixels of exactly this colour."""
    hits = (np.abs(img - np.array(rgb)).sum(axis=2) <= 3).sum(axis=1) >= min_pixels
    runs, start = [], None
    for y, hit in enumerate([*hits, False]):
        if hit and start is None:
            start = y
        elif not hit and start is not None:
            runs.append((start, y))
            start = None
    return runs


def dark_pixels(img: np.ndarray, box) -> int:
    x0, y0, x1, y1 = (int(v) for v in box)
    return int((img[y0:y1, x0:x1].sum(axis=2) < 200).sum())


def test_table_page_shows_paper_and_reproduced_rows(world, tmp_path, browser):  # noqa: F811
    page = tmp_path / "table4.html"
    tables.main(["table4", "--runs-json", json.dumps({"r12": world.records["r12"]}), "--config-json", json.dumps(CONFIG),
                 "--out", str(tmp_path / "table4.csv"), "--html", str(page)])
    browser.open(page)
    img = browser.screenshot()
    header = bands(img, html_page.HEADER_RGB)
    repro = bands(img, html_page.REPRO_RGB)
    assert header and header[0][1] - header[0][0] >= 15, header  # the header row, in view
    assert len(repro) == 4, repro  # four tinted rows: r12's mean and its one seed, under both protocols
    assert repro[0][0] > header[0][1]
    # The paper's rows (its Table 4, then its Table 3 row of r12's mixture) sit between the header
    # and the tinted rows, with text in them.
    rows = browser.eval("[...document.querySelectorAll('#results tr')].map(r => "
                        "[r.className, r.getBoundingClientRect().top, r.getBoundingClientRect().bottom, r.innerText])")
    assert [r[0] for r in rows[1:]] == ["paper"] * 5 + ["repro"] * 4
    for cls, top, bottom, text in rows[1:]:
        assert bottom < HEIGHT and dark_pixels(img, (16, top, 900, bottom)) > 100, text
    assert "Open-Qwen2VL-2B" in rows[4][3] and "80.9" in rows[4][3]
    assert "(1+2, Table 3)" in rows[5][3] and "LLaVA-665k" in rows[5][3] and "75.6" in rows[5][3]
    assert "r12" in rows[6][3] and "62.0" in rows[6][3]


def report_fixture(work, config):
    """Every file the report rules declare (oqvl.plan names them): each job's benchmark record and
    manifest, each run's training summaries and evaluation files (both protocols), packed stats."""
    from oqvl import layout as L
    from oqvl.plan import Plan
    from oqvl.scale import resolve

    plan = Plan(config, resolve(config))
    for rule, wc in plan.all_jobs():
        bench_path, manifest_path = (work / f for f in job_files((rule, wc)))
        bench(bench_path, 18.0, 17.0, 500.0, rule, wc, {}, 1, {"_cores": 1, "gpu": 0})
        manifest_path.parent.mkdir(parents=True, exist_ok=True)
        manifest_path.write_text(json.dumps({"stage": rule, "work": {"amount": 30, "unit": "pairs"},
                                             "device": {"type": "cpu", "gpus": 0}, "files": {}}))
    for m in config["mixtures"]:
        (work / "results" / "packed" / m / "stats.json").write_text(json.dumps(
            {"sequences": 10, "documents_packed": 30, "text_tokens": 600, "visual_tokens": 16}))
    for run in config["runs"]:
        for seed in plan.seeds(run):
            for stage in ("pretrain", "sft"):
                (work / "results" / "runs" / run / f"seed{seed}" / stage / "summary.json").write_text(json.dumps(
                    {"stage": stage, "run": run, "tokens": 40_000, "loss_tokens": 20_000, "tokens_per_s": 300.0,
                     "device": "cpu", "gpus": 0, "threads": 2,
                     "params": {"vision": 843_008, "projector": 33_024, "lm": 1_790_336, "total": 2_666_368}}))
            for wc in plan.eval_wildcards(run, seed):
                for b in plan.benchmarks:
                    eval_file(work / L.eval_rows(benchmark=b, **wc), run, b, {"paper": 50.0 + seed, "lmms": 45.0},
                              seed=seed)


REPORT_RULES = ["compute", "table3", "table4", "plots"]
TARGETS = ["results/table4.csv", "results/table3.csv", "results/compute.csv", "results/plots/scores_by_mixture.png",
           "results/plots/loss_curves.png", "results/plots/compute_by_stage.png"]


@pytest.mark.slow
def test_snakemake_report_shows_table4(tmp_path, browser):
    ci = REPO / "config" / "ci.yaml"
    config = effective_config(ci)
    report_fixture(tmp_path, config)
    seeds = config["train"]["seeds"]
    ours = 2 * (1 + len(seeds))  # per protocol: the mean over the seeds, then each seed
    # Only the report rules run: everything upstream is the fixture above.
    snakemake(tmp_path, *TARGETS, "--allowed-rules", *REPORT_RULES, configfile=ci)
    snakemake(tmp_path, *TARGETS, "--report", "results/report.html", "--allowed-rules", *REPORT_RULES,
              configfile=ci)
    report = tmp_path / "results" / "report.html"
    browser.open(report)
    browser.wait_for("typeof app !== 'undefined' && document.querySelectorAll('nav a').length > 0")
    click_menu = ("(() => {{ const a = [...document.querySelectorAll('nav a')].find(e => e.textContent.trim() === {!r});"
                  " if (!a) return false; a.click(); return true; }})()")
    assert browser.eval(click_menu.format("Tables")), "no Tables category in the report"
    click_eye = ("(() => {{ const tr = [...document.querySelectorAll('nav tr')].find(r => r.cells[0] &&"
                 " r.cells[0].textContent.trim() === {!r}); if (!tr) return false;"
                 " tr.querySelector('a[iconname=eye]').click(); return true; }})()")
    browser.wait_for(click_eye.format("results/report/table4.html"))
    browser.wait_for("document.querySelector('iframe') !== null")
    frame = browser.send("Page.getFrameTree")["frameTree"]["childFrames"][0]["frame"]
    assert frame["url"].startswith("data:text/html")  # embedded in the report, not linked
    ctx = browser.send("Page.createIsolatedWorld", frameId=frame["id"])["executionContextId"]
    browser.wait_for("document.querySelector('#results') !== null", context=ctx)
    rows = browser.eval("[...document.querySelectorAll('#results tr')].map(r => { const b = r.getBoundingClientRect();"
                        " return [b.left, b.top, b.right, b.bottom, r.innerText]; })", context=ctx)
    # the header, the paper's 4 rows and its Table 3 row of the run's mixture, the configured run's
    assert len(rows) == 1 + 5 + ours
    assert "Open-Qwen2VL-2B" in rows[4][4] and "80.9" in rows[4][4]
    assert "Table 3" in rows[5][4]
    paper = [f"{50.0 + sum(seeds) / len(seeds):.1f}", *(f"{50.0 + s:.1f}" for s in seeds)]
    for row, score in zip(rows[6:], paper + ["45.0"] * (1 + len(seeds))):  # paper protocol, then lmms
        assert config["table4_run"] in row[4] and "\ttoy\t" in row[4] and f"\t{score}\t" in row[4]
    fx, fy = browser.eval("(() => { const b = document.querySelector('iframe').getBoundingClientRect();"
                          " return [b.left, b.top]; })()")
    img = browser.screenshot()
    # The table's header row is on screen, inside the frame, where the frame's layout puts it.
    header = [b for b in bands(img, html_page.HEADER_RGB) if b[0] >= fy + rows[0][1] - 2]
    assert header and abs(header[0][0] - (fy + rows[0][1])) <= 2, (header, rows[0])
    assert (np.abs(img[header[0][0]:header[0][1], int(fx):] - np.array(html_page.HEADER_RGB)).sum(axis=2) <= 3).any()
    for left, top, right, bottom, text in rows[1:]:
        box = (fx + left, fy + top, min(fx + right, WIDTH), fy + bottom)
        assert fy + bottom < HEIGHT and dark_pixels(img, box) > 100, text
    assert len(bands(img, html_page.REPRO_RGB)) == ours
    # Self-contained: the browser fetched nothing but the report file and data: URIs.
    assert all(u.startswith(("data:", "file:")) for u in browser.requests), browser.requests
    Image.fromarray(img.astype(np.uint8)).save(tmp_path / "report_table4.png")


def test_a_missing_declared_input_fails_the_dag_not_the_table(tmp_path):
    # The table rule declares every evaluation file it reads: one gone (a renamed output, a
    # deleted file) stops the DAG, naming it, instead of leaving an empty cell.
    ci = REPO / "config" / "ci.yaml"
    config = effective_config(ci)
    report_fixture(tmp_path, config)
    gone = f"results/runs/{config['table4_run']}/seed0/eval/test/POPE.json"
    (tmp_path / gone).unlink()
    proc = snakemake(tmp_path, "results/table4.csv", "--allowed-rules", "table4", configfile=ci, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and gone in out
    assert not (tmp_path / "results" / "table4.csv").exists()
