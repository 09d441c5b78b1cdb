"""sympy -> Triton: print one expression of an AttentionSpec as a ``tl.`` expression.

Entry point: ``TritonPrinter()(expr) -> str``; ``Unsupported`` for what it
cannot print.  Names in the printed text (shared with the templates): ``score``
(the scaled score tile), ``off_b``/``off_h`` (batch and query head), ``q_idx``/
``kv_idx`` (index tiles), ``Lq``/``Lk`` (lengths), ``HEAD_D`` (head dim) and
``tI`` (the loaded tile of captured tensor I).
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import sympy
from sympy.core.function import AppliedUndef

from attn_compiler.passes.analyze import spec as spec_mod


class Unsupported(Exception):
    """The spec holds an expression the Triton printer cannot express."""


_SYMBOL_NAMES = {"score": "score", "b": "off_b", "h": "off_h", "q_idx": "q_idx", "kv_idx": "kv_idx",
                 "Lq": "Lq", "Lk": "Lk", "D": "HEAD_D"}


def _num(e) -> str:
    if e is sympy.S.NegativeInfinity:
        return 'float("-inf")'
    if e is sympy.S.Infinity:
        return 'float("inf")'
    if e is sympy.S.NaN:
        return 'float("nan")'
    if e.is_Integer:
        return str(int(e))
    if e.is_number and e.is_extended_real:
        return repr(float(e))
    raise Unsupported(f"non-real constant {e}")


class TritonPrinter:
    """Prints a sympy expression of the spec as one Triton expression.

    Integers stay integers (index arithmetic is exact); a float anywhere makes
    Triton promote to float32.  Piecewise becomes nested ``tl.where`` from the
    last piece, like ``torch_eval`` (so a ``-oo`` branch is exactly -inf).
    """

    def __init__(self, names: Optional[Dict[str, str]] = None, precise_tanh: bool = False,
                 fast_tanh: bool = False):
        self.names = dict(_SYMBOL_NAMES, **(names or {}))
        # float32 specs: tanh through the common template's _tanh_f32 (a few
        # ulps); specs of bfloat16 scores (fast_tanh): _tanh_bf16, the
        # hardware's approximate tanh (2^-11 relative, under their rounding);
        # others keep 2·sigmoid(2x) - 1, whose ~6e-8 absolute error is far below
        # their rounding
        self.precise_tanh = precise_tanh
        self.fast_tanh = fast_tanh and not precise_tanh

    def __call__(self, e) -> str:
        return self.p(sympy.sympify(e))

    def p(self, e) -> str:  # noqa: C901 - one branch per node type
        if isinstance(e, sympy.logic.boolalg.BooleanTrue):
            return "1"
        if isinstance(e, sympy.logic.boolalg.BooleanFalse):
            return "0"
        if e.is_number:
            # a constant expression (sqrt(6), log(2), 2**(1/3)): its value, in
            # float64 here, rounded once by Triton (a Python int has no .to())
            return _num(e)
        if isinstance(e, sympy.Symbol):
            if e.name not in self.names:
                raise Unsupported(f"unknown symbol {e.name}")
            return self.names[e.name]
        if isinstance(e, AppliedUndef):
            name = e.func.__name__
            if tuple(e.args) != spec_mod.INDEX_SYMBOLS:
                raise Unsupported(f"captured tensor read at shifted indices: {e}")
            return name
        if isinstance(e, spec_mod.Grouped):
            return "(" + self.p(e.args[0]) + ")"
        if isinstance(e, sympy.Add):
            return "(" + " + ".join(self.p(a) for a in e.args) + ")"
        if isinstance(e, sympy.Mul):
            num, den = [], []
            for a in e.args:
                if isinstance(a, sympy.Pow) and a.exp == -1 and not a.base.is_number:
                    den.append(self.p(a.base))
                else:
                    num.append(self.p(a))
            text = " * ".join(num) if num else "1.0"
            for d in den:
                text = f"({text}) / {d}"
            return f"({text})"
        if isinstance(e, sympy.Pow):
            return self._pow(e)
        if e.func is sympy.tanh and self.precise_tanh:
            return f"_tanh_f32({self.p(e.args[0])})"
        if e.func is sympy.tanh and self.fast_tanh:
            return f"_tanh_bf16({self.p(e.args[0])})"
        fn = _UNARY.get(e.func)
        if fn is not None:
            return fn.format(self.p(e.args[0]))
        if isinstance(e, (sympy.Max, sympy.Min)):
            f = "tl.maximum" if isinstance(e, sympy.Max) else "tl.minimum"
            out = self.p(e.args[0])
            for a in e.args[1:]:
                out = f"{f}({out}, {self.p(a)})"
            return out
        if isinstance(e, sympy.Mod):
            a, m = (self.p(x) for x in e.args)
            if all(x.is_integer for x in e.args):
                return f"((({a}) % ({m}) + ({m})) % ({m}))"   # sympy: sign of the divisor
            return f"(({a}) - ({m}) * tl.floor(({a}) / ({m})))"
        if isinstance(e, (sympy.floor, sympy.ceiling)):
            if e.args[0].is_integer:
                return self.p(e.args[0])
            f = "tl.floor" if isinstance(e, sympy.floor) else "tl.ceil"
            return f"{f}(({self.p(e.args[0])}).to(tl.float32))"
        if isinstance(e, sympy.Heaviside):
            x = self.p(e.args[0])
            h0 = float(e.args[1]) if len(e.args) > 1 else 0.5
            return f"tl.where({x} > 0, 1.0, tl.where({x} < 0, 0.0, {h0!r}))"
        if isinstance(e, sympy.sign):
            x = self.p(e.args[0])
            return f"tl.where({x} > 0, 1.0, tl.where({x} < 0, -1.0, 0.0))"
        if isinstance(e, sympy.core.relational.Relational):
            op = _RELATIONS.get(type(e))
            if op is None:
                raise Unsupported(f"relation {type(e).__name__}")
            return f"({self.p(e.lhs)} {op} {self.p(e.rhs)})"
        if isinstance(e, (sympy.And, sympy.Or)):
            op = " & " if isinstance(e, sympy.And) else " | "
            return "(" + op.join(f"({self.p(a)} != 0)" for a in e.args) + ")"
        if isinstance(e, sympy.Not):
            return f"({self.p(e.args[0])} == 0)"
        if isinstance(e, sympy.Piecewise):
            out = 'float("nan")'
            for val, cond in reversed(e.args):
                if cond is sympy.true:
                    out = self.p(val)
                elif cond is not sympy.false:
                    out = f"tl.where({self.p(cond)} != 0, {self.p(val)}, {out})"
            return out
        raise Unsupported(f"unsupported operation {type(e).__name__} in {e}")

    def _pow(self, e) -> str:
        base, ex = e.args
        x = self.p(base)
        if ex == sympy.S.Half:
            return f"tl.sqrt(({x}).to(tl.float32))"
        if ex == -sympy.S.Half:
            return f"tl.math.rsqrt(({x}).to(tl.float32))"
        if ex.is_Integer and int(ex) == -1:
            return f"(1.0 / ({x}))"
        if ex.is_Integer and 0 < int(ex) <= 8:
            return "(" + " * ".join([f"({x})"] * int(ex)) + ")"
        if ex.is_Integer and -8 <= int(ex) < 0:
            return "(1.0 / (" + " * ".join([f"({x})"] * -int(ex)) + "))"
        if base.is_number:
            # a constant base (ALiBi's 2 ** (-8 h / H)): exp2 of y * log2(base),
            # the log a Python float
            b = float(base)
            if b == 2.0:
                return f"tl.math.exp2(({self.p(ex)}).to(tl.float32))"
            if b <= 0.0:
                raise Unsupported(f"power of a non-positive constant base: {e}")
            return f"tl.math.exp2(({self.p(ex)}) * {math.log2(b)!r})"
        # x ** y = exp2(y * log2 x) for x > 0 (what a float pow of a positive base is)
        return f"tl.math.exp2(({self.p(ex)}) * tl.math.log2(({x}).to(tl.float32)))"


_UNARY = {
    sympy.exp: "tl.exp({})",
    sympy.log: "tl.log({})",
    # tanh(x) = 2 sigmoid(2x) - 1: core Triton ops only (also in the interpreter)
    sympy.tanh: "(2.0 * tl.sigmoid(2.0 * ({})) - 1.0)",
    sympy.sin: "tl.sin({})",
    sympy.cos: "tl.cos({})",
    sympy.Abs: "tl.abs({})",
}
_RELATIONS = {sympy.Eq: "==", sympy.Ne: "!=", sympy.Lt: "<", sympy.Le: "<=", sympy.Gt: ">", sympy.Ge: ">="}
