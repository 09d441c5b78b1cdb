"""Additive masks whose values only the kernels see ([Note: additive tensor
masks] in attn_compiler/kernels.py): a float tensor added to the scores as it
is, such as the (B, 1, Lq, Lk) mask of 0 and finfo.min that Hugging Face's
generation passes to a model with a static cache (causal, left padding, and
the cache's unfilled tail in one tensor).  Where the keys are many, the block
map skips the tiles it drops; every result stays golden-relative to eager,
rows that keep no key included."""
from __future__ import annotations

import functools

import pytest
import sympy
import torch

from attn_compiler import kernels
from attn_compiler.autotune import KernelConfig
from attn_compiler.passes.analyze.spec import MASK_FILL_THRESHOLD, captured_call
from attn_compiler.templates import codegen
from kernel_checks import (
    DEVICE, F32_MIN, T0, captured_spec, causal_mod, check_backward, check_forward, make_spec, masked, qkv,
    randn, references_forward, score)

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::RuntimeWarning")   # numpy inside Triton's interpreter

TILE_16 = KernelConfig(16, 16, 4, 1)
LK = kernels.ADDITIVE_MAP_MIN_KEYS + 32       # past the size the map is built from


def static_cache_mask(B: int, Lq: int, Lk: int, past: int, fill: float = F32_MIN,
                      pad=(0, 5)) -> torch.Tensor:
    """(B, 1, Lq, Lk) float, as a generation step with a static cache of Lk
    slots builds it: query row i (position past + i) keeps keys 0..past + i,
    batch b's first ``pad[b]`` positions are left padding, the slots after
    past + Lq are unfilled."""
    i = torch.arange(Lq)[:, None] + past
    j = torch.arange(Lk)[None, :]
    keep = (j <= i).expand(B, 1, Lq, Lk).clone()
    for b, p in enumerate(pad[:B]):
        keep[b, ..., :p] = False
    return torch.where(keep, 0.0, fill).to(DEVICE)


def additive_spec(dims="B.QK"):
    return make_spec(score + T0, captured=[captured_spec(dims)])


def test_which_tensors_count_as_additive_masks():
    """Float, no gradient, no head axis, added as it is; the map only where
    the keys are many and no band already walks the blocks."""
    assert additive_spec().additive_masks == (0,)
    assert additive_spec("B..K").additive_masks == (0,)
    assert make_spec(score + T0, captured=[captured_spec("BHQK")]).additive_masks == ()       # a per-head bias
    assert make_spec(score + T0, captured=[captured_spec("B.QK", grad=True)]).additive_masks == ()   # learned
    assert make_spec(score + 2 * T0, captured=[captured_spec("B.QK")]).additive_masks == ()
    assert make_spec(score * T0, captured=[captured_spec("B.QK")]).additive_masks == ()
    softcap = make_spec(30 * sympy.tanh(score / 30) + T0, captured=[captured_spec("B.QK")])
    assert softcap.additive_masks == (0,)
    plan = kernels.mask_plan
    assert plan(additive_spec(), 40, LK) == kernels.MaskPlan(3, fill_rows=True)
    assert plan(additive_spec(), 40, kernels.ADDITIVE_MAP_MIN_KEYS - 1).mode == 0
    # beside a causal band, added inside the mask or after it: the map holds the band too
    for mod in (causal_mod(score + T0), causal_mod() + T0):
        causal_plus = make_spec(mod, captured=[captured_spec("B..K")])
        assert causal_plus.additive_masks == (0,), mod
        assert plan(causal_plus, LK, LK) == kernels.MaskPlan(3, fill_rows=True)


