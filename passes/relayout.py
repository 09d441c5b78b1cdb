"""Scores laid out with the key axis not last, relaid out before matching.

[Note: scores in another layout]  Transformer-XL (and XLNet's original code)
keeps its scores as [query, key, batch, head] and takes the softmax over dim 1::

    ac = einsum("ibnd,jbnd->ijbn", q + r_w_bias, k)
    s = (ac + rel_shift(bd)) * scale                   # bd: a relative term
    s = s.float().masked_fill(mask[:, :, :, None], -inf)
    p = softmax(s, dim=1)
    out = einsum("ijbn,jbnd->ibnd", p, v)

Others keep the keys second last (``k @ qᵀ`` and a softmax over dim -2) or
the heads between query and key ([batch, query, head, key]).  It is
attention all the same: the softmax runs over the axis that P·V contracts,
and that axis is Q·Kᵀ's key axis.  Every op between Q·Kᵀ and the softmax is
elementwise, so the whole chain commutes with a permutation of the axes:
``relayout`` rewrites Q·Kᵀ as an einsum that writes [batch.., query, key],
copies each op of the chain onto the permuted values (a side tensor is
unsqueezed to the scores' rank and permuted the same way: a view), takes the
softmax over the last axis and rewrites P·V as an einsum that reads P in
that layout.  Then the site is one the matcher takes as any other; q, k and
v keep their own layouts (the op reads them by their strides).

[Note: unbatched scores]  Attention on one example's matrices, q (Lq, D)
against k (Lk, D) with v (Lk, Dv) (graph and set attention, a loop over the
batch in research code, unrolled by dynamo into one site per example), has
scores of rank 2, which the matcher does not take.  ``relayout`` lifts it:
the same rewrite with a unit batch axis in front of Q·Kᵀ's and P·V's
operands (views) and of the side tensors, and the product's unit axis
squeezed away after P·V.

Taken: a softmax (one op) over an axis that P·V contracts, reached from the
softmax through elementwise ops (casts, dropout) and permutes; P·V names the
query axis (the one axis of P that V lacks, besides the keys); a chain from
Q·Kᵀ (a contraction without an addend) of elementwise ops only, each read
by nothing but the chain, where Q·Kᵀ has the key axis from one operand only
and the query axis from the other only (XLNet's segment term, an einsum of
a segment matrix and q with the scores' shape, is not taken for Q·Kᵀ); the
other axes are batch axes.  When the
layout is already [batch.., query, key], nothing is done.  ``restore``
(distribute.py) puts the user's nodes back when the site is not fused.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Dict, List, Optional

import torch
import torch.fx as fx

from . import canonicalize as C
from .analyze.values import _CASTS, Decline, _size_eq
from .distribute import _fake_value
from .match import _dtype_only, chain_nodes

# ops that act on each element (their tensor arguments broadcast): they commute with a permutation
_ELEMENTWISE = frozenset({"add", "sub", "rsub", "mul", "div", "pow", "neg", "minimum", "maximum", "tanh",
                          "exp", "log", "sigmoid", "abs", "sqrt", "rsqrt", "relu", "clamp", "where",
                          "masked_fill", "nan_to_num", "eq", "ne", "lt", "le", "gt", "ge", "and", "or",
                          "not"}) | _CASTS
# of these, the ones whose other tensor arguments are read for their dtype or device only
_DTYPE_ONLY = frozenset({"to", "type", "type_as"})
_SEARCH_LIMIT = 32
_IN_PLACE = frozenset({operator.iadd, operator.isub, operator.imul, operator.itruediv})


@dataclasses.dataclass
class Relaid:
    products: List[fx.Node]     # the new P·V: the site's product once matched
    out: fx.Node                # the node now standing for the user's product
    created: List[fx.Node]      # the new nodes, in graph order
    saved: List[tuple]          # (node, op, target, args, kwargs, meta) of the user's nodes, in order


def _elementwise(n: fx.Node) -> bool:
    op = C.canonical(n)
    if op is None or op.name not in _ELEMENTWISE or n.op not in ("call_function", "call_method"):
        return False
    # an in-place op writes its input: the permuted copy would not
    return not str(n.target).endswith("_") and n.target not in _IN_PLACE


def _same_shape(a, b) -> bool:
    return a is not None and b is not None and len(a) == len(b) and all(_size_eq(x, y) for x, y in zip(a, b))


def _forward(sm: fx.Node):
    """From the softmax to P·V: ``(post, pv, index, axes)``: the nodes between
    (elementwise ops and permutes, each read once), the contraction, which
    operand P is, and for each axis of that operand the softmax axis it is."""
    r = len(C.shape_of(sm))
    axes, cur, post = list(range(r)), sm, []
    for _ in range(8):
        if len(cur.users) != 1:
            return None
        u = next(iter(cur.users))
        c = C.contraction(u)
        if c is not None:
            ops = [i for i in (0, 1) if c.operand(i)[0] is cur]
            if len(ops) != 1 or c.addend is not None or c.alpha != 1:
                return None
            return post, c, ops[0], axes
        op = C.canonical(u)
        if op is None or op.kw.get("input") is not cur:
            return None
        if op.name in ("transpose", "permute"):
            perm = C.permutation(op, len(axes))
            if perm is None:
                return None
            axes = [axes[i] for i in perm]
        elif not (_elementwise(u) or op.name == "dropout") or not _same_shape(C.shape_of(u), C.shape_of(cur)):
            return None
        post.append(u)
        cur = u
    return None


def _candidates(x: fx.Node):
    """Contractions of the scores' shape behind ``x`` through elementwise ops, nearest first."""
    xs = C.shape_of(x)
    seen, frontier = set(), [x]
    while frontier and len(seen) < _SEARCH_LIMIT:
        nxt = []
        for n in frontier:
            if n in seen:
                continue
            seen.add(n)
            c = C.contraction(n)
            if c is not None:
                if _same_shape(C.shape_of(n), xs):
                    yield c
                continue
            if _elementwise(n):
                nxt.extend(a for a in n.all_input_nodes if C.is_tensor(a))
        frontier = nxt


