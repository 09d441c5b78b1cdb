"""Launchers of the generated Triton kernels (forward, backward, decode).

Entry points, each computing exactly what ``reference.attention_forward`` /
``attention_backward`` compute, for one AttentionSpec:

    forward(q, k, v, captured, spec, seed, config=None)  -> (out, lse)
    backward(dout, q, k, v, captured, out, lse, spec, seed, config=None)
                                                        -> (dq, dk, dv, dcaptured)
    decode(q, k, v, captured, spec, seed=None, config=None, splits=None) -> (out, lse)

Shapes as in ``attn_compiler.ops``: q (B, Hq, Lq, D), k/v (B|1, Hkv, Lk, D|Dv),
captured tensors 4-D broadcastable to (B, Hq, Lq, Lk); any strides (no copies
of q/k/v).  ``config`` is an ``autotune.KernelConfig`` (None: the default).
The kernels' source comes from ``templates/`` through ``templates.codegen``.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence, Tuple

import torch

from attn_compiler import autotune, reference
from attn_compiler.passes.analyze.spec import AttentionSpec
from attn_compiler.templates import codegen

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
log = logging.getLogger(__name__)

# ---- launches, and compiling without launching ------------------------------------

_COMPILE_ONLY = contextvars.ContextVar("attn_compiler_compile_only", default=False)


def _grid(kernel, grid):
    """``kernel[grid]``, the launch; inside :func:`precompile` its compile only."""
    if _COMPILE_ONLY.get():
        return functools.partial(kernel.warmup, grid=grid)
    if _fast_launches:
        return functools.partial(_launch, kernel, grid)
    return kernel[grid]


# [Note: fast launches]  ``kernel[grid](*args)`` costs ~57 µs of host time on
# the H200's host (Triton binds and specialises every argument, builds the cache
# key and reads its knobs on every call), where the compiled kernel's own
# launcher takes ~12 µs; with three launches per forward+backward the op was
# host-bound below ~1k tokens (bench/RESULTS.md run 29).  ``_launch`` keeps the
# compiled kernel of each (kernel, device, argument fingerprint, constexprs) and
# calls its launcher directly.  The fingerprint determines Triton's
# specialisation: int arguments by value (large ones by class and divisibility
# by 16, as Triton specialises them), tensors by dtype and 16-byte alignment,
# floats by value (a launcher's floats are fixed per spec).  The first call of
# a fingerprint goes through ``kernel[grid]`` (compiling if needed); any
# argument of another type, a launch hook (profilers), torch without CUDA, or
# Triton's interpreter keeps the normal path.
_fast_launches = os.environ.get("TRITON_INTERPRET") != "1"
_launchers: dict = {}
_MAX_LAUNCHERS = 4096
_NO_FAST = object()
_I32 = (-(2**31), 2**31 - 1)


def _arg_key(a):
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() % 16 == 0
    if isinstance(a, bool) or a is None:
        return a
    if isinstance(a, int):
        return ("u64" if a >= 2**63 else "i64", a % 16 == 0)      # beyond int32 (the rest are keyed by value)
    if isinstance(a, float):
        return float, (a if a == a else "nan")
    raise TypeError(type(a))


def _launch(kernel, grid, *args, **kw):
    import triton

    hooks = triton.knobs.runtime
    if _hooked(hooks.launch_enter_hook) or _hooked(hooks.launch_exit_hook):
        return kernel[grid](*args, **kw)
    lo, hi = _I32
    tensor = torch.Tensor
    try:   # _arg_key's values, with the common cases inline (a list comprehension: ~40 % faster)
        fp = tuple([a if type(a) is int and lo <= a <= hi
                    else (a.dtype, not a.data_ptr() & 15) if type(a) is tensor else _arg_key(a) for a in args])
    except TypeError:
        return kernel[grid](*args, **kw)
    try:
        dev = torch.cuda.current_device()
    except (AssertionError, RuntimeError):      # torch without CUDA under a driver that compiles for a GPU
        return kernel[grid](*args, **kw)
    key = (kernel, dev, fp, tuple(kw.items()))
    hit = _launchers.get(key)
    if hit is None:
        compiled = kernel[grid](*args, **kw)
        if len(_launchers) >= _MAX_LAUNCHERS:
            _launchers.clear()
        _launchers[key] = _launcher_entry(kernel, compiled, len(args), kw)
        return compiled
    if hit is _NO_FAST:
        return kernel[grid](*args, **kw)
    compiled, tail = hit
    stream = torch._C._cuda_getCurrentRawStream(dev)
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    compiled.run(grid[0], g1, g2, stream, compiled.function, compiled.packed_metadata, None, None, None,
                 *args, *[kw[n] if n in kw else d for n, d in tail])
    return compiled


def _hooked(hook) -> bool:
    """Whether a Triton launch hook would run: a callable, or a non-empty
    chain of them (Triton 3.6 keeps empty chains by default)."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _launcher_entry(kernel, compiled, n_args: int, kw: dict):
    """(compiled kernel, [(name, default)] of the parameters after the
    positional ones) for ``_launch``, or _NO_FAST when the launch cannot be
    replayed from its arguments alone."""
    import inspect

    if not hasattr(kernel, "signature"):
        return _NO_FAST
    params = list(kernel.signature.parameters.values())
    jit_params = getattr(kernel, "params", ())
    if (getattr(compiled, "function", None) is None or not hasattr(compiled, "packed_metadata")
            or hasattr(compiled, "result") or len(params) < n_args or len(jit_params) != len(params)
            or any(p.is_constexpr for p in jit_params[:n_args])):     # constexprs keyed by value only in kw
        return _NO_FAST
    tail = []
    for p in params[n_args:]:
        if p.name not in kw and p.default is inspect.Parameter.empty:
            return _NO_FAST
        tail.append((p.name, p.default))
    return compiled, tuple(tail)


