"""Compute accounting: GPU-hours per job from Snakemake's benchmark files, and a projection to
the paper's scale.

    python -m oqvl.report.compute --inputs-json '{"jobs": [[BENCHMARK, MANIFEST], ...],
        "pretrain": {RUN: {"summary": ..., "packed_stats": ...}}}' --config-json '{...}' --out results/compute.csv

The workflow's compute rule declares every file named there as an input (rules/report.smk), and
nothing else is read. Each job's benchmark file (Snakemake's extended format, set in the default
profile) gives wall seconds, CPU seconds, peak RSS, threads and the resources Snakemake granted;
its manifest (oqvl.manifest) gives the work it did and the device it ran on. One row of
compute.csv per job (`row_type=job`): gpu_h = GPUs x wall hours, so a job recorded with gpu 0 (every
toy job) costs no GPU-hours and its throughput is per core; under SLURM, SLURM's own record of each
job stands beside it (slurm_* columns, `slurm_records`). Below the
jobs, `row_type=projection` rows project the paper-scale pretraining from each measured
pretraining run, and `row_type=paper` rows give the paper's own figures; the method is in
docs/compute.md.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..manifest import REPO_ROOT
from ..model.flops import PARTS, ModelCost, flops_per_token

COLUMNS = ["row_type", "stage", "rule", "job", "run", "seed", "device", "gpus", "threads", "wall_h", "gpu_h",
           "cpu_h", "peak_mem_mb", "work", "work_unit", "throughput", "throughput_unit", "benchmark",
           "slurm_job", "slurm_gpus", "slurm_elapsed_h", "slurm_gpu_h", "note"]
GPU_KEYS = ("gpu", "gpus", "nvidia_gpu")  # Snakemake's standard name first, then common aliases
TRAIN_STAGES = ("pretrain", "sft")

# The defaults of config `report:` (schemas/config.schema.yaml documents each key).
DEFAULT_REPORT = {
    "projection": {
        "tokens": 5.0e9,
        "vision_params": 396_905_632,
        "projector_params": 4_131_840,
        "lm_params": 1_543_714_304,
        "lm_head_params": 233_373_696,
        "patches_per_image": 729,
        "visual_tokens": 144,
        "lm_layers": 28,
        "lm_width": 1536,
        "vision_layers": 26,
        "vision_width": 1152,
        "attention_span": 2048.5,
        "text_tokens_per_image": None,
        "trainable": ["projector", "lm"],
    },
    "paper_gpu_hours": {"v1": 442, "v2": 220},
    "paper_device": "A100-40G",
    "paper_device_peak_tflops": 312,
}


# ------------------------------------------------------------------------------ benchmark files

def _literal(text) -> dict:
    """A dict written by Snakemake as a Python repr ({'source': 'ccs'}); {} when it is not one."""
    if not isinstance(text, str) or not text.strip():
        return {}
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return {}
    return value if isinstance(value, dict) else {}


def _number(x) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return math.nan
    return v


def read_benchmark(path: Path) -> list[dict]:
    """The records of one benchmark file (.tsv, or .jsonl), as plain dicts."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    return df.to_dict("records")


def granted_gpus(resources: dict) -> int:
    """The GPUs a job asked for: `gpu` (one node), or GRES gpu per node x nodes (oqvl.cluster)."""
    for key in GPU_KEYS:
        if key in resources:
            return int(_number(resources[key]) or 0)
    if m := re.fullmatch(r"gpu(?::[\w.]+)?:(\d+)", str(resources.get("gres", ""))):
        return int(m.group(1)) * int(_number(resources.get("nodes", 1)) or 1)
    return 0


# ------------------------------------------------------------------------------- SLURM's own record

