"""Scores in another layout ([Note: scores in another layout], passes/relayout.py):
Transformer-XL's [query, key, batch, head] scores with the softmax over dim 1,
``k @ qᵀ`` with the softmax over dim -2, heads between the queries and the
keys.  Each is fused as one op that reads q, k and v in their own layouts;
on the generated kernels (Triton's interpreter on CPU, the GPU with
``pytest -m gpu``) forward and backward golden-relative to eager; a site the
pass relaid out and then declined runs as the user wrote it.

Also here: masks on the scores' values (``s.masked_fill(s < t, -inf)``), which
these layouts brought up: no position is masked as such, the score
modification computes the fill, and a row that keeps no key is what eager
gives (nan forward; no gradient into q and k).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import attn_compiler
from attn_compiler import dispatch, layout
from attn_compiler.passes.analyze.spec import AttentionSpec
from attn_compiler.testing import golden_check
from kernel_checks import DEVICE
from test_forms import RESEARCH_BY_ID, _graph_capture, _grads, _names, _to64, assert_fused

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::RuntimeWarning")   # numpy inside Triton's interpreter

F32, BF16 = torch.float32, torch.bfloat16


@pytest.fixture(autouse=True)
def _untimed(monkeypatch):
    """On a GPU, the op itself (no never-slower timing against the original)."""
    monkeypatch.setenv("ATTN_COMPILER_AUTOTUNE", "0")


def _to(a, dtype=None):
    if not isinstance(a, torch.Tensor):
        return a
    b = a.detach().to(DEVICE, dtype if dtype is not None and a.is_floating_point() else None)
    return b.requires_grad_(a.requires_grad)


def _check_on_kernels(case_id, dtype=F32, backward=True):
    """The case compiled with the op forced onto the generated kernels on
    DEVICE, against eager there and a float64 golden on the CPU."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    attn_compiler.reset()
    fn, args = RESEARCH_BY_ID[case_id].build(F32)
    fn64 = copy.deepcopy(fn).double() if isinstance(fn, torch.nn.Module) else fn
    args64 = [_to64(a) for a in args]
    if isinstance(fn, torch.nn.Module):
        fn = fn.to(DEVICE, dtype)
    args = [_to(a, dtype) for a in args]
    with dispatch.implementation("triton"):
        compiled = torch.compile(fn, backend=attn_compiler.backend(inner="aot_eager"))
        ours = compiled(*args)
        assert_fused(attn_compiler.report(), 1)
        eager = fn(*args)
        golden = fn64(*args64)
        golden_check(ours.cpu(), eager.cpu(), golden, name=f"{case_id} out")
        if not backward:
            return
        cot = torch.randn(golden.shape, dtype=torch.float64)
        g_ours = _grads(ours, fn, args, cot.to(DEVICE, dtype))
        g_eager = _grads(eager, fn, args, cot.to(DEVICE, dtype))
        g_gold = _grads(golden, fn64, args64, cot)
        for name, a, b, c in zip(_names(fn, args), g_ours, g_eager, g_gold):
            golden_check(a.cpu(), b.cpu(), c, name=f"{case_id} {name}")


@pytest.mark.parametrize("case_id", ["transformer_xl_rel_attention", "xlnet_rel_attn_core",
                                     "scores_query_key_batch_head",
                                     "scores_heads_between", "scores_keys_second_last",
                                     "scores_keys_second_last_permuted",
                                     "scores_keys_second_last_vT", "score_threshold_mask",
                                     "score_piecewise_mod"])
def test_on_the_kernels_forward_backward(case_id):
    _check_on_kernels(case_id)


@pytest.mark.parametrize("case_id", ["transformer_xl_rel_attention", "scores_keys_second_last_vT"])
def test_on_the_kernels_bfloat16(case_id):
    _check_on_kernels(case_id, BF16, backward=False)


