"""Sharded, pickle-free training checkpoints that resume exactly.

    RUN/checkpoints/step_000050/
        rank00000-of-00002.safetensors   this rank's shards: model.*, optim.* (AdamW moments and
        rank00001-of-00002.safetensors   step counts), rng.* (torch RNG state)
        state.json                       step, world size, scheduler, optimizer param groups,
                                         tensor placements, run config; written last
    RUN/checkpoints/latest.json          {"step": 50, "dir": "step_000050"}

Every rank writes its own FSDP2 shards (DTensor local tensors) into `step_N.tmp/`; after a
barrier rank 0 writes state.json, renames the directory and then updates latest.json, each by
write-then-rename, so a crash at any point leaves the previous checkpoint intact and never a
half-written one that looks complete. Resuming needs the same world size, nodes x processes per
node (the shards are split for it); the consolidated final model (`save_pretrained`) has no such
restriction.

The optimizer state is restored into the optimizer (the reference code scattered it and never
loaded it, so its resumed runs restarted Adam's moments from zero).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from ..io import write_json

LATEST = "latest.json"
STATE = "state.json"
FORMAT = "oqvl-train-checkpoint/1"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:06d}"


def shard_file(rank: int, world: int) -> str:
    return f"rank{rank:05d}-of-{world:05d}.safetensors"


def _local(t: torch.Tensor) -> torch.Tensor:
    t = t.to_local() if isinstance(t, DTensor) else t
    return t.detach().to("cpu").contiguous()


def _unshare(tensors: dict[str, torch.Tensor]) -> None:
    """safetensors stores no aliases: tied weights (embeddings = LM head) are written twice."""
    seen = set()
    for k, t in tensors.items():
        if t.numel() and t.data_ptr() in seen:
            tensors[k] = t.clone()
        seen.add(t.data_ptr())


def _flatten_optim(osd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state dict -> (tensors by flat key, JSON-able rest)."""
    tensors, scalars = {}, {}
    for fqn, st in osd["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{fqn}.{name}"] = _local(v)
            else:
                scalars[f"{fqn}.{name}"] = v
    return tensors, {"param_groups": osd["param_groups"], "scalars": scalars}


def save(root, step: int, model, optimizer, scheduler, extra: dict, keep_last: int = 2) -> Path:
    """Write checkpoint `step` under root (collective: every rank calls it)."""
    root = Path(root)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    final, tmp = step_dir(root, step), step_dir(root, step).with_suffix(".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()

    msd = get_model_state_dict(model)
    osd = get_optimizer_state_dict(model, optimizer)
    tensors = {f"model.{k}": _local(v) for k, v in msd.items()}
    optim_tensors, optim_rest = _flatten_optim(osd)
    tensors.update(optim_tensors)
    _unshare(tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(tmp / shard_file(rank, world)))
    _barrier()

    if rank == 0:
        state = {
            "format": FORMAT, "step": step, "world_size": world,
            "scheduler": _jsonable(scheduler.state_dict()),
            "optimizer": optim_rest,
            "global_shapes": {k: list(v.shape) for k, v in msd.items()},
            **extra,
        }
        write_json(tmp / STATE, state)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_json(root / LATEST, {"step": step, "dir": final.name})
        _prune(root, keep_last)
    _barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and (p / STATE).is_file())
    for p in done[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob("step_*.tmp"):  # left by a crash mid-save
        shutil.rmtree(p, ignore_errors=True)


def _jsonable(d: dict) -> dict:
    """LambdaLR's state_dict holds its lr functions as None; everything else is numbers/lists."""
    return {k: v for k, v in d.items() if k != "lr_lambdas"}


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def latest(root) -> Path | None:
    """The newest complete checkpoint under root, or None."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        d = root / json.loads(pointer.read_text())["dir"]
        if (d / STATE).is_file():
            return d
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and (p / STATE).is_file())
    return done[-1] if done else None


def saved_config(ckpt: Path) -> dict:
    return json.loads((ckpt / STATE).read_text()).get("train_config", {})


def load(ckpt: Path, model, optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG; returns state.json."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    state = json.loads((ckpt / STATE).read_text())
    if state.get("format") != FORMAT:
        raise ValueError(f"{ckpt}: not a {FORMAT} checkpoint")
    if state["world_size"] != world:
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))  # torchrun's processes per node
        raise ValueError(f"{ckpt}: saved by {state['world_size']} processes, resuming with {world} "
                         f"({world // per_node} node(s) x {per_node}); the world size is nodes x processes "
                         f"per node and must be {state['world_size']} to resume (the shards are split per "
                         f"process): set train.nodes x train.nproc (--nodes x --nproc-per-node) to it")
    tensors = load_file(str(ckpt / shard_file(rank, world)))

    msd = get_model_state_dict(model)
    new_msd = {k: _like(tensors[f"model.{k}"], ref) for k, ref in msd.items()}
    set_model_state_dict(model, new_msd)

    # Rebuild the optimizer state dict around the parameters' own sharding.
    params = get_model_state_dict(model)
    osd = {"state": {}, "param_groups": state["optimizer"]["param_groups"]}
    for key, t in tensors.items():
        if not key.startswith("optim."):
            continue
        fqn, name = key[len("optim."):].rsplit(".", 1)
        ref = params[fqn]
        osd["state"].setdefault(fqn, {})[name] = _like(t, ref) if t.dim() > 0 else t
    for key, v in state["optimizer"]["scalars"].items():
        fqn, name = key.rsplit(".", 1)
        osd["state"].setdefault(fqn, {})[name] = v
    set_optimizer_state_dict(model, optimizer, osd)

    sched = dict(scheduler.state_dict())
    sched.update(state["scheduler"])
    scheduler.load_state_dict(sched)
    torch.set_rng_state(tensors["rng.torch"])
    return state


def _like(local: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """A loaded local shard placed like `ref` (a DTensor parameter, or a plain tensor)."""
    if isinstance(ref, DTensor):
        local = local.to(ref.to_local().device, ref.dtype)
        return DTensor.from_local(local, ref.device_mesh, ref.placements, shape=ref.shape,
                                  stride=ref.stride(), run_check=False)
    return local.to(ref.device, ref.dtype)
