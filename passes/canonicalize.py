"""Canonicalize: one spelling per concept, as a read-only view of the graph.

Entry point: ``canonical(node) -> COp | None``.

Dynamo hands us torch-level FX graphs in which the same operation has many
spellings: ``a @ b``, ``torch.matmul``, ``Tensor.matmul``, ``torch.bmm``,
``einsum``; ``F.softmax``, ``torch.softmax``, ``x.softmax``; ``x.float()``,
``x.to(torch.float32)``, ``x.type(...)``; ``operator.truediv`` and
``torch.div``.  The matcher and the analyzer never look at targets directly:
they ask for the canonical operation of a node, a name plus normalised
arguments (``COp``).  Contractions (every matmul form, einsum, baddbmm) are
further described by index labels (``Contraction``), so that "which axis is
contracted, which is the query, which is the key" is one question however the
user wrote it.  The graph itself is not changed here; the rewrite is the only
pass that edits it.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.fx as fx

# operator.* and torch.* targets → canonical names
_OPERATOR_NAMES = {
    operator.add: "add", operator.sub: "sub", operator.mul: "mul", operator.truediv: "div",
    operator.neg: "neg", operator.matmul: "matmul", operator.getitem: "getitem",
    operator.eq: "eq", operator.ne: "ne", operator.lt: "lt", operator.le: "le",
    operator.gt: "gt", operator.ge: "ge", operator.and_: "and", operator.or_: "or",
    operator.invert: "not", operator.pow: "pow", operator.iadd: "add", operator.imul: "mul",
    operator.itruediv: "div", operator.isub: "sub", operator.floordiv: "floordiv",
}
_ALIASES = {
    "divide": "div", "true_divide": "div", "multiply": "mul", "subtract": "sub",
    "bitwise_not": "not", "logical_not": "not", "bitwise_and": "and", "logical_and": "and",
    "bitwise_or": "or", "logical_or": "or", "__and__": "and", "__or__": "or",
    "__invert__": "not", "greater": "gt", "greater_equal": "ge", "less": "lt",
    "less_equal": "le", "not_equal": "ne", "clip": "clamp", "negative": "neg",
    "masked_fill_": "masked_fill", "add_": "add", "mul_": "mul", "div_": "div", "sub_": "sub",
    "_safe_softmax": "softmax", "special_softmax": "softmax", "special_log_softmax": "log_softmax",
    "max": "max", "amax": "amax", "rsub": "rsub",
}
# Tensor dunder methods (dynamo may record ``a == b`` as ``a.__eq__(b)``)
_DUNDER = {"eq": "eq", "ne": "ne", "lt": "lt", "le": "le", "gt": "gt", "ge": "ge",
           "add": "add", "sub": "sub", "mul": "mul", "truediv": "div", "div": "div",
           "matmul": "matmul", "neg": "neg", "and": "and", "or": "or", "invert": "not",
           "getitem": "getitem", "pow": "pow", "floordiv": "floordiv", "abs": "abs"}
_REFLECTED = {"radd", "rsub", "rmul", "rtruediv", "rdiv", "rpow", "rmatmul", "rand", "ror"}
_INPLACE_DUNDER = {"iadd", "isub", "imul", "itruediv", "idiv", "iand", "ior", "ipow"}
# positional parameter names of the ops we reason about (first = the tensor)
_SIGNATURES: Dict[str, Tuple[str, ...]] = {
    "add": ("input", "other", "alpha"), "sub": ("input", "other", "alpha"),
    "rsub": ("input", "other", "alpha"),
    "mul": ("input", "other"), "div": ("input", "other", "rounding_mode"),
    "pow": ("input", "exponent"), "neg": ("input",),
    "eq": ("input", "other"), "ne": ("input", "other"), "lt": ("input", "other"),
    "le": ("input", "other"), "gt": ("input", "other"), "ge": ("input", "other"),
    "and": ("input", "other"), "or": ("input", "other"), "not": ("input",),
    "minimum": ("input", "other"), "maximum": ("input", "other"),
    "tanh": ("input",), "exp": ("input",), "log": ("input",), "sigmoid": ("input",),
    "abs": ("input",), "sqrt": ("input",), "rsqrt": ("input",), "relu": ("input",),
    "clamp": ("input", "min", "max"), "where": ("condition", "input", "other"),
    "masked_fill": ("input", "mask", "value"),
    "softmax": ("input", "dim", "_stacklevel", "dtype"),
    "log_softmax": ("input", "dim", "_stacklevel", "dtype"),
    "logsumexp": ("input", "dim", "keepdim"),
    "nan_to_num": ("input", "nan", "posinf", "neginf"),
    "dropout": ("input", "p", "training", "inplace"),
    "matmul": ("input", "other"), "bmm": ("input", "mat2"),
    "baddbmm": ("input", "batch1", "batch2", "beta", "alpha"),
    "transpose": ("input", "dim0", "dim1"), "permute": ("input", "dims"),
    "unsqueeze": ("input", "dim"), "squeeze": ("input", "dim"),
    "tril": ("input", "diagonal"), "triu": ("input", "diagonal"),
    "amax": ("input", "dim", "keepdim"), "max": ("input", "dim", "keepdim"),
    "sum": ("input", "dim", "keepdim", "dtype"),
    "arange": ("start", "end", "step"),
    "to": ("input", "dtype"), "type": ("input", "dtype"), "type_as": ("input", "other"),
    "expand_as": ("input", "other"), "view_as": ("input", "other"), "reshape_as": ("input", "other"),
    "contiguous": ("input",), "clone": ("input",), "detach": ("input",),
    "float": ("input",), "half": ("input",), "bfloat16": ("input",), "double": ("input",),
    "bool": ("input",), "long": ("input",), "int": ("input",),
    "getitem": ("input", "index"), "item": ("input",),
    "ones_like": ("input",), "zeros_like": ("input",), "full_like": ("input", "fill_value"),
    "flatten": ("input", "start_dim", "end_dim"),
    "repeat_interleave": ("input", "repeats", "dim"), "reciprocal": ("input",), "exp2": ("input",),
    "pad": ("input", "pad", "mode", "value"), "constant_pad_nd": ("input", "pad", "value"),
}
# ops whose tensor arguments after the first are varargs (sizes)
_VARARG_SIZE_OPS = {"view", "reshape", "expand", "permute", "ones", "zeros", "full",
                    "empty", "new_ones", "new_zeros", "new_full", "repeat"}


@dataclasses.dataclass(frozen=True)
class COp:
    """A node's operation in canonical form: ``name`` plus normalised arguments.

    ``args`` keeps the positional tensor/size arguments after normalisation;
    ``kw`` holds every named parameter the op has (see ``_SIGNATURES``).
    """

    name: str
    node: fx.Node
    args: Tuple[Any, ...]
    kw: Dict[str, Any]

    def get(self, key, default=None):
        return self.kw.get(key, default)


def _target_name(node: fx.Node) -> Optional[str]:
    if node.op == "call_method":
        name = node.target
    elif node.op == "call_function":
        t = node.target
        if t in _OPERATOR_NAMES:
            return _OPERATOR_NAMES[t]
        if t is getattr:
            return "getattr"
        name = getattr(t, "__name__", None)
        if name is None:
            return None
    else:
        return None
    if name.startswith("__") and name.endswith("__"):
        name = _DUNDER.get(name[2:-2].lstrip("i") if name[2:-2] in _INPLACE_DUNDER
                           else name[2:-2].lstrip("r") if name[2:-2] in _REFLECTED
                           else name[2:-2], name)
    if name.endswith("_") and not name.startswith("_") and name[:-1] in _SIGNATURES:
        name = name[:-1]  # in-place spelling: the pass tracks who sees the new value
    return _ALIASES.get(name, name)


def canonical(node: Any) -> Optional[COp]:
    """The canonical operation of ``node`` (None for placeholders, outputs, ...)."""
    if not isinstance(node, fx.Node):
        return None
    cached = node.meta.get("_ac_canon", False)
    if cached is not False:
        return cached
    op = _canonical(node)
    node.meta["_ac_canon"] = op
    return op


def _canonical(node: fx.Node) -> Optional[COp]:
    name = _target_name(node)
    if name is None:
        return None
    args, kwargs = list(node.args), dict(node.kwargs)
    if node.op == "call_method" and node.target[2:-2] in _REFLECTED and len(args) == 2:
        if name == "sub":
            name = "rsub"  # x.__rsub__(y) is y - x
        elif name in ("div", "pow", "matmul"):
            return None    # y / x, y ** x, y @ x with the tensor second: not needed here
        else:
            args.reverse()  # commutative: x.__radd__(y) is y + x
    if name == "getattr":  # x.mT, x.T, x.dtype ...
        attr = args[1]
        if attr in ("mT", "mH"):
            return COp("transpose", node, (args[0],), {"input": args[0], "dim0": -2, "dim1": -1})
        if attr == "T" and _rank(args[0]) == 2:
            return COp("transpose", node, (args[0],), {"input": args[0], "dim0": 0, "dim1": 1})
        return COp("getattr", node, tuple(args), {"input": args[0], "attr": attr})
    if name in _VARARG_SIZE_OPS:
        first = () if name in ("ones", "zeros", "full", "empty") else (args.pop(0),)
        if name in ("full", "new_full"):
            fill = kwargs.pop("fill_value", args.pop() if len(args) == 2 else None)
            kwargs["fill_value"] = fill
        sizes = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
        sizes = kwargs.pop("size", kwargs.pop("dims", sizes))
        kw = dict(kwargs)
        if first:
            kw["input"] = first[0]
        kw["sizes"] = tuple(sizes)
        return COp(name, node, tuple(first), kw)
    sig = _SIGNATURES.get(name)
    kw = dict(kwargs)
    if "self" in kw:
        kw["input"] = kw.pop("self")
    if sig is not None:
        for pname, a in zip(sig, args):
            kw.setdefault(pname, a)
    else:
        kw["input"] = args[0] if args else kw.get("input")
    if name in ("max", "min"):
        # torch.max(a, b) / a.min(b): the elementwise form (b a tensor, not a dim)
        other = kw.get("other", args[1] if len(args) > 1 else None)
        if isinstance(other, fx.Node) and isinstance(example_value(other), torch.Tensor):
            name = "maximum" if name == "max" else "minimum"
            kw = {"input": kw.get("input", args[0] if args else None), "other": other}
            return COp(name, node, (kw["input"], other), kw)
    if name == "dropout" and "train" in kw:  # torch.dropout(input, p, train)
        kw["training"] = kw.pop("train")
    if name == "div" and kw.get("rounding_mode") is not None:
        name = "div_" + str(kw["rounding_mode"])
    if name == "to":
        d = kw.get("dtype")
        if not isinstance(d, torch.dtype):  # x.to(device) / x.to(other)
            d = kw.get("dtype", None)
            kw["dtype"] = d if isinstance(d, torch.dtype) else _dtype_of(node)
    return COp(name, node, tuple(args), kw)


# ---- contractions ---------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Contraction:
    """``out[out_labels] = alpha * sum_c lhs[lhs_labels] * rhs[rhs_labels]
    (+ beta * addend)``, labels as strings of single characters, aligned with
    each operand's dims.  Exactly one label is contracted."""

    node: fx.Node
    lhs: fx.Node
    lhs_labels: str
    rhs: fx.Node
    rhs_labels: str
    out_labels: str
    alpha: Any = 1
    addend: Optional[fx.Node] = None
    beta: Any = 0

    def operand(self, i):
        return (self.lhs, self.lhs_labels) if i == 0 else (self.rhs, self.rhs_labels)

    @property
    def contracted(self) -> str:
        return (set(self.lhs_labels) & set(self.rhs_labels) - set(self.out_labels)).pop()


