"""x-transformers (lucidrains), research code's attention library, through the backend.

Its ``Attend`` writes attention out by hand when flash is off (the default):
``einsum`` scores, ``* scale``, optional residual scores, a bias (ALiBi, T5
buckets), ``softclamp``, ``masked_fill`` with ``-finfo.max`` (padding and its
own causal ``triu``), an optional learned sink concatenated in front and cut
off after the softmax, memory key/values, GQA by ``repeat``, and it returns
its intermediates.  Each case is a one-layer language model built with one of
those options, run forward in train mode and backward; every site must fuse
and the logits and parameter gradients are golden-relative to eager
(``check_model``).  The options whose probabilities are mixed across heads
or top-k selected (talking heads, sparse top-k) must be declined, with the
reason, and still give eager's numbers (the site's own code runs).

x-transformers is not a CI dependency; these tests run where it is installed.
"""
from __future__ import annotations

import pytest
import torch

x_transformers = pytest.importorskip("x_transformers")

import attn_compiler  # noqa: E402
from test_real_models import _compile, _step, check_model  # noqa: E402

B, L, VOCAB = 2, 12, 50


def _lm(layers="Decoder", **attn):
    def build():
        cls = getattr(x_transformers, layers)
        return x_transformers.TransformerWrapper(
            num_tokens=VOCAB, max_seq_len=32,
            attn_layers=cls(dim=32, depth=1, heads=4, attn_dim_head=8, **attn))
    return build


def _inputs(mask=False):
    g = torch.Generator().manual_seed(1)
    inputs = {"x": torch.randint(0, VOCAB, (B, L), generator=g)}
    if mask:
        keep = torch.ones(B, L, dtype=torch.bool)
        keep[0, L - 4:] = False                      # row 0 right-padded
        inputs["mask"] = keep
    return inputs


FUSED = {
    "causal": (_lm(), False),
    "encoder_padding": (_lm("Encoder"), True),
    "causal_padding": (_lm(), True),
    "rotary": (_lm(rotary_pos_emb=True), False),
    "alibi": (_lm(alibi_pos_bias=True), False),
    "t5_relative_bias": (_lm(rel_pos_bias=True), False),
    "qk_norm": (_lm(attn_qk_norm=True), False),
    "gated_values": (_lm(attn_gate_values=True), False),
    "memory_kv": (_lm(attn_num_mem_kv=2), False),
    "softclamp": (_lm(attn_softclamp_logits=True), False),
    "gqa": (_lm(attn_kv_heads=2), False),
    "one_kv_head": (_lm(attn_one_kv_head=True), False),
    "learned_sink": (_lm(attn_head_learned_sink=True), False),
    "zero_kv": (_lm(attn_add_zero_kv=True), True),
}


@pytest.mark.parametrize("case", sorted(FUSED))
def test_x_transformers_attention_is_fused(case):
    build, mask = FUSED[case]
    check_model(build, _inputs(mask), 1, output_fn=lambda out: out)


@pytest.mark.parametrize("case,attn,why", [
    ("talking_heads", dict(attn_pre_talking_heads=True), "conv2d"),
    ("sparse_topk", dict(attn_sparse_topk=4), "between Q·Kᵀ and softmax"),
])
def test_x_transformers_mixed_or_selected_scores_are_declined(case, attn, why):
    torch.manual_seed(0)
    model = _lm("Encoder" if case == "talking_heads" else "Decoder", **attn)()
    inputs = _inputs()
    eager, _ = _step(model, inputs, lambda out: out)
    attn_compiler.reset()
    ours, _ = _step(_compile(model, "aot_eager"), inputs, lambda out: out)
    rows = list(attn_compiler.report())
    assert not [s for s in rows if s.status == "fused"], rows
    assert any(why in s.reason for s in rows if s.status == "declined"), [s.reason for s in rows]
    torch.testing.assert_close(ours, eager)
