"""The generated forward kernel (templates/attention_fwd.py.tmpl via
``kernels.forward``) against the float64 golden of the blockwise reference.

Golden-relative (STYLE.md §2, helpers in tests/kernel_checks.py): out must
satisfy err(ours) <= 2·err(eager) + tiny, lse of finite rows matches the
golden's to ~1e-5 and fully masked rows give NaN exactly where the reference
does.  Lengths are chosen off the block sizes (37, 53, 21 vs 53); small forced
tiles (16 x 16, 32 x 16) make several KV blocks, so band skipping walks FULL
and PARTIAL blocks.  On CPU the kernels run in Triton's interpreter.
"""
from __future__ import annotations

import pytest
import sympy
import torch

from attn_compiler import kernels, reference
from attn_compiler.autotune import KernelConfig
from attn_compiler.passes.analyze.spec import Lk, Lq
from attn_compiler.templates import codegen
from attn_compiler.testing import golden_check
from kernel_checks import (
    DEVICE, F32_MIN, T0, alibi_slopes, captured_spec, causal_mod, check_backward, check_forward,
    dtype_name, kv_idx, make_spec, masked, offset_causal_mod, padding_keep, padding_mod, q_idx, qkv, randn,
    references_forward, score, softcap_causal_mod, window_mod)

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::RuntimeWarning")   # numpy inside Triton's interpreter

TILE_16 = KernelConfig(16, 16, 4, 1)
TILE_32x16 = KernelConfig(32, 16, 4, 1)


# ---- the case table ---------------------------------------------------------------
# name -> score_mod, input shapes (kernel_checks.qkv), captured (builder(B, Hq, Lq, Lk),
# CapturedTensor specs), GQA group, tile

def _bias(b, h, lq, lk):
    return [randn(1, h, lq, lk, seed=5)]


CASES = {
    "plain": dict(mod=score, shape=dict(Lq=37, Lk=53), tile=TILE_16),
    # lengths multiples of the tile and D == BLOCK_D: the unmasked-load paths
    "plain_even": dict(mod=score, shape=dict(Lq=32, Lk=64), tile=TILE_16),
    "causal": dict(mod=causal_mod(), shape=dict(Lq=53), tile=TILE_16),
    "offset_causal": dict(mod=offset_causal_mod(), shape=dict(Lq=21, Lk=53), tile=TILE_16),
    # window 40 over 16-wide tiles: each query block has PARTIAL, FULL, PARTIAL blocks
    "sliding_window": dict(mod=window_mod(40), shape=dict(Lq=70), tile=TILE_16),
    "softcap_causal": dict(mod=softcap_causal_mod(5.0), shape=dict(Lq=37, qscale=6.0), tile=TILE_32x16),
    "bias": dict(mod=score + T0, shape=dict(Lq=37, Lk=45), caps=(_bias, [captured_spec(".HQK")]),
                 tile=TILE_16),
    "alibi_causal": dict(mod=causal_mod(score + T0 * (kv_idx - q_idx)), shape=dict(Hq=4, Lq=37),
                         caps=(lambda b, h, lq, lk: [alibi_slopes(h)], [captured_spec(".H..")]),
                         tile=TILE_16),
    "gqa": dict(mod=causal_mod(), shape=dict(Hq=4, Hkv=2, Lq=37), group=2, tile=TILE_16),
    "mqa": dict(mod=score, shape=dict(Hq=4, Hkv=1, Lq=21, Lk=37), group=4, tile=TILE_16),
    "kv_batch_broadcast": dict(mod=causal_mod(), shape=dict(B=2, Bkv=1, Hq=4, Hkv=2, Lq=37), group=2,
                               tile=TILE_16),
    "head_dim_24": dict(mod=causal_mod(), shape=dict(Lq=37, Dh=24), tile=TILE_32x16),
    "head_dim_80": dict(mod=causal_mod(), shape=dict(Lq=37, Dh=80), tile=TILE_32x16),
    "dv_ne_d": dict(mod=offset_causal_mod(), shape=dict(Lq=21, Lk=37, Dh=24, Dv=40), tile=TILE_32x16),
    "default_tile": dict(mod=causal_mod(), shape=dict(Lq=37), tile=None),
}


