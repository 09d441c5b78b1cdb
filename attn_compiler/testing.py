"""The one eager reference attention, and golden-relative error checks.

Entry points: ``reference_attention`` (plain eager math; materialises the
(B, H, Lq, Lk) scores — it is the reference, not an implementation),
``golden_check`` and ``rel_err``.  Tests and benchmarks import these and
nothing else to decide what "correct" means.

The rule (STYLE.md §2): compute a float64 *golden*, the *eager* result in the
test dtype, and *ours*; require ``err(ours) <= k * err(eager) + tiny`` where
``err`` is the relative Frobenius error against the golden.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from attn_compiler.autotune import tf32_allowed

# tiny: absolute slack for when eager is (almost) exact, e.g. eager == golden in float64.
_TINY = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def reference_attention(q, k, v, *, scale=None, causal=False, window=None, softcap=None,
                        bias=None, mask=None, upcast=True, dropout_p=0.0, dropout_seed=None):
    """softmax(mod(scale * q kᵀ)) @ v, eagerly, as a model written by hand does it.

    q (B, Hq, Lq, D); k, v (B or 1, Hkv, Lk, D/Dv) with Hq % Hkv == 0 (GQA: KV
    heads repeated).  The score pipeline, in order: ``q @ kᵀ`` in the input
    dtype; upcast to float32 (``upcast``; float64 inputs stay float64); times
    ``scale`` (default 1/sqrt(D)); ``softcap * tanh(s / softcap)``; ``+ bias``;
    ``causal`` masks kv_idx > q_idx (top-left aligned); ``window = w`` keeps
    q_idx - w < kv_idx <= q_idx; ``mask``: bool (True = keep, others -inf) or
    float (added).  Softmax, cast back to the input dtype, dropout, @ v.

    Dropout: with ``dropout_seed`` (int) the keep-mask is the op's own
    (``reference.dropout_keep_mask``), so results are comparable; without it,
    ``torch.nn.functional.dropout``.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    k = k.repeat_interleave(G, dim=1)                           # (B, Hq, Lk, D)
    v = v.repeat_interleave(G, dim=1)
    s = q @ k.transpose(-1, -2)                                 # (B, Hq, Lq, Lk)
    if upcast and s.dtype != torch.float64:
        s = s.float()
    s = s * (1.0 / math.sqrt(D) if scale is None else scale)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias
    qi = torch.arange(Lq, device=q.device).view(-1, 1)
    ki = torch.arange(Lk, device=q.device).view(1, -1)
    if causal or window is not None:
        s = s.masked_fill(ki > qi, -math.inf)
    if window is not None:
        s = s.masked_fill(qi - ki >= window, -math.inf)
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask
    p = torch.softmax(s, dim=-1).to(q.dtype)
    if dropout_p > 0:
        p = _dropout(p, dropout_p, dropout_seed)
    return p @ v


def _dropout(p, dropout_p, seed):
    if seed is None:
        return torch.nn.functional.dropout(p, dropout_p)
    from attn_compiler.reference import dropout_keep_mask

    B, H, M, N = p.shape
    ar = lambda n, dim: torch.arange(n, device=p.device).view([n if d == dim else 1 for d in range(4)])
    keep = dropout_keep_mask(int(seed), dropout_p, ar(B, 0), ar(H, 1), ar(M, 2), ar(N, 3))
    return p * keep.to(p.dtype) / (1.0 - dropout_p)


def rel_err(a: torch.Tensor, golden: torch.Tensor) -> float:
    """Relative Frobenius error ||a - golden|| / ||golden|| in float64.

    NaN/inf must sit at the same positions with the same values (else inf is
    returned); the error is taken over the remaining positions.  A zero golden
    gives the absolute error.
    """
    a, g = a.detach().to(torch.float64), golden.detach().to(torch.float64)
    if a.shape != g.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs golden {tuple(g.shape)}")
    special = ~torch.isfinite(g)
    if not torch.equal(torch.isnan(a), torch.isnan(g)):
        return math.inf
    if not torch.equal(a[special & ~torch.isnan(g)], g[special & ~torch.isnan(g)]):
        return math.inf
    a, g = a[~special], g[~special]
    if not torch.isfinite(a).all():
        return math.inf
    num, den = torch.linalg.vector_norm(a - g).item(), torch.linalg.vector_norm(g).item()
    return num / den if den > 0 else num


def golden_check(ours: torch.Tensor, eager: torch.Tensor, golden: torch.Tensor, k: float = 2.0,
                 tiny: Optional[float] = None, name: str = "") -> Tuple[float, float]:
    """Assert ``rel_err(ours) <= k * rel_err(eager) + tiny`` against a float64 golden.

    NaN never passes unless the golden is NaN at exactly the same positions
    (then those positions are excluded; a NaN the golden lacks, or a missing
    one, fails).  An eager result with stray NaNs gives ``ours`` no slack: its
    error is replaced by 0.  ``tiny`` defaults by the dtype of ``ours``.
    Returns (err_ours, err_eager).
    """
    tiny = _TINY.get(ours.dtype, 1e-6) if tiny is None else tiny
    e_ours, e_eager = rel_err(ours, golden), rel_err(eager, golden)
    bound = k * (e_eager if math.isfinite(e_eager) else 0.0) + tiny
    if not e_ours <= bound:
        raise AssertionError(f"{name or 'tensor'}: rel err {e_ours:.3e} > {k} * eager {e_eager:.3e} + "
                             f"{tiny:.1e} (dtype {ours.dtype}, shape {tuple(ours.shape)})")
    return e_ours, e_eager


# How far two correct implementations of one attention may be apart (relative
# error of one against the other), by output dtype: the autotuner and the
# never-slower choice drop a candidate beyond this.
AGREEMENT = {torch.bfloat16: 2e-2, torch.float16: 5e-3}
AGREEMENT_DEFAULT = 1e-4


def disagreement(a: torch.Tensor, b: torch.Tensor, slack: float = 1.0) -> Optional[str]:
    """None when ``a`` agrees with ``b`` (same nan/inf positions, relative
    error within ``slack`` times ``AGREEMENT``), else how far apart they are.
    Float32 with TF32 matmuls allowed (``tf32_allowed``: eager's matmuls and
    the kernels' products keep 10 mantissa bits, as float16's) agrees as
    float16 does."""
    err = rel_err(a, b)
    dtype = b.dtype
    if dtype == torch.float32 and tf32_allowed():
        dtype = torch.float16
    tol = AGREEMENT.get(dtype, AGREEMENT_DEFAULT) * slack
    return None if err <= tol else f"relative difference {err:.2e} (allowed {tol:.0e})"
