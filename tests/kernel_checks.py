"""Shared pieces of the kernel tests (tests/test_attention_{fwd,bwd,decode}.py).

Every check is golden-relative (STYLE.md §2): the golden is the blockwise
reference (``reference.attention_forward`` / ``attention_backward``) on float64
copies of the inputs, with a float64 output dtype so that the golden itself is
never rounded; eager is the same reference in the test dtype; ours is a kernel
launcher of ``attn_compiler.kernels``.  ``golden_check(ours, eager, golden)``
asserts err(ours) <= k·err(eager) + tiny.

Notation: B batch, Hq / Hkv query / key-value heads, G = Hq // Hkv,
Lq / Lk query / key lengths, D head dim of q/k, Dv head dim of v.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import sympy
import torch

from attn_compiler import kernels, reference
from attn_compiler.passes.analyze.spec import (
    D, AttentionSpec, CapturedTensor, Lk, Lq, captured_call, kv_idx, q_idx, score)
from attn_compiler.testing import golden_check

oo = sympy.oo
T0 = captured_call(0)
F32_MIN = float(torch.finfo(torch.float32).min)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# where the kernel tests put their tensors: the interpreter takes CPU tensors
DEVICE = torch.device("cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def make_spec(mod, *, dtype=torch.float32, captured: Sequence[CapturedTensor] = (), group: int = 1,
              dropout_p: float = 0.0, scale=None) -> AttentionSpec:
    return AttentionSpec(score_mod=mod, scale=1 / sympy.sqrt(D) if scale is None else scale,
                         captured=tuple(captured), gqa_group=group, dropout_p=dropout_p,
                         out_dtype=dtype_name(dtype), prob_dtype=dtype_name(dtype),
                         score_dtype=dtype_name(dtype))


def golden_spec(spec: AttentionSpec) -> AttentionSpec:
    """The same spec with a float64 output (the golden must not be rounded)."""
    return dataclasses.replace(spec, out_dtype="float64", prob_dtype="float64", score_dtype="float64")


# ---- score modifications ----------------------------------------------------------

def masked(keep, value=score, fill=-oo):
    """``value`` where ``keep`` holds, else ``fill``."""
    return sympy.Piecewise((value, keep), (fill, True))


def causal_mod(value=score):
    """Top-left aligned causal: kv_idx <= q_idx."""
    return masked(kv_idx <= q_idx, value)


def offset_causal_mod(value=score):
    """Bottom-right aligned causal (the queries are the last Lq of Lk positions)."""
    return masked(kv_idx <= q_idx + Lk - Lq, value)


def window_mod(w: int):
    """Sliding window: q_idx - w < kv_idx <= q_idx."""
    return masked((kv_idx <= q_idx) & (q_idx - kv_idx < w))


def softcap_causal_mod(c: float):
    """Gemma-2 style logit soft-capping c·tanh(score / c), causal."""
    return causal_mod(c * sympy.tanh(score / c))


def padding_mod(fill=-oo):
    """Bool captured t0 [B, 1, 1, Lk] (True = keep); masked keys get ``fill``."""
    return masked(sympy.Ne(T0, 0), fill=fill)


def captured_spec(dims: str, dtype: str = "float32", grad: bool = False) -> CapturedTensor:
    """A CapturedTensor; ``dims`` spells its axes of (b, h, q_idx, kv_idx) as
    in "B..K" (a letter: varies, ".": size 1, broadcast)."""
    return CapturedTensor(tuple(c != "." for c in dims), dtype, grad)


# ---- inputs ----------------------------------------------------------------------

def qkv(B=2, Hq=2, Hkv=None, Lq=37, Lk=None, Dh=16, Dv=None, Bkv=None, *, dtype=torch.float32,
        seed=0, layout="bhld", qscale=1.0, device=None):
    """Random q (B, Hq, Lq, D), k (Bkv, Hkv, Lk, D), v (Bkv, Hkv, Lk, Dv).

    ``layout="blhd"``: each tensor is a (B, L, H, D) buffer viewed as (B, H, L, D)
    through ``.transpose(1, 2)`` (non-contiguous, as projections produce)."""
    gen = torch.Generator().manual_seed(seed)
    Hkv, Lk, Dv, Bkv = Hkv or Hq, Lk or Lq, Dv or Dh, Bkv or B

    device = DEVICE if device is None else device

    def rnd(b, h, n, d, s=1.0):
        if layout == "blhd":
            return (torch.randn(b, n, h, d, generator=gen) * s).to(device, dtype).transpose(1, 2)
        return (torch.randn(b, h, n, d, generator=gen) * s).to(device, dtype)

    return rnd(B, Hq, Lq, Dh, qscale), rnd(Bkv, Hkv, Lk, Dh), rnd(Bkv, Hkv, Lk, Dv)


def padding_keep(B: int, Lk: int, full_row: bool = False) -> torch.Tensor:
    """Bool [B, 1, 1, Lk]: batch 0 pads its last 7 keys, the last batch its first
    3, or with ``full_row`` every key (all rows of the last batch fully masked)."""
    keep = torch.ones(B, 1, 1, Lk, dtype=torch.bool)
    keep[0, ..., Lk - 7:] = False
    keep[-1, ..., :3] = False
    if full_row:
        keep[-1] = False
    return keep.to(DEVICE)


def alibi_slopes(H: int) -> torch.Tensor:
    """ALiBi's geometric head slopes 2^-(8h/H), as [1, H, 1, 1]."""
    return torch.tensor([2.0 ** (-8.0 * (i + 1) / H) for i in range(H)], device=DEVICE).view(1, H, 1, 1)