def precompile(calls: Sequence, workers: Optional[int] = None) -> None:
    """Compile the kernels of every launcher call in ``calls`` (zero-argument
    callables running forward/backward/decode) at once, on a thread pool,
    launching nothing (Triton's AsyncCompileMode): the tuner's timing runs then
    find them compiled, and a first call's tuning waits about as long as its
    slowest candidate's compile rather than all of them in turn.  A call that
    fails here (a config its launcher refuses, a compile error) is left to
    fail again, and be reported, when it is timed."""
    import triton

    mode = getattr(triton, "AsyncCompileMode", None)
    if mode is None or len(calls) < 2:
        return
    workers = workers or max(1, min(len(calls) * 2, os.cpu_count() or 1, 16))
    token = _COMPILE_ONLY.set(True)
    try:
        with ThreadPoolExecutor(workers) as pool, mode(pool, ignore_errors=True):
            for call in calls:
                try:
                    call()
                except Exception:  # noqa: BLE001 - see above
                    log.debug("precompile: a call failed", exc_info=True)
    finally:
        _COMPILE_ONLY.reset(token)


def _pow2(n: int, least: int = 16) -> int:
    """Next power of two, at least ``least`` (tile widths)."""
    return max(least, autotune.next_pow2(n))


def is_hopper(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.get_device_capability(t.device)[0] >= 9


def default_config(family: str, q: torch.Tensor) -> autotune.KernelConfig:
    """The config a launch without one runs (``autotune.default_config``)."""
    return autotune.default_config(family, q.shape[-1], q.dtype, hopper=is_hopper(q))


_allocator_set = False


def _tma_ready(spec: AttentionSpec, captured: Sequence[torch.Tensor], tiles: dict, rows: bool = False) -> None:
    """Check that the tensors a "tma" config reads through tensor descriptors
    suit them: ``tiles`` ({name: tensor}: the forward's K and V, the
    backward's Q, K, V and dO), the captured planes (``codegen.tma_planes``:
    a learned bias) and, with ``rows`` (the forward), the captured rows
    (``codegen.tma_rows``: a padding mask), else ValueError (the tuner drops
    the candidate); give Triton the scratch allocator device-side
    descriptors need (once, on first use)."""
    global _allocator_set
    for name, t in tiles.items():
        d = t.shape[-1]
        if t.stride(-1) != 1 or _pow2(d) != d:
            raise ValueError(f"tma variant: {name} needs a unit head-dim stride and a power-of-two head dim")
        if not _rows_aligned(t, t.stride()[:-1]):
            raise ValueError(f"tma variant: {name} rows must be 16-byte aligned")
    for i in codegen.tma_planes(spec) + (codegen.tma_rows(spec) if rows else []):
        t = captured[i]
        if t.stride(3) != 1:
            raise ValueError(f"tma variant: captured tensor {i} needs a unit stride along the keys")
        # only the axes the kernel indexes: broadcast (size-1) axes contribute no offset
        if not _rows_aligned(t, [st for n, st in zip(t.shape[:3], t.stride()[:3]) if n > 1]):
            raise ValueError(f"tma variant: captured tensor {i} rows must be 16-byte aligned")
    if not _allocator_set and any(t.is_cuda for t in (*tiles.values(), *captured)):
        import triton

        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        _allocator_set = True


def _rows_aligned(t: torch.Tensor, strides) -> bool:
    """Whether ``t`` starts, and each of its rows along ``strides`` starts, on 16 bytes."""
    size = t.element_size()
    return not (any((st * size) % 16 for st in strides) or t.data_ptr() % 16)


# The kernels offset a (batch, head) base pointer in int64 and index inside it
# in int32: (rows, head dim) of q/k/v/out, (q, kv) of a captured plane.
INT32_MAX = 2**31 - 1


def in_head_extent(t: torch.Tensor) -> int:
    """Largest element offset inside one (batch, head) slice of a 4-D tensor:
    what the kernels index in int32."""
    return _in_head_extent(t.shape, t.stride())


def _in_head_extent(shape: Sequence[int], strides: Sequence[int]) -> int:
    return sum((n - 1) * abs(st) for n, st in zip(shape[2:], strides[2:]) if n > 0)


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec,
                       captured: Sequence[torch.Tensor] = ()) -> Optional[str]:
    """None when the Triton kernels run this call, else why they do not."""
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype not in _DTYPES:
        return (f"dtypes q {q.dtype}, k {k.dtype}, v {v.dtype} (kernels take float16/bfloat16/float32, "
                f"q and k alike)")
    if q.shape[-1] > 256 or v.shape[-1] > 256:
        return f"head dim {max(q.shape[-1], v.shape[-1])} > 256"
    out_shape = (q.shape[0], q.shape[1], q.shape[2], v.shape[3])
    operands = [("q", q.shape, q.stride()), ("k", k.shape, k.stride()), ("v", v.shape, v.stride()),
                ("the output", out_shape, reference.output_strides(spec, *out_shape))]
    operands += [(f"captured tensor {i}", c.shape, c.stride()) for i, c in enumerate(captured)]
    for name, shape, strides in operands:
        if len(shape) == 4 and _in_head_extent(shape, strides) > INT32_MAX:
            return (f"{name} {tuple(shape)} with strides {tuple(strides)}: offsets inside one (batch, head) "
                    f"exceed int32")
    return codegen.unsupported_reason(spec)


# ---- shared launch facts -------------------------------------------------------

def _strides(t: torch.Tensor, broadcast_batch: bool = False) -> List[int]:
    s = list(t.stride())
    if broadcast_batch and t.shape[0] == 1:
        s[0] = 0
    return s


def captured_args(captured: Sequence[torch.Tensor]) -> list:
    """Pointer and (b, h, q, kv) strides per captured tensor; 0 on broadcast axes."""
    out = []
    for t in captured:
        out.append(t)
        out += [0 if n == 1 else s for n, s in zip(t.shape, t.stride())]
    return out