def _layout(c: C.Contraction, key_axis: int, query_axis: int) -> Optional[List[int]]:
    """The permutation that takes Q·Kᵀ's output to [batch.., query, key],
    or None when ``c`` does not read as Q·Kᵀ: the key axis from one operand
    only, the query axis (P·V's, ``_query_axis``) from the other only."""
    if c.addend is not None or c.alpha != 1:
        return None
    o = c.out_labels
    kl, ql = o[key_axis], o[query_axis]
    sides = [i for i in (0, 1) if kl in c.operand(i)[1]]
    if len(sides) != 1 or ql not in c.operand(1 - sides[0])[1] or ql in c.operand(sides[0])[1]:
        return None
    return [i for i in range(len(o)) if i not in (query_axis, key_axis)] + [query_axis, key_axis]


def _query_axis(pv: C.Contraction, index: int, axes: List[int], xs, d: int) -> Optional[int]:
    """The softmax axis P·V keeps as its query axis: the one label of P
    (besides the contracted key) that V does not have.

    [Note: V shared along several axes]  Where V lacks more than one axis of
    P (DeepSeek-V3's absorbed latent attention: P (b, s, h, t) against the
    compressed cache (b, t, c), shared by every head), each of them could
    stand for the query axis: V is the same along all of them, so the others
    are heads over one key head.  Which one is free to choose, and it sets the
    kernel's shape: the heads axis h (16) as the query axis left the 2048
    positions as heads, each 16 rows walking all 2048 keys (46 TFLOP/s where
    the same attention as 16 heads of 2048 rows ran 248, bench/RESULTS.md
    runs 169-170).  So the longest is taken, and the scores' own query axis
    (the one before the keys) wherever it is among the longest: then nothing
    moves.  A graph compiled for dynamic sizes serves every length from its
    first one, so a size that varies is taken as the longest (a sequence,
    against a fixed count of heads), and where the scores' own query axis
    varies nothing moves: a short first prompt must not fix the heads as the
    rows for the long ones after it."""
    pl, vl = pv.operand(index)[1], pv.operand(1 - index)[1]
    only = [axes[j] for j, lab in enumerate(pl) if lab not in vl and lab != pv.contracted]
    if len(only) == 1:
        return only[0]
    if not only or xs is None:
        return None
    own = len(xs) - 2 if d == len(xs) - 1 else None
    if own in only and not isinstance(xs[own], int):
        return None
    dynamic = [a for a in only if not isinstance(xs[a], int)]
    if dynamic:
        return dynamic[0]
    longest = max(xs[a] for a in only)
    if own in only and xs[own] >= longest:
        return None         # as laid out
    return next(a for a in only if xs[a] >= longest)


