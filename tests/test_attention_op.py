"""attn_compiler::attention (blockwise reference implementation) against the eager reference.

Every check is golden-relative (STYLE.md §2): a float64 golden from
``reference_attention``, eager in the test dtype, ours through the op;
outputs and dQ/dK/dV (and dBias) must satisfy err(ours) <= k·err(eager) + tiny.
Small forced blocks (16 x 32) make every length below a non-multiple.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import sympy
import torch

from attn_compiler import ops, reference
from attn_compiler.passes.analyze.spec import (
    D, AttentionSpec, CapturedTensor, captured_call, kv_idx, q_idx, score)
from attn_compiler.testing import golden_check, reference_attention

oo = sympy.oo
T0 = captured_call(0)
F32_MIN = float(torch.finfo(torch.float32).min)
BLOCKS = (16, 32)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def make_spec(mod, *, dtype=torch.float32, captured=(), group=1, dropout_p=0.0, scale=None):
    return AttentionSpec(score_mod=mod, scale=1 / sympy.sqrt(D) if scale is None else scale,
                         captured=tuple(captured), gqa_group=group, dropout_p=dropout_p,
                         out_dtype=dtype_name(dtype), prob_dtype=dtype_name(dtype))


def causal_mod():
    return sympy.Piecewise((-oo, kv_idx > q_idx), (score, True))


# ---- the case table ------------------------------------------------------------
# name -> (spec builder, kwargs for reference_attention, shape overrides, captured builder)

def _padding(B, Lk):
    keep = torch.ones(B, 1, 1, Lk, dtype=torch.bool)
    keep[0, ..., Lk - 7:] = False                     # batch 0: last 7 keys are padding
    keep[-1, ..., :3] = False                         # last batch: first 3 keys (left padding)
    return keep


def _rows_masked(Lq, Lk):
    """kv_idx > q_idx - 3: rows 0..2 fully masked, the rest causal-ish."""
    qi, ki = torch.arange(Lq).view(-1, 1), torch.arange(Lk).view(1, -1)
    return (ki > qi - 3).view(1, 1, Lq, Lk)


CASES = {
    "plain": dict(mod=score),
    "causal": dict(mod=causal_mod(), ref=dict(causal=True)),
    "sliding_window": dict(mod=sympy.Piecewise((-oo, (kv_idx > q_idx) | (q_idx - kv_idx >= 8)), (score, True)),
                           ref=dict(window=8)),
    "bias_grad": dict(mod=score + T0, cap="bias"),
    "padding_mask": dict(mod=sympy.Piecewise((score, sympy.Ne(T0, 0)), (-oo, True)), cap="padding", B=3),
    # window plus an attention sink at kv_idx 0: not a band, blocks skipped by testing the grid
    "window_sink": dict(mod=sympy.Piecewise(
        (score, ((kv_idx <= q_idx) & (q_idx - kv_idx < 8)) | sympy.Eq(kv_idx, 0)), (-oo, True)), ref="sink"),
    "softcap": dict(mod=30 * sympy.tanh(score / 30), ref=dict(softcap=30.0), qscale=6.0),
    # HF style additive mask holding finfo.min; rows 0..2 fully masked -> uniform
    "finfo_min_rows": dict(mod=score + T0, cap="additive_rows", ref="finfo_rows"),
    # a finite fill as a Piecewise value (no block skipping allowed)
    "causal_finfo_min": dict(mod=sympy.Piecewise((sympy.Float(F32_MIN), kv_idx > q_idx), (score, True)),
                             ref="finfo_causal"),
    "neginf_rows": dict(mod=sympy.Piecewise((-oo, kv_idx > q_idx - 3), (score, True)), ref="neginf_rows"),
    "gqa": dict(mod=causal_mod(), ref=dict(causal=True), Hq=8, Hkv=2),
    "mqa_batch1_kv": dict(mod=score, Hq=4, Hkv=1, Bkv=1),
    "cross_lq_ne_lk": dict(mod=sympy.Piecewise((score, sympy.Ne(T0, 0)), (-oo, True)), cap="padding",
                           Lq=20, Lk=77, Dv=24, B=2),
    "noncontiguous": dict(mod=causal_mod(), ref=dict(causal=True), layout="bshd"),
    "head_dim_80": dict(mod=causal_mod(), ref=dict(causal=True), Dh=80),
}


def _inputs(c, dtype, gen):
    B, Hq, Hkv = c.get("B", 2), c.get("Hq", 2), c.get("Hkv", c.get("Hq", 2))
    Lq, Lk, Dh = c.get("Lq", 37), c.get("Lk", c.get("Lq", 37) + 8), c.get("Dh", 16)
    Dv, Bkv = c.get("Dv", Dh), c.get("Bkv", B)

    def rnd(b, h, n, d, s=1.0):
        if c.get("layout") == "bshd":                  # (B, L, H, D) storage, viewed as (B, H, L, D)
            return (torch.randn(b, n, h, d, generator=gen) * s).to(dtype).transpose(1, 2)
        return (torch.randn(b, h, n, d, generator=gen) * s).to(dtype)

    q = rnd(B, Hq, Lq, Dh, c.get("qscale", 1.0))
    k, v = rnd(Bkv, Hkv, Lk, Dh), rnd(Bkv, Hkv, Lk, Dv)
    return q, k, v, (B, Hq, Hkv, Lq, Lk)


def _captured_and_ref(c, dims, gen):
    """(captured tensors, CapturedTensor specs, reference kwargs)."""
    B, Hq, Hkv, Lq, Lk = dims
    ref = c.get("ref", {})
    if ref == "finfo_rows":
        ref = dict(mask=torch.where(_rows_masked(Lq, Lk), F32_MIN, 0.0))
    elif ref == "finfo_causal":
        causal = torch.ones(Lq, Lk, dtype=torch.bool).triu(1)          # kv_idx > q_idx
        ref = dict(mask=torch.where(causal, F32_MIN, 0.0))
    elif ref == "sink":
        qi, ki = torch.arange(Lq).view(-1, 1), torch.arange(Lk).view(1, -1)
        ref = dict(mask=((ki <= qi) & (qi - ki < 8)) | (ki == 0))
    elif ref == "neginf_rows":
        ref = dict(mask=~_rows_masked(Lq, Lk))
    if c.get("cap") == "bias":
        bias = torch.randn(1, Hq, Lq, Lk, generator=gen).requires_grad_()
        return [bias], [CapturedTensor((False, True, True, True), "float32", True)], dict(ref, bias=bias)
    if c.get("cap") == "additive_rows":
        return [ref["mask"]], [CapturedTensor((False, False, True, True), "float32")], ref
    if c.get("cap") == "padding":
        keep = _padding(B, Lk)
        return [keep], [CapturedTensor((True, False, False, True), "bool")], dict(ref, mask=keep)
    return [], [], dict(ref)


def _to64(x):
    if not torch.is_tensor(x) or not x.is_floating_point():
        return x
    return x.detach().double().requires_grad_(x.requires_grad)


def run_case(name, dtype, k_factor=2.0):
    c = CASES[name]
    gen = torch.Generator().manual_seed(hash(name) % 2**31)
    q, k, v, dims = _inputs(c, dtype, gen)
    caps, cap_specs, ref_kw = _captured_and_ref(c, dims, gen)
    spec = make_spec(c["mod"], dtype=dtype, captured=cap_specs, group=dims[1] // dims[2])
    leaves = [t.requires_grad_() for t in (q, k, v)] + [t for t in caps if t.requires_grad]
    with reference.block_sizes(*BLOCKS):
        out, lse = ops.attention(q, k, v, caps, spec)
    dout = torch.randn(out.shape, generator=gen).to(dtype)
    ours = [out, *torch.autograd.grad(out, leaves, dout)]
    eager_out = reference_attention(q, k, v, **ref_kw)
    eager = [eager_out, *torch.autograd.grad(eager_out, leaves, dout)]
    leaves64 = [_to64(t) for t in leaves]
    kw64 = {key: (leaves64[3] if key == "bias" else _to64(val)) for key, val in ref_kw.items()}
    gold_out = reference_attention(*leaves64[:3], **kw64)
    golden = [gold_out, *torch.autograd.grad(gold_out, leaves64, dout.double())]
    assert out.dtype == dtype and out.is_contiguous() and lse.shape == out.shape[:3]
    for what, a, e, g in zip(["out", "dq", "dk", "dv", "dbias"], ours, eager, golden):
        assert a.dtype == e.dtype and a.shape == e.shape, what
        golden_check(a, e, g, k=k_factor, name=f"{name}/{dtype_name(dtype)}/{what}")
    return ours


@pytest.mark.parametrize("name", list(CASES))
def test_case_float32(name):
    run_case(name, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", ["causal", "gqa", "bias_grad", "softcap", "noncontiguous"])
def test_case_dtypes(name, dtype):
    run_case(name, dtype)


def test_fully_masked_rows_semantics():
    """finfo.min rows average V uniformly; -inf rows are NaN (as eager); others are finite."""
    out_min = run_case("finfo_min_rows", torch.float32)[0]
    out_inf = run_case("neginf_rows", torch.float32)[0]
    assert torch.isnan(out_inf[:, :, :3]).all() and torch.isfinite(out_inf[:, :, 3:]).all()
    assert torch.isfinite(out_min).all()


# ---- dropout -----------------------------------------------------------------

def test_dropout_keep_fraction():
    ar = lambda n, d: torch.arange(n).view([n if i == d else 1 for i in range(4)])
    keep = reference.dropout_keep_mask(1234, 0.5, ar(2, 0), ar(3, 1), ar(200, 2), ar(300, 3))
    frac = keep.double().mean().item()
    assert abs(frac - 0.5) < 0.01                     # 360k draws: std 0.0008
    other = reference.dropout_keep_mask(1235, 0.5, ar(2, 0), ar(3, 1), ar(200, 2), ar(300, 3))
    assert (keep != other).double().mean().item() > 0.45   # another seed, another mask


def _dropout_problem(dtype=torch.float64, Lq=21, Lk=27, B=2, Dh=8):
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(B, 4, L, Dh, generator=gen, dtype=dtype).requires_grad_() for L in (Lq, Lk, Lk))
    k = k.detach()[:, :2].requires_grad_()            # GQA 4:2
    v = v.detach()[:, :2].requires_grad_()
    spec = make_spec(causal_mod(), dtype=dtype, group=2, dropout_p=0.5)
    return q, k, v, spec, torch.tensor(987654321987, dtype=torch.int64)


def test_dropout_matches_reference_with_same_masks():
    q, k, v, spec, seed = _dropout_problem()
    with reference.block_sizes(8, 16):
        out = ops.attention(q, k, v, [], spec, seed)[0]
    ref = reference_attention(q, k, v, causal=True, dropout_p=0.5, dropout_seed=int(seed))
    dout = torch.randn_like(out)
    g_ours = torch.autograd.grad(out, (q, k, v), dout)
    g_ref = torch.autograd.grad(ref, (q, k, v), dout)
    for a, b in zip((out, *g_ours), (ref, *g_ref)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_dropout_independent_of_blocks_and_gradcheck():
    q, k, v, spec, seed = _dropout_problem(Lq=7, Lk=9, B=1, Dh=4)
    with reference.block_sizes(4, 5):
        a = ops.attention(q, k, v, [], spec, seed)[0]
        # the keep-mask is a function of the seed: finite differences see a fixed function
        assert torch.autograd.gradcheck(lambda *x: ops.attention(*x, [], spec, seed)[0], (q, k, v),
                                        fast_mode=True)
    with reference.block_sizes(64, 64):
        b = ops.attention(q, k, v, [], spec, seed)[0]
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ---- op machinery ----------------------------------------------------------------

def _opcheck_args(kind):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 19, 16, generator=gen, requires_grad=True)
    k = torch.randn(2, 2, 23, 16, generator=gen, requires_grad=True)
    v = torch.randn(2, 2, 23, 8, generator=gen, requires_grad=True)
    caps, cap_specs, seed, p = [], [], None, 0.0
    if kind == "bias":
        caps = [torch.randn(1, 4, 19, 23, generator=gen, requires_grad=True)]
        cap_specs = [CapturedTensor((False, True, True, True), "float32", True)]
    if kind == "key_bias_view":     # (B, Lk, H) permuted and unsqueezed: (B, H, 1, Lk), not contiguous
        caps = [torch.randn(2, 23, 4, generator=gen).permute(0, 2, 1).unsqueeze(2).requires_grad_(True)]
        cap_specs = [CapturedTensor((True, True, False, True), "float32", True)]
    if kind == "dropout":
        seed, p = torch.tensor(5, dtype=torch.int64), 0.25
    mod = score + T0 if kind in ("bias", "key_bias_view") else causal_mod()
    spec = make_spec(mod, captured=cap_specs, group=2, dropout_p=p)
    if kind == "heads_inner":
        spec = dataclasses.replace(spec, out_heads_inner=True)
    return q, k, v, caps, spec.dumps(), seed


@pytest.mark.parametrize("kind", ["causal", "bias", "key_bias_view", "dropout", "heads_inner"])
def test_opcheck(kind):
    q, k, v, caps, spec, seed = _opcheck_args(kind)
    with reference.block_sizes(8, 16):
        torch.library.opcheck(torch.ops.attn_compiler.attention.default, (q, k, v, caps, spec, seed))
        # the run-time op of compiled graphs: no autograd kernel, so no input needing a gradient
        torch.library.opcheck(torch.ops.attn_compiler.attention_forward.default,
                              (q.detach(), k.detach(), v.detach(), [c.detach() for c in caps], spec, seed))
        out, lse = torch.ops.attn_compiler.attention(q, k, v, caps, spec, seed)
        dout = torch.randn_like(out)
        args = (dout, q.detach(), k.detach(), v.detach(), [c.detach() for c in caps],
                out.detach(), lse.detach(), spec, seed)
        torch.library.opcheck(torch.ops.attn_compiler.attention_backward.default, args)


def test_compiled_graphs_call_the_run_time_ops():
    """[Note: the op's run-time dispatch]: a fused site's forward graph (after
    AOTAutograd) calls ``attention_forward`` and its backward graph
    ``attention_backward``, never the custom op with its wrappers; gradients
    match the public op's."""
    from torch._dynamo.backends.common import aot_autograd

    import attn_compiler

    graphs = {}

    def keep(name):
        def compiler(gm, _inputs):
            graphs[name] = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
            return gm
        return compiler

    inner = aot_autograd(fw_compiler=keep("fwd"), bw_compiler=keep("bwd"))

    def f(q, k, v):
        s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        return torch.softmax(s, dim=-1) @ v

    torch._dynamo.reset()
    attn_compiler.reset()
    q, k, v = (torch.randn(2, 3, 12, 16, requires_grad=True) for _ in range(3))
    out = torch.compile(f, backend=attn_compiler.backend(inner=inner))(q, k, v)
    out.sum().backward()
    assert attn_compiler.report().fused, attn_compiler.report()
    assert "attn_compiler.attention_forward.default" in graphs["fwd"], graphs["fwd"]
    assert "attn_compiler.attention_backward.default" in graphs["bwd"], graphs["bwd"]
    assert not any(t == "attn_compiler.attention.default" for g in graphs.values() for t in g)
    ref = f(*(t.detach().requires_grad_() for t in (q, k, v)))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_compile_dynamic_lengths():
    """Fake kernels with symbolic sequence lengths: one graph, two lengths, fwd + bwd."""
    spec = make_spec(causal_mod(), group=2).dumps()

    @torch.compile(fullgraph=True, dynamic=True, backend="aot_eager")
    def f(q, k, v):
        return torch.ops.attn_compiler.attention(q, k, v, [], spec, None)[0].sin()

    for L in (24, 40):
        q = torch.randn(1, 4, L, 16, requires_grad=True)
        k, v = (torch.randn(1, 2, L + 3, 16, requires_grad=True) for _ in range(2))
        out = f(q, k, v)
        out.sum().backward()
        ref = reference_attention(q, k, v, causal=True).sin()
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        g_ref = torch.autograd.grad(ref.sum(), (q, k, v))
        for a, b in zip((q.grad, k.grad, v.grad), g_ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad, match", [
    ("gqa", "not a multiple"), ("captured_dims", "vary along"), ("n_captured", "captured tensors"),
    ("head_dim", "head dims differ"), ("no_seed", "seed")])
