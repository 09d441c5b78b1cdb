"""Scores that are a sum of two products, joined into one product.

[Note: scores summed from two products]  Some attention adds two Q·Kᵀ
products of the scores' whole shape.  DeepSeek-V3's reference inference code
(multi-head latent attention, its "absorb" path) scores the queries against
the compressed cache and the rotary keys apart::

    s = (einsum("bshc,btc->bsht", q_nope, kv) + einsum("bshr,btr->bsht", q_pe, pe)) * scale

LiLT adds a layout stream's scores to the text stream's, each scaled by its
own head dim: ``s = q @ kᵀ / sqrt(d) + ql @ klᵀ / sqrt(dl)``.  A sum of two
contractions over the same output axes is one contraction over their
concatenated contracted axes::

    a · Σ_c q1[.., c] k1[.., c] + b · Σ_r q2[.., r] k2[.., r]
        = Σ_{c ⊕ r} cat(a·q1, b·q2)[..] · cat(k1, k2)[..]

so ``join`` rewrites the sum as that one product before matching (the two
query operands and the two key operands concatenated along the contracted
axis: copies linear in the sequence lengths).  The site then has one Q·Kᵀ of
head dim c + r, and nothing of the scores' size is computed outside the
kernel (before, the second product was captured whole: an Lq×Lk tensor the
graph built).  When both terms carry the same factor it stays on the joined
product; otherwise each factor scales its own query operand.  ``unjoin``
puts the user's sum back when the site is not fused, so an unfused model
runs what was written; the user's nodes are never erased here (LiLT's two
sites share the two products: each site's sum is joined on its own).

Taken: ``x + y``, ``x - y`` (and ``torch.add(x, y, alpha=n)``) where x and y
are each a contraction (matmul, bmm, a two-operand einsum; no addend) maybe
times or over a number, both contractions of the same form up to the names
of their axes (the contracted axis at the same place; the second may lack
leading axes of the first, TUPE's positional term (H, N, N) beside content
scores (B, H, N, N): its operands get them as axes of size 1), their
operands equal in size along every axis but the contracted one (or of size
1 there: broadcast, expanded before the copy), of one dtype, and the sum
reaching a softmax within a few elementwise ops.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import List, Optional

import torch
import torch.fx as fx

from . import canonicalize as C
from .distribute import erase_all, recorded, rewrite_each, same_value_kind

_REACH = 8       # ops from the sum forward to the softmax


@dataclasses.dataclass
class Joined:
    old: fx.Node            # the user's sum (kept in the graph, unused while joined)
    out: fx.Node            # the node now standing for it
    created: List[fx.Node]  # the new nodes, in graph order


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _contraction(node) -> Optional[C.Contraction]:
    """A contraction without an addend, or one read through a permutation of
    its axes (relayout.py's side tensor ``permute(einsum(...))``) as one
    whose output labels are permuted."""
    if not isinstance(node, fx.Node):
        return None
    c = C.contraction(node)
    if c is None:
        op = C.canonical(node)
        if op is None or op.name not in ("transpose", "permute") or not isinstance(op.kw.get("input"), fx.Node):
            return None
        c = C.contraction(op.kw["input"])
        perm = C.permutation(op, len(c.out_labels)) if c is not None else None
        if perm is None:
            return None
        c = dataclasses.replace(c, node=node, out_labels="".join(c.out_labels[p] for p in perm))
    return c if c.addend is None and c.alpha == 1 else None


def _term(node) -> Optional[tuple]:
    """(contraction, factor) when ``node`` is a contraction maybe times or over a number."""
    c = _contraction(node)
    if c is not None or not isinstance(node, fx.Node):
        return None if c is None else (c, 1.0)
    op = C.canonical(node)
    if op is None or op.name not in ("mul", "div") or str(node.target).endswith("_"):
        return None
    a, b = op.kw.get("input"), op.kw.get("other")
    if op.name == "div":
        c = _contraction(a) if _number(b) and b != 0 else None
        return None if c is None else (c, 1.0 / b)
    for x, f in ((a, b), (b, a)):
        c = _contraction(x) if _number(f) else None
        if c is not None:
            return c, float(f)
    return None


def _aligned(c1: C.Contraction, c2: C.Contraction) -> Optional[tuple]:
    """How c2 reads as c1 with its axes renamed, c2's output maybe missing
    leading axes of c1's (broadcast: a term without the batch axis):
    ``(swapped, leading axes c2's first operand lacks, ... its second)``,
    None when it does not."""
    d = len(c1.out_labels) - len(c2.out_labels)
    if d < 0 or set(c1.lhs_labels) | set(c1.rhs_labels) != set(c1.out_labels) | {c1.contracted} \
            or set(c2.lhs_labels) | set(c2.rhs_labels) != set(c2.out_labels) | {c2.contracted}:
        return None
    name = dict(zip(c2.out_labels, c1.out_labels[d:]))
    name[c2.contracted] = c1.contracted
    lhs, rhs = ("".join(name.get(x, "?") for x in s) for s in (c2.lhs_labels, c2.rhs_labels))
    for swapped, (a, b) in ((False, (lhs, rhs)), (True, (rhs, lhs))):
        if c1.lhs_labels.endswith(a) and c1.rhs_labels.endswith(b):
            return swapped, len(c1.lhs_labels) - len(a), len(c1.rhs_labels) - len(b)
    return None


def _reaches_softmax(node: fx.Node) -> bool:
    def softmax_like(u):
        op = C.canonical(u)
        return C.softmax_parts(u) is not None or op is not None and op.name in (
            "exp", "amax", "max", "logsumexp", "cat", "pad")
    return C.user_within(node, _REACH, softmax_like) is not None


def _operand_pair(x1: fx.Node, x2: fx.Node, dim: int, lead: int):
    """How to concatenate x1 and x2 (given ``lead`` leading axes of size 1)
    along ``dim``: ``([(node, leading axes to add, expand sizes or None)] *
    2, shape of the result)`` (an expand size is -1 or ``(node, axis)``, that
    node's size there), or None when their other sizes differ (beyond a size
    of 1 against another: broadcast)."""
    s1, s2 = C.shape_of(x1), C.shape_of(x2)
    if s1 is None or s2 is None:
        return None
    s2 = (1,) * lead + tuple(s2)
    if len(s1) != len(s2):
        return None
    v1, v2 = C.example_value(x1), C.example_value(x2)
    if v1.dtype != v2.dtype or not v1.is_floating_point():
        return None
    want = []
    for i, (a, b) in enumerate(zip(s1, s2)):
        if i == dim:
            want.append(None)
        elif a == b:
            want.append(a)
        elif a == 1 or b == 1:
            want.append(b if a == 1 else a)
        else:
            return None
    parts = []
    for x, s, n_lead, other, o_lead in ((x1, s1, 0, x2, lead), (x2, s2, lead, x1, 0)):
        # an axis of size 1 against the other's n takes the other's size, read
        # from it at run time (a size node: no number fixed in the graph)
        sizes = [-1 if w is None or w == n else (other, i - o_lead) for i, (w, n) in enumerate(zip(want, s))]
        parts.append((x, n_lead, sizes if any(e != -1 for e in sizes) else None))
    return parts, [s1[dim] + s2[dim] if w is None else w for w in want]


# [Note: joined only where it saves memory]  The join copies the operands:
# the two query operands and the two key operands, concatenated.  Where the
# scores are small against those copies (a decode step: one query row
# against a long cache, whose key operands the join would copy whole every
# step), the second product is the cheaper thing to build, and the site
# keeps it as a captured term as before.  So a sum is joined only where the
# scores hold more elements than the two concatenated operands together.


def _numel(shape) -> int:
    """The element count of ``shape`` at its example sizes: a symbolic size
    is read by its hint (``int()`` would specialize the graph to it), one
    without a hint taken as large."""
    n = 1
    for s in shape:
        hint = s.node.hint if isinstance(s, torch.SymInt) else s
        if hint is None:
            return 1 << 62
        n *= int(hint)
    return n


def _find(node: fx.Node):
    """``(c1, f1, c2, f2, how)`` when ``node`` sums two joinable products
    (see the note; ``how``: ``_aligned``'s), else None."""
    op = C.canonical(node)
    if op is None or op.name not in ("add", "sub") or str(node.target).endswith("_"):
        return None
    alpha = op.kw.get("alpha", 1)
    t1, t2 = _term(op.kw.get("input")), _term(op.kw.get("other"))
    if t1 is None or t2 is None or not _number(alpha):
        return None
    (c1, f1), (c2, f2) = t1, t2
    f2 = f2 * alpha * (-1 if op.name == "sub" else 1)
    if C.shape_of(c1.node) != C.shape_of(node):     # the term of the scores' own shape first
        (c1, f1), (c2, f2) = (c2, f2), (c1, f1)
    if c1.node is c2.node or len(C.shape_of(node) or ()) < 2:
        return None
    v, v1, v2 = (C.example_value(n) for n in (node, c1.node, c2.node))
    if not (v1.dtype == v2.dtype == v.dtype) or tuple(v.shape) != tuple(v1.shape):
        return None
    how = _aligned(c1, c2)
    if how is None or not _reaches_softmax(node):
        return None
    return c1, f1, c2, f2, how


def join(gm: fx.GraphModule) -> List[Joined]:
    """Join every sum of two products that reaches a softmax (see the note);
    returns what ``unjoin`` needs to put each back."""
    return rewrite_each(gm, lambda node: (node, *found) if (found := _find(node)) is not None else None, _rewrite)


def _rewrite(g: fx.Graph, node, c1, f1, c2, f2, how) -> Optional[Joined]:
    want = C.example_value(node)
    mode = getattr(want, "fake_mode", None)
    if mode is None:
        return None
    swap, lead_l, lead_r = how
    ops2 = (c2.rhs, c2.lhs) if swap else (c2.lhs, c2.rhs)
    plans = [_operand_pair(x1, x2, labels.index(c1.contracted), lead) for x1, x2, labels, lead in
             ((c1.lhs, ops2[0], c1.lhs_labels, lead_l), (c1.rhs, ops2[1], c1.rhs_labels, lead_r))]
    if None in plans or _numel(C.shape_of(node)) <= sum(_numel(shape) for _, shape in plans):
        return None                 # [Note: joined only where it saves memory]
    same = f1 == f2
    trace = node.meta.get("stack_trace")
    created, env = [], {}

    def make(target, args, kind="call_function"):
        return recorded(g.create_node(kind, target, args), trace, created, env, mode)

    def scaled(x, f):
        return x if same or f == 1 else make(operator.mul, (x, f))

    try:
        with g.inserting_before(node):
            joined = []
            for k, ((plan, _), labels) in enumerate(zip(plans, (c1.lhs_labels, c1.rhs_labels))):
                parts = []
                for (x, lead, expand), f in zip(plan, (f1, f2)):
                    for _ in range(lead):
                        x = make("unsqueeze", (x, 0), "call_method")
                    if expand is not None:
                        sizes = [e if e == -1 else make("size", e, "call_method") for e in expand]
                        x = make("expand", (x, *sizes), "call_method")
                    parts.append(scaled(x, f) if k == 0 else x)
                joined.append(make(torch.cat, (parts, labels.index(c1.contracted))))
            op = C.canonical(c1.node)
            if op.name in ("matmul", "bmm"):
                prod = make(torch.bmm if op.name == "bmm" else torch.matmul, tuple(joined))
            else:
                prod = make(torch.einsum, (f"{c1.lhs_labels},{c1.rhs_labels}->{c1.out_labels}", *joined))
            new = make(operator.mul, (prod, f1)) if same and f1 != 1 else prod
    except Exception:
        erase_all(g, created)
        raise
    if not same_value_kind(g, created, env[new], want):
        return None
    _replace(node, new)
    return Joined(node, new, created)


def _replace(old: fx.Node, new: fx.Node) -> None:
    users = list(old.users)
    old.replace_all_uses_with(new)
    for u in users:
        u.meta.pop("_ac_canon", None)      # its canonical reading names its old argument


def operands(j: Joined) -> List[fx.Node]:
    """The joined query and key operands: a site that reads them is ``j``'s."""
    return [n for n in j.created if n.target is torch.cat]


def unjoin(gm: fx.GraphModule, j: Joined) -> None:
    """Put the user's sum back in place of ``j``'s product (its site was not
    fused); when the sum itself went (a relaid-out chain restored,
    relayout.py), only the new nodes go."""
    if not getattr(j.old, "_erased", False):
        _replace(j.out, j.old)
    for n in reversed(j.created):
        if not getattr(n, "_erased", False) and not n.users:
            gm.graph.erase_node(n)
