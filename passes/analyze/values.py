"""Values of the symbolic interpreter and the sympy helpers they need.

``Val`` is one node's value (expression, shape, chain or side); ``Frame`` maps
the leading axes of a chain value to the op's ``(b, h)``; ``compare``,
``as_bool`` and ``as_num`` move between sympy numbers and booleans the way
torch moves between float and bool tensors.  See symbolic.py for the whole.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, List, Optional, Tuple

import sympy
import torch
import torch.fx as fx

from . import spec as S

R = sympy.Symbol("R", real=True)  # the raw contraction <q, k> before any scaling
AX = tuple(sympy.Symbol(f"A{i}", integer=True, nonnegative=True) for i in range(1, 9))


class Decline(Exception):
    """The site cannot be expressed exactly; the message is the reason."""


class ReadDecline(Decline):
    """A captured tensor (``node``) is read at indices the op cannot present
    as a broadcast view: the analysis may capture a later side value whole
    ([Note: a side value captured whole])."""

    def __init__(self, message: str, node):
        super().__init__(message)
        self.node = node


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
    # the query and key axes viewed as (qh, qw) and (kh, kw) (or three factors
    # each, (qt, qh, qw)): ((qh, qw), (kh, kw)), outermost first, or None
    # ([Note: split key axes])
    split: Optional[Tuple[Tuple[int, ...], Tuple[int, ...]]] = None
    # a slice of the scores from (query, key) position ``offset`` on: its
    # position (i, j) is the op's (i + offset[0], j + offset[1])
    # ([Note: scores assigned in part] in symbolic.py)
    offset: Tuple[int, int] = (0, 0)

    def index_axes(self) -> List[Any]:
        """The op coordinates of a chain value's trailing (query, key) axes."""
        q, kv = S.q_idx - self.offset[0], S.kv_idx - self.offset[1]
        if self.split is None:
            return [q, kv]
        return factors(q, self.split[0]) + factors(kv, self.split[1])

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


def factors(x, sizes) -> List[Any]:
    """Index ``x`` of an axis viewed as ``sizes`` (outermost first), one
    expression a factor: (x // (qh*qw), (x // qw) % qh, x % qw)."""
    out = []
    for j, size in enumerate(sizes):
        stride = math.prod(sizes[j + 1:])
        at = x if stride == 1 else sympy.floor(x / stride)
        out.append(at if j == 0 else sympy.Mod(at, size))
    return out


def _same_sizes(a, b) -> bool:
    return len(a) == len(b) and all(_size_eq(x, y) for x, y in zip(a, b))


def _size_eq(x, y) -> bool:
    if isinstance(x, int) and isinstance(y, int):
        return x == y
    if isinstance(x, torch.SymInt) or isinstance(y, torch.SymInt):
        # the shape environment knows its symbols are positive integers:
        # (2 * s**2) // s == 2 * s, which sympy alone does not prove
        from torch.fx.experimental.symbolic_shapes import statically_known_true
        try:
            if statically_known_true(x == y):
                return True
        except Exception:  # noqa: BLE001 - fall back to sympy
            pass
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


def is_one(size) -> bool:
    return isinstance(size, int) and size == 1


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


_CASTS = {"to", "type", "type_as", "float", "half", "bfloat16", "double", "contiguous",
          "clone", "long", "int", "bool"}

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


def round_constants(expr, dtype: torch.dtype):
    """``expr`` after a cast to a narrow float dtype: its float constants take
    that dtype's value (``finfo(float32).min`` becomes ``-inf`` in float16),
    as the cast does to the tensor they fill."""
    if dtype not in (torch.float16, torch.bfloat16) or not hasattr(expr, "atoms"):
        return expr
    sub = {}
    for a in expr.atoms(sympy.Float):
        r = torch.tensor(float(a), dtype=torch.float32).to(dtype).item()
        sub[a] = (sympy.oo if r > 0 else -sympy.oo) if math.isinf(r) else sympy.Float(r)
    for m in expr.atoms(sympy.Mul):
        # a factor that overflows (1e9 * (mask - 1) cast to float16): the cast
        # rounds the product, which may be 0 or finite, and inf * 0 would be
        # nan; the side value is then read as a tensor (side.py), not folded
        if any(a in sub and sub[a].is_infinite for a in m.args) and not all(a.is_number for a in m.args):
            raise Decline(f"a product with {dtype} overflow in its factors ({m}) is cast to {dtype}")
    return expr.xreplace(sub) if sub else expr


def _subs(expr, sub):
    return expr.xreplace(sub) if sub and hasattr(expr, "xreplace") else expr


def _has_leaf(expr) -> bool:
    return any(str(f.func).startswith("_leaf") for f in getattr(expr, "atoms", lambda *_: ())(sympy.Function)
               if isinstance(f, sympy.core.function.AppliedUndef))