def _run(name, dtype=torch.float32, k_factor=2.0):
    c = CASES[name]
    q, k, v = qkv(dtype=dtype, seed=len(name), **c["shape"])
    build, cap_specs = c.get("caps", (lambda *a: [], []))
    caps = build(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    spec = make_spec(c["mod"], dtype=dtype, captured=cap_specs, group=c.get("group", 1))
    return check_forward(q, k, v, caps, spec, config=c["tile"], k_factor=k_factor,
                         name=f"{name}/{dtype_name(dtype)}")


@pytest.mark.parametrize("name", list(CASES))
def test_forward_float32(name):
    _run(name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["causal", "softcap_causal", "gqa", "bias"])
def test_forward_half(name, dtype):
    """float16/bfloat16 (on CPU too: conftest.py corrects the interpreter's
    bfloat16 products and casts)."""
    _run(name, dtype)


# ---- layouts -------------------------------------------------------------------------

def test_noncontiguous_inputs_read_in_place():
    """(B, L, H, D) buffers viewed as (B, H, L, D): strides go to the kernel, no copy."""
    q, k, v = qkv(Lq=37, Lk=45, layout="blhd", seed=3)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    spec = make_spec(offset_causal_mod())
    out, _, _ = check_forward(q, k, v, [], spec, config=TILE_16)
    # the same numbers as from contiguous copies (bit for bit: same tiles, same order)
    same, _ = kernels.forward(q.contiguous(), k.contiguous(), v.contiguous(), [], spec, config=TILE_16)
    assert torch.equal(out, same)
    assert out.is_contiguous()


def test_empty_query():
    q, k, v = qkv(Lq=1, Lk=20)
    out, lse = kernels.forward(q[:, :, :0], k, v, [], make_spec(score))
    assert out.shape == (2, 2, 0, 16) and lse.shape == (2, 2, 0)


# ---- masks: fully masked rows --------------------------------------------------------

def test_padding_mask_neginf_fully_masked_rows_are_nan():
    """-inf fill, last batch every key padded: its rows are NaN (as eager), lse -inf,
    every other row finite; golden_check compares the NaN positions exactly."""
    q, k, v = qkv(Lq=37, Lk=45, seed=4)
    keep = padding_keep(2, 45, full_row=True)
    spec = make_spec(padding_mod(), captured=[captured_spec("B..K", "bool")])
    out, lse, gold = check_forward(q, k, v, [keep], spec, config=TILE_16)
    assert torch.isnan(gold[1]).all() and torch.isnan(out[1]).all()
    assert torch.isfinite(out[0]).all()
    assert torch.equal(lse[1], torch.full_like(lse[1], -float("inf")))


def test_finite_fill_fully_masked_rows_are_uniform():
    """finfo.min fill (a Piecewise value): a fully masked row averages V uniformly, no NaN."""
    q, k, v = qkv(Lq=37, Lk=45, seed=5)
    keep = padding_keep(2, 45, full_row=True)
    spec = make_spec(padding_mod(fill=sympy.Float(F32_MIN)), captured=[captured_spec("B..K", "bool")])
    out, lse, _ = check_forward(q, k, v, [keep], spec, config=TILE_16)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1], v[1].mean(1, keepdim=True).expand_as(out[1]), rtol=1e-5, atol=1e-6)
    assert (lse[1] == F32_MIN).all()        # a row of fills: lse is the fill, as the reference says


def test_finite_fill_causal_rows_with_band():
    """finfo.min fill on an offset band whose first rows keep nothing: no skipping (MODE 2)."""
    q, k, v = qkv(Lq=37, Lk=37, seed=6)
    spec = make_spec(masked(kv_idx <= q_idx - 3, fill=sympy.Float(F32_MIN)))
    assert kernels.mask_plan(spec, 37, 37).mode == 2
    out, _, _ = check_forward(q, k, v, [], spec, config=TILE_16)
    torch.testing.assert_close(out[:, :, :3], v.mean(2, keepdim=True).expand(-1, -1, 3, -1), rtol=1e-5,
                               atol=1e-6)


def test_additive_finfo_min_mask_fully_masked_row_is_uniform():
    """HF-style additive mask [B, 1, 1, Lk] of 0 / finfo.min with one batch fully masked."""
    q, k, v = qkv(Lq=37, Lk=45, seed=7)
    add = torch.where(padding_keep(2, 45, full_row=True), 0.0, F32_MIN)
    spec = make_spec(score + T0, captured=[captured_spec("B..K")])
    out, lse = kernels.forward(q, k, v, [add], spec, config=TILE_16)
    eager_out, eager_lse = reference.attention_forward(q, k, v, [add], spec, None)
    assert torch.isfinite(eager_out).all()
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, eager_lse, rtol=1e-5, atol=1e-5)


# ---- block skipping --------------------------------------------------------------

