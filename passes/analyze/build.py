"""Analyze: a matched site → AttentionSpec plus the captured tensors' views.

Entry point: ``analyze(match, real_values) -> Analysis``.

The score chain is interpreted symbolically (symbolic.py); the raw product
``R`` is replaced by ``score / scale`` where the chain starts with a pure
scaling, so that ``scale`` is the attention scale the kernels fold into exp2
and ``score_mod`` is what remains.  Captured tensors are renamed ``t0, t1...``
and each gets the view (``CaptureView``) that turns the graph's tensor into the
op's broadcast layout ``[B|1, H|1, Lq|1, Lk|1]``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Optional, Tuple

import sympy
import torch
import torch.fx as fx

# CaptureView axis codes: FLAT the merged (b, h) axis of a [B*H, ...] tensor,
# CYCLIC_B an axis of n read at b mod n
from attn_compiler.layout import CYCLIC_B, FLAT, MERGE_NEXT, MERGE_NEXT_SWAPPED, QFACTORS

from .. import canonicalize as C
from . import spec as S
from .symbolic import ScoreInterpreter
from .values import _CASTS, R, Decline, ReadDecline
from .torch_eval import can_evaluate

_OP_AXES = (S.b, S.h, S.q_idx, S.kv_idx)


@dataclasses.dataclass(frozen=True)
class CaptureView:
    """How to present ``node`` to the op: ``axes[i]`` is the op axis (0..3)
    that node's axis ``i`` runs along, or None for a size-1 / index-0 axis."""

    node: fx.Node
    axes: Tuple[Optional[int], ...]
    # entries put in front of the query and key axes: a tensor read at
    # q_idx - pad[0], kv_idx - pad[1] ([Note: scores assigned in part])
    pad: Tuple[int, int] = (0, 0)


@dataclasses.dataclass
class Analysis:
    spec: S.AttentionSpec
    captures: List[CaptureView]
    # placeholders (registered buffers) and get_attr constants whose values
    # the spec holds as expressions (a tril buffer read as causal)
    folded: List[fx.Node] = dataclasses.field(default_factory=list)


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def size_map(m) -> Dict[Any, Any]:
    """Shape-environment symbols of this site's lengths → Lk, Lq, D."""
    s = C.shape_of(m.qk.node)
    dsize = _head_dim(m)
    out = {}
    for size, sym in ((s[-1], S.Lk), (s[-2], S.Lq), (dsize, S.D)):
        if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol):
            out.setdefault(size.node.expr, sym)
    return out


# [Note: a side value captured whole]
# A side value is interpreted down to its sources so that index arithmetic
# becomes expressions (a causal mask from arange, a tril buffer) and only
# what cannot be written so is captured.  A mask built in the graph from a
# tensor the op cannot read along its own axes is the other way round:
# torchvision's Swin fills an (H, W) grid of region ids, views it as windows
# (nW, ws*ws) and compares ids pairwise; the grid itself is read at
# ``floor(w / nW_w) * ws + q // ws, ...``, never along an op axis.  The value
# that joins the scores ((1, nW, 1, N, N), read along the window-folded heads,
# the queries and the keys) is a plain broadcast operand.  So when a captured
# tensor's reads cannot be presented, the analysis runs again with every side
# value that joined the scores and holds that tensor captured whole: what
# timm's registered window mask gives directly.  Nothing new is materialised:
# the joined value is a tensor the model's own code computes.

def analyze(m, real_values: Dict[fx.Node, torch.Tensor], checker=None) -> Analysis:
    """The spec of site ``m``; ``checker`` (verify.SideChecker) re-computes
    every folded mask from the example inputs and declines on a mismatch."""
    opaque: set = set()
    first: Optional[ReadDecline] = None
    for _ in range(3):
        interp = ScoreInterpreter(m.qk.node, 1, m.softmax_in, real_values, size_map(m), m.chain,
                                  m.softmax, m.heads, opaque=frozenset(opaque))
        try:
            return _analyze(m, interp, checker)
        except ReadDecline as exc:
            first = first or exc
            calls = {lf.func for lf in interp.leaves if lf.node is exc.node}
            wider = {node for node, v in interp.joins
                     if isinstance(node, fx.Node) and node not in opaque and node is not exc.node
                     and any(f.func in calls for f in getattr(v.expr, "atoms", lambda *_: ())(sympy.Function))}
            if exc.node is None or not wider:
                break
            opaque |= wider
        except Decline:
            if first is None:
                raise
            break       # the wider capture fails otherwise: the first reason is the user's
    raise Decline(str(first))


