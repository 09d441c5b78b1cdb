"""More timm families with their written-out attention, end to end.

Each model is built small (two or so blocks, small images), with timm's
hand-written attention path (``fused_attn`` off), dropout and drop-path 0,
and runs a float32 training step through the backend (the reference op on
CPU) beside eager float32 and a float64 golden of the same weights.  We
assert the number of fused and declined sites, that every declined site
says why, and that the output and every parameter's gradient are
golden-relative to eager (gradients that are zero in exact arithmetic,
such as a key bias's under softmax, are skipped: both sides are rounding
noise there).

The forms: Swin's windows with a relative-position bias and the shift mask,
SwinV2's cosine attention with a learned logit scale and its log-spaced
continuous position bias, BEiT's relative-position bias beside q/v biases,
EVA-02's rotary queries and keys, CaiT's class attention (its talking-head
layers declined: heads mixed between the softmax and P·V), XCiT's
cross-covariance attention over channels with a learned temperature,
PVT-v2's spatially reduced keys, DaViT's channel attention, VOLO's outlook
attention, Twins' padded local windows, and SigLIP's attention-pool head
(one learned query).

timm is not a CI dependency; these tests run where it is installed.
"""
from __future__ import annotations

import copy

import pytest
import torch

import attn_compiler
from attn_compiler.testing import golden_check

timm = pytest.importorskip("timm", reason="timm is not installed")

# (timm name, create_model keywords, image size, fused sites, declined sites)
MODELS = [
    ("swin_tiny_patch4_window7_224", dict(img_size=112, embed_dim=32, depths=(2, 2), num_heads=(2, 4)), 112, 4, 0),
    ("swinv2_tiny_window8_256", dict(img_size=64, embed_dim=32, depths=(2, 2), num_heads=(2, 4)), 64, 4, 0),
    ("beit_base_patch16_224", dict(img_size=64, embed_dim=64, depth=2, num_heads=4), 64, 2, 0),
    ("eva02_tiny_patch14_224", dict(img_size=56, depth=2), 56, 2, 0),
    ("cait_xxs24_224", dict(img_size=64, depth=2), 64, 2, 2),
    ("xcit_nano_12_p16_224", dict(img_size=64, depth=2), 64, 4, 0),
    ("pvt_v2_b0", dict(), 64, 8, 0),
    ("davit_tiny", dict(depths=(1, 1, 1, 1)), 64, 8, 0),
    ("volo_d1_224", dict(img_size=64), 64, 16, 0),
    ("twins_svt_small", dict(img_size=64, depths=(2, 2, 1, 1)), 64, 6, 0),
    ("vit_base_patch16_siglip_224", dict(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=4), 32, 2, 0),
]


def _written_out(model):
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if type(m).__name__ == "DropPath":
            m.drop_prob = 0.0
    return model


def _step(model, x, w):
    model.zero_grad()
    out = model(x)
    (out * w.to(out.dtype)).sum().backward()
    return out.detach(), {n.replace("_orig_mod.", ""): p.grad.detach().clone()
                          for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name,kw,size,fused,declined", MODELS, ids=[m[0] for m in MODELS])
def test_timm_family_training_step(name, kw, size, fused, declined):
    torch.manual_seed(0)
    model = _written_out(timm.create_model(name, pretrained=False, num_classes=5, **kw)).train()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    w = torch.randn(2, 5, generator=torch.Generator().manual_seed(2))
    golden_model, ours_model = copy.deepcopy(model).double(), copy.deepcopy(model)
    eager_out, eager_grads = _step(model, x, w)
    gold_out, gold_grads = _step(golden_model, x.double(), w)
    torch._dynamo.reset()
    attn_compiler.reset()
    compiled = torch.compile(ours_model, backend=attn_compiler.backend(inner="aot_eager"))
    ours_out, ours_grads = _step(compiled, x, w)
    rep = attn_compiler.report()
    assert (len(rep.fused), len(rep.declined)) == (fused, declined), str(rep)
    assert all(s.reason for s in rep.declined), str(rep)
    golden_check(ours_out, eager_out, gold_out, name="output")
    assert ours_grads.keys() == gold_grads.keys()
    for n, g in gold_grads.items():
        if g.norm() > 1e-9 * max(v.norm() for v in gold_grads.values()):
            golden_check(ours_grads[n], eager_grads[n], g, name=n)
