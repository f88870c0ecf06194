"""Loss curve of a training run (PNG) from its train_log.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot_loss(log_path, out_png, title: str = "") -> None:
    rows = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line]
    if not rows:
        raise ValueError(f"{log_path}: empty training log")
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, [r["loss"] for r in rows], lw=1, label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean per loss token)")
    ax.set_title(title)
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [r["lr"] for r in rows], color="tab:orange", lw=0.8, alpha=0.7)
    lr_ax.set_ylabel("learning rate", color="tab:orange")
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
