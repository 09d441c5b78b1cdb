"""[Note: written operands] in passes/operands.py: in-place writes around the
copies between a model's tensors and Q·Kᵀ.  A write before a copy changes
nothing (a static KV cache updated, then repeated for GQA: the op still takes
the narrow cache); a write after it means the op must read what the product
read."""
from __future__ import annotations

import math

import pytest
import torch

import attn_compiler

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

B, HQ, HKV, LMAX, D = 2, 8, 2, 24, 16


def repeat_kv(x, n):
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d)


def static_cache_decode(q, k_new, v_new, k_cache, v_cache, pos):
    """A static KV cache written in place (``index_copy_``), then repeated."""
    k_cache.index_copy_(2, pos, k_new)
    v_cache.index_copy_(2, pos, v_new)
    k, v = repeat_kv(k_cache, HQ // HKV), repeat_kv(v_cache, HQ // HKV)
    s = q @ k.transpose(-1, -2) / math.sqrt(D)
    return s.softmax(-1) @ v


def cache_written_after_the_repeat(q, k_new, v_new, k_cache, v_cache, pos):
    """The cache written after its repeat: the repeat holds the old values."""
    k, v = repeat_kv(k_cache, HQ // HKV).contiguous(), repeat_kv(v_cache, HQ // HKV).contiguous()
    k_cache.index_copy_(2, pos, k_new)
    s = q @ k.transpose(-1, -2) / math.sqrt(D)
    return s.softmax(-1) @ v


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return [r(B, HQ, 1, D), r(B, HKV, 1, D), r(B, HKV, 1, D), r(B, HKV, LMAX, D), r(B, HKV, LMAX, D),
            torch.tensor([5])]


@pytest.mark.parametrize("form, group", [(static_cache_decode, HQ // HKV), (cache_written_after_the_repeat, 1)])
def test_cache_writes_around_the_repeat(form, group):
    torch._dynamo.reset()
    attn_compiler.reset()
    args = _inputs()
    want = form(*[a.clone() for a in args])
    got = torch.compile(form, backend=attn_compiler.backend(inner="aot_eager"))(*[a.clone() for a in args])
    torch.testing.assert_close(got, want)
    (site,) = attn_compiler.report().fused
    assert site.features["gqa_group"] == group, site.features
