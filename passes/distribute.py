"""Probabilities combined across pairs of heads before P·V, moved past P·V.

[Note: maps combined before P·V]  The Differential Transformer computes one
softmax over 2H heads, views the probabilities as H pairs of maps and takes
their difference before the product with V::

    w = softmax(q @ k.transpose(-1, -2) + mask, -1)        # (B, 2H, Lq, Lk)
    w = w.view(B, H, 2, Lq, Lk)
    w = w[:, :, 0] - lam * w[:, :, 1]                      # (B, H, Lq, Lk)
    out = w @ v                                            # v: (B, H, Lk, Dv)

P·V is linear in P, so ``out = P0·V - lam · P1·V``: one attention over the 2H
heads with each value head read by both heads of its pair (v repeated along
a new pair axis: (B, 2H, Lk, Dv), linear in Lk), then the same combination of
the two halves of its output.  ``distribute`` rewrites the graph that way
before matching, so the softmax feeds one ordinary P·V (a site the matcher
takes as any other); ``restore`` puts the user's nodes back when that site is
not fused (declined, or the original kept by the never-slower choice), so an
unfused model runs exactly what was written.

Taken: a view / reshape / unflatten that splits the head axis (1 of a 4-D P)
into (H, 2); the two maps as ``x[:, :, 0]`` / ``x[:, :, 1]`` (getitem or
select); their combination ``a - c * b`` or ``a + c * b`` with either map
optionally scaled, by a number or a tensor of size 1 along the keys (its
last axis: a per-head lambda; P·V carries it past itself); the product
``w @ v`` with v of 4 axes.

The paper's pseudo-code writes two softmaxes instead, ``(softmax(a1) - lam *
softmax(a2)) @ v``: that becomes ``softmax(a1) @ v - lam * (softmax(a2) @
v)``, two P·V products the matcher takes one by one (``lam`` as above); restored
when neither is fused.  ConViT's gated positional attention mixes the content
softmax with a positional one and divides the mixture by its own row sums
first ([Note: a mixture of maps renormalized]).  Anything else is left as it
is.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Dict, List, Optional

import torch
import torch.fx as fx
from torch.fx.node import map_arg

from . import canonicalize as C


@dataclasses.dataclass
class Distributed:
    products: List[fx.Node]     # the new P·V nodes: the sites' products once matched
    out: fx.Node                # the node now standing for the user's product
    created: List[fx.Node]      # the new nodes, in graph order
    saved: List[tuple]          # (node, op, target, args, kwargs, meta) of the user's nodes, in order


def repeat_pairs(v: torch.Tensor) -> torch.Tensor:
    """(B, H, Lk, Dv) -> (B, 2H, Lk, Dv): value head h for heads 2h and 2h + 1."""
    return v.unsqueeze(2).expand(-1, -1, 2, -1, -1).flatten(1, 2)


def pair_half(o: torch.Tensor, i: int) -> torch.Tensor:
    """(B, 2H, Lq, Dv) -> (B, H, Lq, Dv): the outputs of heads 2h + i."""
    return o.unflatten(1, (-1, 2)).select(2, i)


def _pair_index(node: fx.Node, x: fx.Node) -> Optional[int]:
    """0 or 1 when ``node`` is ``x[:, :, i]`` (or ``x.select(2, i)``) of the
    (B, H, 2, Lq, Lk) view ``x``, else None."""
    op = C.canonical(node)
    if op is None or op.kw.get("input") is not x:
        return None
    if op.name == "getitem":
        idx = op.kw.get("index")
        if not isinstance(idx, tuple) or len(idx) < 3:
            return None
        whole = slice(None, None, None)
        if any(e != whole for e in idx[:2]) or any(e not in (whole, Ellipsis) for e in idx[3:]):
            return None
        i = idx[2]
    elif op.name == "select" and len(op.args) == 3:
        dim, i = op.args[1], op.args[2]
        if dim not in (2, -3):
            return None
    else:
        return None
    if isinstance(i, bool) or not isinstance(i, int) or i not in (0, 1, -1, -2):
        return None
    return i % 2


def _per_row(c) -> bool:
    """A factor P·V carries past it: a number, or a tensor of size 1 along the keys (last axis)."""
    if isinstance(c, (int, float)) and not isinstance(c, bool):
        return True
    v = C.example_value(c) if isinstance(c, fx.Node) else None
    return isinstance(v, torch.Tensor) and v.is_floating_point() and (v.dim() == 0 or (
        isinstance(v.shape[-1], int) and v.shape[-1] == 1))


def _half(node) -> Optional[tuple]:
    """(x, i) when ``node`` is map i of a pair view ``x`` (``x[:, :, i]``)."""
    op = C.canonical(node)
    if op is None or op.name not in ("getitem", "select") or not isinstance(op.kw.get("input"), fx.Node):
        return None
    x = op.kw["input"]
    i = _pair_index(node, x)
    return None if i is None else (x, i)


def _scaled(node, base) -> Optional[tuple]:
    """(term, what ``base`` said of it, scaling node or None) when ``node`` is
    a term ``base`` accepts (a result not None), or one scaled by a factor
    P·V carries past itself (``_per_row``)."""
    said = base(node)
    if said is not None:
        return node, said, None
    op = C.canonical(node)
    if op is None or op.name != "mul" or len(node.users) != 1 or str(node.target).endswith("_"):
        return None
    a, b = op.kw.get("input"), op.kw.get("other")
    for term, factor in ((a, b), (b, a)):
        said = base(term) if isinstance(term, fx.Node) and factor is not term else None
        if said is not None and _per_row(factor):
            return term, said, node
    return None


def _split_heads(x: fx.Node, p: fx.Node) -> bool:
    """``x`` is ``p`` (B, 2H, Lq, Lk) viewed as (B, H, 2, Lq, Lk)."""
    from .analyze.values import _size_eq
    op = C.canonical(x)
    if op is None or op.name not in ("view", "reshape", "unflatten") or op.kw.get("input") is not p:
        return False
    ps, xs = C.shape_of(p), C.shape_of(x)
    if ps is None or xs is None or len(ps) != 4 or len(xs) != 5:
        return False
    # a view keeps the element count, so with the other axes equal, (H, 2) is
    # the head axis split (2 * (h2 // 2) == h2 is more than sympy proves for a
    # dynamic head count)
    return (_pair_axis(op, xs) and _size_eq(xs[0], ps[0])
            and _size_eq(xs[3], ps[2]) and _size_eq(xs[4], ps[3]))


def _pair_axis(op, xs) -> bool:
    """Axis 2 of the view is 2 wide: by its shape, or (dynamic head counts, whose
    shape reads h2 // (h2 // 2)) by the literal 2 the view was given."""
    if isinstance(xs[2], int):
        return xs[2] == 2
    if op.name == "unflatten":
        dim, sizes = (op.args[1:3] + (None, None))[:2] if len(op.args) >= 3 else (None, None)
        return dim == 1 and isinstance(sizes, (tuple, list)) and len(sizes) == 2 and sizes[1] == 2 \
            and not isinstance(sizes[1], bool)
    sizes = op.kw.get("sizes", ())
    return len(sizes) == 5 and isinstance(sizes[2], int) and not isinstance(sizes[2], bool) and sizes[2] == 2


def _plain_product(product: fx.Node, ranks) -> Optional[tuple]:
    """(p, v) when ``product`` is ``p @ v``, a plain matmul of rank in ``ranks``."""
    con = C.contraction(product)
    if con is None or con.addend is not None or len(con.lhs_labels) not in ranks or con.alpha != 1:
        return None
    l, r, o = con.lhs_labels, con.rhs_labels, con.out_labels
    if not (len(r) == len(l) and r == l[:-2] + l[-1] + r[-1] and o == l[:-1] + r[-1]):
        return None
    return con.lhs, con.rhs


def _combined_product(product: fx.Node, ranks, base) -> Optional[tuple]:
    """(comb, v, term a, term b) when ``product`` is ``comb @ v`` (a plain
    matmul of rank in ``ranks``) and ``comb``, read by nothing else, is
    ``a - b`` or ``a + b`` of terms ``_scaled(·, base)`` takes."""
    found = _plain_product(product, ranks)
    if found is None:
        return None
    comb, v = found
    op = C.canonical(comb)
    if op is None or op.name not in ("sub", "add") or len(comb.users) != 1 or str(comb.target).endswith("_") \
            or op.kw.get("alpha", 1) != 1:
        return None
    a, b = op.kw.get("input"), op.kw.get("other")
    terms = [_scaled(t, base) if isinstance(t, fx.Node) else None for t in (a, b)]
    return None if None in terms else (comb, v, *terms)


def _find(product: fx.Node):
    """``(comb, scalings, nodes replaced, build)`` for ``_rewrite`` when
    ``product`` is the combined maps of one softmax's head pairs (see the
    note), else None."""
    found = _combined_product(product, (4,), _half)
    if found is None:
        return None
    comb, v, (ha, (x, ia), sa), (hb, (xb, ib), sb) = found
    if xb is not x or {ia, ib} != {0, 1} or len(ha.users) != 1 or len(hb.users) != 1 \
            or set(x.users) != {ha, hb}:
        return None
    p = C.canonical(x).kw.get("input")
    if not _split_heads(x, p):
        return None
    halves = {ha: ia, hb: ib}
    scales = [t for t in (sa, sb) if t is not None]
    vs = C.shape_of(v)
    if vs is None or len(vs) != 4:
        return None

    def build(make, mapping):
        pv = make(torch.matmul, (p, make(repeat_pairs, (v,))))
        for h, i in halves.items():
            mapping[h] = make(pair_half, (pv, i))
        return [pv]
    return comb, scales, [x] + list(halves), build


def _softmax_output(node, depth: int = 4, dropout: bool = True) -> bool:
    """``node`` is a softmax, behind casts or (with ``dropout``) dropout;
    without, its rows sum to 1 (a dropout scales the kept entries up)."""
    from .analyze.values import _CASTS
    for _ in range(depth):
        op = C.canonical(node)
        if op is None:
            return False
        if op.name == "softmax":
            return True
        if op.name not in _CASTS and not (dropout and op.name == "dropout") \
                or not isinstance(op.kw.get("input"), fx.Node):
            return False
        node = op.kw["input"]
    return False


def _find_two_maps(product: fx.Node):
    """As ``_find`` for ``(softmax(a1) - lam * softmax(a2)) @ v`` (the
    Differential Transformer as its paper's pseudo-code writes it: two
    softmaxes): ``a1 @ v - lam * (a2 @ v)``, two P·V products the matcher
    takes one by one."""
    found = _combined_product(product, (3, 4), lambda n: True if _softmax_output(n) else None)
    if found is None:
        return None
    comb, v, (ma, _, sa), (mb, _, sb) = found
    shape = C.shape_of(comb)
    if ma is mb or len(ma.users) != 1 or len(mb.users) != 1 or C.shape_of(ma) != shape or C.shape_of(mb) != shape:
        return None

    def build(make, mapping):
        for m in (ma, mb):
            mapping[m] = make(torch.matmul, (m, v))
        return [mapping[ma], mapping[mb]]
    return comb, [t for t in (sa, sb) if t is not None], [], build


def _identity_dropout(node) -> Optional[fx.Node]:
    """The input of ``node`` when it is a dropout that keeps everything
    (probability 0, or not training: ``match._dropout_p``), else None."""
    from .analyze.values import Decline
    from .match import _dropout_p
    op = C.canonical(node)
    if op is None or op.name != "dropout" or not isinstance(op.kw.get("input"), fx.Node):
        return None
    try:
        return op.kw["input"] if _dropout_p(op) == 0.0 else None
    except Decline:                 # a probability or flag known only at run time
        return None


def _factor(scaling: Optional[fx.Node], term: fx.Node):
    """The factor ``scaling`` multiplies ``term`` by (1.0 without one)."""
    if scaling is None:
        return 1.0
    op = C.canonical(scaling)
    a, b = op.kw.get("input"), op.kw.get("other")
    return b if a is term else a


def _find_renormalized_maps(product: fx.Node):
    """[Note: a mixture of maps renormalized]  ConViT (timm's ``GPSA``)
    mixes the content softmax with a softmax of positional scores per head
    and divides the mixture by its own row sums before P·V::

        attn = (1 - sigmoid(g)) * softmax(q @ kᵀ * scale) + sigmoid(g) * softmax(pos)
        attn /= attn.sum(dim=-1).unsqueeze(-1)
        out = attn_drop(attn) @ v                  # attn_drop: probability 0

    Each map's rows sum to 1, so the row sums are the factors' combination
    ``a ± b`` (per head; 1 here), and P·V, linear in P, carries the rest:
    ``(a · P1·V ± b · P2·V) / (a ± b)``, two P·V products the matcher takes
    one by one (the positional map, scores the model computes whole, stays
    as written).  Taken where both maps are softmaxes behind casts only (a
    dropout on a map would scale its kept entries: its rows no longer sum to
    1), the factors are ones ``_scaled`` accepts, the division is by the
    mixture's own row sum kept as an axis, and what sits between it and P·V
    is a dropout that keeps everything.  The row sums of 1 are exact where
    eager's are within rounding of 1 (and nan where a map's row is, as eager's)."""
    found = _plain_product(product, (3, 4))
    if found is None:
        return None
    top, v = found
    kept = [top]
    inner = _identity_dropout(top)
    if inner is not None:
        if len(top.users) != 1:
            return None
        top = inner
        kept.append(top)
    parts = C.quotient(top)
    if parts is None or len(top.users) != 1:
        return None
    comb, den = parts
    if not isinstance(comb, fx.Node) or not isinstance(den, fx.Node):
        return None
    shape = C.shape_of(comb)
    if shape is None or C.row_sum_of(den, comb) != len(shape) - 1:
        return None
    # the sum (and the axis it keeps) read by the quotient alone; the mixture by both
    den_nodes = [den]
    while den_nodes[-1] is not comb:
        n = den_nodes[-1]
        if len(n.users) != 1:
            return None
        ins = [a for a in n.all_input_nodes]
        if len(ins) != 1:
            return None
        den_nodes.append(ins[0])
        if len(den_nodes) > 4:
            return None
    den_nodes.pop()
    if set(comb.users) != {top, den_nodes[-1]}:
        return None
    op = C.canonical(comb)
    if op is None or op.name not in ("sub", "add") or str(comb.target).endswith("_") or op.kw.get("alpha", 1) != 1:
        return None
    base = lambda n: True if _softmax_output(n, dropout=False) else None       # noqa: E731
    terms = [_scaled(t, base) if isinstance(t, fx.Node) else None for t in (op.kw.get("input"), op.kw.get("other"))]
    if None in terms:
        return None
    (ma, _, sa), (mb, _, sb) = terms
    if ma is mb or len(ma.users) != 1 or len(mb.users) != 1 or C.shape_of(ma) != shape or C.shape_of(mb) != shape:
        return None
    fa, fb = _factor(sa, ma), _factor(sb, mb)
    sign = operator.sub if op.name == "sub" else operator.add

    def build(make, mapping):
        for m in (ma, mb):
            mapping[m] = make(torch.matmul, (m, v))
        for sc in (sa, sb):
            if sc is not None:
                mapping[sc] = make(None, None, like=sc)
        mixed = make(None, None, like=comb)
        rows = sign(fa, fb) if not isinstance(fa, fx.Node) and not isinstance(fb, fx.Node) \
            else make(sign, (fa, fb))
        return [mapping[ma], mapping[mb]], make(operator.truediv, (mixed, rows))
    replaced = [comb] + [sc for sc in (sa, sb) if sc is not None] + den_nodes + kept
    return None, [], replaced, build


def _fake_value(n: fx.Node, env):
    def val(a):
        return env[a] if a in env else C.example_value(a)
    args, kwargs = map_arg(n.args, val), map_arg(n.kwargs, val)
    if n.op == "call_method":
        return getattr(args[0], n.target)(*args[1:], **kwargs)
    return n.target(*args, **kwargs)


def _normalized_after(top: fx.Node):
    """[Note: probabilities normalized after P·V]  ``(e @ v) / e.sum(-1,
    keepdim=True)`` with ``e = exp(s - m)`` (the normalization deferred past
    the product, as FlashAttention does it).  P·V is linear in P, so it is
    ``(e / e.sum(-1, keepdim=True)) @ v``, a softmax written out that the
    matcher takes; ``restore`` puts the user's nodes back when that site is
    not fused.  When ``top`` is that quotient (or ``pv * (1 / den)``), the
    arguments of ``_rewrite`` after ``product``; else None."""
    parts = C.quotient(top)
    if parts is None:
        return None
    pv, den = parts
    if not isinstance(pv, fx.Node) or not isinstance(den, fx.Node) or len(pv.users) != 1:
        return None
    c = C.contraction(pv)
    if c is None:
        return None
    found = [i for i in (0, 1) if C.canonical(c.operand(i)[0]) is not None
             and C.canonical(c.operand(i)[0]).name == "exp"]
    if len(found) != 1:
        return None
    e, elabels = c.operand(found[0])
    es, ps = C.shape_of(e), C.shape_of(pv)
    # e's last axis (the keys) is the one contracted, and the product keeps
    # e's other axes in e's order with the value axis last: den, one value
    # per row of e, then divides the product's rows
    if es is None or ps is None or len(es) < 2 or len(es) != len(ps) or elabels[-1] != c.contracted \
            or c.out_labels[:-1] != elabels[:-1] or tuple(ps[:-1]) != tuple(es[:-1]):
        return None
    if C.row_sum_of(den, e) != len(es) - 1 or tuple(C.shape_of(den)) != tuple(es[:-1]) + (1,):
        return None

    def build(make, mapping):            # (e / den) @ v: the product copied onto p
        mapping[e] = make(operator.truediv, (e, den))
        return [make(None, None, like=pv)]
    return None, [], [pv], build


def distribute(gm: fx.GraphModule) -> List[Distributed]:
    """Rewrite every combined product of ``gm`` (see the note), and every
    product normalized after P·V ([Note: probabilities normalized after
    P·V]); returns what ``restore`` needs to undo each (the pass restores
    those whose products it did not fuse)."""
    def find(node):
        found = (_normalized_after(node) or _find(node) or _find_two_maps(node)
                 or _find_renormalized_maps(node))
        return None if found is None else (node, *found)
    return rewrite_each(gm, find, _rewrite)


def rewrite_each(gm: fx.GraphModule, find, rewrite) -> list:
    """``rewrite(graph, *found)`` for every node whose ``find(node)`` is not
    None, in graph order; what each returned, if not None.  A form the
    rewrite misreads (it raises) stays as written."""
    out = []
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method"):
            continue
        found = find(node)
        if found is None:
            continue
        try:
            d = rewrite(gm.graph, *found)
        except Exception:  # noqa: BLE001 - a form we misread stays as written
            continue
        if d is not None:
            out.append(d)
    return out


def _rewrite(g: fx.Graph, product, comb, scales, replaced, build) -> Optional[Distributed]:
    """Insert the distributed form of ``product`` (``build`` makes its P·V
    nodes and maps the terms it replaces), then the scalings and the
    combination copied onto them (no ``comb``: the last P·V node stands for
    the product); erase ``replaced``, the scalings, the combination and the
    product (kept, for ``restore``)."""
    want = C.example_value(product)
    mode = getattr(want, "fake_mode", None)
    if mode is None:
        return None
    trace = product.meta.get("stack_trace")
    created, env = [], {}
    mapping: Dict[fx.Node, fx.Node] = {}

    def make(target, args, like=None):
        if like is not None:
            n = g.node_copy(like, lambda a: mapping.get(a, a))
            n.meta.pop("_ac_canon", None)        # the copy's canonical form reads its own arguments
        else:
            n = g.create_node("call_function", target, args)
        return recorded(n, trace, created, env, mode)

    try:
        with g.inserting_before(product):
            products = build(make, mapping)
            out = None
            if isinstance(products, tuple):     # (the P·V nodes, what stands for the product)
                products, out = products
            for s in scales:
                mapping[s] = make(None, None, like=s)
            new_out = out if out is not None else make(None, None, like=comb) if comb is not None else products[-1]
    except Exception:
        erase_all(g, created)
        raise
    if not same_value_kind(g, created, env[new_out], want):
        return None
    order = {n: i for i, n in enumerate(g.nodes)}
    old = sorted(list(replaced) + list(scales) + ([comb] if comb is not None else []) + [product],
                 key=order.__getitem__)
    saved = [(n, n.op, n.target, n.args, n.kwargs, dict(n.meta)) for n in old]
    product.replace_all_uses_with(new_out)
    for n in reversed(old):
        g.erase_node(n)
    return Distributed(products, new_out, created, saved)


def recorded(n: fx.Node, trace, created: List[fx.Node], env: dict, mode) -> fx.Node:
    """A new node ``n`` with the user's stack trace, listed in ``created``,
    and its fake value (computed under ``mode``) in ``env`` and its meta."""
    n.meta["stack_trace"] = trace
    created.append(n)
    with mode:
        env[n] = _fake_value(n, env)
    n.meta["example_value"] = env[n]
    return n


def erase_all(g: fx.Graph, created: List[fx.Node]) -> None:
    for n in reversed(created):
        g.erase_node(n)


def same_value_kind(g: fx.Graph, created: List[fx.Node], got, want) -> bool:
    """Whether the new nodes' result ``got`` has ``want``'s dtype and shape;
    if not, the new nodes are erased."""
    if got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape):
        return True
    erase_all(g, created)
    return False


def restore(gm: fx.GraphModule, d: Distributed) -> None:
    """Put the user's nodes back in place of ``d``'s (its site was not fused)."""
    g = gm.graph
    remap: Dict[fx.Node, fx.Node] = {}
    with g.inserting_before(d.out):
        for old, op, target, args, kwargs, meta in d.saved:
            n = g.create_node(op, target, map_arg(args, lambda a: remap.get(a, a)),
                              map_arg(kwargs, lambda a: remap.get(a, a)))
            n.meta.update(meta)
            n.meta.pop("_ac_canon", None)
            remap[old] = n
    product = remap[d.saved[-1][0]]
    d.out.replace_all_uses_with(product)
    for n in reversed(d.created):
        if not n.users:
            g.erase_node(n)


