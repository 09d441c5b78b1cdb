"""The split-KV decode kernels (templates/attention_decode.py.tmpl via
``kernels.decode``) against the float64 golden, and the launcher's rules
(``decode_applies``, ``num_splits``).

Golden-relative (STYLE.md §2, helpers in tests/kernel_checks.py).  Queries are
the last Lq positions of a Lk = 77 cache (bottom-right aligned masks); the
G query heads of a KV head are packed into one tile; splits of 16-key blocks
cover 1, 3 or (clamped) every block, including splits the mask leaves empty.
"""
from __future__ import annotations

import functools
import math

import pytest
import sympy
import torch

from attn_compiler import kernels
from attn_compiler.autotune import KernelConfig
from attn_compiler.passes.analyze.spec import Lk, Lq
from kernel_checks import (
    F32_MIN, captured_spec, check_forward, kv_idx, make_spec, masked, offset_causal_mod, padding_keep,
    padding_mod, q_idx, qkv, score)

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::RuntimeWarning")   # numpy inside Triton's interpreter

TILE = KernelConfig(16, 16, 4, 1)    # decode: block_n keys per step (the rows are G * Lq)
LK = 77                              # 5 blocks of 16


def _decode_check(q, k, v, caps, spec, splits):
    return check_forward(q, k, v, caps, spec, config=TILE, name=f"decode/splits={splits}",
                         launch=functools.partial(kernels.decode, splits=splits))


@pytest.mark.parametrize("splits", [None, 1, 3, 100], ids=["auto", "1", "3", "large"])
@pytest.mark.parametrize("lq, hq, hkv", [(1, 4, 1), (3, 4, 1), (1, 4, 4), (3, 4, 4)],
                         ids=["lq1-g4", "lq3-g4", "lq1-g1", "lq3-g1"])
