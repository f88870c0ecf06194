"""Train the toy CLIP-score filter model on a clean seed set drawn from the toy world.

    python -m oqvl.filter.train_clip --out results/filter/clip_model --n-pairs 12000 --steps 200 \
        --batch-size 64 --lr 2e-3 --seed 0 --threads 2

The seed set is its own stream ("clip_seed"), so it never shares an image with a web source. Plain
in-batch negatives only teach "which of these different scenes", which a bag of colours already
answers; to make the score drop for a caption with one wrong colour, shape or count, every step
adds hard negatives: the same image's scene corrupted as the web sources corrupt it
(`corrupt_scene`), said in the same caption style, scored against all images as extra
negative columns of the sigmoid loss.

An auxiliary per-cell loss (`--cell-weight`, 0 turns it off): a linear head on the mean of each
grid cell's patch tokens names what the cell holds (one of the four shapes, a character, or
nothing), from the scene's known truth. The contrastive loss alone teaches colour in 640 steps
but shape barely (docs/toy_learning.md): the pooled embedding of a 3-object scene has little room
for one small object's outline. The toy CLIP stands in for a pretrained SigLIP tower, which does
see shape; the head is dropped after training, and the checkpoint is a plain open_clip model.

No image augmentation: scored images come from the same renderer (whose jitter already varies
positions), and flips or colour jitter would make the captions' left/right and colours false.

Writes OUT/model.safetensors, OUT/config.json (model name and config, training args, final loss)
and OUT/train_log.jsonl, all loadable by `clip_model.load_clip(OUT, None)`, then OUT/manifest.json
(work: the pairs seen, steps x batch size).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..manifest import args_config, manifest_path, write_manifest
from ..world.captions import describe
from ..world.corrupt import corrupt_scene
from ..world.scene import CELLS, SHAPES, render
from ..world.source import WorldConfig, stream_rng, true_pair
from .clip_model import CONFIG_FILE, TOY_MODEL, WEIGHTS_FILE, model_config, open_clip, save_checkpoint

STREAM = "clip_seed"
HARD_KINDS = ("wrong_attribute", "wrong_object", "wrong_count")


def seed_set(seed: int, n: int, world: WorldConfig):
    """Scenes, styles, true captions and rendered images (uint8 N x H x W x 3) of the seed set."""
    scenes, styles, captions = [], [], []
    images = np.empty((n, world.image_size, world.image_size, 3), dtype=np.uint8)
    for i in range(n):
        scene, style, caption = true_pair(seed, STREAM, i, world)
        scenes.append(scene)
        styles.append(style)
        captions.append(caption)
        images[i] = np.asarray(render(scene, world.image_size))
    return scenes, styles, captions, images


def hard_negatives(idx, scenes, styles, frac: float, rng: np.random.Generator) -> list[str]:
    """False captions of a fraction of the batch's images: one wrong attribute, object or count."""
    n_hard = round(frac * len(idx))
    out = []
    for i in rng.choice(idx, size=n_hard, replace=False):
        kind = HARD_KINDS[rng.integers(len(HARD_KINDS))]
        wrong = corrupt_scene(kind, scenes[i], styles[i].mention_size, rng)
        out.append(describe(wrong, styles[i]))
    return out


CELL_CLASSES = (*SHAPES, "character", "empty")


def cell_labels(scenes) -> torch.Tensor:
    """N x 4 class indices (CELL_CLASSES) of what each grid cell (CELLS order) holds."""
    y = torch.full((len(scenes), len(CELLS)), CELL_CLASSES.index("empty"))
    for i, scene in enumerate(scenes):
        for o in scene.objects:
            y[i, CELLS.index(o.cell)] = CELL_CLASSES.index(o.shape)
        if scene.glyph:
            y[i, CELLS.index(scene.glyph.cell)] = CELL_CLASSES.index("character")
    return y


