"""Symbolic interpretation of the score chain: FX nodes → sympy.

Entry point: ``ScoreInterpreter(site).run() -> Interpretation`` (or raises
``Decline`` with the reason).

Two kinds of values flow through the interpreter:

* *chain* values depend on the raw score ``R = <q, k>``; they have the score's
  shape ``[..lead.., Lq, Lk]`` and their expression is written over the op's
  own index symbols ``b, h, q_idx, kv_idx`` (spec.py).  ``Frame`` says how the
  leading axes of a chain value map to ``(b, h)``.
* *side* values (masks, biases, index arithmetic) do not depend on the score.
  Their expression is written over per-axis symbols ``A1`` (last axis), ``A2``,
  ... aligned from the right, the way broadcasting aligns them.  When a side
  value meets the chain, ``A1 → kv_idx``, ``A2 → q_idx`` and the leading axes
  follow the chain value's frame.

Anything a side value cannot be written as (a user's padding mask, a learned
bias, an opaque op) becomes a *captured tensor*: a leaf ``tJ(A..)`` standing
for the node's runtime value; the op receives that tensor.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, Dict, List, Optional, Tuple

import sympy
import torch
import torch.fx as fx

from .. import canonicalize as C
from ..operands import _VIEW_OPS, mutating_users
from . import spec as S

from .side import SideValues
from .values import (AX, round_constants, R, Decline, Frame, Interpretation, Leaf, Val, _CASTS, _REL, _has_leaf, _is_scalar, _same_sizes, _sym, as_bool, as_num, compare,
                     from_shape_env, is_one)

def _real_log(x):
    """torch.log over the reals: log 0 = -inf (Mistral's reference builds its
    causal mask as log(tril(ones))), log of a negative constant nan; a
    Piecewise (a 0/1 mask) maps branch by branch (sympy's log(0) is zoo)."""
    if isinstance(x, sympy.Piecewise):
        return sympy.Piecewise(*[(_real_log(e), c) for e, c in x.args])
    if x.is_number and x.is_zero:
        return -sympy.oo
    if x.is_number and x.is_extended_negative:
        return sympy.nan
    return sympy.log(x)


_UNARY = {
    "tanh": sympy.tanh, "exp": sympy.exp, "log": _real_log, "abs": sympy.Abs,
    "sqrt": sympy.sqrt, "rsqrt": lambda x: 1 / sympy.sqrt(x),
    "sigmoid": lambda x: 1 / (1 + sympy.exp(-x)), "relu": lambda x: sympy.Max(x, 0),
    "neg": lambda x: -x, "sin": sympy.sin, "cos": sympy.cos, "erf": sympy.erf,
}
_BINARY = {"add", "sub", "rsub", "mul", "div", "pow", "minimum", "maximum"}


# [Note: split key axes]
# SAM's (and ViTDet's, MViTv2's) decomposed relative positions view the scores
# (B*H, Lq, Lk) as (B*H, qh, qw, kh, kw), add ``rel_h[..., :, None]`` and
# ``rel_w[..., None, :]`` and view them back.  In the split view the trailing
# axes are read at (q // qw, q % qw, kv // kw, kv % kw) (``Frame.split``); a
# captured tensor whose two query terms are adjacent axes reads the query axis
# itself (merged by the rewrite), and one read at kv // kw or kv % kw keeps
# that key axis (``CapturedTensor.kv_map``): the kernels read it at that index,
# so the (Lq, Lk) bias is never built.  Only a view into exactly that split
# and back is taken; while split, no reduction over the last axis is a row's.
# The scores may be viewed with three factors a side, (qt, qh, qw, kt, kh, kw)
# (SlowFast's video MViTv2; ``Frame.split`` holds the factors).  A side value
# built in the split layout and reshaped to the scores' is read the same way
# (``side._merged_split_axes``), also with three factors a side:
# torchvision's video MViTv2 sums time, height and width terms in a
# (.., qt, qh, qw, kt, kh, kw) broadcast; the middle key factor is read at
# (kv // kw) % kh (``kv_map`` ``("divmod", kw, kh, c)``) and the three query
# factors, on any of the tensor's axes, are ordered and merged into one query
# axis by the rewrite (``layout.QFACTORS``, a copy of the small term).

def _axes_split(src: Val, new) -> Optional[Val]:
    """The chain value of a view that splits the query and key axes into
    (qh, qw, kh, kw) (or three factors each: (qt, qh, qw, kt, kh, kw)), or
    merges them back; None for any other reshape."""
    if new is None or src.frame is None:
        return None
    def ints(*ds):
        return all(isinstance(d, int) for d in ds)

    lead = len(src.shape) - 2 if src.frame.split is None else len(src.shape) - sum(map(len, src.frame.split))
    if src.frame.split is None and len(new) >= len(src.shape) + 2 and ints(*new[lead:], *src.shape[-2:]) \
            and _same_sizes(tuple(new[:lead]), tuple(src.shape[:lead])):
        trail = tuple(new[lead:])
        lq, lk = src.shape[-2:]
        for nq in range(2, len(trail) - 1):
            qf, kf = trail[:nq], trail[nq:]
            if len(qf) <= 3 and len(kf) <= 3 and math.prod(qf) == lq and math.prod(kf) == lk \
                    and not (max(qf) == lq and max(kf) == lk):
                return Val(src.expr, tuple(new), True, dataclasses.replace(src.frame, split=(qf, kf)))
        return None
    if src.frame.split is not None and len(new) == lead + 2 and ints(*new[-2:]) \
            and new[-2] == math.prod(src.frame.split[0]) and new[-1] == math.prod(src.frame.split[1]) \
            and _same_sizes(tuple(new[:-2]), tuple(src.shape[:lead])):
        return Val(src.expr, tuple(new), True, dataclasses.replace(src.frame, split=None))
    return None


def _grouped(x):
    """``x`` about to be scaled by a number: a sum over a captured tensor stays
    one value ([Note: grouped side values] in spec.py), unless its pieces fold
    to constants (``1 - (bool mask)``)."""
    if not isinstance(x, sympy.Add) or x.has(R) or not _has_leaf(x):
        return x
    folded = sympy.piecewise_fold(x)
    return folded if not isinstance(folded, sympy.Add) else S.Grouped(x)


def _slice_region(index, shape) -> Optional[List[Tuple[int, Any, Any]]]:
    """``x[index]`` as (axis, lo, hi) bounds for the axes it slices (none:
    all of ``x``), when it is made of ints and slices with unit step and
    bounds that are ints (negative ones counted from an int size) and one
    Ellipsis at most; else None."""
    index = index if isinstance(index, tuple) else (index,)
    if shape is None or sum(i is Ellipsis for i in index) > 1 \
            or len([i for i in index if i is not Ellipsis]) > len(shape):
        return None
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (len(shape) - len(index) + 1) + index[at + 1:]
    out = []
    for d, i in enumerate(index):
        size = shape[d]
        if isinstance(i, int) and not isinstance(i, bool):      # s[:, 1] = v: the slice 1:2
            if i < 0 and not isinstance(size, int):
                return None
            i = i + size if i < 0 else i
            i = slice(i, i + 1)
        if not isinstance(i, slice) or i.step not in (None, 1):
            return None
        bounds = []
        for b, default in ((i.start, 0), (i.stop, None)):
            if b is None:
                bounds.append(default)
            elif isinstance(b, int) and b >= 0:
                bounds.append(b)
            elif isinstance(b, int) and isinstance(size, int):
                bounds.append(max(size + b, 0))
            else:
                return None
        lo, hi = bounds
        if lo == 0 and hi is None:
            continue
        out.append((d, sympy.Integer(lo), sympy.oo if hi is None else sympy.Integer(hi)))
    return out


def _bool_index(index, shape) -> Optional[fx.Node]:
    """The boolean tensor of ``x[m]`` (``m`` of x's rank) or ``x[..., m]``
    (``m`` over x's last axes), else None."""
    index = index if isinstance(index, tuple) else (index,)
    m = index[-1]
    if shape is None or not isinstance(m, fx.Node):
        return None
    ev = C.example_value(m)
    if not isinstance(ev, torch.Tensor) or ev.dtype != torch.bool:
        return None
    if len(index) == 1 and ev.dim() == len(shape):
        return m
    if len(index) == 2 and index[0] is Ellipsis and ev.dim() <= len(shape):
        return m
    return None


class ScoreInterpreter(SideValues):
    """Interprets the nodes between the contraction ``score_node`` (value
    ``coef * R``) and ``softmax_in`` (see module doc)."""

    def __init__(self, score_node: fx.Node, coef, softmax_in: fx.Node, real_values: Dict,
                 size_map: Dict, chain_nodes: set, softmax_node: fx.Node, heads=None,
                 opaque: frozenset = frozenset()):
        self.score_node, self.coef, self.softmax_in = score_node, coef, softmax_in
        self.softmax_node = softmax_node
        self.real_values = real_values      # placeholder/get_attr node -> real tensor
        self.size_map = size_map            # shape-env sympy symbol -> Lq / Lk / D
        self.chain_nodes = chain_nodes      # from match.chain_nodes
        # side values captured whole ([Note: a side value captured whole] in build)
        self.opaque = opaque
        self.memo: Dict[fx.Node, Val] = {}
        self.leaves: List[Leaf] = []
        self.prefix_scales: set = set()
        self._readers: List[fx.Node] = []
        self.joins: List[Tuple[fx.Node, Val]] = []  # side values folded into the chain
        self.folded: List[fx.Node] = []     # buffers/constants whose values became expressions
        self.order = {n: i for i, n in enumerate(score_node.graph.nodes)}
        sshape = C.shape_of(score_node)
        lead = tuple(sshape[:-2])
        if len(lead) == 2:
            op_sizes = lead
        elif len(lead) == 1:   # [B*H, L, L]: heads split by a later view, or one batch
            op_sizes = (1, lead[0]) if heads is None else tuple(heads)
        elif len(lead) == 3:   # [B, Hkv, G, L, L]: grouped heads, merged
            op_sizes = (lead[0], _sym(lead[1]) * _sym(lead[2]))
        else:
            raise Decline(f"scores of rank {len(sshape)} (3-D to 5-D supported)")
        self.op_sizes = op_sizes
        # the op's flat batch index; with one op batch (b is always 0) it is h
        flat = S.h if is_one(op_sizes[0]) else S.b * _sym(op_sizes[1]) + S.h
        self.flat = flat
        self.score_frame = Frame(lead, op_sizes, flat)
        self.softmax_frame = self.score_frame     # set by run()

    def run(self) -> Interpretation:
        self._readers = [self.softmax_node]
        v = self.value(self.softmax_in)
        if not v.chain:
            raise Decline("softmax input does not depend on the scores")
        self.softmax_frame = v.frame
        if v.frame is not None and v.frame.split is not None:
            raise Decline("the softmax runs over part of a split key axis")
        if v.frame is not None and (v.frame.offset != (0, 0) or not _same_sizes(
                tuple(v.shape[-2:]), tuple(C.shape_of(self.score_node)[-2:]))):
            raise Decline("the softmax runs over a slice of the scores")
        e = as_num(v.expr)
        self._note_prefix(e)
        return Interpretation(e, self.prefix_scales, self.leaves)

    def resolve(self, node: fx.Node) -> fx.Node:
        """The version of ``node`` that the current reader sees: the last
        in-place op on it before the reader, or ``node`` itself."""
        if not self._readers:
            return node

        at = self.order[self._readers[-1]]
        before = [m for m in mutating_users(node) if self.order[m] < at]
        return max(before, key=self.order.get) if before else node

    # ---- values --------------------------------------------------------
    def value(self, node) -> Val:
        if not isinstance(node, fx.Node):
            return Val(self.const(node), ())
        node = self.resolve(node)
        if node in self.memo:
            return self.memo[node]
        # a view reads no data: its storage is read by whoever reads the view, so
        # writes to the base between the view and that reader count (``t = s.view(..);
        # s.masked_fill_(m, -inf); softmax(t)``), and the view's value depends on
        # its reader: not kept
        op = C.canonical(node)
        view = op is not None and op.name in _VIEW_OPS and node is not self.score_node and bool(self._readers)
        if not view:
            self._readers.append(node)
        try:
            if node is self.score_node:
                v = Val(self.coef * R, C.shape_of(node), True, self.score_frame)
            elif node in self.chain_nodes:
                v = self.chain_value(node)
            else:
                v = self.side_value(node)
        finally:
            if not view:
                self._readers.pop()
        if not view:
            self.memo[node] = v
        return v

    def elementwise_over(self, node: fx.Node, stand_in: fx.Node, symbol) -> Val:
        """The value of elementwise ``node`` with ``stand_in`` (an input of it
        with the scores' shape) read as the scalar ``symbol`` in the score
        frame: what ``node`` does to the probabilities, position by position."""
        op = C.canonical(node)
        operands, extra = self.operands(op)
        readers, self._readers = self._readers, [node]
        key = self.resolve(stand_in)
        # the softmax input's frame: the scores' own, or a 4-D view splitting their heads
        self.memo[key] = Val(symbol, C.shape_of(stand_in), True, self.softmax_frame)
        try:
            return self.elementwise(node, op.name, operands, extra)
        finally:
            self.memo.pop(key, None)
            self._readers = readers

    def const(self, x):
        if isinstance(x, bool):
            return sympy.true if x else sympy.false
        if isinstance(x, float):
            if math.isinf(x):
                return sympy.oo if x > 0 else -sympy.oo
            if math.isnan(x):
                raise Decline("a NaN constant in the score chain")
            return sympy.Float(x)
        if isinstance(x, int):
            return sympy.Integer(x)
        if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            e = from_shape_env(x.node.expr)
            unknown = e.free_symbols - set(self.size_map)
            if unknown:
                raise Decline(f"a runtime size {e} the spec cannot name")
            return e.subs(self.size_map)
        if isinstance(x, fx.Node):
            ev = C.example_value(x)
            if isinstance(ev, torch.Tensor):
                raise Decline("tensor where a number was expected")
            return self.const(ev)
        raise Decline(f"unsupported constant {x!r}")

    def _note_prefix(self, e):
        """Record ``c`` when a pure ``c * R`` is consumed by anything but a
        scaling: that ``c`` is the attention scale."""
        e = sympy.sympify(e)
        if not isinstance(e, sympy.Expr):
            return          # a comparison of the scores (a mask that reads their values)
        c, rest = e.as_coeff_Mul() if e.has(R) else (None, None)
        if rest == R:
            self.prefix_scales.add(c)
        elif isinstance(e, sympy.Mul) and R in e.args:
            coeff = e / R
            if not coeff.has(R) and not any(isinstance(a, sympy.Function) for a in coeff.atoms(sympy.Function)):
                self.prefix_scales.add(coeff)

    # ---- elementwise ---------------------------------------------------
    def elementwise(self, node: fx.Node, name: str, operands: List[Any], extra, out_shape=None) -> Val:
        vals = [self.value(a) for a in operands]
        out_shape = out_shape or C.shape_of(node)
        if out_shape is None:
            raise Decline(f"'{name}' without a tensor result")
        chain = [v for v in vals if v.chain]
        if chain:
            frame = chain[0].frame
            if any(not _same_sizes(v.frame.sizes, frame.sizes) for v in chain):
                raise Decline("scores combined across different batch layouts")
            if any(v.frame.offset != frame.offset or v.frame.split != frame.split for v in chain):
                raise Decline("scores combined with another part of them")
            if any(not _same_sizes(tuple(v.shape[-2:]), tuple(out_shape[-2:])) for v in chain):
                raise Decline("a part of the scores is broadcast against the scores")
            if len(out_shape) != len(chain[0].shape):
                raise Decline("a tensor of higher rank than the scores joins the score chain")
            exprs = [v.expr if v.chain else self.join(v, frame, len(out_shape)) for v in vals]
            self.joins += [(self.resolve(a), v) for a, v in zip(operands, vals)
                           if not v.chain and isinstance(a, fx.Node)]
        else:
            frame = None
            exprs = [self.broadcast(v, out_shape) for v in vals]
        return Val(self.combine(name, exprs, extra), out_shape, bool(chain), frame)

    def combine(self, name, e, extra):
        if name in _UNARY:
            return _UNARY[name](as_num(e[0]))
        if name in _REL:
            return compare(name, e[0], e[1])
        if name == "and":
            return sympy.And(as_bool(e[0]), as_bool(e[1]))
        if name == "or":
            return sympy.Or(as_bool(e[0]), as_bool(e[1]))
        if name == "not":
            return sympy.Not(as_bool(e[0]))
        if name == "where":
            return sympy.Piecewise((as_num(e[1]), as_bool(e[0])), (as_num(e[2]), True))
        if name == "masked_fill":
            return sympy.Piecewise((as_num(e[2]), as_bool(e[1])), (as_num(e[0]), True))
        if name == "clamp":
            x = as_num(e[0])
            if extra.get("max") is not None:
                x = sympy.Min(x, as_num(e[2]))
            if extra.get("min") is not None:
                x = sympy.Max(x, as_num(e[1]))
            return x
        x, y = as_num(e[0]), as_num(e[1]) if len(e) > 1 else None
        alpha = self.const(extra.get("alpha", 1) or 1)
        if name == "add":
            return x + alpha * y
        if name == "sub":
            return x - alpha * y
        if name == "rsub":
            return y - alpha * x
        if name == "mul":
            if y.is_Number:
                x = _grouped(x)
            elif x.is_Number:
                y = _grouped(y)
            return x * y
        if name == "div":
            return (_grouped(x) if y.is_Number else x) / y
        if name == "pow":
            return x ** y
        if name == "minimum":
            return sympy.Min(x, y)
        if name == "maximum":
            return sympy.Max(x, y)
        raise Decline(f"unsupported elementwise op '{name}'")

    def join(self, v: Val, frame: Frame, rank: int):
        """A side value's expression in the op's coordinates, at a chain
        value of rank ``rank`` whose leading axes follow ``frame``."""
        if len(v.shape) > rank:
            raise Decline("a tensor of higher rank than the scores joins the score chain")
        comps = frame.components()
        idx = frame.index_axes()
        targets = {j: idx[len(idx) - j] for j in range(1, len(idx) + 1)}
        for i in range(len(idx) + 1, rank + 1):
            targets[i] = comps[rank - i]
        sub = {}
        for i in range(1, len(v.shape) + 1):
            size = v.shape[len(v.shape) - i]
            sub[AX[i - 1]] = sympy.Integer(0) if is_one(size) else targets[i]
        return v.expr.xreplace(sub) if hasattr(v.expr, "xreplace") else v.expr

    @staticmethod
    def broadcast(v: Val, out_shape):
        sub = {}
        for i in range(1, len(v.shape) + 1):
            size, out = v.shape[len(v.shape) - i], out_shape[len(out_shape) - i]
            if is_one(size) and not is_one(out):
                sub[AX[i - 1]] = sympy.Integer(0)
        return v.expr.xreplace(sub) if sub else v.expr

    # ---- the chain -----------------------------------------------------
    def chain_value(self, node: fx.Node) -> Val:
        if node.target is operator.setitem:
            return self.chain_setitem(node)
        op = C.canonical(node)
        if op is None:
            raise Decline(f"unsupported node '{node.name}' in the score chain")
        name = op.name
        if name == "getitem" and _slice_region(op.kw.get("index"), C.shape_of(op.kw["input"])) == []:
            return self.value(op.kw["input"])      # s[:, :, 0:, 0:]: all of it
        if name == "getitem":
            return self.chain_slice(node, op)
        if name == "sub":
            shift = C.row_max_shift(node)
            if shift is not None and self._is_row_constant(op.kw.get("other"), shift[2]) \
                    and not self.value(shift[0]).frame.split \
                    and self._only_casts_to_softmax(node):
                return self.value(shift[0])  # softmax(z - rowmax) == softmax(z)
        if name in _CASTS:
            src = self.value(op.kw["input"])
            dt = getattr(C.example_value(node), "dtype", None)
            if dt is not None and not dt.is_floating_point:
                raise Decline(f"the scores are cast to {dt}")
            return Val(round_constants(src.expr, dt), C.shape_of(node), True, src.frame)
        if name in ("view_as", "reshape_as") and not self.value(op.kw["input"]).chain:
            v = self.side_reshape(node, op.kw)     # a side tensor shaped like the scores (SAM)
            if v is None:
                raise Decline(f"'{name}' of a tensor to the scores' shape cannot be expressed")
            return v
        if name in ("view", "reshape", "unsqueeze", "squeeze", "flatten", "view_as", "reshape_as"):
            return self.chain_reshape(node, op)
        if name == "expand_as" and op.kw.get("input") is not None and not self.value(op.kw["input"]).chain:
            x = self.value(op.kw["input"])          # a mask broadcast to the scores' shape (DistilBERT)
            return Val(self.broadcast(x, C.shape_of(node)), C.shape_of(node))
        if name in ("mul", "div"):
            return self.scaling(node, op)
        if name == "nan_to_num":
            return self.chain_nan_to_num(node, op)
        operands, extra = self.operands(op)
        if operands is None:
            raise Decline(f"'{name}' between Q·Kᵀ and softmax cannot be expressed")
        for a in operands:
            v = self.value(a)
            if v.chain:
                self._note_prefix(v.expr)
        return self.elementwise(node, name, operands, extra)

    def chain_setitem(self, node: fx.Node) -> Val:
        """``s[idx] = value``: over all of ``s``, the scores are ``value`` from
        here on (MViTv2 writes its relative positions back so); a number
        written where a boolean index or slices select is a mask."""
        target, index, value = node.args[:3]
        shape = C.shape_of(target)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        mask = _bool_index(index, shape)
        if mask is not None and number:
            # s[..., m] = v, s[m] = v with a boolean m: masked_fill(s, m, v)
            return self.elementwise(node, "masked_fill", [target, mask, value], {}, out_shape=shape)
        region = _slice_region(index, shape)
        if region == []:
            v = self.value(value)
            if not v.chain:
                raise Decline("the scores are overwritten by values that do not depend on them")
            return v if tuple(v.shape) == tuple(shape) else Val(self.broadcast(v, shape), shape, True, v.frame)
        if region is not None and isinstance(value, fx.Node) and self.value(value).chain:
            return self.chain_assign_part(node, target, region, self.value(value))
        if region is None or not number:
            raise Decline("the scores are assigned in part (a slice or an index of them)")
        # s[..., :p] = v: v where every sliced axis's position lies in its slice
        v = self.value(target)
        axes = v.frame.components() + v.frame.index_axes()
        if len(axes) != len(shape):
            raise Decline("a slice assigned to the scores across a split axis")
        cond = sympy.And(*[sympy.And(lo <= axes[d], axes[d] < hi) for d, lo, hi in region])
        return Val(sympy.Piecewise((self.const(float(value)), cond), (as_num(v.expr), True)), shape, True, v.frame)

    # [Note: scores assigned in part]
    # MViTv2 with a cls token adds its decomposed relative positions to the
    # scores of the spatial tokens only and writes them back:
    # ``attn[:, :, 1:, 1:] = (attn[:, :, 1:, 1:].view(B, H, qh, qw, kh, kw)
    # + rel_h + rel_w).view(...)``.  A slice of the scores along the query and
    # key axes is a chain value whose frame has an ``offset``: its position
    # (i, j) is the op's (i + oq, j + ok), so a side value joined to it is
    # read at (q_idx - oq, kv_idx - ok) (split as the frame splits).  The
    # assignment back is ``Piecewise((value, oq <= q_idx < hq & ...), (scores,
    # True))``; only a value computed from the same slice may be assigned
    # there, and a sliced value reaches nothing else: combined with a value
    # of another slice, or taken to the softmax, the site is declined.  The
    # captured tensors read at shifted indices are padded in front
    # (``CaptureView.pad``) or read through a shifted split key map
    # (``CapturedTensor.kv_map``); where the condition fails their values are
    # read at a clamped index and not used.  A term the model builds at the
    # slice's size from split factors (torchvision's ``attn[:, :, 1:, 1:] +=
    # rel_pos``) is read through its factors ([Note: split key axes]); one the
    # analysis can only capture whole is padded, a copy of that term.

    def chain_slice(self, node: fx.Node, op) -> Val:
        """``s[..., a:b, c:d]``: the scores from (a, c) on ([Note: scores
        assigned in part])."""
        src = self.value(op.kw["input"])
        shape = C.shape_of(op.kw["input"])
        region = _slice_region(op.kw.get("index"), shape)
        new = C.shape_of(node)
        rank = len(shape) if shape is not None else 0
        if region is None or new is None or len(new) != rank or src.frame is None \
                or src.frame.split is not None or any(d < rank - 2 for d, _, _ in region):
            raise Decline("the scores are sliced or indexed along an axis other than the query and key axes")
        lo = {d: int(a) for d, a, _ in region}
        oq, ok = src.frame.offset
        frame = dataclasses.replace(src.frame, offset=(oq + lo.get(rank - 2, 0), ok + lo.get(rank - 1, 0)))
        return Val(src.expr, tuple(new), True, frame)

    def chain_assign_part(self, node: fx.Node, target, region, v: Val) -> Val:
        """``s[..., a:b, c:d] = f(s[..., a:b, c:d])``: f where the slice lies,
        the scores elsewhere ([Note: scores assigned in part])."""
        shape = C.shape_of(target)
        rank = len(shape)
        t = self.value(target)
        if any(d < rank - 2 for d, _, _ in region) or t.frame is None or t.frame.split is not None \
                or t.frame.offset != (0, 0):
            raise Decline("the scores are assigned in part along an axis other than the query and key axes")
        lo = {d: int(a) for d, a, _ in region}
        want = (lo.get(rank - 2, 0), lo.get(rank - 1, 0))
        if v.frame is None or v.frame.split is not None or v.frame.offset != want:
            raise Decline("a part of the scores is assigned a value computed from another part of them")
        extent = []
        for d in range(rank):
            bound = next(((a, b) for e, a, b in region if e == d), None)
            if bound is None:
                extent.append(shape[d])
                continue
            a, b = bound
            if not isinstance(shape[d], int):
                raise Decline("a part of the scores with a dynamic size is assigned")
            extent.append(max(min(shape[d], int(b) if b != sympy.oo else shape[d]) - int(a), 0))
        if len(v.shape) != rank or not _same_sizes(tuple(v.shape), tuple(extent)) \
                or not _same_sizes(v.frame.sizes, t.frame.sizes):
            raise Decline("a part of the scores is assigned a value of another shape")
        axes = t.frame.index_axes()
        cond = sympy.And(*[sympy.And(a <= axes[d - rank + 2], axes[d - rank + 2] < b) for d, a, b in region])
        return Val(sympy.Piecewise((as_num(v.expr), cond), (as_num(t.expr), True)), shape, True, t.frame)

    def chain_nan_to_num(self, node, op) -> Val:
        """``torch.nan_to_num(scores)`` (the Differential Transformer's): an
        infinite score becomes its dtype's largest finite value, a finite one
        stays; as a clamp to those values.  A nan score (nan inputs) is not
        modelled: it stays nan where eager's would be 0."""
        src = self.value(op.kw["input"])
        dt = C.example_value(node).dtype
        if not dt.is_floating_point or any(isinstance(op.kw.get(a), fx.Node) for a in ("nan", "posinf", "neginf")):
            raise Decline("'nan_to_num' of the scores with runtime bounds")
        big = torch.finfo(dt).max
        hi = op.kw.get("posinf") if op.kw.get("posinf") is not None else big
        lo = op.kw.get("neginf") if op.kw.get("neginf") is not None else -big
        x = as_num(src.expr)
        return Val(sympy.Max(sympy.Min(x, self.const(float(hi))), self.const(float(lo))),
                   C.shape_of(node), True, src.frame)

    @staticmethod
    def _is_row_constant(m: fx.Node, dim) -> bool:
        """A max over the key axis, kept as size 1: one value per score row."""
        shape = C.shape_of(m)
        return (shape is not None and is_one(shape[-1]) and isinstance(dim, int)
                and C.norm_dim(dim, len(shape)) == len(shape) - 1)

    def _only_casts_to_softmax(self, node: fx.Node) -> bool:
        """Whether only casts and scalings by positive numbers lie between
        ``node`` and the softmax: softmax(c * (z - rowmax)) == softmax(c * z)
        (CogView's PB-relax scales after the shift)."""
        cur = node
        for _ in range(8):
            if cur is self.softmax_in:
                return True
            users = list(cur.users)
            if len(users) != 1 or users[0] not in self.chain_nodes:
                return False
            prev, cur = cur, users[0]
            op = C.canonical(cur)
            if op is not None and op.name in ("mul", "div") and op.kw.get("rounding_mode") is None:
                other = op.kw.get("other") if op.kw.get("input") is prev else op.kw.get("input")
                if op.name == "div" and op.kw.get("input") is not prev:
                    return False
                if isinstance(other, (int, float)) and not isinstance(other, bool) and other > 0 \
                        and math.isfinite(other):
                    continue
                return False
            if op is None or op.name not in _CASTS:
                return False
        return False

    def scaling(self, node, op) -> Val:
        """mul/div: keeps ``c * R`` pure when the factor is a number."""
        operands, extra = self.operands(op)
        vals = [self.value(a) for a in operands]
        if not all(v.chain or _is_scalar(v) for v in vals):
            for v in vals:
                if v.chain:
                    self._note_prefix(v.expr)
        return self.elementwise(node, op.name, operands, extra)

    def chain_reshape(self, node, op) -> Val:
        src = self.value(op.kw["input"])
        new = C.shape_of(node)
        split = _axes_split(src, new)
        if split is not None:
            return split
        if new is None or len(new) < 2 or not _same_sizes(new[-2:], src.shape[-2:]) or src.frame.split:
            raise Decline("a reshape of the scores that moves the query or key axis")
        lead = tuple(new[:-2])
        total = sympy.Mul(*[_sym(s) for s in lead])
        want = sympy.Mul(*[_sym(s) for s in src.frame.op_sizes])
        if sympy.simplify(total - want) != 0:
            raise Decline("a reshape of the scores that changes the batch")
        frame = Frame(lead, src.frame.op_sizes, src.frame.flat, offset=src.frame.offset)
        return Val(src.expr, new, True, frame)

    def operands(self, op):
        """Tensor/number operands of an elementwise op, in canonical order."""
        k = op.kw
        name = op.name
        if name in _UNARY or name in ("not",):
            return [k["input"]], {}
        if name in _BINARY or name in _REL or name in ("and", "or"):
            other = k.get("other", k.get("exponent"))
            if name == "pow" and "exponent" not in k:
                other = k.get("other")
            return [k["input"], other], {"alpha": k.get("alpha")}
        if name == "where":
            return [k["condition"], k["input"], k["other"]], {}
        if name == "masked_fill":
            return [k["input"], k["mask"], k["value"]], {}
        if name == "clamp":
            lo, hi = k.get("min"), k.get("max")
            return [k["input"], lo if lo is not None else 0, hi if hi is not None else 0], \
                {"min": lo, "max": hi}
        return None, None

    # ---- side values -----------------------------------------------------