def _chain(c: C.Contraction, x: fx.Node, sm: fx.Node) -> Optional[set]:
    try:
        chain = chain_nodes(c.node, x, sm)
    except Decline:
        return None
    xs = C.shape_of(x)
    for n in chain:
        if n is not c.node and not _elementwise(n):
            return None
        if not _same_shape(C.shape_of(n), xs) or any(u not in chain and not _dtype_only(u, n) for u in n.users
                                                     if n is not x):
            return None
    return chain if all(u is sm or _dtype_only(u, x) for u in x.users) else None


def _plan(sm: fx.Node):
    parts = C.softmax_parts(sm)
    op = C.canonical(sm)
    if parts is None or op is None or op.name != "softmax" or not isinstance(parts[1], int):
        return None
    x = parts[0]
    xs = C.shape_of(x)
    if not isinstance(x, fx.Node) or xs is None or len(xs) not in (2, 3, 4, 5):
        return None
    lift = len(xs) == 2         # [Note: unbatched scores]
    d = C.norm_dim(parts[1], len(xs))
    fwd = _forward(sm)
    if fwd is None:
        return None
    post, pv, index, axes = fwd
    plabels = pv.operand(index)[1]
    if pv.contracted not in plabels or axes[plabels.index(pv.contracted)] != d:
        return None
    qa = _query_axis(pv, index, axes, xs, d)
    if qa is None or qa == d:
        return None
    for c in _candidates(x):
        perm = _layout(c, d, qa)
        chain = _chain(c, x, sm) if perm is not None else None
        if chain is None:
            continue
        if perm == list(range(len(xs))) and not lift:
            return None
        return c, chain, x, post, pv, index, axes, perm, lift
    return None


def _einsum_eq(a: str, b: str, out: str) -> str:
    return f"{a},{b}->{out}"


