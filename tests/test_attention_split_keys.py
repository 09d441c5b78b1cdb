"""Terms read along a split key axis ([Note: split key axes]): SAM's decomposed
relative positions ``rel_h[b, h, q, kv // W] + rel_w[b, h, q, kv % W]``,
through the forward, backward (gradients of q, k, v and of the terms) and
decode kernels, golden-relative to the reference.  Tiles of 16 keys make both
of the generated loads run: W = 16 (a tile lies in one W-run of keys, the
aligned load) and W = 6 (the per-element gather)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from attn_compiler import kernels
from attn_compiler.autotune import KernelConfig
from attn_compiler.passes.analyze.spec import CapturedTensor, captured_call
from attn_compiler.testing import golden_check
from kernel_checks import (check_backward, check_forward, make_spec, qkv, randn,
                          references_forward, score)

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::RuntimeWarning")   # numpy inside Triton's interpreter

TILE = KernelConfig(16, 16, 4, 1)


def _split_terms(B, H, Lq, Lk, w, dtype):
    """rel_h (B, H, Lq, ceil(Lk / w)) read at kv // w and rel_w (1, H, Lq, w)
    read at kv % w, with their CapturedTensors."""
    rel_h = randn(B, H, Lq, -(-Lk // w), seed=3).to(dtype)
    rel_w = randn(1, H, Lq, w, seed=4).to(dtype)
    name = str(dtype).removeprefix("torch.")
    caps = (CapturedTensor((True, True, True, True), name, False, ("div", w)),
            CapturedTensor((False, True, True, True), name, False, ("mod", w)))
    return [rel_h, rel_w], caps


def _spec(caps, dtype):
    return make_spec(score + captured_call(0) + captured_call(1), dtype=dtype, captured=caps)


@pytest.mark.parametrize("w", [16, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_forward(w, dtype):
    q, k, v = qkv(B=2, Hq=2, Lq=21, Lk=48, dtype=dtype)
    caps, cspecs = _split_terms(2, 2, 21, 48, w, dtype)
    check_forward(q, k, v, caps, _spec(cspecs, dtype), config=TILE)


@pytest.mark.parametrize("w", [16, 6])
def test_backward_of_q_k_v(w):
    q, k, v = qkv(B=2, Hq=2, Lq=21, Lk=48)
    caps, cspecs = _split_terms(2, 2, 21, 48, w, torch.float32)
    check_backward(q, k, v, caps, _spec(cspecs, torch.float32), config=TILE)


@pytest.mark.parametrize("w", [16, 6])
def test_decode(w):
    q, k, v = qkv(B=2, Hq=4, Hkv=2, Lq=1, Lk=80)
    caps, cspecs = _split_terms(2, 4, 1, 80, w, torch.float32)
    spec = make_spec(score + captured_call(0) + captured_call(1), captured=cspecs, group=2)
    out, lse = kernels.decode(q, k, v, caps, spec, splits=3)
    eager, _, gold, _ = references_forward(q, k, v, caps, spec)
    golden_check(out, eager, gold, name="decode/out")


@pytest.mark.parametrize("w", [16, 6])
def test_backward_of_the_terms(w):
    """The terms' own gradients: each key's dS added at kv // W or kv % W."""
    q, k, v = qkv(B=2, Hq=2, Lq=21, Lk=48)
    caps, cspecs = _split_terms(2, 2, 21, 48, w, torch.float32)
    cspecs = tuple(dataclasses.replace(c, requires_grad=True) for c in cspecs)
    check_backward(q, k, v, caps, _spec(cspecs, torch.float32), config=TILE)