def test_input_errors(bad, match):
    q, k, v = torch.randn(1, 3, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    spec, caps, seed = make_spec(score, group=0), [], None
    if bad != "gqa":
        q = torch.randn(1, 4, 8, 16)
    if bad == "captured_dims":
        spec = make_spec(score + T0, group=0, captured=[CapturedTensor((False, False, False, True), "float32")])
        caps = [torch.randn(1, 4, 8, 8)]
    if bad == "n_captured":
        caps = [torch.randn(1, 1, 1, 8)]
    if bad == "head_dim":
        k = torch.randn(1, 2, 8, 12)
    if bad == "no_seed":
        spec = make_spec(score, group=0, dropout_p=0.1)
    with pytest.raises(ValueError, match=match):
        torch.ops.attn_compiler.attention(q, k, v, caps, spec.dumps(), seed)


# ---- the score_mod evaluator the op relies on ---------------------------------------

def test_score_mod_evaluator_edge_cases():
    from attn_compiler.passes.analyze.torch_eval import can_evaluate, evaluate

    s = torch.tensor([[[[-2.0, 0.0, 3.0]]]], dtype=torch.float64)
    env = dict(score=s, b=torch.zeros(1, 1, 1, 1, dtype=torch.long), h=torch.zeros(1, 1, 1, 1, dtype=torch.long),
               q_idx=torch.tensor([1]).view(1, 1, 1, 1), kv_idx=torch.arange(3).view(1, 1, 1, 3),
               Lq=2, Lk=3, t0=torch.tensor([True, False, True]).view(1, 1, 1, 3))
    masked = evaluate(sympy.Piecewise((score, sympy.Ne(T0, 0) & (kv_idx <= q_idx)), (-oo, True)), env)
    assert masked.dtype == torch.float64 and masked.tolist() == [[[[-2.0, -math.inf, -math.inf]]]]
    relu_grad = evaluate(sympy.diff(sympy.Max(score, 0), score), env)   # Heaviside(score)
    assert relu_grad.tolist() == [[[[0.0, 0.5, 1.0]]]]
    sig = evaluate(1 / (1 + sympy.exp(-score)), env)
    torch.testing.assert_close(sig, torch.sigmoid(s))
    assert "erf" in can_evaluate(sympy.erf(score))
    assert "shifted" in can_evaluate(captured_call(0).subs(q_idx, q_idx + 1))
    with pytest.raises(NotImplementedError, match="erf"):
        evaluate(sympy.erf(score), env)


def test_eager_entry_point_differentiates_like_the_registered_op():
    """ops.attention with inputs that need gradients goes through its own
    autograd.Function (less host time per call); its values and gradients are
    the registered op's, bit for bit: learned bias with a gradient, dropout."""
    spec = make_spec(causal_mod() + T0, dropout_p=0.25,
                     captured=[CapturedTensor((False, True, True, True), "float32", requires_grad=True)]).dumps()
    torch.manual_seed(0)
    leaves = [torch.randn(2, 3, 12, 16), torch.randn(2, 3, 20, 16), torch.randn(2, 3, 20, 8),
              torch.randn(1, 3, 12, 20)]
    seed = torch.tensor(1234, dtype=torch.int64)
    dout = torch.randn(2, 3, 12, 8)
    results = []
    for call in (lambda q, k, v, b: ops.attention(q, k, v, [b], spec, seed),
                 lambda q, k, v, b: torch.ops.attn_compiler.attention(q, k, v, [b], spec, seed)):
        q, k, v, b = (t.clone().requires_grad_() for t in leaves)
        out, lse = call(q, k, v, b)
        out.backward(dout)
        results.append([out.detach(), lse.detach(), q.grad, k.grad, v.grad, b.grad])
    assert type(ops.attention(*leaves[:3], [leaves[3].requires_grad_()], spec, seed)[0].grad_fn).__name__ \
        .startswith("_Fused")
    for a, b in zip(*results):
        assert a is not None and torch.equal(a, b)


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("use_out", [True, False], ids=["out_and_lse", "lse_only"])
def test_lse_is_differentiable(impl, use_out):
    """The op's lse has a gradient (attention sinks read it): d lse / d score
    = P enters the score gradient as P ∘ (dP - (delta - dlse)); checked
    against autograd through a float64 softmax, with a banded causal mask and GQA."""
    mod = sympy.Piecewise((-oo, kv_idx > q_idx + 2), (score, True))
    spec = make_spec(mod, group=2).dumps()
    torch.manual_seed(0)
    leaves = [torch.randn(2, 4, 9, 16), torch.randn(2, 2, 11, 16), torch.randn(2, 2, 11, 8)]
    a, w = torch.randn(2, 4, 9, 8), torch.randn(2, 4, 9)

    def loss(out, lse):
        return (lse * w).sum() + ((out * a).sum() if use_out else 0.0)

    ours = [t.clone().requires_grad_() for t in leaves]
    with ops.implementation(impl):
        out, lse = ops.attention(*ours, [], spec)
        loss(out, lse).backward()
    gold = [t.double().requires_grad_() for t in leaves]
    q, k, v = gold[0], gold[1].repeat_interleave(2, 1), gold[2].repeat_interleave(2, 1)
    s = q @ k.transpose(-1, -2) / 4.0
    i, j = torch.arange(9)[:, None], torch.arange(11)[None, :]
    s = s.masked_fill(j > i + 2, float("-inf"))
    g_lse = torch.logsumexp(s, -1)
    g_out = torch.softmax(s, -1) @ v
    loss(g_out, g_lse).backward()
    for o, g in zip(ours, gold):
        want = torch.zeros_like(o) if g.grad is None else g.grad.float()    # v gets none from lse alone
        torch.testing.assert_close(torch.zeros_like(o) if o.grad is None else o.grad, want, rtol=1e-4, atol=1e-5)


def _timm_heads_back(q, k, v):
    """timm's written-out attention: the heads put back beside each other
    right after P·V (``transpose(1, 2).reshape``)."""
    B, H, L, D = q.shape
    a = ((q * D ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
    return (a @ v).transpose(1, 2).reshape(B, L, H * D)


def _hf_heads_back(q, k, v):
    """Hugging Face's: ``transpose(1, 2).contiguous()``, then a view."""
    B, H, L, D = q.shape
    a = torch.softmax(torch.matmul(q, k.transpose(2, 3)) / math.sqrt(D), dim=-1)
    return torch.matmul(a, v).transpose(1, 2).contiguous().view(B, L, H * D)


def _einsum_heads_back(q, k, v):
    """An einsum that writes (B, Lq, H, D) itself, then a reshape."""
    B, H, L, D = q.shape
    a = torch.einsum("bhqd,bhkd->bhqk", q, k).mul(D ** -0.5).softmax(-1)
    return torch.einsum("bhqk,bhkd->bqhd", a, v).reshape(B, L, H * D)


def _read_as_is(q, k, v):
    """The output read in its own layout (a view of it, and a second user)."""
    B, H, L, D = q.shape
    o = ((q @ k.transpose(-2, -1)) * D ** -0.5).softmax(-1) @ v
    return o.view(B * H, L, D).sum(0) + o.transpose(1, 2).sum((0, 2))


@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
@pytest.mark.parametrize("on_kernels", [False, True], ids=["reference", "kernels"])
@pytest.mark.parametrize("fn,heads_inner", [(_timm_heads_back, True), (_hf_heads_back, True),
                                            (_einsum_heads_back, True), (_read_as_is, False)],
                         ids=["timm", "hf", "einsum", "read_as_is"])
def test_output_laid_out_with_the_heads_inside_the_rows(fn, heads_inner, on_kernels, inner):
    """[Note: the output with the heads inside the rows]  A site whose output
    is only read with its heads put back beside each other gets it laid out as
    (B, Lq, H, D) (SDPA's layout: the transpose is then contiguous, its
    reshape a view); one read in its own layout keeps the contiguous output.
    Forward and gradients match eager; the run-time op returns the strides its
    fake promised (inductor checks them)."""
    from torch._dynamo.backends.common import aot_autograd

    import attn_compiler
    from attn_compiler import dispatch
    from attn_compiler.passes.analyze.spec import AttentionSpec

    specs = []

    def keep(gm, _inputs):
        specs.extend(AttentionSpec.loads(n.args[4]) for n in gm.graph.nodes
                     if str(n.target) == "attn_compiler.attention_forward.default")
        return gm
    captured = aot_autograd(fw_compiler=keep, bw_compiler=lambda gm, _: gm)
    torch._dynamo.reset()
    attn_compiler.reset()
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 19, 16, generator=gen, requires_grad=True) for _ in range(3))
    with dispatch.implementation("triton" if on_kernels else "reference"):
        compiled = torch.compile(fn, backend=attn_compiler.backend(inner=captured if inner == "aot_eager" else inner))
        out = compiled(q, k, v)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        assert len(attn_compiler.report().fused) == 1, attn_compiler.report()
        reported = AttentionSpec.loads(attn_compiler.report().fused[0].features["spec"])
        assert reported.out_heads_inner == heads_inner     # the report shows the op's spec
        if inner == "aot_eager":
            assert [s.out_heads_inner for s in specs] == [heads_inner], specs
        spec = dataclasses.replace(make_spec(score), out_heads_inner=heads_inner)
        o, _ = torch.ops.attn_compiler.attention_forward(q.detach(), k.detach(), v.detach(), [], spec.dumps(), None)
    assert o.stride() == ((19 * 3 * 16, 16, 3 * 16, 1) if heads_inner else (3 * 19 * 16, 19 * 16, 16, 1))
    qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
    ref = fn(qq, kk, vv)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, torch.autograd.grad(ref.sum(), (qq, kk, vv))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _doge_dynamic_mask(q, k, v, dt, a):
    """Doge's dynamic mask attention (transformers' DogeAttention, eager): a
    key-wise bias ``exp(A * softplus(dt))`` from a (B, L, H) projection,
    transposed to (B, H, L), spread over the queries, causal by masked_fill,
    added to the scores."""
    B, H, L, D = q.shape
    bias = torch.exp(a * torch.nn.functional.softplus(dt.view(B, L, H))).transpose(-1, -2)
    bias = bias[:, :, None, :].expand(-1, -1, L, -1)
    bias = bias.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), torch.finfo(q.dtype).min)
    w = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * D ** -0.5 + bias, dim=-1, dtype=torch.float32)
    return torch.matmul(w.to(q.dtype), v).transpose(1, 2).contiguous().view(B, L, H * D)