def randn(*shape, seed: int = 0) -> torch.Tensor:
    """Seeded float32 noise on DEVICE."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def to64(x):
    if torch.is_tensor(x) and x.is_floating_point():
        return x.detach().double()
    return x


# ---- golden-relative runs ----------------------------------------------------------

def references_forward(q, k, v, caps, spec, seed=None):
    """(eager out, eager lse, golden out, golden lse) of the blockwise reference."""
    eager_out, eager_lse = reference.attention_forward(q, k, v, caps, spec, seed)
    gold_out, gold_lse = reference.attention_forward(to64(q), to64(k), to64(v), [to64(c) for c in caps],
                                                     golden_spec(spec), seed)
    return eager_out, eager_lse, gold_out, gold_lse


def lse_check(lse: torch.Tensor, gold: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """lse of finite golden rows to float32 accuracy; non-finite rows identical."""
    assert lse.dtype == torch.float32 and lse.shape == gold.shape
    fin = torch.isfinite(gold)
    assert torch.equal(lse[~fin].double(), gold[~fin]), "non-finite lse rows differ from the golden's"
    torch.testing.assert_close(lse[fin].double(), gold[fin], atol=atol, rtol=rtol)


def check_forward(q, k, v, caps, spec, *, seed=None, config=None, k_factor=2.0, name="fwd", launch=None):
    """Run ``launch`` (default ``kernels.forward``) and check out (golden-relative)
    and lse; returns (out, lse, golden out)."""
    out, lse = (launch or kernels.forward)(q, k, v, caps, spec, seed, config=config)
    eager_out, _, gold_out, gold_lse = references_forward(q, k, v, caps, spec, seed)
    assert out.dtype == getattr(torch, spec.out_dtype) and out.shape == eager_out.shape
    assert lse.shape == out.shape[:3]
    golden_check(out, eager_out, gold_out, k=k_factor, name=f"{name}/out")
    # scores rounded to float16/bfloat16 as eager's (AttentionSpec.rounds_scores), the
    # golden's not: lse to the rounding's precision
    tol = (2 ** -10, 2 ** -10) if spec.rounds_scores else ()
    lse_check(lse, gold_lse, *tol)
    return out, lse, gold_out


def check_backward(q, k, v, caps, spec, *, seed=None, config=None, k_factor=2.0, name="bwd"):
    """Our forward then ``kernels.backward``; dq, dk, dv and every captured
    gradient checked golden-relative.  Returns (dq, dk, dv, dcaptured)."""
    out, lse = kernels.forward(q, k, v, caps, spec, seed, config=config)
    dout = randn(out.shape, seed=11).to(out.dtype)      # autograd gives dO in the output's dtype
    ours = kernels.backward(dout, q, k, v, caps, out, lse, spec, seed, config=config)
    eager_out, eager_lse, gold_out, gold_lse = references_forward(q, k, v, caps, spec, seed)
    eager = reference.attention_backward(dout, q, k, v, caps, eager_out, eager_lse, spec, seed)
    gold = reference.attention_backward(dout.double(), to64(q), to64(k), to64(v), [to64(c) for c in caps],
                                        gold_out, gold_lse, golden_spec(spec), seed)
    names = ["dq", "dk", "dv"] + [f"dt{i}" for i in range(len(ours[3]))]
    for what, a, e, g in zip(names, [*ours[:3], *ours[3]], [*eager[:3], *eager[3]], [*gold[:3], *gold[3]],
                             strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype, what
        golden_check(a, e, g, k=k_factor, name=f"{name}/{what}")
    return ours

