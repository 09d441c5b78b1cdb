"""Every hand-written attention form in tests/forms.py is found and fused, and
computes what eager computes: outputs and gradients (inputs and parameters)
checked relative to a float64 golden (STYLE.md §2) on awkward shapes (§3).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import operator
from typing import Callable, Optional

import pytest
import torch

import attn_compiler
from attn_compiler.passes.analyze.spec import AttentionSpec
from attn_compiler.passes.pipeline import counters
from attn_compiler.testing import golden_check

import forms  # tests/forms.py (pytest puts tests/ on sys.path)

B, H, L, D = 2, 4, 13, 16
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


# ---- inputs ------------------------------------------------------------------------

def _t(*shape, dtype=F32, grad=True, scale=1.0):
    x = (scale * torch.randn(*shape)).to(dtype)
    return x.requires_grad_(grad)


def _qkv(dtype, b=B, h=H, lq=L, lk=L, d=D, hkv=None, grad=True):
    hkv = h if hkv is None else hkv
    return [_t(b, h, lq, d, dtype=dtype, grad=grad), _t(b, hkv, lk, d, dtype=dtype, grad=grad),
            _t(b, hkv, lk, d, dtype=dtype, grad=grad)]


def _keep_mask(b=B, lk=L):
    """(B, Lk) bool, True = real token; every row keeps its first 5 keys."""
    keep = torch.ones(b, lk, dtype=torch.bool)
    keep[0, lk - 3:] = False
    keep[1, 5:] = False
    return keep


def _local_keep(b=B, nb=3, m=4):
    """(B, NB, 1, M, 3M) bool: LongT5's local blocks, each query keeps the
    keys within 3 positions of it that exist (the first and last blocks'
    neighbours are padding); batch 1 has 9 real tokens."""
    pos = torch.arange(nb)[:, None, None] * m + torch.arange(m)[:, None]          # (NB, M, 1)
    key = torch.arange(nb)[:, None, None] * m - m + torch.arange(3 * m)           # (NB, 1, 3M)
    length = torch.tensor([nb * m, 9])[:, None, None, None]
    keep = ((key - pos).abs() <= 3) & (key >= 0) & (key < length)                  # (B, NB, M, 3M)
    keep |= pos == key                                                             # padded queries keep themselves
    return keep[:, :, None]


def _additive(keep, dtype):
    return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)


def _swin_shift_mask(n_windows, n, dtype):
    """(nW, N, N) of 0 / -100: tokens of different shifted regions never meet."""
    region = torch.arange(n_windows * n).view(n_windows, n) % 3
    return torch.where(region[:, :, None] == region[:, None, :], 0.0, -100.0).to(dtype)


@dataclasses.dataclass
class Case:
    id: str
    build: Callable                  # dtype -> (fn or module, [args])
    sites: int = 1
    kv_heads: Optional[int] = None   # GQA/MQA: heads the op's K must have


def _fn(f, **kw):
    return lambda dtype: (f, _qkv(dtype, **kw))


def _mod(cls, args_of, **ctor):
    def build(dtype):
        m = cls(**ctor).to(dtype)
        return m, args_of(dtype)
    return build


def _bloom(dtype):
    q, kt, v = _t(B * H, L, D, dtype=dtype), _t(B * H, D, L, dtype=dtype), _t(B * H, L, D, dtype=dtype)
    slopes = 2.0 ** (-8.0 * torch.arange(1, H + 1) / H)
    alibi = (slopes[:, None] * torch.arange(L)[None, :]).repeat(B, 1)[:, None, :].to(dtype)  # (B*H, 1, Lk)
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)[None, None].expand(B, 1, L, L)
    return forms.bloom_baddbmm_alibi, [q, kt, v, alibi, causal]


def _pad_bool_4d(keep):
    return keep[:, None, None, :]


def _full_additive(dtype):
    m = torch.randn(B, 1, L, L + 2).to(dtype)
    m[:, :, :, -3:] = torch.finfo(dtype).min
    return m


CASES = [
    # Q·Kᵀ spellings
    Case("gpt2_matmul_div_sqrt", _fn(forms.gpt2_matmul_div_sqrt)),
    Case("gpt2_matmul_div_sqrt_D80", _fn(forms.gpt2_matmul_div_sqrt, d=80)),
    Case("vit_at_mul_inv_sqrt", _fn(forms.vit_at_mul_inv_sqrt, lq=11)),
    Case("mT_torch_softmax", _fn(forms.mT_torch_softmax)),
    Case("permute_kT", _fn(forms.permute_kT, lq=11, lk=13)),
    Case("pretransposed_k", lambda dt: (forms.pretransposed_k,
                                        [_t(B, H, L, D, dtype=dt), _t(B, H, D, L, dtype=dt), _t(B, H, L, D, dtype=dt)])),
    Case("fairseq_bmm_3d", lambda dt: (forms.fairseq_bmm_3d,
                                       [_t(B * H, 9, D, dtype=dt), _t(B * H, L, D, dtype=dt), _t(B * H, L, D, dtype=dt)])),
    Case("fairseq_bmm_reshaped", _fn(forms.fairseq_bmm_reshaped)),
    Case("matmul_scores_bmm_output", _fn(forms.matmul_scores_bmm_output, lq=11)),
    Case("matmul_scores_bmm_output_gqa", _fn(forms.matmul_scores_bmm_output_gqa, hkv=2, b=1)),
    Case("einsum_bhqd", _fn(forms.einsum_bhqd)),
    Case("einsum_bhqd_D80", _fn(forms.einsum_bhqd, d=80, lq=7)),
    Case("einsum_ellipsis", _fn(forms.einsum_ellipsis, lq=11)),
    Case("einsum_bqhd", lambda dt: (forms.einsum_bqhd,
                                    [_t(B, 11, H, D, dtype=dt), _t(B, L, H, D, dtype=dt), _t(B, L, H, D, dtype=dt)])),
    Case("guided_diffusion_split_scale", lambda dt: (forms.guided_diffusion_split_scale,
                                                     [_t(B * H, D, L, dtype=dt) for _ in range(3)])),
    Case("whisper_prescaled_q", _fn(forms.whisper_prescaled_q)),
    Case("bloom_baddbmm_alibi", _bloom),
    # softmax spellings
    Case("vit_nn_softmax", _mod(forms.ViTNNSoftmax, _qkv)),
    Case("llama_softmax_fp32_cast", _fn(forms.llama_softmax_fp32_cast)),
    Case("t5_float_upcast_type_as", _fn(forms.t5_float_upcast_type_as)),
    Case("manual_softmax_amax", _fn(forms.manual_softmax_amax)),
    Case("manual_softmax_max_index0", _fn(forms.manual_softmax_max_index0)),
    Case("manual_softmax_max_values", _fn(forms.manual_softmax_max_values)),
    Case("manual_softmax_two_exps", _fn(forms.manual_softmax_two_exps)),
    Case("manual_softmax_sum_unsqueezed", _fn(forms.manual_softmax_sum_unsqueezed)),
    Case("manual_softmax_sum_indexed", _fn(forms.manual_softmax_sum_indexed)),
    Case("manual_softmax_reciprocal", _fn(forms.manual_softmax_reciprocal)),
    Case("manual_softmax_one_over", _fn(forms.manual_softmax_one_over)),
    # masks
    Case("nanogpt_causal_buffer", _mod(forms.NanoGPTCausalBuffer, lambda dt: [_t(B, L, 64, dtype=dt)])),
    Case("causal_tril_in_graph", _fn(forms.causal_tril_in_graph)),
    Case("causal_triu_finfo_min", _fn(forms.causal_triu_finfo_min)),
    Case("padding_bool_where_neg1e9", lambda dt: (forms.padding_bool_where_neg1e9,
                                                  _qkv(dt) + [_pad_bool_4d(_keep_mask())])),
    Case("bert_bool_masked_fill_neg10000", lambda dt: (forms.bert_bool_masked_fill_neg10000,
                                                       _qkv(dt) + [_pad_bool_4d(~_keep_mask())])),
    Case("bert_additive_padding", lambda dt: (forms.bert_additive_padding,
                                              _qkv(dt) + [_pad_bool_4d(_additive(_keep_mask(), dt))])),
    Case("full_additive_mask", lambda dt: (forms.full_additive_mask,
                                           _qkv(dt, lk=L + 2) + [_full_additive(dt)])),
    Case("opt_bmm_max_clamp", lambda dt: (forms.opt_bmm_max_clamp,
                                          _qkv(dt, lk=L + 2) + [_full_additive(dt)])),
    Case("mistral_sliding_window", _fn(forms.mistral_sliding_window)),
    Case("mistral_reference_log_mask", _fn(forms.mistral_reference_log_mask)),
    Case("grok_grouped_einsum_batch_mask", lambda dt: (
        forms.grok_grouped_einsum_batch_mask,
        [_t(B, L, 2, 2, D, dtype=dt), _t(B, L, 2, D, dtype=dt), _t(B, L, 2, D, dtype=dt),
         torch.tril(torch.ones(L, L, dtype=torch.bool)).expand(B, 1, 1, L, L) & _keep_mask()[:, None, None, None]]),
        kv_heads=2),
    Case("openfold_5d_batch_mask", lambda dt: (
        forms.openfold_5d_batch_mask,
        [_t(B, 3, 2, L, D, dtype=dt) for _ in range(3)] + [_keep_mask()[:, None, None, None, :]])),
    Case("openfold_msa_row_pair_bias", lambda dt: (
        forms.openfold_msa_row_pair_bias,
        [_t(B, 3, 2, L, D, dtype=dt) for _ in range(3)] + [_keep_mask()[:, None, :].expand(B, 3, L).to(dt).clone(),
                                                           _t(B, 1, 2, L, L, dtype=dt)])),
    Case("longt5_local_blocks", lambda dt: (
        forms.longt5_local_blocks,
        [_t(B, 3, 4, 2, D, dtype=dt), _t(B, 3, 12, 2, D, dtype=dt), _t(B, 3, 12, 2, D, dtype=dt),
         _t(1, 1, 2, 4, 12, dtype=dt), _local_keep()])),
    Case("log_softmax_exp", _fn(forms.log_softmax_exp)),
    Case("sagan_value_times_probs_t", _fn(forms.sagan_value_times_probs_t)),
    Case("where_full_like_scores", lambda dt: (forms.where_full_like_scores, _qkv(dt) + [_keep_mask()])),
    Case("ones_like_scores_tril", _fn(forms.ones_like_scores_tril)),
    Case("new_full_triu", _fn(forms.new_full_triu)),
    Case("prefix_lm_slice_assignment", _fn(forms.prefix_lm_slice_assignment)),
    Case("layoutlmv3_bias_written_through_a_view", lambda dt: (forms.layoutlmv3_bias_written_through_a_view,
                                                               _qkv(dt) + [_t(B, H, L, L, dtype=dt)])),
    Case("clone_partial_rotary_setitem", _fn(forms.clone_partial_rotary_setitem)),
    Case("gqa_widened_k_scaled_in_place", lambda dt: (forms.gqa_widened_k_scaled_in_place, _qkv(dt, hkv=H // 2))),
    Case("shaw_relative_logits_first", lambda dt: (forms.shaw_relative_logits_first,
                                                   _qkv(dt) + [_t(L, L, D, dtype=dt)])),
    Case("swin_shifted_window_mask", lambda dt: (forms.swin_shifted_window_mask,
                                                 _qkv(dt, b=3 * 4, h=3, lq=9, lk=9)
                                                 + [_t(3, 9, 9, dtype=dt), _swin_shift_mask(4, 9, dt)])),
    Case("exp2_softmax_log2e_scale", _fn(forms.exp2_softmax_log2e_scale)),
    Case("exp2_softmax_causal_base_two", _fn(forms.exp2_softmax_causal_base_two)),
    Case("torchvision_swin_mask_in_graph", lambda dt: (forms.torchvision_swin_mask_in_graph,
                                                       _qkv(dt, b=2 * 4, h=3, lq=9, lk=9)
                                                       + [_t(3, 9, 9, dtype=dt)])),
    Case("hf5_causal_where_finfo", _fn(forms.hf5_causal_where_finfo)),
    Case("hf5_causal_where_finfo_cache", _fn(forms.hf5_causal_where_finfo, lq=5, lk=L)),
    Case("hf5_causal_and_padding", lambda dt: (forms.hf5_causal_and_padding, _qkv(dt) + [_keep_mask()])),
    Case("gpt2_hf_where_buffer", _mod(forms.GPT2HFWhereBuffer, lambda dt: _qkv(dt, lq=5))),
    Case("llama_sliced_additive_mask", lambda dt: (forms.llama_sliced_additive_mask,
                                                   _qkv(dt) + [_full_additive(dt)[..., :L].contiguous()
                                                               .repeat(1, 1, 1, 2)])),
    Case("inplace_masked_fill_", lambda dt: (forms.inplace_masked_fill_,
                                             _qkv(dt) + [_pad_bool_4d(~_keep_mask())])),
    Case("inplace_iadd_bias", lambda dt: (forms.inplace_iadd_bias, _qkv(dt) + [_t(1, H, L, L, dtype=dt)])),
    Case("inplace_div_scale_", _fn(forms.inplace_div_scale_)),
    Case("seq2seq_tensor_scale", _mod(forms.Seq2SeqTensorScale,
                                      lambda dt: _qkv(dt) + [_pad_bool_4d(_keep_mask()).long()])),
    # score modifications
    Case("mpt_alibi_in_graph", _fn(forms.mpt_alibi_in_graph)),
    Case("t5_unscaled_bias", _mod(forms.T5UnscaledBias, lambda dt: _qkv(dt, lq=11), Lq=11)),
    Case("t5_bucketed_bias_embedding", _mod(forms.T5BucketedBias, lambda dt: _qkv(dt, lq=11))),
    Case("swin_relative_bias_table", _mod(forms.SwinRelativeBiasTable, lambda dt: _qkv(dt, lq=12, lk=12))),
    Case("swinv2_cosine_logit_scale", _mod(forms.SwinV2CosineLogitScale, _qkv)),
    Case("gemma2_tanh_softcap", _fn(forms.gemma2_tanh_softcap)),
    Case("grok_softcap_expr", _fn(forms.grok_softcap_expr)),
    Case("elementwise_chain", lambda dt: (forms.elementwise_chain, _qkv(dt) + [_t(1, H, 1, L, dtype=dt)])),
    # GQA / MQA
    Case("gqa_repeat_interleave", _fn(forms.gqa_repeat_interleave, hkv=2), kv_heads=2),
    Case("hf_repeat_kv_gqa", _fn(forms.hf_repeat_kv_gqa, hkv=2), kv_heads=2),
    Case("hf_repeat_kv_mqa", _fn(forms.hf_repeat_kv_gqa, hkv=1), kv_heads=1),
    Case("gqa_grouped_einsum", _fn(forms.gqa_grouped_einsum, hkv=2), kv_heads=2),
    Case("meta_llama_repeat_kv_seq_major", lambda dt: (
        forms.meta_llama_repeat_kv_seq_major,
        [_t(B, L, H, D, dtype=dt), _t(B, L, 2, D, dtype=dt), _t(B, L, 2, D, dtype=dt)]), kv_heads=2),
    Case("mistral_repeat_interleave_seq_major", lambda dt: (
        forms.mistral_repeat_interleave_seq_major,
        [_t(B, 11, H, D, dtype=dt), _t(B, L, 1, D, dtype=dt), _t(B, L, 1, D, dtype=dt)]), kv_heads=1),
    Case("mqa_broadcast", _fn(forms.mqa_broadcast, hkv=1), kv_heads=1),
    # cross-attention, decode, two sites
    Case("t5_cross_attention_padding", lambda dt: (forms.t5_cross_attention_padding,
                                                   _qkv(dt, lq=7) + [_pad_bool_4d(_additive(_keep_mask(), dt))])),
    Case("kv_cache_decode", lambda dt: (forms.kv_cache_decode,
                                        [_t(B, H, 1, D, dtype=dt), _t(B, H, 12, D, dtype=dt), _t(B, H, 12, D, dtype=dt),
                                         _t(B, H, 1, D, dtype=dt), _t(B, H, 1, D, dtype=dt)])),
    Case("decoder_self_and_cross", lambda dt: (forms.decoder_self_and_cross,
                                               _qkv(dt) + [_t(B, H, 9, D, dtype=dt), _t(B, H, 9, D, dtype=dt)]),
         sites=2),
]
BY_ID = {c.id: c for c in CASES}


# ---- running and checking ---------------------------------------------------------

def _implementation(on_kernels: bool):
    """The op forced onto the generated kernels (Triton's interpreter on CPU),
    or left to its default (the reference on CPU)."""
    from attn_compiler import dispatch
    return dispatch.implementation("triton") if on_kernels else contextlib.nullcontext()


def _to64(a):
    if isinstance(a, torch.Tensor) and a.dtype.is_floating_point:
        return a.detach().double().requires_grad_(a.requires_grad)
    return a


def _params(fn):
    return [p for p in fn.parameters() if p.requires_grad] if isinstance(fn, torch.nn.Module) else []


def _grads(out, fn, args, cot):
    wrt = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad] + _params(fn)
    return torch.autograd.grad(out, wrt, cot)


def _names(fn, args):
    names = [f"d{i}" for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
    if isinstance(fn, torch.nn.Module):
        names += [f"d{n}" for n, p in fn.named_parameters() if p.requires_grad]
    return names


def assert_fused(rep, sites, kv_heads=None):
    rows = list(rep)
    fused = [r for r in rows if r.status == "fused"]
    problems = [f"{r.location}: {r.reason}" for r in rows if r.status != "fused"]
    assert len(fused) == sites and not problems, \
        f"expected {sites} fused site(s), report has {len(fused)} fused; declined: {problems}"
    if kv_heads is not None:
        for r in fused:
            assert r.features["shapes"]["k"][1] == kv_heads, r.features["shapes"]
            assert r.features["shapes"]["v"][1] == kv_heads, r.features["shapes"]
    return fused


def check_case(case: Case, dtype=F32, inner="aot_eager", backward=True, k=2.0):
    torch.manual_seed(0)
    torch._dynamo.reset()
    attn_compiler.reset()
    fn, args = case.build(dtype)
    fn64 = copy.deepcopy(fn).double() if isinstance(fn, torch.nn.Module) else fn
    args64 = [_to64(a) for a in args]
    before = counters["fused"]

    compiled = torch.compile(fn, backend=attn_compiler.backend(inner=inner))
    ours = compiled(*args)
    eager = fn(*args)
    golden = fn64(*args64)
    assert_fused(attn_compiler.report(), case.sites, case.kv_heads)
    assert counters["fused"] - before == case.sites
    golden_check(ours, eager, golden, k=k, name=f"{case.id} out")
    if not backward:
        return
    cot = torch.randn(golden.shape, dtype=torch.float64)
    g_ours = _grads(ours, fn, args, cot.to(dtype))
    g_eager = _grads(eager, fn, args, cot.to(dtype))
    g_gold = _grads(golden, fn64, args64, cot)
    for name, a, b, c in zip(_names(fn, args), g_ours, g_eager, g_gold):
        golden_check(a, b, c, k=k, name=f"{case.id} {name}")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_form_fp32_forward_backward(case):
    check_case(case)


@pytest.mark.parametrize("case_id,dtype", [
    ("gpt2_matmul_div_sqrt", "bf16"),
    ("openfold_msa_row_pair_bias", "bf16"),
    ("longt5_local_blocks", "fp16"),
    ("matmul_scores_bmm_output", "bf16"),
    ("llama_softmax_fp32_cast", "fp16"),
    ("hf5_causal_where_finfo", "bf16"),
    ("hf_repeat_kv_gqa", "fp16"),
    ("t5_unscaled_bias", "bf16"),
    ("bert_additive_padding", "fp16"),
    ("gemma2_tanh_softcap", "bf16"),
    ("torchvision_swin_mask_in_graph", "bf16"),
    ("exp2_softmax_causal_base_two", "bf16"),
])
@pytest.mark.parametrize("on_kernels", [False, True], ids=["reference", "kernels"])
def test_form_low_precision_forward(case_id, dtype, on_kernels):
    """bfloat16/float16 forms against eager in their dtype, through the op's
    reference path and forced onto the generated kernels."""
    with _implementation(on_kernels):
        check_case(BY_ID[case_id], dtype={"bf16": BF16, "fp16": F16}[dtype], backward=False)


@pytest.mark.parametrize("case_id", ["gpt2_matmul_div_sqrt", "hf_repeat_kv_gqa", "t5_unscaled_bias"])
def test_form_inductor(case_id):
    check_case(BY_ID[case_id], inner="inductor")


# ---- dropout -----------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda training: (lambda q, k, v: forms.functional_dropout(q, k, v, p=0.2, training=training)),
    lambda training: forms.BertDropoutModule(0.2).train(training),
], ids=["functional_dropout", "bert_dropout_module"])
def test_dropout(make):
    torch.manual_seed(0)
    torch._dynamo.reset()
    q, k, v = _qkv(F32)
    # training: fused with the dropout inside the op
    fn = make(True)
    compiled = torch.compile(fn, backend=attn_compiler.backend(inner="aot_eager"))
    outs = [compiled(q, k, v) for _ in range(64)]
    fused = assert_fused(attn_compiler.report(), 1)
    assert fused[0].features.get("dropout") == pytest.approx(0.2)
    assert all(torch.isfinite(o).all() for o in outs)
    assert not torch.equal(outs[0], outs[1]), "two training calls gave the same output: no dropout?"
    (dq,) = torch.autograd.grad(outs[0].sum(), [q])
    assert torch.isfinite(dq).all()
    # eval: equal to eager without dropout
    torch._dynamo.reset()
    attn_compiler.reset()
    ev = make(False)
    ref = ev(q, k, v)
    ours = torch.compile(ev, backend=attn_compiler.backend(inner="aot_eager"))(q, k, v)
    assert_fused(attn_compiler.report(), 1)
    golden_check(ours, ref, ev(*[_to64(t) for t in (q, k, v)]) if not isinstance(ev, torch.nn.Module)
                 else copy.deepcopy(ev).double()(*[_to64(t) for t in (q, k, v)]), name="eval out")
    # training mean over seeds ≈ the no-dropout output (E[mask / (1-p)] = 1)
    mean = torch.stack(outs).mean(0)
    rel = (mean - ref).norm() / ref.norm()
    assert rel < 0.15, f"mean of 64 dropout outputs is {rel:.3f} (relative) from the eval output"


# ---- dynamic shapes -----------------------------------------------------------------------

def _check_lengths(compiled, fn, lengths, hkv=None):
    for n in lengths:
        torch.manual_seed(n)
        q, k, v = _qkv(F32, lq=n, lk=n, hkv=hkv)
        ours, eager = compiled(q, k, v), fn(q, k, v)
        golden = fn(*[_to64(t) for t in (q, k, v)])
        golden_check(ours, eager, golden, name=f"L={n} out")
        rows = list(attn_compiler.report())
        assert rows and all(r.status == "fused" for r in rows), \
            f"L={n}: " + "; ".join(f"{r.status} {r.reason}" for r in rows)
        cot = torch.randn_like(golden)
        gq = [_to64(t) for t in (q, k, v)]
        g_gold = _grads(fn(*gq), None, gq, cot)
        for name, a, b, c in zip("qkv", _grads(compiled(q, k, v), None, [q, k, v], cot.float()),
                                 _grads(fn(q, k, v), None, [q, k, v], cot.float()), g_gold):
            golden_check(a, b, c, name=f"L={n} d{name}")


@pytest.mark.parametrize("form", [forms.hf5_causal_where_finfo, forms.causal_tril_in_graph,
                                  forms.mistral_sliding_window, forms.gqa_repeat_interleave,
                                  forms.diff_transformer_scores, forms.differential_two_maps],
                         ids=["hf5_causal_where_finfo", "causal_tril_in_graph", "mistral_sliding_window",
                              "gqa_repeat_interleave", "diff_transformer_scores", "differential_two_maps"])
def test_dynamic_true_two_lengths(form):
    torch._dynamo.reset()
    hkv = 2 if form is forms.gqa_repeat_interleave else None
    compiled = torch.compile(form, backend=attn_compiler.backend(inner="aot_eager"), dynamic=True)
    _check_lengths(compiled, form, [13, 9], hkv=hkv)


def test_dynamic_true_restarted_compile_reports_once():
    """Under dynamic=True dynamo traces nn.Embedding's float ``norm_type`` as a
    symbolic float; AOT autograd, inside our backend's inner compiler, then
    specializes it, and dynamo abandons that compile and traces the frame
    again.  The abandoned graph never runs: its site must not stay in the
    report beside the new graph's (it did: two rows for one site)."""
    from torch._dynamo.utils import counters as dynamo_counters

    torch._dynamo.reset()
    dynamo_counters.clear()
    torch.manual_seed(0)
    m = forms.T5BucketedBias()
    m64 = copy.deepcopy(m).double()
    compiled = torch.compile(m, backend=attn_compiler.backend(inner="aot_eager"), dynamic=True)
    for n in (13, 9):
        q, k, v = _qkv(F32, lq=n, lk=n)
        golden_check(compiled(q, k, v), m(q, k, v), m64(*[_to64(t) for t in (q, k, v)]), name=f"L={n} out")
    rows = list(attn_compiler.report())
    assert dynamo_counters["stats"]["unique_graphs"] == 1
    assert len(rows) == 1 and rows[0].fused, "; ".join(f"graph {r.graph_id} {r.status} {r.reason}" for r in rows)


class _FloatAttributeScale(torch.nn.Module):
    """A float attribute as the scale (timm's ``self.scale``), applied in place
    (``attn.mul_(self.scale)``) or not."""

    def __init__(self, in_place: bool):
        super().__init__()
        self.scale, self.in_place = D ** -0.5, in_place

    def forward(self, q, k, v):
        s = q @ k.transpose(-1, -2)
        s = s.mul_(self.scale) if self.in_place else s * self.scale
        return torch.softmax(s, dim=-1) @ v


@pytest.mark.parametrize("on_kernels", [False, True], ids=["reference", "kernels"])
@pytest.mark.parametrize("in_place", [False, True], ids=["mul", "mul_"])
def test_dynamic_true_float_attribute_scale(in_place, on_kernels):
    """Under dynamic=True dynamo passes a module's float attribute as a 0-d
    tensor read with ``.item()``: a run-time scalar no size names.  The site
    reads it as a captured scalar (it was declined: "a runtime size ... the
    spec cannot name"); an in-place ``mul_`` by it becomes out of place
    first.  One graph for both lengths, fused, forward and backward
    golden-relative to eager."""
    from torch._dynamo.utils import counters as dynamo_counters

    torch._dynamo.reset()
    dynamo_counters.clear()
    m = _FloatAttributeScale(in_place)
    with _implementation(on_kernels):
        compiled = torch.compile(m, backend=attn_compiler.backend(inner="aot_eager"), dynamic=True)
        _check_lengths(compiled, m, [13, 9])
    rows = list(attn_compiler.report())
    assert dynamo_counters["stats"]["unique_graphs"] == 1
    assert len(rows) == 1 and rows[0].fused, [(r.status, r.reason) for r in rows]


def test_automatic_dynamic_three_lengths():
    torch._dynamo.reset()
    before = counters["fused"]
    form = forms.hf5_causal_where_finfo
    compiled = torch.compile(form, backend=attn_compiler.backend(inner="aot_eager"))
    _check_lengths(compiled, form, [13, 9, 17])
    rows = list(attn_compiler.report())
    # a static graph for 13, then one dynamic graph for 9 (reused for 17)
    assert len(rows) >= 2 and all(r.status == "fused" for r in rows)
    assert counters["fused"] - before == len(rows)


def test_nanogpt_dynamic_true():
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = forms.NanoGPTCausalBuffer()
    compiled = torch.compile(m, backend=attn_compiler.backend(inner="aot_eager"), dynamic=True)
    m64 = copy.deepcopy(m).double()
    for T in (13, 7):
        x = _t(B, T, 64)
        golden_check(compiled(x), m(x), m64(_to64(x)), name=f"T={T} out")
    rows = list(attn_compiler.report())
    assert rows and all(r.status == "fused" for r in rows), [r.reason for r in rows]


# ---- research-code forms -------------------------------------------------------------------

def _left_padding(b=B, lk=L):
    """(B, Lk) bool, True = real token; batch 1 pads its first 4 keys."""
    keep = torch.ones(b, lk, dtype=torch.bool)
    keep[1, :4] = False
    return keep


def _rows_without_keys(n=L):
    """(B, 1, n, n) bool keep mask: batch 0's first 3 query rows keep no key,
    batch 1 keeps its first 8 keys."""
    keep = torch.ones(B, 1, n, n, dtype=torch.bool)
    keep[0, :, :3] = False
    keep[1, :, :, 8:] = False
    return keep


def _media_locations(n=L):
    """(B, n) bool: where an image sits in the text.  Batch 0's first 4 tokens
    come before any image (their rows of P are zeroed), batch 1 starts with one."""
    loc = torch.zeros(B, n, dtype=torch.bool)
    loc[0, [4, 9]] = True
    loc[1, [0, 6, 11]] = True
    return loc


def _bias_rows_of_min(dtype, n=L):
    """(1, H, n, n) float bias: noise, with query row 5 finfo.min over every key."""
    bias = 0.5 * torch.randn(1, H, n, n)
    bias[..., 5, :] = torch.finfo(torch.float32).min
    return bias.to(dtype).requires_grad_()


def _bias_rows_of_own_min(dtype, n=L):
    """As ``_bias_rows_of_min`` with the dtype's own finfo.min (finite in it)."""
    bias = 0.5 * torch.randn(1, H, n, n)
    bias[..., 5, :] = torch.finfo(dtype).min
    return bias.to(dtype).requires_grad_()


def _xlnet_segments(lq, lk, dtype, b=B):
    """XLNet's one-hot segment matrix (Lq, Lk, B, 2): 1 in channel 0 where
    query and key are in the same segment (the first 4 keys and queries, and
    the rest)."""
    same = (torch.arange(lq)[:, None] < 4) == (torch.arange(lk)[None, :] < 4)
    seg = torch.stack([same, ~same], -1)[:, :, None].expand(lq, lk, b, 2)
    return seg.to(dtype)


def _xlnet_mask(lq, lk, dtype, b=B):
    """XLNet's float attention mask (Lq, Lk, B, 1), 1 = masked: the
    memory-causal band, and batch 1's last 3 keys padded."""
    m = torch.ones(lq, lk).triu(1 + lk - lq)[:, :, None, None].repeat(1, 1, b, 1)
    m[:, lk - 3:, 1] = 1
    m[:, 0] = 0
    return m.to(dtype)


def _adjacency(n=L):
    """(1, 1, n, n) 0/1 float adjacency with self loops (every row keeps a key)."""
    g = torch.Generator().manual_seed(1)
    adj = (torch.rand(1, 1, n, n, generator=g) > 0.6).float()
    return ((adj + torch.eye(n)) > 0).float()


RESEARCH_CASES = [
    Case("lucidrains_amax_detach", _fn(forms.lucidrains_amax_detach, lq=11)),
    Case("lucidrains_masked_amax_detach", lambda dt: (forms.lucidrains_masked_amax_detach,
                                                      _qkv(dt) + [_keep_mask()])),
    Case("gpt_neox_upcast_where_buffer", _mod(forms.GPTNeoXUpcastWhereBuffer, _qkv)),
    Case("gpt_neox_upcast_where_buffer_cache", _mod(forms.GPTNeoXUpcastWhereBuffer,
                                                    lambda dt: _qkv(dt, lq=5))),
    Case("gptj_upcast_where_tril", _fn(forms.gptj_upcast_where_tril)),
    Case("timm_attention", _mod(forms.TimmAttention, lambda dt: [_t(B, L, 64, dtype=dt)])),
    Case("fairseq_bmm_key_padding", lambda dt: (forms.fairseq_bmm_key_padding,
                                                [_t(B * H, 9, D, dtype=dt), _t(B * H, L, D, dtype=dt),
                                                 _t(B * H, L, D, dtype=dt), ~_keep_mask()])),
    Case("swinv2_timm_cosine", _mod(forms.SwinV2TimmCosine, lambda dt: [_t(B, 12, 64, dtype=dt)])),
    Case("inplace_div_then_masked_fill_causal", _fn(forms.inplace_div_then_masked_fill_causal)),
    Case("inplace_masked_fill_then_div", lambda dt: (forms.inplace_masked_fill_then_div,
                                                     _qkv(dt) + [_pad_bool_4d(~_keep_mask())])),
    Case("left_padding_additive_neg1e4", lambda dt: (forms.left_padding_additive_neg1e4,
                                                     _qkv(dt) + [_left_padding()])),
    Case("left_padding_additive_neg1e4_upcast", lambda dt: (forms.left_padding_additive_neg1e4_upcast,
                                                            _qkv(dt) + [_left_padding()])),
    Case("hf_extended_mask_in_graph", lambda dt: (forms.hf_extended_mask_in_graph,
                                                  _qkv(dt) + [_keep_mask().float()])),
    Case("hf_extended_mask_in_graph_bool", lambda dt: (forms.hf_extended_mask_in_graph,
                                                       _qkv(dt) + [_keep_mask()])),
    Case("alibi_plus_extended_mask", lambda dt: (forms.alibi_plus_extended_mask,
                                                 _qkv(dt) + [_keep_mask().float()])),
    Case("bert_head_mask", lambda dt: (forms.bert_head_mask,
                                       _qkv(dt) + [torch.tensor([1.0, 0.0, 0.5, 2.0]).view(1, H, 1, 1).to(dt)])),
    Case("bart_layer_head_mask", lambda dt: (forms.bart_layer_head_mask,
                                             [_t(B * H, 9, D, dtype=dt), _t(B * H, L, D, dtype=dt),
                                              _t(B * H, L, D, dtype=dt), torch.tensor([1.0, 0.0, 0.5, 2.0]).to(dt)])),
    Case("per_row_weight_then_halved", lambda dt: (forms.per_row_weight_then_halved,
                                                   _qkv(dt) + [_t(B, H, L, 1, dtype=dt)])),
    Case("cogview_pb_relax", _fn(forms.cogview_pb_relax, lq=11)),
    Case("scores_as_k_qT_transposed", _fn(forms.scores_as_k_qT_transposed, lq=11)),
    Case("scores_einsum_permuted", _fn(forms.scores_einsum_permuted, lq=11)),
    Case("softmax_by_logsumexp", _fn(forms.softmax_by_logsumexp)),
    Case("local_band_with_global_tokens", _fn(forms.local_band_with_global_tokens)),
    Case("qwen2_sliding_window_in_place", _fn(forms.qwen2_sliding_window_in_place)),
    Case("dense_gat_ones_like_fill", lambda dt: (forms.dense_gat_ones_like_fill, _qkv(dt) + [_adjacency()])),
    Case("distilbert_expand_as_mask", lambda dt: (forms.distilbert_expand_as_mask,
                                                  _qkv(dt) + [_keep_mask().long()])),
    Case("xlm_expand_as_in_place", lambda dt: (forms.xlm_expand_as_in_place, _qkv(dt) + [_keep_mask().float()])),
    Case("gpt_oss_sinks", _mod(forms.GptOssSinks, lambda dt: _qkv(dt, hkv=H // 2)), kv_heads=H // 2),
    Case("sink_first_behind_cast", _mod(forms.SinkFirstBehindCast, lambda dt: _qkv(dt) + [_keep_mask()])),
    Case("scores_copied_for_nobody", _fn(forms.scores_copied_for_nobody)),
    Case("causal_by_boolean_index_assignment", _fn(forms.causal_by_boolean_index_assignment)),
    Case("masks_by_slice_assignment", _fn(forms.masks_by_slice_assignment)),
    Case("slices_written_in_place", lambda dt: (forms.slices_written_in_place,
                                                _qkv(dt) + [_t(1, H, L - 1, L - 1, dtype=dt)])),
    Case("padding_by_boolean_index_assignment", lambda dt: (
        forms.padding_by_boolean_index_assignment,
        _qkv(dt) + [(~_keep_mask())[:, None, None, :].expand(B, H, L, L).contiguous()])),
    Case("mvitv2_relpos_slice_assigned", _mod(forms.MViTv2RelPos, lambda dt: _qkv(dt, lq=12, lk=6))),
    Case("mvitv2_relpos_cls_token", _mod(forms.MViTv2RelPos, lambda dt: _qkv(dt, lq=13, lk=7), cls_token=True)),
    Case("mvitv2_video_relpos_cls_token", _mod(forms.MViTv2VideoRelPos, lambda dt: _qkv(dt, lq=25, lk=13))),
    Case("mvitv2_slowfast_relpos_cls_token", _mod(forms.MViTv2SlowFastRelPos, lambda dt: _qkv(dt, lq=25, lk=13))),
    Case("sinks_with_empty_rows", lambda dt: (forms.sinks_with_empty_rows,
                                              _qkv(dt) + [_t(1, H, 1, 1, dtype=dt)])),
    Case("granite_sink_scale", _mod(forms.GraniteSinkScale,
                                    lambda dt: _qkv(dt) + [_additive(_keep_mask(), dt)[:, None, None, :]])),
    Case("nan_to_num_probabilities", lambda dt: (forms.nan_to_num_probabilities, _qkv(dt) + [_rows_without_keys()])),
    Case("espnet_zeroed_probabilities", lambda dt: (forms.espnet_zeroed_probabilities,
                                                    _qkv(dt) + [_rows_without_keys().long()])),
    Case("deberta_xsoftmax", _fn(forms.deberta_xsoftmax)),
    Case("checkpointed_attention", _fn(forms.checkpointed_attention)),
    Case("diff_transformer_scores", _fn(forms.diff_transformer_scores)),
    Case("cpmant_scalar_tensor_fills", lambda dt: (forms.cpmant_scalar_tensor_fills,
                                                   _qkv(dt) + [_rows_without_keys()])),
    Case("zeroed_probabilities_inf_with_bias", lambda dt: (forms.zeroed_probabilities_inf_with_bias,
                                                           _qkv(dt) + [_rows_without_keys(), _bias_rows_of_min(dt)])),
    Case("inkling_float_cast_sinks", lambda dt: (forms.inkling_float_cast_sinks,
                                                 _qkv(dt) + [_t(B, H, L, 1, dtype=dt)])),
    Case("nested_region_attention", _fn(forms.nested_region_attention)),
    Case("output_added_in_place", lambda dt: (forms.output_added_in_place, _qkv(dt) + [_t(B, H, L, D, dtype=dt)])),
    Case("output_view_scaled_in_place", lambda dt: (forms.output_view_scaled_in_place,
                                                    _qkv(dt) + [_t(B, H, L, D, dtype=dt)])),
    Case("where_zeroed_probabilities", lambda dt: (forms.where_zeroed_probabilities,
                                                   _qkv(dt) + [_rows_without_keys()])),
    Case("botnet_relative_positions", _mod(forms.BoTNetRelPos, lambda dt: [
        _t(B * H, 12, D, dtype=dt), _t(B * H, 12, D, dtype=dt), _t(B * H, 12, D, dtype=dt)])),
    Case("differential_two_maps", _fn(forms.differential_two_maps)),
    Case("differential_two_softmaxes", _fn(forms.differential_two_softmaxes), sites=2),
    Case("differential_attention", _mod(forms.DifferentialAttention, lambda dt: [
        _t(B, H, L, D, dtype=dt), _t(B, H, L, D, dtype=dt), _t(B, H // 2, L, 2 * D, dtype=dt)])),
    # the content and positional maps mixed per head, renormalized ([Note: a mixture of maps renormalized])
    Case("convit_gated_positional", _mod(forms.ConViTGatedPositional, lambda dt: _qkv(dt, lq=25, lk=25),
                                         heads=H, n=25)),
    Case("conformer_relpos_zeroed_probabilities", lambda dt: (
        forms.conformer_relpos_zeroed_probabilities,
        _qkv(dt) + [_rows_without_keys().long(), _bias_rows_of_own_min(dt)])),
    Case("conformer_relpos_zeroed_where", lambda dt: (
        forms.conformer_relpos_zeroed_where, _qkv(dt) + [_rows_without_keys(), _t(B, H, L, L, dtype=dt)])),
    Case("sewd_heads_view_zeroed", lambda dt: (forms.sewd_heads_view_zeroed, _qkv(dt) + [_rows_without_keys()])),
    Case("scores_viewed_then_masked_in_place", _fn(forms.scores_viewed_then_masked_in_place)),
    Case("probabilities_copy_rows_zeroed_in_place", _fn(forms.probabilities_copy_rows_zeroed_in_place)),
    Case("flamingo_masked_cross_attention", _mod(forms.FlamingoMaskedCrossAttention, lambda dt: [
        _t(B, L, H * D, dtype=dt), _t(B, 3, 4, H * D, dtype=dt), _media_locations()])),
    Case("query_padding_rows_multiplied", lambda dt: (forms.query_padding_rows_multiplied,
                                                      _qkv(dt) + [_keep_mask()])),
    Case("rows_kept_by_where", lambda dt: (forms.rows_kept_by_where, _qkv(dt) + [
        _keep_mask()[:, None, :, None]])),
    Case("rows_zeroed_where_zeros_like", lambda dt: (forms.rows_zeroed_where_zeros_like, _qkv(dt) + [
        _keep_mask()[:, None, :, None]])),
    Case("funnel_relative_shift_scaled_in_place", lambda dt: (
        forms.funnel_relative_shift_scaled_in_place,
        [_t(B, L, H, D, dtype=dt), _t(B, L, H, D, dtype=dt), _t(B, L, H, D, dtype=dt), _t(2 * L, H, D, dtype=dt),
         torch.ones(L, L, dtype=dt).index_fill_(0, torch.tensor([0]), 0).index_fill_(1, torch.tensor([0]), 0)])),
    # [Note: scores in another layout]
    Case("transformer_xl_rel_attention", _mod(forms.TransformerXLRelAttention, lambda dt: [
        _t(7, B, H, D, dtype=dt), _t(L, B, H, D, dtype=dt), _t(L, B, H, D, dtype=dt), _t(L, H, D, dtype=dt),
        torch.ones(7, L, dtype=torch.bool).triu(1 + L - 7)[:, :, None]])),
    Case("xlnet_rel_attn_core", _mod(forms.XLNetRelAttnCore, lambda dt: [
        _t(7, B, H, D, dtype=dt), _t(L, B, H, D, dtype=dt), _t(L, B, H, D, dtype=dt), _t(7 + L, B, H, D, dtype=dt),
        _xlnet_segments(7, L, dt), _xlnet_mask(7, L, dt)])),
    Case("scores_query_key_batch_head", lambda dt: (forms.scores_query_key_batch_head, [
        _t(7, B, H, D, dtype=dt), _t(L, B, H, D, dtype=dt), _t(L, B, H, D, dtype=dt)])),
    Case("scores_heads_between", lambda dt: (forms.scores_heads_between, [
        _t(B, 7, H, D, dtype=dt), _t(B, L, H, D, dtype=dt), _t(B, L, H, D, dtype=dt)])),
    Case("scores_keys_second_last", _fn(forms.scores_keys_second_last, lq=7)),
    Case("scores_keys_second_last_permuted", _fn(forms.scores_keys_second_last_permuted, lq=7)),
    Case("scores_keys_second_last_vT", lambda dt: (forms.scores_keys_second_last_vT, _qkv(dt) + [_keep_mask()])),
    Case("score_threshold_mask", _fn(forms.score_threshold_mask)),
    Case("score_piecewise_mod", _fn(forms.score_piecewise_mod, lq=7)),
    # captured factors of the score that are not finite where a tile past the
    # ends reads them as 0 (1 / tau), and other terms of research code
    Case("per_query_temperature_divisor", lambda dt: (
        forms.per_query_temperature_divisor, _qkv(dt) + [(torch.rand(B, H, L) + 2).to(dt).requires_grad_()])),
    Case("per_key_weight_divisor", lambda dt: (
        forms.per_key_weight_divisor, _qkv(dt) + [(torch.rand(B, 1, 1, L) + 0.5).to(dt).requires_grad_()])),
    Case("tome_proportional_attention", lambda dt: (
        forms.tome_proportional_attention, _qkv(dt) + [torch.randint(1, 4, (B, L, 1)).to(dt)])),
    Case("forgetting_attention", _mod(forms.ForgettingAttention, lambda dt: _qkv(dt) + [_t(B, H, L, D, dtype=dt)])),
    Case("kerple_log_attention", _mod(forms.KerpleLogAttention, lambda dt: _qkv(dt))),
    Case("packed_document_mask", lambda dt: (forms.packed_document_mask, _qkv(dt) + [
        torch.tensor([[0] * 5 + [1] * (L - 5), [0] * 2 + [1] * 3 + [2] * (L - 5)])])),
    # softmax plus one (a sink of logit 0) and a learned sink, written out
    Case("softmax_one_clamped", lambda dt: (forms.softmax_one_clamped, _qkv(dt) + [_rows_without_keys()])),
    Case("softmax_one_unshifted", _fn(forms.softmax_one_unshifted)),
    Case("zero_sink_column", _fn(forms.zero_sink_column)),
    Case("zero_sink_padded", _fn(forms.zero_sink_padded)),
    Case("learned_sink_written_out", _mod(forms.LearnedSinkWrittenOut, lambda dt: _qkv(dt))),
    # the normalization deferred past P·V ([Note: probabilities normalized after P·V])
    Case("normalized_after_pv", _fn(forms.normalized_after_pv)),
    Case("normalized_after_pv_einsum", _fn(forms.normalized_after_pv_einsum)),
    # scores summed from two products, joined into one ([Note: scores summed from two products]):
    # long enough that the scores outweigh the joined operands ([Note: joined only where it saves memory])
    Case("deepseek_mla_absorbed", lambda dt: (forms.deepseek_mla_absorbed, [
        _t(B, 33, H, D, dtype=dt), _t(B, 33, H, 8, dtype=dt), _t(B, 33, D, dtype=dt), _t(B, 33, 8, dtype=dt),
        torch.full((33, 33), float("-inf")).triu(1).to(dt)]), kv_heads=1),
    Case("lilt_text_and_layout", lambda dt: (forms.lilt_text_and_layout, _qkv(dt, lq=50, lk=50) + _qkv(
        dt, lq=50, lk=50, d=8) + [_additive(_keep_mask(lk=50), dt)[:, None, None, :]]), sites=2),
    Case("two_products_subtracted", lambda dt: (forms.two_products_subtracted, _qkv(dt, lq=50, lk=50) + [
        _t(B, H, 50, 8, dtype=dt), _t(B, 1, 50, 8, dtype=dt)])),
    Case("three_products", lambda dt: (forms.three_products, _qkv(dt, lq=57, lk=57) + [
        _t(B, H, 57, 8, dtype=dt), _t(B, H, 57, 8, dtype=dt), _t(B, H, 57, 4, dtype=dt), _t(B, H, 57, 4, dtype=dt)])),
    Case("tupe_untied_positions", _mod(forms.TupeUntiedPositions, lambda dt: _qkv(dt, lq=50, lk=50))),
    # a decode step: the second product is smaller than the key operands the join would copy
    Case("two_products_decode_step", lambda dt: (forms.two_products_subtracted, _qkv(dt, lq=1, lk=50) + [
        _t(B, H, 1, 8, dtype=dt), _t(B, 1, 50, 8, dtype=dt)])),
]
RESEARCH_BY_ID = {c.id: c for c in RESEARCH_CASES}


@pytest.mark.parametrize("case", RESEARCH_CASES, ids=[c.id for c in RESEARCH_CASES])
def test_research_form_fp32_forward_backward(case):
    check_case(case)


@pytest.mark.parametrize("case_id", ["per_query_temperature_divisor", "per_key_weight_divisor",
                                     "tome_proportional_attention", "forgetting_attention",
                                     "kerple_log_attention", "packed_document_mask",
                                     "softmax_one_clamped", "learned_sink_written_out",
                                     "normalized_after_pv", "deepseek_mla_absorbed", "lilt_text_and_layout",
                                     "two_products_subtracted", "tupe_untied_positions"])
def test_captured_terms_on_the_kernels_forward_backward(case_id):
    """Captured terms of the score through the generated kernels (Triton's
    interpreter on CPU), float32 forward and backward, at a length that is not
    a multiple of the tiles: a tile past the ends reads a captured tensor as 0,
    and 1 / 0 there must not reach dK, dV or a captured gradient."""
    with _implementation(True):
        check_case(RESEARCH_BY_ID[case_id])


@pytest.mark.parametrize("case_id,dtype", [
    ("gpt_neox_upcast_where_buffer", "fp16"),
    ("gptj_upcast_where_tril", "bf16"),
    ("lucidrains_masked_amax_detach", "bf16"),
    ("fairseq_bmm_key_padding", "fp16"),
    ("hf_extended_mask_in_graph", "bf16"),
    ("alibi_plus_extended_mask", "bf16"),
    ("alibi_plus_extended_mask", "fp16"),
    ("bert_head_mask", "bf16"),
    ("bart_layer_head_mask", "fp16"),
    ("cogview_pb_relax", "fp16"),
    ("dense_gat_ones_like_fill", "bf16"),
    ("local_band_with_global_tokens", "bf16"),
    ("xlm_expand_as_in_place", "bf16"),
    ("gpt_oss_sinks", "bf16"),
    ("sink_first_behind_cast", "bf16"),
    ("mvitv2_relpos_slice_assigned", "bf16"),
    ("mvitv2_relpos_cls_token", "bf16"),
    ("mvitv2_video_relpos_cls_token", "bf16"),
    ("mvitv2_slowfast_relpos_cls_token", "bf16"),
    ("padding_by_boolean_index_assignment", "fp16"),
    ("masks_by_slice_assignment", "bf16"),
    ("slices_written_in_place", "bf16"),
    ("sinks_with_empty_rows", "fp16"),
    ("granite_sink_scale", "bf16"),
    ("nan_to_num_probabilities", "bf16"),
    ("espnet_zeroed_probabilities", "bf16"),
    ("espnet_zeroed_probabilities", "fp16"),
    ("deberta_xsoftmax", "bf16"),
    ("where_zeroed_probabilities", "fp16"),
    ("conformer_relpos_zeroed_probabilities", "bf16"),
    ("differential_attention", "bf16"),
    ("differential_two_maps", "fp16"),
    ("differential_two_softmaxes", "bf16"),
    ("convit_gated_positional", "bf16"),
    ("botnet_relative_positions", "bf16"),
    ("conformer_relpos_zeroed_where", "fp16"),
    ("diff_transformer_scores", "bf16"),
    ("inkling_float_cast_sinks", "bf16"),
    ("flamingo_masked_cross_attention", "bf16"),
    ("query_padding_rows_multiplied", "fp16"),
    ("rows_kept_by_where", "bf16"),
    ("rows_zeroed_where_zeros_like", "fp16"),
    ("transformer_xl_rel_attention", "bf16"),
    ("xlnet_rel_attn_core", "bf16"),
    ("scores_heads_between", "fp16"),
    ("scores_keys_second_last_vT", "fp16"),
    ("score_threshold_mask", "bf16"),
    ("score_piecewise_mod", "fp16"),
    ("softmax_one_clamped", "bf16"),
    ("zero_sink_padded", "fp16"),
    ("learned_sink_written_out", "bf16"),
    ("normalized_after_pv", "bf16"),
    ("deepseek_mla_absorbed", "bf16"),
    ("lilt_text_and_layout", "fp16"),
    ("two_products_subtracted", "bf16"),
    ("tupe_untied_positions", "fp16"),
])
@pytest.mark.parametrize("on_kernels", [False, True], ids=["reference", "kernels"])
def test_research_form_low_precision_forward(case_id, dtype, on_kernels):
    with _implementation(on_kernels):
        check_case(RESEARCH_BY_ID[case_id], dtype={"bf16": BF16, "fp16": F16}[dtype], backward=False)


@pytest.mark.parametrize("on_kernels", [False, True], ids=["reference", "kernels"])
@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case_id", ["left_padding_additive_neg1e4", "left_padding_additive_neg1e4_upcast"])
def test_rows_of_moderate_additive_fills(case_id, dtype, on_kernels):
    """A -1e4 additive mask in bfloat16/float16 with left padding under a
    causal mask: eager's padded rows are uniform (-1e4 absorbs the scores in
    the scores' dtype), and so are ours: the scores are rounded to that dtype
    before the softmax (``AttentionSpec.rounds_scores``), on the reference
    path and the generated kernels; forward and backward.  Also where the
    softmax is upcast by hand (``s.float().softmax(-1)``): the scores' dtype is
    the one before the cast."""
    with _implementation(on_kernels):
        check_case(RESEARCH_BY_ID[case_id], dtype=dtype)
        (row,) = attn_compiler.report().fused
        spec = AttentionSpec.loads(row.features["spec"])
        assert spec.score_dtype == str(dtype).removeprefix("torch.") and spec.rounds_scores


@pytest.mark.parametrize("case_id,mask", [
    ("gpt_neox_upcast_where_buffer", "causal"),
    ("gpt_neox_upcast_where_buffer_cache", "causal(offset=8)"),   # Lq 5, Lk 13: bottom-right aligned
    ("gptj_upcast_where_tril", "causal"),
    ("inplace_div_then_masked_fill_causal", "causal"),
])
def test_research_causal_forms_report_causal(case_id, mask):
    check_case(RESEARCH_BY_ID[case_id], backward=False)
    (row,) = [r for r in attn_compiler.report() if r.status == "fused"]
    assert row.features["mask"] == mask, row.features


def test_swinv2_logit_scale_gets_gradient():
    """The learned logit scale is a parameter of the fused site: its gradient
    flows (and matches eager) through the op."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    m = forms.SwinV2TimmCosine()
    m64 = copy.deepcopy(m).double()
    x = _t(B, 12, 64)
    compiled = torch.compile(m, backend=attn_compiler.backend(inner="aot_eager"))
    out = compiled(x)
    assert_fused(attn_compiler.report(), 1)
    cot = torch.randn(out.shape, dtype=torch.float64)
    (g_ours,) = torch.autograd.grad(out, [m.logit_scale], cot.float())
    (g_eager,) = torch.autograd.grad(m(x), [m.logit_scale], cot.float())
    (g_gold,) = torch.autograd.grad(m64(_to64(x)), [m64.logit_scale], cot)
    assert g_ours.abs().sum() > 0, "no gradient reached the logit scale"
    golden_check(g_ours, g_eager, g_gold, name="dlogit_scale")


def _graph_capture():
    """(graphs, inner compiler keeping the graphs our pass hands it), after a reset."""
    graphs = []

    def inner(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    attn_compiler.reset()
    return graphs, inner


def _normalized_after_pv_top_k(q, k, v):
    """The normalization deferred past P·V under a top-k mask (declined)."""
    s = q @ k.transpose(-1, -2)
    s = s.masked_fill(s < s.topk(4, dim=-1).values[..., -1:], float("-inf"))
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return (e @ v) / e.sum(-1, keepdim=True)


@pytest.mark.parametrize("declined", [False, True], ids=["fused", "declined"])
def test_normalized_after_pv_fused_or_as_written(declined):
    """[Note: probabilities normalized after P·V] A fused site replaces the
    deferred normalization with the op; a declined one runs the user's nodes
    as written: the product of the unnormalized e, then the division (the
    exact eager numbers)."""
    graphs, inner = _graph_capture()
    q, k, v = _qkv(F32)
    fn = _normalized_after_pv_top_k if declined else forms.normalized_after_pv
    out = torch.compile(fn, backend=attn_compiler.backend(inner=inner))(q, k, v)
    rep = attn_compiler.report()
    nodes = [n for gm in graphs for n in gm.graph.nodes]
    if declined:
        torch.testing.assert_close(out, fn(q, k, v), rtol=0, atol=0)
        assert len(rep.declined) == 1 and not rep.fused, str(rep)
        matmul = [n for n in nodes if "matmul" in str(getattr(n.target, "__name__", n.target))]
        assert len(matmul) == 2 and all(n.args[0].target is not operator.truediv for n in matmul)
    else:
        torch.testing.assert_close(out, fn(q, k, v))
        assert len(rep.fused) == 1 and not rep.declined, str(rep)
        assert not any(n.target is operator.truediv for n in nodes)


@pytest.mark.parametrize("case_id", ["inplace_masked_fill_", "xlm_expand_as_in_place", "inplace_iadd_bias",
                                     "granite_sink_scale"])
def test_in_place_writes_to_the_scores_leave_with_them(case_id):
    """An in-place op on a fused site's own scores (``scores.masked_fill_``,
    ``scores += bias``) is erased with the site: nothing reads those scores
    any more, and keeping the write would keep the Lq x Lk product alive.  So
    is a ``logsumexp`` of the scores, read from the op's lse instead."""
    graphs, inner = _graph_capture()
    fn, args = (BY_ID.get(case_id) or RESEARCH_BY_ID[case_id]).build(F32)
    torch.compile(fn, backend=attn_compiler.backend(inner=inner))(*args)
    assert_fused(attn_compiler.report(), 1)
    left = [n for gm in graphs for n in gm.graph.nodes if n.op in ("call_function", "call_method")
            and (str(getattr(n.target, "__name__", n.target)) in ("matmul", "masked_fill_", "iadd", "add_",
                                                                  "logsumexp")
                 or "matmul" in str(n.target))]
    assert not left, [n.format_node() for n in left]


@pytest.mark.parametrize("case_id", ["gpt_oss_sinks", "sink_first_behind_cast", "sinks_with_empty_rows",
                                     "granite_sink_scale",
                                     "nan_to_num_probabilities", "espnet_zeroed_probabilities",
                                     "deberta_xsoftmax", "where_zeroed_probabilities",
                                     "inkling_float_cast_sinks", "zeroed_probabilities_inf_with_bias",
                                     "conformer_relpos_zeroed_probabilities", "conformer_relpos_zeroed_where",
                                     "sewd_heads_view_zeroed", "flamingo_masked_cross_attention",
                                     "query_padding_rows_multiplied", "rows_kept_by_where",
                                     "rows_zeroed_where_zeros_like"])
def test_sinks_on_the_kernels_forward_backward(case_id):
    """Attention sinks through the generated kernels (Triton's interpreter on
    CPU), float32 forward and backward: the sink's gradient comes through the
    op's lse (delta - dlse), and rows that keep no key give 0 and no nan."""
    with _implementation(True):
        check_case(RESEARCH_BY_ID[case_id])


WRITTEN_PROBABILITIES = [
    Case("sewd_heads_view_zeroed_in_place", lambda dt: (forms.sewd_heads_view_zeroed_in_place,
                                                        _qkv(dt, grad=False) + [_rows_without_keys().long()])),
    Case("sewd_xsoftmax_in_place", lambda dt: (forms.sewd_xsoftmax_in_place,
                                               _qkv(dt, grad=False) + [_rows_without_keys()])),
    Case("probabilities_scaled_in_place_twice", lambda dt: (
        forms.probabilities_scaled_in_place_twice,
        _qkv(dt, grad=False) + [_rows_without_keys(), _t(1, H, 1, 1, dtype=dt, grad=False)])),
]


@pytest.mark.parametrize("on_kernels", [False, True], ids=["reference", "kernels"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", WRITTEN_PROBABILITIES, ids=[c.id for c in WRITTEN_PROBABILITIES])
def test_probabilities_written_in_place(case, dtype, on_kernels):
    """In-place writes to the softmax's output (SEW-D's XSoftmax, whose
    forward runs as written when nothing needs a gradient) become out-of-place
    ops that the site takes in.  Forward only: eager's softmax backward
    refuses an output written in place."""
    with _implementation(on_kernels):
        check_case(case, dtype=dtype, backward=False)


@pytest.mark.parametrize("on_kernels", [False, True], ids=["reference", "kernels"])
def test_input_term_written_in_place_stays_written(on_kernels):
    """``p = pos.view(...); p *= keep`` on an input: the write is kept in the
    compiled graph (``operator.imul`` is an in-place op, not dead code once the
    site is fused), so the input changes as in eager and the op reads it after
    the write."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    pos = torch.randn(B * H * L * L)
    keep = (torch.rand(L, L) > 0.3).float()
    pos_ours, pos_eager = pos.clone(), pos.clone()
    torch._dynamo.reset()
    attn_compiler.reset()
    with _implementation(on_kernels):
        ours = torch.compile(forms.input_term_scaled_in_place, backend=attn_compiler.backend(inner="aot_eager"))(
            q, k, v, pos_ours, keep)
    eager = forms.input_term_scaled_in_place(q, k, v, pos_eager, keep)
    assert_fused(attn_compiler.report(), 1)
    torch.testing.assert_close(pos_ours, pos_eager)
    torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-5)


def test_mvitv2_relative_positions_on_the_kernels_forward_backward():
    """MViTv2's relative positions, assigned back into all of the scores,
    through the generated kernels (the interpreter on CPU): read along the
    split key axis (kv // kw, kv % kw) with their gradients, float32."""
    with _implementation(True):
        check_case(RESEARCH_BY_ID["mvitv2_relpos_slice_assigned"])
    spec = AttentionSpec.loads(attn_compiler.report().fused[0].features["spec"])
    assert sorted(c.kv_map for c in spec.captured) == [("div", 3), ("mod", 3)], spec.captured


def test_mvitv2_cls_token_relative_positions_on_the_kernels_forward_backward():
    """MViTv2 with a cls token: the relative positions are assigned to the
    scores without the cls row and column ([Note: scores assigned in part]).
    On the generated kernels, float32, forward and every gradient: the height
    term read at the query shifted by one (padded in front), the key terms at
    max(kv - 1, 0) // kw and (kv - 1) % kw."""
    with _implementation(True):
        check_case(RESEARCH_BY_ID["mvitv2_relpos_cls_token"])
    spec = AttentionSpec.loads(attn_compiler.report().fused[0].features["spec"])
    assert sorted(c.kv_map for c in spec.captured) == [("div", 3, -1), ("mod", 3, 2)], spec.captured


def test_slices_written_in_place_on_the_kernels_forward_backward():
    """Slices of the scores and of a bias written by in-place methods (written
    back as assignments, [Note: in-place writes made out of place]): the
    (Lq - 1, Lk - 1) bias padded by one query and one key, with its gradient,
    on the generated kernels, float32."""
    with _implementation(True):
        check_case(RESEARCH_BY_ID["slices_written_in_place"])


def test_mvitv2_slowfast_relative_positions_on_the_kernels_forward_backward():
    """SlowFast's video MViTv2: the scores viewed with three factors a side,
    (B, H, qt, qh, qw, kt, kh, kw), twice (spatial terms, then the temporal
    one), each written back to all but the cls row and column.  The terms
    are read through the key's three factors; on the generated kernels,
    float32, forward and every gradient."""
    with _implementation(True):
        check_case(RESEARCH_BY_ID["mvitv2_slowfast_relpos_cls_token"])
    spec = AttentionSpec.loads(attn_compiler.report().fused[0].features["spec"])
    assert sorted(c.kv_map for c in spec.captured) == [("div", 6, -1), ("divmod", 3, 2, -1), ("mod", 3, 2)], \
        spec.captured


def test_mvitv2_video_relative_positions_on_the_kernels_forward_backward():
    """torchvision's video MViTv2: the time, height and width terms summed
    into one (B, H, Nq - 1, Nk - 1) tensor through an 8-D broadcast and added
    to all but the cls row and column.  The op reads the three terms, not
    that tensor: the key axis split in three, (kv - 1) // (kh*kw),
    ((kv - 1) // kw) % kh and (kv - 1) % kw; the query's three factors one
    query axis padded by one.  On the generated kernels, float32, forward and
    every gradient."""
    with _implementation(True):
        check_case(RESEARCH_BY_ID["mvitv2_video_relpos_cls_token"])
    spec = AttentionSpec.loads(attn_compiler.report().fused[0].features["spec"])
    assert sorted(c.kv_map for c in spec.captured) == [("div", 6, -1), ("divmod", 3, 2, -1), ("mod", 3, 2)], \
        spec.captured


@pytest.mark.parametrize("case_id,maps", [
    ("openfold_msa_row_pair_bias", [("div", 2), ("mod", 2)]),
    ("longt5_local_blocks", [("div", 2), ("mod", 2)]),
])
def test_split_heads_on_the_kernels_forward_backward(case_id, maps):
    """5-D scores (B, X, Y, Lq, Lk) run as X * Y heads; a mask or bias read
    along one of X, Y ([Note: split head axes]) is read at h // Y or h % Y by
    the generated kernels (the interpreter on CPU), with the bias's gradient
    summed over the heads that share an entry, float32."""
    with _implementation(True):
        check_case(BY_ID[case_id])
    spec = AttentionSpec.loads(attn_compiler.report().fused[0].features["spec"])
    assert sorted(c.h_map for c in spec.captured if c.h_map) == maps, spec.captured
    assert [c.requires_grad for c in spec.captured if c.h_map == ("mod", 2)] == [True], spec.captured


def test_botnet_relative_positions_on_the_kernels_forward_backward():
    """BoTNet's relative positions (timm's rel_logits_1d: pads, reshapes, a
    tiled and permuted term per axis) through the generated kernels, float32:
    read along the split key axis, the height term's query split (q % w,
    q // w) merged back into one query axis, with their gradients."""
    with _implementation(True):
        check_case(RESEARCH_BY_ID["botnet_relative_positions"])
    spec = AttentionSpec.loads(attn_compiler.report().fused[0].features["spec"])
    assert sorted(c.kv_map for c in spec.captured) == [("div", 4), ("mod", 4)], spec.captured
    assert all(c.dims == (False, True, True, True) for c in spec.captured), spec.captured   # (B*H, N, N) scores: one head axis


@pytest.mark.parametrize("on_kernels", [False, True], ids=["reference", "kernels"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_sam_decomposed_relative_positions_inference(dtype, on_kernels):
    """SAM's decomposed relative positions (under no_grad, as SAM is run):
    the height and width terms stay (B*H, N, kh) and (B*H, N, kw) tensors that
    the op reads at kv // kw and kv % kw ([Note: split key axes]); no
    (N, N) bias is built; golden-relative to eager."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    attn_compiler.reset()
    m = forms.SamDecomposedRelPos().to(dtype)
    qkv = _qkv(dtype, lq=15, lk=15)
    with torch.no_grad(), _implementation(on_kernels):
        ours = torch.compile(m, backend=attn_compiler.backend(inner="aot_eager"))(*qkv)
        eager = m(*qkv)
        golden = copy.deepcopy(m).double()(*[_to64(t) for t in qkv])
    (row,) = attn_compiler.report().fused
    spec = AttentionSpec.loads(row.features["spec"])
    assert sorted(c.kv_map for c in spec.captured) == [("div", 5), ("mod", 5)], spec.captured
    assert all(c.dims[1:] == (True, True, True) for c in spec.captured), spec.captured
    golden_check(ours, eager, golden, name="sam out")


@pytest.mark.parametrize("on_kernels", [False, True], ids=["reference", "kernels"])
def test_sam_decomposed_relative_positions_training(on_kernels):
    """In training the height and width terms take their gradient (each key's
    share added at kv // kw or kv % kw): the relative-position tables and q,
    k, v golden-relative to eager."""
    case = Case("sam_training", lambda dt: (forms.SamDecomposedRelPos().to(dt), _qkv(dt, lq=15, lk=15)))
    with _implementation(on_kernels):
        check_case(case)

def _differential_top_k(q, k, v):
    """forms.differential_two_maps with a top-k mask (declined: the mask reads
    a reduction of the scores)."""
    b, h, n, _ = q.shape
    s = q @ k.transpose(-1, -2)
    s = s.masked_fill(s < s.topk(4, dim=-1).values[..., -1:], float("-inf"))
    w = s.softmax(-1).view(b, h // 2, 2, n, n)
    return (w[:, :, 0] - 0.3 * w[:, :, 1]) @ v[:, : h // 2]


def _two_softmaxes_top_k(q, k, v):
    """forms.differential_two_softmaxes' combination, both maps under a top-k
    mask (declined)."""
    def top_k_softmax(s):
        return s.masked_fill(s < s.topk(4, dim=-1).values[..., -1:], float("-inf")).softmax(-1)
    a1 = top_k_softmax(q[:, :2] @ k[:, :2].transpose(-1, -2))
    a2 = top_k_softmax(q[:, 2:] @ k[:, 2:].transpose(-1, -2))
    return (a1 - 0.6 * a2) @ v[:, :2]


def test_two_declined_softmaxes_keep_their_one_product():
    """[Note: maps combined before P·V] Two maps whose sites are both declined
    run as written: one P·V of their combination, not two."""
    graphs, inner = _graph_capture()
    q, k, v = _qkv(F32)
    out = torch.compile(_two_softmaxes_top_k, backend=attn_compiler.backend(inner=inner))(q, k, v)
    torch.testing.assert_close(out, _two_softmaxes_top_k(q, k, v))
    rep = attn_compiler.report()
    assert len(rep.declined) == 2 and not rep.fused, [(r.status, r.reason) for r in rep.declined]
    matmuls = [n for gm in graphs for n in gm.graph.nodes if "matmul" in str(getattr(n.target, "__name__", n.target))]
    assert len(matmuls) == 3, [n.format_node() for n in matmuls]


@pytest.mark.parametrize("declined", [False, True], ids=["fused", "declined"])
def test_differential_maps_run_as_one_site_or_as_written(declined):
    """[Note: maps combined before P·V] A fused differential site is one op
    over all heads, its two halves combined after it; a declined one runs the
    user's nodes as written (the view, the two maps, their difference and one
    P·V), not the distributed form."""
    graphs, inner = _graph_capture()
    fn = _differential_top_k if declined else forms.differential_two_maps
    q, k, v = _qkv(F32)
    out = torch.compile(fn, backend=attn_compiler.backend(inner=inner))(q, k, v)
    torch.testing.assert_close(out, fn(q, k, v))
    rep = attn_compiler.report()
    rows = rep.fused + rep.declined
    assert [r.status for r in rows] == ["declined" if declined else "fused"], [(r.status, r.reason) for r in rows]
    targets = [str(getattr(n.target, "__name__", n.target)) for gm in graphs for n in gm.graph.nodes]
    assert ("repeat_pairs" in targets) is not declined, targets
    assert targets.count("matmul") + targets.count("__matmul__") == (2 if declined else 0), targets


def _differential_per_head_lambda(q, k, v):
    """Paired maps combined with ``+`` and a per-head lambda of (1, H/2, 1, 1)."""
    b, h, n, _ = q.shape
    w = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1).view(b, h // 2, 2, n, n)
    lam = torch.linspace(0.2, 0.8, h // 2, dtype=q.dtype).view(1, -1, 1, 1)
    return (w[:, :, 0] + (-lam) * w[:, :, 1]) @ v[:, : h // 2]


def _two_softmaxes_one_declined(q, k, v):
    """Two maps, the first plain, the second under a top-k mask: the first's
    site fuses, the second's stays a product of its own."""
    s2 = q[:, 2:] @ k[:, 2:].transpose(-1, -2)
    a2 = s2.masked_fill(s2 < s2.topk(4, dim=-1).values[..., -1:], float("-inf")).softmax(-1)
    a1 = (q[:, :2] @ k[:, :2].transpose(-1, -2) * 0.25).softmax(-1)
    return (a1 - a2 * 0.5) @ v[:, :2]


@pytest.mark.parametrize("fn, fused", [(_differential_per_head_lambda, 1), (_two_softmaxes_one_declined, 1)],
                         ids=["per_head_lambda_added", "two_softmaxes_one_declined"])
def test_differential_variants_match_eager(fn, fused):
    """[Note: maps combined before P·V] variants: a per-head lambda with
    ``+``; two softmaxes of which only one site fuses (the distributed form
    stays: the fused site's op and the other's own product)."""
    torch._dynamo.reset()
    attn_compiler.reset()
    q, k, v = _qkv(F32)
    out = torch.compile(fn, backend=attn_compiler.backend(inner="aot_eager"))(q, k, v)
    golden = fn(*[_to64(t) for t in (q, k, v)])
    golden_check(out, fn(q, k, v), golden, name="out")
    assert len(attn_compiler.report().fused) == fused


def test_zeros_like_of_the_probabilities_leaves_with_them():
    """``where(rows, P, zeros_like(P))``: the zeros are made from P's shape,
    so after fusing neither the softmax nor P itself is left in the graph."""
    graphs, inner = _graph_capture()
    fn, args = RESEARCH_BY_ID["rows_zeroed_where_zeros_like"].build(F32)
    torch.compile(fn, backend=attn_compiler.backend(inner=inner))(*args)
    assert_fused(attn_compiler.report(), 1)
    left = [n for gm in graphs for n in gm.graph.nodes
            if "softmax" in str(n.target) or "zeros_like" in str(n.target)]
    assert not left, [n.format_node() for n in left]


@pytest.mark.parametrize("case_id,head_dim", [("deepseek_mla_absorbed", D + 8), ("two_products_subtracted", D + 8),
                                              ("lilt_text_and_layout", D + 8), ("three_products", D + 12),
                                              ("tupe_untied_positions", D + 8)])
def test_two_products_joined_into_one(case_id, head_dim):
    """[Note: scores summed from two products]  The op's Q·Kᵀ has the two
    head dims joined, and nothing of the scores' size is captured: the only
    captured tensor is a mask, never the second product."""
    check_case(RESEARCH_BY_ID[case_id], backward=False)
    for row in attn_compiler.report().fused:
        assert row.features["shapes"]["q"][-1] == head_dim == row.features["shapes"]["k"][-1], row.features
        spec = AttentionSpec.loads(row.features["spec"])
        assert len(spec.captured) <= 1, spec.captured


def test_decode_step_keeps_the_second_product():
    """[Note: joined only where it saves memory]  One query row against 50
    keys: the second product (B, H, 1, 50) is smaller than the key operands
    the join would copy, so it stays a captured term of the scores' shape."""
    check_case(RESEARCH_BY_ID["two_products_decode_step"], backward=False)
    row, = attn_compiler.report().fused
    assert row.features["shapes"]["q"][-1] == D, row.features
    spec = AttentionSpec.loads(row.features["spec"])
    assert len(spec.captured) == 1, spec.captured


def _sum_of_products_escaping(q, k, v, q2, k2):
    s = torch.matmul(q, k.transpose(-1, -2)) * 0.25 + torch.matmul(q2, k2.transpose(-1, -2)) / 3
    p = s.softmax(-1)
    return p @ v, p


def test_two_products_as_written_when_declined():
    """A sum of two products whose probabilities are also returned: the site
    is declined, and the user's sum runs as written (the joined product is
    taken back), so the output is eager's to the bit."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    attn_compiler.reset()
    args = _qkv(F32, lq=50, lk=50) + [_t(B, H, 50, 8), _t(B, H, 50, 8)]
    graphs = []

    def inner(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    out, p = torch.compile(_sum_of_products_escaping, backend=attn_compiler.backend(inner=inner))(*args)
    eo, ep = _sum_of_products_escaping(*args)
    rows = list(attn_compiler.report())
    assert len(rows) == 1 and rows[0].status == "declined", [(r.status, r.reason) for r in rows]
    assert torch.equal(out, eo) and torch.equal(p, ep)
    assert graphs and not any(n.target is torch.cat for g in graphs for n in g.graph.nodes)


@pytest.mark.parametrize("case_id", ["two_products_subtracted", "tupe_untied_positions"])
def test_two_products_joined_under_dynamic_true(case_id):
    """[Note: scores summed from two products] under ``dynamic=True``: the
    join fixes no length in the graph (it reads symbolic sizes by their hints
    and takes broadcast sizes from the other operand at run time), so the
    function form compiles once for three lengths; each length golden-
    relative, every site joined (no captured product)."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    attn_compiler.reset()
    compiles = []
    backend = attn_compiler.backend(inner="aot_eager")

    def counting(gm, example_inputs):
        compiles.append(gm)
        return backend(gm, example_inputs)
    if case_id == "tupe_untied_positions":
        fn = forms.TupeUntiedPositions(n=80)
        make = lambda n: _qkv(F32, lq=n, lk=n)                                       # noqa: E731
    else:
        fn = forms.two_products_subtracted
        make = lambda n: _qkv(F32, lq=n, lk=n) + [_t(B, H, n, 8), _t(B, 1, n, 8)]   # noqa: E731
    compiled = torch.compile(fn, backend=counting, dynamic=True)
    fn64 = copy.deepcopy(fn).double() if isinstance(fn, torch.nn.Module) else fn
    for n in (50, 61, 77):
        args = make(n)
        golden_check(compiled(*args), fn(*args), fn64(*[_to64(a) for a in args]), name=f"{case_id} n={n}")
    # dynamo restarts TUPE's first compile under dynamic=True, with or without
    # the join (the abandoned graph is not reported); then no compile per length
    assert len(compiles) == (2 if case_id == "tupe_untied_positions" else 1)
    rows = attn_compiler.report().fused
    assert len(rows) == 1
    assert not any(AttentionSpec.loads(r.features["spec"]).captured for r in rows)


def _mixture_renormalized(q, k, v, pos, g, p=0.0, drop_map=False):
    """ConViT's mixture (forms.ConViTGatedPositional) as a function: the
    content softmax (optionally behind a dropout of ``p``) and a positional
    softmax mixed per head, divided by the mixture's row sums, a dropout of
    probability ``p`` after it when ``drop_map`` is off."""
    a = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
    if drop_map:
        a = torch.nn.functional.dropout(a, p, True)
    gate = torch.sigmoid(g).view(1, -1, 1, 1)
    attn = (1.0 - gate) * a + gate * pos.softmax(-1)
    attn = attn / attn.sum(-1, keepdim=True)
    if not drop_map:
        attn = torch.nn.functional.dropout(attn, p, True)
    return attn @ v


def test_mixture_renormalized_on_the_kernels_forward_backward():
    """[Note: a mixture of maps renormalized]  ConViT's gated positional
    attention through the generated kernels (the interpreter on CPU), float32,
    forward and the gradients of q, k, v and the module's parameters (the
    gate, the positional projection) golden-relative; the content softmax is
    fused, no softmax of Q·Kᵀ is left in the graph."""
    with _implementation(True):
        check_case(RESEARCH_BY_ID["convit_gated_positional"])
    graphs, inner = _graph_capture()
    fn, args = RESEARCH_BY_ID["convit_gated_positional"].build(F32)
    torch.compile(fn, backend=attn_compiler.backend(inner=inner))(*args)
    assert_fused(attn_compiler.report(), 1)
    softmaxes = [n for gm in graphs for n in gm.graph.nodes if "softmax" in str(n.target)]
    assert len(softmaxes) == 1, [n.format_node() for n in softmaxes]      # the positional one


@pytest.mark.parametrize("p,drop_map", [(0.1, False), (0.1, True)], ids=["dropout_after", "dropout_on_a_map"])
def test_mixture_renormalized_with_dropout_runs_as_written(p, drop_map):
    """[Note: a mixture of maps renormalized]  With a dropout after the
    renormalization (one random mask over the mixture: not two products) or on
    a map (its rows no longer sum to 1) nothing is distributed: the site is
    declined and the user's nodes run as written (one P·V), the same random
    draws as eager from the same seed."""
    graphs, inner = _graph_capture()
    q, k, v = _qkv(F32)
    pos, g = _t(B, H, L, L), _t(H)
    torch.manual_seed(1)
    out = torch.compile(_mixture_renormalized, backend=attn_compiler.backend(inner=inner))(q, k, v, pos, g, p,
                                                                                             drop_map)
    torch.manual_seed(1)
    torch.testing.assert_close(out, _mixture_renormalized(q, k, v, pos, g, p, drop_map))
    rep = attn_compiler.report()
    assert not rep.fused and len(rep.declined) == 1, [(r.status, r.reason) for r in rep.declined]
    matmuls = [n for gm in graphs for n in gm.graph.nodes if "matmul" in str(getattr(n.target, "__name__", n.target))]
    assert len(matmuls) == 2, [n.format_node() for n in matmuls]


def test_mixture_renormalized_by_another_sum_is_left():
    """A mixture divided by a row sum that is not its own (the content map's)
    is not the renormalized form: declined, as written, eager's numbers."""
    def fn(q, k, v, pos):
        a = (q @ k.transpose(-1, -2)).softmax(-1)
        attn = 0.7 * a + 0.3 * pos.softmax(-1)
        return (attn / (2 * a).sum(-1, keepdim=True)) @ v
    torch._dynamo.reset()
    attn_compiler.reset()
    q, k, v = _qkv(F32)
    pos = _t(B, H, L, L)
    out = torch.compile(fn, backend=attn_compiler.backend(inner="aot_eager"))(q, k, v, pos)
    torch.testing.assert_close(out, fn(q, k, v, pos))
    assert not attn_compiler.report().fused
