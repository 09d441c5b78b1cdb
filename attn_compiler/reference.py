"""Blockwise PyTorch implementation of an AttentionSpec: forward and backward.

Entry points: ``attention_forward`` and ``attention_backward`` (the CPU / fallback
implementation of the ``attn_compiler::attention`` op).  Memory is linear in the
sequence lengths: scores exist one (B, Hq, BLOCK_M, BLOCK_N) block at a time.

Notation: B batch, Hq query heads, Hkv key/value heads, G = Hq // Hkv (GQA
group), M = Lq rows, N = Lk columns, D head dim of q/k, Dv head dim of v.
Query head ``h`` reads key/value head ``h // G``; a query block is viewed as
(B, Hkv, G*M, D) so one matmul per KV head serves the whole group without a
widened copy of K/V.

Forward (online softmax, per query block, over KV blocks j)::

    z_j   = score_mod(scale * Q K_jᵀ, ...)               # (B, Hq, M, N)
    m'    = max(m, rowmax z_j)
    l     = l * exp(m - m') + rowsum exp(z_j - m')
    acc   = acc * exp(m - m') + (exp(z_j - m') ∘ keep_j / (1-p)) V_j
    out   = acc / l,   lse = m + log l

A ``zero_masked`` spec zeroes exp(z_j - m') where the mask drops a score in
acc (and in dV below), not in l: eager's ``softmax(z).masked_fill(~keep, 0)``.

[Note: fully masked rows] A row whose z are all -inf keeps m = -inf; we
subtract 0 instead of m there so exp() gives 0 rather than nan, and the row
ends as 0/0 = nan — exactly what eager ``softmax`` returns.  A row filled with
a finite fill (finfo.min) is uniform, as in eager, with no special case.

Backward, per query block: for float32/float64 specs (``exact_rows``) a
first walk over the KV blocks takes the row statistics (m, l), the shift c
(dP at the top key, or its running mean: [Note: the shift of dP]) and
delta = rowsum(P ∘ (dP - c)) of the very P and
dP the second walk recomputes, P = exp(z - m) / l, and dz takes dP - c
([Note: delta of the recomputed P]); for 16-bit specs P = exp(z - lse), c = 0
and delta = rowsum(dO ∘ O), FlashAttention's one pass.  Then::

    dP = (dO Vᵀ) ∘ keep / (1-p)        dz = P ∘ ((dP - c) - delta)
    ds = dz ∘ ∂mod/∂score              dQ = scale · ds K,  dK = scale · dsᵀ Q
    dV = (P ∘ keep / (1-p))ᵀ dO        dT_i = Σ_broadcast dz ∘ ∂mod/∂t_i

Positions with P == 0, or where a derivative is exactly 0, contribute exactly
0: this guards 0·inf = nan at masked positions, and makes a zero derivative a
selection like eager's masked_fill/where backward (a fully -inf row has nan P,
yet eager's dQ there is 0 and dK stays finite; only dV is nan, as in eager).

Dropout keep-masks come from a counter-based hash of (seed, b, h, q_idx,
kv_idx), so they do not depend on the block decomposition and the backward
(or a test) regenerates them exactly; see ``dropout_keep_mask``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Iterator, Optional, Sequence, Tuple

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true, sym_eq

from attn_compiler.passes.analyze import torch_eval
from attn_compiler.passes.analyze.spec import (
    DIM_NAMES, AttentionSpec, CapturedTensor, Lk, Lq, _relation_offsets, kv_idx, q_idx)

# Elements of one (B, Hq, BLOCK_M, BLOCK_N) score block: 1M fp32 = 4 MiB.
BLOCK_ELEMENTS = 1 << 20
MIN_BLOCK = 16
_block_override: Optional[Tuple[int, int]] = None


@contextlib.contextmanager
def block_sizes(block_m: int, block_n: int) -> Iterator[None]:
    """Force (BLOCK_M, BLOCK_N) inside the context (tests use small blocks)."""
    global _block_override
    old, _block_override = _block_override, (int(block_m), int(block_n))
    try:
        yield
    finally:
        _block_override = old


def choose_blocks(B: int, H: int, Lq: int, Lk: int) -> Tuple[int, int]:
    """Square-ish power-of-two blocks with B*H*BLOCK_M*BLOCK_N <= BLOCK_ELEMENTS."""
    if _block_override is not None:
        bm, bn = _block_override
        return max(1, min(bm, Lq)), max(1, min(bn, Lk))
    side = max(MIN_BLOCK, math.isqrt(BLOCK_ELEMENTS // max(1, B * H)))
    side = 1 << (side.bit_length() - 1)
    bn = max(1, min(Lk, side))
    bm = max(1, min(Lq, max(MIN_BLOCK, BLOCK_ELEMENTS // max(1, B * H * bn))))
    return bm, bn


# ---- dropout: counter-based keep mask -------------------------------------

_M32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """(x * c) mod 2**32 for x < 2**32 held in int64, without int64 overflow:
    split c into 16-bit halves (x * c_hi < 2**48)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _hash32(x):
    """'lowbias32' integer hash (xorshift-multiply); a bijection on uint32."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def dropout_keep_mask(seed: int, p: float, b, h, q_idx, kv_idx) -> torch.Tensor:
    """Bool keep-mask (True = kept, probability 1-p) at the broadcast of the
    int64 index tensors; a pure function of (seed, b, h, q_idx, kv_idx)."""
    x = _hash32(_hash32(seed & _M32) ^ ((seed >> 32) & _M32))
    for idx in (b, h, q_idx, kv_idx):        # chain: hash(prefix ^ index)
        x = _hash32(x ^ idx)
    return x >= int(p * 2.0 ** 32)           # uniform uint32 >= p * 2**32


# ---- problem setup ----------------------------------------------------------

@dataclasses.dataclass
class _Problem:
    spec: AttentionSpec
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    captured: Sequence[torch.Tensor]
    B: int
    Hq: int
    Hkv: int
    Lq: int
    Lk: int
    D: int
    Dv: int
    cd: torch.dtype        # compute dtype of scores / softmax
    scale: float
    bm: int
    bn: int
    seed: Optional[int]

    @property
    def G(self) -> int:
        return self.Hq // self.Hkv


def compute_dtype(spec: AttentionSpec, q_dtype: torch.dtype) -> torch.dtype:
    """float64 if q is float64 or the spec asks for it, else float32."""
    wide = q_dtype == torch.float64 or spec.softmax_dtype == "float64"
    return torch.float64 if wide else torch.float32


def check_inputs(q, k, v, captured, spec: AttentionSpec) -> None:
    """Shape checks shared by the op's real implementations (clear errors)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects 4-D q/k/v (B, H, L, D); got {q.dim()}, {k.dim()}, {v.dim()} dims")
    B, Hq, Lq, D = q.shape
    Bk, Hkv, Lk, Dk = k.shape
    if Dk != D:
        raise ValueError(f"q and k head dims differ: {D} vs {Dk}")
    if tuple(v.shape[:3]) != (Bk, Hkv, Lk):
        raise ValueError(f"v shape {tuple(v.shape)} does not match k shape {tuple(k.shape)} on (B, H, L)")
    if Bk not in (1, B):
        raise ValueError(f"k/v batch {Bk} must be 1 or q's batch {B}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"query heads {Hq} are not a multiple of key/value heads {Hkv} (GQA)")
    if spec.gqa_group not in (0, Hq // Hkv):
        raise ValueError(f"spec says GQA group {spec.gqa_group} but q/k give {Hq // Hkv}")
    if len(captured) != len(spec.captured):
        raise ValueError(f"spec has {len(spec.captured)} captured tensors, got {len(captured)}")
    for i, (t, c) in enumerate(zip(captured, spec.captured)):
        want = tuple(n if d else 1 for n, d in zip((B, c.h_size(Hq), Lq, c.kv_size(Lk)), c.dims))
        if t.dim() != 4 or any(s != w and s != 1 for s, w in zip(t.shape, want)) or \
                any(s != 1 and not d for s, d in zip(t.shape, c.dims)):
            names = [n for n, d in zip(DIM_NAMES, c.dims) if d]
            raise ValueError(f"captured t{i} has shape {tuple(t.shape)}; the spec expects it to vary "
                             f"along {names} only, i.e. shape {want} (size 1 elsewhere)")


def _setup(q, k, v, captured, spec, seed) -> _Problem:
    check_inputs(q, k, v, captured, spec)
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    if spec.dropout_p > 0 and seed is None:
        raise ValueError("spec has dropout_p > 0: pass an int64 seed tensor (e.g. torch.randint(2**62, ()))")
    bm, bn = choose_blocks(B, Hq, Lq, Lk)
    return _Problem(spec, q, k, v, list(captured), B, Hq, Hkv, Lq, Lk, D, Dv,
                    compute_dtype(spec, q.dtype), spec.scale_value(D), bm, bn,
                    None if seed is None or spec.dropout_p <= 0 else int(seed.item()))


# ---- block helpers ----------------------------------------------------------

def _grouped(x, pb: _Problem, M: int, cd) -> torch.Tensor:
    """(B, Hq, M, X) -> (B, Hkv, G*M, X): query heads of a KV head side by side."""
    return x.to(cd).reshape(x.shape[0], pb.Hkv, pb.G * M, x.shape[-1])


def _ungrouped(x, pb: _Problem, M: int) -> torch.Tensor:
    """(B, Hkv, G*M, X) -> (B, Hq, M, X)."""
    return x.reshape(x.shape[0], pb.Hq, M, x.shape[-1])


def _slice_captured(t, m0, m1, n0, n1, c: CapturedTensor, hq: int = 0):
    """The block (m0:m1, n0:n1) of captured ``t``; with ``hq``, its heads read
    at each of the hq query heads (``CapturedTensor.h_map``)."""
    t = t if t.shape[2] == 1 else t[:, :, m0:m1]
    if hq and c.h_map and t.shape[1] != 1:     # read at h // W or h % W
        t = t.index_select(1, c.h_index(torch.arange(hq, device=t.device)))
    if not c.dims[3]:
        return t
    if c.kv_map:    # a term of a split key axis: read at kv // W or kv % W
        return t.index_select(3, c.kv_index(torch.arange(n0, n1, device=t.device)))
    return t[:, :, :, n0:n1]


def _block_env(pb: _Problem, s, m0, m1, n0, n1) -> dict:
    dev = s.device
    env = {
        "score": s,
        "b": torch.arange(pb.B, device=dev).view(-1, 1, 1, 1),
        "h": torch.arange(pb.Hq, device=dev).view(1, -1, 1, 1),
        "q_idx": torch.arange(m0, m1, device=dev).view(1, 1, -1, 1),
        "kv_idx": torch.arange(n0, n1, device=dev).view(1, 1, 1, -1),
        "Lq": pb.Lq, "Lk": pb.Lk, "D": pb.D,
    }
    for i, t in enumerate(pb.captured):
        env[f"t{i}"] = _slice_captured(t, m0, m1, n0, n1, pb.spec.captured[i], pb.Hq)
    return env


def _block_scores(pb: _Problem, qg, m0, m1, n0, n1):
    """z = score_mod(scale * q kᵀ) for one block, and the evaluation env."""
    M = m1 - m0
    kb = pb.k[:, :, n0:n1].to(pb.cd)                          # (Bk, Hkv, N, D)
    s = _ungrouped(qg @ kb.transpose(-1, -2), pb, M).mul_(pb.scale)  # (B, Hq, M, N)
    env = _block_env(pb, s, m0, m1, n0, n1)
    if pb.spec.score_mod_is_identity:
        return s, env
    z = torch_eval.evaluate(pb.spec.score_mod, env)
    if pb.spec.rounds_scores:          # eager's float16/bfloat16 scores (AttentionSpec.rounds_scores)
        z = z.to(getattr(torch, pb.spec.score_dtype)).to(s.dtype)
    # callers update z in place: it must be a block of its own, not a captured input
    if z.shape != s.shape or any(z.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
                                 for t in env.values() if torch.is_tensor(t) and t is not s):
        z = torch.broadcast_to(z, s.shape).clone()
    return z, env


def _keep_scaled(pb: _Problem, env) -> Optional[torch.Tensor]:
    """keep / (1 - p) for the block, or None without dropout."""
    if pb.seed is None:
        return None
    keep = dropout_keep_mask(pb.seed, pb.spec.dropout_p, env["b"], env["h"], env["q_idx"], env["kv_idx"])
    return keep.to(pb.cd) * (1.0 / (1.0 - pb.spec.dropout_p))


def _zero_masked_(p, pb: _Problem, env):
    """P zeroed where the mask drops a score, for a ``zero_masked`` spec (in
    place; the softmax denominator has counted those keys already)."""
    if pb.spec.zero_masked:
        p.masked_fill_(~torch_eval.evaluate(pb.spec.mask_predicate, env).to(torch.bool), 0.0)
    return p


def _skippable(pb: _Problem):
    """A function (m0, m1, n0, n1) -> True when every score of the block is -inf
    for index reasons alone (causal / window blocks), so it adds nothing."""
    spec = pb.spec
    pred = spec.mask_predicate
    if spec.mask_fill != -math.inf or pred.free_symbols - {q_idx, kv_idx, Lq, Lk} or \
            torch_eval.can_evaluate(pred) is not None or spec.has_finite_fill:
        return lambda *a: False
    band = _relation_offsets(pred)            # kept iff lo <= kv_idx - q_idx <= hi
    if band is not None:
        lo, hi = (None if x is None else int(x.subs({Lq: pb.Lq, Lk: pb.Lk})) for x in band)
        # the block holds kv_idx - q_idx in [n0 - (m1 - 1), (n1 - 1) - m0]
        return lambda m0, m1, n0, n1: ((hi is not None and n0 - (m1 - 1) > hi) or
                                       (lo is not None and (n1 - 1) - m0 < lo))

    def skip(m0, m1, n0, n1):                 # any other index predicate: test the grid
        env = {"q_idx": torch.arange(m0, m1).view(-1, 1), "kv_idx": torch.arange(n0, n1).view(1, -1),
               "Lq": pb.Lq, "Lk": pb.Lk}
        return not bool(torch_eval.evaluate(pred, env).any())
    return skip


# ---- the output's layout ------------------------------------------------------

def output_strides(spec: AttentionSpec, B, H, L, Dv) -> tuple:
    """Strides of the op's (B, H, Lq, Dv) output: contiguous, or with
    ``spec.out_heads_inner`` laid out as (B, Lq, H, Dv) (SDPA's layout)."""
    if spec.out_heads_inner:
        return (L * H * Dv, Dv, H * Dv, 1)
    return (H * L * Dv, L * Dv, Dv, 1)


def empty_output(spec: AttentionSpec, B, H, L, Dv, device, dtype=None) -> torch.Tensor:
    """The op's output, allocated in the layout its fake promises."""
    return torch.empty_strided((B, H, L, Dv), output_strides(spec, B, H, L, Dv),
                               dtype=dtype or getattr(torch, spec.out_dtype), device=device)


def in_output_layout(out: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
    """``out`` itself when it has the promised strides, else a copy that has them."""
    return with_strides(out, output_strides(spec, *out.shape))


def with_strides(t: torch.Tensor, strides: Sequence) -> torch.Tensor:
    """``t`` itself when its strides are (provably, under symbolic sizes)
    ``strides``, else a copy laid out with them."""
    if statically_known_true(sym_eq(tuple(t.stride()), tuple(strides))):
        return t
    return torch.empty_strided(t.shape, tuple(strides), dtype=t.dtype, device=t.device).copy_(t)


# ---- forward ----------------------------------------------------------------

def attention_forward(q, k, v, captured: Sequence[torch.Tensor], spec: AttentionSpec,
                      seed: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, lse): out (B, Hq, Lq, Dv) in spec.out_dtype, lse (B, Hq, Lq) in the compute dtype."""
    pb = _setup(q, k, v, captured, spec, seed)
    out = empty_output(spec, pb.B, pb.Hq, pb.Lq, pb.Dv, q.device)
    lse = torch.empty(pb.B, pb.Hq, pb.Lq, dtype=pb.cd, device=q.device)
    skip = _skippable(pb)
    for m0 in range(0, pb.Lq, pb.bm):
        m1 = min(m0 + pb.bm, pb.Lq)
        o, l = _forward_rows(pb, m0, m1, skip)
        out[:, :, m0:m1] = o
        lse[:, :, m0:m1] = l
    return out, lse


def _forward_rows(pb: _Problem, m0: int, m1: int, skip):
    M, cd, dev = m1 - m0, pb.cd, pb.q.device
    qg = _grouped(pb.q[:, :, m0:m1], pb, M, cd)                   # (B, Hkv, G*M, D)
    m = torch.full((pb.B, pb.Hq, M), -math.inf, dtype=cd, device=dev)
    l = torch.zeros((pb.B, pb.Hq, M), dtype=cd, device=dev)
    acc = torch.zeros((pb.B, pb.Hq, M, pb.Dv), dtype=cd, device=dev)
    for n0 in range(0, pb.Lk, pb.bn):
        n1 = min(n0 + pb.bn, pb.Lk)
        if skip(m0, m1, n0, n1):
            continue
        z, env = _block_scores(pb, qg, m0, m1, n0, n1)           # (B, Hq, M, N)
        m_new = torch.maximum(m, z.amax(-1))
        # rows still all -inf: subtract 0 so exp(-inf) = 0, never exp(nan)
        m_sub = torch.where(m_new == -math.inf, 0.0, m_new)
        alpha = torch.exp(m - m_sub)                              # rescale of the old state
        p = z.sub_(m_sub[..., None]).exp_()                       # in place: z is done
        l = l * alpha + p.sum(-1)                                 # softmax denominator: no dropout
        _zero_masked_(p, pb, env)
        keep = _keep_scaled(pb, env)
        if keep is not None:
            p.mul_(keep)
        vb = pb.v[:, :, n0:n1].to(cd)                             # (Bk, Hkv, N, Dv)
        pv = _ungrouped(_grouped(p, pb, M, cd) @ vb, pb, M)       # (B, Hq, M, Dv)
        acc = acc * alpha[..., None] + pv
        m = m_new
    out = acc / l[..., None]              # fully -inf rows: 0/0 = nan, as eager softmax
    return out, m + torch.log(l)


# ---- backward ---------------------------------------------------------------

def attention_backward(dout, q, k, v, captured: Sequence[torch.Tensor], out, lse,
                       spec: AttentionSpec, seed: Optional[torch.Tensor], dlse: Optional[torch.Tensor] = None):
    """(dq, dk, dv, dcaptured): dcaptured lists the gradients of the captured
    tensors whose spec entry has requires_grad, in order; dtypes follow inputs.
    ``dlse``: the gradient of the forward's lse (d lse / d score = P), or None."""
    pb = _setup(q, k, v, captured, spec, seed)
    cd = pb.cd
    # d lse / d score = P: delta - dlse enters dz.  A row that keeps no key
    # (lse = -inf) has P = 0 there (attention sinks: eager's softmax gives it
    # all to the sink) and delta 0, not 0/0.  Without dlse such a row's P is
    # nan, as in eager's backward.
    if dlse is None:
        dlse = torch.zeros(lse.shape, dtype=cd, device=q.device)
        empty = torch.zeros(lse.shape, dtype=torch.bool, device=q.device)
    else:
        dlse, empty = dlse.to(cd), torch.isneginf(lse)
    # [Note: delta of the recomputed P]: exact rows take delta in _backward_rows
    one_pass = None if exact_rows(spec) else (dout.to(cd) * out.to(cd)).sum(-1)     # (B, Hq, Lq)
    dq = torch.zeros(q.shape, dtype=cd, device=q.device)
    dk = torch.zeros(k.shape, dtype=cd, device=q.device)
    dv = torch.zeros(v.shape, dtype=cd, device=q.device)
    grad_ids = [i for i, c in enumerate(spec.captured) if c.requires_grad]
    dcap = {i: torch.zeros(captured[i].shape, dtype=cd, device=q.device) for i in grad_ids}
    skip = _skippable(pb)
    for m0 in range(0, pb.Lq, pb.bm):
        m1 = min(m0 + pb.bm, pb.Lq)
        rows = (dout[:, :, m0:m1], lse[:, :, m0:m1].to(cd), empty[:, :, m0:m1], dlse[:, :, m0:m1],
                None if one_pass is None else one_pass[:, :, m0:m1])
        dq[:, :, m0:m1] = _backward_rows(pb, m0, m1, rows, dk, dv, dcap, skip)
    dcaptured = [dcap[i].to(captured[i].dtype) for i in grad_ids]
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dcaptured


def _backward_rows(pb: _Problem, m0, m1, rows, dk, dv, dcap, skip):
    """dQ of one query block; adds this block's share into dk, dv, dcap."""
    M, cd, spec = m1 - m0, pb.cd, pb.spec
    dout_b, lse_b, empty_b, dlse_b, delta_b = rows
    qg = _grouped(pb.q[:, :, m0:m1], pb, M, cd)                   # (B, Hkv, G*M, D)
    dog = _grouped(dout_b, pb, M, cd)                             # (B, Hkv, G*M, Dv)
    dqg = torch.zeros(qg.shape, dtype=cd, device=qg.device)
    shift = None
    if delta_b is None:                   # [Note: delta of the recomputed P]
        m, l, shift, delta_b = _row_stats_delta(pb, qg, dog, m0, m1, skip)
        stats = (m, l)
    else:
        # [Note: huge fills] lse = m + log l cannot hold log l when |m| is
        # large (a row of fills only: finfo.min, -1e9, -1e4); such rows get
        # (m, l) recomputed exactly.
        huge = (lse_b.abs() > _HUGE_LSE) & torch.isfinite(lse_b)
        stats = _row_stats_delta(pb, qg, None, m0, m1, skip)[:2] if bool(huge.any()) else None
    delta_b = (delta_b - dlse_b).masked_fill_(empty_b, 0.0)
    for n0 in range(0, pb.Lk, pb.bn):
        n1 = min(n0 + pb.bn, pb.Lk)
        if skip(m0, m1, n0, n1):
            continue
        z, env = _block_scores(pb, qg, m0, m1, n0, n1)           # (B, Hq, M, N)
        p = _probs_(z, lse_b, stats, empty_b)   # fully -inf rows: nan, as eager's backward
        p_zero = p == 0
        kb, vb = pb.k[:, :, n0:n1].to(cd), pb.v[:, :, n0:n1].to(cd)
        dp = _ungrouped(dog @ vb.transpose(-1, -2), pb, M)        # dO Vᵀ: (B, Hq, M, N)
        keep = _keep_scaled(pb, env)
        pd = _zero_masked_(p.clone(), pb, env) if pb.spec.zero_masked else p
        pd = pd if keep is None else pd * keep
        if keep is not None:
            dp.mul_(keep)
        if shift is not None:             # dP - c, then - delta: nothing cancels
            dp.sub_(shift[..., None])
        dz = dp.sub_(delta_b[..., None]).mul_(p).masked_fill_(p_zero, 0.0)
        dv[:, :, n0:n1] += _reduce_batch(_grouped(pd, pb, M, cd).transpose(-1, -2) @ dog, dv.shape[0])
        for i, acc in dcap.items():
            g = _masked_mul(dz, p_zero, spec.dcaptured[i], env)
            dims = [d for d in range(4) if acc.shape[d] == 1 and g.shape[d] != 1]
            g = g.sum(dims, keepdim=True) if dims else g
            c = spec.captured[i]
            if c.h_map and acc.shape[1] != 1:   # each head's share to its entry at h // W or h % W
                g = g.new_zeros(g.shape[:1] + acc.shape[1:2] + g.shape[2:]).index_add_(
                    1, c.h_index(torch.arange(g.shape[1], device=g.device)), g)
            if c.kv_map and acc.shape[3] != 1:  # each key's share to its entry at kv // W or kv % W
                rows = acc if acc.shape[2] == 1 else acc[:, :, m0:m1]
                rows.index_add_(3, c.kv_index(torch.arange(n0, n1, device=acc.device)), g)
            else:
                _slice_captured(acc, m0, m1, n0, n1, c).add_(g)
        ds = dz if spec.dscore == 1 else _masked_mul(dz, p_zero, spec.dscore, env, inplace=True)
        dsg = _grouped(ds, pb, M, cd).mul_(pb.scale)              # (B, Hkv, G*M, N)
        dqg += dsg @ kb
        # group rows are summed by the matmul; a broadcast k/v batch by .sum(0)
        dk[:, :, n0:n1] += _reduce_batch(dsg.transpose(-1, -2) @ qg, dk.shape[0])
    return _ungrouped(dqg, pb, M)


# |lse| beyond this: a row of fills, whose lse = m + log l lost log l to
# float32 rounding (spacing 2**-15 at 256, 64 at 1e9, so P = exp(z - lse) would
# be off); such rows get (m, l) recomputed (see the note in _backward_rows).
# The generated backward uses the same bound.
_HUGE_LSE = 256.0


# [Note: delta of the recomputed P]  dz = P ∘ (dP - delta) with delta =
# rowsum(P ∘ dP).  On a row that puts almost all its weight on one key r
# (P_r ≈ 1 - 1e-3, common in trained models) dP_r - delta is a difference
# ~1/(1 - P_r) times smaller than its terms, and the rounding of its terms
# becomes that key's error: FlashAttention's delta = rowsum(dO ∘ O), beside
# P = exp(z - lse), left dK/dQ of such rows 2.4x further from the float64
# golden than eager's softmax backward at the median, in float32.  Since
# rowsum P = 1, dP - delta = (dP - c) - rowsum(P ∘ (dP - c)) for any c; with
# c = dP_r, r's term is exactly 0 - delta, and delta a sum of small terms:
# no cancellation ([Note: the shift of dP] says when c is that).  So for
# ``exact_rows`` specs a first walk (online, as the forward: 2 matmuls per
# block) takes (m, l), c and delta = rowsum(P ∘ (dP - c)), and the second
# recomputes P = exp(z - m) / l and dz = P ∘ ((dP - c) - delta); such rows'
# dK/dQ land ~30x closer to the golden than eager's at the median
# (tests/test_attention_bwd.py, the one-hot rows test).
#
# [Note: the shift of dP]  Which c.  On a peaked row c = dP_r at the top
# key r: r's term dP_r - c is then exactly 0, and nothing of P_r ≈ 1 times a
# rounding is left in it (the one-hot rows test; a forget-gate bias's
# gradient, whose sum cancels there, needs it to the bit).  On a spread row
# (no key above half, as any model at initialisation) that shift added a
# rounding of dP's spread to every dz, and rowsum dz (exactly 0) came out ~3x
# further from 0 than eager's; that sum is all a gradient that is exactly 0
# keeps (a bias added to every key: a key projection's bias, LayerNorm's on
# pooled keys, q summed against rowsum dz), and such gradients failed
# golden-relative checks of diffusers and torchvision models.  There c is the
# P-weighted mean of dP, moved block by block as a running mean moves (each
# block's own weighted mean, merged by weight; the sum so far re-centred by
# (c_new - c) times its weight): dP - c is as small as dP's spread allows,
# whatever dP's common offset (a value bias makes every dP_k = dO·b_v + ...),
# and rowsum dz lands at or below eager's distance from 0.  The walk keeps
# both sums and takes the top key's where l <= 2 (its own e is 1: it holds at
# least half).  Both sums weigh P as zeroed (a zero_masked spec's dropped keys
# count in l, not in delta).
# The generated backward does the same ([Note: exact rows]).  A 16-bit
# spec's own rounding (eager rounds its O, P and dP to 16 bits) is far
# larger: there the one-pass form stays, as in the kernels.

def exact_rows(spec: AttentionSpec) -> bool:
    """Whether the backward takes its row statistics and delta from a walk
    over the keys ([Note: delta of the recomputed P]): specs whose eager
    scores and P·V are float32 or float64.  Where eager multiplies P by V in
    16 bits (q and k upcast beside a bfloat16 v, GPT-NeoX's scores) its dP is
    16-bit too, and the one-pass form is as close."""
    wide = ("float32", "float64")
    return spec.score_dtype in wide and spec.prob_dtype in wide


def _row_stats_delta(pb: _Problem, qg, dog, m0, m1, skip):
    """(m, l, c, delta) of a query block: the row max m (0 for all -inf rows),
    the sum l = rowsum exp(z - m), the shift c ([Note: the shift of dP]: dP at
    the row's top key where that key holds at least half of the row, else the
    P-weighted mean of dP; 0 for a row without a key) and delta = rowsum(P ∘
    (dP - c)) over the P the walk of _backward_rows recomputes (zeroed where a
    zero_masked spec drops) and dP = (dO Vᵀ) ∘ keep / (1-p); c and delta are
    None without ``dog`` (dO grouped)."""
    M, cd = m1 - m0, pb.cd
    m = torch.full((pb.B, pb.Hq, M), -math.inf, dtype=cd, device=qg.device)
    l = torch.zeros_like(m)
    top, acc_top = torch.zeros_like(m), torch.zeros_like(m)      # shifted by the top key's dP
    mean, acc_mean = torch.zeros_like(m), torch.zeros_like(m)    # by the running mean of dP
    w = torch.zeros_like(m)               # the weight both sums hold: rowsum of P as zeroed
    for n0 in range(0, pb.Lk, pb.bn):
        n1 = min(n0 + pb.bn, pb.Lk)
        if skip(m0, m1, n0, n1):
            continue
        z, env = _block_scores(pb, qg, m0, m1, n0, n1)
        tile_max = z.amax(-1)
        is_top = (z == tile_max[..., None]) if dog is not None else None     # before z turns into e
        m_new = torch.maximum(m, tile_max)
        m_sub = torch.where(m_new == -math.inf, 0.0, m_new)
        alpha = torch.exp(m - m_sub)
        e = z.sub_(m_sub[..., None]).exp_()
        l = l * alpha + e.sum(-1)         # denominator: before any zeroing
        if dog is not None:
            vb = pb.v[:, :, n0:n1].to(cd)
            dp = _ungrouped(dog @ vb.transpose(-1, -2), pb, M)    # as _backward_rows computes it
            keep = _keep_scaled(pb, env)
            if keep is not None:
                dp.mul_(keep)
            _zero_masked_(e, pb, env)
            kept = w * alpha              # the weight so far, rescaled
            ws = e.sum(-1)
            # a new row max moves the top shift to this block's top key (the
            # largest dP among tied keys, as the kernels); the mean moves to the
            # mean of the weights so far and this block's; each sum so far moves
            # with its shift.  0 where P is 0: a masked key's dP may be inf/nan
            top_new = torch.where(tile_max > m, torch.where(is_top, dp, -math.inf).amax(-1), top)
            block_mean = torch.where(e == 0, 0.0, e * dp).sum(-1) / torch.where(ws > 0, ws, 1.0)
            mean_new = torch.where(ws > 0, mean + ws * (block_mean - mean) / (kept + ws), mean)
            acc_top = acc_top * alpha - (top_new - top) * kept \
                + torch.where(e == 0, 0.0, e * (dp - top_new[..., None])).sum(-1)
            acc_mean = acc_mean * alpha - (mean_new - mean) * kept \
                + torch.where(e == 0, 0.0, e * (dp - mean_new[..., None])).sum(-1)
            w = kept + ws
            top, mean = top_new, mean_new
        m = m_new
    m = torch.where(m == -math.inf, 0.0, m)
    if dog is None:
        return m, l, None, None
    peaked = l <= 2.0                     # the top key (its e is 1) holds at least half of the row
    return m, l, torch.where(peaked, top, mean), torch.where(peaked, acc_top, acc_mean) / l


def _probs_(z, lse_b, stats, empty):
    """P = exp(z - lse), or exp(z - m) / l from the row statistics ``stats``;
    in place on z.  A row that keeps no key whose lse the backward reads
    (``empty``: P = 0, see attention_backward) stays 0, not 0/0."""
    if stats is None:
        p = z.sub_(lse_b[..., None]).exp_()
    else:
        m, l = stats
        p = z.sub_(m[..., None]).exp_().div_(l[..., None])
    return p.masked_fill_(empty[..., None], 0.0)


def _masked_mul(dz, p_zero, expr, env, inplace=False):
    """dz * expr, exactly 0 where P == 0 (expr may be inf/nan at masked
    positions) or where expr == 0: a zero derivative selects, as eager's
    masked_fill / where backward does, so a nan dz (fully -inf row) stays out."""
    d = torch_eval.evaluate(expr, env)
    out = dz.mul_(d) if inplace else dz * d
    return out.masked_fill_(p_zero | (d == 0), 0.0)


def _reduce_batch(x, batch: int):
    return x.sum(0, keepdim=True) if batch == 1 and x.shape[0] != 1 else x
