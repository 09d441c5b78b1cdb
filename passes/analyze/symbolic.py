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
from typing import Any, Dict, List, Optional, Tuple

import sympy
import torch
import torch.fx as fx

from .. import canonicalize as C
from . import spec as S

R = sympy.Symbol("R", real=True)  # the raw contraction <q, k> before any scaling
AX = tuple(sympy.Symbol(f"A{i}", integer=True, nonnegative=True) for i in range(1, 9))


class Decline(Exception):
    """The site cannot be expressed exactly; the message is the reason."""


@dataclasses.dataclass
class Val:
    expr: Any                 # sympy Expr (numeric) or Boolean
    shape: Tuple              # sizes of the value (ints or SymInts)
    chain: bool = False       # depends on the score
    frame: Optional["Frame"] = None  # chain values only


@dataclasses.dataclass(frozen=True)
class Frame:
    """Leading axes of a chain value: ``sizes`` is a row-major split of the
    op's flat batch index ``b * H' + h`` (``op_sizes`` = (B', H'))."""

    sizes: Tuple
    op_sizes: Tuple
    flat: Any                 # sympy expression of the flat batch index

    def components(self) -> List[Any]:
        if _same_sizes(self.sizes, self.op_sizes):
            return [S.b, S.h]
        if len(self.sizes) == 1:
            return [self.flat]
        if len(self.sizes) == 0:
            return []
        out, stride = [], 1
        for size in reversed(self.sizes[1:]):
            if not isinstance(size, int):
                raise Decline("a batch reshape of the scores with a dynamic size")
            stride *= size
        rest = self.flat
        for i, size in enumerate(self.sizes):
            if i == 0:
                out.append(sympy.floor(rest / stride))
            else:
                stride //= size
                out.append(sympy.Mod(sympy.floor(rest / stride), size) if stride > 1
                           else sympy.Mod(rest, size))
        return out


def _same_sizes(a, b) -> bool:
    return len(a) == len(b) and all(_size_eq(x, y) for x, y in zip(a, b))


def _size_eq(x, y) -> bool:
    if isinstance(x, int) and isinstance(y, int):
        return x == y
    try:
        return bool(sympy.simplify(_sym(x) - _sym(y)) == 0)
    except Exception:  # noqa: BLE001 - unknown size kinds compare unequal
        return False


def _sym(x):
    if isinstance(x, (torch.SymInt, torch.SymFloat)):
        return x.node.expr
    return sympy.sympify(x)


@dataclasses.dataclass
class Leaf:
    """A captured tensor: ``node``'s runtime value, read as ``tJ(args)``."""

    node: fx.Node
    func: Any                 # the sympy function standing for it
    rank: int


@dataclasses.dataclass
class Interpretation:
    expr: Any                 # over R, b, h, q_idx, kv_idx, Lq, Lk, D and leaf calls
    prefix_scales: set
    leaves: List[Leaf]
    softmax_frame: Frame


def is_one(size) -> bool:
    return isinstance(size, int) and size == 1


def broadcast_shapes(*shapes):
    rank = max(len(s) for s in shapes)
    out = []
    for i in range(rank):
        dims = [s[len(s) - rank + i] for s in shapes if len(s) - rank + i >= 0]
        non1 = [d for d in dims if not is_one(d)]
        out.append(non1[0] if non1 else 1)
    return tuple(out)


def is_bool(e) -> bool:
    """A sympy boolean (a Symbol is also a ``Boolean`` in sympy: not here)."""
    return isinstance(e, (sympy.core.relational.Relational, sympy.logic.boolalg.BooleanFunction,
                          sympy.logic.boolalg.BooleanAtom))


def as_bool(e):
    if is_bool(e):
        return e
    return compare("ne", e, sympy.Integer(0))


def as_num(e):
    if is_bool(e):
        if e is sympy.true:
            return sympy.Integer(1)
        if e is sympy.false:
            return sympy.Integer(0)
        return sympy.Piecewise((1, e), (0, True))
    return e


_REL = {"eq": sympy.Eq, "ne": sympy.Ne, "lt": sympy.Lt, "le": sympy.Le,
        "gt": sympy.Gt, "ge": sympy.Ge}