_BATCH = "abcdefgh"


def _matmul_labels(ra: int, rb: int):
    if ra < 2 or rb < 2:
        return None
    nb = max(ra, rb) - 2
    batch = _BATCH[:nb]
    return batch[nb - (ra - 2):] + "ij", batch[nb - (rb - 2):] + "jk", batch + "ik"


def contraction(node: Any) -> Optional[Contraction]:
    """Describe ``node`` as a two-operand contraction, or None."""
    op = canonical(node)
    if op is None:
        return None
    if op.name in ("matmul", "bmm"):
        a, b = op.kw.get("input"), op.kw.get("other", op.kw.get("mat2"))
        labels = _matmul_labels(_rank(a), _rank(b))
        if labels is None or not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
            return None
        return Contraction(node, a, labels[0], b, labels[1], labels[2])
    if op.name == "baddbmm":
        a, b = op.kw.get("batch1"), op.kw.get("batch2")
        labels = _matmul_labels(_rank(a), _rank(b))
        if labels is None:
            return None
        beta, alpha = op.kw.get("beta", 1), op.kw.get("alpha", 1)
        return Contraction(node, a, labels[0], b, labels[1], labels[2], alpha=alpha,
                           addend=op.kw.get("input"), beta=beta)
    if op.name == "einsum":
        return _einsum(node)
    return None


