"""Interruptions tried on purpose: every long stage of the CI run is SIGKILLed at a random point
(a seeded generator picks it), the workflow is run again, and it must finish with the outputs of
an uninterrupted run. docs/reliability.md lists these faults by test name.

Two kinds of death are tried. "job": the stage's processes die (the OOM killer, a lost node)
while Snakemake lives on, removes the failed job's outputs and stops. "snakemake": Snakemake and
everything under it die at once (a power loss); its lock and its incomplete-job marks stay behind,
the next run is refused until `snakemake --unlock`, and the interrupted job is rerun, never
trusted (the default profile's rerun-incomplete).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
from conftest import CI_CONFIG, REPO, ci_targets
from test_golden import same_run, same_tensors

from oqvl import layout as L

SEED = int(os.environ.get("OQVL_FAULT_SEED", "0"))  # another seed tries other points

KILLS = [  # in DAG order: (rule, a piece of its job's shell command, what dies)
    ("clip_score", "-m oqvl.filter.clip_score ", "job"),
    ("mlm_score", "-m oqvl.filter.mlm_filter score ", "job"),
    ("pack", "-m oqvl.pack ", "job"),
    ("pretrain", " pretrain --out ", "snakemake"),
    ("sft", " sft --out results/runs/", "job"),
    ("evaluate", "-m oqvl.evaluate ", "snakemake"),
]
LOCKED = "Directory cannot be locked"


def command(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(root),
            "--workflow-profile", str(REPO / "profiles" / "default"), "--cores", "2",
            *args, "--configfile", str(CI_CONFIG)]  # last: --configfile takes every word after it


def tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def job_shell(snakemake: psutil.Process, piece: str) -> psutil.Process | None:
    """The outermost running process under Snakemake whose command line holds `piece` (the job's
    shell; the stage's Python runs under it)."""
    matches = []
    for p in tree(snakemake)[1:]:
        try:
            if piece in " ".join(p.cmdline()):
                matches.append(p)
        except psutil.Error:
            continue
    pids = {p.pid for p in matches}
    return next((p for p in matches if p.ppid() not in pids), None)


def sigkill(procs: list[psutil.Process]) -> None:
    """SIGKILL each, and wait until they are gone; this process's own children are left for their
    Popen to reap (reaped here, Popen would see no exit status and report 0)."""
    ours = set()
    for p in procs:
        try:
            if p.ppid() == os.getpid():
                ours.add(p.pid)
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs([p for p in procs if p.pid not in ours], timeout=30)


def typical_seconds(reference: Path, rule: str) -> float:
    """The rule's median job time in the uninterrupted run (its benchmark records)."""
    pattern = re.sub(r"\{[^}]+\}", "*", L.benchmark(rule))
    times = [pd.read_csv(f, sep="\t")["s"].iloc[-1] for f in reference.glob(pattern)]
    assert times, pattern
    return float(np.median(times))


class Runner:
    """Snakemake on the CI targets in `root`, one invocation after another, each one's output kept."""

    def __init__(self, root: Path):
        self.root, self.calls, self.proc = root, [], None

    def start(self, *targets: str) -> psutil.Process:
        log = (self.root.parent / f"snakemake-{len(self.calls)}.log").open("w")
        self.proc = subprocess.Popen(command(self.root, *(targets or ci_targets())), cwd=self.root, stdout=log,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.calls.append(Path(log.name))
        return psutil.Process(self.proc.pid)

    def wait(self, timeout: float = 900) -> tuple[int, str]:
        code = self.proc.wait(timeout=timeout)
        return code, self.calls[-1].read_text()

    def once(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(command(self.root, *args), cwd=self.root, capture_output=True, text=True,
                              timeout=300, check=False)


def failed_outputs(output: str, rule: str) -> list[str]:
    """The outputs Snakemake's "Error in rule RULE:" block lists for the failed job."""
    block = output.split(f"Error in rule {rule}:", 1)[1]
    line = next(l for l in block.splitlines() if l.strip().startswith("output:"))
    return [o.strip() for o in line.split("output:", 1)[1].split(",")]


def kill_one(run: Runner, snake: psutil.Process, pending: dict, rng, ci_run: Path) -> dict | None:
    """Watch the jobs of the running Snakemake; the first job of a pending rule to reach its
    random point (drawn when it is first seen) is killed, as the rule says. None when Snakemake
    finished without a kill (every pending rule's jobs ended before their point, or none ran)."""
    watched = {}  # rule -> (its job's shell, when seen, delay)
    while run.proc.poll() is None:
        for rule, (piece, _) in pending.items():
            if rule not in watched and (shell := job_shell(snake, piece)) is not None:
                watched[rule] = (shell, time.monotonic(), rng.uniform(0.15, 0.6) * typical_seconds(ci_run, rule))
        for rule, (shell, seen, delay) in list(watched.items()):
            if not shell.is_running() or shell.status() == psutil.STATUS_ZOMBIE:
                del watched[rule]  # it ended before its point: the rule's next job is watched
            elif time.monotonic() - seen >= delay:
                dies = pending[rule][1]
                job = " ".join(shell.cmdline())
                sigkill(tree(snake) if dies == "snakemake" else tree(shell))
                code, output = run.wait()
                return {"rule": rule, "dies": dies, "after_s": round(delay, 2), "code": code, "job": job,
                        "output": output}
        time.sleep(0.05)
    return None


@pytest.fixture(scope="module")
def interrupted(ci_run, tmp_path_factory) -> dict:
    """The CI run, with each long stage killed once at a seeded random point and the workflow
    run again after each kill, until it completes. What happened is returned for the tests."""
    rng = np.random.default_rng(SEED)
    root = tmp_path_factory.mktemp("faults") / "run"
    root.mkdir()
    run = Runner(root)
    record = {"root": root, "kills": [], "concurrent": None}
    pending = {rule: (piece, dies) for rule, piece, dies in KILLS}
    snake = run.start()
    try:
        # A second Snakemake on the same directory while the first runs a job.
        deadline = time.monotonic() + 120
        while len(tree(snake)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        record["concurrent"] = run.once(*ci_targets())
        while pending and (kill := kill_one(run, snake, pending, rng, ci_run)) is not None:
            del pending[kill["rule"]]
            if kill["dies"] == "job":  # what Snakemake should have removed, looked at before the rerun
                kill["left"] = [o for o in failed_outputs(kill["output"], kill["rule"]) if (root / o).exists()]
            else:  # Snakemake's marks of the jobs it was running, left for the next run
                kill["marks"] = [f for f in (root / ".snakemake" / "incomplete").rglob("*") if f.is_file()]
                kill["refused"] = run.once(*ci_targets())
                kill["unlocked"] = run.once("--unlock", *ci_targets())
            record["kills"].append(kill)
            snake = run.start()
        record["missed"] = sorted(pending)
        record["final"] = run.wait()
        for i, kill in enumerate(record["kills"]):  # every later call: a rerun may come after another kill
            kill["resumed"] = "".join(call.read_text() for call in run.calls[i + 1:])
        record["marks_left"] = [f for f in (root / ".snakemake" / "incomplete").rglob("*") if f.is_file()]
        record["noop"] = run.once("-n", *ci_targets())
    finally:
        sigkill(tree(snake))
    return record


@pytest.mark.slow
def test_each_long_stage_killed_at_a_random_point_resumes_to_the_uninterrupted_outputs(interrupted, ci_run):
    kills = interrupted["kills"]
    assert not interrupted["missed"], f"every job of these ended before its kill (seed {SEED}): {interrupted['missed']}"
    assert sorted(k["rule"] for k in kills) == sorted(rule for rule, _, _ in KILLS)
    for k in kills:
        assert k["code"] != 0, k["rule"]  # the interrupted invocation failed, it did not report success
        assert f"rule {k['rule']}:" in k["resumed"], f"{k['rule']} was not run again"
    code, output = interrupted["final"]
    assert code == 0, output[-4000:]
    problems = same_run(interrupted["root"], ci_run)
    assert not problems, f"seed {SEED}, kills {[(k['rule'], k['after_s']) for k in kills]}:\n" + "\n".join(problems[:60])
    assert not list((interrupted["root"] / "results").rglob("*.tmp"))  # no partial file left, none taken
    assert "Nothing to be done" in interrupted["noop"].stdout + interrupted["noop"].stderr


@pytest.mark.slow
def test_a_job_killed_under_a_living_snakemake_has_its_outputs_removed_and_is_rerun(interrupted):
    jobs = [k for k in interrupted["kills"] if k["dies"] == "job"]
    assert jobs
    for k in jobs:
        assert f"Error in rule {k['rule']}:" in k["output"], k["output"][-3000:]
        assert not k["left"], f"{k['rule']}: outputs of the failed job left in place: {k['left']}"


@pytest.mark.slow
def test_a_run_killed_whole_is_refused_by_its_lock_until_unlocked_then_reruns_the_incomplete_job(interrupted):
    whole = [k for k in interrupted["kills"] if k["dies"] == "snakemake"]
    assert whole
    for k in whole:
        refused = k["refused"].stdout + k["refused"].stderr
        assert k["refused"].returncode != 0 and LOCKED in refused and "--unlock" in refused, refused[-3000:]
        assert k["unlocked"].returncode == 0, k["unlocked"].stderr[-3000:]
        # the jobs that were running are marked incomplete: a later run never trusts what they wrote
        # (the default profile's rerun-incomplete reruns them; test above: they ran again)
        assert k["marks"], f"{k['rule']}: no incomplete marks after Snakemake died"
    assert not interrupted["marks_left"]  # all cleared once the DAG completed


@pytest.mark.slow
def test_a_second_snakemake_on_the_same_directory_is_refused_and_corrupts_nothing(interrupted, ci_run):
    second = interrupted["concurrent"]
    assert second.returncode != 0 and LOCKED in second.stdout + second.stderr, second.stderr[-3000:]
    # the first went on to finish with the uninterrupted outputs (checked in full above)
    assert interrupted["final"][0] == 0


MLM_TRAIN = "results/filter/mlm_model/train"


@pytest.mark.slow
def test_a_job_killed_after_writing_some_outputs_is_rerun_never_trusted(ci_run, tmp_path):
    """train_mlm_filter puts final/ (its model output) in place before its summary and manifest:
    killed in between, its outputs are removed and the next run trains it again, to the same weights."""
    root = tmp_path / "run"
    root.mkdir()
    run = Runner(root)
    target = f"{MLM_TRAIN}/manifest.json"
    snake = run.start(target)
    deadline = time.monotonic() + 900
    while not (root / MLM_TRAIN / "final" / "config.json").exists():
        assert run.proc.poll() is None, run.calls[-1].read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    manifest_there = (root / target).exists()
    sigkill(tree(job_shell(snake, f" sft --out {MLM_TRAIN}")))
    code, output = run.wait()
    assert not manifest_there, "the job finished before its kill"
    assert code != 0 and "Error in rule train_mlm_filter:" in output, output[-3000:]
    assert not (root / MLM_TRAIN / "final" / "config.json").exists()  # removed, not trusted
    run.start(target)
    code, output = run.wait()
    assert code == 0 and "rule train_mlm_filter:" in output, output[-3000:]
    weights = f"{MLM_TRAIN}/final/model.safetensors"
    assert same_tensors(root / weights, ci_run / weights)