def compare(op: str, x, y):
    """``x <op> y`` as a sympy boolean; Piecewise values of constants are
    compared branch by branch (``tril(ones) == 0`` becomes a condition)."""
    x, y = as_num(x), as_num(y)
    for a, other, flip in ((x, y, False), (y, x, True)):
        if isinstance(a, sympy.Piecewise) and other.is_number and all(v.is_number for v, _ in a.args):
            result, taken = sympy.false, sympy.false
            for v, c in a.args:
                r = _REL[op](other, v) if flip else _REL[op](v, other)
                if r is sympy.true:
                    result = sympy.Or(result, sympy.And(c, sympy.Not(taken)))
                elif r is not sympy.false:
                    break
                taken = sympy.Or(taken, c)
            else:
                return sympy.simplify_logic(result) if result.free_symbols else result
    return _REL[op](x, y)


_UNARY = {
    "tanh": sympy.tanh, "exp": sympy.exp, "log": sympy.log, "abs": sympy.Abs,
    "sqrt": sympy.sqrt, "rsqrt": lambda x: 1 / sympy.sqrt(x),
    "sigmoid": lambda x: 1 / (1 + sympy.exp(-x)), "relu": lambda x: sympy.Max(x, 0),
    "neg": lambda x: -x, "sin": sympy.sin, "cos": sympy.cos, "erf": sympy.erf,
}
_CASTS = {"to", "type", "type_as", "float", "half", "bfloat16", "double", "contiguous",
          "clone", "long", "int", "bool"}
_BINARY = {"add", "sub", "rsub", "mul", "div", "pow", "minimum", "maximum"}