def dropout_x0(seed: Optional[torch.Tensor], spec: AttentionSpec) -> int:
    """The seed's hash-chain prefix, + 2**40 (see _dropout_row_key)."""
    if spec.dropout_p <= 0:
        return 1 << 40
    if seed is None:
        raise ValueError("spec has dropout_p > 0: pass an int64 seed tensor")
    s = int(seed.item())
    x = reference._hash32(reference._hash32(s & reference._M32) ^ ((s >> 32) & reference._M32))
    return int(x) + (1 << 40)


@dataclasses.dataclass(frozen=True)
class MaskPlan:
    """How a kernel walks the KV blocks: MODE 0 no mask, 1 band, 2 general."""

    mode: int
    lo: int = 0
    hi: int = 0
    has_lo: bool = False
    has_hi: bool = False
    empty_rows: bool = False     # a band that leaves some query row no key at all
    fill_rows: bool = False      # block map of a finite-fill mask: see attention_block_runs


def mask_plan(spec: AttentionSpec, lq: int, lk: int) -> MaskPlan:
    """How the kernels walk KV blocks for this spec and lengths (cached)."""
    return _mask_plan(spec.dumps(), int(lq), int(lk))


# [Note: additive tensor masks]  A float tensor added to the scores as it is
# (``g(score) + t``, AttentionSpec.additive_masks) may be a mask the analysis
# cannot see: Hugging Face's generation passes its causal, padding and
# static-cache masks as a precomputed (B, 1, Lq, Lk) input of 0 and finfo.min.
# Where the keys are many (ADDITIVE_MAP_MIN_KEYS) the block map tests
# ``t > MASK_FILL_THRESHOLD`` (AttentionSpec.tile_predicate): a tile whose
# values are all at or below it adds exactly 0 to a row that keeps some key
# (exp(fill - rowmax) underflows, as in eager), so it is skipped in query
# blocks whose every row keeps a key (FILL_ROWS: a row of fills only is
# uniform in eager); every other tile still adds the tensor's values.  A
# mask predicate beside the tensor (a causal band) is part of the same test,
# so the map also drops the tiles the predicate drops: the band's walk is not
# used then.  Fewer keys leave little to skip for the map's two launches.
ADDITIVE_MAP_MIN_KEYS = 256


@functools.lru_cache(maxsize=4096)
def _mask_plan(text: str, lq: int, lk: int) -> MaskPlan:
    spec = AttentionSpec.loads(text)
    pred = spec.mask_predicate
    band = codegen.band_of(spec)
    if spec.additive_masks and lk >= ADDITIVE_MAP_MIN_KEYS:
        # beside a band too: the map drops the tiles outside it as well, and
        # the band's inner tiles become ZERO where the tensor is 0 there
        return MaskPlan(3, fill_rows=True)
    if pred is True or str(pred) == "True":
        return MaskPlan(0)
    if band is None:
        # a tensor or other predicate: a block map skips dropped tiles; with a
        # finite fill only where every row of the query block keeps some key (a
        # row of fills only is uniform over every key, as in eager)
        return MaskPlan(3, fill_rows=spec.has_finite_fill)
    lo, hi = band.at(lq, lk)
    # row q keeps [max(0, q+lo), min(lk-1, q+hi)]; the rows keeping nothing sit
    # at the two ends, so the end rows tell whether any exists
    empty = any((0 if lo is None else max(0, row + lo)) > (lk - 1 if hi is None else min(lk - 1, row + hi))
                for row in (0, lq - 1))
    if empty and spec.has_finite_fill:
        return MaskPlan(2)        # a row of fills only is uniform: every block counts
    return MaskPlan(1, lo or 0, hi or 0, lo is not None, hi is not None, empty_rows=empty)


def _map_axes(spec: AttentionSpec) -> Tuple[bool, bool, bool]:
    """Whether the mask predicate varies along (b, h, q_idx) (cached per spec)."""
    return _map_axes_of(spec.dumps())


@functools.lru_cache(maxsize=512)
def _map_axes_of(text: str) -> Tuple[bool, bool, bool]:
    import sympy
    from sympy.core.function import AppliedUndef

    from attn_compiler.passes.analyze import spec as S

    spec = AttentionSpec.loads(text)
    pred = spec.tile_predicate
    caps = [spec.captured[i] for i in S.captured_reads(pred, len(spec.captured))]
    syms = pred.xreplace({f: sympy.Dummy() for f in pred.atoms(AppliedUndef)}).free_symbols   # reads outside tensors
    return tuple(sym in syms or any(c.dims[d] for c in caps) for d, sym in enumerate((S.b, S.h, S.q_idx)))


RUNS_CHUNK = 1024     # map entries one program reads at once while it writes the runs
MAP_ROWS_PER_STEP = 32    # rows of a tile the map's kinds kernel reads at once (run 141)


