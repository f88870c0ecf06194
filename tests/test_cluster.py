"""The cluster route: resources by label, the SLURM profile at paper scale, and the CI subset run
through a real SLURM controller and node on this machine (tests/slurm_cluster.py)."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import CI_CONFIG, REPO, ci_targets, snakemake
from oqvl import cluster
from oqvl.config import ConfigError, validate
from oqvl.plan import Plan, job_files
from oqvl.report import compute
from oqvl.scale import resolve
from slurm_cluster import LocalSlurm, missing_tools
from test_golden import same_run
from test_workflow import paper_downloads

SLURM_PROFILE = REPO / "profiles" / "slurm"


def config(name: str) -> dict:
    return validate(yaml.safe_load((REPO / "config" / name).read_text()))


# ----------------------------------------------------------------------------- resources by label

def test_each_rule_asks_for_its_labels_size_and_its_own_gpus():
    full = config("full.yaml")
    pretrain = cluster.job_resources(full, "pretrain", gpus=8)
    assert pretrain == {"runtime": 2880, "mem_mb": 256000, "cpus_per_task": 64, "gpu": 8,
                        "slurm_extra": "--signal=TERM@600"}
    assert cluster.job_resources(full, "download")["cpus_per_task"] == 32
    assert cluster.job_resources(full, "table4") == {"runtime": 120, "mem_mb": 8000, "cpus_per_task": 2, "gpu": 0}
    # Toy labels leave the CPUs to the rule's threads (the plugin's default).
    assert "cpus_per_task" not in cluster.job_resources(config("ci.yaml"), "pretrain")


def test_training_across_nodes_asks_for_gpus_per_node_and_one_task_per_node():
    res = cluster.job_resources(config("full.yaml"), "pretrain", gpus=8, nodes=4)
    assert res["nodes"] == res["tasks"] == 4 and res["gres"] == "gpu:8" and "gpu" not in res
    assert res["mpi"] == "srun" and res["tasks_per_gpu"] == 0  # the job runs srun itself
    assert res["slurm_extra"] == "--ntasks-per-node=1 --signal=TERM@600"
    assert compute.granted_gpus(res) == 32


def test_the_site_file_gives_partition_account_and_qos(tmp_path, monkeypatch):
    site = tmp_path / "site.yaml"
    site.write_text("account: proj\nqos: high\npartition: cpu\npartitions: {gpu-node: a100}\n"
                    "slurm_extra: '--mail-type=FAIL'\n")
    monkeypatch.setenv(cluster.SITE_ENV, str(site))
    loaded = cluster.load_site(cluster.site_path())
    full = config("full.yaml")
    gpu = cluster.job_resources(full, "sft", gpus=8, site=loaded)
    assert (gpu["slurm_partition"], gpu["slurm_account"], gpu["qos"]) == ("a100", "proj", "high")
    assert gpu["slurm_extra"] == "--signal=TERM@600 --mail-type=FAIL"
    assert cluster.job_resources(full, "pack", site=loaded)["slurm_partition"] == "cpu"


def test_bad_site_files_and_labels_stop_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv(cluster.SITE_ENV, str(tmp_path / "absent.yaml"))
    with pytest.raises(ConfigError, match=r"^OQVL_SLURM_SITE=.*absent.yaml: no such file$"):
        cluster.site_path()
    bad = tmp_path / "site.yaml"
    bad.write_text("acount: proj\n")
    with pytest.raises(ConfigError, match=r"site.yaml: unknown key acount"):
        cluster.load_site(bad)
    cfg = config("ci.yaml")
    cfg["cluster"]["rules"]["pack"] = "gpu-huge"
    with pytest.raises(ConfigError, match=r"^cluster: label gpu-huge is used but not defined"):
        cluster.check(cfg, cluster.rule_names(REPO / "rules"))
    cfg = config("ci.yaml")
    cfg["cluster"]["rules"]["packing"] = "cpu-large"
    with pytest.raises(ConfigError, match=r"^cluster.rules: no rule named packing$"):
        cluster.check(cfg, cluster.rule_names(REPO / "rules"))


def test_compute_notes_where_slurm_granted_other_gpus_than_recorded():
    rows = pd.DataFrame([{**{c: float("nan") for c in compute.COLUMNS}, "gpus": 8, "wall_h": 1.0,
                          "slurm_job": "42", "slurm_gpus": 8.0, "note": ""}])
    same = compute.cross_check(rows, {"42": {"elapsed_s": 3700.0, "gpus": 8.0, "nodes": 1.0}})
    assert same.loc[0, "slurm_gpu_h"] == pytest.approx(8 * 3700 / 3600) and same.loc[0, "note"] == ""
    other = compute.cross_check(rows, {"42": {"elapsed_s": 3000.0, "gpus": 4.0, "nodes": 1.0}})
    assert other.loc[0, "note"] == ("SLURM granted 4 GPU(s), 8 recorded; "
                                   "benchmark wall time exceeds SLURM's elapsed time")


# ------------------------------------------------------------------------- the paper-scale DAG

def test_paper_scale_dry_run_under_the_slurm_profile_shows_every_jobs_resources(tmp_path):
    cfg = paper_downloads(tmp_path)
    proc = snakemake(tmp_path, "--profile", str(SLURM_PROFILE), "-n", "results/table4.csv", configfile=cfg)
    out = proc.stdout + proc.stderr
    assert "Using profiles" in out and "profiles/slurm" in out

    def resources(rule):
        block = out.split(f"rule {rule}:", 1)[1].split("\n\n", 1)[0]
        return next(line for line in block.splitlines() if line.strip().startswith("resources:"))

    assert "runtime=2880" in resources("pretrain") and "gpu=8" in resources("pretrain")
    assert "cpus_per_task=64" in resources("sft") and "--signal=TERM@600" in resources("sft")
    assert "gpu=1" in resources("evaluate") and "mem_mb=64000" in resources("evaluate")
    assert "cpus_per_task=32" in resources("download") and "gpu=0" in resources("download")
    # Across nodes, `train.nodes` is all that changes: GPUs per node, one task per node, srun.
    two = yaml.safe_load(cfg.read_text())
    two["train"]["nodes"] = 2
    two["train"]["pretrain"]["micro_batch"] = 2  # the recipe's global batch of 32 over 16 GPUs
    cfg.write_text(yaml.safe_dump(two, sort_keys=False))
    out = snakemake(tmp_path, "--profile", str(SLURM_PROFILE), "-n", "results/table4.csv", configfile=cfg).stdout
    assert all(f in resources("pretrain") for f in ("nodes=2", "tasks=2", "gres=gpu:8", "mpi=srun"))
    assert "-m oqvl.train.launch --nodes 2 --nproc-per-node 8 -- pretrain" in out
    # Nothing caps the GPUs: the default profile, loaded beside it, sets no gpu limit.
    assert "gpu" not in yaml.safe_load((REPO / "profiles" / "default" / "config.yaml").read_text()).get("resources", [])


# --------------------------------------------------------------------- a real SLURM on this machine

@pytest.fixture(scope="session")
def local_slurm(tmp_path_factory):
    if missing := missing_tools():
        if os.environ.get("CI"):
            pytest.fail(f"SLURM is not installed ({', '.join(missing)} missing): .ci/run installs slurm-wlm and munge")
        pytest.skip(f"needs Debian's slurm-wlm and munge ({', '.join(missing)} missing; .ci/run installs them)")
    if os.geteuid() != 0:
        pytest.skip("starting slurmd needs root")
    with LocalSlurm(tmp_path_factory.mktemp("slurm")) as c:
        yield c


SLURM_RUN = ["--profile", str(SLURM_PROFILE), "--jobs", "2",
             "--slurm-status-command", "squeue",  # no slurmdbd here, so sacct knows no jobs
             "--slurm-no-account", "--slurm-init-seconds-before-status-checks", "1",
             "--retries", "0"]


def test_a_job_runs_through_sbatch_on_the_local_cluster(local_slurm, tmp_path):
    out = subprocess.run(["sbatch", "--parsable", "--wait", "-o", str(tmp_path / "out.txt"),
                          "--wrap", "srun -n1 echo $SLURM_JOB_ID"],
                         capture_output=True, text=True, env=local_slurm.env, timeout=120)
    assert out.returncode == 0, out.stderr + local_slurm.logs()
    assert (tmp_path / "out.txt").read_text().strip() == out.stdout.strip()


@pytest.mark.slow
def test_the_ci_subset_through_real_slurm_equals_the_local_run(local_slurm, ci_run, tmp_path, monkeypatch):
    earlier = {j["JobId"] for j in local_slurm.completions()}
    proc = snakemake(tmp_path, *SLURM_RUN, *ci_targets(), configfile=CI_CONFIG, env=local_slurm.env, check=False)
    if proc.returncode != 0:  # the failed jobs' SLURM logs (their srun errors) and the daemons' logs
        logs = sorted((tmp_path / "results" / "logs" / "slurm").rglob("*.log"))
        detail = "\n".join(f"--- {p}\n{p.read_text()[-1500:]}" for p in logs[-4:])
        pytest.fail(f"snakemake under SLURM failed ({proc.returncode}):\n{proc.stderr[-4000:]}\n"
                    f"{detail}\n{local_slurm.logs()}")
    results = tmp_path / "results"
    # Every job went through sbatch: one SLURM job per benchmark record, each completed.
    benchmarks = sorted((results / "benchmarks").rglob("*.tsv"))
    jobs = [j for j in local_slurm.completions() if j["JobId"] not in earlier]
    assert len(jobs) == len(benchmarks) and {j["JobState"] for j in jobs} == {"COMPLETED"}, jobs
    # The outputs equal the local run's: the same files, the deterministic ones byte for byte,
    # and the trained weights and their evaluations too (same machine, same threads).
    problems = same_run(tmp_path, ci_run, ignore="results/logs/slurm/")
    assert not problems, "\n".join(problems[:60])
    # The accounting of these jobs knows each one's SLURM job, and SLURM's own record of it (sacct
    # --completion here) agrees: nothing granted a GPU, and no benchmark outlasted its SLURM job.
    # (The compute rule itself accounts for every run of the config: more than the CI targets.)
    cfg = validate(yaml.safe_load(CI_CONFIG.read_text()))
    pairs = [job_files(j) for j in Plan(cfg, resolve(cfg)).all_jobs()]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SLURM_CONF", str(local_slurm.conf))
    table = compute.build({"jobs": [p for p in pairs if Path(p[0]).is_file()], "pretrain": {}}, cfg)
    rows = table[table["row_type"] == "job"]
    assert len(rows) == len([b for b in benchmarks if b.parent.name != "report"])  # tables: not accounted
    assert rows["slurm_job"].isin({j["JobId"] for j in jobs}).all(), rows["slurm_job"]
    assert rows["slurm_elapsed_h"].notna().all() and (rows["slurm_gpus"] == 0).all() and (rows["gpu_h"] == 0).all()
    assert not rows["note"].fillna("").str.contains("SLURM").any(), rows["note"]
    manifest = json.loads((results / "packed" / "ccs+datacomp" / "manifest.json").read_text())
    assert manifest["slurm"]["job_id"] in {j["JobId"] for j in jobs}


# ------------------------------------------------------------------------- apptainer on the cluster

RECORDER = '''#!/usr/bin/env python3
# Stands in for apptainer (not installable here): records each call, then runs the job's own
# command on the host, so the workflow's command lines are what is tested.
import json, os, subprocess, sys
args = sys.argv[1:]
with open(os.environ["APPTAINER_RECORD"], "a") as f:
    f.write(json.dumps(args) + "\\n")
if args[:1] == ["--version"]:
    print("apptainer version 1.3.4")
    sys.exit(0)
image = next(i for i, a in enumerate(args) if a.endswith(".sif"))
sys.exit(subprocess.call(args[image + 1:]))
'''


def test_the_gpu_wrapper_adds_nv_to_exec_only_for_jobs_granted_gpus():
    command = runpy.run_path(str(SLURM_PROFILE / "bin" / "apptainer"))["command"]  # not run as __main__
    argv = ["--quiet", "exec", "--home", "/w", "img.sif", "bash", "-c", "true"]
    assert command(argv, {"SLURM_GPUS_ON_NODE": "8"}, "/usr/bin/apptainer") == [
        "/usr/bin/apptainer", "--quiet", "exec", "--nv", "--home", "/w", "img.sif", "bash", "-c", "true"]
    assert command(argv, {"SLURM_GPUS_ON_NODE": "0"}, "/a")[1:] == argv
    assert command(argv, {"CUDA_VISIBLE_DEVICES": "0,1"}, "/a")[3] == "--nv"
    assert command(["--version"], {"SLURM_GPUS_ON_NODE": "1"}, "/a") == ["/a", "--version"]


@pytest.mark.parametrize("gpus", ["0", "2"])
def test_the_slurm_profiles_apptainer_command_lines(tmp_path, gpus):
    # A job of the workflow under --sdm apptainer with the SLURM profile's apptainer-args and its
    # GPU wrapper first on PATH, images as .sif files (what a cluster runs).
    fake = tmp_path / "fakebin"
    fake.mkdir()
    (fake / "apptainer").write_text(RECORDER)
    (fake / "apptainer").chmod(0o755)
    sif = {k: tmp_path / f"oqvl-{k}.sif" for k in ("data", "model")}
    for p in sif.values():
        p.write_bytes(b"")
    cfg = yaml.safe_load(CI_CONFIG.read_text())
    cfg["containers"] = {k: str(p) for k, p in sif.items()}
    cfg_path = tmp_path / "ci_sif.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    work = tmp_path / "work"
    work.mkdir()
    record = tmp_path / "calls.jsonl"
    profile_args = yaml.safe_load((SLURM_PROFILE / "config.yaml").read_text())["apptainer-args"]
    env = dict(os.environ, PATH=f"{SLURM_PROFILE / 'bin'}:{fake}:{os.environ['PATH']}",
               APPTAINER_RECORD=str(record), SLURM_GPUS_ON_NODE=gpus, PWD=str(REPO))
    snakemake(work, "--sdm", "apptainer", "--apptainer-args", os.path.expandvars(profile_args.replace("$PWD", str(REPO))),
              "results/raw/ccs/pairs.parquet", configfile=cfg_path, env=env)
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    (job,) = [c for c in calls if "exec" in c]
    assert ("--nv" in job) == (gpus != "0")
    assert job[job.index("exec") + (2 if gpus != "0" else 1)] == "--home"
    assert f"{REPO}:/opt/oqvl:ro" in job and "PYTHONPATH=/opt/oqvl/src" in job
    assert str(sif["data"]) in job  # generate_pairs runs in the data image
    assert "oqvl.raw.generate" in job[-1]
    assert (work / "results" / "raw" / "ccs" / "pairs.parquet").is_file()
