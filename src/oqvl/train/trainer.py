"""Pretraining and SFT of Open-Qwen2VL: one loop, torchrun + FSDP2, checkpoints that resume exactly.

    torchrun --standalone --nproc-per-node 2 -m oqvl.train pretrain --out results/runs/R/pretrain \\
        --packed results/packed/M --shards results/mixtures/M/shards --tokenizer results/model/tokenizer \\
        --preset toy --vision-weights results/filter/clip_model --steps 150 --global-batch 8 ...
    torchrun --standalone --nproc-per-node 1 -m oqvl.train sft --out results/runs/R/sft \\
        --init-from results/runs/R/pretrain/final --sft-data results/sft_data/toy.parquet ...

Both stages: the model is wrapped with FSDP2 (`fully_shard` on every decoder layer, then the
whole model), bf16 mixed precision on CUDA and fp32 on the CPU (gloo); AdamW without weight decay
on 1-D parameters (biases, norms), linear warmup then cosine, gradient clipping. The loss of a
global batch is the mean over all its loss tokens, whatever the number of processes and micro
batches (each micro batch's summed loss is divided by the global token count), so 1 and 2
processes train the same model up to float rounding.

Outputs in --out: train_log.jsonl (one line per step: step, loss, lr, tokens, tokens_per_s,
grad_norm, ...), loss.png, checkpoints/ (sharded, every --save-every steps; see checkpoint.py),
final/ (the consolidated model + tokenizer: config.json, model.safetensors, tokenizer files),
summary.json (steps, tokens, seconds, throughput, device) and, last, manifest.json (oqvl.manifest:
tokens trained, the resolved config, the identity of every input).

SIGTERM (SLURM's time limit, preemption) during the steps: a checkpoint at the end of the current
step, then exit STOPPED_EXIT; the rerun resumes there. oqvl.train.launch starts torchrun on one
node or, under SLURM, several.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from tqdm import tqdm

from ..io import sha256_file, weights_identity, write_json
from ..manifest import manifest_path, write_manifest
from ..model.chat import vision_ids
from ..model.config import PRESET_DIR
from ..model.flops import model_cost, peak_flops, step_flops
from ..model.tokenizer import (
    DOCUMENT_TOKENS,
    ENDOFTEXT,
    check_fits,
    document_bos_id,
    training_tokenizer,
)
from ..model.vlm import DENSE_MASK_ATTENTION, PACKED_ATTENTION, OpenQwen2VL
from . import checkpoint as ckpt
from .data import Conversations, PackedCaptions
from .loader import step_batches
from .metrics import PhaseClock, StepLog, peak_memory_mb
from .plot import plot_loss
from .sft_data import load_records

FAULT_ENV = "OQVL_FAULT_AFTER_STEP"  # tests: exit abruptly after this step (a crash mid-run)
STOPPED_EXIT = 128 + signal.SIGTERM  # told to stop (SIGTERM), checkpoint saved: rerun to resume


@dataclass
class TrainConfig:
    stage: str
    """pretrain or sft."""
    out: str
    """Run stage directory (train_log.jsonl, checkpoints/, final/, summary.json)."""
    tokenizer: str
    """Tokenizer directory (copied into final/)."""
    # data
    packed: str | None = None
    """pretrain: the packed mixture directory (oqvl.pack output)."""
    shards: str | None = None
    """pretrain: the mixture's webdataset shards (images are read from there by key)."""
    sft_data: str | None = None
    """sft: toy parquet or LLaVA-format JSON."""
    image_root: str | None = None
    """sft: folder that LLaVA records' image paths are relative to (default: the JSON's folder)."""
    # model
    preset: str = "toy"
    """pretrain: model preset (oqvl/model/model_configs/NAME.json)."""
    vision_weights: str | None = None
    """pretrain: vision tower weights (toy CLIP checkpoint dir, or open_clip .safetensors)."""
    lm_path: str | None = None
    """pretrain: local Hugging Face directory of the LLM (paper scale)."""
    init_from: str | None = None
    """sft: the pretrained model directory (pretrain's final/)."""
    visual_tokens_pretrain: int = 0
    """pretrain: visual tokens per image in pretraining (0: the preset's)."""
    visual_tokens_sft: int = 0
    """pretrain: visual tokens per image the model will use in SFT (0: the preset's)."""
    random_init: bool = False
    """pretrain: build the preset's LM from its published config with random weights, no --lm-path (smoke tests, benchmarks)."""
    lm_layers: int = 0
    """pretrain: keep the first N decoder layers at full width (0: all; the reduced-depth smoke configuration)."""
    vision_layers: int = 0
    """pretrain: keep the first N vision tower blocks at full width (0: all)."""
    projector: str = "avgpool"
    """pretrain: avgpool (Open-Qwen2VL's) or merger2x2 (Qwen2-VL's), oqvl.model.config; SFT keeps the pretrained model's."""
    freeze_vision: bool = True
    doc_isolation: bool = True
    """pretrain: block-diagonal attention + per-document positions in packed sequences."""
    # speed (none changes what is computed beyond float rounding; docs/performance.md)
    grad_checkpointing: bool = False
    """Recompute each decoder layer in the backward pass (activation memory for time)."""
    attention: str = ""
    """Attention kernel: sdpa or eager (packed documents by a dense mask), flex_attention or flash_attention_2 (packed documents without a T x T mask); empty: the model's own (sdpa)."""
    fused_adamw: bool = False
    """AdamW's fused kernel (one kernel for all parameters) instead of the per-tensor loop."""
    compile: bool = False
    """torch.compile each decoder layer."""
    workers: int = 0
    """Data-loader worker processes that read, decode and batch ahead of the step (0: in the training process)."""
    prefetch: int = 2
    """Micro batches each worker keeps ready."""
    max_len: int = 2048
    """sft: longest conversation in tokens (see too_long)."""
    too_long: str = "raise"
    """sft: a conversation over max_len is an error (raise) or cut as the reference does (truncate, counted)."""
    document_tokens: str = "project"
    """BOS/EOS convention (oqvl.model.tokenizer.DOCUMENT_TOKENS); pretraining checks the packing's."""
    # optimisation
    steps: int = 0
    """Optimizer steps; 0 = derive from epochs."""
    epochs: float = 1.0
    global_batch: int = 8
    """Sequences (pretrain) or conversations (sft) per optimizer step, over all processes."""
    micro_batch: int = 8
    """Per process per forward/backward (gradient accumulation makes up the rest)."""
    lr: float = 1e-3
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    warmup_frac: float = 0.03
    grad_clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    # bookkeeping
    seed: int = 0
    save_every: int = 50
    keep_last: int = 2
    threads: int = 0
    """torch CPU threads per process (0: leave torch's default)."""
    tensorboard: bool = True
    """TensorBoard event files in OUT/tensorboard (the train_log.jsonl fields, per step)."""
    wandb: bool = False
    """Also log to Weights & Biases in offline mode (OUT/wandb; `wandb sync` uploads it later)."""
    peak_tflops: float = 0.0
    """Peak TFLOP/s per process for MFU (0: the GPU's dense bf16 peak by its name; none known on a CPU)."""
    time_phases: bool = False
    """Log forward / backward / optimizer seconds per step (synchronises the GPU after each phase)."""

    def __post_init__(self):
        if self.stage not in ("pretrain", "sft"):
            raise ValueError(f"stage must be pretrain or sft, got {self.stage!r}")
        need = ("packed", "shards") if self.stage == "pretrain" else ("sft_data", "init_from")
        missing = [k for k in need if not getattr(self, k)]
        if missing:
            raise ValueError(f"{self.stage} needs --{' --'.join(k.replace('_', '-') for k in missing)}")
        for k in ("global_batch", "micro_batch", "save_every"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be at least 1")
        self.betas = tuple(self.betas)
        if self.too_long not in ("raise", "truncate"):
            raise ValueError(f"too_long must be raise or truncate, got {self.too_long!r}")
        if self.document_tokens not in DOCUMENT_TOKENS:
            raise ValueError(f"document_tokens must be one of {DOCUMENT_TOKENS}, got {self.document_tokens!r}")
        kernels = DENSE_MASK_ATTENTION + PACKED_ATTENTION
        if self.attention and self.attention not in kernels:
            raise ValueError(f"attention must be one of {kernels} (or empty), got {self.attention!r}")
        if self.workers < 0 or self.prefetch < 1:
            raise ValueError("workers must be at least 0 and prefetch at least 1")

    def resume_key(self) -> dict:
        """What must match for a checkpoint to be resumed (not paths, threads or save cadence)."""
        skip = {"out", "save_every", "keep_last", "threads", "tokenizer", "packed", "shards",
                "sft_data", "image_root", "vision_weights", "lm_path", "init_from",
                "workers", "prefetch", "tensorboard", "wandb", "peak_tflops", "time_phases"}
        if self.projector == "avgpool":
            skip.add("projector")  # the default keeps the key it had before the switch: its checkpoints resume
        return {k: v for k, v in asdict(self).items() if k not in skip}

    def input_files(self) -> list[Path]:
        """The data and preset files trained on: their content, not their path, is keyed."""
        if self.stage == "sft":
            return [Path(self.sft_data)]
        files = [Path(self.packed) / "sequences.parquet", PRESET_DIR / f"{self.preset}.json"]
        return [f for f in files if f.is_file()]

    def input_weights(self) -> dict[str, str | None]:
        """The model weights trained from (a missing one is None)."""
        if self.stage == "sft":
            return {"init_from": self.init_from}
        return {"vision_weights": self.vision_weights, "lm_path": self.lm_path}

    def inputs(self) -> dict[str, str]:
        """The content identity of what is trained on and from: new data, new starting weights or
        an edited preset (its LM config, init scale included) under the same paths make old
        checkpoints another run's."""
        files = {f"{f.parent.name}/{f.name}": sha256_file(f) for f in self.input_files()}
        return {**files, **{k: weights_identity(w) for k, w in self.input_weights().items()}}


# --------------------------------------------------------------------------------- distributed

def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world, device). Under torchrun the env tells all; a plain `python -m` run is a
    one-process group, so FSDP2 and the checkpoint code take the same path either way."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        with tempfile.NamedTemporaryFile(prefix="oqvl-pg-", delete=False) as f:
            store = f.name
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{store}",
                                rank=0, world_size=1)
    else:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def shard_model(model: OpenQwen2VL, device: torch.device) -> None:
    """FSDP2: each decoder layer its own unit (all-gathered just in time), then the rest (vision
    tower, projector, embeddings + tied head, final norm) as the root unit."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if device.type == "cuda" else MixedPrecisionPolicy())
    for layer in model.lm.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)


def all_sum_many(xs: list[float], device) -> list[float]:
    """Each number summed over all processes, in one all-reduce."""
    t = torch.tensor([float(x) for x in xs], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def apply_speed_switches(model: OpenQwen2VL, cfg: TrainConfig, device: torch.device) -> None:
    """The attention kernel, activation checkpointing and torch.compile of the decoder layers
    (before sharding: FSDP2 then wraps the compiled layers)."""
    if cfg.attention:
        if cfg.attention == "flex_attention" and device.type == "cpu":
            raise ValueError("attention flex_attention: torch has no flex-attention backward on the CPU; "
                             "train with it on a GPU (its loss equals sdpa's: tests/test_fast_paths.py)")
        model.lm.set_attn_implementation(cfg.attention)
    if cfg.grad_checkpointing:
        model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.compile:
        for layer in model.lm.model.layers:
            layer.compile()


def any_rank(flag: bool, device) -> bool:
    """True on every rank if it is True on one: all ranks then take the same branch (a collective
    save entered by some ranks only would wait forever)."""
    t = torch.tensor(int(flag), dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t)


def stop_on_sigterm() -> SimpleNamespace:
    """From now on SIGTERM (SLURM's time limit or preemption; torchrun passes it on to its workers)
    only sets `.requested`: the loop acts on it at the next step boundary, where every rank can
    save. `.previous` is the handler it replaced."""
    stop = SimpleNamespace(requested=False)
    stop.previous = signal.signal(signal.SIGTERM, lambda signum, frame: setattr(stop, "requested", True))
    return stop


# ------------------------------------------------------------------------------ optimisation

def param_groups(model, weight_decay: float) -> list[dict]:
    """Decay on matrices only: biases, norm gains and other 1-D parameters get none."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(warmup: int, total: int, min_ratio: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return f


# ----------------------------------------------------------------------------------- building

def build_model(cfg: TrainConfig) -> tuple[OpenQwen2VL, int]:
    """(model, visual tokens per image for this stage)."""
    if cfg.stage == "pretrain":
        tokens = {k: getattr(cfg, k) for k in ("visual_tokens_pretrain", "visual_tokens_sft") if getattr(cfg, k)}
        model = OpenQwen2VL.from_preset(cfg.preset, vision_weights=cfg.vision_weights, lm_path=cfg.lm_path,
                                        random_init=cfg.random_init, lm_layers=cfg.lm_layers,
                                        vision_layers=cfg.vision_layers, freeze_vision=cfg.freeze_vision,
                                        projector=cfg.projector, **tokens)
        return model, model.config.visual_tokens_pretrain
    model = OpenQwen2VL.from_pretrained(cfg.init_from)
    model.set_vision_frozen(cfg.freeze_vision)
    return model, model.config.visual_tokens_sft


def build_data(cfg: TrainConfig, model: OpenQwen2VL, tokenizer, visual_tokens: int):
    transform = model.image_transform()
    pad_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    projector = model.config.projector
    if cfg.stage == "pretrain":
        ds = PackedCaptions(cfg.packed, cfg.shards, transform, bos_id=document_bos_id(tokenizer),
                            image_token_id=model.config.image_token_id, pad_id=pad_id,
                            doc_isolation=cfg.doc_isolation, vision_ids=vision_ids(tokenizer, projector))
        if ds.projector != projector:
            raise ValueError(f"{cfg.packed} was packed for projector {ds.projector} (its image layout), "
                             f"the model's is {projector}")
        if ds.document_tokens != cfg.document_tokens:
            raise ValueError(f"{cfg.packed} was packed with document_tokens {ds.document_tokens}, "
                             f"training asks for {cfg.document_tokens}")
        if ds.visual_tokens != visual_tokens:
            raise ValueError(f"{cfg.packed} was packed with {ds.visual_tokens} visual tokens per image, "
                             f"the model pretrains with {visual_tokens}")
        return ds
    return Conversations(load_records(cfg.sft_data, cfg.image_root), tokenizer, transform,
                         visual_tokens=visual_tokens, max_len=cfg.max_len, pad_id=pad_id,
                         bos_id=document_bos_id(tokenizer), too_long=cfg.too_long,
                         image_token_id=model.config.image_token_id, projector=projector)


def total_steps(cfg: TrainConfig, n_examples: int) -> int:
    return cfg.steps if cfg.steps > 0 else max(1, math.ceil(cfg.epochs * n_examples / cfg.global_batch))


# ------------------------------------------------------------------------------------ the loop

def train(cfg: TrainConfig) -> dict:
    rank, world, device = init_distributed()
    try:
        return _train(cfg, rank, world, device)
    finally:
        dist.destroy_process_group()


def _train(cfg: TrainConfig, rank: int, world: int, device: torch.device) -> dict:
    if cfg.global_batch % (world * cfg.micro_batch):
        raise ValueError(f"global_batch {cfg.global_batch} is not a multiple of "
                         f"processes ({world}) x micro_batch ({cfg.micro_batch})")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    ckpt_root = out / "checkpoints"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    tokenizer = training_tokenizer(cfg.tokenizer, cfg.document_tokens)
    model, visual_tokens = build_model(cfg)
    check_fits(tokenizer, model.config.lm["vocab_size"], model.config.image_token_id, cfg.tokenizer)
    data = build_data(cfg, model, tokenizer, visual_tokens)
    steps = total_steps(cfg, len(data))
    config = model.config
    cost = model_cost(model, visual_tokens)  # before sharding: whole parameter counts
    apply_speed_switches(model, cfg, device)
    model.train()
    shard_model(model, device)

    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                            fused=True if cfg.fused_adamw else None)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_cosine(max(1, round(cfg.warmup_frac * steps)), steps, cfg.min_lr_ratio))

    start = 0
    key = _jsonable({**cfg.resume_key(), "inputs": cfg.inputs()})
    resume_from = ckpt.latest(ckpt_root)
    if resume_from is not None and ckpt.saved_config(resume_from) != key:
        # A changed config makes the old checkpoints another run's: start over, say so.
        if rank == 0:
            print(f"{ckpt_root}: checkpoints of another training config or other inputs, starting over",
                  flush=True)
            shutil.rmtree(ckpt_root)
        dist.barrier()
        resume_from = None
    if resume_from is not None:
        start = ckpt.load(resume_from, model, opt, sched)["step"]
    log_path = out / "train_log.jsonl"
    steplog = StepLog(out, log_path, start, tensorboard=cfg.tensorboard, wandb=cfg.wandb,
                      name=f"{out.parent.name}/{cfg.stage}", config=_jsonable(asdict(cfg))) if rank == 0 else None
    if rank == 0:
        print(f"{cfg.stage}: {len(data)} examples, {steps} steps of {cfg.global_batch}, {world} process(es) "
              f"on {device}, {'resuming at step ' + str(start) if start else 'from scratch'}", flush=True)
    peak = cfg.peak_tflops * 1e12 if cfg.peak_tflops > 0 else (
        peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None)

    fault = int(os.environ.get(FAULT_ENV, "0"))
    stop = stop_on_sigterm()  # not earlier: before the first step there is nothing to save
    params = [p for p in model.parameters() if p.requires_grad]
    batches = step_batches(data, seed=cfg.seed, start=start, steps=steps, global_batch=cfg.global_batch,
                           rank=rank, world=world, micro_batch=cfg.micro_batch, workers=cfg.workers,
                           prefetch=cfg.prefetch, pin_memory=device.type == "cuda")
    clock = PhaseClock(device, cfg.time_phases)
    bar = tqdm(total=steps, initial=start, desc=cfg.stage, unit="step", mininterval=5, disable=rank != 0)
    totals = {"tokens": 0.0, "loss_tokens": 0.0, "seconds": 0.0}
    loss_value = float("nan")
    for step in range(start, steps):
        t0 = time.perf_counter()
        micro = next(batches)
        data_s = time.perf_counter() - t0
        # one all-reduce for the step's counts; the loss scale needs the global loss tokens first
        n_loss, tokens, truncated, images, pairs = all_sum_many(
            [sum(getattr(b, k) for b in micro) for k in ("n_loss_tokens", "n_tokens", "n_truncated",
                                                         "n_images", "attn_pairs")], device)
        loss_sum = torch.zeros((), device=device)
        clock.start()
        for i, b in enumerate(micro):
            model.set_requires_gradient_sync(i == len(micro) - 1)  # reduce-scatter once per step
            res = model(b.input_ids.to(device, non_blocking=True),
                        None if b.images is None else b.images.to(device, non_blocking=True),
                        labels=b.labels.to(device, non_blocking=True),
                        doc_ids=None if b.doc_ids is None else b.doc_ids.to(device, non_blocking=True),
                        visual_tokens=visual_tokens, reduction="sum")
            clock.lap("forward_s")
            # FSDP averages gradients over processes; x world makes the result the global mean.
            (res.loss * (world / max(n_loss, 1.0))).backward()
            clock.lap("backward_s")
            loss_sum += res.loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        opt.step()
        lr = sched.get_last_lr()[0]
        sched.step()
        opt.zero_grad(set_to_none=True)
        clock.lap("optimizer_s")

        dist.all_reduce(loss_sum)
        loss_value = float(loss_sum) / max(n_loss, 1.0)
        seconds = time.perf_counter() - t0
        totals["tokens"] += tokens
        totals["loss_tokens"] += n_loss
        totals["seconds"] += seconds
        if rank == 0:
            flops = step_flops(cost, tokens=tokens, loss_tokens=n_loss, images=images, attn_pairs=pairs)
            per_process = flops["total"] / world / seconds
            record = {"step": step + 1, "loss": round(loss_value, 6), "lr": lr, "tokens": int(tokens),
                      "loss_tokens": int(n_loss), "tokens_per_s": round(tokens / seconds, 1),
                      "grad_norm": round(grad_norm, 6), "seconds": round(seconds, 4),
                      "truncated": int(truncated), "images": int(images), "attn_pairs": int(pairs),
                      "data_s": round(data_s, 4), "data_share": round(data_s / seconds, 4),
                      "flops": flops["total"], "vision_flops_share": round(flops["vision"] / flops["total"], 4),
                      "tflops": round(per_process / 1e12, 4),
                      "mfu": None if peak is None else round(per_process / peak, 4),
                      "peak_mem_mb": round(peak_memory_mb(device), 1), **clock.laps()}
            steplog.write(record)
            bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
            bar.update(1)
        stopping = any_rank(stop.requested, device)
        if stopping or (step + 1) % cfg.save_every == 0 or step + 1 == steps:
            ckpt.save(ckpt_root, step + 1, model, opt, sched,
                      {"train_config": key}, cfg.keep_last)
        if fault and step + 1 == fault:
            os._exit(17)  # no cleanup, no flush: what a killed process leaves behind
        if stopping:
            if rank == 0:
                steplog.close()
                print(f"{cfg.stage}: SIGTERM: checkpoint at step {step + 1} of {steps} saved, exiting "
                      f"with status {STOPPED_EXIT}; a rerun resumes there", flush=True)
            raise SystemExit(STOPPED_EXIT)  # non-zero: Snakemake / SLURM rerun the job
    if rank == 0:
        steplog.close()
    bar.close()
    signal.signal(signal.SIGTERM, stop.previous)  # finishing: SIGTERM ends it at once (final/ is atomic)

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    summary = {}
    if rank == 0:
        summary = _finish(cfg, out, config, full, tokenizer, steps, world, device, totals, loss_value,
                          log_path, key, cost.to_dict())
    dist.barrier()
    return summary