def test_block_map_drops_the_tiles_a_static_cache_mask_fills():
    """Tiles of fills only are 0, unless a row of their query block keeps no
    key (batch 1's first rows are left padding only: uniform in eager)."""
    B, Lq, Lk, past = 2, 32, LK, 100
    mask = static_cache_mask(B, Lq, Lk, past, pad=(0, past + 4))
    spec = additive_spec()
    mod = codegen.load("fwd", spec)
    m = kernels.block_map(mod, spec, [mask], B, 2, Lq, Lk, 16, 64)[0] & 3
    assert m.shape == (B, 1, 2, 5)
    # batch 0: rows at positions 100..115 keep keys up to their own, rows at
    # 116..131 the same; the slots from 132 on are unfilled
    # 116..131 the same; the slots from 132 on are unfilled.  The first tile
    # keeps every key with a 0: ZERO (3), walked without the mask
    assert m[0, 0].tolist() == [[3, 1, 0, 0, 0], [3, 1, 1, 0, 0]]
    # batch 1: rows 0..3 of the first block keep nothing: no tile of it is skipped
    assert m[1, 0, 0].tolist() == [1, 1, 1, 1, 1]
    assert m[1, 0, 1].tolist() == [0, 1, 1, 0, 0]
    # a kept value that is not 0 (a bias in the mask) keeps the tile FULL (2);
    # so does a nan (it must reach the row, as in eager)
    for value in (-0.5, float("nan")):
        biased = mask.clone()
        biased[0, 0, 20, 7] = value
        m = kernels.block_map(mod, spec, [biased], B, 2, Lq, Lk, 16, 64)[0] & 3
        assert m[0, 0].tolist() == [[3, 1, 0, 0, 0], [2, 1, 1, 0, 0]]
    # -0.0 adds nothing either
    negzero = torch.where(mask == 0, torch.full_like(mask, -0.0), mask)
    m = kernels.block_map(mod, spec, [negzero], B, 2, Lq, Lk, 16, 64)[0] & 3
    assert m[0, 0].tolist() == [[3, 1, 0, 0, 0], [3, 1, 1, 0, 0]]


@pytest.mark.parametrize("fill", [F32_MIN, -1e4, float("-inf")], ids=["finfo_min", "minus_1e4", "neg_inf"])
def test_forward_and_backward_with_a_static_cache_mask(fill):
    """Prefill into a static cache: causal, left padding, unfilled tail, one
    fill; forward and backward golden-relative, with and without rows that
    keep no key (uniform with a finite fill, nan with -inf: as eager)."""
    B, Lq, past = 2, 40, 0
    spec = additive_spec()
    assert kernels.mask_plan(spec, Lq, LK).mode == 3
    q, k, v = qkv(B=B, Lq=Lq, Lk=LK, seed=3)
    mask = static_cache_mask(B, Lq, LK, past, fill)
    out, _, _ = check_forward(q, k, v, [mask], spec, config=TILE_16, name="static cache")
    eager = references_forward(q, k, v, [mask], spec)[0]
    # batch 1's first 5 rows keep no key: eager's uniform rows, or nan
    assert torch.equal(out[1, :, :5].isnan(), eager[1, :, :5].isnan())
    if fill == float("-inf"):
        assert out[1, :, :5].isnan().all()
        mask = static_cache_mask(B, Lq, LK, past, fill, pad=(0, 0))   # the backward of nan rows is nan
    check_backward(q, k, v, [mask], spec, config=TILE_16, name="static cache")


def test_bfloat16_mask_and_inputs():
    """A bfloat16 model's mask (its own finfo.min), a key-only padding row too."""
    q, k, v = qkv(B=2, Lq=24, Lk=LK, dtype=torch.bfloat16, seed=5)
    spec = make_spec(score + T0, dtype=torch.bfloat16, captured=[captured_spec("B.QK", "bfloat16")])
    mask = static_cache_mask(2, 24, LK, 200, float(torch.finfo(torch.bfloat16).min)).to(torch.bfloat16)
    check_forward(q, k, v, [mask], spec, config=TILE_16, name="bf16")
    row = make_spec(score + T0, captured=[captured_spec("B..K")])
    pad = torch.zeros(2, 1, 1, LK, device=DEVICE)
    pad[0, ..., 150:] = F32_MIN
    pad[1, ..., :20] = F32_MIN
    q, k, v = qkv(B=2, Lq=24, Lk=LK, seed=6)
    check_forward(q, k, v, [pad], row, config=TILE_16, name="padding row")
    check_backward(q, k, v, [pad], row, config=TILE_16, name="padding row")


