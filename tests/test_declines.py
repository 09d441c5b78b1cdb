"""Sites the backend must leave alone: declined with a reason that names the
cause (or, for a softmax that is not attention, not reported at all), and the
compiled model computes exactly what eager computes.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attn_compiler
from attn_compiler.passes.pipeline import counters
from attn_compiler.testing import golden_check

B, H, L, D = 2, 4, 13, 16


def _scores(q, k):
    return q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])


# ---- attention-shaped, but not expressible: declined ------------------------------------

def softmax_over_queries(q, k, v):
    """Softmax over dim=-2 (the query axis), then P·V."""
    return torch.softmax(_scores(q, k), dim=-2) @ v


def softmax_over_heads(q, k, v):
    """Softmax over dim=1 (the head axis), then P·V."""
    return F.softmax(_scores(q, k), dim=1) @ v


def transformer_xl_probabilities_returned(q, k, v):
    """Transformer-XL's [query, key, batch, head] scores (softmax over dim 1,
    inputs read as (L, B, H, D)) with the probabilities returned too
    (``output_attentions``)."""
    s = torch.einsum("ibnd,jbnd->ijbn", q, k) * q.shape[-1] ** -0.5
    p = F.softmax(s, dim=1)
    return torch.einsum("ijbn,jbnd->ibnd", p, v), p


def transformer_xl_scores_centred(q, k, v):
    """[query, key, batch, head] scores centred over the queries before the
    softmax over dim 1: a reduction between Q·Kᵀ and the softmax (no
    elementwise chain to relay out with the keys last)."""
    s = torch.einsum("ibnd,jbnd->ijbn", q, k)
    s = s - s.mean(dim=0, keepdim=True)
    return torch.einsum("ijbn,jbnd->ibnd", F.softmax(s, dim=1), v)


def probs_returned(q, k, v):
    """HF ``output_attentions=True``: the probabilities are returned too."""
    p = torch.softmax(_scores(q, k), dim=-1)
    return p @ v, p


def probs_head_averaged(q, k, v):
    """fairseq ``need_weights``: head-averaged probabilities returned beside the output."""
    p = torch.softmax(_scores(q, k), dim=-1)
    return p @ v, p.mean(dim=1)


def probs_summed_into_output(q, k, v):
    """The probabilities feed a second computation (an entropy-like regulariser)."""
    p = torch.softmax(_scores(q, k), dim=-1)
    return p @ v + p.sum(dim=-1, keepdim=True)


class ProbsStored(nn.Module):
    """The probabilities are stored on the module for later inspection."""

    def forward(self, q, k, v):
        p = torch.softmax(_scores(q, k), dim=-1)
        self.last_probs = p
        return p @ v


def topk_threshold_mask(q, k, v):
    """Top-k sparse attention: the mask depends on a reduction of the scores."""
    s = _scores(q, k)
    thr = s.topk(4, dim=-1).values[..., -1:]
    s = s.masked_fill(s < thr, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def score_sorted_rank(q, k, v):
    """A score modification that reads other scores of the row (argsort rank)."""
    s = _scores(q, k)
    rank = s.argsort(dim=-1).argsort(dim=-1).to(s.dtype)
    return torch.softmax(s - 0.1 * rank, dim=-1) @ v


def probs_viewed_then_written(q, k, v):
    """A view of the probabilities taken before an in-place write to them
    sees the write: the write is not rewritten out of place.  (Without
    gradients: the softmax's backward needs its output unwritten.)"""
    with torch.no_grad():
        p = torch.softmax(_scores(q, k), dim=-1)
        pt = p.transpose(-1, -2)
        p.masked_fill_(torch.arange(p.shape[-1]) > 8, 0.0)
        return pt.transpose(-1, -2) @ v


class _XSoftmax(torch.autograd.Function):
    """DeBERTa's / SEW-D's XSoftmax: a masked softmax with its own backward."""

    @staticmethod
    def forward(ctx, x, mask, dim):
        ctx.dim = dim
        rmask = ~(mask.to(torch.bool))
        out = torch.softmax(x.masked_fill(rmask, torch.finfo(x.dtype).min), dim)
        out.masked_fill_(rmask, 0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return torch._softmax_backward_data(grad, out, ctx.dim, out.dtype), None, None


def probs_from_custom_autograd_function(q, k, v):
    """The probabilities come from a custom autograd.Function (XSoftmax under
    autograd: dynamo records it as one higher-order op)."""
    keep = (torch.arange(k.shape[-2]) < 9)[None, None, None, :].long()
    return _XSoftmax.apply(_scores(q, k), keep, -1) @ v


def probs_scaled_by_score_rowmax(q, k, v):
    """A per-row factor of the probabilities computed from the scores: moving
    it onto the output would keep the scores alive."""
    s = _scores(q, k)
    p = torch.softmax(s, dim=-1) * s.amax(dim=-1, keepdim=True)
    return p @ v


def deepvit_reattention(q, k, v):
    """DeepViT's re-attention: heads mixed by a learned matrix and normalised
    over heads between the softmax and P·V."""
    attn = torch.softmax(_scores(q, k), dim=-1)
    mix = torch.linspace(-1.0, 1.0, q.shape[1] ** 2, dtype=q.dtype).reshape(q.shape[1], q.shape[1])
    attn = torch.einsum("bhij,hg->bgij", attn, mix)
    attn = F.layer_norm(attn.permute(0, 2, 3, 1), (attn.shape[1],)).permute(0, 3, 1, 2)
    return torch.einsum("bhij,bhjd->bhid", attn, v)


def local_global_blocks_concatenated(q, k, v):
    """PEGASUS-X's local blocks: scores against global keys and against the
    block's own keys concatenated (behind an added mask), one softmax, the
    probabilities split again for two products."""
    g = k[:, :, :3]
    s = torch.cat([q @ g.transpose(-1, -2), _scores(q, k)], dim=-1)
    s = s + torch.zeros(s.shape[-1], dtype=s.dtype)
    p = torch.softmax(s, dim=-1)
    return p[..., :3] @ v[:, :, :3] + p[..., 3:] @ v


def probs_zeroed_by_another_mask(q, k, v):
    """The probabilities zeroed under a mask that is not the scores' own (the
    scores keep the padded keys that the zeroing drops): not a softmax of
    the kept scores, so not the op."""
    s = _scores(q, k)
    pad = torch.zeros(s.shape[-1], dtype=torch.bool)
    pad[5:] = True
    s = s.masked_fill(torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1).masked_fill(pad, 0.0) @ v


def rows_zeroed_beside_an_inf_mask(q, k, v):
    """Query rows zeroed (one boolean per row) where a -inf mask may leave a
    row without a key: eager's gradient of such a row is 0 (the zeroing
    stops the softmax's nan), the op's would be nan, so the site is left."""
    s = _scores(q, k)
    keep = torch.ones(s.shape[-1], dtype=torch.bool)
    keep[:2] = False
    s = s.masked_fill(~keep, float("-inf"))
    rows = torch.arange(s.shape[-2])[:, None] % 3 == 0
    return torch.softmax(s, -1).masked_fill(rows, 0.0) @ v


def scores_written_into_a_band(q, k, v):
    """Longformer-style sliding chunks in small: each query's scores against
    its neighbours written into a (B, H, L, 3) band by slice assignment, a
    softmax over the band, the band's products summed back (no score matrix
    the matcher can read): reported as declined, not passed unseen."""
    s = _scores(q, k)
    band = s.new_zeros(*s.shape[:-1], 3)
    band[..., 1] = s.diagonal(dim1=-2, dim2=-1)
    band[..., 1:, 0] = s.diagonal(offset=-1, dim1=-2, dim2=-1)
    band[..., :-1, 2] = s.diagonal(offset=1, dim1=-2, dim2=-1)
    p = band.softmax(-1)
    vp = F.pad(v, (0, 0, 1, 1))
    near = torch.stack([vp[..., :-2, :], vp[..., 1:-1, :], vp[..., 2:, :]], dim=-2)
    return torch.einsum("bhlk,bhlkd->bhld", p, near)


def probs_where_zeros_like_other_mask(q, k, v):
    """``where(m, P, zeros_like(P))`` with a 2-D m that is not the scores'
    mask: the zeros read only P's shape, but the zeroing is not the op's."""
    s = _scores(q, k)
    m = (torch.arange(s.shape[-2])[:, None] + 2 * torch.arange(s.shape[-1])[None, :]) % 3 != 0
    p = torch.softmax(s, -1)
    return torch.where(m, p, torch.zeros_like(p)) @ v


def probs_filled_with_a_tensor_half(q, k, v):
    """The masked probabilities set to a 0-d tensor 0.5, not 0: not a
    softmax of the kept scores."""
    s = _scores(q, k)
    drop = torch.zeros(s.shape[-1], dtype=torch.bool)
    drop[5:] = True
    s = s.masked_fill(drop, float("-inf"))
    return torch.softmax(s, -1).masked_fill(drop, torch.scalar_tensor(0.5, dtype=s.dtype)) @ v


def two_sink_columns(q, k, v):
    """Two extra logit columns concatenated to the scores, both dropped after
    the softmax (a form the sink rewrite does not take: one column only)."""
    extra = torch.linspace(-1.0, 1.0, 2 * q.shape[1]).reshape(1, -1, 1, 2)
    w = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
    c = torch.cat([w, extra.expand(q.shape[0], -1, q.shape[-2], -1)], dim=-1)
    p = F.softmax(c, dim=-1)[..., :-2]
    return torch.matmul(p, v)




def part_assigned_from_another_part(q, k, v):
    """A part of the scores assigned a value computed from another part of
    them (the scores of the row before): not the same positions."""
    s = _scores(q, k)
    s[:, :, 1:, 1:] = s[:, :, :-1, 1:] * 0.5
    return s.softmax(-1) @ v


def part_plus_another_part(q, k, v):
    """A part of the scores plus a shifted part of them, assigned back."""
    s = _scores(q, k)
    s[:, :, 1:, :] = s[:, :, 1:, :] + s[:, :, :-1, :]
    return s.softmax(-1) @ v


def softmax_of_a_slice(q, k, v):
    """The softmax of a slice of the scores (all but the first query and
    key) times the values without the first."""
    s = _scores(q, k)
    return s[:, :, 1:, 1:].softmax(-1) @ v[:, :, 1:]


def first_row_added_to_every_row(q, k, v):
    """The scores plus their first row (``s[..., :1, :]``, broadcast over
    the queries): a slice from position 0 is still a part of them."""
    s = _scores(q, k)
    s = s + s[..., :1, :]
    return s.softmax(-1) @ v


def gated_by_the_first_key(q, k, v):
    """The scores times a gate of their first column (``s[..., :1]``)."""
    s = _scores(q, k)
    s = s * s[..., :1].sigmoid()
    return s.softmax(-1) @ v


def part_assigned_along_the_heads(q, k, v):
    """Heads from the second on assigned their scores plus a bias: a slice
    along the heads, not the query and key axes."""
    s = _scores(q, k)
    s[:, 1:] = s[:, 1:] + torch.cos(q[:, 1:, :, :1])
    return s.softmax(-1) @ v


def scores_assigned_in_part(q, k, v):
    """A slice of the scores overwritten by other values (``s[..., :3] =
    t[..., :3]``; a number there is a mask, and fused)."""
    s = _scores(q, k)
    s[..., :3] = torch.cos(q[..., :3])
    return s.softmax(-1) @ v


def exp2_softmax_over_queries(q, k, v):
    """A base-2 softmax normalized over the queries (dim -2): no site over
    the keys (it was fused as one, a wrong answer)."""
    s = (q @ k.transpose(-1, -2)) * 0.25
    e = torch.exp2(s - s.amax(-2, keepdim=True))
    return (e / e.sum(-2, keepdim=True)) @ v


def exp2_softmax_column_max_shift(q, k, v):
    """A base-2 softmax over the keys shifted by each key's max over the
    queries: the shift does not cancel (it was dropped as a row max)."""
    s = (q @ k.transpose(-1, -2)) * 0.25
    e = torch.exp2(s - s.amax(-2, keepdim=True))
    return (e / e.sum(-1, keepdim=True)) @ v


DECLINED = [
    (exp2_softmax_over_queries, ["dim"]),
    (exp2_softmax_column_max_shift, ["amax"]),
    (transformer_xl_probabilities_returned, ("probabilities are also used", "softmax dim 1")),
    (transformer_xl_scores_centred, ("key axis", "not the scores' last", "not all elementwise")),
    (part_assigned_from_another_part, ["another part"]),
    (part_plus_another_part, ["another part"]),
    (softmax_of_a_slice, []),
    (part_assigned_along_the_heads, ["other than the query and key"]),
    (first_row_added_to_every_row, ["broadcast"]),
    (gated_by_the_first_key, ["broadcast"]),
    (scores_assigned_in_part, ["assigned in part"]),
    (softmax_over_queries, ["dim"]),
    (softmax_over_heads, ["dim"]),
    (probs_returned, ["probabilit"]),
    (probs_head_averaged, ["probabilit"]),
    (probs_summed_into_output, ["probabilit"]),
    (ProbsStored, ["probabilit"]),
    (topk_threshold_mask, []),
    (score_sorted_rank, []),
    (probs_viewed_then_written, ["probabilities reach the product"]),
    (probs_from_custom_autograd_function, ["custom autograd.function", "backward"]),
    (probs_scaled_by_score_rowmax, ["scores"]),
    (local_global_blocks_concatenated, ["concatenated"]),
    (deepvit_reattention, ["einsum", "cannot be expressed"]),
    (probs_zeroed_by_another_mask, ["zeroed", "other than the scores' own"]),
    (rows_zeroed_beside_an_inf_mask, ["rows of the probabilities", "-inf"]),
    (scores_written_into_a_band, ["cannot follow", "slice assignments"]),
    (probs_where_zeros_like_other_mask, ["'where'", "cannot be expressed"]),
    (probs_filled_with_a_tensor_half, ["not only zeroed"]),
    (two_sink_columns, ["concatenated"]),
]


def _inputs(dtype=torch.float32):
    torch.manual_seed(0)
    return [torch.randn(B, H, L, D, dtype=dtype, requires_grad=True) for _ in range(3)]


def _flat(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _same_as_eager(fn, args, exact=True):
    """Compile, run, and compare every output (and the q/k/v gradients) to eager."""
    torch._dynamo.reset()
    attn_compiler.reset()
    compiled = torch.compile(fn, backend=attn_compiler.backend(inner="aot_eager"))
    ours, eager = _flat(compiled(*args)), _flat(fn(*args))
    args64 = [a.detach().double().requires_grad_() for a in args]
    golden = _flat(fn(*args64))
    for i, (a, b, c) in enumerate(zip(ours, eager, golden)):
        golden_check(a, b, c, name=f"output {i}")
        if exact:
            torch.testing.assert_close(a, b)
    cots = [torch.randn_like(g) for g in golden]
    wrt = [o for o in ours if o.requires_grad]
    if wrt:
        g_ours = torch.autograd.grad([o for o in ours if o.requires_grad], args,
                                     [c.float() for o, c in zip(ours, cots) if o.requires_grad],
                                     allow_unused=True)
        g_eager = torch.autograd.grad([o for o in eager if o.requires_grad], args,
                                      [c.float() for o, c in zip(eager, cots) if o.requires_grad],
                                      allow_unused=True)
        for a, b in zip(g_ours, g_eager):
            if exact and (a is not None or b is not None):
                torch.testing.assert_close(a, b)
    return list(attn_compiler.report())


@pytest.mark.parametrize("form,words", DECLINED, ids=[f.__name__ for f, _ in DECLINED])
def test_declined(form, words):
    fn = form() if isinstance(form, type) else form
    before = counters["declined"]
    rows = _same_as_eager(fn, _inputs())
    assert rows, "the site was not reported at all"
    assert all(r.status == "declined" for r in rows), [(r.status, r.reason) for r in rows]
    assert counters["declined"] - before == len(rows)
    for r in rows:
        assert r.reason and not r.reason.startswith("internal error"), r.reason
        low = r.reason.lower()
        assert all(w in low for w in words), f"reason {r.reason!r} does not mention {words}"


# ---- softmax that is not attention: not a site ---------------------------------------

def classifier_softmax(x, w, _unused):
    """Softmax over a linear layer's logits (a classifier head)."""
    return torch.softmax(x @ w, dim=-1)


def attention_map_only(q, k, v):
    """The scores' softmax returned with no P·V product (attention-map probe)."""
    return torch.softmax(_scores(q, k), dim=-1) * 2.0


def router_softmax_topk(x, w, _unused):
    """MoE router: softmax over x @ W_gate, then top-k — no P·V."""
    p = torch.softmax(x @ w, dim=-1)
    return p.topk(2, dim=-1).values


def probs_transposed_before_pv(q, k, v):
    """Pᵀ·V: the contraction runs over the query axis — not attention."""
    p = torch.softmax(_scores(q, k), dim=-1)
    return p.transpose(-1, -2) @ v


class SynthesizerRandom(nn.Module):
    """Synthesizer's random attention: the softmax of a learned (H, N, N)
    map, times V: no Q·Kᵀ, not a site (it was reported as attention whose
    scores came from an earlier graph)."""

    def __init__(self):
        super().__init__()
        self.attn = nn.Parameter(torch.randn(H, L, L))

    def forward(self, q, k, v):
        return torch.softmax(self.attn, dim=-1).to(v.dtype) @ v


NOT_SITES = [classifier_softmax, attention_map_only, router_softmax_topk, SynthesizerRandom]


@pytest.mark.parametrize("form", NOT_SITES, ids=[f.__name__ for f in NOT_SITES])
def test_not_a_site(form):
    torch.manual_seed(0)
    if form in (classifier_softmax, router_softmax_topk):
        args = [torch.randn(B, L, 32, requires_grad=True), torch.randn(32, 8, requires_grad=True),
                torch.randn(1, requires_grad=True)]
    else:
        args = _inputs()
    rows = _same_as_eager(form() if isinstance(form, type) else form, args)
    assert rows == [], [(r.status, r.reason) for r in rows]


def test_probs_transposed_before_pv_not_fused():
    rows = _same_as_eager(probs_transposed_before_pv, _inputs())
    assert not [r for r in rows if r.status == "fused"], [(r.status, r.reason) for r in rows]


def test_probs_reshaped_across_query_and_key_axes_declined():
    """(B, H, Lq, Lk) probabilities reshaped to (B*H, Lk, Lq) for a bmm (legal,
    and not attention): declined with a reason, not left to the rewrite's
    shape check; the same bmm of P reshaped to (B*H, Lq, Lk) is fused."""
    def scrambled(q, k, v):
        p = torch.softmax(_scores(q, k), dim=-1)                       # (B, H, Lq, Lk)
        return torch.bmm(p.reshape(B * H, k.shape[2], q.shape[2]), v.reshape(B * H, q.shape[2], D))

    def flattened(q, k, v):
        p = torch.softmax(_scores(q, k), dim=-1)
        return torch.bmm(p.reshape(B * H, q.shape[2], k.shape[2]), v.reshape(B * H, k.shape[2], D))

    torch.manual_seed(0)
    q = torch.randn(B, H, L, D, requires_grad=True)
    k = torch.randn(B, H, L + 3, D, requires_grad=True)
    rows = _same_as_eager(scrambled, [q, k, torch.randn(B, H, L, D, requires_grad=True)])
    assert [r.status for r in rows] == ["declined"], [(r.status, r.reason) for r in rows]
    assert "reshaped across their query and key axes" in rows[0].reason
    rows = _same_as_eager(flattened, [q, k, torch.randn(B, H, L + 3, D, requires_grad=True)])
    assert [r.status for r in rows] == ["fused"], [(r.status, r.reason) for r in rows]


def test_only_the_good_site_of_two_is_fused():
    """A declined site does not stop a later good site in the same graph."""
    def two(q, k, v):
        out, p = probs_returned(q, k, v)
        return torch.softmax(_scores(out, k), dim=-1) @ v, p

    rows = _same_as_eager(two, _inputs(), exact=False)
    assert sorted(r.status for r in rows) == ["declined", "fused"], [(r.status, r.reason) for r in rows]


# ---- a shift that is not a row constant is not a no-op ------------------------------------

def shift_by_column_max(q, k, v):
    """``s - s.amax(dim=-2, keepdim=True)``: the max over the query axis varies
    along the key axis, so it changes the softmax over the keys."""
    s = _scores(q, k)
    s = s - s.amax(dim=-2, keepdim=True)
    return torch.softmax(s, dim=-1) @ v


def shift_by_column_max_detached(q, k, v):
    """The lucidrains spelling with the wrong axis: ``.amax(dim=-2).detach()``."""
    s = _scores(q, k)
    s = s - s.amax(dim=-2, keepdim=True).detach()
    return torch.softmax(s, dim=-1) @ v


def shift_by_head_max(q, k, v):
    """``s - s.amax(dim=1, keepdim=True)``: a max over the heads, per (query, key)."""
    s = _scores(q, k)
    s = s - s.amax(dim=1, keepdim=True)
    return torch.softmax(s, dim=-1) @ v


def shift_by_other_tensors_column_max(q, k, v):
    """A shift by the column max of a different tensor (scores of v against k)."""
    s = _scores(q, k)
    t = _scores(v, k)
    s = s - t.amax(dim=-2, keepdim=True)
    return torch.softmax(s, dim=-1) @ v


NOT_ROW_CONSTANT = [shift_by_column_max, shift_by_column_max_detached, shift_by_head_max,
                    shift_by_other_tensors_column_max]


@pytest.mark.parametrize("form", NOT_ROW_CONSTANT, ids=[f.__name__ for f in NOT_ROW_CONSTANT])
def test_shift_that_is_not_row_constant_is_not_dropped(form):
    """Either declined (then exactly eager) or fused with the shift kept: never
    fused as if the shift were a softmax-invariant no-op."""
    args = _inputs()
    # the shift really matters here: dropping it changes the result
    with torch.no_grad():
        s = _scores(args[0], args[1])
        assert not torch.allclose(form(*args), torch.softmax(s, -1) @ args[2], atol=1e-4)
    torch._dynamo.reset()
    attn_compiler.reset()
    rows = _same_as_eager(form, args, exact=False)   # golden-relative outputs (both ways)
    for r in rows:
        assert r.status in ("fused", "declined"), r.status
        if r.status == "declined":
            assert r.reason and not r.reason.startswith("internal error"), r.reason
    # gradients golden-relative as well (a fused site must keep the shift's gradient)
    args64 = [a.detach().double().requires_grad_() for a in args]
    torch._dynamo.reset()
    compiled = torch.compile(form, backend=attn_compiler.backend(inner="aot_eager"))
    cot = torch.randn(B, H, L, D, dtype=torch.float64)
    g_ours = torch.autograd.grad(compiled(*args), args, cot.float())
    g_eager = torch.autograd.grad(form(*args), args, cot.float())
    g_gold = torch.autograd.grad(form(*args64), args64, cot)
    for name, a, b, c in zip("qkv", g_ours, g_eager, g_gold):
        golden_check(a, b, c, name=f"d{name}")