def _rewrite(g: fx.Graph, sm: fx.Node, plan) -> Optional[Relaid]:
    c, chain, x, post, pv, index, axes, perm, lift = plan
    r0 = len(perm)                  # the user's scores' rank
    r = r0 + lift                   # the new scores': a unit batch axis first when lifted
    side_perm = [0] + [i + 1 for i in perm] if lift else perm
    used = set(c.lhs_labels + c.rhs_labels + pv.lhs_labels + pv.rhs_labels)
    z = next(ch for ch in "zyxwvutsrqponmlkjihgfedcba" if ch not in used) if lift else ""
    want = C.example_value(pv.node)
    mode = getattr(want, "fake_mode", None)
    if mode is None:
        return None
    created, env, new = [], {}, {}

    def finish(n, like):
        n.meta.update({k: v for k, v in like.meta.items() if k not in ("example_value", "_ac_canon")})
        n.meta.pop("_ac_canon", None)       # node_copy copied the user's node's canonical reading
        created.append(n)
        with mode:
            env[n] = _fake_value(n, env)
        n.meta["example_value"] = env[n]
        return n

    def make(target, args, like, kwargs=None):
        return finish(g.create_node("call_function", target, args, kwargs or {}), like)

    side: Dict[fx.Node, fx.Node] = {}

    def permuted_side(a: fx.Node, like) -> fx.Node:
        if a not in side:
            v = C.example_value(a)
            if v.dim() == 0:
                side[a] = a
            else:
                if v.dim() > r:
                    raise ValueError("a side tensor of higher rank than the scores")
                n = a
                for _ in range(r - v.dim()):
                    n = make(torch.unsqueeze, (n, 0), like)
                side[a] = make(torch.permute, (n, tuple(side_perm)), like)
        return side[a]

    def unit(n, like):
        """``n`` with the unit batch axis of lifted scores in front."""
        return make(torch.unsqueeze, (n, 0), like) if lift else n

    o = c.out_labels
    order = {n: i for i, n in enumerate(g.nodes)}
    try:
        with g.inserting_before(pv.node):
            new[c.node] = make(torch.einsum,
                               (_einsum_eq(z + c.lhs_labels, z + c.rhs_labels, z + "".join(o[i] for i in perm)),
                                unit(c.lhs, c.node), unit(c.rhs, c.node)), c.node)
            for n in sorted(chain - {c.node}, key=order.__getitem__):
                name = C.canonical(n).name
                first = n.args[0] if n.args else n.kwargs.get("input")

                def arg(a, n=n, name=name, first=first):
                    if a in new:
                        return new[a]
                    if name in _DTYPE_ONLY and a is not first:
                        return a
                    if isinstance(C.example_value(a), torch.Tensor):
                        return permuted_side(a, n)
                    return a
                new[n] = finish(g.node_copy(n, arg), n)
            xp = new[x]
            sm_new = g.node_copy(sm, lambda a: xp if a is x else a)
            if sm_new.args:
                rest = list(sm_new.args)
                if len(rest) > 1:
                    rest[1] = -1
                sm_new.args = tuple(rest)
            if "dim" in sm_new.kwargs:
                sm_new.kwargs = {**sm_new.kwargs, "dim": -1}
            cur = finish(sm_new, sm)
            probs = {sm: cur}           # the user's P at each step -> P in the new layout
            for u in post:
                if C.canonical(u).name not in ("transpose", "permute"):
                    cur = finish(g.node_copy(u, lambda a: probs.get(a, new.get(a, a))), u)
                probs[u] = cur
            pl, ol = pv.operand(index)[1], pv.operand(1 - index)[1]
            at = {axes[j]: pl[j] for j in range(r0)}
            p_labels = z + "".join(at[i] for i in perm)
            other, ol, ql = unit(pv.operand(1 - index)[0], pv.node), z + ol, z + pv.out_labels
            eq = _einsum_eq(p_labels, ol, ql) if index == 0 else _einsum_eq(ol, p_labels, ql)
            args = (eq, cur, other) if index == 0 else (eq, other, cur)
            product = make(torch.einsum, args, pv.node)
            out = make(torch.squeeze, (product, 0), pv.node) if lift else product
    except Exception:
        for n in reversed(created):
            g.erase_node(n)
        raise
    got = env[out]
    if got.dtype != want.dtype or not _same_shape(tuple(got.shape), tuple(want.shape)):
        for n in reversed(created):
            g.erase_node(n)
        return None
    old = sorted(list(chain) + [sm] + list(post) + [pv.node], key=order.__getitem__)
    saved = [(n, n.op, n.target, n.args, n.kwargs, dict(n.meta)) for n in old]
    if any(u not in old for n in chain for u in n.users):
        # a reader of a chain value's dtype outside the site: left as written
        for n in reversed(created):
            g.erase_node(n)
        return None
    pv.node.replace_all_uses_with(out)
    for n in reversed(old):
        g.erase_node(n)
    return Relaid([product], out, created, saved)


def relayout(gm: fx.GraphModule) -> List[Relaid]:
    """Rewrite every attention of ``gm`` whose scores are laid out other than
    [batch.., query, key] (see the note); returns what ``restore`` needs to
    undo each."""
    out = []
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method"):
            continue
        try:
            plan = _plan(node)
            d = _rewrite(gm.graph, node, plan) if plan is not None else None
        except Exception:  # noqa: BLE001 - a form we misread stays as written
            continue
        if d is not None:
            out.append(d)
    return out