def test_zero_tiles_beside_other_terms():
    """ZERO tiles ([Note: tiles of zeros]) drop only the additive masks: a
    learned bias beside a padding row keeps its values and gets its gradient
    there, a soft-cap stays applied; the map has ZERO tiles to walk."""
    T1 = captured_call(1)
    spec = make_spec(score + T1 + T0, captured=[captured_spec("B..K"), captured_spec(".HQK", grad=True)])
    assert spec.additive_masks == (0,)
    q, k, v = qkv(B=2, Lq=24, Lk=LK, seed=9)
    pad = torch.zeros(2, 1, 1, LK, device=DEVICE)
    pad[0, ..., 150:] = F32_MIN
    pad[1, ..., 30:40] = -2.5              # a bias in the mask: those tiles stay FULL
    bias = randn(1, 2, 24, LK, seed=10)
    mod = codegen.load("fwd", spec)
    kinds = kernels.block_map(mod, spec, [pad, bias], 2, 2, 24, LK, 16, 64)[0] & 3
    assert (kinds == 3).any() and (kinds[1] == 2).any() and (kinds[0] == 0).any()
    check_forward(q, k, v, [pad, bias], spec, config=TILE_16, name="bias + padding")
    check_backward(q, k, v, [pad, bias], spec, config=TILE_16, name="bias + padding")
    softcap = make_spec(30 * sympy.tanh(score / 30) + T0, captured=[captured_spec("B.QK")])
    mask = static_cache_mask(2, 24, LK, 100)
    check_forward(q, k, v, [mask], softcap, config=TILE_16, name="softcap")
    check_backward(q, k, v, [mask], softcap, config=TILE_16, name="softcap")


