"""Speed switches compute what the plain path computes (docs/performance.md): each is compared with
it on the same model, batch and seed, to the stated tolerance. Packed batches carry two documents
per sequence, so a kernel that attended across documents would differ."""

from __future__ import annotations

import copy

import pytest
import torch
from test_vlm import EOT, IMG, V, build, clip_ckpt, document, images, packed  # noqa: F401  (fixture)

from oqvl.model.vlm import packs_documents
from oqvl.pack.sequence import pretrain_labels

TOL = 1e-5  # float32 rounding of a different summation order


@pytest.fixture()
def batch():
    ids, doc_ids = packed([[document([5, 6, 7, 8]), document([9, 10, 11])],
                           [document([12, 13]), document([14, 15, 16, 17, 18])]], 64)
    return ids, images(4), pretrain_labels(ids, IMG, EOT, doc_ids=doc_ids), doc_ids


def loss_of(model, batch):
    ids, imgs, labels, doc_ids = batch
    return model(ids, imgs, labels=labels, doc_ids=doc_ids, visual_tokens=V).loss


def test_flex_attention_packed_documents_equal_the_dense_mask(clip_ckpt, batch):
    """Flex attention builds its block mask from the restarting positions (no T x T mask); torch has
    no flex backward on the CPU, so the forward is compared here."""
    dense = build(clip_ckpt).eval()
    assert not packs_documents(dense.lm.config._attn_implementation)
    flex = copy.deepcopy(dense)
    flex.lm.set_attn_implementation("flex_attention")
    assert packs_documents(flex.lm.config._attn_implementation)
    with torch.no_grad():
        a, b = loss_of(dense, batch), loss_of(flex, batch)
    assert abs(float(a) - float(b)) < TOL, (float(a), float(b))


def test_flex_attention_differs_from_causal_attention_across_documents(clip_ckpt, batch):
    """The check above can fail: without document isolation the same batch has another loss."""
    model = build(clip_ckpt).eval()
    ids, imgs, labels, doc_ids = batch
    with torch.no_grad():
        isolated = float(model(ids, imgs, labels=labels, doc_ids=doc_ids, visual_tokens=V).loss)
        causal = float(model(ids, imgs, labels=labels, visual_tokens=V).loss)
    assert abs(isolated - causal) > 1e-3


def train_steps(model, batch, steps=3, fused=False):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                            fused=True if fused else None)
    losses = []
    for _ in range(steps):
        loss = loss_of(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def test_fused_adamw_updates_as_the_per_tensor_loop(clip_ckpt, batch):
    plain, fused = build(clip_ckpt), build(clip_ckpt)
    a, b = train_steps(plain, batch), train_steps(fused, batch, fused=True)
    assert a == pytest.approx(b, abs=TOL)
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        if name.endswith("k_proj.bias"):
            continue  # softmax ignores a shift of every key: its gradient is rounding, which Adam scales up
        assert torch.allclose(p, q, atol=1e-6), name


def test_activation_checkpointing_gives_the_same_loss_and_gradients(clip_ckpt, batch):
    plain, ckpt = build(clip_ckpt).train(), build(clip_ckpt).train()
    ckpt.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert ckpt.lm.model.gradient_checkpointing
    la, lb = loss_of(plain, batch), loss_of(ckpt, batch)
    la.backward()
    lb.backward()
    assert abs(float(la) - float(lb)) < TOL
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-6), name


def test_compiled_decoder_layers_give_the_same_loss(clip_ckpt, batch):
    plain, compiled = build(clip_ckpt).eval(), build(clip_ckpt).eval()
    for layer in compiled.lm.model.layers:
        layer.compile()
    with torch.no_grad():
        a, b = loss_of(plain, batch), loss_of(compiled, batch)
    assert abs(float(a) - float(b)) < TOL


def test_flex_attention_training_on_a_cpu_is_refused_with_the_reason(tmp_path):
    from oqvl.train.trainer import TrainConfig, apply_speed_switches

    cfg = TrainConfig(stage="pretrain", out=str(tmp_path), tokenizer="t", packed="p", shards="s", attention="flex_attention")
    with pytest.raises(ValueError, match="no flex-attention backward on the CPU"):
        apply_speed_switches(None, cfg, torch.device("cpu"))
    with pytest.raises(ValueError, match="attention must be one of"):
        TrainConfig(stage="pretrain", out=str(tmp_path), tokenizer="t", packed="p", shards="s", attention="fast")