def _analyze(m, interp: ScoreInterpreter, checker) -> Analysis:
    qk = m.qk
    smap = interp.size_map
    # q.shape[-1] ** -0.5 is a SymFloat when the head dim is dynamic: named through the size map
    coef = interp.const(m.q.factor) * interp.const(m.k.factor) * interp.const(qk.alpha)
    interp.coef = coef
    if qk.addend is not None and interp.const(qk.beta) != 0:
        interp.memo[qk.node] = _baddbmm_value(interp, qk, coef)
    result = interp.run()
    if m.base2:     # exp2(y) / Σ exp2(y) = softmax(y · ln 2)
        ln2 = sympy.Float(math.log(2))
        result = dataclasses.replace(result, expr=ln2 * result.expr,
                                     prefix_scales={ln2 * c for c in result.prefix_scales})
    for node in m.zero_masks:
        _check_zero_mask(interp, node, result.expr)
    if checker is not None:
        sizes = _concrete_sizes(m, smap)
        for node, val in interp.joins:
            reason = checker.check(node, val, sizes)
            if reason:
                raise Decline(reason)
    expr, captures, specs = _rename_captures(result.expr, result.leaves, interp.flat, interp.op_sizes)
    scale, mod = _split_scale(expr, result.prefix_scales, _head_dim(m))
    if isinstance(scale, sympy.Expr) and scale.free_symbols - {S.D}:
        raise Decline(f"the scale {scale} depends on runtime values")
    extra = mod.free_symbols - {S.score, *_OP_AXES, S.Lq, S.Lk, S.D}
    if extra:
        raise Decline(f"the score modification depends on {sorted(map(str, extra))}")
    zero_masked = False
    if m.zero_masks:
        mod, zero_masked = _masked_to_neg_inf(mod, specs)
    if any(rs.kind != "scale" for rs in m.row_scales) and not m.zero_empty_rows and (
            mod.has(sympy.S.NegativeInfinity) or any(getattr(torch, c.dtype).is_floating_point for c in specs)):
        # [Note: rows of P set to 0] in layout: a row a -inf mask leaves without a
        # key is nan in P; zeroed, eager's gradients there are 0, the op's nan
        raise Decline("rows of the probabilities are set to 0 beside a mask that may leave a row "
                      "without a key (-inf)")
    reason = can_evaluate(mod)
    if reason:
        raise Decline(reason)
    qdt = C.example_value(m.q.node).dtype
    spec = S.AttentionSpec(
        score_mod=mod, scale=scale, captured=tuple(specs), dropout_p=m.dropout_p,
        gqa_group=_group(m),
        softmax_dtype="float64" if qdt == torch.float64 else "float32",
        out_dtype=_dtype_name(C.example_value(m.pv.node).dtype),
        prob_dtype=_dtype_name(C.example_value(m.pv.operand(0)[0]).dtype),
        score_dtype=_dtype_name(_score_dtype(m.softmax_in)),
        zero_masked=zero_masked,
    )
    return Analysis(spec, captures, list(dict.fromkeys(interp.folded)))


# [Note: probabilities zeroed by the mask]
# ESPnet/WeNet's and FastSpeech2's ``softmax(s.masked_fill(m, finfo.min)).masked_fill(m, 0)``
# (and DeBERTa's XSoftmax written out, CPM-Ant's with -inf) zero the
# probabilities where the scores were masked.  When the zeroed positions are
# exactly the masked ones (the two conditions are equivalent as sympy booleans
# over the same captured tensors), eager's output in a row is the sum over the
# kept keys K of e^(z_j) v_j / (sum_K e^(z_k) + c e^F), c masked keys filled
# with F.  Two ways to compute it:
# - With F = -inf the masked keys add nothing: it is the softmax over K, the
#   scores with the fills made -inf, and a row without a key gives 0
#   (``layout.zero_empty_rows``, as for ``nan_to_num(P)``).  A finite F adds
#   exactly nothing too (e^(F - max) underflows) as long as the kept scores
#   stay far above F, which nothing but another fill can break.  So a finite
#   fill is made -inf when the kept scores hold no float tensor and no fill
#   (the fast kernels: -inf tiles are skipped).
# - Otherwise (FastSpeech2's relative-position scores beside the fill: a
#   float tensor could hold finfo.min, and a row whose kept scores are all
#   finfo.min is uniform over every key in eager) the spec keeps the fill and
#   says ``zero_masked``: the kernels compute the softmax with the fills, as
#   eager does, and zero P where the mask drops before P·V (the denominator
#   keeps them).  A row of fills only is uniform, then zeroed: 0, as eager.
#   A row whose scores are all -inf gives 0 (``layout.zero_empty_rows``): as
#   eager's when the mask drops all of it (a fill beyond float16's range rounds
#   to -inf).  A row the mask keeps, all -inf through a float tensor, is nan in
#   eager and 0 here.

