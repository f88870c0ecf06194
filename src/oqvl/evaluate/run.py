"""Evaluate one checkpoint on one benchmark split: every benchmark, both protocols, the
shuffled-image control, tidy rows.

    python -m oqvl.evaluate --checkpoint results/runs/RUN/seed0/sft/final --run RUN --seed 0 \
        --benchmarks MMBench,POPE --split test --data-dir results/eval_data/test \
        --protocols paper,lmms --batch-size 32 --max-new-tokens 32 --out results/runs/RUN/seed0/eval/test

Writes, in OUT (here results/runs/RUN/seed0/eval/test/), for each benchmark B:
    B/tasks/                      the lmms-eval task YAMLs used, bound to DATA_DIR
    B/<protocol>/results.json     lmms-eval's results JSON (the task and its _shuffled control)
    B/<protocol>/samples_<task>.jsonl   lmms-eval's per-sample log of each task
    B.json                        a JSON list of tidy rows (oqvl.evaluate.tidy)
and last the job's manifest, OUT/manifest.json.

lmms-eval runs in this process through its Python API (`simple_evaluate` with an
`EvaluationTracker`, the calls its CLI makes), offline, with the model loaded once for every
benchmark and protocol: at toy size, start-up (imports, the model) costs more than a benchmark.
Its task index holds only our tasks: indexing its ~2,000 built-in tasks costs more than a toy
evaluation. The `lmms-eval` command itself works too (see adapter.py).

The checkpoint is this project's (lmms-eval model `oqvl`, adapter.py) or a released Qwen2-VL
directory as transformers saves it (`oqvl_qwen2_vl`, qwen2vl.py: lmms-eval's own `qwen2_vl` for
the lmms protocol), told apart by its config.json's model_type.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from ..io import sha256_file, weights_identity, write_text
from ..manifest import manifest_path, write_manifest
from . import BENCHMARKS, PROTOCOLS, SPLITS


def _offline_env() -> None:
    # Before lmms_eval / datasets are imported: both read these at import.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cli_args(**overrides) -> argparse.Namespace:
    """The lmms-eval CLI's default arguments (what its evaluator reads from them), overridden."""
    from lmms_eval.__main__ import parse_eval_args

    argv = sys.argv
    sys.argv = ["lmms-eval"]
    try:
        _, args = parse_eval_args()
    finally:
        sys.argv = argv
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


def checkpoint_format(checkpoint: Path) -> str:
    """`qwen2_vl` for a transformers Qwen2-VL directory (its config.json's model_type, as
    transformers' Auto classes read it), else `oqvl` (this project's checkpoints)."""
    try:
        config = json.loads((Path(checkpoint) / "config.json").read_text())
    except (OSError, ValueError):
        return "oqvl"  # the oqvl loader names what is missing
    return "qwen2_vl" if isinstance(config, dict) and config.get("model_type") == "qwen2_vl" else "oqvl"


def load_model(checkpoint: Path, device: str, batch_size: int, max_new_tokens: int | None):
    """The lmms-eval model for a checkpoint: `oqvl_qwen2_vl` (oqvl.evaluate.qwen2vl) for a Qwen2-VL
    directory, else `oqvl` (oqvl.evaluate.adapter). Imported after _offline_env: both import lmms_eval."""
    if checkpoint_format(checkpoint) == "qwen2_vl":
        from .qwen2vl import Qwen2VL

        return Qwen2VL(pretrained=str(checkpoint), device=device, batch_size=batch_size,
                       max_new_tokens=max_new_tokens)
    from .adapter import OQVL

    return OQVL(pretrained=str(checkpoint), device=device, batch_size=batch_size, max_new_tokens=max_new_tokens)