def test_mask_plans():
    """MODE 0 no mask, 1 band (static skipping), 2 every block PARTIAL (a finite
    fill some row holds only), 3 the runtime block map (other masks)."""
    plan = kernels.mask_plan
    assert plan(make_spec(score), 37, 53).mode == 0
    assert plan(make_spec(causal_mod()), 53, 53) == kernels.MaskPlan(1, 0, 0, False, True)
    assert plan(make_spec(offset_causal_mod()), 21, 53) == kernels.MaskPlan(1, 0, 32, False, True)
    assert plan(make_spec(window_mod(40)), 70, 70) == kernels.MaskPlan(1, -39, 0, True, True)
    pad = [captured_spec("B..K", "bool")]
    assert plan(make_spec(padding_mod(), captured=pad), 37, 45).mode == 3
    # a finite fill: the block map still skips, except in blocks with a row of fills only
    assert plan(make_spec(padding_mod(fill=sympy.Float(F32_MIN)), captured=pad), 37, 45) == \
        kernels.MaskPlan(3, fill_rows=True)
    # a finite-fill band: skipping is exact only while every row keeps something
    assert plan(make_spec(causal_mod().subs(-sympy.oo, F32_MIN)), 37, 37).mode == 1
    assert plan(make_spec(masked(kv_idx <= q_idx - 3, fill=sympy.Float(F32_MIN))), 37, 37).mode == 2


def _general(keep, fill=-sympy.oo):
    """``keep`` with kv_idx spelled Mod(kv_idx, Lk) (equal for kv_idx < Lk): no band."""
    return masked(keep.subs(kv_idx, sympy.Mod(kv_idx, Lk)), fill=fill)