def _einsum(node: fx.Node) -> Optional[Contraction]:
    args = list(node.args)
    if not args or not isinstance(args[0], str):
        return None
    eq = args[0].replace(" ", "")
    operands = args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if "->" not in eq or len(operands) != 2:
        return None
    ins, out = eq.split("->")
    parts = ins.split(",")
    if len(parts) != 2:
        return None
    if "..." in eq:
        expanded = _expand_ellipsis(parts, out, [_rank(o) for o in operands])
        if expanded is None:
            return None
        parts, out = expanded
    if "." in "".join(parts) + out:
        return None
    a, b = parts
    if any(len(set(s)) != len(s) for s in (a, b, out)):
        return None  # repeated label: a diagonal, not a contraction
    contracted = (set(a) & set(b)) - set(out)
    only_in = (set(a) ^ set(b)) - set(out)
    if len(contracted) != 1 or only_in or not set(out) <= set(a) | set(b):
        return None
    if _rank(operands[0]) != len(a) or _rank(operands[1]) != len(b):
        return None
    return Contraction(node, operands[0], a, operands[1], b, out)


def _expand_ellipsis(parts, out, ranks):
    """Name the axes ``...`` stands for (right-aligned across operands, as
    einsum broadcasts them) with letters the equation does not use."""
    free = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in "".join(parts) + out]
    counts = []
    for p, r in zip(parts, ranks):
        n = r - (len(p) - 3) if "..." in p else 0
        if n < 0 or r < 0:
            return None
        counts.append(n)
    m = max(counts)
    if m > len(free):
        return None
    letters = "".join(free[:m])
    new_parts = [p.replace("...", letters[m - n:]) for p, n in zip(parts, counts)]
    return new_parts, out.replace("...", letters)