def _fused_op(graphs):
    ops = [n for gm in graphs for n in gm.graph.nodes if "fused_attention" in str(n.target)]
    assert len(ops) == 1, [n.format_node() for gm in graphs for n in gm.graph.nodes]
    return ops[0]


def test_transformer_xl_reads_q_k_v_in_their_layout():
    """The op takes the (L, B, H, D) tensors as they are (no copy, no
    permute: the kernels read them by their strides); its spec is the
    content and shifted position terms' sum, scaled, under the causal mask
    with memory (Lq 7, Lk 13: bottom-right aligned), the position term with
    its gradient."""
    graphs, inner = _graph_capture()
    fn, args = RESEARCH_BY_ID["transformer_xl_rel_attention"].build(F32)
    args = args[:4]                 # the mask built in the graph, as the model does
    out = torch.compile(fn, backend=attn_compiler.backend(inner=inner))(*args)
    torch.testing.assert_close(out, fn(*args))
    (row,) = assert_fused(attn_compiler.report(), 1)
    op = _fused_op(graphs)
    q, k, v = (n.args[0] if "to_op_layout" in str(n.target) else n for n in op.args[:3])
    assert all("to_op_layout" in str(n.target) and n.args[1:3] == ("jbnd", "bnjd") for n in op.args[1:3])
    assert k.op == "placeholder" and v.op == "placeholder", (k.format_node(), v.format_node())
    assert "add" in str(q.target) and q.args[0].op == "placeholder", q.format_node()   # q + r_w_bias
    x = args[1]
    assert layout.to_op_layout(x, "jbnd", "bnjd").data_ptr() == x.data_ptr()       # a view
    assert row.features["mask"] == "causal(offset=6)", row.features
    spec = AttentionSpec.loads(row.features["spec"])
    assert [c.requires_grad for c in spec.captured] == [True], spec.captured


def _scores_cast_to_int(q, k, v):
    """[query, key, batch, head] scores rounded to integers: relaid out, then
    declined by the analysis."""
    s = torch.einsum("ibnd,jbnd->ijbn", q, k).to(torch.int32).float()
    return torch.einsum("ijbn,jbnd->ibnd", torch.softmax(s, dim=1), v)


def test_relaid_site_declined_runs_as_written():
    """A site the pass relaid out but did not fuse gets the user's nodes
    back: the [query, key, batch, head] einsums and the softmax over dim 1."""
    graphs, inner = _graph_capture()
    args = [torch.randn(7, 2, 3, 8), torch.randn(9, 2, 3, 8), torch.randn(9, 2, 3, 8)]
    out = torch.compile(_scores_cast_to_int, backend=attn_compiler.backend(inner=inner))(*args)
    torch.testing.assert_close(out, _scores_cast_to_int(*args))
    rep = attn_compiler.report()
    assert not rep.fused and len(rep.declined) == 1 and "cast to torch.int32" in rep.declined[0].reason, \
        [(r.status, r.reason) for r in rep]
    eqs = [n.args[0] for gm in graphs for n in gm.graph.nodes if "einsum" in str(n.target)]
    assert eqs == ["ibnd,jbnd->ijbn", "ijbn,jbnd->ibnd"], eqs
    dims = [n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
            for gm in graphs for n in gm.graph.nodes if "softmax" in str(n.target)]
    assert dims == [1], dims


def _probabilities_returned(q, k, v):
    s = torch.einsum("ibnd,jbnd->ijbn", q, k)
    p = torch.softmax(s, dim=1)
    return torch.einsum("ijbn,jbnd->ibnd", p, v), p


def test_probabilities_returned_in_another_layout_declined():
    """Relaying out needs P read by P·V alone; returned as well, the site is
    declined (as in the usual layout) and runs as written."""
    args = [torch.randn(7, 2, 3, 8), torch.randn(9, 2, 3, 8), torch.randn(9, 2, 3, 8)]
    out = torch.compile(_probabilities_returned, backend=attn_compiler.backend())(*args)
    torch.testing.assert_close(out, _probabilities_returned(*args))
    rep = attn_compiler.report()
    assert not rep.fused and len(rep.declined) == 1, [(r.status, r.reason) for r in rep]