def _check_zero_mask(interp: ScoreInterpreter, node: fx.Node, scores) -> None:
    """Decline unless ``node`` (``P.masked_fill(m, 0)`` / ``where``) zeroes
    exactly where the scores ``scores`` are masked."""
    op = C.canonical(node)
    # P: the operand with the site's shape (the zero is a number or a 0-d tensor)
    kept = op.kw["input"] if op.name == "masked_fill" else next(
        a for a in (op.kw["input"], op.kw["other"])
        if isinstance(a, fx.Node) and C.shape_of(a) == C.shape_of(node))
    p = sympy.Symbol("P", real=True)
    v = interp.elementwise_over(node, kept, p)
    zero, taken = sympy.false, sympy.false
    for e, c in S._pieces(v.expr):
        here = sympy.And(c, sympy.Not(taken))
        if e.is_zero:
            zero = sympy.Or(zero, here)
        elif e != p:
            raise Decline("the probabilities are changed under a mask, not only zeroed")
        taken = sympy.Or(taken, c)
    keep = S._keep_condition(scores)
    same = sympy.Equivalent(keep, sympy.Not(zero))
    if sympy.simplify_logic(same) is not sympy.true:
        raise Decline("the probabilities are zeroed under a mask other than the scores' own")


def _masked_to_neg_inf(mod, specs):
    """``(mod, zero_masked)``: the score modification with its fills made -inf
    and False, or, when a finite fill sits beside a kept branch that may hold
    a fill itself, ``mod`` as it is and True ([Note: probabilities zeroed by
    the mask])."""
    pieces = S._pieces(mod)
    fills = {S._fill_value(e) for e, _ in pieces if S._is_fill(e)}
    if any(not math.isinf(f) for f in fills):
        for e, _ in pieces:
            if S._is_fill(e):
                continue
            floats = [i for i in S.captured_reads(e, len(specs)) if specs[i].is_float]
            if floats or e.has(sympy.S.NegativeInfinity) or any(
                    bool(a <= S.MASK_FILL_THRESHOLD) for a in S._finite_constants(e)):
                return mod, True
    return sympy.Piecewise(*[(sympy.S.NegativeInfinity if S._is_fill(e) else e, c) for e, c in pieces]), False


def _score_dtype(softmax_in: fx.Node) -> torch.dtype:
    """The dtype eager's scores were last rounded to before the softmax: that
    of ``softmax_in``, or, behind casts (``s.float().softmax(-1)``), the
    16-bit dtype nearest the softmax that the cast chain passes through, as
    ``softmax(s, dtype=torch.float32)`` would see it (AttentionSpec.rounds_scores)."""
    node = softmax_in
    while True:
        dt = C.example_value(node).dtype
        if dt in (torch.float16, torch.bfloat16):
            return dt
        op = C.canonical(node)
        src = op.kw.get("input") if op is not None and op.name in _CASTS else None
        if not isinstance(src, fx.Node) or not isinstance(C.example_value(src), torch.Tensor) \
                or not C.example_value(src).dtype.is_floating_point:
            return C.example_value(softmax_in).dtype
        node = src


def _concrete_sizes(m, smap) -> Dict:
    """Lq, Lk, D of this compilation's example inputs (their hints)."""
    s = C.shape_of(m.qk.node)
    out = {}
    for size, sym in ((s[-2], S.Lq), (s[-1], S.Lk), (_head_dim(m), S.D)):
        out[sym] = size if isinstance(size, int) else size.node.hint
    return out


