"""Match: find every attention site in a dynamo FX graph.

Entry point: ``find_sites(gm, real_values) -> list[SiteMatch | Declined]``.

An attention site is anchored on a softmax (any spelling, canonicalize.py).
From there we walk back through the score chain to the Q·Kᵀ contraction and
forward through casts and dropout to the P·V contraction; then we prove the
two contractions and their layouts are attention (which operand is the query,
which axis is contracted, how heads broadcast — GQA by expand/repeat_interleave
is peeled so the op receives the narrow K/V) and hand the score chain to the
analyzer.  Failing to match is the common path and cheap: a softmax with no
contraction on both sides is not a site at all; a site that is attention but
cannot be expressed exactly becomes ``Declined`` with its reason.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx as fx

from . import canonicalize as C
from .analyze.symbolic import Decline

# ops allowed between the softmax and the P·V contraction
_POST_OPS = {"to", "type", "type_as", "float", "half", "bfloat16", "double", "contiguous",
             "clone", "dropout", "view", "reshape"}
_SEARCH_LIMIT = 64  # nodes walked back from a softmax looking for Q·Kᵀ


@dataclasses.dataclass
class Operand:
    """An input of the op: ``node`` rearranged by ``labels -> target``."""

    node: fx.Node
    labels: str               # labels of node's axes
    target: str               # labels of the op layout [batch.., row, col]
    factor: Any = 1           # scalar peeled off (scales)
    group: int = 1            # GQA: node is the narrow tensor, heads repeat ``group`` times


@dataclasses.dataclass
class SiteMatch:
    softmax: fx.Node
    softmax_in: fx.Node
    softmax_dtype: Optional[torch.dtype]
    qk: C.Contraction
    pv: C.Contraction
    q: Operand
    k: Operand
    v: Operand
    out_labels: str           # labels of the op output [batch.., q, dv] as PV writes them
    op_out_labels: str
    batch_rank: int           # rank of the score batch (1 to 3)
    dropout_p: float
    post_nodes: List[fx.Node]
    chain: set                # nodes from Q·Kᵀ to the softmax input (in-place ops included)
    dtype_users: List[fx.Node]  # ``x.type_as(scores)``: read the scores' dtype only
    heads: Optional[Tuple] = None  # 3-D scores viewed as [B, H, L, L]: (B, H)


@dataclasses.dataclass
class Declined:
    node: fx.Node
    reason: str


def find_sites(gm: fx.GraphModule) -> List[Any]:
    out = []
    for node in list(gm.graph.nodes):
        parts = C.softmax_parts(node)
        if parts is None:
            continue
        try:
            m = match_softmax(node, *parts)
        except Decline as e:
            out.append(Declined(node, str(e)))
            continue
        if m is not None:
            out.append(m)
    return out


def find_qk(x: fx.Node) -> Optional[C.Contraction]:
    """The nearest contraction behind the score chain ending at ``x``."""
    xs = C.shape_of(x)
    seen, frontier = set(), [x]
    while frontier and len(seen) < _SEARCH_LIMIT:
        nxt = []
        for n in frontier:
            if n in seen or not isinstance(n, fx.Node):
                continue
            seen.add(n)
            c = C.contraction(n)
            if c is not None and _is_score_contraction(c, xs):
                return c
            if C.softmax_parts(n) is not None:
                continue  # another attention's probabilities
            nxt.extend(a for a in n.all_input_nodes if C.is_tensor(a))
        frontier = nxt
    return None


def _is_score_contraction(c: C.Contraction, xs) -> bool:
    s = C.shape_of(c.node)
    if s is None or xs is None or len(s) < 2 or len(xs) < 2:
        return False
    node, labels = c.operand(0)
    d = C.shape_of(node)[labels.index(c.contracted)]
    if isinstance(d, int) and d == 1:
        return False  # an outer product (mask building), not Q·Kᵀ
    from .analyze.symbolic import _size_eq
    return _size_eq(s[-1], xs[-1])


def match_softmax(node: fx.Node, x: fx.Node, dim, dtype) -> Optional[SiteMatch]:
    qk = find_qk(x)
    if qk is None:
        return None
    pv, post, p_operand, dropout_p = _follow_probabilities(node)
    rank = len(C.shape_of(x))
    if C.norm_dim(dim, rank) != rank - 1:
        if pv is None:
            return None
        raise Decline(f"softmax over dim {dim}, not the last (key) dim")
    if pv is None:
        if post is None:
            return None
        raise Decline(post)
    return _build(node, x, dtype, qk, pv, post, p_operand, dropout_p)


def _pv_of(user: fx.Node, p: fx.Node) -> Optional[Tuple[C.Contraction, int]]:
    c = C.contraction(user)
    if c is None or c.addend is not None:
        return None
    for i in (0, 1):
        node, labels = c.operand(i)
        if node is p and labels[-1] == c.contracted and node is not c.operand(1 - i)[0]:
            return c, i
    return None


def _follow_probabilities(sm: fx.Node):
    """Walk from the softmax to the P·V contraction.

    Returns ``(pv, post_nodes, p_index, dropout_p)``; ``pv`` None with a
    string in place of ``post_nodes`` when the site is attention but must be
    declined, or with None when the softmax is not an attention at all.
    """
    cur, post, p = sm, [], 0.0
    while True:
        users = list(cur.users)
        if len(users) == 1:
            found = _pv_of(users[0], cur)
            if found is not None:
                return found[0], post, found[1], p
            op = C.canonical(users[0])
            if op is None or op.name not in _POST_OPS or op.kw.get("input") is not cur:
                return None, None, None, None
            if op.name == "dropout":
                p += _dropout_p(op) * (1 - p)  # two dropouts compose
            post.append(users[0])
            cur = users[0]
            continue
        pv = [u for u in users if _pv_of(u, cur) is not None or _leads_to_pv(u)]
        if pv:
            others = [u for u in users if u not in pv] or users[1:]
            return None, f"the probabilities are also used by '{others[0].name}'", None, None
        return None, None, None, None


def _leads_to_pv(u: fx.Node, depth: int = 6) -> bool:
    for _ in range(depth):
        op = C.canonical(u)
        if op is None or op.name not in _POST_OPS or len(u.users) != 1:
            return False
        nxt = next(iter(u.users))
        if _pv_of(nxt, u) is not None:
            return True
        u = nxt
    return False


def _dropout_p(op: C.COp) -> float:
    training = op.kw.get("training", True)
    if isinstance(training, fx.Node):
        raise Decline("dropout's training flag is a runtime value")
    if not training:
        return 0.0
    p = op.kw.get("p", 0.5)
    if isinstance(p, fx.Node):
        raise Decline("the dropout probability is a runtime value")
    if not 0.0 <= float(p) < 1.0:
        raise Decline(f"dropout probability {p} outside [0, 1)")
    return float(p)


# ---- operands ----------------------------------------------------------------

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


def gqa_narrow(node: fx.Node) -> Optional[Tuple[fx.Node, int]]:
    """If ``node`` [B, H, L, D] repeats each of Hkv heads ``G`` times
    (``repeat_interleave(G, dim=1)``, or ``x[:, :, None].expand(B, Hkv, G, L, D)
    .reshape(B, H, L, D)`` as in HF ``repeat_kv``), the narrow tensor and G."""
    op = C.canonical(node)
    shape = C.shape_of(node)
    if op is None or shape is None or len(shape) != 4:
        return None
    if op.name == "repeat_interleave":
        g, dim, x = op.kw.get("repeats"), op.kw.get("dim"), op.kw["input"]
        if isinstance(g, int) and dim in (1, -3) and len(C.shape_of(x)) == 4:
            return x, g
        return None
    if op.name in ("reshape", "view", "flatten"):
        e = C.canonical(op.kw["input"])
        es = C.shape_of(op.kw["input"])
        if e is None or e.name != "expand" or len(es) != 5:
            return None
        if op.name == "flatten" and (op.kw.get("start_dim"), op.kw.get("end_dim")) not in ((1, 2),):
            return None
        u = C.canonical(e.kw["input"])
        us = C.shape_of(e.kw["input"])
        if u is None or len(us) != 5 or not (isinstance(us[2], int) and us[2] == 1):
            return None
        if u.name == "unsqueeze" and C.norm_dim(u.kw["dim"], 5) == 2:
            x = u.kw["input"]
        elif u.name == "getitem" and _is_none_at_2(u.kw["index"]):
            x = u.kw["input"]
        else:
            return None
        g = es[2]
        return (x, g) if isinstance(g, int) else None
    if op.name == "expand":
        x = op.kw["input"]
        xs = C.shape_of(x)
        if len(xs) == 4 and isinstance(xs[1], int) and xs[1] == 1 and isinstance(shape[1], int):
            return x, shape[1]
    return None


def _is_none_at_2(idx) -> bool:
    if not isinstance(idx, tuple):
        return False
    full = all(isinstance(i, slice) and i == slice(None) for i in idx[:2])
    return full and len(idx) >= 3 and idx[2] is None and all(
        (isinstance(i, slice) and i == slice(None)) or i is Ellipsis for i in idx[3:])


def _operand(node: fx.Node, labels: str, target: str, allow_factor=True) -> Operand:
    base, blabels, factor = peel(node, labels)
    if not allow_factor and not (isinstance(factor, int) and factor == 1):
        base, blabels, factor = node, labels, 1
    op = Operand(base, blabels, target, factor)
    if len(target) == 4 and blabels == target:
        narrow = gqa_narrow(base)
        if narrow is not None:
            op.node, op.group = narrow
    return op


def _widen(op: Operand, wide: fx.Node) -> None:
    op.node, op.group = wide, 1


def _sizes(op: Operand):
    """Sizes of the operand in its target layout (1 where it broadcasts)."""
    sizes = dict(zip(op.labels, C.shape_of(op.node)))
    return [sizes.get(lab, 1) for lab in op.target]


def _check_layouts(q: Operand, k: Operand, v: Operand, score_shape, wide_k, wide_v) -> None:
    """The op computes out[b, h] from q[b, h], k[b|0, h // G], v[b|0, h // G]:
    q must not broadcast, and k and v must share their head count."""
    from .analyze.symbolic import _size_eq, is_one
    qs = _sizes(q)
    if not all(_size_eq(a, b) for a, b in zip(qs[:-2], score_shape[:-2])):
        raise Decline("the query broadcasts over a batch axis")
    ks, vs = _sizes(k), _sizes(v)
    if len(ks) == 4 and not _size_eq(ks[1], vs[1]):
        if k.group > 1:
            _widen(k, wide_k)
        if v.group > 1:
            _widen(v, wide_v)
        ks, vs = _sizes(k), _sizes(v)
    for a, b in zip(ks[:-2], vs[:-2]):
        if not _size_eq(a, b):
            raise Decline("key and value differ in their batch or head axes")
    if ks[0] is not None and not (is_one(ks[0]) or _size_eq(ks[0], score_shape[0])):
        raise Decline("key batch neither matches the query batch nor broadcasts")


_MUTATING_FUNCS = {"setitem", "index_put_", "copy_", "fill_", "zero_"}
_INPLACE_OPERATORS = {"setitem", "iadd", "isub", "imul", "itruediv", "ifloordiv", "imod",
                      "ipow", "iand", "ior", "ixor", "ilshift", "irshift", "imatmul"}


def mutated_between(node: fx.Node, start: fx.Node, end: fx.Node) -> bool:
    """Whether an in-place op writes ``node`` after ``start`` and before ``end``."""
    order = {n: i for i, n in enumerate(start.graph.nodes)}
    lo, hi = order[start], order[end]
    return any(lo < order[u] < hi for u in mutating_users(node))


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
        if name in _MUTATING_FUNCS or (name.endswith("_") and not name.startswith("_")):
            out.append(u)
    return out


def _build(sm, x, dtype, qk: C.Contraction, pv: C.Contraction, post, p_index, dropout_p):
    o = qk.out_labels
    if len(o) not in (3, 4, 5):
        raise Decline(f"scores of rank {len(o)} (3-D to 5-D supported)")
    kl, ql, batch, d = o[-1], o[-2], o[:-2], qk.contracted
    sides = {lab: i for i in (0, 1) for lab in qk.operand(i)[1] if lab in (kl, ql)}
    if sides.get(kl) == sides.get(ql):
        raise Decline("query and key axes come from the same operand")
    qn, qlabels = qk.operand(sides[ql])
    kn, klabels = qk.operand(sides[kl])
    if any(lab not in batch + ql + d for lab in qlabels) or any(lab not in batch + kl + d for lab in klabels):
        raise Decline("Q·Kᵀ with an extra summed axis")
    q = _operand(qn, qlabels, batch + ql + d)
    k = _operand(kn, klabels, batch + kl + d)
    if k.group > 1 and q.group > 1:
        raise Decline("both query and key are repeated")
    pn, plabels = pv.operand(p_index)
    vn, vlabels = pv.operand(1 - p_index)
    if not _same_lead(C.shape_of(pn)[:-2], C.shape_of(qk.node)[:-2]):
        raise Decline("the probabilities are reshaped across the batch before P·V")
    dv = [lab for lab in vlabels if lab not in plabels]
    if len(dv) != 1:
        raise Decline("P·V is not a contraction over the key axis")
    v = _operand(vn, vlabels, plabels[:-2] + plabels[-1] + dv[0], allow_factor=False)
    wide_k, wide_v = (peel(kn, klabels)[0], peel(vn, vlabels)[0])
    _check_layouts(q, k, v, C.shape_of(qk.node), wide_k, wide_v)
    for operand in (q, k, v):
        if mutated_between(operand.node, qk.node, pv.node):
            raise Decline("an input of the attention is modified in place inside the site")
    op_out = plabels[:-2] + plabels[-2] + dv[0]
    if sorted(pv.out_labels) != sorted(op_out):
        raise Decline("P·V output has an unexpected layout")
    for operand, name in ((q, "query"), (k, "key"), (v, "value")):
        if not C.example_value(operand.node).dtype.is_floating_point:
            raise Decline(f"{name} is not a floating-point tensor")
    chain = chain_nodes(qk.node, x, sm)
    dtype_users = _check_chain_users(chain, _softmax_body(x, sm))
    heads = _heads_view(chain, C.shape_of(qk.node)) if len(batch) == 1 else None
    if len(batch) == 3:
        _check_grouped(q, k, v, C.shape_of(qk.node))
    return SiteMatch(sm, x, dtype, qk, pv, q, k, v, pv.out_labels, op_out, len(batch),
                     dropout_p, post, chain, dtype_users, heads)


def chain_nodes(score: fx.Node, softmax_in: fx.Node, softmax: fx.Node) -> set:
    """Nodes on a path from the contraction to the softmax input, plus the
    in-place ops on them that run before the softmax."""
    fwd, stack = set(), [score]
    while stack:
        n = stack.pop()
        if n not in fwd:
            fwd.add(n)
            if n is not softmax_in:
                stack.extend(n.users)
    back, stack = set(), [softmax_in]
    while stack:
        n = stack.pop()
        if n in back or n not in fwd:
            continue
        back.add(n)
        stack.extend(n.all_input_nodes)
    order = {m: i for i, m in enumerate(score.graph.nodes)}
    grew = True
    while grew:
        grew = False
        for n in list(back):
            for m in mutating_users(n):
                if m not in back and order[m] < order[softmax]:
                    back.add(m)
                    grew = True
    if softmax_in not in back:
        raise Decline("softmax input does not come from the contraction")
    return back


def _softmax_body(x: fx.Node, sm: fx.Node) -> set:
    """The nodes of a (possibly decomposed) softmax from its input to ``sm``."""
    body, stack = {sm}, [sm]
    while stack:
        n = stack.pop()
        for a in n.all_input_nodes:
            if a is not x and a not in body and _reaches(x, a):
                body.add(a)
                stack.append(a)
    return body


def _reaches(x: fx.Node, a: fx.Node, depth: int = 6) -> bool:
    if depth == 0:
        return False
    return any(i is x or _reaches(x, i, depth - 1) for i in a.all_input_nodes)


def _check_chain_users(chain: set, softmax_body: set) -> List[fx.Node]:
    """Every user of a score must be in the chain (or the softmax); a
    ``y.type_as(scores)`` only reads the dtype and is returned to be rewired."""
    dtype_users = []
    for n in chain:
        for u in n.users:
            if u in chain or u in softmax_body:
                continue
            op = C.canonical(u)
            if op is not None and op.name == "type_as" and op.kw.get("other") is n \
                    and op.kw.get("input") is not n:
                dtype_users.append(u)
                continue
            raise Decline(f"the scores are also used by '{u.name}'")
    return dtype_users


def _heads_view(chain: set, score_shape) -> Optional[Tuple]:
    """For 3-D scores [B*H, Lq, Lk]: the (B, H) of a 4-D view of them in the
    chain, so that tensors indexed per batch or per head keep their meaning."""
    from .analyze.symbolic import _size_eq, _sym
    for n in chain:
        s = C.shape_of(n)
        if s is not None and len(s) == 4 and isinstance(s[1], int):
            if _size_eq(_sym(s[0]) * s[1], score_shape[0]):
                return (s[0], s[1])
    return None


def _check_grouped(q: Operand, k: Operand, v: Operand, score_shape) -> None:
    """5-D scores [B, Hkv, G, Lq, Lk] merge (Hkv, G) into the op's heads:
    query head h reads key head h // G, so keys may only drop the G axis."""
    from .analyze.symbolic import _size_eq, is_one
    g = score_shape[2]
    if not isinstance(g, int):
        raise Decline("grouped heads with a dynamic group size")
    for op in (k, v):
        sizes = _sizes(op)
        if not (is_one(sizes[2]) or _size_eq(sizes[2], g)) or not _size_eq(sizes[1], score_shape[1]):
            raise Decline("grouped heads whose keys do not follow the groups")


def _same_lead(a, b) -> bool:
    from .analyze.symbolic import _same_sizes
    return _same_sizes(tuple(a), tuple(b))
