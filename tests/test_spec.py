"""AttentionSpec: serialisation, hashing, mask predicates, derivatives, and
what the analyzer proves about real sites (scale, causal, window)."""
import math

import pytest
import sympy
import torch

import attn_compiler
from attn_compiler.passes.analyze import spec as S
from attn_compiler.passes.analyze.spec import AttentionSpec, CapturedTensor

causal_mod = sympy.Piecewise((-sympy.oo, S.kv_idx > S.q_idx), (S.score, True))


def test_round_trip_and_hash():
    bias = CapturedTensor((False, True, True, True), "float32", True)
    spec = AttentionSpec(causal_mod + 0 * S.score, 1 / sympy.sqrt(S.D), (bias,), dropout_p=0.1,
                         gqa_group=4, out_dtype="bfloat16")
    again = AttentionSpec.loads(spec.dumps())
    assert again == spec and hash(again) == hash(spec) and again.key == spec.key
    other = AttentionSpec(causal_mod, 1 / sympy.sqrt(S.D), (bias,), dropout_p=0.2, gqa_group=4,
                          out_dtype="bfloat16")
    assert other.key != spec.key


@pytest.mark.parametrize("mod,kind", [
    (S.score, "none"),
    (causal_mod, "causal"),
    (sympy.Piecewise((-sympy.oo, (S.kv_idx > S.q_idx) | (S.kv_idx < S.q_idx - 7)), (S.score, True)),
     "sliding_window(-7..0)"),
    (sympy.Piecewise((sympy.Float(-3.4e38), S.kv_idx > S.q_idx + S.Lk - S.Lq), (S.score, True)),
     "causal(offset=Lk - Lq)"),
    (sympy.Piecewise((-sympy.oo, sympy.Ne(S.captured_call(0), 0)), (S.score, True)), "tensor"),
    (sympy.Piecewise((S.score, (S.kv_idx <= S.q_idx) & sympy.Ne(S.captured_call(0), 0)),
                     (S.score - 3.4e38, True)), "causal+tensor"),
])
def test_mask_kinds(mod, kind):
    spec = AttentionSpec(mod, sympy.Integer(1))
    assert spec.mask_kind == kind


def test_additive_finfo_min_reads_as_a_mask_but_keeps_its_gradient():
    mod = sympy.Piecewise((S.score, S.kv_idx <= S.q_idx), (S.score - 3.4e38, True))
    spec = AttentionSpec(mod, sympy.Integer(1))
    assert spec.mask_fill == pytest.approx(-3.4e38)
    assert spec.dscore == 1  # eager's gradient through ``score + min`` is 1 everywhere


def test_derivatives_by_sympy():
    cap = 30 * sympy.tanh(S.score / 30)
    bias = S.captured_call(0)
    spec = AttentionSpec(cap + 2 * bias, sympy.Integer(1),
                         (CapturedTensor((True, True, True, True), "float32", True),))
    assert sympy.simplify(spec.dscore - (1 - sympy.tanh(S.score / 30) ** 2)) == 0
    assert spec.dcaptured == (2,)


def _site(fn, *args, **compile_kw):
    torch._dynamo.reset()
    attn_compiler.reset()
    torch.compile(fn, backend=attn_compiler.backend(inner="eager"), **compile_kw)(*args)
    rep = attn_compiler.report()
    assert len(rep.fused) == 1, str(rep)
    return AttentionSpec.loads(rep.fused[0].features["spec"])


def scaled_by_runtime_head_dim(q, k, v):
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return s.softmax(-1) @ v


def test_scale_proven_for_a_symbolic_head_dim():
    q, k, v = (torch.randn(2, 3, 5, 16) for _ in range(3))
    spec = _site(scaled_by_runtime_head_dim, q, k, v, dynamic=True)
    assert sympy.simplify(spec.scale - 1 / sympy.sqrt(S.D)) == 0
    assert spec.score_mod == S.score


def window_from_arange(q, k, v):
    i = torch.arange(q.shape[-2])
    keep = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 4)
    s = (q @ k.transpose(-1, -2)).masked_fill(~keep, float("-inf"))
    return s.softmax(-1) @ v