def _baddbmm_value(interp, qk, coef):
    from .values import Val
    side = interp.value(qk.addend)
    shape = C.shape_of(qk.node)
    frame = interp.score_frame
    e = coef * R + interp.const(qk.beta) * (interp.join(side, frame, len(shape)) if not side.chain else side.expr)
    return Val(e, shape, True, frame)


def _head_dim(m):
    qshape = C.shape_of(m.q.node)
    return qshape[m.q.labels.index(m.q.target[-1])]


def op_heads(operand, heads=None):
    """Head count of an operand in the op layout (an int, or None if dynamic)."""
    sizes = dict(zip(operand.labels, C.shape_of(operand.node)))
    lead = [sizes.get(lab, 1) for lab in operand.target[:-2]]
    if len(lead) == 1:
        if isinstance(lead[0], int) and lead[0] == 1:
            return 1
        return heads[1] if heads is not None else lead[0]
    if len(lead) == 3:
        return lead[1] * lead[2] if all(isinstance(x, int) for x in lead[1:]) else None
    return lead[1]


def _group(m) -> int:
    hq, hk = op_heads(m.q, m.heads), op_heads(m.k, m.heads)
    if isinstance(hq, int) and isinstance(hk, int):
        if hq % hk:
            raise Decline(f"{hq} query heads over {hk} key heads")
        return hq // hk
    return 0


def _split_scale(expr, prefixes, head_dim):
    """``expr(R) == mod(scale * R)`` with ``scale`` the leading pure scaling.

    A float scale equal to ``1/sqrt(D)`` to the last bits (how ``1 /
    math.sqrt(head_dim)`` arrives once dynamo folds it) is named so.
    """
    expr = sympy.piecewise_fold(expr)
    c = next(iter(prefixes)) if len(prefixes) == 1 else None
    if c is None or c == 1:
        c = _uniform_coefficient(expr)
    if c is None or c == 0:
        return sympy.Integer(1), sympy.piecewise_fold(expr.xreplace({R: S.score}))
    scale, rest = _name_scale(c, head_dim)
    mod = expr.xreplace({c * R: rest * S.score}).xreplace({R: rest * S.score / c})
    return scale, sympy.piecewise_fold(mod)


def _uniform_coefficient(expr):
    """The number ``c`` if ``R`` only ever appears as ``c * R``."""
    muls = [m for m in expr.atoms(sympy.Mul) if R in m.args]
    coeffs = {m / R for m in muls}
    if len(coeffs) != 1:
        return None
    c = coeffs.pop()
    if not c.is_number or expr.xreplace({c * R: sympy.Dummy()}).has(R):
        return None
    return c


def _name_scale(c, head_dim):
    """Split ``c = scale * rest`` with ``scale = 1/sqrt(D)`` when ``c`` is
    1/sqrt(D) times a simple rational (a softcap's 1/cap, say)."""
    if isinstance(head_dim, int):
        if not c.is_number:
            return c, sympy.Integer(1)
        r = float(c) * math.sqrt(head_dim)
    elif isinstance(head_dim, torch.SymInt):
        r = sympy.simplify(c * sympy.sqrt(S.D))
        if not r.is_number:
            return c, sympy.Integer(1)
        r = float(r)
    else:
        return c, sympy.Integer(1)
    if abs(r - 1.0) < 1e-12:
        return 1 / sympy.sqrt(S.D), sympy.Integer(1)
    near = sympy.Rational(r).limit_denominator(1024) if r else None
    if near is not None and abs(float(near) - r) <= 1e-12 * abs(r):
        return 1 / sympy.sqrt(S.D), sympy.Float(r)
    return c, sympy.Integer(1)


