"""AttentionSpec: the one object between the matcher and the kernels.

Notation
--------
An attention site computes, for every batch ``b``, query head ``h``, query row
``q_idx`` and key column ``kv_idx``::

    score  = scale * <q[b, h, q_idx, :], k[b, h // G, kv_idx, :]>     # G = GQA group
    z      = score_mod(score, b, h, q_idx, kv_idx, t0(...), t1(...))  # sympy expression
    P      = softmax(z, over kv_idx)                                  # in float32 or wider
    out    = dropout(P ∘ keep, p) @ v[b, h // G]                       # keep: see zero_masked

``score_mod`` is a sympy expression over the symbols ``score, b, h, q_idx,
kv_idx``, the size symbols ``Lq, Lk`` (query and key lengths of the call) and
captured tensors ``tI(b, h, q_idx, kv_idx)``: inputs of the op broadcast to
``[B, H, Lq, Lk]`` (``CapturedTensor.dims`` says which of the four dimensions a
tensor really has; the others are broadcast).  Masking is part of the
expression: a ``Piecewise`` branch of value ``-oo`` (or a very negative finite
fill such as ``finfo.min``) is a masked position.  ``mask_predicate`` gives
that condition back as a boolean, for kernels that skip blocks.

The spec is immutable, hashable and serialisable: ``AttentionSpec.loads(s.dumps())
== s``; the string is the ``spec`` argument of the custom op and the key of
kernel caches.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from typing import Optional, Tuple

import sympy

# The index and size symbols of every expression.
# indices are integers; declaring them so lets sympy decide relations such as
# ``kv_idx <= q_idx`` vs ``kv_idx < q_idx + 1``.
b, h, q_idx, kv_idx = sympy.symbols("b h q_idx kv_idx", integer=True, nonnegative=True)
score = sympy.Symbol("score", real=True)
Lq, Lk, D = sympy.symbols("Lq Lk D", integer=True, positive=True)
INDEX_SYMBOLS = (b, h, q_idx, kv_idx)
SIZE_SYMBOLS = (Lq, Lk, D)
DIM_NAMES = ("b", "h", "q_idx", "kv_idx")

# A fill at or below this value is a mask: exp(fill - rowmax) is exactly 0 in
# float32 whenever the row also holds an unmasked score above fill + 104
# (e^-104 underflows); models use -1e4, -1e9, finfo.min and -inf.  -1e4 made
# in bfloat16 is -9984, hence a threshold a little above -1e4.
MASK_FILL_THRESHOLD = -8192.0
# Adding a constant at or below this to a float32 score gives the constant
# itself (the score is under half an ulp of it): score + finfo.min == finfo.min.
ABSORBING_FILL = -1.0e30


class Grouped(sympy.Function):
    """``Grouped(x)`` is ``x``, computed as one value before it meets the rest
    of the expression.  [Note: grouped side values] sympy distributes a number
    over a sum (``c * (1 - t0)`` becomes ``c - c * t0``); Hugging Face's
    ``(1.0 - mask) * finfo.min`` written that way and added to the score is
    ``score + c * t0 - c``, where ``score + c`` rounds to ``c`` in float32 and
    a kept position ends as 0, not the score.  The analysis keeps such a sum of
    a captured tensor grouped, so the kernels compute ``c * (1 - t0)`` as eager
    does: exactly 0 where the mask keeps, ``c`` where it drops."""

    nargs = 1
    is_real = True

    @classmethod
    def eval(cls, x):
        if not isinstance(x, sympy.Add):
            return x            # only a sum has an order to keep

    def fdiff(self, argindex=1):
        return sympy.Integer(1)


def captured(i: int) -> sympy.Function:
    """The sympy function standing for captured tensor ``i`` (``t0``, ``t1``...)."""
    return sympy.Function(f"t{i}")


def captured_call(i: int) -> sympy.Expr:
    """``tI(b, h, q_idx, kv_idx)``: captured tensor ``i`` read at one score."""
    return captured(i)(*INDEX_SYMBOLS)


def captured_reads(expr, n: int) -> list:
    """Indices (below ``n``) of the captured tensors ``expr`` reads."""
    names = {f.func.__name__ for f in sympy.sympify(expr).atoms(sympy.core.function.AppliedUndef)}
    return [i for i in range(n) if f"t{i}" in names]


def _finite_constants(expr):
    """The finite real constants of ``expr``."""
    return (a for a in sympy.preorder_traversal(expr) if a.is_number and a.is_finite and a.is_extended_real)


def _mapped_index(x, index_map: Tuple):
    """``x`` read through a split axis's map: x, x // W or x % W; with a
    shift c (``(kind, W, c)``, a slice of the scores), max(x + c, 0) // W or
    (x + c) % W ([Note: scores assigned in part] in symbolic.py)."""
    if not index_map:
        return x
    if index_map[0] == "divmod":     # (max(x + c, 0) // W) % M: the middle of three factors
        _, w, m, c = index_map
        return ((x + c).clamp(min=0) if c else x) // w % m
    kind, w = index_map[:2]
    c = index_map[2] if len(index_map) > 2 else 0
    if c:
        x = (x + c).clamp(min=0) if kind == "div" else x + c
    return x // w if kind == "div" else x % w


def _mapped_size(n: int, index_map: Tuple, ceil: bool) -> int:
    """The length of an axis of ``n`` entries read through a split axis's map:
    n, n / W (rounded up with ``ceil``) or W; (n + c) / W with a shift c."""
    if not index_map:
        return n
    if index_map[0] == "divmod":
        return index_map[2]
    kind, w = index_map[:2]
    if kind == "div" and len(index_map) > 2:
        n = max(n + index_map[2], 0)
    return (-(-n // w) if ceil else n // w) if kind == "div" else w


@dataclasses.dataclass(frozen=True)
class CapturedTensor:
    """A tensor the score modification reads.

    ``dims``: which of (b, h, q_idx, kv_idx) the tensor varies along; the op
    receives it as a 4-D tensor with size 1 on the others.
    ``requires_grad``: whether the backward must produce its gradient.
    ``dtype``: torch dtype name at the site (e.g. ``"float32"``, ``"bool"``).
    ``kv_map``: ``()`` when the key axis is read at ``kv_idx``; ``("div", W)``
    or ``("mod", W)`` when it is read at ``kv_idx // W`` or ``kv_idx % W``: a
    term of a key axis split into (Lk / W, W) (SAM's decomposed relative
    positions, [Note: split key axes]); its last axis then has Lk / W or W
    entries.
    A key axis read from a slice of the scores on ([Note: scores assigned in
    part] in symbolic.py) has a third entry, the shift c: the key axis is read
    at ``max(kv_idx + c, 0) // W`` or ``(kv_idx + c) % W``.  A key axis split
    in three (video: time, height, width) reads the middle factor through
    ``("divmod", W, M, c)``: at ``(max(kv_idx + c, 0) // W) % M``.
    ``h_map``: the same for the head axis ([Note: split head axes]): ``()``
    when it is read at ``h``, ``("div", W)`` or ``("mod", W)`` when at
    ``h // W`` or ``h % W``; its head axis then has H / W or W entries.
    """

    dims: Tuple[bool, bool, bool, bool]
    dtype: str
    requires_grad: bool = False
    kv_map: Tuple = ()
    h_map: Tuple = ()

    def h_size(self, hq: int) -> int:
        """The length of the tensor's head axis for ``hq`` query heads."""
        return _mapped_size(hq, self.h_map, ceil=False)

    def h_index(self, h):
        """The index of the tensor's head axis read at head ``h`` (an int tensor)."""
        return _mapped_index(h, self.h_map)

    def kv_size(self, lk: int) -> int:
        """The length of the tensor's key axis for ``lk`` keys."""
        return _mapped_size(lk, self.kv_map, ceil=True)

    def kv_index(self, kv):
        """The index of the tensor's key axis read at key ``kv`` (an int tensor)."""
        return _mapped_index(kv, self.kv_map)

    @property
    def is_float(self) -> bool:
        """A floating-point tensor (float16/bfloat16/float32/float64)."""
        return self.dtype.startswith(("float", "bfloat"))


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Everything a kernel needs to compute one attention site (see module doc)."""

    score_mod: sympy.Expr            # over score, b, h, q_idx, kv_idx, Lq, Lk, tI(...)
    scale: sympy.Expr                # number or expression in D (head dim of q)
    captured: Tuple[CapturedTensor, ...] = ()
    dropout_p: float = 0.0           # > 0 only in training
    gqa_group: int = 1               # query heads per key/value head (0: decided at run time)
    softmax_dtype: str = "float32"   # dtype the softmax is evaluated in (float32 or float64)
    out_dtype: str = "float32"       # dtype of the site's output
    prob_dtype: str = "float32"      # dtype of the probabilities at the P @ V product
    # dtype of the scores entering the softmax in eager: what the score
    # modification was computed in (bfloat16 scores allow the hardware tanh)
    score_dtype: str = "float32"
    # the probabilities are zeroed where the mask drops a score, after the
    # softmax and before P·V (ESPnet's ``softmax(s.masked_fill(m, finfo.min))
    # .masked_fill(m, 0)``): the denominator still counts every key, a row
    # that keeps none gives 0 ([Note: probabilities zeroed by the mask])
    zero_masked: bool = False
    # the output (B, H, Lq, Dv) is laid out as (B, Lq, H, Dv) in memory, as
    # SDPA's is: the user's ``o.transpose(1, 2)`` is then contiguous and its
    # reshape to (B, Lq, H·Dv) a view ([Note: the output with the heads inside
    # the rows] in passes/rewrite.py)
    out_heads_inner: bool = False

    # ---- derived views -------------------------------------------------
    @functools.cached_property
    def mask_predicate(self) -> sympy.Boolean:
        """Where a score is kept (True) rather than masked, as a sympy boolean.

        Only conditions that do not involve ``score`` count; a position whose
        value depends on the score is always kept.
        """
        return _keep_condition(self.score_mod)

    @functools.cached_property
    def additive_masks(self) -> Tuple[int, ...]:
        """Captured tensors that may be additive masks whose values only the
        running kernels see ([Note: additive tensor masks]): float, no
        gradient, no head axis, read at plain indices, and added to the rest
        of the value a kept position takes as they are (``g(score, ...) +
        tI``; beside a causal mask too, added before or after it)."""
        mod = _kept_value(self.score_mod)
        if not isinstance(mod, sympy.Add):
            return ()
        out = []
        for i in captured_reads(mod, len(self.captured)):
            c = self.captured[i]
            if not c.is_float or c.requires_grad or c.dims[1] or c.kv_map or c.h_map:
                continue
            t = captured_call(i)
            if t in mod.args and not (mod - t).has(t):
                out.append(i)
        return tuple(out)

    @functools.cached_property
    def tile_predicate(self) -> sympy.Boolean:
        """What the runtime block map tests per position: the mask predicate,
        and each additive mask above MASK_FILL_THRESHOLD.  Not a mask of the
        scores (an additive mask's kept positions still add its value): only
        whole tiles it drops are skipped, in query blocks whose every row
        keeps some key ([Note: additive tensor masks])."""
        extra = [sympy.StrictGreaterThan(captured_call(i), sympy.Float(MASK_FILL_THRESHOLD))
                 for i in self.additive_masks]
        return sympy.And(self.mask_predicate, *extra) if extra else self.mask_predicate

    @functools.cached_property
    def mask_fill(self) -> Optional[float]:
        """The value of masked positions (``-inf`` or a huge negative), if any."""
        fills = [_fill_value(e) for e, _ in _pieces(self.score_mod) if _is_fill(e)]
        return fills[0] if fills else None

    @functools.cached_property
    def has_finite_fill(self) -> bool:
        """Some constant of the score_mod is a finite fill (finfo.min, -1e9):
        a row of fills only is then uniform, as in eager, so blocks of fills
        cannot simply be skipped."""
        return any(bool(a <= MASK_FILL_THRESHOLD) for a in _finite_constants(self.score_mod))

    @functools.cached_property
    def may_hold_fills(self) -> bool:
        """A finite fill may reach the softmax: a constant one, or a float
        tensor in the score modification (Hugging Face's additive 0 / finfo.min
        masks: a kernel cannot see its values)."""
        if self.has_finite_fill:
            return True
        return any(self.captured[i].is_float for i in captured_reads(self.score_mod, len(self.captured)))

    @functools.cached_property
    def rounds_scores(self) -> bool:
        """Whether the modified scores are rounded to ``score_dtype`` before the
        softmax, as eager computed them, so that a row of fills plus scores (left
        padding under a causal mask) is uniform, as in eager, and not a softmax
        of the scores:

        - float16 scores where a finite fill may reach the softmax: float16's
          finfo.min (-65504) absorbs no score in float32;
        - bfloat16 scores with a moderate constant fill (-1e4, -1e9: it
          absorbs the scores in bfloat16, not in float32).  bfloat16's finfo.min
          (Hugging Face's masks) absorbs any score in float32 already; a fill
          the kernels cannot see (a tensor's values) is assumed to be that."""
        if self.score_dtype == "float16":
            return self.may_hold_fills
        if self.score_dtype == "bfloat16":
            return any(bool(ABSORBING_FILL < a <= MASK_FILL_THRESHOLD) for a in _finite_constants(self.score_mod))
        return False

    @functools.cached_property
    def mask_kind(self) -> str:
        """A name for the mask: none, causal, sliding_window, index, tensor."""
        return classify_mask(self.mask_predicate)

    @functools.cached_property
    def dscore(self) -> sympy.Expr:
        """d score_mod / d score, for the backward."""
        return sympy.diff(self.score_mod, score)

    @functools.cached_property
    def dcaptured(self) -> Tuple[Optional[sympy.Expr], ...]:
        """d score_mod / d tI for each captured tensor that requires grad."""
        out = []
        for i, c in enumerate(self.captured):
            out.append(sympy.diff(self.score_mod, captured_call(i)) if c.requires_grad else None)
        return tuple(out)

    @property
    def score_mod_is_identity(self) -> bool:
        return self.score_mod == score

    def describe_mod(self) -> str:
        """The score modification without the mask, for reports."""
        kept = _kept_value(self.score_mod)
        return "none" if kept == score else str(kept)

    # ---- serialisation -------------------------------------------------
    def dumps(self) -> str:
        """The spec as a JSON string (cached: kernels key their caches on it per call)."""
        return self._text

    @functools.cached_property
    def _text(self) -> str:
        d = {
            "score_mod": sympy.srepr(self.score_mod),
            "scale": sympy.srepr(self.scale),
            "captured": [[list(c.dims), c.dtype, c.requires_grad]
                         + ([list(c.kv_map)] if c.kv_map or c.h_map else [])
                         + ([list(c.h_map)] if c.h_map else [])
                         for c in self.captured],
            "dropout_p": self.dropout_p,
            "gqa_group": self.gqa_group,
            "softmax_dtype": self.softmax_dtype,
            "out_dtype": self.out_dtype,
            "prob_dtype": self.prob_dtype,
            "score_dtype": self.score_dtype,
        }
        if self.zero_masked:      # absent when False: the texts (and cache keys) of other specs stay
            d["zero_masked"] = True
        if self.out_heads_inner:
            d["out_heads_inner"] = True
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def loads(text: str) -> "AttentionSpec":
        d = json.loads(text)
        ns = _srepr_namespace()
        return AttentionSpec(
            score_mod=sympy.sympify(eval(d["score_mod"], ns)),
            scale=sympy.sympify(eval(d["scale"], ns)),
            captured=tuple(CapturedTensor(tuple(c[0]), c[1], c[2], tuple(c[3]) if len(c) > 3 else (),
                                          tuple(c[4]) if len(c) > 4 else ())
                           for c in d["captured"]),
            dropout_p=d["dropout_p"],
            gqa_group=d["gqa_group"],
            softmax_dtype=d["softmax_dtype"],
            out_dtype=d["out_dtype"],
            prob_dtype=d["prob_dtype"],
            score_dtype=d.get("score_dtype", "float32"),
            zero_masked=d.get("zero_masked", False),
            out_heads_inner=d.get("out_heads_inner", False),
        )

    @functools.cached_property
    def key(self) -> str:
        """A short stable hash of the spec (cache key)."""
        return hashlib.sha256(self.dumps().encode()).hexdigest()[:16]

    def scale_value(self, head_dim: int) -> float:
        if not isinstance(head_dim, int):
            # a symbolic head dim (dynamic=True, the SDPA candidate traced):
            # a number as it is; read at the dim, the graph is specialized on it
            if D not in self.scale.free_symbols:
                return float(self.scale)
            head_dim = int(head_dim)
        cache = self.__dict__.setdefault("_scale_values", {})   # per call of the op: keep it cheap
        val = cache.get(head_dim)
        if val is None:
            val = cache[head_dim] = float(self.scale.subs(D, head_dim))
        return val


def _srepr_namespace():
    ns = {k: getattr(sympy, k) for k in dir(sympy) if not k.startswith("_")}
    from sympy.functions.elementary.piecewise import ExprCondPair

    ns.update(ExprCondPair=ExprCondPair, true=sympy.true, false=sympy.false, Grouped=Grouped)
    return ns


# ---- mask analysis --------------------------------------------------------

def _pieces(expr):
    """(value, condition) pairs of a top-level Piecewise (one pair if none)."""
    expr = sympy.piecewise_fold(expr)
    if isinstance(expr, sympy.Piecewise):
        return [(e, c) for e, c in expr.args]
    return [(expr, sympy.true)]


def _fill_value(e) -> Optional[float]:
    """The fill a masked branch evaluates to, or None if ``e`` is no fill.

    ``e`` is a fill when it is a constant at or below MASK_FILL_THRESHOLD, or
    ``x + c`` with ``c <= ABSORBING_FILL`` (an additive ``finfo.min`` mask:
    ``score + c`` rounds to ``c`` in float32, while its gradient stays 1, so
    the expression itself is kept as written)."""
    if e is sympy.S.NegativeInfinity:
        return float("-inf")
    if e.is_number and e.is_extended_real:
        return float(e) if bool(e <= MASK_FILL_THRESHOLD) else None
    if isinstance(e, sympy.Add):
        consts = [a for a in e.args if a.is_number and a.is_extended_real]
        if consts and float(sum(consts)) <= ABSORBING_FILL:
            return float(sum(consts))
    return None


def _is_fill(e) -> bool:
    return _fill_value(e) is not None


def _keep_condition(expr) -> sympy.Boolean:
    """Condition under which a position is not replaced by a mask fill."""
    keep = sympy.false
    taken = sympy.false  # conditions of earlier pieces
    for e, c in _pieces(expr):
        here = sympy.And(c, sympy.Not(taken))
        if not _is_fill(e):
            keep = sympy.Or(keep, here)
        taken = sympy.Or(taken, c)
    # a condition on the score's value (``s.masked_fill(s < t, -inf)``) masks no
    # position as such: the position is kept when some score value keeps it,
    # and the score modification computes its fill
    for rel in sorted((a for a in keep.atoms(sympy.Rel) if a.has(score)), key=sympy.default_sort_key):
        keep = sympy.Or(keep.subs(rel, sympy.true), keep.subs(rel, sympy.false))
    return sympy.simplify_logic(keep) if keep.free_symbols else keep


def conditions_read_score(expr) -> bool:
    """Whether a piece's condition reads the score's value (a mask on the
    scores' values): no position is masked as such."""
    return any(c.has(score) for _, c in _pieces(expr))


def _kept_value(expr):
    """The value of a position the mask predicate keeps: the one piece that is
    no fill, or all of ``expr`` while a condition reads the score."""
    if conditions_read_score(expr):
        return expr
    vals = [e for e, _ in _pieces(expr) if not _is_fill(e)]
    return vals[0] if len(vals) == 1 else expr


def _relation_offsets(pred):
    """For a conjunction of ``kv_idx - q_idx <op> c`` terms, the interval of
    allowed ``kv_idx - q_idx`` as (lo, hi) (None = unbounded); None if the
    predicate is not of that form."""
    terms = pred.args if isinstance(pred, sympy.And) else (pred,)
    lo, hi = None, None
    d = kv_idx - q_idx
    for t in terms:
        if not isinstance(t, sympy.core.relational.Relational):
            return None
        diff = sympy.expand(t.lhs - t.rhs)
        coeff = diff.coeff(kv_idx)
        if coeff == 0 or sympy.expand(diff.coeff(q_idx) + coeff) != 0:
            return None
        c = sympy.expand(diff - coeff * d)  # t: coeff*d + c  REL 0
        if c.free_symbols - {Lq, Lk}:
            return None
        bound = -c / coeff
        op = type(t)
        if coeff < 0:
            op = {sympy.LessThan: sympy.GreaterThan, sympy.StrictLessThan: sympy.StrictGreaterThan,
                  sympy.GreaterThan: sympy.LessThan, sympy.StrictGreaterThan: sympy.StrictLessThan}.get(op, op)
        if op is sympy.LessThan:
            hi = bound if hi is None else sympy.Min(hi, bound)
        elif op is sympy.StrictLessThan:
            hi = bound - 1 if hi is None else sympy.Min(hi, bound - 1)
        elif op is sympy.GreaterThan:
            lo = bound if lo is None else sympy.Max(lo, bound)
        elif op is sympy.StrictGreaterThan:
            lo = bound + 1 if lo is None else sympy.Max(lo, bound + 1)
        else:
            return None
    return lo, hi


def _has_tensor(e) -> bool:
    return any(isinstance(f, sympy.core.function.AppliedUndef) for f in e.atoms(sympy.Function))


def classify_mask(pred) -> str:
    if pred is sympy.true:
        return "none"
    if pred is sympy.false:
        return "all"
    if _has_tensor(pred):
        terms = pred.args if isinstance(pred, sympy.And) else (pred,)
        index = [t for t in terms if not _has_tensor(t)]
        if len(index) == len(terms) - len(index) == 0 or not index:
            return "tensor"
        return classify_mask(sympy.And(*index)) + "+tensor"
    syms = pred.free_symbols
    if syms <= {q_idx, kv_idx, Lq, Lk}:
        rng = _relation_offsets(pred)
        if rng is not None:
            lo, hi = rng
            if lo is None and hi is not None:
                return "causal" if hi == 0 else f"causal(offset={hi})"
            if lo is not None and hi is not None:
                return f"sliding_window({lo}..{hi})"
        return "index"
    return "index"