def block_map(mod, spec: AttentionSpec, captured, B: int, Hq: int, Lq: int, Lk: int, bm: int, bn: int,
              cols: bool = False, device: Optional[torch.device] = None):
    """(Map, sm_b, sm_h, sm_m): the int32 tile map of a tensor mask for (bm, bn)
    tiles: the generated ``attention_block_kinds`` (one program per tile) writes
    each tile's kind and ``attention_block_runs`` the end of its run along the
    row, or with ``cols`` ``attention_block_map_cols`` down the column (the
    dK/dV walk).  On ``device`` (the queries'; by default the captured
    tensors'): a mask of index arithmetic alone (a block-diagonal document
    mask) captures no tensor."""
    ub, uh, uq = _map_axes(spec)
    nb, nh, nm = (B if ub else 1), (Hq if uh else 1), (triton_cdiv(Lq, bm) if uq else 1)
    n_blk = triton_cdiv(Lk, bn)
    dev = device if device is not None else captured[0].device
    m = torch.empty((nb, nh, nm, n_blk), dtype=torch.int32, device=dev)
    sb, sh, sm = (m.stride(0) if ub else 0), (m.stride(1) if uh else 0), (m.stride(2) if uq else 0)
    # a mask that does not vary along the queries (key padding) has one map row
    # for every query block, and its rows are all alike: 16 of them make the
    # row of tiles, not bm (a quarter of the work at bm = 64)
    rows = bm if uq else min(bm, 16)
    fill_rows = mask_plan(spec, Lq, Lk).fill_rows
    # each row's count of kept keys (a finite fill); else never read: the map stands in
    kept = torch.zeros((nb * nh, nm * rows), dtype=torch.int32, device=dev) if fill_rows else m
    # one warp per tile: its sums stay within the warp (4 warps took 2-3x as long, run 88),
    # reading MAP_ROWS_PER_STEP rows at a time (a whole 128-row tile of a float plane
    # spilled: a static cache's 4096x8192 mask 55-60 -> 25-33 us, run 141)
    _grid(mod.attention_block_kinds, (n_blk, nm, nb * nh))(m, sb, sh, sm, kept, nm * rows, nb, nh,
                                                           *captured_args(captured), Lq, Lk, TILE_M=rows,
                                                           BLOCK_M=min(rows, MAP_ROWS_PER_STEP), BLOCK_N=bn,
                                                           FILL_ROWS=fill_rows, num_warps=1)
    _grid(mod.attention_block_runs, (nm, nb * nh))(m, sb, sh, sm, kept, nm * rows, nh, Lq, n_blk, BLOCK_M=rows,
                                                    CHUNK=min(_pow2(n_blk), RUNS_CHUNK), FILL_ROWS=fill_rows)
    if cols:
        c = torch.empty_like(m)
        _grid(mod.attention_block_map_cols, (n_blk, nb * nh))(c, m, sb, sh, sm, nh, nm,
                                                              CHUNK=min(_pow2(nm), RUNS_CHUNK))
        m = c
    return m, sb, sh, sm


def _dot_precision(dtype: torch.dtype) -> str:
    """How a tile's products run (16-bit inputs: natively).  Float32 inputs
    follow PyTorch's float32 matmul precision (``autotune.tf32_allowed``), as
    eager's matmuls do: "highest" (the default) as three tf32 products per product
    (near-float32 accuracy on the tensor cores; "ieee" runs on the FMA units
    and compiles slowly at 128-wide tiles), "high" or "medium" (TF32 allowed:
    ``torch.backends.cuda.matmul.allow_tf32 = True``,
    ``set_float32_matmul_precision("high")``) as one tf32 product, about 3x
    the speed at ~3e-4 relative error, eager's own there."""
    if dtype != torch.float32:
        return "tf32"
    return "tf32" if autotune.tf32_allowed() else "tf32x3"


# ---- forward ---------------------------------------------------------------------

# [Note: launch plans]  What a launcher derives from the call's spec, config,
# shapes, strides and dtypes (tiles, grid, mask plan, scale, strides,
# constexprs; the input checks) is computed once per such signature and kept
# (``_plan``): a call then allocates its outputs and launches.  What depends on
# the tensors' values or addresses is done per call: block maps, dropout seeds,
# the descriptor variant's alignment checks.
_plans: dict = {}
_MAX_PLANS = 4096


def _plan(key: tuple, build):
    hit = _plans.get(key)
    if hit is None:
        hit = build()
        if len(_plans) >= _MAX_PLANS:
            _plans.clear()
        _plans[key] = hit
    return hit


def _contiguous_strides(shape) -> tuple:
    """Strides of a contiguous tensor of ``shape`` (what torch.empty allocates)."""
    return torch.empty(shape, device="meta").stride()


def _call_key(family: str, spec: AttentionSpec, config, q, k, v, captured) -> tuple:
    return (family, spec.dumps(), config, q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(),
            q.dtype, k.dtype, v.dtype, q.device, tuple((t.shape, t.stride(), t.dtype) for t in captured),
            _exact_rows, q.dtype == torch.float32 and autotune.tf32_allowed())


@dataclasses.dataclass(frozen=True)
class _FwdPlan:
    out_shape: tuple
    out_dtype: torch.dtype
    empty: bool
    mode3: bool
    tma: bool
    grid: tuple
    bm: int
    bn: int
    args: tuple          # between the captured tensors and the dropout seed
    tail: tuple          # after it
    kw: dict