def run_protocol(lm, model_args: str, tasks: list[str], task_dir: Path, out_dir: Path,
                 batch_size: int, verbosity: str) -> dict:
    """lmms-eval on these tasks; its results JSON and samples JSONL end up in out_dir."""
    from lmms_eval import evaluator, utils
    from lmms_eval.loggers import EvaluationTracker
    from lmms_eval.tasks import TaskManager

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    args = cli_args(model=getattr(lm, "model_id", "oqvl"), model_args=model_args, tasks=",".join(tasks),
                    include_path=str(task_dir), batch_size=str(batch_size), log_samples=True,
                    output_path=str(out_dir), verbosity=verbosity)
    tracker = EvaluationTracker(output_path=str(out_dir))
    stamp = utils.get_datetime_str()
    results = evaluator.simple_evaluate(
        model=lm, model_args=model_args, tasks=tasks, batch_size=batch_size, log_samples=True,
        evaluation_tracker=tracker, verbosity=verbosity, bootstrap_iters=0, cli_args=args,
        task_manager=TaskManager(verbosity, include_path=str(task_dir), include_defaults=False),
        datetime_str=stamp)
    if results is None:
        raise RuntimeError(f"lmms-eval returned no results for {tasks}")
    samples = results.pop("samples")
    tracker.save_results_aggregated(results=results, samples=samples, datetime_str=stamp)
    for task in tasks:
        tracker.save_results_samples(task_name=task, samples=samples[task])
    # Stable names instead of <model>/<timestamp>_*; files lmms-eval's own aggregations write
    # (submissions/) stay where they are.
    written = out_dir / tracker.general_config_tracker.model_name_sanitized
    for src in [f"{tracker.date_id}_results.json", *(f"{tracker.date_id}_samples_{t}.jsonl" for t in tasks)]:
        if (written / src).is_file():
            os.replace(written / src, out_dir / src.replace(f"{tracker.date_id}_", "", 1))
    if written.is_dir() and not any(written.iterdir()):
        written.rmdir()
    missing = [f for f in ["results.json", *(f"samples_{t}.jsonl" for t in tasks)]
               if not (out_dir / f).is_file()]
    if missing:  # lmms-eval logs a failed save and carries on
        raise RuntimeError(f"lmms-eval did not write {missing} in {out_dir}")
    with open(out_dir / "results.json") as f:
        return json.load(f)


def evaluate_benchmark(lm, checkpoint: Path, run: str, benchmark: str, data_dir: Path,
                       protocols: list[str], control: bool, batch_size: int,
                       max_new_tokens: int | None, out: Path, verbosity: str = "WARNING",
                       seed: int | None = None, split: str = "test") -> list[dict]:
    """One benchmark under each protocol with a loaded lmms-eval model: its tidy rows, written to
    OUT, and lmms-eval's files in OUT without its suffix."""
    from .schemas import data_file, read_image_groups
    from .tasks import protocol_tasks, write_task_dir
    from .tidy import read_answers, rows_for

    work = out.with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    task_dir = work / "tasks"
    write_task_dir(task_dir, data_dir, [benchmark], protocols, control)
    model_args = f"pretrained={checkpoint}"
    if max_new_tokens:
        model_args += f",max_new_tokens={max_new_tokens}"
    answers = read_answers(data_file(data_dir, benchmark), benchmark)
    groups = read_image_groups(data_file(data_dir, benchmark), benchmark)
    rows = []
    for protocol in protocols:
        t0 = time.time()
        tasks = protocol_tasks(benchmark, protocol, control)
        results = run_protocol(lm, model_args, tasks, task_dir, work / protocol, batch_size, verbosity)
        for task in tasks:
            got = results["n-samples"][task]["effective"]
            if got != len(answers):
                raise RuntimeError(f"{task}: lmms-eval scored {got} rows, the data has {len(answers)}")
        protocol_rows = rows_for(run, benchmark, protocol, results, answers, control, seed=seed,
                                 split=split, samples_dir=work / protocol, groups=groups)
        if not protocol_rows:
            raise RuntimeError(f"{tasks[0]}: lmms-eval reported none of its metrics")
        rows += protocol_rows
        head = protocol_rows[0]
        print(f"{benchmark} {protocol}: {head['metric']} {head['value']:.2f} (chance "
              f"{head['chance']}, control {head['control']}, above chance {head['above_chance']}) "
              f"in {time.time() - t0:.1f}s", flush=True)
    write_text(out, json.dumps(rows, indent=1) + "\n")
    return rows