def slurm_records(job_ids: list[str], run=subprocess.run) -> dict[str, dict]:
    """SLURM's accounting of these jobs, {id: {elapsed_s, gpus, nodes}}: `sacct` (slurmdbd), else
    `sacct --completion` (jobcomp records); {} where neither answers. gpus is NaN where SLURM's
    record has no TRES (job completion records)."""
    if not job_ids or shutil.which("sacct") is None:
        return {}
    fields = ["-n", "-P", "-o", "JobIDRaw,ElapsedRaw,AllocTRES,NNodes", "-j", ",".join(job_ids)]
    for extra in (["-X"], ["--completion"]):
        proc = run(["sacct", *extra, *fields], capture_output=True, text=True)
        if proc.returncode == 0 and proc.stdout.strip():
            break
    else:
        return {}
    out = {}
    for line in proc.stdout.splitlines():
        parts = line.split("|")
        if len(parts) < 4 or parts[0] not in job_ids:
            continue
        tres = dict(t.split("=", 1) for t in parts[2].split(",") if "=" in t)
        gpus = _number(tres.get("gres/gpu", 0)) if parts[2] else math.nan
        out[parts[0]] = {"elapsed_s": _number(parts[1]), "gpus": gpus, "nodes": _number(parts[3])}
    return out


def cross_check(rows: pd.DataFrame, slurm: dict[str, dict]) -> pd.DataFrame:
    """SLURM's elapsed time and GPUs beside each job's own record, and a note where they disagree:
    the GPUs SLURM granted (its TRES, else the job's SLURM_GPUS_ON_NODE x nodes) against those
    recorded, and a benchmark wall time longer than SLURM's whole job (impossible)."""
    rows = rows.copy()
    for i, r in rows.iterrows():
        rec = slurm.get(str(r["slurm_job"]))
        if not rec:
            continue
        gpus = rec["gpus"] if not math.isnan(rec["gpus"]) else r["slurm_gpus"]
        rows.at[i, "slurm_gpus"] = gpus
        rows.at[i, "slurm_elapsed_h"] = rec["elapsed_s"] / 3600
        rows.at[i, "slurm_gpu_h"] = gpus * rec["elapsed_s"] / 3600
        notes = [r["note"]] if r["note"] else []
        if gpus != r["gpus"]:
            notes.append(f"SLURM granted {gpus:g} GPU(s), {r['gpus']} recorded")
        if r["wall_h"] * 3600 > rec["elapsed_s"] + 2:  # SLURM counts whole seconds
            notes.append("benchmark wall time exceeds SLURM's elapsed time")
        rows.at[i, "note"] = "; ".join(notes)
    return rows


@dataclass
class Job:
    stage: str
    rule: str
    wildcards: dict
    params: dict
    resources: dict
    threads: int
    wall_s: float
    cpu_s: float
    peak_mem_mb: float
    benchmark: str
    repeats: int = 1

    @property
    def gpus(self) -> int:
        return granted_gpus(self.resources)

    @property
    def name(self) -> str:
        wc = ",".join(f"{k}={v}" for k, v in sorted(self.wildcards.items()))
        return f"{self.rule}[{wc}]" if wc else self.rule


def parse_job(path: Path, root: Path) -> Job | None:
    """One job from its benchmark file; repeated runs (benchmark: repeat(...)) are averaged."""
    records = read_benchmark(path)
    if not records:
        return None
    rel = Path(path).relative_to(root)
    first = records[0]
    rule = str(first.get("rule_name") or Path(path).stem)
    threads = _number(first.get("threads"))

    def mean(key):
        vals = [_number(r.get(key)) for r in records]
        vals = [v for v in vals if not math.isnan(v)]
        return sum(vals) / len(vals) if vals else math.nan

    return Job(
        stage=rel.parts[0] if len(rel.parts) > 1 else "",
        rule=rule,
        wildcards=_literal(first.get("wildcards")),
        params=_literal(first.get("params")),
        resources=_literal(first.get("resources")),
        threads=1 if math.isnan(threads) else int(threads),
        wall_s=mean("s"),
        cpu_s=mean("cpu_time"),
        peak_mem_mb=max((_number(r.get("max_rss")) for r in records), default=math.nan),
        benchmark=str(Path(path)),
        repeats=len(records),
    )