@pytest.mark.parametrize("lq, lk, keep", [
    (53, 53, kv_idx <= q_idx),
    (70, 70, (kv_idx <= q_idx) & (q_idx - kv_idx < 40)),
    (21, 53, kv_idx <= q_idx + Lk - Lq),
], ids=["causal", "window", "offset_causal"])
def test_block_skipping_changes_no_bit(lq, lk, keep):
    """A skipped block adds exactly nothing and a FULL block only drops mask
    work: the band walk (MODE 1) and the block map (MODE 3) give bit-identical
    out and lse; the block map of a finite fill the same up to rounding (its
    scores stay in natural units: [Note: finite fills])."""
    specs = [make_spec(masked(keep)), make_spec(_general(keep)), make_spec(_general(keep, F32_MIN))]
    assert [kernels.mask_plan(s, lq, lk).mode for s in specs] == [1, 3, 3]
    q, k, v = qkv(Lq=lq, Lk=lk, seed=8)
    (o1, l1), (o3, l3), (o2, l2) = (kernels.forward(q, k, v, [], s, config=TILE_16) for s in specs)
    assert torch.equal(o1, o3) and torch.equal(l1, l3)
    torch.testing.assert_close(o2, o1, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(l2, l1, rtol=1e-6, atol=1e-6)
    eager, _, golden, _ = references_forward(q, k, v, [], specs[0])
    golden_check(o1, eager, golden, name="band")


def test_block_map_of_index_arithmetic_is_made_on_the_queries_device(monkeypatch):
    """A mask of index arithmetic alone (no band: MODE 3) captures no tensor;
    its block map is allocated on the queries' device (it was made on the CPU,
    which a CUDA launch refuses)."""
    made_on = []
    block_map = kernels.block_map

    def spy(*args, **kwargs):
        made_on.append(kwargs.get("device"))        # asked for explicitly, not taken from the captures
        out = block_map(*args, **kwargs)
        assert out[0].device == kwargs.get("device")
        return out

    monkeypatch.setattr(kernels, "block_map", spy)
    spec = make_spec(_general(kv_idx <= q_idx))
    q, k, v = qkv(Lq=37, seed=9)
    kernels.forward(q, k, v, [], spec, config=TILE_16)
    kernels.backward(torch.ones_like(q), q, k, v, [], *kernels.forward(q, k, v, [], spec, config=TILE_16), spec,
                     config=TILE_16)
    assert len(made_on) == 4 and all(d == q.device for d in made_on)


RUN_OPEN = 1 << 28      # the templates' open run end


def test_block_map_of_a_padding_mask():
    """The generated block-map kernel: 0 skip / 1 PARTIAL / 2 FULL per (b, tile),
    one query block (a padding mask does not vary along q_idx or h)."""
    B, Lq, Lk = 2, 37, 64
    keep = torch.ones(B, 1, 1, Lk, dtype=torch.bool, device=DEVICE)
    keep[0, ..., 40:] = False            # tiles of 16: FULL, FULL, PARTIAL, skip
    keep[1, ..., :16] = False            # skip, FULL, FULL, FULL
    keep[1, ..., 50] = False             # ... but tile 3 PARTIAL
    spec = make_spec(padding_mod(), captured=[captured_spec("B..K", "bool")])
    mod = codegen.load("fwd", spec)
    m, sb, sh, sm = kernels.block_map(mod, spec, [keep], B, 2, Lq, Lk, 16, 16)
    assert m.shape == (B, 1, 1, 4) and sh == 0 and sm == 0 and sb == m.stride(0)
    assert (m & 3).flatten(1).tolist() == [[2, 2, 1, 0], [0, 2, 2, 1]]
    # each entry's run end ([Note: runs of the block map]); the last run is open
    assert (m >> 2).flatten(1).tolist() == [[2, 2, 3, RUN_OPEN], [1, 3, 3, RUN_OPEN]]
    # down the columns (the dK/dV walk): one query block for every row, open runs
    c = kernels.block_map(mod, spec, [keep], B, 2, Lq, Lk, 16, 16, cols=True)[0]
    assert torch.equal(c & 3, m & 3) and ((c >> 2) == RUN_OPEN).all()
    # and the forward that walks it: the finite-fill walk the same up to rounding
    q, k, v = qkv(B=B, Lq=Lq, Lk=Lk, seed=13)
    out, _, _ = check_forward(q, k, v, [keep], spec, config=TILE_16)
    fill = make_spec(padding_mod(fill=sympy.Float(F32_MIN)), captured=[captured_spec("B..K", "bool")])
    torch.testing.assert_close(out, kernels.forward(q, k, v, [keep], fill, config=TILE_16)[0],
                               rtol=1e-6, atol=1e-6)
    # a finite fill's map: the same while every row keeps a key; a block with a
    # row of fills only (batch 1 all padded: uniform, as eager) skips nothing
    m_fill = kernels.block_map(codegen.load("fwd", fill), fill, [keep], B, 2, Lq, Lk, 16, 16)[0]
    assert torch.equal(m_fill, m)
    keep[1] = False
    m_fill = kernels.block_map(codegen.load("fwd", fill), fill, [keep], B, 2, Lq, Lk, 16, 16)[0]
    assert (m_fill & 3).flatten(1).tolist() == [[2, 2, 1, 0], [1, 1, 1, 1]]
    check_forward(q, k, v, [keep], fill, config=TILE_16, name="fill rows")


# ---- dropout -------------------------------------------------------------------------

SEED = torch.tensor(123456789012345, dtype=torch.int64)


def test_dropout_matches_the_reference():
    """Same counter-based keep-mask as the reference: golden-relative with the same seed."""
    q, k, v = qkv(Hq=4, Hkv=2, Lq=37, Lk=45, seed=9)
    spec = make_spec(causal_mod(), group=2, dropout_p=0.3)
    check_forward(q, k, v, [], spec, seed=SEED, config=TILE_16)


def test_dropout_keep_mask_is_the_reference_mask():
    """V = identity makes out = P ∘ keep / (1-p) observable: kept exactly where
    ``reference.dropout_keep_mask`` keeps, about 70 % of positions for p = 0.3."""
    B, H, L = 2, 2, 64
    q, k, _ = qkv(B=B, Hq=H, Lq=L, seed=10)
    v = torch.eye(L, device=DEVICE).expand(B, H, L, L)                     # (B, H, Lk, Dv = Lk)
    out, _ = kernels.forward(q, k, v, [], make_spec(score, dropout_p=0.3), SEED, config=KernelConfig(32, 32, 4, 1))
    kept = out != 0                                           # P > 0 everywhere without a mask
    b, h, i, j = (torch.arange(n).view([n if a == d else 1 for a in range(4)]) for d, n in enumerate((B, H, L, L)))
    want = reference.dropout_keep_mask(int(SEED), 0.3, b, h, i, j)
    assert torch.equal(kept.cpu(), want)
    assert abs(kept.double().mean().item() - 0.7) < 0.02      # 16k draws: std 0.004
    # and the kept values are P / (1 - p)
    p = torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1)
    torch.testing.assert_close(out[kept], (p / 0.7)[kept], rtol=1e-5, atol=1e-7)


def test_dropout_needs_a_seed():
    q, k, v = qkv(Lq=16)
    with pytest.raises(ValueError, match="seed"):
        kernels.forward(q, k, v, [], make_spec(score, dropout_p=0.1))