# ---- small helpers ---------------------------------------------------------

def example_value(node: Any):
    """The fake tensor (or value) dynamo recorded for ``node``."""
    if isinstance(node, fx.Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return node


def _rank(node: Any) -> int:
    v = example_value(node)
    return v.dim() if isinstance(v, torch.Tensor) else -1


def _dtype_of(node: fx.Node):
    v = example_value(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


def shape_of(node: Any) -> Optional[Tuple]:
    v = example_value(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def is_tensor(node: Any) -> bool:
    return isinstance(example_value(node), torch.Tensor)


def user_within(node: fx.Node, depth: int, found, limit: Optional[int] = None) -> Optional[fx.Node]:
    """The first node, breadth first over the users of ``node`` up to
    ``depth`` ops away, for which ``found`` is true; None when there is none
    (or more than ``limit`` nodes were seen)."""
    frontier, seen = [node], {node}
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u in seen:
                    continue
                seen.add(u)
                if found(u):
                    return u
                nxt.append(u)
        if limit is not None and len(seen) > limit:
            return None
        frontier = nxt
    return None


def permutation(op: COp, rank: int) -> Optional[list]:
    """The axis order of a ``transpose``/``permute`` (out axis j reads input
    axis ``perm[j]``), or None when its dims are not plain ints."""
    if op.name == "transpose":
        d0, d1 = op.kw.get("dim0"), op.kw.get("dim1")
        if not isinstance(d0, int) or not isinstance(d1, int):
            return None
        perm = list(range(rank))
        a, b = norm_dim(d0, rank), norm_dim(d1, rank)
        perm[a], perm[b] = perm[b], perm[a]
        return perm
    if op.name != "permute":
        return None
    dims = op.kw.get("sizes")
    if not isinstance(dims, (list, tuple)) or len(dims) != rank or not all(isinstance(d, int) for d in dims):
        return None
    perm = [norm_dim(d, rank) for d in dims]
    return perm if sorted(perm) == list(range(rank)) else None


def norm_dim(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


# constructors of a tensor filled with one value (the *_like and new_* ones
# read only their input's shape, dtype and device)
FILLS = {"ones": 1, "zeros": 0, "ones_like": 1, "zeros_like": 0, "new_ones": 1, "new_zeros": 0,
         "full": None, "full_like": None, "new_full": None}


def fill_value(op: COp):
    """The value a ``FILLS`` constructor fills its tensor with."""
    fill = FILLS[op.name]
    return op.kw.get("fill_value") if fill is None else fill


def softmax_parts(node: fx.Node):
    """If ``node`` is a softmax over some dim, ``(input, dim, dtype)``.

    Recognises every spelling of softmax, ``log_softmax(x, dim).exp()``,
    ``exp(x - logsumexp(x, dim, keepdim=True))`` and the decomposed form
    ``exp(x - max(x)) / sum(exp(x - max(x)))`` (also without the max; the sum
    kept by ``keepdim``, ``unsqueeze`` or ``[..., None]``; a division or a
    product with the sum's reciprocal).
    """
    op = canonical(node)
    if op is None:
        return None
    if op.name == "softmax":
        dim = op.kw.get("dim")
        if dim is None:
            return None
        return op.kw["input"], dim, op.kw.get("dtype")
    if op.name in ("div", "mul"):              # e / Σe, e * (1 / Σe), e * Σe.reciprocal()
        parts = quotient(node)
        return None if parts is None else _decomposed_softmax(*parts)
    if op.name == "exp":                       # log_softmax(x, dim).exp()
        inner = canonical(op.kw.get("input"))
        if inner is not None and inner.name == "log_softmax" and inner.kw.get("dim") is not None:
            return inner.kw["input"], inner.kw["dim"], inner.kw.get("dtype")
        if inner is not None and inner.name == "sub" and inner.kw.get("alpha", 1) == 1:
            # exp(x - logsumexp(x, dim, keepdim=True))
            lse = canonical(inner.kw.get("other"))
            dim = _reduced_dim(lse, ("logsumexp",))
            if dim is not None and lse.kw.get("input") is inner.kw.get("input") \
                    and isinstance(inner.kw.get("input"), fx.Node):
                return inner.kw["input"], dim, None
    return None


def _reduced_dim(op: COp, name: Sequence[str]):
    if op is None or op.name not in name:
        return None
    dim = op.kw.get("dim")
    if isinstance(dim, (list, tuple)):
        dim = dim[0] if len(dim) == 1 else None
    return dim if op.kw.get("keepdim") else None


def quotient(node: Any):
    """``(num, den)`` when ``node`` is ``num / den`` (true division) or a
    product of ``num`` with ``den``'s reciprocal (``1 / den``,
    ``den.reciprocal()``, ``den ** -1``), else None."""
    op = canonical(node)
    if op is None:
        return None
    a, b = op.kw.get("input"), op.kw.get("other")
    if op.name == "div" and op.kw.get("rounding_mode") is None:
        return a, b
    if op.name == "mul":
        for num, r in ((a, b), (b, a)):
            den = _reciprocal_of(r)
            if den is not None:
                return num, den
    return None


def _reciprocal_of(r: Any):
    """``d`` when ``r`` is ``1 / d``, ``d.reciprocal()`` or ``d ** -1``, else None."""
    op = canonical(r)
    if op is None:
        return None
    if op.name == "reciprocal":
        return op.kw.get("input")
    if op.name == "div" and isinstance(op.kw.get("input"), (int, float)) and op.kw["input"] == 1 \
            and op.kw.get("rounding_mode") is None:
        return op.kw.get("other")
    if op.name == "pow" and isinstance(op.kw.get("exponent"), (int, float)) and op.kw["exponent"] == -1:
        return op.kw.get("input")
    return None


def row_sum_of(den: Any, num: Any) -> Optional[int]:
    """The dim (normalised) when ``den`` is ``num``'s row sum kept as an axis
    of size 1 (see _row_sum), the sum taken of ``num`` itself or of another
    node of the same op on the same input (``exp(s) / exp(s).sum(-1, True)``),
    else None."""
    found = _row_sum(den, _rank(num))
    if found is None:
        return None
    summed, dim = found
    if summed is not num:
        a, b = canonical(summed), canonical(num)
        if a is None or b is None or a.name != b.name or a.name not in ("exp", "exp2") \
                or a.kw.get("input") is not b.kw.get("input"):
            return None
    return dim


def _row_sum(den: Any, r: int):
    """``(summed, dim)`` when ``den`` is a sum over one dim kept as an axis of
    size 1 (``x.sum(d, keepdim=True)``, ``x.sum(d).unsqueeze(d)``,
    ``x.sum(-1)[..., None]``), the dim normalised for rank ``r``; else None."""
    s = canonical(den)
    if s is None:
        return None
    if s.name == "sum":
        dim = _reduced_dim(s, ("sum",))
        return None if dim is None else (s.kw.get("input"), norm_dim(dim, r))
    kept = None
    if s.name == "unsqueeze" and isinstance(s.kw.get("dim"), int):
        kept = norm_dim(s.kw["dim"], r)
    elif s.name == "getitem":
        index = s.kw.get("index")
        index = index if isinstance(index, tuple) else (index,)
        full = slice(None, None, None)
        if index and index[-1] is None and all(i is Ellipsis or i == full for i in index[:-1]) \
                and (Ellipsis in index or len(index) == r):
            kept = r - 1
    inner = canonical(s.kw.get("input"))
    if kept is None or inner is None or inner.name != "sum" or inner.kw.get("keepdim"):
        return None
    dim = inner.kw.get("dim")
    dim = dim[0] if isinstance(dim, (list, tuple)) and len(dim) == 1 else dim
    if not isinstance(dim, int) or norm_dim(dim, r) != kept:
        return None
    return inner.kw.get("input"), kept


def base2_softmax_parts(node: fx.Node):
    """``(x, dim, None)`` when ``node`` is a softmax written in base 2,
    ``exp2(x) / Σ exp2(x)`` in the spellings of softmax_parts (a row-max
    shift along the same dim dropped), else None: the softmax of ``x · ln 2``."""
    parts = quotient(node)
    return None if parts is None else _decomposed_softmax(*parts, fn="exp2")


def _decomposed_softmax(num: Any, den: Any, fn: str = "exp"):
    """``exp(x) / Σ exp(x)`` in its spellings (see softmax_parts); the sum
    may be of the same exp or of another ``exp`` of the same input.  ``fn``:
    the exponential (``exp2`` for base2_softmax_parts)."""
    e = canonical(num)
    if e is None or e.name != fn or not isinstance(e.kw.get("input"), fx.Node):
        return None
    r = _rank(num)
    dim = row_sum_of(den, num)
    if dim is None:
        return None
    x = e.kw["input"]
    shifted = row_max_shift(x)
    if shifted is not None and norm_dim(shifted[2], r) == norm_dim(dim, r):
        return shifted[0], dim, None
    return x, dim, None


def row_max_nodes(m: Any):
    """If ``m`` is ``y.amax(dim, keepdim=True)`` (or ``y.max(dim, True)[0]`` /
    ``.values``, ``torch.max``, with ``.detach()``), ``(y, dim, nodes)`` with
    the nodes that compute it; else None."""
    nodes = []
    mop = canonical(m)
    for _ in range(3):
        if mop is None:
            return None
        if mop.name == "getitem" and mop.kw["index"] == 0 or (
                mop.name == "getattr" and mop.kw["attr"] == "values") or mop.name == "detach":
            nodes.append(mop.node)
            mop = canonical(mop.kw["input"])
    dim = _reduced_dim(mop, ("amax", "max"))
    if dim is None or not isinstance(mop.kw.get("input"), fx.Node):
        return None
    nodes.append(mop.node)
    return mop.kw["input"], dim, nodes


def row_max_shift(x: Any):
    """If ``x`` is ``y - rowmax(z)`` (the usual overflow guard before a
    softmax), ``(y, z, dim, nodes)``; softmax is blind to the shift."""
    sub = canonical(x)
    if sub is None or sub.name != "sub" or sub.kw.get("alpha", 1) != 1:
        return None
    found = row_max_nodes(sub.kw.get("other"))
    if found is None:
        return None
    return sub.kw["input"], found[0], found[1], found[2]