def _finish(cfg, out, config, full_state, tokenizer, steps, world, device, totals, loss_value, log_path,
            key, flop_model):
    """Consolidated model, loss curve, summary and manifest (rank 0)."""
    final, tmp = out / "final", out / "final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model = OpenQwen2VL(config)
    model.load_state_dict(full_state, strict=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    plot_loss(log_path, out / "loss.png", title=f"{cfg.stage}: {out.parent.name}")
    log = [json.loads(line) for line in log_path.read_text().splitlines()]
    counted = {k: sum(r.get(k, 0) for r in log)  # over every run segment, resumes included
               for k in ("tokens", "loss_tokens", "seconds", "data_s", "truncated", "images", "attn_pairs",
                         "flops")}
    summary = {
        "stage": cfg.stage, "run": out.parent.name, "steps": steps, "examples_per_step": cfg.global_batch,
        "sequences": steps * cfg.global_batch, **counted,
        "tokens_per_s": round(counted["tokens"] / max(counted["seconds"], 1e-9), 1),
        "data_share": round(counted["data_s"] / max(counted["seconds"], 1e-9), 4),
        "tflops": round(counted["flops"] / world / max(counted["seconds"], 1e-9) / 1e12, 4),
        "mfu": _mean_mfu(log), "peak_mem_mb": max((r.get("peak_mem_mb", 0) for r in log), default=0),
        "flop_model": flop_model,
        "final_loss": log[-1]["loss"] if log else loss_value, "world_size": world,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "gpus": world if device.type == "cuda" else 0,
        "threads": torch.get_num_threads(), "params": model.num_parameters(),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "train_config": _jsonable(asdict(cfg)),
    }
    write_json(out / "summary.json", summary)
    write_manifest(manifest_path(out), cfg.stage, work=(summary["tokens"], "tokens"),
                   config=summary["train_config"],
                   files=[final / "config.json", final / "model.safetensors", log_path, out / "summary.json"],
                   counts={k: summary[k] for k in ("steps", "sequences", "tokens", "loss_tokens", "truncated")},
                   inputs=key["inputs"], device=summary["device"], gpus=summary["gpus"])
    print(f"{cfg.stage}: {steps} steps, final loss {summary['final_loss']:.4f}, "
          f"{summary['tokens_per_s']:.0f} tokens/s -> {final}", flush=True)
    return summary


def _mean_mfu(log: list[dict]) -> float | None:
    """MFU over the whole run: FLOPs over seconds, in the units the steps' MFU used."""
    rated = [r for r in log if r.get("mfu")]
    if not rated:
        return None
    achieved = sum(r["tflops"] * r["seconds"] for r in rated) / sum(r["seconds"] for r in rated)
    peak = sum(r["tflops"] / r["mfu"] * r["seconds"] for r in rated) / sum(r["seconds"] for r in rated)
    return round(achieved / peak, 4)


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d))