# ------------------------------------------------------------------------------------ work done

def _json(path: Path):
    return json.loads(Path(path).read_text()) if Path(path).is_file() else None


def work_done(job: Job, manifest: dict | None) -> dict:
    """{work, work_unit, device, gpus, stage}: what the job did, as its manifest records it; a
    job whose manifest is missing did no accounted work (NaN)."""
    if not manifest or "work" not in manifest:
        return {"work": math.nan, "work_unit": ""}
    device = manifest.get("device") or {}
    out = {"work": _number(manifest["work"].get("amount")), "work_unit": manifest["work"].get("unit", ""),
           "device": device.get("type"), "gpus": device.get("gpus")}
    if job.rule in TRAIN_STAGES:
        out["stage"] = manifest.get("stage", job.rule)
    return out


def job_row(job: Job, manifest: dict | None) -> dict:
    work = work_done(job, manifest)
    gpus, notes = job.gpus, []
    reported = _number(work.get("gpus"))
    reported = 0 if math.isnan(reported) else int(reported)
    device = work.get("device") or ""
    # A job that says it ran on GPUs spent them, whatever Snakemake was told to grant.
    if reported > 0 and device and device.lower() != "cpu":
        gpus = reported
    elif gpus > 0 and device.lower() == "cpu":
        notes.append(f"granted {gpus} GPU(s) but ran on the CPU")  # reserved, so still counted
    if not device:
        device = "cpu" if gpus == 0 else ""
    if job.repeats > 1:
        notes.append(f"{job.repeats} repeats averaged")
    wall_h = job.wall_s / 3600
    per, units = (gpus, "gpu") if gpus > 0 else (max(job.threads, 1), "core")
    throughput = work["work"] / (job.wall_s * per) if job.wall_s > 0 else math.nan
    return {
        "row_type": "job",
        "stage": work.get("stage") or job.stage,
        "rule": job.rule,
        "job": job.name,
        "run": job.wildcards.get("run") or job.wildcards.get("name", ""),  # name: a released checkpoint
        "seed": job.wildcards.get("seed", ""),
        "device": device,
        "gpus": gpus,
        "threads": job.threads,
        "wall_h": wall_h,
        "gpu_h": gpus * wall_h,
        "cpu_h": job.cpu_s / 3600,
        "peak_mem_mb": job.peak_mem_mb,
        "work": work["work"],
        "work_unit": work["work_unit"],
        "throughput": throughput,
        "throughput_unit": f"{work['work_unit']}/s/{units}" if work["work_unit"] else "",
        "benchmark": job.benchmark,
        **slurm_of(manifest),
        "note": "; ".join(notes),
    }


def slurm_of(manifest: dict | None) -> dict:
    """The SLURM job a job ran in (its manifest's record of its environment) and the GPUs it was granted."""
    alloc = (manifest or {}).get("slurm") or {}
    if not alloc.get("job_id"):
        return {"slurm_job": "", "slurm_gpus": math.nan}
    gpus = _number(alloc.get("gpus_on_node", 0)) * _number(alloc.get("nodes", 1))
    return {"slurm_job": str(alloc["job_id"]), "slurm_gpus": 0.0 if math.isnan(gpus) else gpus}


def job_rows(jobs: list) -> pd.DataFrame:
    """One row per [benchmark file, manifest] pair (the benchmark's folder names the stage)."""
    rows = []
    for bench, manifest in jobs:
        j = parse_job(Path(bench), Path(bench).parent.parent)
        if j is not None:
            rows.append(job_row(j, _json(manifest)))
    return pd.DataFrame(rows, columns=COLUMNS)


# ------------------------------------------------------------------------------------ projection