def _within_heads(a, heads):
    """``a`` with ``floor(h / c)`` dropped where ``c >= H`` (0 <= h < H): what a
    window index ``(b * H + h) // H mod n`` reads as once split into (b, h);
    and ``floor(h / W) mod n`` read as ``floor(h / W)`` where ``n * W >= H``
    (the outer half of heads split in two: ``floor(h / W) < n``)."""
    if isinstance(heads, sympy.Integer):     # grouped 5-D scores: a product of two sizes
        heads = int(heads)
    if not isinstance(heads, int):
        return a

    def floor(x):
        num, den = sympy.fraction(sympy.together(x))
        return sympy.Integer(0) if num == S.h and den.is_Integer and den >= heads else sympy.floor(x)

    def mod(x, n):
        if x == S.h and n.is_Integer and int(n) >= heads:
            return x
        if isinstance(x, sympy.floor) and n.is_Integer:
            num, den = sympy.fraction(sympy.together(x.args[0]))
            if num == S.h and den.is_Integer and int(den) * int(n) >= heads:
                return x
        return sympy.Mod(x, n)
    if a.has(sympy.floor):
        a = a.replace(sympy.floor, floor)
    if a.has(sympy.Mod):
        a = a.replace(sympy.Mod, mod)
    return a


# [Note: split head axes]
# Scores with three leading axes (B, X, Y, Lq, Lk) run as B batches of X * Y
# heads, h = x * Y + y.  A captured tensor of such a site may vary along only
# one of X and Y: LongT5's local attention (X blocks, Y heads) adds a position
# bias (1, 1, Y, M, 3M) and a block mask (B, X, 1, M, 3M); OpenFold's MSA row
# attention (X rows, Y heads) a pair bias (B, 1, Y, T, T) and a row mask
# (B, X, 1, 1, T).  The tensor is then read at h // Y or h % Y
# (``CapturedTensor.h_map``): the kernels load at ``off_h // Y`` or
# ``off_h % Y``, a bias's gradient adds each head's share to its entry (the
# atomics sum the heads that meet there) and the reference indexes and
# index-adds the same way; nothing is expanded to X * Y heads.  A tensor
# varying along both (``floor(h / Y)`` then ``h mod Y`` on adjacent axes) is
# viewed as one head axis.  ``floor(h / Y) mod X`` is ``floor(h / Y)``, as
# h < X * Y.


def _shifted(x) -> Optional[tuple]:
    """``(x0, c)`` when ``x`` is ``x0 + c`` for an op index x0 and an integer
    c (0 for ``x0`` itself), else None."""
    c, rest = sympy.sympify(x).as_coeff_Add()
    if rest in (S.q_idx, S.kv_idx, S.h) and c.is_Integer:
        return rest, int(c)
    return None


def _split_term(a) -> Optional[tuple]:
    """``(q_idx or kv_idx or h, "div" | "mod", W, c)`` when ``a`` is
    ``floor((x + c) / W)`` or ``(x + c) mod W`` of an op index x ([Note: split
    key axes]; c is not 0 for a slice of the scores, [Note: scores assigned in
    part]); ``(x, "divmod", (W, M), c)`` for ``floor((x + c) / W) mod M``, the
    middle factor of an axis split in three (video: time, height, width);
    else None."""
    if isinstance(a, sympy.Mod) and isinstance(a.args[0], sympy.floor) and a.args[1].is_Integer:
        inner = _split_term(a.args[0])
        if inner is None or inner[0] == S.h or int(a.args[1]) < 2:
            return None
        return (inner[0], "divmod", (inner[2], int(a.args[1])), inner[3])
    if isinstance(a, sympy.floor):
        num, den = sympy.fraction(sympy.together(a.args[0]))
        kind = "div"
    elif isinstance(a, sympy.Mod):
        num, den = a.args
        kind = "mod"
    else:
        return None
    at = _shifted(num)
    if at is not None and den.is_Integer and int(den) > 1 and (at[0] != S.h or at[1] == 0):
        c = at[1] % int(den) if kind == "mod" else at[1]
        return (at[0], kind, int(den), c)
    return None


