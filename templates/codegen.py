"""Kernel source generation: an AttentionSpec + a template file -> Triton source.

Entry points: ``generate(family, spec) -> Generated`` (source text, its hash and
the launch facts the launcher needs) and ``load(family, spec)`` (the imported
module, cached in memory and on disk by the source hash).

Notation (shared with the templates)
------------------------------------
    qk        raw tile of Q·Kᵀ in float32, before any scaling
    score     qk * SCALE: the spec's ``score`` symbol
    z2        the modified score in log2 units: score_mod(score) * log2(e)
    keep      the spec's mask predicate (True = position kept)
    q_idx     query row indices of the tile, kv_idx key column indices; their
              shapes are (BLOCK_M, 1)/(1, BLOCK_N) in a row-major tile and
              (1, BLOCK_M)/(BLOCK_N, 1) in the transposed tiles of dK/dV
    off_b, off_h   batch and query-head index (scalars, or a column for the
              packed query heads of the decode kernel)
    PARTIAL / FULL  a block that may hold masked positions (the whole score_mod,
              with its mask branches, is evaluated) / a block proven to be kept
              everywhere (only the kept branch is evaluated: no mask work)

A template is Python source with hooks: a line holding only ``{{NAME}}`` is
replaced by generated lines at that indentation; ``{{NAME}}`` inside a line by
a string.  The printer turns sympy into ``tl.`` expressions; the backward's
hooks print ``sympy.diff`` of the score modification (``spec.dscore``,
``spec.dcaptured``).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import math
import os
import re
import sys
import tempfile
import threading
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import sympy

from attn_compiler import reference
from attn_compiler.passes.analyze import spec as spec_mod
from attn_compiler.templates.printer import TritonPrinter, Unsupported  # noqa: F401  (re-exported)
from attn_compiler.passes.analyze.spec import (
    AttentionSpec, Lk, Lq, _kept_value, _relation_offsets, kv_idx, q_idx, score)

TEMPLATE_DIR = Path(__file__).resolve().parent
FAMILIES = ("fwd", "bwd", "decode")
LOG2E = 1.4426950408889634  # 1 / ln 2: exp(x) == exp2(x * LOG2E)
_FLT_MAX = 3.4028234663852886e38

# ---- what a spec needs from a kernel -------------------------------------------

@dataclasses.dataclass(frozen=True)
class Band:
    """Kept positions satisfy ``lo <= kv_idx - q_idx <= hi`` (None: unbounded);
    bounds are sympy in Lq, Lk (offset-causal masks use Lk - Lq)."""

    lo: Optional[sympy.Expr]
    hi: Optional[sympy.Expr]

    def at(self, lq: int, lk: int) -> Tuple[Optional[int], Optional[int]]:
        sub = {Lq: lq, Lk: lk}
        return tuple(None if x is None else int(sympy.sympify(x).subs(sub)) for x in (self.lo, self.hi))


def band_of(spec: AttentionSpec) -> Optional[Band]:
    """The band of a mask made of index relations only (causal, windows), else None."""
    pred = spec.mask_predicate
    if pred is sympy.true or pred is sympy.false or pred.free_symbols - {q_idx, kv_idx, Lq, Lk}:
        return None
    rng = _relation_offsets(pred)
    return None if rng is None else Band(*rng)


def tma_planes(spec: AttentionSpec) -> List[int]:
    """Indices of the captured float tensors with both a query and a key axis."""
    return [i for i, c in enumerate(spec.captured)
            if c.dims[2] and c.dims[3] and c.is_float and not c.kv_map]


def no_planes(spec: AttentionSpec) -> bool:
    """Whether no captured tensor has both a query and a key axis (a learned
    bias, a 2-D mask, SAM's split-key terms): then each step loads only K and
    V, the forward asks for V beside K and the backward's "tma" variant reads
    Q, dO, K and V through descriptors ([Note: V beside K]).  With such a
    term the kernels keep the loads they had before (a bias plane lost 20 %
    with the early V, bench/RESULTS.md run 84)."""
    return not any(c.dims[2] and c.dims[3] for c in spec.captured)


def tma_rows(spec: AttentionSpec) -> List[int]:
    """Indices of the captured float tensors with a key axis and no query axis
    (Hugging Face's additive padding mask): the forward's "tma" variant reads
    their (BLOCK_N,) rows through a descriptor, which Triton pipelines like
    K/V; as a pointer load in the MMA layout the row is reloaded, unpipelined,
    every tile (run 23: causal padding forward 0.784 -> 0.724 ms)."""
    return [i for i, c in enumerate(spec.captured)
            if c.dims[3] and not c.dims[2] and c.is_float and not c.kv_map]


def unsupported_reason(spec: AttentionSpec) -> Optional[str]:
    """None when the Triton kernels can compute ``spec``, else why not."""
    return _unsupported_reason(spec.dumps())


@functools.lru_cache(maxsize=512)
def _unsupported_reason(text: str) -> Optional[str]:
    spec = AttentionSpec.loads(text)
    if spec.softmax_dtype != "float32":
        return f"softmax in {spec.softmax_dtype} (the kernels accumulate in float32)"
    try:
        _Hooks(spec)
    except Unsupported as exc:
        return f"score modification not printable to Triton: {exc}"
    return None


# ---- hooks ---------------------------------------------------------------------

def mapped_index(x: str, index_map: Tuple) -> str:
    """Triton text of index ``x`` read through a split axis's map
    (``CapturedTensor.kv_map`` / ``h_map``): ``x``, ``(x // W)`` or ``(x % W)``."""
    if not index_map:
        return x
    if index_map[0] == "divmod":     # the middle of three factors: (max(x + c, 0) // W) % M
        _, w, m, c = index_map
        return f"(({f'tl.maximum({x} + {c}, 0)' if c else x} // {w}) % {m})"
    kind, w = index_map[:2]
    c = index_map[2] if len(index_map) > 2 else 0
    if c:   # a term of a slice of the scores: read at max(x + c, 0) // W or (x + c) % W
        x = f"tl.maximum({x} + {c}, 0)" if kind == "div" else f"({x} + {c})"
    return f"({x} // {w})" if kind == "div" else f"({x} % {w})"


def _indent(lines: Sequence[str], pad: str) -> str:
    return "\n".join(pad + ln if ln else "" for ln in lines)


class _Hooks:
    """Generated code fragments for one spec (see the notation above)."""

    def __init__(self, spec: AttentionSpec, family: Optional[str] = None):
        self.spec = spec
        # descriptors under TMA: planes in every family, rows in the forward's
        self.tma_ids = sorted(set(tma_planes(spec)) | set(tma_rows(spec) if family == "fwd" else ()))
        # decode packs the query heads of a KV head into its rows: off_h is a
        # (M, 1) tensor there, a scalar everywhere else
        self.scalar_heads = family != "decode"
        # bfloat16 scores (eager rounded them to 2^-9) take the hardware tanh
        self.pr = TritonPrinter(precise_tanh="float32" in (spec.out_dtype, spec.prob_dtype),
                                fast_tanh=spec.score_dtype == "bfloat16")
        self.n_cap = len(spec.captured)
        self.kept = _kept_value(spec.score_mod)
        # a fill under a condition on the score itself: in any tile, P may be 0
        # (or a row all fills) where the derivative is 0
        self.fills_by_score = spec.mask_fill is not None and spec_mod.conditions_read_score(spec.score_mod)
        self.pure_mask = self.kept == score      # score_mod is masking only
        self.finite_fill = spec.may_hold_fills      # the kernel keeps the finite-fill numerics
        # FULL tiles' z2 is qk * SCALE2 with SCALE2 > 0: the forward takes the
        # row max of qk and scales it, z2 - m one fma ([Note: scaled after the max])
        self.raw_full = self.pure_mask and not self.finite_fill and bool(spec.scale.is_positive)
        # ZERO tiles (the block map's kind 3: every additive mask all 0 there,
        # [Note: tiles of zeros]) read the kept value without those masks; when
        # that is the score itself the forward takes the raw path there too
        self.zeroed = self.kept.xreplace({spec_mod.captured_call(i): 0 for i in spec.additive_masks})
        self.raw_zero = (bool(spec.additive_masks) and self.zeroed == score and not spec.rounds_scores
                         and bool(spec.scale.is_positive))
        self.band = band_of(spec)
        # print everything once now so an unsupported node fails early
        self.score_lines("PARTIAL")
        self.score_lines("FULL")
        self.score_lines("ZERO")
        self.dscore_lines("PARTIAL", "row")

    # -- captured tensors ---------------------------------------------------
    def captured_params(self, grads: bool = False, plane_suffix: str = "") -> str:
        """``, T0, t0_sb, ...`` per captured tensor (and its gradient's);
        ``plane_suffix`` renames the pointers of the tensors read through
        descriptors under TMA (``T{i}x``)."""
        planes = set(self.tma_ids) if plane_suffix else set()
        out = []
        for i in range(self.n_cap):
            name = f"T{i}{plane_suffix}" if i in planes else f"T{i}"
            out.append(f"{name}, t{i}_sb, t{i}_sh, t{i}_sq, t{i}_sk")
        if grads:
            for i in self.grad_ids:
                out.append(f"DT{i}, dt{i}_sb, dt{i}_sh, dt{i}_sq, dt{i}_sk")
        return "".join(", " + x for x in out)

    @property
    def planes(self) -> List[int]:
        """Captured float tensors with a query and a key axis (a learned bias):
        the TMA variants read their (query, key) tiles through tensor
        descriptors, so no tile of 64-bit addresses is held in registers."""
        return tma_planes(self.spec)

    def captured_args_x(self, grads: bool = False) -> str:
        """``captured_params`` with each plane (and, in the forward, each row)
        passed as its ``T{i}x`` (the descriptor under TMA, else the pointer)."""
        return self.captured_params(grads, plane_suffix="x")

    def descriptor_lines(self) -> List[str]:
        """``T{i}x`` under TMA: for a plane a (BLOCK_M, BLOCK_N) tile descriptor
        of the (Lq, Lk) plane of (off_b, off_h), for a row (``tma_rows``) a
        (BLOCK_N,) descriptor of its (Lk,) row; else the pointer."""
        if not self.tma_ids:
            return ["pass"]
        lines = ["if TMA:"]
        planes = set(self.planes)
        for i in self.tma_ids:
            base = f"T{i} + off_b.to(tl.int64) * t{i}_sb + {self.head(i)}.to(tl.int64) * t{i}_sh"
            if i in planes:
                lines.append(f"    T{i}x = tl.make_tensor_descriptor({base}, shape=[Lq, Lk], "
                             f"strides=[t{i}_sq, 1], block_shape=[BLOCK_M, BLOCK_N])")
            else:
                lines.append(f"    T{i}x = tl.make_tensor_descriptor({base}, shape=[Lk], strides=[1], "
                             f"block_shape=[BLOCK_N])")
        lines.append("else:")
        lines += [f"    T{i}x = T{i}" for i in self.tma_ids]
        return lines

    @property
    def grad_ids(self) -> List[int]:
        return [i for i, c in enumerate(self.spec.captured) if c.requires_grad]

    def used_captured(self, expr) -> List[int]:
        return spec_mod.captured_reads(expr, self.n_cap)

    def load_lines(self, ids: Sequence[int], orient: str = "row", tma: bool = False) -> List[str]:
        """Loads of captured tensors, each by its broadcast strides (a stride-0
        axis is not indexed at all, so a padding mask loads one row).

        ``orient`` "col" is the dK/dV kernel's transposed tile (key rows, query
        columns): a tensor with both a query and a key axis is then read as a
        (query, key) tile along its contiguous key axis and transposed in
        registers, not gathered column by column.  A tensor with one axis
        along the walk (a key padding row in the forward and dQ, a per-query
        vector in dK/dV) is loaded as a vector and broadcast: one address and
        predicate per element of the vector, not per element of the tile's
        layout.  ``tma``: planes (``planes``) and the forward's rows
        (``tma_rows``) are read through their descriptor when the kernel's TMA
        flag is set."""
        lines = []
        for i in ids:
            c = self.spec.captured[i]
            # 64-bit offsets: a (B, H, L, L) bias passes 2**31 elements at L = 8k, B*H = 32
            terms = [f"off_b.to(tl.int64) * t{i}_sb", f"{self.head(i)}.to(tl.int64) * t{i}_sh"]
            bounds = []
            plane = orient == "col" and c.dims[2] and c.dims[3]
            vec = (self.scalar_heads and c.dims[2] != c.dims[3]
                   and bool(c.dims[3] if orient == "row" else c.dims[2]))
            qi, ki = (("offs_m[:, None]", "offs_n[None, :]") if plane else ("offs_m", "offs_n") if vec
                      else ("q_idx", "kv_idx"))
            if c.dims[2]:
                terms.append(f"{qi} * t{i}_sq")
                bounds.append(f"({qi} < Lq)")
            aligned = None
            if c.dims[3]:
                # a term of a split key axis is read at kv // W or kv % W ([Note: split key axes])
                at = mapped_index(ki, c.kv_map)
                if c.kv_map and orient == "row" and len(c.kv_map) == 2:
                    aligned = self._aligned_kv_load(i, c, list(terms), list(bounds), vec)
                terms.append(f"{at} * t{i}_sk")
                bounds.append(f"({ki} < Lk)")
            ptr = f"T{i} + " + " + ".join(terms)
            mask = f", mask={' & '.join(bounds)}, other=0" if bounds else ""
            conv = ".to(tl.float32)" if c.is_float else ""
            load = f"tl.load({ptr}{mask})" + ("[None, :]" if vec else "")
            if aligned is not None:
                lines += [f"if {c.kv_map[1]} % BLOCK_N == 0:", f"    t{i} = {aligned}{conv}",
                          "else:", f"    t{i} = {load}{conv}"]
                continue
            if plane:
                load = f"tl.trans({load})"
            if tma and i in self.tma_ids and (i in self.planes or orient == "row"):
                # the tile's origin: (TILE0, start_n) row-wise, (start_m, TILE0) in dK/dV
                if i not in self.planes:
                    desc = f"T{i}.load([start_n])[None, :]"
                elif orient == "col":
                    desc = f"tl.trans(T{i}.load([start_m, TILE0]))"
                else:
                    desc = f"T{i}.load([TILE0, start_n])"
                lines += ["if TMA:", f"    t{i} = {desc}{conv}", "else:", f"    t{i} = {load}{conv}"]
            else:
                lines.append(f"t{i} = {load}{conv}")
        return lines

    def head(self, i: int) -> str:
        """The head index captured tensor ``i`` is read at: ``off_h``, or
        ``off_h // W`` / ``off_h % W`` for a term of split heads
        ([Note: split head axes])."""
        return mapped_index("off_h", self.spec.captured[i].h_map)

    @staticmethod
    def _aligned_kv_load(i: int, c, terms: List[str], bounds: List[str], vec: bool) -> str:
        """The load of a split-key-axis term when W is a multiple of BLOCK_N (a
        tile lies within one W-run of keys; ``start_n`` is the tile's first
        key): ``kv // W`` is then one index for the whole tile (a column of
        the query rows, broadcast), and ``kv % W`` a contiguous run."""
        kind, w = c.kv_map
        if kind == "div":
            at = f"(start_n // {w})"
        else:
            at = f"((start_n % {w}) + tl.arange(0, BLOCK_N){'' if vec else '[None, :]'})"
            bounds = bounds + [f"({'offs_n' if vec else 'kv_idx'} < Lk)"]
        ptr = f"T{i} + " + " + ".join(terms + [f"{at} * t{i}_sk"])
        mask = f", mask={' & '.join(bounds)}, other=0" if bounds else ""
        return f"tl.load({ptr}{mask})"

    def expr(self, kind: str):
        """The score modification a tile of ``kind`` computes: PARTIAL the
        whole of it, FULL its kept value (the mask keeps every position),
        ZERO the kept value with the additive masks at 0."""
        return {"PARTIAL": self.spec.score_mod, "FULL": self.kept, "ZERO": self.zeroed}[kind]

    # -- forward score -------------------------------------------------------
    def score_lines(self, kind: str) -> List[str]:
        """Lines computing z2 from qk (the captured tensors are loaded by
        ``tile_loads``): z * log2(e), or z itself when finite fills may reach
        the softmax ([Note: finite fills] in the common template)."""
        expr = self.expr(kind)
        qk_scaled = "qk * SCALE" if self.finite_fill else "qk * SCALE2"
        if self.pure_mask and kind != "PARTIAL":
            return [f"z2 = {qk_scaled}"]
        if self.pure_mask:
            keep = self.pr(self.spec.mask_predicate)
            return [f"z2 = tl.where({keep} != 0, {qk_scaled}, {self._fill2()})"]
        lines = ["score = qk * SCALE", f"z = {self.pr(expr)}"]
        if self.spec.rounds_scores:     # eager's float16/bfloat16 scores (AttentionSpec.rounds_scores)
            # (a conversion round trip: 12 % of a forward; the same rounding
            # through integer operations on the bits took 16 %)
            lines.append(f"z = z.to(tl.{self.spec.score_dtype}).to(tl.float32)")
        lines.append("z2 = z" if self.finite_fill else f"z2 = z * {LOG2E!r}")
        return lines

    def _fill2(self) -> str:
        """The mask's fill in z2 units."""
        fill = self.spec.mask_fill
        if fill is None or fill == -math.inf:
            return 'float("-inf")'
        return repr(float(fill)) if self.finite_fill else repr(max(fill * LOG2E, -_FLT_MAX))

    def _tile_ids(self, kind: str, bwd: bool) -> set:
        expr = self.expr(kind)
        ids = set(self.used_captured(expr))
        if bwd:
            ids |= set(self.used_captured(sympy.diff(expr, score)))
            for i in self.grad_ids:
                ids |= set(self.used_captured(sympy.diff(expr, spec_mod.captured_call(i))))
        return ids

    def _invariant(self, i: int, orient: str) -> bool:
        """Whether captured tensor ``i`` is the same for every tile of a block
        walk: no key axis when the walk steps over keys ("row": forward, dQ,
        decode), no query axis when it steps over queries ("col": dK/dV)."""
        dims = self.spec.captured[i].dims
        return not (dims[3] if orient == "row" else dims[2])

    def tile_loads(self, kind: str, bwd: bool = False, orient: str = "row", tma: bool = True) -> List[str]:
        """Loads of the captured tensors a tile reads, issued before Q·Kᵀ so
        their latency hides behind the matmul (the backward's also cover the
        derivatives); those the walk does not change are in ``walk_loads``."""
        ids = {i for i in self._tile_ids(kind, bwd) if not self._invariant(i, orient)}
        return self.load_lines(sorted(ids), orient, tma)

    def walk_loads(self, bwd: bool = False, orient: str = "row") -> List[str]:
        """Loads, once before a block walk, of the captured tensors that are the
        same for all its tiles (a per-head ALiBi slope, a per-query vector in
        the forward, a key padding mask in dK/dV)."""
        ids = self._tile_ids("PARTIAL", bwd) | self._tile_ids("FULL", bwd)
        return self.load_lines(sorted(i for i in ids if self._invariant(i, orient)), orient) or ["pass"]

    def keep_lines(self) -> List[str]:
        """``keep``: the tile predicate (int1), for the block map: the mask
        predicate, and each additive mask's values above the fill threshold
        ([Note: additive tensor masks]; written ``~(t <= c)`` so that a nan
        keeps its tile, and the row its nan, as in eager)."""
        pred = self.spec.mask_predicate
        adds = self.spec.additive_masks
        lines = self.load_lines(sorted(set(self.used_captured(pred)) | set(adds)))
        if pred is sympy.true and adds:
            lines.append("keep = tl.full([BLOCK_M, BLOCK_N], 1, tl.int1)")
        else:
            lines.append(f"keep = (({self.pr(pred)}) + tl.zeros([BLOCK_M, BLOCK_N], tl.int32)) != 0")
        lines += [f"keep = keep & ~(t{i} <= {spec_mod.MASK_FILL_THRESHOLD!r})" for i in adds]
        if adds:        # ZERO tiles ([Note: tiles of zeros])
            lines.append("zero = keep & " + " & ".join(f"(t{i} == 0.0)" for i in adds))
        return lines

    def zero_masked_lines(self, var: str) -> List[str]:
        """``var`` (P before P·V) zeroed where the mask drops a score, for a
        ``zero_masked`` spec, in PARTIAL tiles (a FULL tile drops none); the
        softmax denominator has counted those keys already."""
        if not self.spec.zero_masked:
            return ["pass"]
        return [f"{var} = tl.where(({self.pr(self.spec.mask_predicate)}) != 0, {var}, 0.0)"]

    # -- backward: dS and dT -------------------------------------------------
    def dscore_lines(self, kind: str, orient: str, grads: bool = True) -> List[str]:
        """From ``dz`` (= P ∘ (dP - delta), 0 where P == 0) and ``p``: ``ds`` =
        dz ∘ ∂mod/∂score, and the atomic adds of dz ∘ ∂mod/∂tI into the
        captured gradients.  A factor is applied as in the reference: exactly 0
        where P == 0 or the derivative is 0 (a selection, like eager's where)."""
        spec = self.spec
        expr = self.expr(kind)
        d = sympy.diff(expr, score)
        lines = []
        gids = self.grad_ids if grads else []
        needs_score = any(score in sympy.sympify(x).free_symbols for x in
                          [d] + [sympy.diff(expr, spec_mod.captured_call(i)) for i in gids])
        if needs_score:
            lines.append("score = qk * SCALE")
        if d == 1:
            lines.append("ds = dz")
        elif d.is_number:
            # a constant factor: dz is already exactly 0 where P == 0
            lines.append(f"ds = dz * ({self.pr(d)})")
        elif kind != "PARTIAL" and not self.fills_by_score:
            # kept everywhere (the derivative is the kept branch's): dz is
            # exactly 0 where P == 0, and so is the product where the factor
            # is finite; past the ends of an uneven tile (P = 0) a captured
            # tensor is read as 0, where a factor such as 1 / t0 is not
            lines += ["if EVEN_N:", f"    ds = dz * ({self.pr(d)})",
                      "else:", f"    ds = tl.where(p == 0, 0.0, dz * ({self.pr(d)}))"]
        else:
            lines.append(f"dmod = {self._tile(d)}")
            lines.append("ds = tl.where((p == 0) | (dmod == 0), 0.0, dz * dmod)")
        qax, kax = (0, 1) if orient == "row" else (1, 0)
        for i in gids:
            di = sympy.diff(expr, spec_mod.captured_call(i))
            if di == 0:
                continue
            c = spec.captured[i]
            if di == 1:
                g = "dz"
            elif di.is_number:        # a constant factor (DeBERTa's 1/sqrt(3D) on its c2p term)
                g = f"dz * ({self.pr(di)})"
            else:
                g = "tl.where((p == 0) | (dt == 0), 0.0, dz * dt)"
                lines.append(f"dt = {self._tile(di)}")
            lines.append(f"g{i} = {g}")
            if di == 1 and kind == "PARTIAL":
                lines.append(f"g{i} = tl.where(p == 0, 0.0, g{i})")
            lines += self._grad_store(i, c.dims, qax, kax, c.kv_map, self.head(i))
        return lines

    def _tile(self, expr) -> str:
        """``expr`` printed as a tile: one that reads no score, index or
        captured tensor with a query or key axis (a per-head scale's
        derivative) is a scalar, broadcast over dz so that ``(p == 0) | (x == 0)``
        is a tile in Triton's interpreter too (which refuses the scalar)."""
        text = self.pr(expr)
        expr = sympy.sympify(expr)
        calls = {c: sympy.Dummy() for c in expr.atoms(sympy.core.function.AppliedUndef)}
        reads = expr.xreplace(calls).free_symbols & {score, q_idx, kv_idx}
        rows = [i for i in self.used_captured(expr) if any(self.spec.captured[i].dims[2:])]
        return text if reads or rows else f"({text}) + tl.zeros_like(dz)"

    def _grad_store(self, i: int, dims, qax: int, kax: int, kv_map=(), head: str = "off_h") -> List[str]:
        """Atomic adds of captured gradient ``g{i}`` into its broadcast shape; a
        term of a split key axis adds each key's share at kv // W or kv % W
        (several keys of a tile meet at one entry: the atomics sum them), a
        term of split heads each head's share at ``head`` (h // W or h % W)."""
        base = f"DT{i} + off_b.to(tl.int64) * dt{i}_sb + {head}.to(tl.int64) * dt{i}_sh"
        qv, kv = "offs_m", "offs_n"
        g = f"g{i}"
        kv_at = mapped_index("kv_idx", kv_map)
        if dims[2] and dims[3]:
            ptr = f"{base} + q_idx * dt{i}_sq + {kv_at} * dt{i}_sk"
            return [f"tl.atomic_add({ptr}, {g}, mask=(q_idx < Lq) & (kv_idx < Lk), sem='relaxed')"]
        if dims[3] and kv_map:
            ptr = f"{base} + {kv_at} * dt{i}_sk"
            return [f"tl.atomic_add({ptr}, {g}, mask=(q_idx < Lq) & (kv_idx < Lk), sem='relaxed')"]
        if dims[3]:
            return [f"tl.atomic_add({base} + {kv} * dt{i}_sk, tl.sum({g}, axis={qax}), mask={kv} < Lk, sem='relaxed')"]
        if dims[2]:
            return [f"tl.atomic_add({base} + {qv} * dt{i}_sq, tl.sum({g}, axis={kax}), mask={qv} < Lq, sem='relaxed')"]
        return [f"tl.atomic_add({base}, tl.sum(tl.sum({g}, axis=1), axis=0), sem='relaxed')"]

    # -- dropout -------------------------------------------------------------
    def has_dropout(self) -> bool:
        return self.spec.dropout_p > 0

    def threshold(self) -> int:
        return min(int(self.spec.dropout_p * 2.0 ** 32), 2 ** 32 - 1)


# ---- template filling --------------------------------------------------------

_HOOK_LINE = re.compile(r"^(?P<pad>[ \t]*)\{\{(?P<name>[A-Z0-9_]+)\}\}[ \t]*$", re.M)
_HOOK_INLINE = re.compile(r"\{\{(?P<name>[A-Z0-9_]+)\}\}")


def fill(template: str, hooks: Dict[str, object]) -> str:
    """Replace ``{{NAME}}`` hooks: whole-line hooks take a list of lines."""
    def line(m):
        val = hooks[m.group("name")]
        lines = val if isinstance(val, (list, tuple)) else [str(val)]
        return _indent(lines or ["pass"], m.group("pad"))
    out = _HOOK_LINE.sub(line, template)
    out = _HOOK_INLINE.sub(lambda m: str(hooks[m.group("name")]), out)
    missing = _HOOK_INLINE.findall(out)
    if missing:
        raise KeyError(f"template hooks left unfilled: {missing}")
    return out


def template_text(name: str) -> str:
    return (TEMPLATE_DIR / name).read_text()


def _hooks_for(family: str, h: _Hooks) -> Dict[str, object]:
    spec = h.spec
    common = {
        "SPEC": spec.dumps().replace("\\", "\\\\").replace('"""', "'''"),
        "CAPTURED_PARAMS": h.captured_params(),
        "CAPTURED_PARAMS_GRAD": h.captured_params(grads=True),
        "CAPTURED_ARGS": h.captured_params(),
        "CAPTURED_ARGS_GRAD": h.captured_params(grads=True),
        "SCORE_PARTIAL": h.score_lines("PARTIAL"),
        "SCORE_FULL": h.score_lines("FULL"),
        "SCORE_ZERO": h.score_lines("ZERO"),
        "LOADS_PARTIAL": h.tile_loads("PARTIAL", tma=False),
        "LOADS_FULL": h.tile_loads("FULL", tma=False),
        "LOADS_PARTIAL_FWD": h.tile_loads("PARTIAL"),
        "LOADS_FULL_FWD": h.tile_loads("FULL"),
        "LOADS_ZERO_FWD": h.tile_loads("ZERO"),
        "CAPTURED_DESCRIPTORS": h.descriptor_lines(),
        "LOADS_WALK": h.walk_loads(),
        "LOADS_WALK_BWD": h.walk_loads(bwd=True),
        "LOADS_WALK_COL": h.walk_loads(bwd=True, orient="col"),
        "CAPTURED_ARGS_X": h.captured_args_x(),
        "CAPTURED_ARGS_GRAD_X": h.captured_args_x(grads=True),
        "LOADS_PARTIAL_BWD": h.tile_loads("PARTIAL", bwd=True),
        "LOADS_FULL_BWD": h.tile_loads("FULL", bwd=True),
        "LOADS_PARTIAL_COL": h.tile_loads("PARTIAL", bwd=True, orient="col"),
        "LOADS_FULL_COL": h.tile_loads("FULL", bwd=True, orient="col"),
        "DROPOUT_THRESHOLD": h.threshold() if h.has_dropout() else 0,
        "FINITE_FILL": bool(h.finite_fill),
        "RAW_FULL": bool(h.raw_full),
        "ZERO_TILES": bool(h.spec.additive_masks),
        "RAW_ZERO": bool(h.raw_zero),
        "NO_PLANES": no_planes(spec),
        "FILL_LSE": repr(float(reference._HUGE_LSE)),
        "KEEP": h.keep_lines(),
        "ZERO_MASKED_P": h.zero_masked_lines("p"),
        "ZERO_MASKED_PD": h.zero_masked_lines("pd"),
    }
    if family == "bwd":
        common.update({
            # captured gradients are added by the dQ kernel: its tiles are row-major
            # (key columns contiguous), so the atomic adds coalesce
            "DSCORE_PARTIAL_ROW": h.dscore_lines("PARTIAL", "row"),
            "DSCORE_FULL_ROW": h.dscore_lines("FULL", "row"),
            "DSCORE_PARTIAL_COL": h.dscore_lines("PARTIAL", "col", grads=False),
            "DSCORE_FULL_COL": h.dscore_lines("FULL", "col", grads=False),
            "DSCORE_ZERO_ROW": h.dscore_lines("ZERO", "row"),
            "DSCORE_ZERO_COL": h.dscore_lines("ZERO", "col", grads=False),
            "LOADS_ZERO_BWD": h.tile_loads("ZERO", bwd=True),
            "LOADS_ZERO_COL": h.tile_loads("ZERO", bwd=True, orient="col"),
            "DQ_GRADS": bool(h.grad_ids),        # [Note: dQ beside a stored dS]
        })
    return common


TEMPLATES = {"fwd": "attention_fwd.py.tmpl", "bwd": "attention_bwd.py.tmpl",
             "decode": "attention_decode.py.tmpl"}
COMMON_TEMPLATE = "attention_common.py.tmpl"


@dataclasses.dataclass(frozen=True)
class Generated:
    family: str
    source: str
    digest: str


@functools.lru_cache(maxsize=512)
def _generate(family: str, spec_text: str, exact: Optional[bool] = None) -> Generated:
    spec = AttentionSpec.loads(spec_text)
    h = _Hooks(spec, family)
    hooks = _hooks_for(family, h)
    hooks["EXACT_ROWS"] = reference.exact_rows(spec) if exact is None else bool(exact)
    parts = [COMMON_TEMPLATE] + (["attention_fwd.py.tmpl"] if family == "bwd" else []) + [TEMPLATES[family]]
    src = "\n\n".join(fill(template_text(name), hooks) for name in parts)
    digest = hashlib.sha256(src.encode()).hexdigest()[:20]
    return Generated(family, src, digest)


def generate(family: str, spec: AttentionSpec, exact: Optional[bool] = None) -> Generated:
    """The Triton source of ``family`` ("fwd", "bwd", "decode") for ``spec``.
    ``exact``: the backward's EXACT_ROWS, if not the spec's (``reference.exact_rows``).

    The tanh of a spec whose eager scores are bfloat16 (``score_dtype``) is the
    hardware's approximation (``_tanh_bf16``: 2^-11, under the scores' own 2^-9
    rounding); scores upcast before a soft-cap keep an exact form."""
    if family not in TEMPLATES:
        raise ValueError(f"unknown kernel family {family!r}; expected one of {FAMILIES}")
    return _generate(family, spec.dumps(), exact)


def cache_dir() -> Path:
    """Where generated kernel modules are written (keyed by source hash)."""
    root = os.environ.get("ATTN_COMPILER_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "attn_compiler")
    return Path(root) / "kernels"


_modules: Dict[str, object] = {}
_by_spec: Dict[Tuple[str, str, Optional[bool]], object] = {}
_lock = threading.Lock()


def load(family: str, spec: AttentionSpec, exact: Optional[bool] = None):
    """Import the generated module of ``family`` for ``spec`` (written once to
    the cache folder under its hash, atomically, so processes can share it).
    ``exact`` as for ``generate``."""
    text = spec.dumps()
    mod = _by_spec.get((family, text, exact))
    if mod is not None:          # the per-call path: one dict lookup
        return mod
    gen = generate(family, spec, exact)
    name = f"attn_compiler_gen_{family}_{gen.digest}"
    with _lock:
        mod = _modules.get(name)
        if mod is not None:
            _by_spec[(family, text, exact)] = mod
            return mod
        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.py"
        if not path.exists() or path.read_text() != gen.source:
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=".py.tmp")
            with os.fdopen(fd, "w") as f:
                f.write(gen.source)
            os.replace(tmp, path)
        spec_obj = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec_obj)
        sys.modules[name] = mod          # triton's jit looks functions up by module
        spec_obj.loader.exec_module(mod)
        _modules[name] = mod
        _by_spec[(family, text, exact)] = mod
        return mod