def _fwd_plan(q, k, v, captured, spec: AttentionSpec, config) -> _FwdPlan:
    reference.check_inputs(q, k, v, captured, spec)
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    t = config or default_config("fwd", q)
    bm, bn = min(t.block_m, _pow2(Lq)), min(t.block_n, _pow2(Lk))
    out_shape = (B, Hq, Lq, Dv)
    plan = mask_plan(spec, Lq, Lk)
    scale = spec.scale_value(D)
    args = (*_strides(q), *_strides(k, True), *_strides(v, True), *reference.output_strides(spec, *out_shape),
            Hq, Hq // Hkv, Lq, Lk, scale, scale * codegen.LOG2E)
    kw = dict(HEAD_D=D, HEAD_DV=Dv, BLOCK_D=_pow2(D), BLOCK_DV=_pow2(Dv), BLOCK_M=bm, BLOCK_N=bn,
              MODE=plan.mode, HAS_LO=plan.has_lo, HAS_HI=plan.has_hi,
              EVEN_M=Lq % bm == 0, EVEN_N=Lk % bn == 0, DROPOUT=spec.dropout_p > 0,
              DOT_PREC=_dot_precision(q.dtype), TMA=t.variant == "tma", num_warps=t.num_warps,
              num_stages=t.num_stages)
    return _FwdPlan(out_shape, getattr(torch, spec.out_dtype), B * Hq * Lq * Dv == 0, plan.mode == 3,
                    t.variant == "tma", (triton_cdiv(Lq, bm), B * Hq), bm, bn, args,
                    (1.0 / (1.0 - spec.dropout_p), plan.lo, plan.hi), kw)


def forward(q, k, v, captured: Sequence[torch.Tensor], spec: AttentionSpec,
            seed: Optional[torch.Tensor] = None, config=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) from the generated forward kernel (see module doc)."""
    p = _plan(_call_key("fwd", spec, config, q, k, v, captured),
              lambda: _fwd_plan(q, k, v, captured, spec, config))
    out = reference.empty_output(spec, *p.out_shape, q.device, p.out_dtype)
    lse = torch.empty(p.out_shape[:3], dtype=torch.float32, device=q.device)
    if p.empty:
        return out, lse.fill_(-math.inf)
    mod = codegen.load("fwd", spec)
    B, Hq, Lq, _ = q.shape
    bmap = (block_map(mod, spec, captured, B, Hq, Lq, k.shape[2], p.bm, p.bn, device=q.device) if p.mode3
            else (lse, 0, 0, 0))
    if p.tma:
        _tma_ready(spec, captured, {"k": k, "v": v}, rows=True)
    _grid(mod.attention_fwd, p.grid)(
        q, k, v, out, lse, *bmap, *captured_args(captured), *p.args, dropout_x0(seed, spec), *p.tail, **p.kw)
    return out, lse


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---- backward --------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _BwdPlan:
    """The static part of a backward call ([Note: launch plans])."""
    grad_ids: tuple
    empty: bool
    pre_grid: tuple
    qkv_strides: tuple       # q, k (batch-broadcast 0), v
    pre_tail: tuple
    pre_kw: dict
    variant: str             # "fused", "paired" or "two" (dK/dV then dQ)
    mode3: bool
    tiles: tuple             # (bm, bn) of dK/dV (or the one launch), (bm2, bn2) of dQ
    tma: bool
    tma_tiles: bool          # tma reads Q, dO, K, V through descriptors (no query-by-key term)
    grad_strides: tuple      # per gradient buffer, 0 on broadcast axes
    after_seed: tuple        # the dropout seed's followers: its scale and the band
    one_grid: tuple
    one_tail: tuple          # fused/paired: after dO's strides, up to the seed
    one_after: tuple         # and after it
    one_kw: dict
    dkdv_grid: tuple
    dkdv_tail: tuple
    dkdv_kw: dict
    dq_grid: tuple
    dq_tail: tuple
    dq_kw: dict


def _bwd_plan(q, k, v, captured, spec: AttentionSpec, config) -> _BwdPlan:
    reference.check_inputs(q, k, v, captured, spec)
    B, Hq, Lq, D = q.shape
    Bk, Hkv, Lk, Dv = k.shape[0], k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    t = config or default_config("bwd", q)
    bm, bn = min(t.block_m, _pow2(Lq)), min(t.block_n, _pow2(Lk))
    grad_ids = tuple(i for i, c in enumerate(spec.captured) if c.requires_grad)
    plan = mask_plan(spec, Lq, Lk)
    scale = spec.scale_value(D)
    scale2 = scale * codegen.LOG2E
    consts = dict(HEAD_D=D, HEAD_DV=Dv, BLOCK_D=_pow2(D), BLOCK_DV=_pow2(Dv), DOT_PREC=_dot_precision(q.dtype))
    grad_strides = tuple(tuple(0 if n == 1 else st
                               for n, st in zip(captured[i].shape, _contiguous_strides(captured[i].shape)))
                         for i in grad_ids)
    pow2_d = _pow2(D) == D and _pow2(Dv) == Dv
    launch = dict(BLOCK_M=bm, BLOCK_N=bn, MODE=plan.mode, HAS_LO=plan.has_lo, HAS_HI=plan.has_hi,
                  EVEN_N=Lk % bn == 0 and Lq % bm == 0 and pow2_d, DROPOUT=spec.dropout_p > 0, num_warps=t.num_warps,
                  num_stages=t.num_stages, **consts)
    drop_scale = 1.0 / (1.0 - spec.dropout_p)
    broadcast = Bk == 1 and B > 1
    mode_kv = plan.mode
    if plan.empty_rows:
        # [Note: fully masked rows] eager's dV is nan at every key of a head with
        # a row that keeps no key: dK/dV walk every block for such a band
        mode_kv = 2
    # dQ owns the long side of the tile along the queries (see the template's note),
    # or the config's own dQ tile
    m2, n2, warps2, stages2 = t.dq_launch()
    bm2, bn2 = min(m2, _pow2(Lq)), min(n2, _pow2(Lk))
    even_q = Lk % bn2 == 0 and pow2_d
    band = (plan.lo, plan.hi)
    tma = t.variant == "tma"          # Q, dO, K, V tiles or captured planes through tensor descriptors
    if tma and not codegen.tma_planes(spec) and not codegen.no_planes(spec):
        raise ValueError("tma variant: the backward reads no tile through a descriptor here "
                         "(a captured query-by-key term that is not a float plane)")
    launch["TMA"] = tma
    dq_s, dk_s, dv_s = (_contiguous_strides(t.shape) for t in (q, k, v))
    variant, one_grid, one_tail, one_after, one_kw = "two", (), (), (), {}
    if t.variant in ("fused", "paired"):
        if (bm2, bn2) != (bn, bm):
            # one launch runs dQ on the mirrored tile; clamped to short lengths
            # the two differ (the tuner drops the candidate: ptr is the same)
            raise ValueError(f"{t.variant} variant: tiles {bm}x{bn} and {bm2}x{bn2} do not mirror")
        nkv, nq = triton_cdiv(Lk, bn), triton_cdiv(Lq, bm2)
        variant = t.variant
        one_grid = ((nkv + nq * G * (B if broadcast else 1), Bk * Hkv) if variant == "fused"
                    else (max(nkv, nq), Bk * Hkv))
        one_tail = (*dq_s, *dk_s, *dv_s, B, Hq, Hkv, G, Lq, Lk, scale, scale2)
        one_after = (drop_scale, *band, nkv, nq)
        one_kw = dict(MODE_KV=mode_kv, KV_BATCH_BROADCAST=broadcast, EVEN_Q=even_q, **launch)
    pre_m, pre_n, pre_launch = 64, 32, {}
    if _exact(spec, q):
        # [Note: exact rows] the preprocess's walk takes dO·Vᵀ on the dQ
        # kernel's rows and warps, so the dP it shifts by is dQ's to the bit.
        # Compiled for a GPU each element's sum runs in the same order
        # whatever BLOCK_N, and a wider walk costs less: 64 (128 at head dims
        # <= 64) key columns (float32 at 2x16x4096x128: the backward +29 %
        # over the one-pass form, +81 % on the dQ tile of 32; bench/RESULTS.md
        # runs 91-93).  Triton's interpreter multiplies with numpy, whose rounding
        # follows the shapes: there the walk keeps the dQ tile.
        pre_m, pre_n = bm2, bn2
        pre_launch = dict(num_warps=warps2, num_stages=stages2)
        if q.is_cuda:
            pre_n = max(bn2, min(128 if D <= 64 else 64, _pow2(Lk)))
            pre_launch["num_stages"] = 2 if D <= 64 else 1
    dq_kw = dict(launch, BLOCK_M=bm2, BLOCK_N=bn2, EVEN_N=even_q, num_warps=warps2, num_stages=stages2,
                 BATCH_FASTEST=_dq_batch_fastest(spec, captured, B))
    return _BwdPlan(
        grad_ids=grad_ids, empty=q.numel() == 0 or k.numel() == 0,
        pre_grid=(triton_cdiv(Lq, pre_m), B * Hq),
        qkv_strides=(*_strides(q), *_strides(k, True), *_strides(v, True)),
        pre_tail=(Hq, G, Lq, Lk, scale, scale2),
        pre_kw=dict(BLOCK_M=pre_m, BLOCK_N=pre_n, MODE=plan.mode, HAS_LO=plan.has_lo, HAS_HI=plan.has_hi,
                    DROPOUT=spec.dropout_p > 0, **consts, **pre_launch),
        variant=variant, mode3=plan.mode == 3, tiles=((bm, bn), (bm2, bn2)), tma=tma,
        tma_tiles=tma and codegen.no_planes(spec), grad_strides=grad_strides,
        after_seed=(drop_scale, *band), one_grid=one_grid, one_tail=one_tail, one_after=one_after, one_kw=one_kw,
        dkdv_grid=(triton_cdiv(Lk, bn), Bk * Hkv), dkdv_tail=(*dk_s, *dv_s, B, Hkv, G, Lq, Lk, scale, scale2),
        dkdv_kw=dict(launch, MODE=mode_kv, KV_BATCH_BROADCAST=broadcast),
        dq_grid=(triton_cdiv(Lq, bm2), B * Hq), dq_tail=(*dq_s, Hq, G, Lq, Lk, scale, scale2),
        dq_kw=dq_kw)


# The backward's EXACT_ROWS when not the spec's own (reference.exact_rows): tests
# run float32 specs through the one-pass preprocess the 16-bit specs use.
_exact_rows: Optional[bool] = None


def _exact(spec: AttentionSpec, q: torch.Tensor) -> bool:
    """[Note: exact rows] for this call: the spec's, unless its float32 tiles
    multiply in one tf32 product (TF32 allowed: ~3e-4 per product, far above
    what the exact rows save)."""
    if _exact_rows is not None:
        return _exact_rows
    return reference.exact_rows(spec) and not (q.dtype == torch.float32 and _dot_precision(q.dtype) == "tf32")


@contextlib.contextmanager
def exact_rows(flag: Optional[bool]):
    """Force the backward's [Note: exact rows] on or off inside the context (None: the spec's)."""
    global _exact_rows
    old, _exact_rows = _exact_rows, flag
    try:
        yield
    finally:
        _exact_rows = old


def backward(dout, q, k, v, captured: Sequence[torch.Tensor], out, lse, spec: AttentionSpec,
             seed: Optional[torch.Tensor] = None, config=None, dlse: Optional[torch.Tensor] = None):
    """(dq, dk, dv, dcaptured) from the generated backward kernels: a preprocess
    (delta, lse in the scores' z2 units), dK/dV per KV block, dQ per query block (two
    launches, or one for the config variants "fused" and "paired").  ``dlse``, the
    gradient of the forward's lse (attention sinks), enters as delta - dlse."""
    p = _plan(_call_key("bwd", spec, config, q, k, v, captured), lambda: _bwd_plan(q, k, v, captured, spec, config))
    if dout.dtype != v.dtype:
        # dO meets v in dO·Vᵀ; eager's P·V ran in v's dtype, so its gradient
        # arrives there in that dtype too (an output cast up is cast back)
        dout = dout.to(v.dtype)
    dev = q.device
    # contiguous, as the op's fake (meta) kernel says: inductor asserts the
    # strides it was promised; the kernels write any strides
    dq = torch.empty(q.shape, dtype=q.dtype, device=dev)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    dcap = [torch.zeros(captured[i].shape, dtype=torch.float32, device=dev) for i in p.grad_ids]
    if p.empty:
        dq.zero_(), dk.zero_(), dv.zero_()
        return dq, dk, dv, [g.to(captured[i].dtype) for i, g in zip(p.grad_ids, dcap)]
    exact = _exact(spec, q)
    mod = codegen.load("bwd", spec, exact)
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    x0 = dropout_x0(seed, spec)
    delta = torch.empty((B, Hq, Lq), dtype=torch.float32, device=dev)
    lse2 = torch.empty_like(delta)
    rinv = torch.empty_like(delta)
    shift = torch.empty_like(delta) if exact else rinv      # read only by exact rows
    cap = captured_args(captured)
    if p.tma_tiles and (dout.stride(-1) != 1 or not _rows_aligned(dout, dout.stride()[:-1])):
        # dO's layout is not in the call's signature (q, k, v's are): a config
        # tuned on another dO reads a copy rather than fail (sum()'s expanded ones)
        dout = dout.contiguous()
    dos = dout.stride()
    # with dlse (d lse / d score = P: dz = P ∘ (dP - delta + dlse)) a row that
    # keeps no key (lse = -inf) has P = 0 where its lse is read (attention
    # sinks: eager's softmax gives it all to the sink), not 0/0: the preprocess
    # does both (HAS_DLSE)
    dl = (dlse, *dlse.stride()) if dlse is not None else (delta, 0, 0, 0)
    _grid(mod.attention_bwd_preprocess, p.pre_grid)(
        q, k, v, out, dout, lse, delta, lse2, rinv, shift, *dl, *cap, *p.qkv_strides, *out.stride(), *dos, *p.pre_tail,
        x0, *p.after_seed, HAS_DLSE=dlse is not None, **p.pre_kw)
    grad_args = []
    for g, st in zip(dcap, p.grad_strides):
        grad_args += [g, *st]
    (bm, bn), (bm2, bn2) = p.tiles
    bmap = (block_map(mod, spec, captured, B, Hq, Lq, Lk, bm, bn, cols=True, device=dev) if p.mode3
            else (lse2, 0, 0, 0))
    bmap2 = (block_map(mod, spec, captured, B, Hq, Lq, Lk, bm2, bn2, device=dev) if p.mode3
             else (lse2, 0, 0, 0))
    if p.tma:
        _tma_ready(spec, captured, {"q": q, "k": k, "v": v, "dO": dout} if p.tma_tiles else {})
    if p.variant != "two":
        kernel = mod.attention_bwd_fused if p.variant == "fused" else mod.attention_bwd_paired
        _grid(kernel, p.one_grid)(
            q, k, v, dout, lse2, rinv, shift, delta, dq, dk, dv, *bmap, *bmap2, *cap, *grad_args, *p.qkv_strides, *dos,
            *p.one_tail, x0, *p.one_after, **p.one_kw)
        return dq, dk, dv, [g.to(captured[i].dtype) for i, g in zip(p.grad_ids, dcap)]
    _grid(mod.attention_bwd_dkdv, p.dkdv_grid)(
        q, k, v, dout, lse2, rinv, shift, delta, dk, dv, *bmap, *cap, *p.qkv_strides, *dos, *p.dkdv_tail, x0,
        *p.after_seed, **p.dkdv_kw)
    _grid(mod.attention_bwd_dq, p.dq_grid)(
        q, k, v, dout, lse2, rinv, shift, delta, dq, *bmap2, *cap, *grad_args, *p.qkv_strides, *dos, *p.dq_tail, x0,
        *p.after_seed, **p.dq_kw)
    return dq, dk, dv, [g.to(captured[i].dtype) for i, g in zip(p.grad_ids, dcap)]