def test_offset_causal(lq, hq, hkv, splits):
    q, k, v = qkv(B=2, Hq=hq, Hkv=hkv, Lq=lq, Lk=LK, Dh=24, Dv=40, seed=lq + hkv)
    _decode_check(q, k, v, [], make_spec(offset_causal_mod(), group=hq // hkv), splits)


@pytest.mark.parametrize("launch", ["decode", "forward"])
def test_output_laid_out_with_the_heads_inside_the_rows(launch):
    """``AttentionSpec.out_heads_inner`` ([Note: the output with the heads
    inside the rows]): the combine (and the forward kernel) write the output
    laid out as (B, Lq, H, Dv), golden-relative as ever."""
    import dataclasses
    q, k, v = qkv(B=2, Hq=4, Hkv=2, Lq=3, Lk=LK, Dh=24, Dv=40, seed=9)
    spec = dataclasses.replace(make_spec(offset_causal_mod(), group=2), out_heads_inner=True)
    if launch == "decode":
        out, _, _ = _decode_check(q, k, v, [], spec, splits=3)
    else:
        out, _, _ = check_forward(q, k, v, [], spec, name="forward, heads inside the rows")
    assert out.stride() == (3 * 4 * 40, 40, 4 * 40, 1)


def test_offset_window_leaves_splits_empty():
    """Keys [Lk - Lq - 19, Lk - 1] only: the band clamps each split, three of five are empty."""
    q, k, v = qkv(B=2, Hq=8, Hkv=2, Lq=2, Lk=LK, seed=1)
    w = 20
    spec = make_spec(masked((kv_idx <= q_idx + Lk - Lq) & (q_idx + Lk - Lq - kv_idx < w)), group=4)
    assert kernels.mask_plan(spec, 2, LK).mode == 1
    _decode_check(q, k, v, [], spec, splits=5)


def test_padding_mask_with_fully_masked_batch():
    """-inf padding: the fully padded batch's rows are NaN, lse -inf, as the reference."""
    q, k, v = qkv(B=2, Hq=4, Hkv=1, Lq=3, Lk=LK, seed=2)
    keep = padding_keep(2, LK, full_row=True)
    spec = make_spec(padding_mod(), group=4, captured=[captured_spec("B..K", "bool")])
    out, lse, _ = _decode_check(q, k, v, [keep], spec, splits=3)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[0]).all()
    assert (lse[1] == -math.inf).all()


def test_finite_fill_fully_masked_batch_is_uniform():
    q, k, v = qkv(B=2, Hq=4, Hkv=2, Lq=1, Lk=LK, seed=3)
    keep = padding_keep(2, LK, full_row=True)
    spec = make_spec(padding_mod(fill=sympy.Float(F32_MIN)), group=2, captured=[captured_spec("B..K", "bool")])
    out, lse, _ = _decode_check(q, k, v, [keep], spec, splits=3)
    want = v[1].mean(1, keepdim=True).repeat_interleave(2, dim=0)   # (Hq, 1, Dv): KV head h // 2
    torch.testing.assert_close(out[1], want, rtol=1e-5, atol=1e-6)
    assert (lse[1] == F32_MIN).all()


def test_zero_masked_fully_masked_batch_is_zero():
    """A ``zero_masked`` spec (P zeroed where the finfo.min fill went, after
    the softmax) beside a float bias: the fully padded batch gives 0, the
    other's dropped keys count in the denominator only."""
    import dataclasses
    from attn_compiler.passes.analyze.spec import captured_call
    q, k, v = qkv(B=2, Hq=4, Hkv=2, Lq=2, Lk=LK, seed=4)
    keep = padding_keep(2, LK, full_row=True)
    bias = torch.randn(2, 1, 1, LK, generator=torch.Generator().manual_seed(5)).to(q.device)
    mod = sympy.Piecewise((sympy.Float(F32_MIN), sympy.Eq(captured_call(1), 0)), (score + captured_call(0), True))
    spec = dataclasses.replace(make_spec(mod, group=2, captured=[captured_spec("B..K"), captured_spec("B..K", "bool")]),
                               zero_masked=True)
    out, _, _ = _decode_check(q, k, v, [bias, keep], spec, splits=3)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isfinite(out[0]).all()


def test_softcap_kv_batch_broadcast_noncontiguous():
    """Soft-capping, K/V of batch 1 for two query batches, a (B, L, H, D) cache view."""
    q, k, v = qkv(B=2, Bkv=1, Hq=4, Hkv=2, Lq=1, Lk=LK, layout="blhd", qscale=6.0, seed=4)
    assert not k.is_contiguous()
    spec = make_spec(offset_causal_mod(5.0 * sympy.tanh(score / 5.0)), group=2)
    _decode_check(q, k, v, [], spec, splits=3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision(dtype):
    q, k, v = qkv(B=2, Hq=4, Hkv=1, Lq=1, Lk=LK, dtype=dtype, seed=5)
    _decode_check(q, k, v, [], make_spec(offset_causal_mod(), dtype=dtype, group=4), splits=3)


# ---- the launcher's rules ------------------------------------------------------------

def test_decode_applies():
    spec = make_spec(score, group=0)

    def q(h, lq):
        return torch.empty(1, h, lq, 16)

    def k(h):
        return torch.empty(1, h, 128, 16)

    assert kernels.decode_applies(q(8, 8), k(1), spec)               # G * Lq = 64 packed rows
    assert not kernels.decode_applies(q(8, 9), k(1), spec)           # 72 > 64
    assert kernels.decode_applies(q(4, 16), k(4), spec)              # G = 1: 16 rows
    assert not kernels.decode_applies(q(4, 1), k(4), make_spec(score, group=0, dropout_p=0.1))


def test_decode_refuses_what_does_not_apply():
    q, k, v = qkv(B=1, Hq=8, Hkv=1, Lq=9, Lk=20)
    with pytest.raises(ValueError, match="G \\* Lq <= 64"):
        kernels.decode(q, k, v, [], make_spec(score, group=8))


def _efficiency(units, s, slots):
    waves = units * s / slots
    return waves / math.ceil(waves)


@pytest.mark.parametrize("units, n_blocks, sms, per_sm", [
    (4, 1000, 132, 1), (8, 64, 132, 1), (16, 5, 132, 1), (3, 40, 16, 1),
    (4, 1000, 132, kernels.DECODE_PROGRAMS_PER_SM), (40, 300, 132, kernels.DECODE_PROGRAMS_PER_SM),
])
def test_num_splits_picks_the_smallest_efficient_count(units, n_blocks, sms, per_sm):
    """FlashAttention's rule over ``per_sm`` program slots per multiprocessor."""
    slots = sms * per_sm
    s = kernels.num_splits(units, n_blocks, sms, per_sm=per_sm)
    top = min(128, n_blocks, slots)
    assert 1 <= s <= top
    best = max(_efficiency(units, c, slots) for c in range(1, top + 1))
    assert _efficiency(units, s, slots) >= 0.85 * best
    assert all(_efficiency(units, c, slots) < 0.85 * best for c in range(1, s))


def test_num_splits_rules():
    slots = 132 * kernels.DECODE_PROGRAMS_PER_SM
    assert kernels.num_splits(slots, 1000, 132) == 1                  # the units fill every slot
    assert kernels.num_splits(math.ceil(0.8 * slots), 1000, 132) == 1  # >= 80 % of them
    assert kernels.num_splits(slots // 2, 1000, 132) > 1
    assert kernels.num_splits(4, 1, 132) == 1                         # one block: nothing to split
    assert kernels.num_splits(4, 3, 132) == 3                         # never more splits than blocks
    assert kernels.num_splits(4, 1000, 132, per_sm=1) == 29           # 116 of 132: 88 % >= 85 % of 100 %
    assert kernels.num_splits(4, 1000, 132, max_splits=8, per_sm=1) == 7   # 28 of 132: within 85 % of 32


def test_config_sets_the_programs_per_sm(monkeypatch):
    """A decode config's ``per_sm`` reaches the split rule (the tuner tries 1
    and 2 slots per SM beside the default), and the result stays golden."""
    seen = []
    rule = kernels.num_splits

    def recording(*args, **kw):
        seen.append(kw.get("per_sm"))
        return rule(*args, **kw)
    monkeypatch.setattr(kernels, "num_splits", recording)
    q, k, v = qkv(B=1, Hq=4, Hkv=1, Lq=1, Lk=LK, seed=3)
    spec = make_spec(offset_causal_mod(), group=4)
    for per_sm in (0, 1):
        check_forward(q, k, v, [], spec, config=KernelConfig(16, 16, 4, 1, per_sm=per_sm),
                      name=f"decode/per_sm={per_sm}", launch=kernels.decode)
    assert seen == [kernels.DECODE_PROGRAMS_PER_SM, 1]