class ScoreInterpreter:
    """Interprets the nodes between the contraction ``score_node`` (value
    ``coef * R``) and ``softmax_in`` (see module doc)."""

    def __init__(self, score_node: fx.Node, coef, softmax_in: fx.Node, real_values: Dict,
                 size_map: Dict, chain_nodes: set, softmax_node: fx.Node, heads=None):
        self.score_node, self.coef, self.softmax_in = score_node, coef, softmax_in
        self.softmax_node = softmax_node
        self.real_values = real_values      # placeholder/get_attr node -> real tensor
        self.size_map = size_map            # shape-env sympy symbol -> Lq / Lk / D
        self.chain_nodes = chain_nodes      # from match.chain_nodes
        self.memo: Dict[fx.Node, Val] = {}
        self.leaves: List[Leaf] = []
        self.prefix_scales: set = set()
        self._readers: List[fx.Node] = []
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
        flat = S.b * _sym(op_sizes[1]) + S.h
        self.flat = flat
        self.score_frame = Frame(lead, op_sizes, flat)

    def run(self) -> Interpretation:
        self._readers = [self.softmax_node]
        v = self.value(self.softmax_in)
        if not v.chain:
            raise Decline("softmax input does not depend on the scores")
        e = as_num(v.expr)
        self._note_prefix(e)
        return Interpretation(e, self.prefix_scales, self.leaves, v.frame)

    def resolve(self, node: fx.Node) -> fx.Node:
        """The version of chain node ``node`` that the current reader sees:
        the last in-place op on it before the reader, or ``node`` itself."""
        if not self._readers or node not in self.chain_nodes:
            return node
        from ..match import mutating_users
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
        self._readers.append(node)
        try:
            if node is self.score_node:
                v = Val(self.coef * R, C.shape_of(node), True, self.score_frame)
            elif node in self.chain_nodes:
                v = self.chain_value(node)
            else:
                v = self.side_value(node)
        finally:
            self._readers.pop()
        self.memo[node] = v
        return v

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
        c, rest = sympy.sympify(e).as_coeff_Mul() if e.has(R) else (None, None)
        if rest == R:
            self.prefix_scales.add(c)
        elif isinstance(e, sympy.Mul) and R in e.args:
            coeff = e / R
            if not coeff.has(R) and not any(isinstance(a, sympy.Function) for a in coeff.atoms(sympy.Function)):
                self.prefix_scales.add(coeff)

    # ---- elementwise ---------------------------------------------------
    def elementwise(self, node: fx.Node, name: str, operands: List[Any], extra) -> Val:
        vals = [self.value(a) for a in operands]
        out_shape = C.shape_of(node)
        if out_shape is None:
            raise Decline(f"'{name}' without a tensor result")
        chain = [v for v in vals if v.chain]
        if chain:
            frame = chain[0].frame
            if any(not _same_sizes(v.frame.sizes, frame.sizes) for v in chain):
                raise Decline("scores combined across different batch layouts")
            if len(out_shape) != len(chain[0].shape):
                raise Decline("a tensor of higher rank than the scores joins the score chain")
            exprs = [v.expr if v.chain else self.join(v, frame, len(out_shape)) for v in vals]
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
            return x * y
        if name == "div":
            return x / y
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
        targets = {1: S.kv_idx, 2: S.q_idx}
        for i in range(3, rank + 1):
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
        op = C.canonical(node)
        if op is None:
            raise Decline(f"unsupported node '{node.name}' in the score chain")
        name = op.name
        if name in _CASTS:
            src = self.value(op.kw["input"])
            dt = getattr(C.example_value(node), "dtype", None)
            if dt is not None and not dt.is_floating_point:
                raise Decline(f"the scores are cast to {dt}")
            self._note_prefix(src.expr) if name != "to" else None
            return Val(src.expr, C.shape_of(node), True, src.frame)
        if name in ("view", "reshape", "unsqueeze", "squeeze", "flatten"):
            return self.chain_reshape(node, op)
        if name in ("mul", "div"):
            return self.scaling(node, op)
        operands, extra = self.operands(op)
        if operands is None:
            raise Decline(f"'{name}' between Q·Kᵀ and softmax cannot be expressed")
        for a in operands:
            v = self.value(a)
            if v.chain:
                self._note_prefix(v.expr)
        return self.elementwise(node, name, operands, extra)

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
        if new is None or len(new) < 2 or not _same_sizes(new[-2:], src.shape[-2:]):
            raise Decline("a reshape of the scores that moves the query or key axis")
        lead = tuple(new[:-2])
        total = sympy.Mul(*[_sym(s) for s in lead])
        want = sympy.Mul(*[_sym(s) for s in src.frame.op_sizes])
        if sympy.simplify(total - want) != 0:
            raise Decline("a reshape of the scores that changes the batch")
        frame = Frame(lead, src.frame.op_sizes, src.frame.flat)
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
    def side_value(self, node: fx.Node) -> Val:
        ev = C.example_value(node)
        if not isinstance(ev, torch.Tensor):
            return Val(self.const(node), ())
        op = C.canonical(node)
        from ..match import mutating_users
        try:
            # a tensor written in place is read at run time, never folded
            v = self.side_op(node, op) if op is not None and not mutating_users(node) else None
        except Decline:
            v = None
        if v is None:
            v = self.constant_tensor(node)
        return v if v is not None else self.leaf(node)

    def leaf(self, node: fx.Node) -> Val:
        shape = C.shape_of(node)
        if node.op == "call_method" and node.target == "item":
            node = node.args[0]
            shape = C.shape_of(node)
        for lf in self.leaves:
            if lf.node is node:
                break
        else:
            lf = Leaf(node, sympy.Function(f"_leaf{len(self.leaves)}"), len(shape))
            self.leaves.append(lf)
        r = len(shape)
        args = [sympy.Integer(0) if is_one(shape[i]) else AX[r - 1 - i] for i in range(r)]
        return Val(lf.func(*(args or [sympy.Integer(0)])), shape)

    def constant_tensor(self, node) -> Optional[Val]:
        """A registered buffer holding tril/triu of ones is an index predicate."""
        real = self.real_values.get(node)
        if real is None or real.requires_grad or real.dim() < 2 or real.numel() > (1 << 24):
            return None
        if node.op == "placeholder":
            src = node.meta.get("grapharg")
            if src is None or "_buffers" not in str(getattr(src, "source", "")):
                return None
        ones = torch.ones(real.shape[-2:], dtype=torch.bool)
        flat = real.reshape(-1, *real.shape[-2:]) != 0
        shape = C.shape_of(node)
        for cond, pattern in ((AX[0] <= AX[1], torch.tril(ones)), (AX[0] >= AX[1], torch.triu(ones))):
            if bool((flat == pattern).all()):
                e = cond if real.dtype == torch.bool else sympy.Piecewise((1, cond), (0, True))
                return Val(e, shape)
        return None

    def side_op(self, node, op) -> Optional[Val]:
        name, k = op.name, op.kw
        shape = C.shape_of(node)
        if name in ("ones", "zeros", "full", "ones_like", "zeros_like", "full_like",
                    "new_ones", "new_zeros", "new_full"):
            fill = {"ones": 1, "zeros": 0, "ones_like": 1, "zeros_like": 0, "new_ones": 1,
                    "new_zeros": 0}.get(name, k.get("fill_value"))
            e = self.const(fill)
            if C.example_value(node).dtype == torch.bool:
                e = as_bool(e)
            return Val(e, shape)
        if name == "arange":
            a = list(node.args)
            start, end, step = (0, a[0], 1) if len(a) == 1 else (a + [1])[:3]
            start, step = node.kwargs.get("start", start), node.kwargs.get("step", step)
            return Val(self.const(start) + self.const(step) * AX[0], shape)
        if name in ("tril", "triu"):
            x = self.value(k["input"])
            d = self.const(k.get("diagonal", 0) or 0)
            cond = (AX[0] - AX[1] <= d) if name == "tril" else (AX[0] - AX[1] >= d)
            zero = sympy.false if is_bool(x.expr) else 0
            return Val(sympy.Piecewise((x.expr, cond), (zero, True)) if zero == 0
                       else sympy.And(x.expr, cond), shape)
        if name in _CASTS:
            x = self.value(k["input"])
            dt = C.example_value(node).dtype
            e = as_bool(x.expr) if dt == torch.bool else as_num(x.expr)
            if not dt.is_floating_point and dt != torch.bool and not is_bool(x.expr):
                return None  # integer truncation of an index expression: keep as tensor
            return Val(e, shape)
        if name in ("detach",):
            x = self.value(k["input"])
            return Val(x.expr, shape) if not _has_leaf(x.expr) else None
        if name in ("expand", "expand_as"):
            x = self.value(k["input"])
            return Val(self.broadcast(x, shape), shape)
        if name in ("unsqueeze", "view", "reshape", "squeeze", "flatten"):
            return self.side_reshape(node, k)
        if name in ("transpose", "permute"):
            return self.side_permute(node, op)
        if name == "getitem":
            return self.side_getitem(node, k)
        operands, extra = self.operands(op)
        if operands is None:
            return None
        return self.elementwise(node, name, operands, extra)

    def side_reshape(self, node, k) -> Optional[Val]:
        """Reshapes that only add or drop size-1 axes keep the expression."""
        x = self.value(k["input"])
        old, new = x.shape, C.shape_of(node)
        old_keep = [i for i, s in enumerate(old) if not is_one(s)]
        new_keep = [i for i, s in enumerate(new) if not is_one(s)]
        if len(old_keep) != len(new_keep) or not all(
                _size_eq(old[i], new[j]) for i, j in zip(old_keep, new_keep)):
            return None
        sub = {AX[len(old) - 1 - i]: sympy.Integer(0) for i, s in enumerate(old) if is_one(s)}
        for i, j in zip(old_keep, new_keep):
            sub[AX[len(old) - 1 - i]] = AX[len(new) - 1 - j]
        return Val(_subs(x.expr, sub), new)

    def side_permute(self, node, op) -> Optional[Val]:
        x = self.value(op.kw["input"])
        r = len(x.shape)
        if op.name == "transpose":
            d0, d1 = (C.norm_dim(op.kw["dim0"], r), C.norm_dim(op.kw["dim1"], r))
            perm = list(range(r))
            perm[d0], perm[d1] = perm[d1], perm[d0]
        else:
            perm = [C.norm_dim(d, r) for d in op.kw["sizes"]]
        # out axis j reads in axis perm[j]
        sub = {AX[r - 1 - perm[j]]: AX[r - 1 - j] for j in range(r)}
        return Val(_subs(x.expr, sub), C.shape_of(node))

    def side_getitem(self, node, k) -> Optional[Val]:
        x = self.value(k["input"])
        idx = k["index"]
        idx = list(idx) if isinstance(idx, tuple) else [idx]
        r = len(x.shape)
        if sum(1 for i in idx if i is Ellipsis) > 1:
            return None
        if Ellipsis in idx:
            e = idx.index(Ellipsis)
            used = sum(1 for i in idx if i is not None and i is not Ellipsis)
            idx = idx[:e] + [slice(None)] * (r - used) + idx[e + 1:]
        idx += [slice(None)] * (r - sum(1 for i in idx if i is not None))
        new = C.shape_of(node)
        out_axis, in_axis, sub = 0, 0, {}
        for it in idx:
            if it is None:
                out_axis += 1
                continue
            sym = AX[r - 1 - in_axis]
            if isinstance(it, slice):
                start = 0 if it.start is None else it.start
                step = 1 if it.step is None else it.step
                if not isinstance(start, int) or not isinstance(step, int) or start < 0:
                    return None
                if (start, step) != (0, 1) and _has_leaf(x.expr):
                    return None
                sub[sym] = AX[len(new) - 1 - out_axis] * step + start
                out_axis += 1
            elif isinstance(it, int) and it >= 0:
                if _has_leaf(x.expr):
                    return None
                sub[sym] = sympy.Integer(it)
            else:
                return None
            in_axis += 1
        if _has_leaf(x.expr):
            old_sizes = [s for s in x.shape if not is_one(s)]
            new_sizes = [s for s in new if not is_one(s)]
            if len(old_sizes) != len(new_sizes) or not all(
                    _size_eq(a, b) for a, b in zip(old_sizes, new_sizes)):
                return None  # a real slice of a captured tensor: capture the slice
        return Val(_subs(x.expr, sub), new)


