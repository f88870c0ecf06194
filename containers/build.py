#!/usr/bin/env python3
"""Build the harness's container images with podman, reproducibly and without a registry.

    python containers/build.py build [IMAGE ...] [--no-cache]   what is missing (`make containers`)
    python containers/build.py refs                   the references config/*.yaml must name
    python containers/build.py lock                   regenerate every lock (builds the new base)
    python containers/build.py save DIR [IMAGE ...]   OCI archives for apptainer (.sif) elsewhere

Images: `base` (Debian bookworm minbase from debootstrap), `data` (the stages that need no torch:
raw, keep, filter quality, mixture, report) and `model` (the stages that do: CLIP training and
scoring, tokenizer and packing, and the model stages; all of requirements.lock). Each is named
localhost/oqvl-IMAGE:TAG, where TAG is a hash of its recipe, its locks and the tag of the image it
builds on: a tag names one content, and an image already built under its tag is not rebuilt.

Every date inside the images is SOURCE_DATE_EPOCH, so a build from scratch gives the same image
id each time, as long as the Debian archive still serves the locked versions (`build` stops with
the difference when it does not; `lock` then records the new versions under new tags).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BUILD = REPO / "build" / "containers"
WHEELHOUSE = REPO / "build" / "wheelhouse"
EPOCH = 1735689600  # 2025-01-01T00:00:00Z: every file date and the creation date of every image
APT_LOCK = HERE / "apt.lock"
APT_PACKAGES = ["python3", "python3-venv", "git"]  # stage images over the base: Python 3.11, git
PROJECT_LOCK = REPO / "requirements.lock"

# name -> (files hashed into the tag, the image it builds on)
IMAGES = {
    "base": (["base/Containerfile", "base/mkrootfs.sh", "base/debian.lock"], None),
    "data": (["data/Containerfile", "apt.lock", "data/requirements.txt"], "base"),
    "model": (["model/Containerfile", "apt.lock", "model/requirements.txt"], "base"),
}
STAGES = [n for n, (_, parent) in IMAGES.items() if parent]


def env() -> dict:
    # podman's helper processes run elsewhere: the path must be absolute.
    conf = os.path.abspath(os.environ.get("CONTAINERS_CONF", HERE / "containers.conf"))
    return dict(os.environ, CONTAINERS_CONF=conf)


def run(cmd: list[str], log: Path | None = None, **kw) -> subprocess.CompletedProcess:
    """Run a command; with `log`, its output goes there and its tail is shown if it fails."""
    kw.setdefault("env", env())
    if log is None:
        return subprocess.run(cmd, check=True, **kw)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, **kw)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-30:]
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n" + "\n".join(tail) + f"\n(full log: {log})")
    return proc


def tag(name: str) -> str:
    files, parent = IMAGES[name]
    h = hashlib.sha256(f"epoch {EPOCH}\n".encode())
    if parent:
        h.update(f"from {ref(parent)}\n".encode())
    for rel in files:
        h.update(f"{rel}\n".encode() + (HERE / rel).read_bytes() + b"\n")
    return h.hexdigest()[:12]


def ref(name: str) -> str:
    return f"localhost/oqvl-{name}:{tag(name)}"


def refs() -> dict[str, str]:
    """What config/*.yaml's `containers:` section names, per stage image."""
    return {name: f"docker://{ref(name)}" for name in STAGES}


def exists(image: str) -> bool:
    return subprocess.run(["podman", "image", "exists", image], env=env()).returncode == 0


def inspect(image: str) -> dict:
    out = subprocess.run(["podman", "image", "inspect", image], capture_output=True, text=True,
                         check=True, env=env()).stdout
    return json.loads(out)[0]


def ensure_tools() -> None:
    """podman, runc and debootstrap, installed from Debian when missing (building needs root)."""
    if os.geteuid() != 0:
        sys.exit("building the images needs root (debootstrap, rootful podman)")
    missing = [t for t in ("podman", "runc", "debootstrap") if shutil.which(t) is None]
    if missing:
        print(f"installing {' '.join(missing)} (apt-get)", flush=True)
        apt = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        run(["apt-get", "update", "-qq"], log=BUILD / "logs" / "apt-update.log", env=apt)
        run(["apt-get", "install", "-y", "-qq", "podman", "runc", "debootstrap"],
            log=BUILD / "logs" / "apt-install.log", env=apt)


def make_rootfs(lock_out: Path) -> Path:
    tar = BUILD / "base" / "rootfs.tar"
    tar.parent.mkdir(parents=True, exist_ok=True)
    run(["bash", str(HERE / "base" / "mkrootfs.sh"), str(tar), str(lock_out)],
        log=BUILD / "logs" / "mkrootfs.log", env=dict(env(), SOURCE_DATE_EPOCH=str(EPOCH)))
    return tar


def diff_locks(want: str, got: str) -> str:
    w, g = set(want.splitlines()), set(got.splitlines())
    return "\n".join([f"  locked {x}" for x in sorted(w - g)] + [f"  now    {x}" for x in sorted(g - w)])


def build_base(no_cache: bool) -> None:
    lock = HERE / "base" / "debian.lock"
    got = BUILD / "base" / "debian.lock"
    tar = make_rootfs(got)
    if got.read_text() != lock.read_text():
        sys.exit("the Debian archive no longer serves the locked base packages:\n"
                 + diff_locks(lock.read_text(), got.read_text())
                 + "\nrun `python containers/build.py lock` to take the new versions (new tags)")
    podman_build("base", tar.parent, [], no_cache)


def podman_build(name: str, context: Path, extra: list[str], no_cache: bool) -> None:
    cmd = ["podman", "build", "--timestamp", str(EPOCH), "--build-arg", f"SOURCE_DATE_EPOCH={EPOCH}",
           "--file", str(HERE / name / "Containerfile"), "--tag", ref(name), *extra]
    if no_cache:
        cmd.append("--no-cache")
    run([*cmd, str(context)], log=BUILD / "logs" / f"{name}.log")


def wheels(requirements: Path) -> None:
    """The wheels a requirements file names, into the wheelhouse, each checked against its hash."""
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--require-hashes",
         "--dest", str(WHEELHOUSE), "--requirement", str(requirements)],
        log=BUILD / "logs" / f"wheels-{requirements.parent.name}.log")


def build_stage(name: str, no_cache: bool) -> None:
    wheels(HERE / name / "requirements.txt")
    # The wheels are mounted for the build only (offline, hash-checked install); the context is
    # containers/, so both stage images share apt.lock.
    podman_build(name, HERE, ["--build-arg", f"BASE={ref('base')}",
                              "--volume", f"{WHEELHOUSE}:/wheels:ro"], no_cache)


def build(names: list[str], no_cache: bool) -> None:
    """Build the base and the given images, skipping those already built under their tag."""
    ensure_tools()
    for name in ["base", *[n for n in names if n != "base"]]:
        image = ref(name)
        if exists(image) and not no_cache:
            print(f"{image}: already built", flush=True)
            continue
        t0 = time.monotonic()
        print(f"{image}: building", flush=True)
        build_base(no_cache) if name == "base" else build_stage(name, no_cache)
        info = inspect(image)
        print(f"{image}: id {info['Id'][:12]}, {info['Size'] / 1e6:.0f} MB, "
              f"{time.monotonic() - t0:.0f} s", flush=True)


# ---- locks -----------------------------------------------------------------------------------

def pins(path: Path) -> dict[str, str]:
    """name -> version of a requirements file's `name==version` lines (names normalised)."""
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", line)
        if m:
            out[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    return out


def resolve(requirements: Path) -> dict[str, str]:
    """What pip installs for `requirements` under the versions of requirements.lock: the lock's
    pins, and what the lock leaves out (pip freeze omits setuptools, which torch needs)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        run([sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
             "--report", str(report), "--constraint", str(PROJECT_LOCK), "--requirement", str(requirements)],
            log=BUILD / "logs" / f"resolve-{requirements.stem}.log")
        items = json.loads(report.read_text())["install"]
    return {re.sub(r"[-_.]+", "-", i["metadata"]["name"]).lower(): i["metadata"]["version"] for i in items}


def hashed_requirements(name: str, packages: dict[str, str], source: str) -> None:
    """Write IMAGE/requirements.txt: exact pins, each with the sha256 of the wheel pip uses here."""
    lock = pins(PROJECT_LOCK)
    for pkg, version in packages.items():
        if pkg in lock and lock[pkg] != version:
            sys.exit(f"{pkg}=={version} is not what requirements.lock pins ({lock[pkg]})")
    extra = sorted(set(packages) - set(lock))
    if extra:
        source += f"; and {', '.join(extra)}, which requirements.lock leaves out (pip freeze omits it)"
    with tempfile.TemporaryDirectory() as tmp:
        flat = Path(tmp) / "pins.txt"
        flat.write_text("".join(f"{p}=={v}\n" for p, v in sorted(packages.items())))
        WHEELHOUSE.mkdir(parents=True, exist_ok=True)
        run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--dest", str(WHEELHOUSE), "--requirement", str(flat)],
            log=BUILD / "logs" / f"download-{name}.log")
    from packaging.utils import (
        canonicalize_name,
        parse_sdist_filename,
        parse_wheel_filename,
    )

    # The files pip picked here: wheels, and the sdists of the few pins that have no wheel (pure
    # Python; the image builds them offline).
    found: dict[str, list[str]] = {}
    for dist in WHEELHOUSE.iterdir():
        if dist.suffix == ".whl":
            pkg, version = parse_wheel_filename(dist.name)[:2]
        elif dist.name.endswith(".tar.gz"):
            pkg, version = parse_sdist_filename(dist.name)
        else:
            continue
        if packages.get(canonicalize_name(pkg)) == str(version):
            found.setdefault(canonicalize_name(pkg), []).append(
                hashlib.sha256(dist.read_bytes()).hexdigest())
    missing = sorted(set(packages) - set(found))
    if missing:
        sys.exit(f"no wheel downloaded for {missing}")
    lines = [f"# The {name} image's Python packages: {source}.",
             "# Exact pins at requirements.lock's versions, each with the sha256 of its file"
             " (pip --require-hashes).",
             "# Generated by `python containers/build.py lock`; do not edit."]
    for pkg in sorted(packages):
        hashes = " \\\n".join(f"    --hash=sha256:{h}" for h in sorted(found[pkg]))
        lines.append(f"{pkg}=={packages[pkg]} \\\n{hashes}")
    (HERE / name / "requirements.txt").write_text("\n".join(lines) + "\n")


def lock_apt() -> None:
    """apt.lock: the Debian packages (with dependencies) the stage images add to the base."""
    out = run(["podman", "run", "--rm", "--network=host", ref("base"), "bash", "-c",
               "apt-get update -qq && apt-get install --simulate --no-install-recommends "
               + " ".join(APT_PACKAGES)], capture_output=True, text=True).stdout
    inst = sorted(f"{m.group(1)}={m.group(2)}" for m in re.finditer(r"^Inst (\S+) \((\S+) ", out, re.M))
    if not inst:
        sys.exit(f"apt-get --simulate listed nothing:\n{out}")
    APT_LOCK.write_text("\n".join(inst) + "\n")


def lock() -> None:
    ensure_tools()
    tar = make_rootfs(HERE / "base" / "debian.lock")
    print("base/debian.lock written", flush=True)
    if not exists(ref("base")):
        podman_build("base", tar.parent, [], no_cache=False)
    lock_apt()
    print("apt.lock written", flush=True)
    hashed_requirements("data", resolve(HERE / "data" / "requirements.in"),
                        "what data/requirements.in needs, without torch")
    hashed_requirements("model", resolve(PROJECT_LOCK), "all of requirements.lock")
    print("data/requirements.txt and model/requirements.txt written", flush=True)
    print("image references for the containers: section of config/*.yaml:")
    for name, r in refs().items():
        print(f"  {name}: {r}")


def save(out: Path, names: list[str]) -> None:
    """podman save each stage image as an OCI archive, and say how apptainer turns it into .sif."""
    out.mkdir(parents=True, exist_ok=True)
    for name in names or STAGES:
        archive = out / f"oqvl-{name}_{tag(name)}.tar"
        run(["podman", "save", "--format", "oci-archive", "--output", str(archive), ref(name)])
        print(f"{archive}\n  apptainer build {archive.with_suffix('.sif')} oci-archive://{archive}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the base and the stage images that are missing")
    b.add_argument("images", nargs="*", metavar="IMAGE",
                   help=f"of {', '.join(IMAGES)} (default: all; base is always built first)")
    b.add_argument("--no-cache", action="store_true", help="rebuild from scratch, layers included")
    sub.add_parser("refs", help="print the image references config/*.yaml must name")
    sub.add_parser("lock", help="regenerate base/debian.lock, apt.lock and the hashed requirements")
    s = sub.add_parser("save", help="write OCI archives of the stage images (for apptainer)")
    s.add_argument("dir", type=Path)
    s.add_argument("images", nargs="*", metavar="IMAGE")
    args = parser.parse_args()
    if args.command == "build":
        unknown = set(args.images) - set(IMAGES)
        if unknown:
            parser.error(f"unknown image {', '.join(sorted(unknown))} (images: {', '.join(IMAGES)})")
        build(args.images or STAGES, args.no_cache)
    elif args.command == "refs":
        for name, r in refs().items():
            print(f"{name}: {r}")
    elif args.command == "lock":
        lock()
    elif args.command == "save":
        save(args.dir, args.images)


if __name__ == "__main__":
    main()