def _split_axis(split: tuple, args, i: int, node: fx.Node, heads=None):
    """The CaptureView code of axis ``i`` of a tensor read at ``args``: a query
    split into (q // W, q % W) on two adjacent axes is one query axis
    (MERGE_NEXT, then 2), and so is (q % W, q // W) (BoTNet's height term:
    MERGE_NEXT_SWAPPED, then 2); a key read at kv // W or kv % W keeps its
    axis (3, with ``CapturedTensor.kv_map``); heads read at h // W or h % W
    keep theirs (1, with ``CapturedTensor.h_map``), or are one head axis
    when the two halves are adjacent ([Note: split head axes])."""
    sym, kind, w, c = split
    shape = C.shape_of(node)
    size = shape[i] if i < len(shape) else None
    if sym == S.h and kind == "divmod":
        raise Decline("a captured tensor is read along a third of split heads")
    if sym == S.h:
        if isinstance(heads, sympy.Integer):
            heads = int(heads)
        if not isinstance(heads, int) or heads % w:
            raise Decline("a captured tensor is read along part of the heads, whose count is dynamic "
                          "or not a multiple of the split")
        nxt = args[i + 1] if i + 1 < len(args) else None
        prev = args[i - 1] if i > 0 else None
        if kind == "div" and nxt is not None and _split_term(nxt) == (S.h, "mod", w, 0) \
                and i + 1 < len(shape) and shape[i + 1] == w:
            return MERGE_NEXT
        if kind == "mod" and prev is not None and _split_term(prev) == (S.h, "div", w, 0):
            return 1
        if not isinstance(size, int) or size != (heads // w if kind == "div" else w):
            raise Decline("a captured tensor is read along part of the heads with another size")
        return 1
    if sym == S.q_idx:
        # the two halves are neighbours once axes read at 0 are dropped
        # (``layout.captured_view`` drops them first): BoTNet's height term is
        # (H, W, 1, H, H) read at (h, q % W, 0, q // W, kv // W)
        other = "mod" if kind == "div" else "div"
        j_next = next((j for j in range(i + 1, len(args)) if args[j] != 0), None)
        j_prev = next((j for j in range(i - 1, -1, -1) if args[j] != 0), None)
        nxt = _split_term(args[j_next]) if j_next is not None else None
        prev = _split_term(args[j_prev]) if j_prev is not None else None
        # three factors (q // (M*W), (q // W) % M, q % W), on any axes in any
        # order: one query axis (torchvision's video MViTv2 reads its time
        # term at (height, width, time)); ``captured_view`` orders and merges them
        if kind == "divmod" or any(t is not None and t[:2] == (S.q_idx, "divmod") for t in map(_split_term, args)):
            return QFACTORS[_three_factors(args, node)[i]]
        # the two halves read one shifted query, q + c: c % W in the mod half
        pair = (S.q_idx, other, w, c % w if other == "mod" else None)
        def partner(t):
            return t is not None and t[:3] == pair[:3] and (t[3] == pair[3] if other == "mod" else t[3] % w == c)
        if partner(nxt) and shape[j_next if kind == "div" else i] == w:
            return MERGE_NEXT if kind == "div" else MERGE_NEXT_SWAPPED
        if partner(prev):
            return 2
        raise Decline("a captured tensor is read along part of a split query axis")
    if not isinstance(size, int) or (kind == "mod" and size != w) or (kind == "divmod" and size != w[1]):
        raise Decline("a captured tensor is read along a split key axis with a dynamic size")
    return 3


def _three_factors(args, node) -> dict:
    """{axis: factor} (0 outermost) of a tensor read along a query split in
    three, ``floor((q + c) / (M*W))``, ``floor((q + c) / W) mod M`` and
    ``(q + c) mod W`` on three of its axes of sizes (any, M, W)."""
    shape = C.shape_of(node)
    terms = {j: t for j, t in enumerate(map(_split_term, args)) if t is not None and t[0] == S.q_idx}
    kinds = {t[1]: j for j, t in terms.items()}
    if len(terms) != 3 or set(kinds) != {"div", "divmod", "mod"}:
        raise Decline("a captured tensor is read along part of a split query axis")
    (_, _, wd, cd), (_, _, (w, m), cm), (_, _, wr, cr) = (terms[kinds[k]] for k in ("div", "divmod", "mod"))
    if wd != w * m or cm != cd or wr != w or cr != cd % w or shape[kinds["divmod"]] != m or shape[kinds["mod"]] != w:
        raise Decline("a captured tensor is read along a query split in three that does not add up")
    return {kinds["div"]: 0, kinds["divmod"]: 1, kinds["mod"]: 2}


def _cyclic_period(a, node, i) -> Optional[int]:
    """n when ``a`` is ``b mod n`` and the tensor's axis ``i`` has n entries."""
    if isinstance(a, sympy.Mod) and a.args[0] == S.b and a.args[1].is_Integer:
        n = int(a.args[1])
        shape = C.shape_of(node)
        if i < len(shape) and isinstance(shape[i], int) and shape[i] == n:
            return n
    return None


def _rename_captures(expr, leaves, flat, op_sizes=(None, None)):
    """Replace every leaf call ``_leafJ(args)`` by a canonical ``tI(b, h, q_idx,
    kv_idx)``; one captured entry per distinct (leaf, args).  An axis read at
    the flat batch index ``b * H + h`` (a [B*H, ...] tensor) is split by the
    rewrite (axis code ``FLAT``); one read at ``b mod n`` (Swin's window mask
    under a (B/n, n, H, N, N) view of the scores) is repeated to the batch
    (axis code ``CYCLIC_B``)."""
    calls = sorted({f for f in expr.atoms(sympy.Function)
                    if str(f.func).startswith("_leaf")}, key=str)
    by_name = {str(lf.func): lf for lf in leaves}
    sub, captures, specs = {}, [], []
    lf = None
    try:
        for call in calls:
            lf = by_name[str(call.func)]
            axes, kv_map, h_map, pad = [], (), (), [0, 0]
            args = [_within_heads(a, op_sizes[1]) for a in call.args]
            for i, a in enumerate(args):
                split = _split_term(a)
                shifted = _shifted(a)
                if split is not None:
                    axes.append(_split_axis(split, args, i, lf.node, op_sizes[1]))
                    if split[0] == S.kv_idx and split[1] == "divmod":   # (kv + c) // W % M
                        kv_map = ("divmod", split[2][0], split[2][1], split[3])
                    elif split[0] == S.kv_idx:     # a shifted key: kv_map (kind, W, c)
                        kv_map = split[1:3] + ((split[3],) if split[3] else ())
                    elif split[0] == S.h and axes[-1] == 1 and not (i and axes[-2] == MERGE_NEXT):
                        h_map = split[1:3]
                    elif split[0] == S.q_idx and split[1] == "div":    # the merged query, read at q + c
                        if split[3] > 0:
                            raise Decline("a captured tensor is read ahead of the query")
                        pad[0] = -split[3]
                    continue
                if a == 0:
                    axes.append(None)
                elif a == flat and flat not in _OP_AXES:
                    axes.append(FLAT)
                elif a in _OP_AXES:
                    axes.append(_OP_AXES.index(a))
                elif shifted is not None and shifted[0] in (S.q_idx, S.kv_idx) and shifted[1] < 0:
                    # read at q - c or kv - c: a slice of the scores ([Note: scores assigned in part])
                    axes.append(_OP_AXES.index(shifted[0]))
                    pad[axes[-1] - 2] = -shifted[1]
                elif _cyclic_period(a, lf.node, i) is not None:
                    axes.append(CYCLIC_B)
                else:
                    raise Decline(f"a captured tensor is read at {a}, not along one op axis")
            if axes.count(CYCLIC_B) > 1 or (CYCLIC_B in axes and FLAT in axes):
                raise Decline("a captured tensor is read at b mod n along two axes")
            used = [2 if a == QFACTORS[2] else a for a in axes
                    if a is not None and a not in (MERGE_NEXT, MERGE_NEXT_SWAPPED, *QFACTORS[:2])]
            used = [j for a in used for j in ((0, 1) if a == FLAT else (0,) if a == CYCLIC_B else (a,))]
            if len(set(used)) != len(used):
                raise Decline("a captured tensor is read along the same op axis twice")
            if lf.rank == 0:
                axes = []
            i = len(captures)
            ev = C.example_value(lf.node)
            captures.append(CaptureView(lf.node, tuple(axes), tuple(pad)))
            dims = tuple(j in used for j in range(4))
            grad = bool(ev.requires_grad and ev.dtype.is_floating_point)
            if kv_map and not ev.dtype.is_floating_point:
                raise Decline("a term read along a split key axis (decomposed relative positions) "
                              "is not a float tensor")
            if h_map and kv_map:
                raise Decline("a captured tensor is read along part of the heads and part of the keys")
            specs.append(S.CapturedTensor(dims, _dtype_name(ev.dtype), grad, kv_map, h_map))
            sub[call] = S.captured_call(i)
    except ReadDecline:
        raise
    except Decline as exc:   # name the tensor: the analysis may capture a later value instead
        raise ReadDecline(str(exc), lf.node if lf is not None else None) from exc
    return expr.xreplace(sub), captures, specs
