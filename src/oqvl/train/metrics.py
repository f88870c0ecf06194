"""What the training loop records per step: train_log.jsonl (the record of truth, read by the
summary and the report), TensorBoard event files beside it, and optionally Weights & Biases in
offline mode; plus the step-phase clock and peak memory.

    tensorboard --logdir results/runs/RUN/seed0/pretrain/tensorboard
    wandb sync results/runs/RUN/seed0/pretrain/wandb/offline-run-*   # when trained with --wandb
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import torch

from ..io import write_text


class StepLog:
    """Rank 0's per-step record: one JSON line each, the same numbers as TensorBoard scalars
    (`train/<field>`) and, with wandb on, as an offline wandb run. A resumed run first drops the
    lines after its checkpoint (they are redone), and TensorBoard purges its events after it."""

    def __init__(self, out: Path, path: Path, start: int, *, tensorboard: bool, wandb: bool, name: str,
                 config: dict):
        self.path = path
        truncate_log(path, start)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start + 1 if start else None)
        self.wandb = None
        if wandb:
            import wandb as wb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wb.init(mode="offline", dir=str(out), name=name, config=config,
                                 settings=wb.Settings(console="off"))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        step = record["step"]
        numbers = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.tb is not None:
            for k, v in numbers.items():
                self.tb.add_scalar(f"train/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in numbers.items()}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def truncate_log(path: Path, step: int) -> None:
    """Keep the log lines up to the checkpoint being resumed (later ones are redone)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    write_text(path, "".join(line + "\n" for line in keep))


class PhaseClock:
    """Seconds per phase of a step (forward, backward, optimizer), when asked for: on a GPU each
    reading synchronises the device, which costs the overlap of host and device work."""

    def __init__(self, device: torch.device, enabled: bool):
        self.device, self.enabled = device, enabled
        self._laps: dict[str, float] = {}
        self._t = 0.0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start(self) -> None:
        self._laps = {}
        if self.enabled:
            self._t = self._now()

    def lap(self, phase: str) -> None:
        if self.enabled:
            now = self._now()
            self._laps[phase] = self._laps.get(phase, 0.0) + now - self._t
            self._t = now

    def laps(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self._laps.items()}


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: the GPU's allocated tensors, or on a CPU the process's resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