def project_hours(tokens_per_s_per_device: float, measured_flops_per_token: float,
                  target_flops_per_token: float, target_tokens: float) -> float:
    """Device-hours to process target_tokens at the measured FLOP rate per device."""
    flop_rate = tokens_per_s_per_device * measured_flops_per_token
    return target_tokens * target_flops_per_token / flop_rate / 3600


def patches_from_open_clip_config(model_name: str) -> int:
    """Patch-grid size of an open_clip vision tower, from its JSON config (no torch import)."""
    import importlib.util

    candidates = [REPO_ROOT / "src" / "oqvl" / "filter" / "model_configs" / f"{model_name}.json"]
    spec = importlib.util.find_spec("open_clip")
    if spec and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidates.append(Path(loc) / "model_configs" / f"{model_name}.json")
    for path in candidates:
        if path.is_file():
            vcfg = json.loads(path.read_text())["vision_cfg"]
            patch = vcfg.get("patch_size")
            if patch is None:  # timm towers name it: vit_so400m_patch14_siglip_384
                m = re.search(r"patch(\d+)", vcfg.get("timm_model_name", ""))
                patch = int(m.group(1)) if m else None
            if patch is None:
                break
            return (int(vcfg["image_size"]) // int(patch)) ** 2
    raise KeyError(f"no open_clip config with a patch size for {model_name!r}")


def preset_model_cost(preset_name: str, params: dict, visual_tokens: int, trainable) -> ModelCost:
    """A measured model with a fresh LM (toy presets): parameter counts from its summary, head
    and patch grid from its preset."""
    preset = json.loads((REPO_ROOT / "src" / "oqvl" / "model" / "model_configs" / f"{preset_name}.json").read_text())
    lm = preset["lm"]["config"]
    head = lm["vocab_size"] * lm["hidden_size"]
    lm_params = float(params["lm"])
    if not lm.get("tie_word_embeddings", False):
        lm_params -= head  # the input embedding is a lookup, not a matmul
    return ModelCost(vision_params=float(params["vision"]), projector_params=float(params["projector"]),
                     lm_params=lm_params, lm_head_params=float(head),
                     patches_per_image=patches_from_open_clip_config(preset["vision"]["open_clip_model"]),
                     visual_tokens=visual_tokens, trainable=tuple(trainable))


def measured_model_cost(summary: dict, stats: dict, config: dict, paper: ModelCost, default_trainable) -> ModelCost:
    """The model a pretraining run trained: its preset (from the summary's train_config, else by
    scale), at the visual tokens its mixture was packed with; a preset that loads a released LM
    is the paper's model. A summary that carries the trainer's own FLOP model (`flop_model`,
    oqvl.model.flops.model_cost) is taken as it is."""
    if summary.get("flop_model"):
        return ModelCost(**summary["flop_model"])
    preset = (summary.get("train_config") or {}).get("preset") or ("toy" if config.get("scale") != "paper" else None)
    path = REPO_ROOT / "src" / "oqvl" / "model" / "model_configs" / f"{preset}.json"
    if preset is None or not path.is_file() or "config" not in json.loads(path.read_text())["lm"]:
        return paper
    vt = int(stats.get("visual_tokens") or (config.get("model") or {}).get("visual_tokens_pretrain")
             or json.loads(path.read_text())["visual_tokens_pretrain"])
    return preset_model_cost(preset, summary["params"], vt, trained_parts(summary, default_trainable))


def trained_parts(summary: dict, default) -> tuple[str, ...]:
    """Which parts a measured run trained, from its trainable parameter count when it gives one."""
    params, n = summary.get("params") or {}, summary.get("trainable_params")
    if n is None or not all(k in params for k in PARTS):
        return tuple(default)
    for parts in (PARTS, ("projector", "lm"), ("projector",), ("vision", "projector")):
        if sum(params[p] for p in parts) == n:
            return parts
    return tuple(default)


def paper_model_cost(proj: dict) -> ModelCost:
    return ModelCost(vision_params=proj["vision_params"], projector_params=proj["projector_params"],
                     lm_params=proj["lm_params"], lm_head_params=proj["lm_head_params"],
                     patches_per_image=proj["patches_per_image"], visual_tokens=proj["visual_tokens"],
                     trainable=tuple(proj["trainable"]), lm_layers=proj["lm_layers"], lm_width=proj["lm_width"],
                     vision_layers=proj["vision_layers"], vision_width=proj["vision_width"])


def report_settings(config: dict) -> dict:
    """config['report'] over the defaults (the key may be absent from older configs)."""
    rep = json.loads(json.dumps(DEFAULT_REPORT))
    user = config.get("report") or {}
    for key, value in user.items():
        if isinstance(value, dict) and isinstance(rep.get(key), dict):
            rep[key].update(value)
        else:
            rep[key] = value
    return rep


def projection_rows(config: dict, pretrain: dict, jobs: pd.DataFrame | None = None) -> list[dict]:
    """One projection per measured pretraining run (pretrain: run -> its summary and its mixture's
    packed stats); then the paper's own figures."""
    rep = report_settings(config)
    proj = rep["projection"]
    paper = paper_model_cost(proj)
    rows, text_used = [], proj["text_tokens_per_image"]
    for run, files in sorted(pretrain.items()):
        summary_path = Path(files["summary"])
        s = _json(summary_path)
        if s is None:
            continue
        stats = _json(files["packed_stats"]) if files.get("packed_stats") else None
        measured_text = (stats["text_tokens"] / stats["documents_packed"]
                         if stats and stats.get("documents_packed") else None)
        text = proj["text_tokens_per_image"] if proj["text_tokens_per_image"] is not None else measured_text
        if text is None or measured_text is None:
            rows.append(_projection_note(run, s, "no packed stats for the run's mixture"))
            continue
        text_used = text
        measured = measured_model_cost(s, stats, config, paper, proj["trainable"])
        loss_fraction = s["loss_tokens"] / s["tokens"] if s.get("tokens") and s.get("loss_tokens") else None
        span = s["attn_pairs"] / s["tokens"] if s.get("attn_pairs") and s.get("tokens") else None
        f_meas = flops_per_token(measured, measured_text, loss_fraction, attention_span=span)
        f_paper = flops_per_token(paper, text, attention_span=proj["attention_span"])
        device = s.get("device") or "cpu"
        on_gpu = device.lower() != "cpu" and (s.get("gpus") or 0) > 0
        per_device = s["tokens_per_s"] / (s["gpus"] if on_gpu else 1)
        hours = project_hours(per_device, f_meas, f_paper, proj["tokens"])
        threads = int(s.get("threads") or _threads_of(jobs, run) or 1)
        unit = "GPU" if on_gpu else "device"
        rows.append({
            "row_type": "projection", "stage": "pretrain", "rule": "", "job": "paper-scale pretraining",
            "run": run, "device": device, "gpus": 1 if on_gpu else 0, "threads": threads,
            "wall_h": hours, "gpu_h": hours if on_gpu else 0.0, "cpu_h": 0.0 if on_gpu else hours * threads,
            "peak_mem_mb": math.nan, "work": proj["tokens"], "work_unit": "tokens",
            "throughput": proj["tokens"] / (hours * 3600), "throughput_unit": f"tokens/s/{unit.lower()}",
            "benchmark": str(summary_path),
            "note": (f"measured {per_device:.4g} tokens/s per {unit} at {f_meas:.4g} FLOP/token "
                     f"({f_meas * per_device:.4g} FLOP/s); paper model {f_paper:.4g} FLOP/token at "
                     f"{text:.1f} text tokens per image; wall_h = {unit}-hours on {device}"
                     + ("" if on_gpu else f", cpu_h = core-hours at {threads} threads")),
        })
    peak = rep["paper_device_peak_tflops"] * 1e12
    for version, hours in rep["paper_gpu_hours"].items():
        note = f"paper's figure ({version})"
        if text_used is not None:
            rate = proj["tokens"] * flops_per_token(paper, text_used, attention_span=proj["attention_span"]) / (hours * 3600)
            note += (f"; implies {rate:.3g} FLOP/s per GPU = {rate / peak:.0%} of "
                     f"{rep['paper_device_peak_tflops']} TFLOP/s peak")
        rows.append({
            "row_type": "paper", "stage": "pretrain", "rule": "", "job": f"Open-Qwen2VL {version}",
            "run": "", "device": rep["paper_device"], "gpus": math.nan, "threads": math.nan,
            "wall_h": math.nan, "gpu_h": float(hours), "cpu_h": math.nan, "peak_mem_mb": math.nan,
            "work": proj["tokens"], "work_unit": "tokens",
            "throughput": proj["tokens"] / (hours * 3600), "throughput_unit": "tokens/s/gpu",
            "benchmark": "", "note": note,
        })
    return rows


def _threads_of(jobs: pd.DataFrame | None, run: str) -> int | None:
    """Threads the run's pretraining job was granted, from its benchmark record."""
    if jobs is None or jobs.empty:
        return None
    mine = jobs[(jobs["run"] == run) & (jobs["stage"] == "pretrain")]
    return int(mine["threads"].max()) if len(mine) else None


def _projection_note(run, summary, why):
    row = {c: math.nan for c in COLUMNS}
    row.update({"row_type": "projection", "stage": "pretrain", "rule": "", "job": "paper-scale pretraining",
                "run": run, "device": summary.get("device", ""), "work_unit": "", "throughput_unit": "",
                "benchmark": "", "note": f"not projected: {why}"})
    return row


def build(inputs: dict, config: dict) -> pd.DataFrame:
    jobs = job_rows(inputs.get("jobs") or [])
    if len(jobs) and (ids := sorted({j for j in jobs["slurm_job"] if j})):
        jobs = cross_check(jobs, slurm_records(ids))
    extra = pd.DataFrame(projection_rows(config, inputs.get("pretrain") or {}, jobs), columns=COLUMNS)
    return pd.concat([jobs, extra], ignore_index=True) if len(jobs) else extra


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs-json", required=True,
                    help='{"jobs": [[benchmark, manifest], ...], "pretrain": {run: {summary, packed_stats}}}')
    ap.add_argument("--config-json", default="{}", help="the resolved workflow config as JSON")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--html", type=Path, default=None, help="also write the table as a standalone page")
    args = ap.parse_args(argv)
    df = build(json.loads(args.inputs_json), json.loads(args.config_json))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False, float_format="%.6g")
    if args.html:
        from . import html as html_page

        args.html.parent.mkdir(parents=True, exist_ok=True)
        shown = [c for c in COLUMNS if c != "benchmark"]
        args.html.write_text(html_page.page(
            "Compute: measured jobs, projection to paper scale, the paper's figures",
            "gpu_h = granted GPUs x wall hours (0 on CPU); throughput per GPU, or per core on CPU. "
            "Projection method: docs/compute.md.",
            html_page.table(df, shown, row_class=lambda r: "paper" if r["row_type"] == "paper" else "repro",
                            table_id="results", fmt=lambda v: f"{v:.4g}")))
    jobs = df[df["row_type"] == "job"]
    print(f"{args.out}: {len(jobs)} jobs, {jobs['gpu_h'].sum():.3f} GPU-h, "
          f"{jobs['wall_h'].sum():.3f} wall-h, {int((df['row_type'] == 'projection').sum())} projections")
    if (checked := jobs["slurm_elapsed_h"].notna()).any():
        print(f"SLURM's accounting of {int(checked.sum())} jobs: {jobs['slurm_gpu_h'].sum():.3f} GPU-h, "
              f"{jobs['slurm_elapsed_h'].sum():.3f} elapsed-h")


if __name__ == "__main__":
    main()
