"""What a toy vision tower encodes: linear probes on its patch features, printed as accuracies.

    .venv/bin/python benchmarks/tower_probe.py results/filter/clip_model [--n 4000]

Draws fresh toy scenes, runs the tower (the layer the VLM reads, `feature_layer` -1) and fits a
linear classifier (softmax regression, L2, Adam) on 75% of them, scored on the rest:
- shape / colour of the object in the top-left cell, from that cell's 4x4 patch features, and
  from their mean (one vector per cell: what the object is wherever in the cell it sits);
- shape and cell of the only object of one-object scenes, from the mean over all patches.
Chance is 25% for each (4 shapes, 4 colours, 4 cells). The SFT model can only answer what the
tower tells it, so this bounds the toy benchmarks' shape and position questions.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from oqvl.filter.clip_model import load_clip
from oqvl.world.scene import CELLS, COLOURS, SHAPES, render, sample_scene


def patch_features(model, preprocess, scenes, image_size: int, batch: int = 500) -> torch.Tensor:
    images = torch.stack([preprocess(render(s, image_size)) for s in scenes])
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            inter = model.visual.forward_intermediates(images[i:i + batch], indices=[-1], stop_early=True,
                                                       intermediates_only=True, output_fmt="NCHW")
            out.append(inter["image_intermediates"][-1])
    return torch.cat(out)  # N, C, h, w


def probe_accuracy(x: torch.Tensor, y: torch.Tensor, steps: int = 300) -> float:
    """Held-out accuracy of a linear classifier (first 75% train, rest test)."""
    n_train = int(len(y) * 0.75)
    mean, std = x[:n_train].mean(0), x[:n_train].std(0) + 1e-6
    x = (x - mean) / std
    w = torch.zeros(x.shape[1], int(y.max()) + 1, requires_grad=True)
    opt = torch.optim.Adam([w], lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(x[:n_train] @ w, y[:n_train]) + 1e-3 * w.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(((x[n_train:] @ w).argmax(1) == y[n_train:]).float().mean())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a toy CLIP checkpoint directory (train_clip's output)")
    ap.add_argument("--n", type=int, default=4000, help="scenes drawn")
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, preprocess, _ = load_clip(args.model, None)
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
    rng = np.random.default_rng(args.seed)
    scenes = [sample_scene(rng, 3, 0.25) for _ in range(args.n)]
    feats = patch_features(model, preprocess, scenes, image_size)
    h, w = feats.shape[2:]

    top_left = [(i, next(o for o in s.objects if o.cell == "top left"))
                for i, s in enumerate(scenes) if any(o.cell == "top left" for o in s.objects)]
    x = feats[[i for i, _ in top_left]][:, :, : h // 2, : w // 2].flatten(1)
    x_mean = feats[[i for i, _ in top_left]][:, :, : h // 2, : w // 2].mean((2, 3))
    shape = [SHAPES.index(o.shape) for _, o in top_left]
    colour = [list(COLOURS).index(o.colour) for _, o in top_left]
    rows = [("top-left object: shape", x, shape), ("top-left object: colour", x, colour),
            ("top-left object: shape (cell mean)", x_mean, shape),
            ("top-left object: colour (cell mean)", x_mean, colour)]
    single = [i for i, s in enumerate(scenes) if len(s.objects) == 1]
    pooled = feats[single].mean((2, 3))
    rows += [("only object: shape (pooled)", pooled, [SHAPES.index(scenes[i].objects[0].shape) for i in single]),
             ("only object: cell (pooled)", pooled, [CELLS.index(scenes[i].objects[0].cell) for i in single])]
    print(f"{args.model}: linear probes on {args.n} scenes (held-out 25%; chance 25%)")
    for name, xs, ys in rows:
        print(f"  {name:36s} {100 * probe_accuracy(xs, torch.tensor(ys)):5.1f}%  (n={len(ys)})")


if __name__ == "__main__":
    main()