def _threshold_rows_without_keys(q, k, v):
    s = q @ k.transpose(-1, -2)
    return torch.softmax(s.masked_fill(s < 2.5, float("-inf")), dim=-1) @ v


@pytest.mark.parametrize("on_kernels", [False, True], ids=["reference", "kernels"])
def test_score_threshold_rows_without_keys_as_eager(on_kernels):
    """A threshold on the scores that leaves some rows no key: nan rows as
    eager gives them, and the gradients of q and k as eager's (0 from those
    rows: the fill passes no gradient), v's nan where eager's is."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, device=DEVICE, requires_grad=True) for _ in range(3))
    ctx = dispatch.implementation("triton") if on_kernels else dispatch.implementation("reference")
    with ctx:
        out = torch.compile(_threshold_rows_without_keys, backend=attn_compiler.backend(inner="aot_eager"))(q, k, v)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert_fused(attn_compiler.report(), 1)
    eager = _threshold_rows_without_keys(q, k, v)
    g_eager = torch.autograd.grad(eager.sum(), (q, k, v))
    assert eager.isnan().any() and not eager.isnan().all()
    torch.testing.assert_close(out, eager, equal_nan=True)
    for a, b in zip(grads, g_eager):
        assert torch.equal(a.isnan(), b.isnan())
        torch.testing.assert_close(a, b, equal_nan=True)


# ---- every layout × every modification -----------------------------------------------------

LAYOUTS = ["ijbh", "bhji", "bihj", "jbhi", "hbij"]       # b batch, h head, i query, j key
MODS = ["none", "causal_tril", "padding_bool", "additive", "bias_param", "softcap", "causal_bias_dropout0"]


class _Laid(torch.nn.Module):
    """Scores written directly in ``layout`` by einsum from (B, L, H, D)
    inputs; each term built in [b, h, i, j] and permuted to the layout as
    model code would have written it there; the softmax over the key axis."""

    def __init__(self, layout: str, mod: str, H: int, Lq: int, Lk: int):
        super().__init__()
        self.layout, self.mod = layout, mod
        self.bias = torch.nn.Parameter(0.3 * torch.randn(H, Lq, Lk)) if "bias" in mod else None

    def _to(self, t):               # a 4-D [b, h, i, j] tensor (size-1 axes broadcast) in the layout
        return t.permute(["bhij".index(c) for c in self.layout])

    def forward(self, q, k, v, keep):
        lay = self.layout
        s = torch.einsum(f"bihd,bjhd->{lay}", q, k) / math.sqrt(q.shape[-1])
        lq, lk = q.shape[1], k.shape[1]
        if "causal" in self.mod:
            tril = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
            s = s.masked_fill(~self._to(tril[None, None]), float("-inf"))
        if self.mod == "padding_bool":
            s = s.masked_fill(~self._to(keep[:, None, None, :]), torch.finfo(s.dtype).min)
        if self.mod == "additive":
            s = s + self._to(torch.where(keep, 0.0, -1e9).to(s.dtype)[:, None, None, :])
        if self.bias is not None:
            s = s + self._to(self.bias[None])
        if self.mod == "softcap":
            s = 5.0 * torch.tanh(s / 5.0)
        p = F.softmax(s.float(), dim=lay.index("j")).type_as(s)
        if "dropout0" in self.mod:
            p = F.dropout(p, 0.0, self.training)
        return torch.einsum(f"{lay},bjhd->bihd", p, v)


def _laid_inputs(dtype=F32, B=2, H=3, Lq=7, Lk=11, D=8):
    torch.manual_seed(1)
    q, k, v = (torch.randn(B, n, H, D, dtype=dtype, requires_grad=True) for n in (Lq, Lk, Lk))
    keep = torch.ones(B, Lk, dtype=torch.bool)
    keep[1, Lk - 4:] = False
    return [q, k, v, keep]


def _check_laid(layout, mod, on_kernels):
    torch._dynamo.reset()
    attn_compiler.reset()
    args = _laid_inputs()
    m = _Laid(layout, mod, 3, 7, 11)
    m64 = copy.deepcopy(m).double()
    args64 = [_to64(a) for a in args]
    m, args = m.to(DEVICE), [_to(a) for a in args]
    with dispatch.implementation("triton" if on_kernels else "reference"):
        ours = torch.compile(m, backend=attn_compiler.backend(inner="aot_eager"))(*args)
        assert_fused(attn_compiler.report(), 1)
        eager, golden = m(*args), m64(*args64)
        golden_check(ours.cpu(), eager.cpu(), golden, name=f"{layout} {mod} out")
        cot = torch.randn(golden.shape, dtype=torch.float64)
        for name, a, b, c in zip(_names(m, args), _grads(ours, m, args, cot.to(DEVICE, F32)),
                                 _grads(eager, m, args, cot.to(DEVICE, F32)), _grads(golden, m64, args64, cot)):
            golden_check(a.cpu(), b.cpu(), c, name=f"{layout} {mod} {name}")


@pytest.mark.parametrize("mod", MODS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_and_modification_reference(layout, mod):
    """Each layout with each modification fused and golden-relative to eager
    (forward, gradients of q, k, v and the learned bias), on the reference."""
    _check_laid(layout, mod, on_kernels=False)


@pytest.mark.parametrize("mod", ["causal_bias_dropout0", "padding_bool"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_and_modification_kernels(layout, mod):
    _check_laid(layout, mod, on_kernels=True)


def test_transformer_xl_dynamic_true_two_lengths():
    """dynamic=True: one graph for two lengths and batches (the scale, a float
    attribute, then arrives as a run-time scalar); fused, forward and
    backward golden-relative to eager."""
    from torch._dynamo.utils import counters as dynamo_counters

    torch._dynamo.reset()
    dynamo_counters.clear()
    torch.manual_seed(0)
    m = RESEARCH_BY_ID["transformer_xl_rel_attention"].build(F32)[0]
    m64 = copy.deepcopy(m).double()
    compiled = torch.compile(m, backend=attn_compiler.backend(inner="aot_eager"), dynamic=True)
    for n, b in ((9, 2), (13, 3)):
        args = [torch.randn(n, b, 4, 16, requires_grad=True) for _ in range(3)] + [torch.randn(n, 4, 16)]
        args64 = [_to64(a) for a in args]
        ours, eager, golden = compiled(*args), m(*args), m64(*args64)
        golden_check(ours, eager, golden, name=f"L={n} out")
        cot = torch.randn(golden.shape, dtype=torch.float64)
        for name, a, bb, c in zip(_names(m, args), _grads(ours, m, args, cot.float()),
                                  _grads(eager, m, args, cot.float()), _grads(golden, m64, args64, cot)):
            golden_check(a, bb, c, name=f"L={n} {name}")
    rows = list(attn_compiler.report())
    assert dynamo_counters["stats"]["unique_graphs"] == 1
    assert len(rows) == 1 and rows[0].fused, [(r.status, r.reason) for r in rows]


def _shared_values(q, k, v, bias):
    """P (b, s, h, t) against values (b, t, c) that every head shares (no
    head axis): both s and h are axes V lacks.  A bias added along (s, t)."""
    s = torch.einsum("bshc,btc->bsht", q, k) * q.shape[-1] ** -0.5 + bias[:, None, :]
    return torch.einsum("bsht,btc->bshc", s.softmax(-1), v)


@pytest.mark.parametrize("positions,heads", [(40, 4), (3, 8), (6, 6)])
def test_values_shared_by_the_heads_take_the_longest_query_axis(positions, heads):
    """[Note: V shared along several axes]  The longest of the axes V lacks
    is the op's query axis: 40 positions over 4 heads run as 4 heads of 40
    query rows against one key head (relaid out, the (s, t) bias a (query,
    key) plane); 3 positions over 8 heads, or as many of each, stay as laid
    out (the heads, the scores' own query axis, as the rows).  Forward and
    every gradient golden-relative to eager on the generated kernels."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    attn_compiler.reset()
    cpu = [torch.randn(2, positions, heads, 16), torch.randn(2, 37, 16), torch.randn(2, 37, 8),
           torch.randn(positions, 37)]
    args = [_to(a.requires_grad_()) for a in cpu]
    with dispatch.implementation("triton"):
        ours = torch.compile(_shared_values, backend=attn_compiler.backend(inner="aot_eager"))(*args)
        (row,) = assert_fused(attn_compiler.report(), 1)
        eager = _shared_values(*args)
    rows, other = (positions, heads) if positions > heads else (heads, positions)
    assert list(row.features["shapes"]["q"]) == [2, other, rows, 16], row.features["shapes"]
    assert list(row.features["shapes"]["k"]) == [2, 1, 37, 16], row.features["shapes"]
    spec = AttentionSpec.loads(row.features["spec"])
    bias_dims = (False, positions <= heads, positions > heads, True)     # (b, h, q_idx, kv_idx)
    assert spec.gqa_group == other and spec.captured[0].dims == bias_dims, spec
    args64 = [_to64(a) for a in cpu]
    golden = _shared_values(*args64)
    golden_check(ours.cpu(), eager.cpu(), golden, name="out")
    cot = torch.randn(golden.shape, dtype=torch.float64)
    g_ours = _grads(ours, _shared_values, args, cot.to(DEVICE, F32))
    g_eager = _grads(eager, _shared_values, args, cot.to(DEVICE, F32))
    g_gold = _grads(golden, _shared_values, args64, cot)
    for name, a, b, c in zip("qkvb", g_ours, g_eager, g_gold):
        golden_check(a.cpu(), b.cpu(), c, name=f"d{name}")


def _shared_values_viewed(x, k, v, bias):
    """``_shared_values`` with the heads split from a projection's width by a
    view: under ``dynamic=True`` the 4 heads stay a fixed size, the positions
    vary."""
    return _shared_values(x.view(x.shape[0], x.shape[1], 4, 16), k, v, bias)


def test_values_shared_by_the_heads_dynamic_lengths():
    """[Note: V shared along several axes] under ``dynamic=True``: the
    positions (a size that varies) are the query axis over the 4 fixed heads,
    whatever the first length (3 positions here, fewer than the heads); one
    graph serves 3 and 40 positions, golden-relative to eager."""
    from torch._dynamo.utils import counters as dynamo_counters

    torch.manual_seed(0)
    torch._dynamo.reset()
    attn_compiler.reset()
    dynamo_counters.clear()
    compiled = torch.compile(_shared_values_viewed, backend=attn_compiler.backend(inner="aot_eager"), dynamic=True)
    for n in (3, 40):
        args = [torch.randn(2, n, 64), torch.randn(2, 37, 16), torch.randn(2, 37, 8), torch.randn(n, 37)]
        golden_check(compiled(*args), _shared_values_viewed(*args),
                     _shared_values_viewed(*[_to64(a) for a in args]), name=f"{n} positions")
    assert dynamo_counters["stats"]["unique_graphs"] == 1
    (row,) = assert_fused(attn_compiler.report(), 1)
    q = row.features["shapes"]["q"]
    assert q[1] == 4 and not isinstance(q[2], int), row.features["shapes"]


def _unbatched_cross(q, k, v):
    """One example's attention: q (Lq, D) against k (Lk, D), ``k.T``."""
    return torch.softmax(q @ k.T / math.sqrt(q.shape[-1]), dim=-1) @ v


def _unbatched_masked(q, k, v, keep):
    """Rank-2 scores through ``transpose(0, 1)``, a (Lq, Lk) boolean mask, a
    bias row (Lk,) and a dropout that keeps everything (eval)."""
    s = torch.matmul(q, k.transpose(0, 1)) * q.shape[-1] ** -0.5 + 0.1 * torch.arange(k.shape[0], device=q.device)
    s = s.masked_fill(~keep, float("-inf"))
    return F.dropout(s.softmax(-1), 0.1, False) @ v


def _unbatched_loop(q, k, v):
    """A loop over the batch, each example's attention on its own matrices:
    dynamo unrolls it into one site per example."""
    return torch.stack([torch.softmax(q[b] @ k[b].T / 4.0, -1) @ v[b] for b in range(q.shape[0])])


def _unbatched_probs_returned(q, k, v):
    p = torch.softmax(q @ k.T, -1)
    return p @ v, p


UNBATCHED = {
    "cross": (_unbatched_cross, lambda: [torch.randn(37, 16), torch.randn(50, 16), torch.randn(50, 8)], 1),
    "masked": (_unbatched_masked, lambda: [torch.randn(37, 16), torch.randn(37, 16), torch.randn(37, 8),
                                           torch.ones(37, 37, dtype=torch.bool).tril()], 1),
    "loop": (_unbatched_loop, lambda: [torch.randn(3, 20, 16), torch.randn(3, 20, 16), torch.randn(3, 20, 8)], 3),
}


@pytest.mark.parametrize("on_kernels", [False, True], ids=["reference", "kernels"])
@pytest.mark.parametrize("case", sorted(UNBATCHED))
def test_unbatched_scores_lifted(case, on_kernels):
    """[Note: unbatched scores]  Rank-2 scores (one example's q, k, v
    matrices) are fused with a unit batch axis in front: the op sees
    (1, 1, Lq, D); forward and every gradient golden-relative to eager, on
    the reference and on the generated kernels."""
    fn, make, sites = UNBATCHED[case]
    torch.manual_seed(0)
    torch._dynamo.reset()
    attn_compiler.reset()
    cpu = make()
    args = [_to(a.requires_grad_() if a.is_floating_point() else a) for a in cpu]
    with dispatch.implementation("triton" if on_kernels else "reference"):
        ours = torch.compile(fn, backend=attn_compiler.backend(inner="aot_eager"))(*args)
        rows = assert_fused(attn_compiler.report(), sites)
        eager = fn(*args)
    assert all(list(r.features["shapes"]["q"][:2]) == [1, 1] for r in rows), [r.features["shapes"] for r in rows]
    args64 = [_to64(a) for a in cpu]
    golden = fn(*args64)
    golden_check(ours.cpu(), eager.cpu(), golden, name=f"{case} out")
    cot = torch.randn(golden.shape, dtype=torch.float64)
    g_ours = _grads(ours, fn, args, cot.to(DEVICE, F32))
    g_eager = _grads(eager, fn, args, cot.to(DEVICE, F32))
    g_gold = _grads(golden, fn, args64, cot)
    for i, (a, b, c) in enumerate(zip(g_ours, g_eager, g_gold)):
        golden_check(a.cpu(), b.cpu(), c, name=f"{case} d{i}")


def test_unbatched_scores_declined_run_as_written():
    """Rank-2 scores whose probabilities are also returned: declined, and the
    user's nodes run as written (no einsum of the lifted form left), eager's
    numbers to the bit."""
    graphs, inner = _graph_capture()
    q, k, v = torch.randn(20, 8), torch.randn(20, 8), torch.randn(20, 4)
    out, p = torch.compile(_unbatched_probs_returned, backend=attn_compiler.backend(inner=inner))(q, k, v)
    eo, ep = _unbatched_probs_returned(q, k, v)
    rows = list(attn_compiler.report())
    assert len(rows) == 1 and rows[0].status == "declined", [(r.status, r.reason) for r in rows]
    assert torch.equal(out, eo) and torch.equal(p, ep)
    assert not any(n.target is torch.einsum for gm in graphs for n in gm.graph.nodes)
