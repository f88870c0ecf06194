"""What each rule reads and passes, derived from the config: the rules' input functions and flags.

The rules (rules/*.smk) stay declarations; the decisions behind their inputs live here, in plain
Python that tests can call: which kept set a mixture reads, which flags a run trains with, which
jobs a run's results rest on (what the report declares as its inputs), and what a table reads
of each run. Paths are oqvl.layout's; what exists at this scale is oqvl.scale's.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from . import layout as L
from .config import run_seeds
from .evaluate import SPLITS
from .scale import Scale

Job = tuple[str, dict]  # (rule, wildcards)
# What a run trains with, from the train section (a run's own entry overrides it): on/off switches,
# then the speed options that take a value (docs/performance.md).
TRAIN_SWITCHES = ("freeze_vision", "doc_isolation", "grad_checkpointing", "fused_adamw", "compile", "tensorboard",
                  "wandb")
TRAIN_OPTIONS = ("attention", "workers")
SFT_ONLY = ("max_len", "too_long")  # optimisation keys that pretraining has no use for


def as_json(obj) -> str:
    """A config fragment as one compact JSON string for a command line (quote with :q)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Plan:
    config: dict
    scale: Scale

    @property
    def benchmarks(self) -> list[str]:
        return self.config["evaluate"]["benchmarks"]

    # --------------------------------------------------------------------------------- raw
    def import_args(self, source: str) -> str:
        """import_pairs' flags for a source's release: its format and columns (a null one left out)."""
        src = self.config["sources"][source]
        flags = {"format": src["format"], "url-col": src["url_col"], "caption-col": src["caption_col"],
                 "uid-col": src["uid_col"], "bbox-col": src["bbox_col"]}
        return " ".join(f"--{k} {shlex.quote(v)}" for k, v in flags.items() if v is not None)

    def ingest_args(self, source: str) -> str:
        revision = self.config["sources"][source]["revision"]
        return f"--revision {shlex.quote(revision)}" if revision is not None else ""

    def download_options(self, source: str) -> dict:
        """img2dataset's options for a source: the raw section, the source's own `download` over it."""
        return {**self.config["raw"], **self.config["sources"][source].get("download", {})}

    def source_shards(self, source: str) -> str:
        """Where a source's shards lie: the released folder (ingested) or the download's."""
        if source in self.scale.ingested:
            return self.config["sources"][source]["shards"]
        return L.shards(source)

    def source_pairs(self, source: str) -> dict:
        """What lists a source's pairs for a keep rule: an ingested source's sample list (valid
        samples only), else its downloaded shards (img2dataset's tables)."""
        if source in self.scale.ingested:
            return {"samples": L.samples(source)}
        return {"shards": L.shards(source)}

    # ------------------------------------------------------------------------------ filter
    def filter_spec(self, source: str, which: str = "filter") -> dict:
        """The filter behind a kept set: the source's own (`filter`) or a named one of filter.extra."""
        if which == "filter":
            return self.config["filter"]["sources"][source]
        return self.extra_filters()[which]

    def extra_filters(self) -> dict:
        return self.config["filter"].get("extra") or {}

    def scorer_filters(self) -> list[tuple[str, str]]:
        """(source, filter name) of every filter that runs a user's scorer (rule user_score)."""
        own = [(s, "filter") for s, spec in self.config["filter"]["sources"].items() if spec["method"] == "scorer"]
        return own + [(spec["source"], n) for n, spec in self.extra_filters().items() if spec["method"] == "scorer"]

    def scores_file(self, source: str, which: str = "filter") -> str | None:
        """The per-pair scores a filter keeps by; None for a uid list or method none."""
        spec = self.filter_spec(source, which)
        return {"clip": L.clip_scores(source), "scorer": L.user_scores(source, which),
                "scores": spec.get("scores")}.get(spec["method"])

    def scorer_args(self, source: str, which: str) -> str:
        """rule user_score's flags: the scorer, its options and batch size."""
        from .filter.user import BATCH_SIZE

        spec = self.filter_spec(source, which)
        return (f"--scorer {shlex.quote(spec['scorer'])} --options {shlex.quote(as_json(spec.get('options', {})))}"
                f" --batch-size {spec.get('batch_size', BATCH_SIZE)}")

    def keep_inputs(self, source: str, which: str = "filter") -> dict:
        """A keep job's inputs: the source's pairs (with the released uid list or a user's scores
        file), or the scores of a scoring rule."""
        spec = self.filter_spec(source, which)
        if spec["method"] == "uid_list":
            return {"uid_list": spec["uid_list"], **self.source_pairs(source)}
        if spec["method"] == "none":
            return self.source_pairs(source)
        if spec["method"] == "scores":
            return {"user_scores": spec["scores"], "shards": L.shards(source)}
        if spec["method"] == "scorer":
            return {"scores": L.user_scores(source, which), "failures": L.user_failures(source, which)}
        return {"scores": L.clip_scores(source), "failures": L.clip_failures(source)}

    def keep_args(self, source: str, input, which: str = "filter") -> str:
        spec = self.filter_spec(source, which)
        if spec["method"] in ("uid_list", "none"):
            pairs = " ".join(f"--{k} {input[k]}" for k in self.source_pairs(source))
            return f"--uid-list {input.uid_list} {pairs}" if spec["method"] == "uid_list" else f"--keep-all {pairs}"
        rule = f"--threshold {spec['threshold']}" if "threshold" in spec else f"--fraction {spec['fraction']}"
        if spec["method"] == "scores":
            return f"--user-scores {shlex.quote(input.user_scores)} --shards {input.shards} {rule}"
        return f"--scores {input.scores} --failures {input.failures} {rule}"

    def quality_entries(self) -> list[tuple[str, str, str, str]]:
        """(source, filter name, scores or '-', kept set) of every filter to judge (toy sources)."""
        out = [(s, self.filter_spec(s)["method"], self.scores_file(s) or "-", L.kept(s)) for s in self.scale.generated]
        out += [(spec["source"], n, self.scores_file(spec["source"], n) or "-", L.kept(spec["source"], n))
                for n, spec in self.extra_filters().items() if spec["source"] in self.scale.generated]
        mlm = self.config["filter"].get("mlm")
        for s in (mlm["sources"] if mlm else []):
            if s in self.scale.generated:
                out += [(s, "mlm", L.mlm_scores(s), L.kept(s, "mlm")), (s, "union", "-", L.kept(s, "union"))]
        return out

    # ----------------------------------------------------------------------------- mixture
    def mixture_kept(self, mixture: str) -> list[tuple[str, str]]:
        """(source, kept set) of each source of a mixture: its own filter's unless the mixture says."""
        mix = self.config["mixtures"][mixture]
        return [(s, mix["kept"].get(s, "filter")) for s in mix["sources"]]

    def mixture_parts(self, mixture: str) -> dict:
        parts = self.mixture_kept(mixture)
        return {"shards": [self.source_shards(s) for s, _ in parts], "kept": [L.kept(s, k) for s, k in parts]}

    # ------------------------------------------------------------------------------- train
    def run_mixture(self, run: str) -> str:
        return self.config["runs"][self.pretrain_run(run)]["mixture"]

    def pretrain_run(self, run: str) -> str:
        """The run whose pretraining a run fine-tunes: its own, or the one it names in pretrained_from
        (an SFT-only variant, e.g. the final model's other SFT data, shares the pretraining)."""
        return self.config["runs"][run].get("pretrained_from") or run

    def pretraining_runs(self) -> list[str]:
        return [r for r in self.config["runs"] if self.pretrain_run(r) == r]

    def seeds(self, run: str) -> list[int]:
        """The seeds of a run: one pretrain -> SFT -> evaluate chain each."""
        return run_seeds(self.config, run)

    def sft_data(self, run: str) -> dict:
        """{path, image_root, name} a run fine-tunes on: its own sft_data, else the config's."""
        own = self.config["runs"][run].get("sft_data")
        if own:
            return {"image_root": None, "name": None, **own}
        top = self.config["sft_data"]
        return {"path": self.scale.sft_data, "image_root": self.scale.sft_image_root, "name": top.get("name")}

    def sft_data_name(self, run: str) -> str:
        """What a run fine-tuned on, as the tables name it: the data's name, else its file's name."""
        sft = self.sft_data(run)
        if sft.get("name"):
            return sft["name"]
        return "toy conversations (generated)" if self.scale.has("sft_data") and sft["path"] == self.scale.sft_data \
            else Path(sft["path"]).name

    def train_flags(self, run: str) -> str:
        """Train switches and speed options of a run: the train section, overridden by the run's own entry."""
        own = self.config["runs"][run]
        spec = {k: own.get(k, self.config["train"][k]) for k in TRAIN_SWITCHES + TRAIN_OPTIONS}
        flags = [f"--{'' if spec[k] else 'no-'}{k.replace('_', '-')}" for k in TRAIN_SWITCHES]
        flags += [f"--{k} {shlex.quote(str(spec[k]))}" for k in TRAIN_OPTIONS if spec[k] not in ("", None)]
        return " ".join(flags)

    def optim_flags(self, stage: str, run: str | None = None) -> str:
        """A stage's optimisation flags: the train section's, with a run's own length (steps,
        epochs) for its SFT."""
        def value(v):
            return " ".join(map(str, v)) if isinstance(v, list) else str(v)  # betas: two numbers

        opts = dict(self.config["train"][stage])
        if run is not None and stage == "sft":
            opts.update(self.config["runs"][run].get("sft") or {})
        flags = [f"--{k.replace('_', '-')} {value(v)}" for k, v in opts.items()
                 if not (stage == "pretrain" and k in SFT_ONLY)]
        return " ".join([*flags, f"--document-tokens {self.config['pack']['document_tokens']}"])

    # ---------------------------------------------------------------------------- evaluate
    def data_splits(self) -> list[str]:
        """The benchmark splits the eval_data rule writes: a release's test split, or the toy
        benchmarks' test, heldout (test reworded) and dev (tuning) splits."""
        return ["test"] if self.scale.real_benchmarks is not None else list(SPLITS)

    def report_splits(self) -> list[str]:
        """The splits every run is evaluated on and the tables report (evaluate.splits; null: every
        one the scale has but dev, which is for tuning only)."""
        return self.config["evaluate"]["splits"] or [s for s in self.data_splits() if s != "dev"]

    def eval_data_files(self) -> list[str]:
        shuffled = (False, True) if self.config["evaluate"]["shuffled_control"] else (False,)
        return [L.eval_data(b, split, s) for s in shuffled for split in self.data_splits() for b in self.benchmarks]

    def training_streams(self) -> dict[str, int]:
        """Toy-world streams a model trains on (name -> images): no benchmark image may equal one."""
        streams = {s: self.config["sources"][s]["n_pairs"] for s in self.scale.generated}
        if self.scale.has("train_clip"):
            streams["clip_seed"] = self.config["filter"]["clip"]["train"]["n_pairs"]  # the toy tower's images
        if self.scale.has("sft_data"):
            streams["sft"] = self.config["sft_data"]["n_conversations"]
        return streams

    def eval_data_command(self, world_args: str) -> str:
        """The module that writes the benchmark files: toy benchmarks, or the releases converted."""
        if self.scale.real_benchmarks is not None:
            sources = " ".join(f"--source {b}={shlex.quote(self.scale.real_benchmarks[b])}" for b in self.benchmarks)
            return f"-m oqvl.evaluate.convert {sources}"
        excludes = " ".join(f"--exclude {s}:{n}" for s, n in self.training_streams().items())
        sizes = as_json({b: self.config["evaluate"]["toy_sizes"][b] for b in self.benchmarks})
        return f"-m oqvl.evaluate.toy --sizes {shlex.quote(sizes)} {world_args} {excludes}"

    # ------------------------------------------------------------------------------ report
    def source_jobs(self, source: str, kept: str) -> list[Job]:
        """The jobs behind one source's kept set (`filter`, `mlm` or `union`)."""
        wc = {"source": source}
        if source in self.scale.ingested:
            jobs = [("ingest_shards", wc)]
        else:
            jobs = [("generate_pairs" if source in self.scale.generated else "import_pairs", wc), ("download", wc)]
        if kept in self.extra_filters():
            return jobs + self.filter_jobs(source, kept)
        if self.filter_spec(source)["method"] == "clip":
            jobs.append(("clip_score", wc))
        if self.filter_spec(source)["method"] == "scorer":
            jobs.append(("user_score", {**wc, "which": "filter"}))
        jobs.append(("keep", wc))
        if kept in ("mlm", "union"):
            jobs += [("mlm_import" if self.scale.mlm == "import" else "mlm_score", wc), ("keep_mlm", wc)]
        if kept == "union":
            jobs.append(("keep_union", wc))
        return jobs

    def filter_jobs(self, source: str, which: str) -> list[Job]:
        """The scoring and keep jobs of a named filter of filter.extra."""
        method = self.filter_spec(source, which)["method"]
        wc = {"source": source, "which": which}
        scoring = {"clip": [("clip_score", {"source": source})], "scorer": [("user_score", wc)]}.get(method, [])
        return scoring + [("keep_extra", wc)]

    def toy_jobs(self, *rules: str) -> list[Job]:
        return [(r, {}) for r in rules if self.scale.has(r)]

    def run_jobs(self, run: str) -> list[Job]:
        """Every job one run's results rest on, from the raw pairs to its evaluations."""
        mixture = self.run_mixture(run)
        jobs = [j for s, k in self.mixture_kept(mixture) for j in self.source_jobs(s, k)]
        if any(r == "mlm_score" for r, _ in jobs):
            jobs += self.toy_jobs("mlm_filter_seed", "train_mlm_filter")
            if self.scale.mlm == "release":
                jobs.append(("convert_mlm_filter", {}))
        jobs += self.toy_jobs("train_clip", "tokenizer", "sft_data")
        jobs += [("mixture", {"mixture": mixture}), ("pack", {"mixture": mixture}), ("eval_data", {})]
        for seed in self.seeds(run):
            jobs += [("pretrain", {"run": self.pretrain_run(run), "seed": seed}), ("sft", {"run": run, "seed": seed})]
            jobs += [("evaluate", wc) for wc in self.eval_wildcards(run, seed)]
        return _unique(jobs)

    def eval_wildcards(self, run: str, seed: int) -> list[dict]:
        """The evaluate jobs of one seed of a run: one per reported split (every benchmark)."""
        return [{"run": run, "seed": seed, "split": split} for split in self.report_splits()]

    def eval_rows(self, run: str) -> list[str]:
        """Every seed's tidy rows of a run: each reported split and benchmark."""
        return [L.eval_rows(benchmark=b, **wc) for seed in self.seeds(run)
                for wc in self.eval_wildcards(run, seed) for b in self.benchmarks]

    def released(self, fmt: str | None = None) -> dict:
        """The released checkpoints (config `released`), or those of one format."""
        released = self.config.get("released") or {}
        return {n: r for n, r in released.items() if fmt is None or r["format"] == fmt}

    def released_checkpoint(self, name: str) -> str:
        """The config.json of what evaluate_released loads: the converted checkpoint (prismatic), or
        the downloaded Qwen2-VL directory itself (qwen2_vl, read as transformers saved it)."""
        spec = self.released()[name]
        return f"{spec['model_dir']}/config.json" if spec["format"] == "qwen2_vl" else L.released_model(name)

    def _released_converted(self, name: str) -> bool:
        return self.released()[name]["format"] == "prismatic"

    def released_jobs(self, name: str) -> list[Job]:
        convert = [("convert_released", {"name": name})] if self._released_converted(name) else []
        return [*convert, ("eval_data", {}), ("evaluate_released", {"name": name, "split": "test"})]

    def released_record(self, name: str) -> dict:
        """What table4 reads of a released checkpoint: its evaluation rows and their manifests."""
        convert = [L.manifest("convert_released", name=name)] if self._released_converted(name) else []
        return {"evals": [L.released_eval_rows(name, b, "test") for b in self.benchmarks],
                "manifests": [*convert, L.manifest("evaluate_released", name=name, split="test")],
                **{k: self.released()[name].get(k) for k in ("sft_data", "paper_row", "revision")}}

    def all_jobs(self) -> list[Job]:
        """Every accounted job: the configured runs', the released checkpoints' evaluations, every
        packed mixture, (toy) the filter report and the extra filters it judges."""
        jobs = [j for run in self.config["runs"] for j in self.run_jobs(run)]
        jobs += [j for name in self.released() for j in self.released_jobs(name)]
        for m in self.config["mixtures"]:
            jobs += [("mixture", {"mixture": m}), ("pack", {"mixture": m})]
        if self.scale.has("filter_quality"):  # the report judges every extra filter of a toy source
            jobs += [j for _, n, _, k in self.quality_entries() if n in self.extra_filters()
                     for j in self.source_jobs(self.extra_filters()[n]["source"], n)]
        return _unique(jobs + self.toy_jobs("filter_quality"))

    def run_record(self, run: str) -> dict:
        """What a table reads of one run: every seed's evaluation rows, pretraining summaries and
        jobs, and the manifests its rows' provenance lists."""
        mixture, pretrained, seeds = self.run_mixture(run), self.pretrain_run(run), self.seeds(run)
        chains = [(r, wc) for seed in seeds for r, wc in
                  [("pretrain", {"run": pretrained, "seed": seed}), ("sft", {"run": run, "seed": seed}),
                   *[("evaluate", wc) for wc in self.eval_wildcards(run, seed)]]]
        return {
            "mixture": mixture,
            "sft_data": self.sft_data_name(run),
            "seeds": seeds,
            "evals": self.eval_rows(run),
            "pretrain_summaries": [L.train_summary(pretrained, "pretrain", seed) for seed in seeds],
            "pretrain_jobs": [job_files(("pretrain", {"run": pretrained, "seed": seed})) for seed in seeds],
            "manifests": [L.manifest(r, **wc) for r, wc in
                          [("mixture", {"mixture": mixture}), ("pack", {"mixture": mixture}), *chains]],
        }

    def compute_inputs(self) -> dict:
        """What the accounting reads: every job's benchmark file and manifest; each run's pretraining
        summary (its first seed's: the seeds train the same tokens) and its mixture's packed stats
        (the projection)."""
        return {"jobs": [job_files(j) for j in self.all_jobs()],
                "pretrain": {run: {"summary": L.train_summary(run, "pretrain", self.seeds(run)[0]),
                                   "packed_stats": L.packed_stats(self.run_mixture(run))}
                             for run in self.pretraining_runs()}}

    def report_config(self) -> dict:
        """The config keys the report reads (the params show what the rule depends on)."""
        return {k: self.config.get(k) for k in ("scale", "model", "mixtures", "runs", "table4_run", "report")}


def job_files(job: Job) -> list[str]:
    """[benchmark file, manifest] of a job: what the accounting reads of it."""
    rule, wc = job
    return [L.benchmark(rule, **wc), L.manifest(rule, **wc)]


def record_files(record: dict) -> list[str]:
    """Every file a run record (or a released checkpoint's) names: a table rule's inputs."""
    if "pretrain_summaries" not in record:
        return [*record["evals"], *record["manifests"]]
    return [*record["evals"], *record["pretrain_summaries"], *(f for job in record["pretrain_jobs"] for f in job),
            *record["manifests"]]


def compute_files(inputs: dict) -> list[str]:
    return [*(f for pair in inputs["jobs"] for f in pair),
            *(f for p in inputs["pretrain"].values() for f in p.values())]


def _unique(jobs: list[Job]) -> list[Job]:
    seen, out = set(), []
    for rule, wc in jobs:
        key = (rule, tuple(sorted(wc.items())))
        if key not in seen:
            seen.add(key)
            out.append((rule, wc))
    return out