@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
def test_captured_gradient_in_the_captured_tensors_layout(inner):
    """[Note: a captured tensor's gradient in its own layout]: Doge's key-wise
    bias is captured as a permuted view; its gradient comes back in that
    order, and the user's backward ops after it run (handed on contiguous,
    the backward graph failed on a ``view`` of softplus_backward's result) and
    match eager."""
    import attn_compiler
    from attn_compiler import ops

    t = torch.randn(2, 23, 4).permute(0, 2, 1).unsqueeze(2)           # (2, 4, 1, 23)
    assert ops.grad_strides(t) == (92, 1, 184, 4)              # size-1 dims outermost
    assert ops.grad_strides(torch.randn(1, 4, 19, 23)) == (1748, 437, 23, 1)
    gen = torch.Generator().manual_seed(0)
    B, H, L, D = 2, 2, 9, 8
    args = [torch.randn(B, H, L, D, generator=gen) for _ in range(3)]
    args += [torch.randn(B * L, H, generator=gen), torch.randn(H, generator=gen)]
    torch._dynamo.reset()
    attn_compiler.reset()
    compiled = torch.compile(_doge_dynamic_mask, backend=attn_compiler.backend(inner=inner))
    ours_in = [a.clone().requires_grad_(True) for a in args]
    out = compiled(*ours_in)
    grads = torch.autograd.grad(out, ours_in, torch.ones_like(out))
    assert len(attn_compiler.report().fused) == 1, attn_compiler.report()
    ref_in = [a.clone().requires_grad_(True) for a in args]
    ref = _doge_dynamic_mask(*ref_in)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, torch.autograd.grad(ref, ref_in, torch.ones_like(ref))):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
