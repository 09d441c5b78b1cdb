"""Operands of an attention site: Q, K and V as the op will receive them.

``peel`` walks back from a contraction operand through scalar scaling,
transposes and copies (the scale moves into the spec, the layout into
labels); ``gqa_narrow`` recognises K/V widened per head (``repeat_kv``,
``repeat_interleave``, ``expand``) so the op reads the narrow tensor once per
group; ``check_layouts`` proves the op's broadcast rules hold; and
``mutating_users`` finds in-place writes the matcher must respect.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

import torch
import torch.fx as fx

from . import canonicalize as C
from .analyze.values import Decline

@dataclasses.dataclass
class Operand:
    """An input of the op: ``node`` rearranged by ``labels -> target``."""

    node: fx.Node
    labels: str               # labels of node's axes
    target: str               # labels of the op layout [batch.., row, col]
    factor: Any = 1           # scalar peeled off (scales)
    group: int = 1            # GQA: node is the narrow tensor, heads repeat ``group`` times
    expand_batch: bool = False  # a query of batch 1 broadcast over the keys' batch


def peel(node: fx.Node, labels: str) -> Tuple[fx.Node, str, Any]:
    """Walk back through scalar scaling, transposes and copies.

    Returns ``(base, base_labels, factor)`` with ``node == factor * base``
    rearranged; labels follow the axes.
    """
    factor = 1
    while True:
        op = C.canonical(node)
        if op is None:
            return node, labels, factor
        n = op.name
        if n in ("contiguous", "clone", "mul", "div"):
            # a copy: it and its source part ways at any in-place write, and
            # the op would read the source ([Note: written operands])
            src = op.kw["input"] if n != "mul" or C.is_tensor(op.kw["input"]) else op.kw.get("other")
            if isinstance(src, fx.Node) and (written(node) or written(src, after=node)):
                return node, labels, factor
        if n in ("contiguous", "clone") and C.is_tensor(op.kw["input"]):
            node = op.kw["input"]
        elif n in ("mul", "div") and _scalar(op.kw.get("other")) is not None \
                and C.is_tensor(op.kw["input"]) \
                and C.example_value(op.kw["input"]).dtype == C.example_value(node).dtype:
            s = _scalar(op.kw["other"])
            factor = factor * s if n == "mul" else factor / s
            node = op.kw["input"]
        elif n == "mul" and _scalar(op.kw["input"]) is not None and C.is_tensor(op.kw.get("other")):
            factor = factor * _scalar(op.kw["input"])
            node = op.kw["other"]
        elif n in ("transpose", "permute"):
            src = op.kw["input"]
            r = len(labels)
            if n == "transpose":
                perm = list(range(r))
                a, b = C.norm_dim(op.kw["dim0"], r), C.norm_dim(op.kw["dim1"], r)
                perm[a], perm[b] = perm[b], perm[a]
            else:
                perm = [C.norm_dim(d, r) for d in op.kw["sizes"]]
            src_labels = [""] * r
            for j, pj in enumerate(perm):
                src_labels[pj] = labels[j]
            node, labels = src, "".join(src_labels)
        else:
            return node, labels, factor


def _scalar(x):
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return x
    if isinstance(x, fx.Node):
        ev = C.example_value(x)
        if isinstance(ev, (torch.SymInt, torch.SymFloat)):
            return ev
    if isinstance(x, (torch.SymInt, torch.SymFloat)):
        return x
    return None


def gqa_narrow(node: fx.Node, hdim: int = 1) -> Optional[Tuple[fx.Node, int]]:
    """If ``node`` [B, H, L, D] repeats each of Hkv heads ``G`` times
    (``repeat_interleave(G, dim=1)``, or ``x[:, :, None].expand(B, Hkv, G, L, D)
    .reshape(B, H, L, D)`` as in HF ``repeat_kv``), the narrow tensor and G.
    ``hdim``: the head axis of ``node`` when it is not 1 (Meta's reference
    Llama repeats heads on [B, L, Hkv, D], ``x[:, :, :, None].expand(...)``,
    before its transpose; Mistral's ``repeat_interleave(G, dim=2)``)."""
    op = C.canonical(node)
    shape = C.shape_of(node)
    if op is None or shape is None or len(shape) != 4:
        return None
    if op.name == "repeat_interleave":
        g, dim, x = op.kw.get("repeats"), op.kw.get("dim"), op.kw["input"]
        if isinstance(g, int) and dim in (hdim, hdim - 4) and len(C.shape_of(x)) == 4:
            return x, g
        return None
    if op.name in ("reshape", "view", "flatten"):
        e = C.canonical(op.kw["input"])
        es = C.shape_of(op.kw["input"])
        if e is None or e.name != "expand" or len(es) != 5:
            return None
        if op.name == "flatten" and (op.kw.get("start_dim"), op.kw.get("end_dim")) not in ((hdim, hdim + 1),):
            return None
        u = C.canonical(e.kw["input"])
        us = C.shape_of(e.kw["input"])
        if u is None or len(us) != 5 or not (isinstance(us[hdim + 1], int) and us[hdim + 1] == 1):
            return None
        if u.name == "unsqueeze" and C.norm_dim(u.kw["dim"], 5) == hdim + 1:
            x = u.kw["input"]
        elif u.name == "getitem" and _is_none_at(u.kw["index"], hdim + 1):
            x = u.kw["input"]
        else:
            return None
        g = es[hdim + 1]
        return (x, g) if isinstance(g, int) else None
    if op.name == "expand":
        x = op.kw["input"]
        xs = C.shape_of(x)
        if len(xs) == 4 and isinstance(xs[hdim], int) and xs[hdim] == 1 and isinstance(shape[hdim], int):
            return x, shape[hdim]
    return None


def _is_none_at(idx, pos: int) -> bool:
    """Whether the index tuple ``idx`` is full slices with one None at ``pos``."""
    if not isinstance(idx, tuple):
        return False
    full = all(isinstance(i, slice) and i == slice(None) for i in idx[:pos])
    return full and len(idx) >= pos + 1 and idx[pos] is None and all(
        (isinstance(i, slice) and i == slice(None)) or i is Ellipsis for i in idx[pos + 1:])


# [Note: written operands]  The op is called where P·V was, and reads the
# tensors it is given then.  Walking from Q·Kᵀ's operand back to a base
# through a copy (clone, contiguous, a scalar product, a head repeat) is only
# sound when the copy is never written in place and its source is not written
# after the copy was made: after ``q = q.clone(); q[..., :8] = rope(q[..., :8])``
# the source is not what the product read, and after ``k2 = k.clone();
# k.mul_(2)`` the source is no longer what the copy holds.  A write before the
# copy is fine (a static KV cache updated with ``index_copy_``, then
# ``repeat_kv``: the op still takes the narrow cache).  Views need no such
# care: a view and its base share their storage, so the op sees every write.


def written(node: fx.Node, after: Optional[fx.Node] = None) -> bool:
    """Whether an in-place op writes ``node``'s storage (directly, on the
    tensor an in-place op returned, or through a view of it), anywhere or
    only counting writes that come after the node ``after``."""
    writers = storage_writers(node) + view_writers(node)
    if after is None or not writers:
        return bool(writers)
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return any(order[w] > order[after] for w in writers)


def _operand(node: fx.Node, labels: str, target: str, allow_factor=True) -> Operand:
    base, blabels, factor = peel(node, labels)
    if not allow_factor and not (isinstance(factor, int) and factor == 1):
        base, blabels, factor = node, labels, 1
    op = Operand(base, blabels, target, factor)
    if len(target) == 4 and sorted(blabels) == sorted(target):
        # the head axis where the base holds it (permuted after the repeat)
        narrow = gqa_narrow(base, blabels.index(target[1]))
        if narrow is not None and not written(base) and not written(narrow[0], after=base):
            op.node, op.group = narrow
    return op


def _widen(op: Operand, wide: fx.Node) -> None:
    op.node, op.group = wide, 1


def _sizes(op: Operand):
    """Sizes of the operand in its target layout (1 where it broadcasts)."""
    sizes = dict(zip(op.labels, C.shape_of(op.node)))
    return [sizes.get(lab, 1) for lab in op.target]


def op_lead(sizes, heads=None) -> Tuple:
    """(batch, heads) once a tensor with leading ``sizes`` is in the op layout
    (layout.to_op_layout): [BH] → (1, BH) or ``heads``; [B, Hkv, G] → (B, Hkv*G)."""
    from .analyze.values import _sym, is_one
    sizes = tuple(sizes)
    if len(sizes) == 1:
        if is_one(sizes[0]):
            return (1, 1)
        return tuple(heads) if heads is not None else (1, sizes[0])
    if len(sizes) == 3:
        return (sizes[0], _sym(sizes[1]) * _sym(sizes[2]))
    return sizes


def _check_layouts(q: Operand, k: Operand, v: Operand, score_shape, wide_k, wide_v,
                   heads=None) -> None:
    """The op computes out[b, h] from q[b, h], k[b|0, h // G], v[b|0, h // G]:
    q must not broadcast, and k and v must share their batch and head counts."""
    from .analyze.values import _size_eq, is_one

    def lead(op):
        return op_lead(_sizes(op)[:-2], heads)

    same = lambda a, b: all(_size_eq(x, y) for x, y in zip(a, b))  # noqa: E731
    score = op_lead(score_shape[:-2], heads)
    if not same(lead(q), score):
        qb, qh = lead(q)
        if not (is_one(qb) and _size_eq(qh, score[1]) and _size_eq(lead(k)[0], score[0])):
            raise Decline("the query broadcasts over a batch axis")
        q.expand_batch = True  # Perceiver-style latents: a stride-0 view, no copy
    if not same(lead(k), lead(v)):
        if k.group > 1:
            _widen(k, wide_k)
        if v.group > 1:
            _widen(v, wide_v)
        if not same(lead(k), lead(v)):
            raise Decline("key and value differ in their batch or head axes")
    kb = lead(k)[0]
    if not (is_one(kb) or _size_eq(kb, score[0])):
        raise Decline("key batch neither matches the query batch nor broadcasts")


_MUTATING_FUNCS = {"setitem", "index_put_", "copy_", "fill_", "zero_"}


_INPLACE_OPERATORS = {"setitem", "iadd", "isub", "imul", "itruediv", "ifloordiv", "imod",
                      "ipow", "iand", "ior", "ixor", "ilshift", "irshift", "imatmul"}


def mutated_between(node: fx.Node, start: fx.Node, end: fx.Node) -> bool:
    """Whether an in-place op writes ``node``'s storage (directly or through
    a view of it) after ``start`` and before ``end``."""
    order = {n: i for i, n in enumerate(start.graph.nodes)}
    lo, hi = order[start], order[end]
    return any(lo < order[u] < hi for u in storage_writers(node) + view_writers(node))


def mutating_users(node: fx.Node):
    out = []
    for u in node.users:
        if u.op not in ("call_method", "call_function") or not u.args or u.args[0] is not node:
            continue
        if u.op == "call_function" and getattr(u.target, "__module__", "") in ("_operator", "operator"):
            if u.target.__name__ in _INPLACE_OPERATORS:
                out.append(u)
            continue
        name = u.target if isinstance(u.target, str) else getattr(u.target, "__name__", "")
        if name.startswith("__") and name.endswith("__"):
            if name[2:-2] in _INPLACE_OPERATORS:  # x.__iadd__(y), x.__setitem__(i, y)
                out.append(u)
        elif name in _MUTATING_FUNCS or name.endswith("_"):
            out.append(u)
    return out


def _check_grouped(q: Operand, k: Operand, v: Operand, score_shape) -> None:
    """5-D scores [B, Hkv, G, Lq, Lk] merge (Hkv, G) into the op's heads:
    query head h reads key head h // G, so keys may only drop the G axis."""
    from .analyze.values import _size_eq, is_one
    g = score_shape[2]
    if not isinstance(g, int):
        raise Decline("grouped heads with a dynamic group size")
    for op in (k, v):
        sizes = _sizes(op)
        if not (is_one(sizes[2]) or _size_eq(sizes[2], g)) or not _size_eq(sizes[1], score_shape[1]):
            raise Decline("grouped heads whose keys do not follow the groups")


_VIEW_OPS = {"view", "reshape", "transpose", "permute", "unsqueeze", "squeeze", "getitem",
             "expand", "expand_as", "view_as", "narrow", "select", "flatten", "unflatten",
             "as_strided", "diagonal", "t", "mT", "unbind", "split", "chunk", "contiguous",
             "detach", "getattr"}


def view_written(node: fx.Node, depth: int = 4) -> bool:
    """Whether an in-place op writes ``node``'s storage through a view of it
    (``x.view(...).masked_fill_(...)``): such a tensor is read at run time."""
    return bool(view_writers(node, depth))


def view_writers(node: fx.Node, depth: int = 4) -> list:
    """The in-place ops that write ``node``'s storage through views of it."""
    out, stack = [], [(u, node, 1) for u in node.users]
    while stack:
        u, parent, d = stack.pop()
        op = C.canonical(u)
        if op is None or op.name not in _VIEW_OPS or not u.args or u.args[0] is not parent:
            continue
        out += mutating_users(u)
        if d < depth:
            stack.extend((w, u, d + 1) for w in u.users)
    return out


def shares_storage(n: fx.Node, parent: fx.Node, casts: bool = False) -> bool:
    """Whether ``n`` (an op on ``parent``) may return ``parent``'s storage: a
    view, an in-place write, and with ``casts`` also a cast or a dropout
    (each returns its input itself when it has nothing to do)."""
    from .analyze.values import _CASTS
    if n in mutating_users(parent):
        return True
    op = C.canonical(n)
    return op is not None and (op.name in _VIEW_OPS
                               or casts and (op.name in _CASTS and op.name != "clone" or op.name == "dropout"))


def storage_root(node: fx.Node, casts: bool = False) -> fx.Node:
    """The node whose storage ``node`` shares, walking back through
    ``shares_storage`` ops."""
    root = node
    while root.args and isinstance(root.args[0], fx.Node) and shares_storage(root, root.args[0], casts):
        root = root.args[0]
    return root


def storage_writers(node: fx.Node):
    """The in-place ops that write ``node``'s storage: on the tensor an
    in-place op returns, its base's writers."""
    base = node
    while base.args and isinstance(base.args[0], fx.Node) and base in mutating_users(base.args[0]):
        base = base.args[0]
    return mutating_users(base)