def _dq_batch_fastest(spec: AttentionSpec, captured: Sequence[torch.Tensor], B: int) -> bool:
    """Whether the dQ launch orders its programs batch-fastest: a captured
    (query, key) plane that needs a gradient, varies over the heads and is
    broadcast over B > 1 batches (a learned bias of (1, H, Lq, Lk)) gets B
    atomic adds per score; with the B programs of a tile adjacent they meet
    in L2 (bench/RESULTS.md run 27)."""
    return B > 1 and any(c.requires_grad and c.dims[2] and c.dims[3] and t.shape[0] == 1 and t.shape[1] > 1
                         for c, t in zip(spec.captured, captured))


# ---- decode ------------------------------------------------------------------------

DECODE_MAX_ROWS = 64   # G * Lq packed rows per program (beyond: the forward kernel)


def decode_applies(q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec) -> bool:
    """Split-KV decode suits short queries (G * Lq <= 64 packed rows), no dropout."""
    G = q.shape[1] // k.shape[1]
    return spec.dropout_p == 0 and G * q.shape[2] <= DECODE_MAX_ROWS


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


# Decode programs are small (a few warps, little shared memory) and bound by
# memory latency: several resident per multiprocessor keep enough loads in flight.
DECODE_PROGRAMS_PER_SM = 4
DECODE_MAX_SPLITS = 64   # the combine holds a (splits, Dv) float32 tile per row