def test_index_masks_become_predicates_not_tensors():
    q, k, v = (torch.randn(2, 3, 11, 8) for _ in range(3))
    spec = _site(window_from_arange, q, k, v)
    assert spec.captured == ()
    assert spec.mask_kind == "sliding_window(-3..0)"
    for qi in range(11):
        for ki in range(11):
            keep = bool(spec.mask_predicate.subs({S.q_idx: qi, S.kv_idx: ki}))
            assert keep == (qi - 4 < ki <= qi), (qi, ki)


def softcap_in_model_dtype(q, k, v):
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = 30.0 * torch.tanh(s / 30.0)
    return torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def softcap_upcast(q, k, v):
    s = (q @ k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1])
    s = 30.0 * torch.tanh(s / 30.0)
    return torch.softmax(s, dim=-1).to(q.dtype) @ v


@pytest.mark.parametrize("fn, score_dtype", [(softcap_in_model_dtype, "bfloat16"), (softcap_upcast, "float32")])
def test_score_dtype_is_the_dtype_the_scores_reach_the_softmax_in(fn, score_dtype):
    """Gemma-2 soft-caps its bf16 scores in bf16 (the kernels may use the GPU's
    approximate tanh); code that upcasts first computes tanh in float32 (they
    keep an exact form).  Both output and probabilities are bf16."""
    q, k, v = (torch.randn(2, 3, 9, 16, dtype=torch.bfloat16) for _ in range(3))
    spec = _site(fn, q, k, v)
    assert (spec.score_dtype, spec.out_dtype, spec.prob_dtype) == (score_dtype, "bfloat16", "bfloat16")
    assert AttentionSpec.loads(spec.dumps()).score_dtype == score_dtype


def test_specs_written_before_score_dtype_load():
    """A spec text without the field (an older cache entry) loads as float32 scores."""
    import json
    spec = AttentionSpec(causal_mod, 1 / sympy.sqrt(S.D), out_dtype="bfloat16", score_dtype="bfloat16")
    d = json.loads(spec.dumps())
    del d["score_dtype"]
    assert AttentionSpec.loads(json.dumps(d)).score_dtype == "float32"


def test_rounds_scores_where_eager_absorbs_what_float32_would_not():
    """float16 scores plus an additive float tensor (a finfo.min mask) or a
    finite constant fill, and bfloat16 scores with a moderate constant fill
    (-1e4), are rounded as eager computed them; bfloat16 scores plus a tensor
    (assumed finfo.min, which absorbs in float32 too) or finfo(bfloat16).min,
    scores with only -inf masks, and float32 scores are not."""
    add = S.score + S.captured_call(0)
    mask = CapturedTensor((True, False, True, True), "float16")
    keep = CapturedTensor((True, False, False, True), "bool")
    fill = sympy.Piecewise((S.score, S.kv_idx <= S.q_idx), (sympy.Float(-65504.0), True))
    moderate = sympy.Piecewise((S.score, S.kv_idx <= S.q_idx), (S.score - sympy.Float(1e4), True))
    huge = sympy.Piecewise((S.score, S.kv_idx <= S.q_idx),
                           (S.score + sympy.Float(float(torch.finfo(torch.bfloat16).min)), True))
    cases = [
        (add, (mask,), "float16", True),
        (fill, (), "float16", True),
        (moderate, (), "bfloat16", True),
        (moderate, (), "float32", False),
        (huge, (), "bfloat16", False),
        (add, (mask,), "bfloat16", False),
        (add, (mask,), "float32", False),
        (causal_mod, (), "float16", False),
        (sympy.Piecewise((-sympy.oo, sympy.Eq(S.captured_call(0), 0)), (S.score, True)), (keep,), "float16", False),
    ]
    for mod, caps, dt, want in cases:
        spec = AttentionSpec(mod, 1 / sympy.sqrt(S.D), caps, out_dtype=dt, prob_dtype=dt, score_dtype=dt)
        assert spec.rounds_scores is want, (mod, dt)