# ---- on the GPU: realistic size ------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("mod", ["causal", "softcap"])
def test_bf16_realistic_size_on_gpu(mod):
    B, H, L, Dh = 2, 8, 1024, 128
    q, k, v = (t.cuda() for t in qkv(B=B, Hq=H, Lq=L, Dh=Dh, dtype=torch.bfloat16, seed=12,
                                      qscale=3.0 if mod == "softcap" else 1.0))
    spec = make_spec(causal_mod() if mod == "causal" else softcap_causal_mod(30.0), dtype=torch.bfloat16)
    check_forward(q, k, v, [], spec, name=f"gpu/{mod}")


def test_tma_variant_matches_and_refuses_unsuited_layouts():
    """K/V through tensor descriptors (the "tma" config variant) give the pointer
    path's result; a K without a unit head-dim stride is refused (the tuner then
    drops that candidate)."""
    tma = KernelConfig(16, 32, 4, 2, "tma")
    for mod in (score, causal_mod()):
        spec = make_spec(mod, group=2)
        q, k, v = qkv(B=2, Hq=4, Hkv=2, Lq=45, Lk=70, Dh=32, seed=21)
        ours, lse = kernels.forward(q, k, v, [], spec, None, tma)
        ref, ref_lse = kernels.forward(q, k, v, [], spec, None, KernelConfig(16, 32, 4, 2))
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lse, ref_lse, rtol=1e-6, atol=1e-6)
    k_t = k.transpose(-1, -2).contiguous().transpose(-1, -2)          # head-dim stride != 1
    with pytest.raises(ValueError, match="tma variant"):
        kernels.forward(q, k_t, v, [], spec, None, tma)
    # a learned bias (1, H, Lq, Lk) is read through its own descriptor
    q, k, v = qkv(B=2, Hq=2, Lq=45, Lk=72, Dh=32, seed=22)
    bias = randn(1, 2, 45, 72, seed=6)
    spec = make_spec(causal_mod(score + T0), captured=[captured_spec(".HQK")])
    ours, lse = kernels.forward(q, k, v, [bias], spec, None, tma)
    ref, ref_lse = kernels.forward(q, k, v, [bias], spec, None, KernelConfig(16, 32, 4, 2))
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="captured tensor 0"):    # rows of 45 floats: not 16-byte aligned
        kernels.forward(q, k, v, [randn(1, 2, 72, 45, seed=6).transpose(-1, -2)], spec, None, tma)


def test_tma_variant_reads_a_padding_row_through_a_descriptor():
    """Hugging Face's additive padding mask (B, 1, 1, Lk) under the "tma"
    variant: its (BLOCK_N,) rows come through a 1-D tensor descriptor (zeros
    past Lk); the result is the pointer path's, a fully padded batch included
    (rows of finfo.min: uniform).  A mask whose batch rows are not 16-byte
    aligned is refused."""
    tma = KernelConfig(16, 32, 4, 2, "tma")
    q, k, v = qkv(B=2, Hq=2, Lq=37, Lk=44, Dh=32, seed=23)
    add = torch.where(padding_keep(2, 44, full_row=True), 0.0, F32_MIN)
    for mod in (score + T0, causal_mod(score + T0)):
        spec = make_spec(mod, captured=[captured_spec("B..K")])
        assert "T0.load([start_n])" in codegen.generate("fwd", spec).source
        ours, lse = kernels.forward(q, k, v, [add], spec, None, tma)
        ref, ref_lse = kernels.forward(q, k, v, [add], spec, None, KernelConfig(16, 32, 4, 2))
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lse, ref_lse, rtol=1e-6, atol=1e-6)
    q, k, v = qkv(B=2, Hq=2, Lq=37, Lk=45, Dh=32, seed=23)
    add = torch.where(padding_keep(2, 45), 0.0, F32_MIN)            # batch rows of 45 floats
    with pytest.raises(ValueError, match="captured tensor 0"):
        kernels.forward(q, k, v, [add], spec, None, tma)


def test_float32_softcap_of_small_scores():
    """Gemma-2's 50·tanh(score / 50) in float32: score / 50 is small, where
    2·sigmoid(2x) - 1 loses ~6e-8 absolutely (x50 on the score) and missed the
    golden-relative bound; float32 specs use the accurate _tanh_f32 (forward,
    and backward's 1 - tanh²)."""
    q, k, v = qkv(Lq=37, Dh=32, seed=51)
    spec = make_spec(softcap_causal_mod(50.0))
    check_forward(q, k, v, [], spec, config=TILE_32x16)
    check_backward(q, k, v, [], spec, config=TILE_32x16)
