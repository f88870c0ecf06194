"""The FLOP model of Open-Qwen2VL training: one definition for the trainer's per-step MFU and the
report's paper-scale projection (docs/performance.md has the formula).

Per training step, with k = 6 FLOPs per parameter per token for a trained part (forward 2,
backward 4), 4 for a frozen part below a trained one (its input gradient is still computed) and 2
for a frozen part with nothing trained below it (forward only):

    vision     = k_v  x (N_v x P + A_v x P^2) x images          every patch of every image
    projector  = k_p  x N_p x V x images                        every visual token
    lm         = k_lm x (N_body x tokens + N_head x loss_tokens) the head only where a loss is taken
    attention  = k_lm x A_lm x pairs                            causal (query, key) pairs attended

where A = 2 x layers x width is the attention's own FLOPs per (query, key) pair in the forward
pass (Q.K and the weighted sum of V, 2 FLOPs per multiply-add each), P the tower's patches per
image, V the visual tokens per image and `pairs` the (query, key) pairs the model attends: per
document with document isolation, per sequence without, padding excluded. The vision tower's
attention is bidirectional over its P patches. Only the tower blocks that run are counted (the
feature layer stops the tower early; its pooling head never runs).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

PARTS = ("vision", "projector", "lm")  # the order activations flow in

# Dense bf16 tensor-core peaks per GPU (no sparsity), FLOP/s, by a substring of the device name;
# the first that matches wins (so "H100 PCIe" before "H100").
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 125e12),
)


@dataclass
class ModelCost:
    """What a model costs per token and per image (see the module docstring)."""
    vision_params: float        # N_v: tower parameters that run (patch embedding + blocks up to the feature layer)
    projector_params: float     # N_p
    lm_params: float            # unique LM parameters that are matmuls (a tied head counted once)
    lm_head_params: float       # vocab x hidden: the output matmul, run only where a loss is taken
    patches_per_image: int      # P
    visual_tokens: int          # V
    trainable: tuple[str, ...] = ("projector", "lm")
    lm_layers: int = 0          # attention: decoder layers x query width (heads x head dim)
    lm_width: int = 0
    vision_layers: int = 0      # tower blocks that run x their width
    vision_width: int = 0
    extra: dict = field(default_factory=dict)  # provenance (e.g. the preset); not in any formula

    def __post_init__(self):
        self.trainable = tuple(self.trainable)

    def to_dict(self) -> dict:
        return asdict(self)


def flop_factors(trainable) -> dict[str, int]:
    """FLOPs per parameter per token: 6 trained, 4 frozen below a trained part, 2 frozen with
    nothing trained below it."""
    out, upstream_trained = {}, False
    for part in PARTS:
        if part in trainable:
            out[part] = 6
            upstream_trained = True
        else:
            out[part] = 4 if upstream_trained else 2
    return out


def step_flops(m: ModelCost, *, tokens: float, loss_tokens: float, images: float, attn_pairs: float) -> dict:
    """Training FLOPs of a batch, by part: {vision, projector, lm, attention, total}."""
    k = flop_factors(m.trainable)
    P = m.patches_per_image
    out = {
        "vision": k["vision"] * (m.vision_params * P + 2 * m.vision_layers * m.vision_width * P * P) * images,
        "projector": k["projector"] * m.projector_params * m.visual_tokens * images,
        "lm": k["lm"] * ((m.lm_params - m.lm_head_params) * tokens + m.lm_head_params * loss_tokens),
        "attention": k["lm"] * 2 * m.lm_layers * m.lm_width * attn_pairs,
    }
    out["total"] = sum(out.values())
    return out


def causal_pairs(length: int) -> int:
    """(query, key) pairs of causal attention over `length` tokens."""
    return length * (length + 1) // 2


def flops_per_token(m: ModelCost, text_tokens_per_image: float, loss_fraction: float | None = None,
                    attention_span: float | None = None) -> float:
    """Training FLOPs per packed (non-padding) token of image-caption documents.

    A document is BOS + visual tokens + caption + EOS, L = V + T + 2 tokens; loss_fraction is the
    share of tokens with a loss (default caption + EOS: (T + 1) / L); attention_span the mean
    number of keys a token attends (default: its own document's, (L + 1) / 2)."""
    L = m.visual_tokens + text_tokens_per_image + 2
    if loss_fraction is None:
        loss_fraction = (text_tokens_per_image + 1) / L
    if attention_span is None:
        attention_span = (L + 1) / 2
    per_doc = step_flops(m, tokens=L, loss_tokens=loss_fraction * L, images=1, attn_pairs=attention_span * L)
    return per_doc["total"] / L


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU by name (None: unknown, e.g. a CPU)."""
    for key, value in PEAK_BF16_FLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


# ------------------------------------------------------------------------------ a live model

def _unique_count(modules) -> int:
    seen = {}
    for mod in modules:
        for p in mod.parameters():
            seen[id(p)] = p
    return sum(p.numel() for p in seen.values())


def vision_cost(tower, feature_layer: int) -> tuple[int, int, int, int]:
    """(params that run, patches per image, blocks that run, width) of an open_clip tower
    (timm trunk or native ViT) stopped at `feature_layer`."""
    trunk = getattr(tower, "trunk", None)
    if trunk is not None:
        blocks, stem = list(trunk.blocks), [trunk.patch_embed]
        grid = trunk.patch_embed.grid_size
        width = int(trunk.embed_dim)
    else:
        blocks, stem = list(tower.transformer.resblocks), [tower.conv1, tower.ln_pre]
        grid = tower.grid_size
        width = int(tower.transformer.width)
    n_run = feature_layer % len(blocks) + 1
    params = _unique_count(stem + blocks[:n_run])
    return params, int(grid[0]) * int(grid[1]), n_run, width


def model_cost(model, visual_tokens: int) -> ModelCost:
    """The FLOP model of an OpenQwen2VL (oqvl.model.vlm) at `visual_tokens` per image."""
    lm_cfg = model.lm.config
    head = lm_cfg.vocab_size * lm_cfg.hidden_size
    lm_params = _unique_count([model.lm])
    if not lm_cfg.tie_word_embeddings:
        lm_params -= head  # the input embedding is a lookup, not a matmul
    v_params, patches, v_layers, v_width = vision_cost(model.vision, model.config.vision.feature_layer)
    trainable = tuple(p for p, mod in zip(PARTS, (model.vision, model.projector, model.lm), strict=True)
                      if any(q.requires_grad for q in mod.parameters()))
    head_dim = getattr(lm_cfg, "head_dim", None) or lm_cfg.hidden_size // lm_cfg.num_attention_heads
    return ModelCost(vision_params=v_params, projector_params=_unique_count([model.projector]),
                     lm_params=lm_params, lm_head_params=head, patches_per_image=patches,
                     visual_tokens=visual_tokens, trainable=trainable,
                     lm_layers=lm_cfg.num_hidden_layers, lm_width=lm_cfg.num_attention_heads * head_dim,
                     vision_layers=v_layers, vision_width=v_width)