def image_pass(visual, x) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of the tower: the normalised image embedding (what `encode_image` gives) and the
    N x 4 x C means of the last layer's patch tokens over each grid cell (CELLS order), the
    tokens the VLM reads."""
    out = visual.forward_intermediates(x, indices=[-1], output_fmt="NCHW")
    f = out["image_intermediates"][-1]
    h, w = f.shape[2] // 2, f.shape[3] // 2
    cells = torch.stack([f[:, :, r * h:(r + 1) * h, c * w:(c + 1) * w].mean((2, 3))
                         for r in (0, 1) for c in (0, 1)], 1)
    return F.normalize(out["image_features"], dim=-1), cells


def sigmoid_loss(img, txt, logit_scale, logit_bias, labels, col_weight):
    """SigLIP loss over B images x (B + extra) texts; labels +1/-1, per-column weights."""
    logits = logit_scale * img @ txt.T + logit_bias
    return -(F.logsigmoid(labels * logits) * col_weight).sum() / img.shape[0]


def pair_labels(img_tokens: torch.Tensor, all_tokens: torch.Tensor) -> torch.Tensor:
    """+1 where text j is token-identical to image i's true caption (also catches duplicates in
    the batch, which are true of both images), else -1."""
    same = (img_tokens[:, None, :] == all_tokens[None, :, :]).all(-1)
    return same.float() * 2 - 1


def batch_loss(model, img, true_tokens, hard_tokens, hard_weight: float):
    """Sigmoid loss of B image embeddings (normalised) against their B true captions and the extra
    hard negatives."""
    t_all = torch.cat([true_tokens, hard_tokens])
    col_weight = torch.ones(t_all.shape[0])
    col_weight[true_tokens.shape[0]:] = hard_weight
    txt = model.encode_text(t_all, normalize=True)
    labels = pair_labels(true_tokens, t_all)
    return sigmoid_loss(img, txt, model.logit_scale.exp(), model.logit_bias, labels, col_weight)


def param_groups(model, lr: float, weight_decay: float, text_lr_scale: float):
    """AdamW groups: open_clip's no-decay rule (gains, biases, 1-d embeddings, logit scale/bias),
    and a slower text tower. Words are cheap to tell apart and shapes are slow to see; a text
    tower at full speed learns to ignore the shape and count words the vision tower cannot yet
    see, and that takes away the signal the vision tower would learn them from."""
    visual = {id(p) for p in model.visual.parameters()}
    groups = {}
    for name, p in model.named_parameters():
        no_decay = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_" in name
        text = id(p) not in visual and "logit_" not in name
        groups.setdefault((no_decay, text), []).append(p)
    return [{"params": ps, "weight_decay": 0.0 if no_decay else weight_decay,
             "lr": lr * (text_lr_scale if text else 1.0)}
            for (no_decay, text), ps in groups.items()]


def lr_lambda(warmup: int, total: int):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return f


def train(args) -> dict:
    if args.steps < 1 or args.n_pairs < 2:
        raise ValueError("need at least one step and two pairs")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    world = WorldConfig.from_args(args)
    model, _, _ = open_clip.create_model_and_transforms(TOY_MODEL, pretrained=None)
    tokenizer = open_clip.get_tokenizer(TOY_MODEL)
    pp = model.visual.preprocess_cfg
    if tuple(model.visual.image_size) != (world.image_size, world.image_size):
        raise ValueError(f"{TOY_MODEL} takes {model.visual.image_size} px images, not {world.image_size}")
    mean = torch.tensor(pp["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(pp["std"]).view(1, 3, 1, 1)

    t0 = time.time()
    scenes, styles, captions, images = seed_set(args.seed, args.n_pairs, world)
    tokens = tokenizer(captions)
    images = torch.from_numpy(images).permute(0, 3, 1, 2)  # uint8 N x 3 x H x W
    print(f"seed set: {args.n_pairs} clean pairs from stream {STREAM!r} in {time.time() - t0:.1f}s")

    groups = param_groups(model, args.lr, args.weight_decay, args.text_lr_scale)
    cell_head = None
    if args.cell_weight > 0:
        labels = cell_labels(scenes)
        cell_head = torch.nn.Linear(model.visual.transformer.width, len(CELL_CLASSES))
        groups.append({"params": list(cell_head.parameters()), "weight_decay": 0.0, "lr": args.lr})
    trained = [p for g in groups for p in g["params"]]
    # fused: one kernel over all parameters; most of them are the 49k-row token embedding
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), eps=1e-6, fused=True)
    warmup = max(1, int(args.warmup_frac * args.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup, args.steps))
    rng = stream_rng(args.seed, STREAM, 2**31)  # batch order and hard negatives
    order, pos = rng.permutation(args.n_pairs), 0
    batch = min(args.batch_size, args.n_pairs)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train_log.jsonl", "w") as log:
        model.train()
        t_train = time.time()
        ema = None
        bar = tqdm(range(args.steps), desc="train clip", unit="step", mininterval=5)
        for step in bar:
            if pos + batch > args.n_pairs:
                order, pos = rng.permutation(args.n_pairs), 0
            idx = order[pos:pos + batch]
            pos += batch
            x = (images[idx].float() / 255 - mean) / std  # what the inference preprocess gives 64 px
            hard = tokenizer(hard_negatives(idx, scenes, styles, args.hard_frac, rng))
            img, cells = image_pass(model.visual, x)
            loss = batch_loss(model, img, tokens[idx], hard, args.hard_weight)
            if cell_head is not None:
                cell_loss = F.cross_entropy(cell_head(cells).flatten(0, 1), labels[idx].flatten())
                loss = loss + args.cell_weight * cell_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            opt.step()
            sched.step()

            value = loss.item()
            ema = value if ema is None else 0.95 * ema + 0.05 * value
            bar.set_postfix(loss=f"{ema:.3f}", refresh=False)  # redraw at mininterval only
            if step % args.log_every == 0 or step == args.steps - 1:
                log.write(json.dumps({
                    "step": step, "loss": value, "loss_ema": ema, "lr": max(sched.get_last_lr()),
                    "logit_scale": model.logit_scale.exp().item(), "logit_bias": model.logit_bias.item(),
                    "elapsed_s": round(time.time() - t_train, 2),
                    **({"cell_loss": cell_loss.item()} if cell_head is not None else {}),
                }) + "\n")
                log.flush()
    seconds = time.time() - t_train
    print(f"trained {args.steps} steps in {seconds:.1f}s ({args.steps / seconds:.2f} steps/s, "
          f"{args.steps * batch / seconds:.0f} images/s), final loss (ema) {ema:.4f}")

    model.eval()
    meta = {
        "model_name": TOY_MODEL,
        "model_cfg": model_config(TOY_MODEL),
        "stream": STREAM,
        "train_args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "final_loss": ema,
        "final_loss_last_step": value,
        "train_seconds": round(seconds, 2),
        "steps_per_s": round(args.steps / seconds, 3),
    }
    save_checkpoint(model, out, meta)
    return meta


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n-pairs", type=int, default=12000)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--text-lr-scale", type=float, default=0.25,
                    help="text tower learning rate as a fraction of --lr")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--warmup-frac", type=float, default=0.05)
    ap.add_argument("--hard-frac", type=float, default=0.5,
                    help="hard-negative captions per step, as a fraction of the batch")
    ap.add_argument("--hard-weight", type=float, default=1.0,
                    help="loss weight of a hard-negative column relative to an in-batch one")
    ap.add_argument("--cell-weight", type=float, default=0.0,
                    help="weight of the auxiliary per-cell content loss (0: contrastive only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=10)
    WorldConfig.add_args(ap)
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    meta = train(args)
    batch = min(args.batch_size, args.n_pairs)  # what train() used
    out = Path(args.out)
    write_manifest(manifest_path(out), "train_clip", work=(args.steps * batch, "pairs"),
                   config=args_config(args),
                   files=[out / WEIGHTS_FILE, out / CONFIG_FILE, out / "train_log.jsonl"],
                   counts={"steps": args.steps, "batch_size": batch, "seed_pairs": args.n_pairs,
                           "final_loss": meta["final_loss"]})


if __name__ == "__main__":
    main()
