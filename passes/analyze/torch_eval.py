"""Evaluate a score-modification expression of an AttentionSpec on torch tensors.

Entry points: ``evaluate(expr, env) -> Tensor`` and ``can_evaluate(expr)``.

``env`` maps the spec's symbols (``score, b, h, q_idx, kv_idx, Lq, Lk, D``; a
Symbol or its name) to tensors or ints, and the captured function names
(``"t0"``, ``"t1"``...) to tensors already sliced to the block and
broadcastable against ``score``.  Index tensors stay integer so comparisons
such as ``kv_idx > q_idx`` are exact; they are converted to the compute dtype
(the dtype of ``env["score"]``, float32 by default) only where floating
arithmetic needs them.

Numerics traps handled here:

* ``Piecewise`` is a chain of ``torch.where`` from the last piece to the first,
  so a ``-oo`` branch yields exactly ``-inf`` (never ``0 * inf = nan``);
  every branch is evaluated on the whole block, so a branch may produce
  nan/inf where it is not selected — that is harmless for the value.
* A Piecewise without a ``True`` fallback is undefined outside its conditions
  (sympy semantics); those positions are nan.
* Boolean tensors compare with numbers (``Ne(t0(...), 0)``) and become 0/1 in
  arithmetic.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional

import sympy
import torch
from sympy.core.function import AppliedUndef
from sympy.functions.elementary.piecewise import ExprCondPair

from .spec import DIM_NAMES, INDEX_SYMBOLS, SIZE_SYMBOLS, Grouped

_KNOWN_SYMBOLS = frozenset(["score", *DIM_NAMES, *(str(s) for s in SIZE_SYMBOLS)])

Value = Any  # torch.Tensor | bool | int | float


# ---- dtype helpers ----------------------------------------------------------

def _is_float(x: Value) -> bool:
    return isinstance(x, float) or (isinstance(x, torch.Tensor) and x.is_floating_point())


def _to_compute(x: Value, dtype: torch.dtype) -> Value:
    """Integer/bool tensors and Python bools to floating point; floats kept."""
    if isinstance(x, torch.Tensor):
        return x if x.dtype == dtype else x.to(dtype)
    if isinstance(x, bool):
        return float(x)
    return x


def _arith_operands(vals, dtype):
    """Operands for + and *: all-integer stays integer (exact index math), any
    float present moves everything to the compute dtype."""
    if any(_is_float(v) for v in vals):
        return [_to_compute(v, dtype) for v in vals]
    return [v.long() if isinstance(v, torch.Tensor) and v.dtype == torch.bool else
            (int(v) if isinstance(v, bool) else v) for v in vals]


def _tensor(x: Value, dtype: torch.dtype, device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x if x.is_floating_point() and x.dtype == dtype else x.to(dtype)
    return torch.tensor(float(x), dtype=dtype, device=device)


# ---- the evaluator ----------------------------------------------------------

class _Evaluator:
    def __init__(self, env: Dict[Any, Any]):
        self.env = env
        s = _lookup(env, "score")
        self.dtype = s.dtype if isinstance(s, torch.Tensor) and s.is_floating_point() else torch.float32
        self.device = next((v.device for v in env.values() if isinstance(v, torch.Tensor)), None)
        self.memo: Dict[sympy.Basic, Value] = {}

    def __call__(self, e: sympy.Basic) -> Value:
        if e in self.memo:
            return self.memo[e]
        out = self._eval(e)
        self.memo[e] = out
        return out

    def _eval(self, e):
        if isinstance(e, sympy.logic.boolalg.BooleanTrue):
            return True
        if isinstance(e, sympy.logic.boolalg.BooleanFalse):
            return False
        if e.is_Number or isinstance(e, sympy.NumberSymbol):
            return _number(e)
        if isinstance(e, sympy.Symbol):
            v = _lookup(self.env, e.name)
            if v is None:
                raise KeyError(f"no value for symbol {e.name!r} in the evaluation env")
            return v
        if isinstance(e, AppliedUndef):
            return self._captured(e)
        handler = _HANDLERS.get(type(e)) or _HANDLERS.get(e.func)
        if handler is None:
            raise NotImplementedError(f"torch_eval: unsupported sympy node {type(e).__name__}: {e}")
        return handler(self, e)

    def _captured(self, e):
        name = e.func.__name__
        if tuple(e.args) != INDEX_SYMBOLS:
            raise NotImplementedError(f"torch_eval: captured tensor read at shifted indices: {e}")
        v = self.env.get(name)
        if v is None:
            raise KeyError(f"no tensor for captured {name!r} in the evaluation env")
        return v


def _lookup(env, name):
    if name in env:
        return env[name]
    for k, v in env.items():
        if isinstance(k, sympy.Symbol) and k.name == name:
            return v
    return None


def _number(e) -> Value:
    if e is sympy.S.NaN:
        return math.nan
    if e is sympy.S.Infinity:
        return math.inf
    if e is sympy.S.NegativeInfinity:
        return -math.inf
    if e is sympy.S.ComplexInfinity:
        raise NotImplementedError("torch_eval: complex infinity (zoo)")
    if e.is_Integer:
        return int(e)
    return float(e)


# ---- node handlers ----------------------------------------------------------

def _add(ev, e):
    vals = _arith_operands([ev(a) for a in e.args], ev.dtype)
    out = vals[0]
    for v in vals[1:]:
        out = out + v
    return out


def _mul(ev, e):
    vals = _arith_operands([ev(a) for a in e.args], ev.dtype)
    out = vals[0]
    for v in vals[1:]:
        out = out * v
    return out


def _pow(ev, e):
    base, expo = e.args
    x = ev(base)
    if expo == sympy.S.Half:
        return torch.sqrt(_tensor(x, ev.dtype, ev.device))
    if expo == -sympy.S.Half:
        return torch.rsqrt(_tensor(x, ev.dtype, ev.device))
    if expo == -1:
        return torch.reciprocal(_tensor(x, ev.dtype, ev.device))
    p = ev(expo)
    if isinstance(p, int) and p >= 0 and not _is_float(x):
        return x ** p                          # integer power of an integer stays exact
    x = _to_compute(x, ev.dtype)
    if not isinstance(x, torch.Tensor) and not isinstance(p, torch.Tensor):
        return float(x) ** p
    return torch.pow(_tensor(x, ev.dtype, ev.device), _to_compute(p, ev.dtype))


def _unary(fn: Callable) -> Callable:
    def handler(ev, e):
        (a,) = e.args
        return fn(_tensor(ev(a), ev.dtype, ev.device))
    return handler


def _floor(ev, e):
    x = ev(e.args[0])
    return x if not _is_float(x) else torch.floor(_tensor(x, ev.dtype, ev.device))


def _ceiling(ev, e):
    x = ev(e.args[0])
    return x if not _is_float(x) else torch.ceil(_tensor(x, ev.dtype, ev.device))


def _mod(ev, e):
    # sympy Mod takes the sign of the divisor, as torch.remainder does.
    a, m = _arith_operands([ev(x) for x in e.args], ev.dtype)
    if not isinstance(a, torch.Tensor) and not isinstance(m, torch.Tensor):
        return a % m
    return torch.remainder(a if isinstance(a, torch.Tensor) else torch.tensor(a, device=ev.device), m)


def _minmax(fn):
    def handler(ev, e):
        vals = _arith_operands([ev(a) for a in e.args], ev.dtype)
        dtype = ev.dtype if any(_is_float(v) for v in vals) else torch.int64
        out = None
        for v in vals:
            t = v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=dtype, device=ev.device)
            out = t if out is None else fn(out, t)
        return out
    return handler


def _heaviside(ev, e):
    # sympy.Heaviside(x, H0): 0 for x < 0, 1 for x > 0, H0 at 0 (1/2 by default).
    x = _tensor(ev(e.args[0]), ev.dtype, ev.device)
    h0 = float(e.args[1]) if len(e.args) > 1 else 0.5
    return torch.heaviside(x, torch.tensor(h0, dtype=ev.dtype, device=ev.device))


def _sign(ev, e):
    x = ev(e.args[0])
    return torch.sign(x) if isinstance(x, torch.Tensor) else float(math.copysign(1, x) if x else 0)


def _relational(fn):
    def handler(ev, e):
        a, c = ev(e.lhs), ev(e.rhs)
        if not isinstance(a, torch.Tensor) and not isinstance(c, torch.Tensor):
            return bool(fn(torch.tensor(a), torch.tensor(c)))
        if not isinstance(a, torch.Tensor):
            a, c = torch.tensor(a, device=c.device), c
        return fn(a, c)
    return handler


def _logical(fn, py: Callable, unit: bool):
    def handler(ev, e):
        out = unit
        for a in e.args:
            v = ev(a)
            if isinstance(out, bool) and isinstance(v, bool):
                out = py(out, v)
            else:
                out = fn(torch.as_tensor(out, device=ev.device), torch.as_tensor(v, device=ev.device))
        return out
    return handler


def _not(ev, e):
    v = ev(e.args[0])
    return (not v) if isinstance(v, bool) else torch.logical_not(v)


def _piecewise(ev, e):
    """The first piece whose condition holds wins: fold from the last piece."""
    pieces = [(ev(val), ev(cond)) for val, cond in e.args]
    values = [v for v, _ in pieces]
    floaty = any(_is_float(v) for v in values)
    dtype = ev.dtype if floaty else torch.int64
    out: Value = math.nan if floaty else 0
    if not floaty and not any(c is True for _, c in pieces):
        out, dtype = math.nan, ev.dtype     # undefined positions: nan
    for val, cond in reversed(pieces):
        if cond is True:
            out = val
        elif cond is False:
            continue
        else:
            out = torch.where(cond, _cast(val, dtype, ev.device), _cast(out, dtype, ev.device))
    return out


def _cast(x, dtype, device):
    if isinstance(x, torch.Tensor):
        return x if x.dtype == dtype else x.to(dtype)
    return torch.tensor(x, dtype=dtype, device=device)


_HANDLERS: Dict[Any, Callable] = {
    sympy.Add: _add,
    Grouped: lambda ev, e: ev(e.args[0]),
    sympy.Mul: _mul,
    sympy.Pow: _pow,
    sympy.exp: _unary(torch.exp),
    sympy.log: _unary(torch.log),
    sympy.tanh: _unary(torch.tanh),
    sympy.sin: _unary(torch.sin),
    sympy.cos: _unary(torch.cos),
    sympy.Abs: lambda ev, e: torch.abs(torch.as_tensor(ev(e.args[0]), device=ev.device)),
    sympy.sign: _sign,
    sympy.floor: _floor,
    sympy.ceiling: _ceiling,
    sympy.Mod: _mod,
    sympy.Max: _minmax(torch.maximum),
    sympy.Min: _minmax(torch.minimum),
    sympy.Heaviside: _heaviside,
    sympy.Piecewise: _piecewise,
    sympy.Eq: _relational(torch.eq),
    sympy.Ne: _relational(torch.ne),
    sympy.Lt: _relational(torch.lt),
    sympy.Le: _relational(torch.le),
    sympy.Gt: _relational(torch.gt),
    sympy.Ge: _relational(torch.ge),
    sympy.And: _logical(torch.logical_and, lambda x, y: x and y, True),
    sympy.Or: _logical(torch.logical_or, lambda x, y: x or y, False),
    sympy.Not: _not,
}


# ---- public API -------------------------------------------------------------

def evaluate(expr: sympy.Basic, env: Dict[Any, Any]) -> torch.Tensor:
    """Value of ``expr`` on the tensors of ``env`` (see module doc).

    Numeric results are in the compute dtype; boolean results stay bool.
    """
    ev = _Evaluator(env)
    out = ev(sympy.sympify(expr))
    if isinstance(out, torch.Tensor):
        if out.dtype == torch.bool or out.dtype == ev.dtype:
            return out
        return out.to(ev.dtype)
    if isinstance(out, bool):
        return torch.tensor(out, device=ev.device)
    return torch.tensor(float(out), dtype=ev.dtype, device=ev.device)


def can_evaluate(expr: sympy.Basic) -> Optional[str]:
    """None if ``evaluate`` supports every node of ``expr``, else the reason."""
    for e in sympy.preorder_traversal(sympy.sympify(expr)):
        if isinstance(e, (sympy.logic.boolalg.BooleanTrue, sympy.logic.boolalg.BooleanFalse)):
            continue
        if e.is_Number or isinstance(e, sympy.NumberSymbol):
            if e is sympy.S.ComplexInfinity or (e.is_Number and not e.is_extended_real and e is not sympy.S.NaN):
                return f"non-real constant {e}"
            continue
        if isinstance(e, sympy.Symbol):
            if e.name not in _KNOWN_SYMBOLS:
                return f"unknown symbol {e.name}"
            continue
        if isinstance(e, AppliedUndef):
            name = e.func.__name__
            if not (name.startswith("t") and name[1:].isdigit()):
                return f"unknown function {name}"
            if tuple(e.args) != INDEX_SYMBOLS:
                return f"captured tensor read at shifted indices: {e}"
            continue
        if isinstance(e, ExprCondPair):
            continue
        if type(e) not in _HANDLERS and e.func not in _HANDLERS:
            return f"unsupported operation {type(e).__name__} in {e}"
    return None
