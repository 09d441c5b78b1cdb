"""Terms read along part of the heads ([Note: split head axes]): 5-D scores
(B, X, Y, Lq, Lk) run as X * Y heads, and a bias or mask that varies along
only X or only Y is read at h // Y or h % Y.  Through the forward, backward
(gradients of q, k, v and of the terms), block-map and decode kernels,
golden-relative to the reference; the reference itself against the same
terms expanded to every head (no head map at all)."""
from __future__ import annotations

import dataclasses

import pytest
import sympy
import torch

from attn_compiler import kernels, reference
from attn_compiler.autotune import KernelConfig
from attn_compiler.passes.analyze.spec import CapturedTensor, captured_call
from attn_compiler.testing import golden_check
from kernel_checks import (DEVICE, check_backward, check_forward, make_spec, masked, qkv, randn,
                          references_forward, score, to64)

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::RuntimeWarning")   # numpy inside Triton's interpreter

TILE = KernelConfig(16, 16, 4, 1)
X, Y = 2, 3                       # heads = X * Y = 6


def _terms(B, Lq, Lk, dtype, grad=False):
    """A bias per (batch, x) (B, X, Lq, Lk) read at h // Y and one per y
    (1, Y, Lq, Lk) read at h % Y, with their CapturedTensors."""
    per_x = randn(B, X, Lq, Lk, seed=3).to(dtype)
    per_y = randn(1, Y, Lq, Lk, seed=4).to(dtype)
    name = str(dtype).removeprefix("torch.")
    caps = (CapturedTensor((True, True, True, True), name, grad, (), ("div", Y)),
            CapturedTensor((False, True, True, True), name, grad, (), ("mod", Y)))
    return [per_x, per_y], caps


def _spec(caps, dtype=torch.float32, group=1):
    return make_spec(score + captured_call(0) + captured_call(1), dtype=dtype, captured=caps, group=group)


def _expanded(caps, cspecs, H):
    """Each term read at every head: the same problem without head maps."""
    heads = torch.arange(H, device=DEVICE)
    return ([t.index_select(1, c.h_index(heads)) for t, c in zip(caps, cspecs)],
            tuple(dataclasses.replace(c, h_map=()) for c in cspecs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_forward(dtype):
    q, k, v = qkv(B=2, Hq=X * Y, Lq=21, Lk=37, dtype=dtype)
    caps, cspecs = _terms(2, 21, 37, dtype)
    check_forward(q, k, v, caps, _spec(cspecs, dtype), config=TILE)


def test_backward_of_q_k_v_and_the_terms():
    """Each head's dS added to its term's entry at h // Y or h % Y."""
    q, k, v = qkv(B=2, Hq=X * Y, Lq=21, Lk=37)
    caps, cspecs = _terms(2, 21, 37, torch.float32, grad=True)
    dq, dk, dv, dcap = check_backward(q, k, v, caps, _spec(cspecs), config=TILE)
    assert [tuple(g.shape) for g in dcap] == [(2, X, 21, 37), (1, Y, 21, 37)]


def test_reference_against_the_terms_expanded():
    """The reference's head maps (index per head, index-add of the gradient)
    against the same terms expanded to every head, float64."""
    q, k, v = (to64(t) for t in qkv(B=2, Hq=X * Y, Lq=13, Lk=11))
    caps, cspecs = _terms(2, 13, 11, torch.float64, grad=True)
    spec = _spec(cspecs, torch.float64)
    wide, wspecs = _expanded(caps, cspecs, X * Y)
    wspec = _spec(wspecs, torch.float64)
    out, lse = reference.attention_forward(q, k, v, caps, spec, None)
    out_w, lse_w = reference.attention_forward(q, k, v, wide, wspec, None)
    torch.testing.assert_close(out, out_w, rtol=1e-12, atol=1e-12)
    dout = to64(randn(out.shape, seed=11))
    g = reference.attention_backward(dout, q, k, v, caps, out, lse, spec, None)
    g_w = reference.attention_backward(dout, q, k, v, wide, out_w, lse_w, wspec, None)
    for a, b in zip(g[:3], g_w[:3]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    heads = torch.arange(X * Y, device=DEVICE)
    for t, c, a, b in zip(caps, cspecs, g[3], g_w[3]):
        summed = torch.zeros_like(t).index_add_(1, c.h_index(heads), b.sum(0, keepdim=True) if t.shape[0] == 1 else b)
        torch.testing.assert_close(a, summed, rtol=1e-12, atol=1e-12)


def test_mask_per_x_through_the_block_map():
    """A boolean key mask per (batch, x) (B, X, 1, Lk) read at h // Y: the
    block map has a row of tiles per head, each read at its x; a whole tile
    of keys masked in x = 1 only."""
    q, k, v = qkv(B=2, Hq=X * Y, Lq=21, Lk=48)
    keep = torch.ones(2, X, 1, 48, dtype=torch.bool)
    keep[0, 1, :, 16:32] = False
    keep[1, 0, :, 40:] = False
    keep = keep.to(DEVICE)
    cap = CapturedTensor((True, True, False, True), "bool", False, (), ("div", Y))
    spec = make_spec(masked(sympy.Ne(captured_call(0), 0)), captured=(cap,))
    check_forward(q, k, v, [keep], spec, config=TILE)
    check_backward(q, k, v, [keep], spec, config=TILE)


def test_decode():
    """Decode packs a KV head's query heads into rows: each row reads its
    own head's entry (off_h is a column there)."""
    q, k, v = qkv(B=2, Hq=X * Y, Hkv=2, Lq=1, Lk=80)
    caps, cspecs = _terms(2, 1, 80, torch.float32)
    spec = _spec(cspecs, group=3)
    out, lse = kernels.decode(q, k, v, caps, spec, splits=3)
    eager, _, gold, _ = references_forward(q, k, v, caps, spec)
    golden_check(out, eager, gold, name="decode/out")


def test_shapes_checked():
    """A term whose head axis does not have H / W (div) or W (mod) entries is
    refused with the shape the spec expects."""
    q, k, v = qkv(B=2, Hq=X * Y, Lq=5)
    caps, cspecs = _terms(2, 5, 5, torch.float32)
    with pytest.raises(ValueError, match="shape"):
        reference.attention_forward(q, k, v, [caps[1], caps[0]], _spec(cspecs), None)