# [Note: decode's dependent launch]  On Hopper the combine is launched as a
# programmatic dependent of the split kernel (``launch_pdl``): every split
# program signals at its start, so the combine's launch is processed while
# the splits stream K/V, and its programs wait (``griddepcontrol.wait``) for
# the split kernel's stores before reading them.  Without the attribute (an
# older GPU, the interpreter) both instructions are no-ops and the launches
# are serialised as usual.  ``DECODE_PDL`` switches it off (benchmarks A/B).
DECODE_PDL = os.environ.get("ATTN_COMPILER_DECODE_PDL", "1") != "0"


# mask values one program of the extent kernel tests ([Note: decode's key extent])
DECODE_EXTENT_TILE = 2048


def _pdl(device: torch.device) -> bool:
    return (DECODE_PDL and device.type == "cuda" and _fast_launches
            and torch.cuda.get_device_capability(device) >= (9, 0))


@functools.lru_cache(maxsize=4096)       # per call otherwise: a loop over every split count
def num_splits(units: int, n_blocks: int, sms: int, max_splits: int = 128,
               per_sm: int = DECODE_PROGRAMS_PER_SM) -> int:
    """Split count from the occupancy (FlashAttention's rule over ``per_sm``
    program slots per multiprocessor): the smallest split count whose wave
    efficiency is within 85 % of the best; 1 when ``units`` programs already
    fill the slots."""
    slots = sms * per_sm
    if units >= 0.8 * slots or n_blocks <= 1:
        return 1
    cands = range(1, min(max_splits, n_blocks, slots) + 1)
    eff = {}
    for s in cands:
        waves = units * s / slots
        eff[s] = waves / math.ceil(waves)
    best = max(eff.values())
    return next(s for s in cands if eff[s] >= 0.85 * best)