def _is_scalar(v: Val) -> bool:
    """A side value that is one number for the whole site (sizes allowed)."""
    e = v.expr
    return (all(is_one(s) for s in v.shape) and not is_bool(e) and not _has_leaf(e)
            and not (e.free_symbols & set(AX)))


def from_shape_env(e):
    """A shape-environment expression in plain sympy (torch's size arithmetic
    uses its own function classes: ``OpaqueUnaryFn_sqrt``, ``ToFloat``,
    ``FloorDiv``, ``IntTrueDiv``...)."""
    if not isinstance(e, sympy.Basic) or not e.args:
        return e
    args = [from_shape_env(a) for a in e.args]
    name = type(e).__name__
    if name.startswith("OpaqueUnaryFn_"):
        fn = getattr(sympy, name[len("OpaqueUnaryFn_"):], None)
        if fn is None:
            raise Decline(f"size arithmetic {name}")
        return fn(args[0])
    if name in ("ToFloat", "TruncToFloat", "Identity"):
        return args[0]
    if name in ("FloorDiv",):
        return sympy.floor(args[0] / args[1])
    if name in ("IntTrueDiv", "FloatTrueDiv"):
        return args[0] / args[1]
    if name in ("PowByNatural", "FloatPow"):
        return args[0] ** args[1]
    if name in ("Mod", "PythonMod"):
        return sympy.Mod(args[0], args[1])
    if name in ("CeilToInt",):
        return sympy.ceiling(args[0])
    if name in ("FloorToInt", "TruncToInt"):
        return sympy.floor(args[0])
    if type(e).__module__.startswith("torch"):
        raise Decline(f"size arithmetic {name}")
    return e.func(*args)


def _subs(expr, sub):
    return expr.xreplace(sub) if sub and hasattr(expr, "xreplace") else expr


def _has_leaf(expr) -> bool:
    return any(str(f.func).startswith("_leaf") for f in getattr(expr, "atoms", lambda *_: ())(sympy.Function)
               if isinstance(f, sympy.core.function.AppliedUndef))