@pytest.mark.parametrize("order", ["inside", "after"])
def test_causal_band_beside_an_additive_padding_mask(order):
    """A causal mask built in the graph and a padding mask received as values
    (research code's ``att.masked_fill(causal, -inf) + pad``, or the padding
    added first): the map drops the tiles above the diagonal and the padded
    keys, the diagonal's inner tiles are ZERO; rows left without a key (left
    padding past their own position) are uniform over their band, as eager;
    forward, backward and decode."""
    mod = causal_mod(score + T0) if order == "inside" else causal_mod() + T0
    spec = make_spec(mod, captured=[captured_spec("B..K")], group=2)
    B, Lq = 2, 96                            # rows 0..95: keys past 95 are above the band
    q, k, v = qkv(B=B, Hq=4, Hkv=2, Lq=Lq, Lk=LK, seed=12)
    pad = torch.zeros(B, 1, 1, LK, device=DEVICE)
    pad[0, ..., 200:] = F32_MIN             # right padding
    pad[1, ..., :20] = F32_MIN              # left padding: rows 0..19 keep no key of their band
    mod_fwd = codegen.load("fwd", spec)
    kinds = kernels.block_map(mod_fwd, spec, [pad], B, 4, Lq, LK, 16, 64)[0] & 3
    assert kinds.shape[:3] == (B, 1, -(-Lq // 16))
    assert kinds[0, 0, -1, -1] == 0 and kinds[0, 0, 0, -1] == 0            # padded keys / above the band
    assert (kinds[0, 0, 4:, 0] == 3).all()                                # inside the band, no padding
    assert (kinds[1, 0, 0] >= 1).all()            # a query block with rows keeping nothing walks every tile
    check_forward(q, k, v, [pad], spec, config=TILE_16, name=f"causal + padding {order}")
    check_backward(q, k, v, [pad], spec, config=TILE_16, name=f"causal + padding {order}")
    check_forward(q[:, :, -3:], k, v, [pad], spec, config=DECODE_TILE, name=f"decode {order}",
                  launch=functools.partial(kernels.decode, splits=3))


def test_values_that_are_no_mask_are_added_everywhere():
    """A float tensor of ordinary values (a bias without a head axis), one at
    the threshold itself, and a nan inside a tile of fills: nothing is skipped
    that eager would count."""
    q, k, v = qkv(B=2, Lq=24, Lk=LK, seed=7)
    spec = additive_spec()
    bias = randn(2, 1, 24, LK, seed=8) * 3
    check_forward(q, k, v, [bias], spec, config=TILE_16, name="bias")
    check_backward(q, k, v, [bias], spec, config=TILE_16, name="bias")
    # a row whose best key sits at the threshold: its other keys are fills far below
    edge = torch.full((2, 1, 24, LK), F32_MIN, device=DEVICE)
    edge[..., 3] = MASK_FILL_THRESHOLD
    edge[..., 200] = 0.0
    edge[1, ..., 200] = F32_MIN
    check_forward(q, k, v, [edge], spec, config=TILE_16, name="threshold")
    # a nan in a tile of fills makes its row nan, as eager's
    nan = static_cache_mask(2, 24, LK, 0, pad=(0, 0))
    nan[0, 0, 7, 250] = float("nan")
    out = kernels.forward(q, k, v, [nan], spec, config=TILE_16)[0]
    eager = references_forward(q, k, v, [nan], spec)[0]
    assert out[0, :, 7].isnan().all() and eager[0, :, 7].isnan().all()
    assert not out[0, :, 6].isnan().any() and not out[1].isnan().any()


# ---- decode: the splits share out the kept keys ([Note: decode's key extent]) --------

DECODE_TILE = KernelConfig(16, 32, 4, 1)


@pytest.fixture
def small_extent_tiles(monkeypatch):
    """Extent tiles of 128 mask values: several key blocks for the split kernel to reduce."""
    monkeypatch.setattr(kernels, "DECODE_EXTENT_TILE", 128)
    kernels._plans.clear()
    yield
    kernels._plans.clear()


def _decode(q, k, v, caps, spec, splits, name):
    return check_forward(q, k, v, caps, spec, config=DECODE_TILE, name=name,
                         launch=functools.partial(kernels.decode, splits=splits))


def _extent(spec, caps, Lq, Lk):
    """[lo, hi) per batch as the split kernel reads them (all keys where a row keeps none)."""
    mod = codegen.load("decode", spec)
    B = caps[0].shape[0]
    p = kernels._decode_plan(*qkv(B=B, Hq=4, Hkv=2, Lq=Lq, Lk=Lk), caps, spec, DECODE_TILE, None)
    e = p.extent_kw
    ext = torch.empty(e["shape"], dtype=torch.int32, device=DEVICE)
    mod.attention_decode_extent[e["grid"]](ext, e["shape"][2], *kernels.captured_args(caps), Lq, Lk, **e["kw"])
    ext = ext.cpu()
    assert e["grid"][0] > 1 and p.ext_args == tuple(e["shape"][1:])     # several key blocks to reduce
    lo, hi, kept = ext[..., 0].amin(1), ext[..., 1].amax(1), ext[..., 2:2 + Lq].sum(1)
    return [[0, Lk] if (kept[b] == 0).any() else [lo[b].item(), hi[b].item()] for b in range(B)]


@pytest.mark.parametrize("splits", [None, 1, 5], ids=["auto", "1", "5"])
@pytest.mark.parametrize("lq", [1, 3])
def test_decode_reads_only_the_filled_cache(lq, splits, small_extent_tiles):
    """Decode steps against a static cache: keys [pad, filled) kept, the rest
    fills; the splits divide the kept range (some left empty) and the result
    stays golden-relative, GQA and a KV batch of one included."""
    B, Lk = 3, LK
    filled = (40, 130, LK)
    mask = torch.full((B, 1, lq, Lk), F32_MIN, device=DEVICE)
    for b, f in enumerate(filled):
        for i in range(lq):
            mask[b, 0, i, 7 * b: f - lq + 1 + i] = 0.0
    spec = make_spec(score + T0, captured=[captured_spec("B.QK")], group=2)
    assert _extent(spec, [mask], lq, Lk) == [[0, filled[0]], [7, filled[1]], [14, filled[2]]]
    q, k, v = qkv(B=B, Hq=4, Hkv=2, Lq=lq, Lk=Lk, Dh=24, seed=lq)
    _decode(q, k, v, [mask], spec, splits, name="static cache decode")
    q, k, v = qkv(B=B, Hq=4, Hkv=2, Lq=lq, Lk=Lk, Bkv=1, Dh=24, seed=lq + 10)
    _decode(q, k, v, [mask], spec, splits, name="static cache decode, one KV batch")


def test_decode_extent_with_rows_that_keep_nothing_is_all_keys(small_extent_tiles):
    """A batch whose row keeps no key: its extent is every key (uniform with a
    finite fill, as eager).  A boolean mask (made in the graph: no unfilled
    cache slots) walks its splits over every key, as before."""
    B, Lk = 2, LK
    mask = torch.full((B, 1, 1, Lk), F32_MIN, device=DEVICE)
    mask[0, ..., 100:200] = 0.0
    spec = make_spec(score + T0, captured=[captured_spec("B.QK")], group=2)
    assert _extent(spec, [mask], 1, Lk) == [[100, 200], [0, Lk]]
    q, k, v = qkv(B=B, Hq=4, Hkv=2, Lq=1, Lk=Lk, seed=4)
    out = _decode(q, k, v, [mask], spec, 4, name="uniform batch")[0]
    torch.testing.assert_close(out[1], v[1].mean(1, keepdim=True).repeat_interleave(2, dim=0),
                               rtol=1e-5, atol=1e-6)
    keep = torch.zeros(B, 1, 1, Lk, dtype=torch.bool, device=DEVICE)
    keep[0, ..., 30:90] = True
    keep[1, ..., 250:] = True
    pad = make_spec(masked(sympy.Ne(T0, 0)), captured=[captured_spec("B..K", "bool")], group=2)
    assert kernels._decode_plan(q, k, v, [keep], pad, DECODE_TILE, None).extent_kw is None
    _decode(q, k, v, [keep], pad, None, name="bool padding")


# ---- a model: Hugging Face generation with a static cache --------------------------------

def _generate(monkeypatch, new_tokens: int):
    """Tiny LLaMA (eager attention, GQA) generating greedily with a static
    cache, eagerly and with its forward compiled by the backend on the
    kernels: (eager, ours, report rows, tiles of fills the first block map
    dropped)."""
    transformers = pytest.importorskip("transformers")
    import attn_compiler
    from attn_compiler import dispatch

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
    cfg._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(cfg).eval().to(DEVICE)
    ids = torch.randint(0, 128, (2, kernels.ADDITIVE_MAP_MIN_KEYS)).to(DEVICE)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :5] = 0
    kw = dict(max_new_tokens=new_tokens, do_sample=False, attention_mask=attention_mask,
              cache_implementation="static", output_logits=True, return_dict_in_generate=True)
    eager = model.generate(ids, **kw)

    skipped = []
    block_map = kernels.block_map

    def spy(*args, **kwargs):
        out = block_map(*args, **kwargs)
        skipped.append(int(((out[0] & 3) == 0).sum()))
        return out

    monkeypatch.setattr(kernels, "block_map", spy)
    # no timing: on a GPU the never-slower choice keeps sites this tiny as written
    monkeypatch.setenv("ATTN_COMPILER_AUTOTUNE", "0")
    monkeypatch.setattr(dispatch, "_picked", {})
    attn_compiler.reset()
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend=attn_compiler.backend())
    with dispatch.implementation("triton"):
        ours = model.generate(ids, **kw)
    return eager, ours, list(attn_compiler.report()), skipped


def _same_generation(eager, ours, rows, skipped):
    assert rows and all(r.status == "fused" for r in rows), [(r.status, r.reason) for r in rows]
    assert all(r.features["mask"] == "additive t0" for r in rows), [r.features["mask"] for r in rows]
    assert skipped and skipped[0] > 0, skipped          # the prefill's map dropped tiles of fills
    assert torch.equal(ours.sequences, eager.sequences)
    for a, b in zip(ours.logits, eager.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_static_cache_generation_through_the_kernels(monkeypatch):
    """LLaMA (eager attention, GQA) generating with ``cache_implementation=
    "static"``: the model receives its causal + left padding + unfilled-slot
    mask as a precomputed additive input.  Compiled with the backend, every
    site on the generated kernels: the prefill's block map skips the tiles of
    fills, and the tokens and logits are eager's."""
    _same_generation(*_generate(monkeypatch, 3))