@dataclasses.dataclass(frozen=True)
class _DecodePlan:
    out_shape: tuple
    out_dtype: torch.dtype
    empty: bool
    splits: int
    n_rows: int
    split_grid: tuple
    ext_args: tuple          # (N_EXT, EXT_W): the extent's blocks and row width, or zeros
    split_args: tuple        # after the captured tensors
    split_kw: dict
    reduce_args: tuple       # after out and lse
    reduce_kw: dict
    extent_kw: Optional[dict] = None     # [Note: decode's key extent]


def _decode_plan(q, k, v, captured, spec: AttentionSpec, config, splits: Optional[int]) -> _DecodePlan:
    reference.check_inputs(q, k, v, captured, spec)
    if not decode_applies(q, k, spec):
        raise ValueError("decode kernel: needs G * Lq <= 64 query rows per KV head and no dropout")
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    t = config or default_config("decode", q)
    bn = min(t.block_n, _pow2(Lk))
    bm = _pow2(G * Lq)
    out_shape = (B, Hq, Lq, Dv)
    if B * Hq * Lq * Dv == 0:
        return _DecodePlan(out_shape, getattr(torch, spec.out_dtype), True, 0, 0, (), (), (), {}, (), {})
    n_blocks = triton_cdiv(Lk, bn)
    s = splits or num_splits(B * Hkv, n_blocks, _sm_count(q.device), max_splits=DECODE_MAX_SPLITS,
                             per_sm=t.per_sm or DECODE_PROGRAMS_PER_SM)
    s = max(1, min(s, n_blocks))
    chunk = triton_cdiv(n_blocks, s) * bn
    s = triton_cdiv(Lk, chunk)
    n_rows = B * Hq * Lq
    plan = mask_plan(spec, Lq, Lk)
    scale = spec.scale_value(D)
    pdl = dict(PDL=True) if _pdl(q.device) else {}
    # an additive mask the same for every head, over many keys (a static
    # cache's): the splits share out the keys some row keeps ([Note: decode's
    # key extent]).  A mask made in the graph (a dynamic cache's padding) has
    # no unfilled slots to leave out: the extent's launch would cost 2 µs a step
    extent = (plan.mode == 3 and bool(spec.additive_masks) and Lk >= ADDITIVE_MAP_MIN_KEYS
              and not _map_axes(spec)[1])
    extent_kw, ext_args = None, (0, 0)
    if extent:
        ext_m = _pow2(Lq, least=2)
        ext_n = min(_pow2(Lk), max(64, DECODE_EXTENT_TILE // ext_m))
        n_ext = triton_cdiv(Lk, ext_n)
        extent_kw = dict(shape=(B, n_ext, 2 + ext_m), grid=(n_ext, B),
                         kw=dict(BLOCK_M=ext_m, BLOCK_N=ext_n, num_warps=4, **pdl))
        ext_args = (n_ext, 2 + ext_m)
        # the split kernel waits for the extent's stores as the combine waits for its own
        pdl = dict(pdl, EXTENT=True, BLOCK_E=_pow2(n_ext, least=2), **({"launch_pdl": True} if pdl else {}))
    return _DecodePlan(
        out_shape, getattr(torch, spec.out_dtype), False, s, n_rows, (s, B * Hkv), ext_args,
        (*_strides(q), *_strides(k, True), *_strides(v, True), Hkv, G, Lq, Lk, scale, scale * codegen.LOG2E,
         plan.lo, plan.hi, chunk, n_rows),
        dict(HEAD_D=D, HEAD_DV=Dv, BLOCK_D=_pow2(D), BLOCK_DV=_pow2(Dv), BLOCK_M=bm, BLOCK_N=bn,
             MODE=plan.mode, HAS_LO=plan.has_lo, HAS_HI=plan.has_hi, DOT_PREC=_dot_precision(q.dtype),
             num_warps=t.num_warps, num_stages=t.num_stages, **pdl),
        (n_rows, s, Hq, Lq, *reference.output_strides(spec, *out_shape)),
        dict(HEAD_DV=Dv, BLOCK_DV=_pow2(Dv), BLOCK_S=_pow2(s, least=2), num_warps=4,
             **({"PDL": True, "launch_pdl": True} if pdl.get("PDL") else {})),
        extent_kw)


def decode(q, k, v, captured: Sequence[torch.Tensor], spec: AttentionSpec,
           seed: Optional[torch.Tensor] = None, config=None, splits: Optional[int] = None):
    """(out, lse) from the split-KV decode kernels (see ``decode_applies``)."""
    p = _plan(_call_key("decode", spec, (config, splits), q, k, v, captured),
              lambda: _decode_plan(q, k, v, captured, spec, config, splits))
    out = reference.empty_output(spec, *p.out_shape, q.device, p.out_dtype)
    lse = torch.empty(p.out_shape[:3], dtype=torch.float32, device=q.device)
    if p.empty:
        return out, lse.fill_(-math.inf)
    acc = torch.empty((p.splits, p.n_rows, p.out_shape[3]), dtype=torch.float32, device=q.device)
    mx = torch.empty((p.splits, p.n_rows), dtype=torch.float32, device=q.device)
    ls = torch.empty_like(mx)
    mod = codegen.load("decode", spec)
    ext = mx                 # not read without EXTENT
    e = p.extent_kw
    if e is not None:
        ext = torch.empty(e["shape"], dtype=torch.int32, device=q.device)
        _grid(mod.attention_decode_extent, e["grid"])(ext, e["shape"][2], *captured_args(captured), q.shape[2],
                                                       k.shape[2], **e["kw"])
    _grid(mod.attention_decode_split, p.split_grid)(q, k, v, acc, mx, ls, ext, *p.ext_args, *captured_args(captured),
                                                     *p.split_args, **p.split_kw)
    _grid(mod.attention_decode_reduce, (p.n_rows,))(acc, mx, ls, out, lse, *p.reduce_args, **p.reduce_kw)
    return out, lse
