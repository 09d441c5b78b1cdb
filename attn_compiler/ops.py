"""The attention custom ops, registered on import under the ``attn_compiler`` namespace.

    attn_compiler::attention(Tensor q, Tensor k, Tensor v, Tensor[] captured,
                             str spec, Tensor? seed) -> (Tensor out, Tensor lse)
    attn_compiler::attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v,
                             Tensor[] captured, Tensor out, Tensor lse, str spec,
                             Tensor? seed, Tensor? dlse=None) -> (Tensor dq, Tensor dk,
                                               Tensor dv, Tensor[] dcaptured)

A rewritten graph calls :func:`fused_attention` instead: the same arguments,
differentiated by an ``autograd.Function`` whose forward calls
``attn_compiler::attention_forward`` (the same schema and kernels, registered
without an autograd kernel), so that a compiled graph's calls skip the custom
op's Python autograd and aliasing wrappers at run time ([Note: the op's run-time
dispatch]).

``spec`` is ``AttentionSpec.dumps()``.  Shapes: q (B, Hq, Lq, D); k (B or 1,
Hkv, Lk, D); v (B or 1, Hkv, Lk, Dv); captured[i] 4-D, broadcastable to
(B, Hq, Lq, Lk); seed an int64 scalar tensor when the spec has dropout, else
None.  out (B, Hq, Lq, Dv) in ``spec.out_dtype``; lse (B, Hq, Lq) in float32
(float64 for float64 inputs or a float64 softmax).  ``dcaptured`` holds only
the gradients of captured tensors whose spec entry has ``requires_grad``.

The fake kernels are shape logic only (symbolic sizes welcome).  ``attention``
is differentiable through ``attention_backward``, ``lse`` too (a site with
attention sinks reads it): d lse / d score = P, so its gradient enters the
score gradient as ``P ∘ (dP - (delta - dlse))``; unused, it costs nothing
(grads are not materialised: ``dlse`` is None).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch.autograd.function import once_differentiable

from attn_compiler import dispatch, reference
from attn_compiler.passes.analyze.spec import AttentionSpec

_NS = "attn_compiler"


def _spec(text: str) -> AttentionSpec:
    return AttentionSpec.loads(text)


# ---- forward -----------------------------------------------------------------

@torch.library.custom_op(f"{_NS}::attention", mutates_args=())
def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, captured: List[torch.Tensor],
               spec: str, seed: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    return _forward_impl(q, k, v, captured, spec, seed)


@_attention.register_fake
def _attention_fake(q, k, v, captured, spec, seed):
    s = _spec(spec)
    B, Hq, Lq, _ = q.shape
    out = reference.empty_output(s, B, Hq, Lq, v.shape[-1], q.device)
    lse = q.new_empty((B, Hq, Lq), dtype=reference.compute_dtype(s, q.dtype))
    return out, lse


# ---- backward ----------------------------------------------------------------

# [Note: the op's run-time dispatch]  A ``torch.library.custom_op`` runs two
# Python wrappers around its kernel on every call: the autograd one (which,
# without gradients, re-dispatches below autograd) and the backend one (which
# checks that no output aliases an input).  Called from a compiled graph that
# is ~17 µs per call on the H200's host (bench/RESULTS.md run 29: a no-op op
# with our schema 37 µs, the same through ``Library.define`` 20 µs), paid by
# the forward and the backward of every fused site.  So the ops a compiled
# graph runs are defined on a ``Library`` with one CompositeExplicitAutograd
# kernel each and no autograd kernel: ``attention_forward`` (the schema of
# ``attention``) and ``attention_backward`` (never differentiated: a second
# derivative is refused).  The graph differentiates ``attention_forward``
# through ``_Fused`` (an ``autograd.Function``: AOTAutograd traces its forward
# and backward into the forward and backward graphs), so the run-time calls go
# straight to the kernels.  ``attention`` stays the public op, with its
# registered autograd (opcheck, eager callers).

_lib = torch.library.Library(_NS, "FRAGMENT")
_lib.define("attention_forward(Tensor q, Tensor k, Tensor v, Tensor[] captured, str spec, Tensor? seed)"
            " -> (Tensor, Tensor)")
_lib.define("attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor[] captured, Tensor out,"
            " Tensor lse, str spec, Tensor? seed, Tensor? dlse=None)"
            " -> (Tensor, Tensor, Tensor, Tensor[])")


def _forward_impl(q, k, v, captured, spec, seed):
    s = _spec(spec)
    out, lse = dispatch.forward(q, k, v, captured, s, seed)
    return reference.in_output_layout(out, s), lse.contiguous()     # the layout the fake promises


def _attention_backward(dout, q, k, v, captured, out, lse, spec, seed, dlse=None):
    s = _spec(spec)
    dq, dk, dv, dcap = dispatch.backward(dout, q, k, v, captured, out, lse, s, seed, dlse)
    # the layout the fake promises (inductor checks it): a no-op for the kernels' outputs
    wanted = [t for t, c in zip(captured, s.captured) if c.requires_grad]
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), [reference.with_strides(g, grad_strides(t)) for g, t in zip(dcap, wanted)]


_lib.impl("attention_forward", _forward_impl, "CompositeExplicitAutograd")
_lib.impl("attention_backward", _attention_backward, "CompositeExplicitAutograd")
torch.library.register_fake(f"{_NS}::attention_forward", _attention_fake, lib=_lib)


@torch.library.register_fake(f"{_NS}::attention_backward", lib=_lib)
def _attention_backward_fake(dout, q, k, v, captured, out, lse, spec, seed, dlse=None):
    s = _spec(spec)
    dcap = [torch.empty_strided(t.shape, grad_strides(t), dtype=t.dtype, device=q.device)
            for t, c in zip(captured, s.captured) if c.requires_grad]
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dcap)


# [Note: a captured tensor's gradient in its own layout]  A captured tensor is
# often a view in another order than its shape's (Doge's dynamic mask: a
# softplus of a (B, L, H) projection permuted to (B, H, 1, L)).  Its gradient
# is handed on in that order: dense, the dims of size over 1 ordered by the
# tensor's strides (ties by position), size-1 dims outermost; the user's
# backward ops that follow then see the layout their own forward had.  Handed
# on contiguous, Doge's form gave softplus_backward a transposed gradient
# beside its contiguous input, a mix for which PyTorch's fake kernel and its
# CPU kernel disagree on the result's strides, so a backward graph traced with
# the fake's and run as traced (aot_eager) failed on a ``view`` of the real
# result.  (Plain aot_eager fails the same way on that code, whose eager
# softmax backward also hands on a contiguous gradient; inductor runs both.)
# The rule reads only the shape and the order of the strides, which inductor
# keeps for a custom op's inputs, so the fake and the run-time op agree.

def grad_strides(t: torch.Tensor) -> Tuple[int, ...]:
    """Strides of the gradient of captured tensor ``t`` ([Note: a captured
    tensor's gradient in its own layout])."""
    n = t.dim()
    order = [d for d in range(n) if t.shape[d] == 1]
    order += sorted((d for d in range(n) if t.shape[d] != 1), key=lambda d: (-t.stride(d), d))
    strides = [1] * n
    step = 1
    for d in reversed(order):
        strides[d] = step
        step = step * t.shape[d]
    return tuple(strides)


# ---- autograd ----------------------------------------------------------------

def _setup_context(ctx, inputs, output):
    q, k, v, captured, spec, seed = inputs
    out, lse = output
    ctx.set_materialize_grads(False)      # an unused lse gets no gradient (None)
    ctx.spec = spec
    ctx.n_captured = len(captured)
    ctx.save_for_backward(q, k, v, out, lse, seed, *captured)


def _grads(ctx, dout, dlse=None):
    """(dq, dk, dv, [gradient or None per captured tensor])."""
    q, k, v, out, lse, seed, *captured = ctx.saved_tensors
    if dout is None:            # only lse is used (grads are not materialised)
        dout = torch.zeros_like(out)
    dq, dk, dv, dcap = torch.ops.attn_compiler.attention_backward(
        dout, q, k, v, captured, out, lse, ctx.spec, seed, dlse)
    grads: List[Optional[torch.Tensor]] = [None] * ctx.n_captured
    wanted = [i for i, c in enumerate(_spec(ctx.spec).captured) if c.requires_grad]
    for i, g in zip(wanted, dcap):
        grads[i] = g
    return dq, dk, dv, grads


def _backward(ctx, dout, dlse):
    dq, dk, dv, grads = _grads(ctx, dout, dlse)
    return dq, dk, dv, grads, None, None


_attention.register_autograd(_backward, setup_context=_setup_context)


class _Fused(torch.autograd.Function):
    """``attention_forward`` differentiated through the op's backward
    (``_grads``, as the registered autograd of ``attention``), without the
    custom-op wrappers ([Note: the op's run-time dispatch]).  Eager calls of
    :func:`attention` take it too: the generic custom-op autograd wrapper cost
    ~110 µs per call on the H200's host (bench/RESULTS.md run 29)."""

    @staticmethod
    def forward(ctx, q, k, v, spec, seed, *captured):
        out, lse = torch.ops.attn_compiler.attention_forward.default(q, k, v, list(captured), spec, seed)
        _setup_context(ctx, (q, k, v, captured, spec, seed), (out, lse))
        return out, lse

    @staticmethod
    @once_differentiable     # attention_backward has no autograd kernel: a second derivative is refused
    def backward(ctx, dout, dlse):
        dq, dk, dv, grads = _grads(ctx, dout, dlse)
        return (dq, dk, dv, None, None, *grads)


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, captured: List[torch.Tensor],
                    spec: str, seed: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """What a rewritten graph calls for a fused site: the arguments of
    ``attn_compiler::attention``.  AOTAutograd traces it into
    ``attention_forward`` in the forward graph and ``attention_backward`` in
    the backward graph; without gradients it is ``attention_forward`` alone."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *captured)):
        return _Fused.apply(q, k, v, spec, seed, *captured)
    return torch.ops.attn_compiler.attention_forward.default(q, k, v, list(captured), spec, seed)


# ---- python entry point --------------------------------------------------------

implementation = dispatch.implementation  # ops.implementation("triton"|"reference"|"auto")

def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, captured: Sequence[torch.Tensor] = (),
              spec: Union[AttentionSpec, str] = None, seed: Optional[torch.Tensor] = None
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Call ``attn_compiler::attention``; ``spec`` may be an AttentionSpec or its string.

    With dropout and no ``seed``, one is drawn from torch's default generator.
    """
    if spec is None:
        raise TypeError("attention() needs a spec (AttentionSpec or AttentionSpec.dumps())")
    obj = spec if isinstance(spec, AttentionSpec) else None
    text = spec.dumps() if obj is not None else spec
    if seed is None and (obj or _spec(text)).dropout_p > 0:
        seed = torch.randint(0, 2**62, (), dtype=torch.int64)
    if (torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and any(t.requires_grad for t in (q, k, v, *captured))):
        return _Fused.apply(q, k, v, text, seed, *captured)
    return torch.ops.attn_compiler.attention(q, k, v, list(captured), text, seed)