def evaluate(checkpoint: Path, run: str, benchmarks: list[str], data_dir: Path, protocols: list[str],
             control: bool, batch_size: int, max_new_tokens: int | None, device: str,
             out: Path, verbosity: str = "WARNING", lm=None, seed: int | None = None,
             split: str = "test") -> dict[str, list[dict]]:
    """Each benchmark's tidy rows (OUT/<benchmark>.json, lmms-eval's files in OUT/<benchmark>/),
    then the manifest of them all. seed: the run's seed the checkpoint was trained with (None: a
    released checkpoint); split: the benchmark split data_dir holds (oqvl.evaluate.SPLITS),
    written into every row. lm: an lmms-eval model to use instead of loading the checkpoint (tests)."""
    _offline_env()
    from .schemas import check_schema, data_file

    # Every file is checked before the model loads: a bad one stops the job at once.
    files = [(b, data_file(data_dir, b, shuffled)) for b in benchmarks
             for shuffled in ((False, True) if control else (False,))]
    for b, path in files:
        check_schema(path, b)
    data = [path for _, path in files]
    out.mkdir(parents=True, exist_ok=True)
    # lmms-eval's datasets cache (arrow copies of the parquet files) lives and dies with this call.
    # One fixed name, cleared first: a killed job's cache is not a declared output, so Snakemake
    # does not remove it; its rerun does.
    cache = out / ".hf_datasets"
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir()
    previous_cache = os.environ.get("LMMS_EVAL_DATASETS_CACHE")
    os.environ["LMMS_EVAL_DATASETS_CACHE"] = str(cache)
    try:
        if lm is None:
            t0 = time.time()
            lm = load_model(checkpoint, device, batch_size, max_new_tokens)
            print(f"model {checkpoint} ({getattr(lm, 'model_id', 'oqvl')}) loaded in {time.time() - t0:.1f}s",
                  flush=True)
        rows = {b: evaluate_benchmark(lm, checkpoint, run, b, data_dir, protocols, control, batch_size,
                                      max_new_tokens, out / f"{b}.json", verbosity, seed, split)
                for b in benchmarks}
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        if previous_cache is None:
            os.environ.pop("LMMS_EVAL_DATASETS_CACHE", None)
        else:
            os.environ["LMMS_EVAL_DATASETS_CACHE"] = previous_cache
    config = {"checkpoint": str(checkpoint), "run": run, "seed": seed, "split": split,
              "benchmarks": benchmarks, "data_dir": str(data_dir), "protocols": protocols,
              "control": control, "batch_size": batch_size, "max_new_tokens": max_new_tokens,
              "device": device, "out": str(out)}
    files = [out / f"{b}.json" for b in benchmarks]
    files += sorted(p for b in benchmarks for p in (out / b).rglob("*") if p.is_file())
    write_manifest(manifest_path(out), "evaluate", work=(sum(r["n"] for b in rows for r in rows[b]), "samples"),
                   config=config, files=files,
                   counts={"rows": sum(map(len, rows.values())), "benchmarks": len(benchmarks),
                           "protocols": len(protocols)},
                   inputs={str(checkpoint): weights_identity(checkpoint), **{str(f): sha256_file(f) for f in data}},
                   device=device, gpus=int(str(device).startswith("cuda")))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True,
                    help="checkpoint directory (config.json, weights, tokenizer): this project's, or a "
                         "transformers Qwen2-VL directory (model_type qwen2_vl: model oqvl_qwen2_vl)")
    ap.add_argument("--run", required=True, help="run name written into every row")
    ap.add_argument("--seed", type=int, default=None, help="the run's seed the checkpoint was trained with")
    ap.add_argument("--split", default="test", choices=SPLITS, help="the benchmark split --data-dir holds")
    ap.add_argument("--benchmarks", default=",".join(BENCHMARKS), help=f"comma-separated, of {BENCHMARKS}")
    ap.add_argument("--data-dir", type=Path, default=Path("results/eval_data/test"), help="one split's benchmark files")
    ap.add_argument("--protocols", default=",".join(PROTOCOLS))
    ap.add_argument("--no-control", action="store_true", help="skip the shuffled-image control")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help="cap on generation length (default: each task's own)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--verbosity", default="WARNING")
    ap.add_argument("--out", type=Path, required=True, help="folder: <benchmark>.json tidy rows, their files, the manifest")
    args = ap.parse_args(argv)
    protocols = [p for p in args.protocols.split(",") if p]
    unknown = set(protocols) - set(PROTOCOLS)
    if unknown or not protocols:
        raise SystemExit(f"--protocols: choose from {PROTOCOLS}, got {args.protocols!r}")
    benchmarks = [b for b in args.benchmarks.split(",") if b]
    unknown = set(benchmarks) - set(BENCHMARKS)
    if unknown or not benchmarks:
        raise SystemExit(f"--benchmarks: choose from {BENCHMARKS}, got {args.benchmarks!r}")
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    t0 = time.time()
    from ..model.vlm import CheckpointError
    from .schemas import SchemaError

    try:
        rows = evaluate(args.checkpoint, args.run, benchmarks, args.data_dir, protocols,
                        not args.no_control, args.batch_size, args.max_new_tokens, args.device, args.out,
                        args.verbosity, seed=args.seed, split=args.split)
    except (SchemaError, CheckpointError) as e:  # checked before any question is asked
        sys.exit(f"error: {e}")
    print(f"{sum(map(len, rows.values()))} rows of {len(rows)} benchmarks -> {args.out} in {time.time() - t0:.1f}s")
