"""SDPA as a candidate for a site: when ``F.scaled_dot_product_attention``
computes an AttentionSpec exactly, and the call that does it.

Entry points: ``sdpa_form(spec) -> SdpaForm | None`` and
``sdpa_attention(q, k, v, captured, spec, seed) -> (out, None)`` (the same
arguments as the ``attn_compiler::attention`` op, so a rewritten graph can call
either; SDPA's own autograd then handles the backward).

Expressed exactly: a score modification that is the score itself, with the
scale of the spec, plus at most one of: a causal band (kv_idx <= q_idx, SDPA's
top-left ``is_causal``), a boolean keep-mask tensor (-inf fill), or one
additive float tensor; no dropout (SDPA draws its own random numbers), no
probabilities zeroed after the softmax (``zero_masked``), output
in the input dtype.  Anything else is not an SDPA site.

[Note: cuDNN's backward with the output's layout]  With torch 2.11 on an
H200, cuDNN's SDPA backward gives wrong gradients (1.3-1.4 relative to
float64, at 2x4x18x8 and at ViT-B's 64x12x197x64 in bf16) when it is called
at one shape with a gradient of the output in one memory layout after a call
at the same shape with the gradient in another: the second call reuses the
plan the first built.  PyTorch caches cuDNN's graphs by the layouts of q, k,
v and the mask, and the output's layout follows q's; the backward's cache
has the same key, so the output gradient's layout is the one left out (ATen's
cudnn/MHA.cpp; it only re-lays the gradient out when its last stride is not
1).  The never-slower check runs a candidate's backward with a gradient of
its own making, so a check that passed could leave a plan the model's own
backward then ran with wrongly (DeiT: its parameters' gradients 1.2 from
eager's; bench/RESULTS.md run 129).  So the gradient reaching SDPA's
backward is given the output's layout on every call (``_GradLikeOutput``:
a copy where it has another): the layout is then a function of the cache's
key, and every call that shares a plan also shares the layout it was built
for (run 175: the gradients within 3e-3 in either order, 1.4 without).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import sympy
import torch
import torch.nn.functional as F

from attn_compiler import reference
from attn_compiler.passes.analyze.spec import AttentionSpec, _kept_value, captured_call, score
from attn_compiler.templates import codegen


@dataclasses.dataclass(frozen=True)
class SdpaForm:
    causal: bool = False
    bool_mask: Optional[int] = None       # captured index of a keep-mask
    additive: Optional[int] = None        # captured index of an added float tensor


def sdpa_form(spec: AttentionSpec) -> Optional[SdpaForm]:
    return _form(spec.dumps())


@functools.lru_cache(maxsize=512)
def _form(text: str) -> Optional[SdpaForm]:
    spec = AttentionSpec.loads(text)
    if spec.dropout_p > 0 or spec.zero_masked or spec.softmax_dtype != "float32" or spec.out_dtype != spec.prob_dtype \
            or any(c.kv_map or c.h_map for c in spec.captured):     # SDPA would need it expanded
        return None
    kept = _kept_value(spec.score_mod)
    additive = None
    if kept != score:
        rest = sympy.expand(kept - score)
        ids = [i for i in range(len(spec.captured)) if rest == captured_call(i)]
        if not ids or spec.captured[ids[0]].dtype == "bool":
            return None
        additive = ids[0]
    pred = spec.mask_predicate
    if pred is sympy.true:
        return SdpaForm(additive=additive)
    if spec.mask_fill != -math.inf or additive is not None:
        return None
    band = codegen.band_of(spec)
    if band is not None:
        return SdpaForm(causal=True) if band.lo is None and band.hi == 0 else None
    for i, c in enumerate(spec.captured):
        if c.dtype == "bool" and pred in (sympy.Ne(captured_call(i), 0), sympy.Eq(captured_call(i), 1),
                                          sympy.Eq(captured_call(i), sympy.true)):
            return SdpaForm(bool_mask=i)
    return None


def sdpa_attention(q, k, v, captured, spec, seed=None):
    """``(out, None)``: the site through ``F.scaled_dot_product_attention``."""
    spec = spec if isinstance(spec, AttentionSpec) else AttentionSpec.loads(spec)
    form = sdpa_form(spec)
    if form is None:
        raise ValueError("this attention spec is not expressible as scaled_dot_product_attention")
    mask = None
    if form.bool_mask is not None:
        mask = captured[form.bool_mask]
    elif form.additive is not None:
        mask = captured[form.additive].to(q.dtype)
    if k.shape[0] != q.shape[0]:
        k = k.expand(q.shape[0], -1, -1, -1)
        v = v.expand(q.shape[0], -1, -1, -1)
    # a bool, not a symbolic one (dynamic=True): the spec's group, else decided here
    gqa = spec.gqa_group > 1 if spec.gqa_group else bool(q.shape[1] != k.shape[1])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=form.causal,
                                         scale=spec.scale_value(q.shape[-1]), enable_gqa=gqa)
    if out.requires_grad:        # [Note: cuDNN's backward with the output's layout]
        out = _GradLikeOutput.apply(out)
    return out.to(getattr(torch, spec.out_dtype)), None


class _GradLikeOutput(torch.autograd.Function):
    """The identity, whose backward hands on the gradient in its input's
    memory layout (a copy where it has another; under symbolic strides, where
    they are not provably the same).
    [Note: cuDNN's backward with the output's layout]"""

    @staticmethod
    def forward(ctx, out):
        ctx.layout = out.stride()
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return reference.with_strides(grad, ctx.layout)
