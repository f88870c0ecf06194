"""lmms-eval task directories: the package's task YAMLs bound to a data directory.

    python -m oqvl.evaluate.tasks --data-dir results/eval_data/test --out results/eval_tasks
    lmms-eval --model oqvl --model_args pretrained=results/runs/RUN/seed0/sft/final \
        --include_path results/eval_tasks --tasks oqvl_pope_paper,oqvl_pope_lmms ...

The YAMLs in oqvl/evaluate/tasks/ read results/eval_data/test/<Benchmark>.parquet, a path relative to
where lmms-eval runs (the repository root); `--include_path src/oqvl/evaluate/tasks` works from
there as they are. `write_task_dir` writes copies that read an absolute data directory, plus a
`<task>_shuffled` twin of each reading the shuffled-image control file.

A task's name says its benchmark and protocol (`oqvl_<benchmark>_<protocol>[_<variant>]
[_shuffled]`); the model adapter reads the protocol from it to encode prompts and decode answers
the protocol's way. A variant is an extra task of a protocol: POPE's `likelihood` scorer.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import BENCHMARKS, PROTOCOLS
from .schemas import data_file

TEMPLATE_DIR = Path(__file__).parent / "tasks"
DEFAULT_DATA = "results/eval_data/test"


VARIANTS = {("POPE", "paper"): ("likelihood",)}


def task_name(benchmark: str, protocol: str, shuffled: bool = False, variant: str | None = None) -> str:
    if benchmark not in BENCHMARKS or protocol not in PROTOCOLS:
        raise KeyError(f"no task for benchmark {benchmark!r} under protocol {protocol!r}")
    if variant is not None and variant not in VARIANTS.get((benchmark, protocol), ()):
        raise KeyError(f"no {variant!r} task for {benchmark} under protocol {protocol!r}")
    return (f"oqvl_{benchmark.lower()}_{protocol}" + (f"_{variant}" if variant else "")
            + ("_shuffled" if shuffled else ""))


def _specs(benchmark: str, protocol: str, control: bool) -> list[tuple[str | None, bool]]:
    """(variant, shuffled) of every task one protocol runs on a benchmark: the main task and its
    variants, each with its shuffled-image twin when the control runs."""
    return [(variant, shuffled) for variant in (None, *VARIANTS.get((benchmark, protocol), ()))
            for shuffled in ((False, True) if control else (False,))]


def protocol_tasks(benchmark: str, protocol: str, control: bool = True) -> list[str]:
    return [task_name(benchmark, protocol, shuffled, variant)
            for variant, shuffled in _specs(benchmark, protocol, control)]


def task_protocol(task: str) -> str | None:
    """The protocol of one of our task names (None for any other task)."""
    parts = task.split("_")
    if len(parts) >= 3 and parts[0] == "oqvl" and parts[2] in PROTOCOLS:
        return parts[2]
    return None


def _replace_once(text: str, old: str, new: str, where: str) -> str:
    if text.count(old) != 1:
        raise ValueError(f"{where}: expected {old!r} exactly once")
    return text.replace(old, new)


def task_yaml(benchmark: str, protocol: str, data_dir, shuffled: bool = False,
              variant: str | None = None) -> str:
    name = task_name(benchmark, protocol, variant=variant)
    path = TEMPLATE_DIR / f"{name}.yaml"
    text = path.read_text()
    rel = f"{DEFAULT_DATA}/{benchmark}.parquet"
    data = data_file(Path(data_dir).resolve(), benchmark, shuffled)
    text = _replace_once(text, f"test: {rel}", f"test: {data}", str(path))
    if shuffled:
        twin = task_name(benchmark, protocol, shuffled=True, variant=variant)
        text = _replace_once(text, f"task: {name}\n", f"task: {twin}\n", str(path))
        text = "# Shuffled-image control: the same questions, each shown another question's image.\n" + text
    return text


def write_task_dir(out_dir, data_dir, benchmarks=BENCHMARKS, protocols=PROTOCOLS,
                   control: bool = True) -> list[str]:
    """Write the task YAMLs for these benchmarks and protocols; returns the task names."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("oqvl_*.yaml"):
        old.unlink()
    names = []
    for benchmark in benchmarks:
        for protocol in protocols:
            for variant, shuffled in _specs(benchmark, protocol, control):
                name = task_name(benchmark, protocol, shuffled, variant)
                (out / f"{name}.yaml").write_text(task_yaml(benchmark, protocol, data_dir, shuffled, variant))
                names.append(name)
    return names


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=Path(DEFAULT_DATA))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--no-control", action="store_true")
    args = ap.parse_args(argv)
    names = write_task_dir(args.out, args.data_dir, control=not args.no_control)
    print(f"{len(names)} tasks in {args.out}: {', '.join(names)}")


if __name__ == "__main__":
    main()
