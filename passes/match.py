"""Match: find every attention site in a dynamo FX graph.

Entry point: ``find_sites(gm) -> list[SiteMatch | Declined]``.

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
import math
import operator
from typing import Any, Iterator, List, Optional, Tuple

import torch
import torch.fx as fx

from . import canonicalize as C
from .analyze.values import _CASTS, Decline
from .operands import (Operand, _check_grouped, _check_layouts, _operand, mutated_between,
                       mutating_users, peel, storage_root)

# ops allowed between the softmax and the P·V contraction
_POST_OPS = {"to", "type", "type_as", "float", "half", "bfloat16", "double", "contiguous",
             "clone", "dropout", "view", "reshape"}
_SEARCH_LIMIT = 64  # nodes walked back from a softmax looking for Q·Kᵀ
_MAX_QK_TRIES = 4  # score-shaped contractions tried as Q·Kᵀ, nearest first


@dataclasses.dataclass
class SiteMatch:
    softmax: fx.Node
    softmax_in: fx.Node
    qk: C.Contraction
    pv: C.Contraction
    q: Operand
    k: Operand
    v: Operand
    out_labels: str           # labels of the op output [batch.., q, dv] as PV writes them
    op_out_labels: str
    batch_rank: int           # rank of the score batch (1 to 3)
    dropout_p: float
    chain: set                # nodes from Q·Kᵀ to the softmax input (in-place ops included)
    dtype_users: List[fx.Node]  # ``x.type_as(scores)``, ``full_like(scores, v)``: dtype or shape only
    heads: Optional[Tuple] = None  # 3-D scores viewed as [B, H, L, L]: (B, H)
    row_scales: List["RowScale"] = dataclasses.field(default_factory=list)
    # attention sinks: a (B, H, Lq, 1) logit beside the keys, or a number (a
    # constant logit: softmax plus one is a sink of 0)
    sink: Any = None
    lse_users: List[fx.Node] = dataclasses.field(default_factory=list)   # logsumexp(scores, -1): the op's lse
    zero_empty_rows: bool = False    # nan_to_num(P): a row that keeps no key gives 0, not nan
    # ``P.masked_fill(m, 0)`` with the scores' own mask m ([Note: probabilities zeroed by the mask])
    zero_masks: List[fx.Node] = dataclasses.field(default_factory=list)
    # ``exp2(y) / Σ exp2(y)``: the softmax of y · ln 2 (canonicalize.base2_softmax_parts)
    base2: bool = False

    @property
    def reads_lse(self) -> bool:
        """Whether the rewrite reads the op's lse (sinks, a logsumexp of the
        scores, nan_to_num(P)): SDPA, which gives none, cannot stand in."""
        return self.sink is not None or bool(self.lse_users) or self.zero_empty_rows


@dataclasses.dataclass(frozen=True)
class RowScale:
    """A factor of the probabilities that is one value per row (``p *
    head_mask``): it moves past P·V onto the output (``layout.scale_rows``).
    ``shapes``: (shape where it multiplies, shape of P at P·V) when views
    between the two change the leading axes, else None; ``axes``: for each
    axis of the site's output, the axis of P's row index it reads (None: the
    value axis)."""
    factor: Any               # fx.Node or a number; "zero"/"keep": a boolean tensor
    div: bool
    shapes: Optional[Tuple[Tuple[int, ...], Tuple[int, ...]]]
    axes: Tuple[Optional[int], ...]
    # "scale" (times, or over, the factor); "zero": rows where the factor is
    # True set to 0; "keep": rows where it is False set to 0
    kind: str = "scale"


@dataclasses.dataclass
class Declined:
    node: fx.Node
    reason: str


def find_sites(gm: fx.GraphModule) -> List[Any]:
    out = []
    for node in list(gm.graph.nodes):
        if _custom_function_softmax(gm, node):
            out.append(Declined(node, "the softmax runs inside a custom autograd.Function (XSoftmax-style), "
                                      "whose backward is the user's own: left as written"))
            continue
        parts = C.softmax_parts(node)
        sink, base2 = None, False
        if parts is None:
            parts = _explicit_sink_softmax(node)
            if parts is not None:
                parts, sink = parts[:3], parts[3]
            else:
                parts = C.base2_softmax_parts(node)
                if parts is None:
                    continue
                base2 = True
        try:
            m = match_softmax(node, *parts, sink=sink)
        except Decline as e:
            out.append(Declined(node, str(e)))
            continue
        if m is not None and base2:
            m.base2 = True
        if m is not None:
            out.append(m)
        elif _unfollowed_attention(node, parts[0]):
            out.append(Declined(node, "attention the matcher cannot follow: the scores come from a product of "
                                      "two activations and the probabilities reach another product, through "
                                      "ops between that it does not read (chunked or diagonal layouts, "
                                      "slice assignments, gathers): left as written"))
    return out


def _unfollowed_attention(sm: fx.Node, x: fx.Node, depth: int = 16, limit: int = 256) -> bool:
    """A softmax the matcher found no site in (Longformer's sliding chunks:
    scores written into a diagonal layout by slice assignment) that still
    reads as attention: its input is computed, within ``depth`` ops (the
    in-place writes into a tensor included), from a contraction of two
    activations (not a layer's weight: a router's ``x @ W`` is no attention),
    and its output reaches a contraction.  Reported as declined rather than
    passed unseen; nothing is rewritten."""
    if _reaches_product(sm, depth) is None:
        return False
    seen, frontier = {x}, [x]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            c = C.contraction(n)
            if c is not None:
                if not _is_weight(c.operand(0)[0]) and not _is_weight(c.operand(1)[0]):
                    return True
                continue        # a product with a weight: this path is a layer, not scores
            if any(_is_weight(a) for a in n.all_input_nodes):
                continue        # a layer (linear, norm): what lies behind it is another block
            for m in [*n.all_input_nodes, *mutating_users(n)]:
                if m not in seen and m is not sm:
                    seen.add(m)
                    nxt.append(m)
        if len(seen) > limit:
            return False
        frontier = nxt
    return False


def _is_weight(node: fx.Node) -> bool:
    """Whether ``node`` is a module's parameter or buffer, through views and casts."""
    root = storage_root(node, casts=True)
    return root.op == "get_attr" or root.op == "placeholder" and "_parameters_" in root.name


def _custom_function_softmax(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A custom ``autograd.Function`` (dynamo's ``autograd_function_apply``)
    whose forward computes a softmax and whose output feeds a contraction:
    attention whose probabilities come from the user's own function (SEW-D's
    and DeBERTa's XSoftmax under autograd), reported rather than passed unseen."""
    if node.op != "call_function" or getattr(node.target, "__name__", "") != "autograd_function_apply":
        return False
    body = node.args[0] if node.args else None
    body = getattr(gm, body.target, None) if isinstance(body, fx.Node) and body.op == "get_attr" else None
    if not isinstance(body, fx.GraphModule) or not any(C.softmax_parts(n) for n in body.graph.nodes):
        return False
    return _reaches_product(node) is not None


def find_qk(x: fx.Node) -> Optional[C.Contraction]:
    """The nearest contraction behind the score chain ending at ``x``."""
    return next(qk_candidates(x), None)


def qk_candidates(x: fx.Node) -> Iterator[C.Contraction]:
    """Score-shaped contractions behind the score chain ending at ``x``,
    nearest first (a relative-position term ``einsum(q, rel_k)`` added before
    Q·Kᵀ comes first: the caller takes the first that reads as Q·Kᵀ)."""
    xs = C.shape_of(x)
    seen, frontier = set(), [x]
    while frontier and len(seen) < _SEARCH_LIMIT:
        nxt = []
        for n in frontier:
            if n in seen or not isinstance(n, fx.Node):
                continue
            seen.add(n)
            c = C.contraction(n) or _transposed_contraction(n)
            if c is not None and _is_score_contraction(c, xs):
                yield c
            if C.softmax_parts(n) is not None:
                continue  # another attention's probabilities
            nxt.extend(a for a in n.all_input_nodes if C.is_tensor(a))
        frontier = nxt


def _transposed_contraction(n: fx.Node) -> Optional[C.Contraction]:
    """``(k @ qᵀ).transpose(-1, -2)``: the contraction read through a swap of
    its last two axes (its only use), as one contraction whose output labels
    are swapped."""
    op = C.canonical(n)
    if op is None or op.name not in ("transpose", "permute") or not isinstance(op.kw.get("input"), fx.Node):
        return None
    inner = op.kw["input"]
    c = C.contraction(inner)
    if c is None or c.addend is not None or len(inner.users) != 1 or mutating_users(inner) \
            or not _swaps_last_two(op, len(c.out_labels)):
        return None
    o = c.out_labels
    return dataclasses.replace(c, node=n, out_labels=o[:-2] + o[-1] + o[-2])


_FLOAT_CASTS = _CASTS - {"long", "int", "bool"}


def _sink_parts(sm: fx.Node, x: fx.Node):
    """Attention sinks (GPT-OSS): the softmax runs over ``cat([s, sink], -1)``
    (behind a row-max shift of that cat) and its only use drops the sink's
    column (``p[..., :-1]``), maybe behind casts.  The sink may come first
    (x-transformers: ``cat((sink, s), -1)``, then ``p[..., 1:]``).  Then
    ``(s, sink, the slice)``, else None.  The site is s's attention with the
    sink in the denominator: out = softmax(s)·V ⊙ sigmoid(lse(s) - sink)
    (layout.with_sink)."""
    cat = _behind_shift_and_casts(x)
    if cat is None or len(sm.users) != 1:
        return None
    shape = C.shape_of(cat)
    padded = _last_axis_pad(cat)
    if padded is not None:      # F.pad(s, (0, 1)): a column of a constant logit
        s, sink, first = padded
    else:
        parts = _last_axis_cat(cat)
        if parts is None or len(parts) != 2:
            return None
        widths = [C.shape_of(t)[-1] if C.shape_of(t) else None for t in parts]
        if widths[1] == 1:
            (s, sink), first = parts, False
        elif widths[0] == 1:
            (sink, s), first = parts, True
        else:
            return None
        fill = _constant_fill(sink)
        sink = sink if fill is None else fill
    s_shape = C.shape_of(s)
    if not isinstance(s_shape[-1], int):
        return None
    prev, sl = sm, next(iter(sm.users))
    sop = C.canonical(sl)
    while sop is not None and sop.name in _FLOAT_CASTS and sop.kw.get("input") is prev and len(sl.users) == 1:
        prev, sl = sl, next(iter(sl.users))          # p.type(dtype)[..., 1:]
        sop = C.canonical(sl)
    if sop is None or sop.name != "getitem" or sop.kw.get("input") is not prev:
        return None
    index = sop.kw.get("index")
    index = index if isinstance(index, tuple) else (index,)
    last = index[-1] if index else None
    full = slice(None, None, None)
    lead_ok = all(i is Ellipsis or i == full for i in index[:-1]) and \
        (Ellipsis in index or len(index) == len(shape))
    if not (lead_ok and isinstance(last, slice) and last.step in (None, 1)):
        return None
    n = s_shape[-1]
    kept = (last.start == 1 and last.stop in (None, n + 1)) if first else \
        (last.start in (None, 0) and last.stop in (-1, n))
    return (s, sink, sl) if kept else None


def _constant_fill(n: fx.Node) -> Optional[float]:
    """The value of a tensor that holds one number everywhere
    (``zeros_like(s[..., :1])``, ``s.new_zeros(...)``, ``torch.full(...)``,
    maybe expanded, reshaped or cast), else None: a constant sink logit, read
    from the scores' shape alone."""
    for _ in range(6):
        op = C.canonical(n)
        if op is None:
            return None
        if op.name in C.FILLS:
            v = C.fill_value(op)
            return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
        if op.name not in _FLOAT_CASTS | {"expand", "expand_as", "view", "reshape", "contiguous", "clone"} \
                or not isinstance(op.kw.get("input"), fx.Node):
            return None
        n = op.kw["input"]
    return None


def _last_axis_pad(n: fx.Node):
    """``F.pad(s, (0, 1), value=c)`` (or ``(1, 0)``): one column of the
    constant ``c`` after (before) the last axis, as ``(s, c, first)``."""
    op = C.canonical(n)
    if op is None or op.name not in ("pad", "constant_pad_nd"):
        return None
    pad, mode = op.kw.get("pad"), op.kw.get("mode", "constant")
    value = op.kw.get("value")
    value = 0.0 if value is None else value
    if mode not in (None, "constant") or not isinstance(pad, (list, tuple)) or len(pad) != 2 \
            or not isinstance(op.kw.get("input"), fx.Node) or not isinstance(value, (int, float)) \
            or isinstance(value, bool):
        return None
    if tuple(pad) == (0, 1):
        return op.kw["input"], float(value), False
    if tuple(pad) == (1, 0):
        return op.kw["input"], float(value), True
    return None


def _explicit_sink_softmax(node: fx.Node):
    """Softmax plus one, written out (``e / (exp(-m) + e.sum(-1, keepdim=True))``
    with ``e = exp(s - m)``, ``m`` any value per row such as a clamped row
    max; ``e / (1 + e.sum(...))`` with ``e = exp(s)``), or with a logit ``t``
    in the denominator (``exp(t - m)``, ``exp(t)``): ``(s, dim, None, t)``,
    the softmax over the keys and one more logit ``t`` (0 for plus one)
    whose column is not kept.  Whatever ``m`` is, it cancels: ``exp(s - m) /
    (Σ exp(s - m) + exp(t - m)) = exp(s) / (Σ exp(s) + exp(t))``.  Else None."""
    parts = C.quotient(node)
    if parts is None:
        return None
    num, den = parts
    e, d = C.canonical(num), C.canonical(den)
    if e is None or d is None or e.name != "exp" or d.name != "add" or d.kw.get("alpha", 1) != 1:
        return None
    terms = [d.kw.get("input"), d.kw.get("other")]
    y = e.kw.get("input")
    rank = len(C.shape_of(num) or ())
    sums = [(i, C.row_sum_of(t, num)) for i, t in enumerate(terms) if isinstance(t, fx.Node)]
    sums = [(i, dim) for i, dim in sums if dim is not None]
    if len(sums) != 1 or rank < 2 or not isinstance(y, fx.Node):
        return None
    (i, dim), = sums
    extra = terms[1 - i]
    if dim != rank - 1:
        return None
    yop = C.canonical(y)
    shift = None                 # m, when e = exp(s - m) with m one value per row
    if yop is not None and yop.name == "sub" and yop.kw.get("alpha", 1) == 1 \
            and isinstance(yop.kw.get("other"), fx.Node):
        ms = C.shape_of(yop.kw["other"])
        if ms is not None and len(ms) == rank and ms[-1] == 1 and isinstance(yop.kw.get("input"), fx.Node):
            shift = yop.kw["other"]
    if shift is not None:
        s = yop.kw["input"]
        ex = C.canonical(extra) if isinstance(extra, fx.Node) else None
        if ex is None or ex.name != "exp" or not isinstance(ex.kw.get("input"), fx.Node):
            return None
        z = C.canonical(ex.kw["input"])
        if z is None:
            return None
        if z.name == "neg" and z.kw.get("input") is shift:
            return s, dim, None, 0.0                       # exp(-m)
        if z.name == "sub" and z.kw.get("alpha", 1) == 1 and z.kw.get("other") is shift:
            t = z.kw.get("input")                          # exp(t - m)
        elif z.name == "rsub" and z.kw.get("alpha", 1) == 1 and z.kw.get("input") is shift:
            t = z.kw.get("other")                          # torch.rsub(m, t)
        else:
            return None
    else:
        s = y
        if isinstance(extra, (int, float)) and not isinstance(extra, bool):
            if extra <= 0:
                return None
            return s, dim, None, math.log(extra)           # 1 + Σ e: a logit of 0
        ex = C.canonical(extra) if isinstance(extra, fx.Node) else None
        if ex is None or ex.name != "exp":
            return None
        t = ex.kw.get("input")                             # exp(t) + Σ exp(s)
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        return s, dim, None, float(t)
    if not isinstance(t, fx.Node):
        return None
    fill = _constant_fill(t)
    if fill is not None:
        return s, dim, None, fill
    ts = C.shape_of(t)
    if ts is None or not 0 < len(ts) <= rank or ts[-1] != 1:
        return None
    return s, dim, None, t


def _concatenated_scores(x: fx.Node) -> bool:
    """Whether ``x`` (behind a row-max shift) concatenates, along the last
    axis, scores made by a contraction with other logits (GPT-OSS's sinks:
    ``softmax(cat([scores, sinks], -1))[..., :-1]``)."""
    node = x
    for _ in range(6):          # behind a mask or bias added to the concatenation (PEGASUS-X)
        node = _behind_shift_and_casts(node)
        parts = _last_axis_cat(node)
        if parts is not None:
            return any(next(qk_candidates(t), None) is not None for t in parts)
        op = C.canonical(node)
        if op is None or op.name not in ("add", "sub", "mul", "div", "masked_fill") \
                or not isinstance(op.kw.get("input"), fx.Node) or C.shape_of(op.kw["input"]) != C.shape_of(node):
            return False
        node = op.kw["input"]
    return False


_WIDTH = {torch.float16: 16, torch.bfloat16: 16, torch.float32: 32, torch.float64: 64}


def _behind_shift_and_casts(x: fx.Node) -> Optional[fx.Node]:
    """The softmax input ``x`` with a row-max shift and casts to a dtype at
    least as wide peeled (Inkling2's ``cat([scores, sinks], -1).float()``):
    the node they apply to; None when a shift is by a max over another axis
    (not one value per row)."""
    node = x
    for _ in range(4):
        shifted = C.row_max_shift(node)
        rank = len(C.shape_of(node) or ())
        if shifted is not None:
            if shifted[1] is not shifted[0] or not isinstance(shifted[2], int) \
                    or C.norm_dim(shifted[2], rank) != rank - 1:
                return None
            node = shifted[0]
            continue
        op = C.canonical(node)
        src = op.kw.get("input") if op is not None and op.name in _POST_OPS - {"dropout", "view", "reshape"} \
            else None
        if not isinstance(src, fx.Node):
            break
        a, b = getattr(C.example_value(src), "dtype", None), getattr(C.example_value(node), "dtype", None)
        if a not in _WIDTH or b not in _WIDTH or _WIDTH[b] < _WIDTH[a] or C.shape_of(src) != C.shape_of(node):
            break
        node = src
    return node


def _last_axis_cat(n: Any) -> Optional[List[fx.Node]]:
    """The tensors ``n = torch.cat(tensors, dim)`` joins along its last axis, or None."""
    op = C.canonical(n)
    if op is None or op.name != "cat":
        return None
    parts = n.args[0] if n.args else n.kwargs.get("tensors")
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
    rank = len(C.shape_of(n) or ())
    if not isinstance(parts, (list, tuple)) or not isinstance(dim, int) or rank < 2 \
            or C.norm_dim(dim, rank) != rank - 1 or not all(isinstance(t, fx.Node) for t in parts):
        return None
    return list(parts)


def _scores_from_outside(x: fx.Node) -> bool:
    """Whether ``x`` is (an elementwise function of) a graph input shaped like
    the scores: the Q·Kᵀ of this softmax ran in an earlier graph."""
    from .analyze.values import _size_eq
    xs = C.shape_of(x)
    seen, frontier = set(), [x]
    while frontier and len(seen) < 16:
        n = frontier.pop()
        if n in seen:
            continue
        seen.add(n)
        s = C.shape_of(n)
        # a parameter is a learned map (Synthesizer's random attention), not scores
        if n.op == "placeholder" and s is not None and len(s) >= 3 and \
                _size_eq(s[-1], xs[-1]) and _size_eq(s[-2], xs[-2]) and \
                not isinstance(C.example_value(n), torch.nn.Parameter):
            return True
        frontier.extend(a for a in n.all_input_nodes if C.is_tensor(a))
    return False


def _is_score_contraction(c: C.Contraction, xs) -> bool:
    s = C.shape_of(c.node)
    if s is None or xs is None or len(s) < 2 or len(xs) < 2:
        return False
    node, labels = c.operand(0)
    d = C.shape_of(node)[labels.index(c.contracted)]
    if isinstance(d, int) and d == 1:
        return False  # an outer product (mask building), not Q·Kᵀ
    from .analyze.values import _size_eq
    return _size_eq(s[-1], xs[-1])


def match_softmax(node: fx.Node, x: fx.Node, dim, dtype, sink=None) -> Optional[SiteMatch]:
    """The site of the softmax ``node`` over ``x`` along ``dim``, or None;
    ``sink``: the extra logit of a softmax written out with it in the
    denominator (_explicit_sink_softmax)."""
    start = node
    if sink is None:
        sink = _sink_parts(node, x)
        if sink is not None:        # GPT-OSS: x = cat([scores, sink]); P = softmax(x)[..., :-1]
            x, sink, start = sink
    candidates = qk_candidates(x)
    qk = next(candidates, None)
    if qk is None:
        if _scores_from_outside(x) and _follow_probabilities(node)[0] is not None:
            raise Decline("the scores come from outside this graph "
                          "(a graph break splits Q·Kᵀ from the softmax)")
        if _concatenated_scores(x):
            pv, post = _follow_probabilities(node)[:2]
            if pv is not None or isinstance(post, str) or _reaches_product(node) is not None:
                raise Decline("the softmax runs over the scores concatenated with other logits along "
                              "the key axis (sink columns other than one, local and global blocks)")
        return None
    pv, post, p_operand, dropout_p, swapped = _follow_probabilities(node, start)
    rank = len(C.shape_of(x))
    if C.norm_dim(dim, rank) != rank - 1:
        if pv is None:
            # a column of logits (ConvBERT's span kernel, (N, K, 1)) is no score matrix
            if _contracted_along(node, C.norm_dim(dim, rank)) and C.shape_of(x)[-1] != 1:
                others = [u for u in node.users if not _contracted_along_node(u, node)]
                if others:
                    raise Decline(f"the probabilities are also used by '{others[0].name}' (scores with the "
                                  f"key axis at softmax dim {dim}, not the last)")
                # relayout.py took every such site whose ops between are elementwise
                raise Decline(f"the key axis (softmax dim {dim}) is not the scores' last axis, and the scores "
                              "cannot be relaid out with the keys last (the ops between Q·Kᵀ and the softmax "
                              "are not all elementwise, or one of their values is read elsewhere)")
            return None
        raise Decline(f"softmax over dim {dim}, not the last (key) dim")
    if pv is None:
        if post is None:
            product = _reaches_product(node)
            if product is None:
                return None
            raise Decline(f"the probabilities reach the product '{product.name}' through ops "
                          "that cannot be expressed (heads mixed, maps combined)")
        raise Decline(post)
    first = None
    for _ in range(_MAX_QK_TRIES):
        try:
            return _build(node, x, qk, pv, p_operand, dropout_p, swapped, post, sink, start)
        except Decline as e:
            first = first or e
        qk = next(candidates, None)
        if qk is None:
            break
    raise first


_SHAPE_ONLY = {name for name in C.FILLS if name.endswith("_like") or name.startswith("new_")}


def _shape_only(user: fx.Node, n: fx.Node) -> bool:
    """Whether ``user`` reads only ``n``'s shape, dtype and device."""
    op = C.canonical(user)
    if op is None or op.name not in _SHAPE_ONLY or op.kw.get("input") is not n:
        return False
    others = [a for a in user.all_input_nodes if a is not n]
    return all(not isinstance(C.example_value(a), torch.Tensor) for a in others)


def _like_zero_fill(user: fx.Node, n: fx.Node) -> bool:
    """``torch.zeros_like(n)`` / ``torch.full_like(n, 0)``: zeros of ``n``'s
    shape, dtype and device, read from nothing else."""
    op = C.canonical(user)
    return op is not None and op.name in ("zeros_like", "full_like") and _shape_only(user, n) \
        and C.fill_value(op) == 0 and not isinstance(C.fill_value(op), bool)


def _dtype_only(user: fx.Node, n: fx.Node) -> bool:
    """``y.type_as(n)`` of another tensor ``y``: reads only ``n``'s dtype (the
    Differential Transformer's causal mask ``...type_as(scores)``)."""
    op = C.canonical(user)
    return op is not None and op.name == "type_as" and op.kw.get("other") is n and op.kw.get("input") is not n


def _expanded_to(user: fx.Node, n: fx.Node) -> bool:
    """``mask.expand_as(scores)`` (DistilBERT, XLM): reads only ``n``'s shape."""
    op = C.canonical(user)
    return op is not None and op.name == "expand_as" and op.kw.get("other") is n \
        and isinstance(op.kw.get("input"), fx.Node) and op.kw["input"] is not n


def _contracted_along(p: fx.Node, axis: int) -> bool:
    """Whether a user of ``p`` contracts it along ``axis`` (P·V over a key
    axis that is not the last)."""
    for u in p.users:
        c = C.contraction(u)
        if c is None:
            continue
        for i in (0, 1):
            node, labels = c.operand(i)
            if node is p and labels.index(c.contracted) == axis:
                return True
    return False


def _contracted_along_node(u: fx.Node, p: fx.Node) -> bool:
    c = C.contraction(u)
    return c is not None and any(c.operand(i)[0] is p for i in (0, 1))


def _pv_of(user: fx.Node, p: fx.Node, swapped: bool = False) -> Optional[Tuple[C.Contraction, int]]:
    c = C.contraction(user)
    if c is None or c.addend is not None:
        return None
    for i in (0, 1):
        node, labels = c.operand(i)
        key = -2 if swapped else -1
        if node is p and labels[key] == c.contracted and node is not c.operand(1 - i)[0]:
            return c, i
    return None


def _swaps_last_two(op: C.COp, rank: int) -> bool:
    """``x.transpose(-1, -2)`` / ``x.permute(..., -1, -2)`` / ``x.mT``."""
    return C.permutation(op, rank) == list(range(rank - 2)) + [rank - 1, rank - 2]


def _follow_probabilities(sm: fx.Node, start: Optional[fx.Node] = None):
    """Walk from the softmax to the P·V contraction.

    Returns ``(pv, post_nodes, p_index, dropout_p, swapped)``; ``pv`` None with a
    string in place of ``post_nodes`` when the site is attention but must be
    declined, or with None when the softmax is not an attention at all.
    ``swapped``: P reaches the product transposed, as V·Pᵀ (SAGAN's
    ``bmm(v, p.permute(0, 2, 1))``), so its key axis is the operand's second last.
    """
    cur, post, p, swapped = start or sm, [], 0.0, False
    while True:
        # a tensor made from P's shape alone (``torch.zeros_like(p)`` as a where's
        # zero) reads no probability: rewritten as a constant with the site
        users = [u for u in cur.users if not _like_zero_fill(u, cur)]
        if len(users) == 1:
            found = _pv_of(users[0], cur, swapped)
            if found is not None:
                return found[0], post, found[1], p, swapped
            op = C.canonical(users[0])
            if op is not None and not swapped and op.kw.get("input") is cur \
                    and _swaps_last_two(op, len(C.shape_of(cur))):
                swapped = True
                post.append(users[0])
                cur = users[0]
                continue
            if op is not None and op.name == "nan_to_num" and op.kw.get("input") is cur \
                    and op.kw.get("nan", 0.0) == 0 and not isinstance(op.kw.get("nan", 0.0), fx.Node):
                post.append(users[0])      # P's nan rows (no key kept, -inf masks) become 0
                cur = users[0]
                continue
            if op is not None and op.name in ("mul", "div") and not swapped and _row_factor(op, cur) is not None:
                post.append(users[0])      # a head mask: P · m = m ⊙ (P·V) when m is one per row
                cur = users[0]
                continue
            if op is not None and not swapped and _row_zeroing(op, cur) is not None:
                post.append(users[0])      # whole rows of P set to 0 (Flamingo): those rows of P·V are 0
                cur = users[0]
                continue
            if op is not None and not swapped and _zeroes_where(op, cur):
                post.append(users[0])      # P.masked_fill(mask, 0): checked against the scores' mask
                cur = users[0]
                continue
            if op is None or op.name not in _POST_OPS or op.kw.get("input") is not cur:
                if _reaches_product(users[0]) is not None:
                    name = op.name if op is not None else getattr(users[0].target, "__name__", users[0].name)
                    return None, f"'{name}' between the softmax and P·V cannot be expressed", None, None, False
                return None, None, None, None, False
            if op.name == "dropout":
                p += _dropout_p(op) * (1 - p)  # two dropouts compose
            post.append(users[0])
            cur = users[0]
            continue
        pv = [u for u in users if _pv_of(u, cur) is not None or _leads_to_pv(u, cur)]
        if pv:
            others = [u for u in users if u not in pv] or users[1:]
            return None, f"the probabilities are also used by '{others[0].name}'", None, None, False
        return None, None, None, None, False


def _row_factor(op: C.COp, p: fx.Node):
    """The factor of ``p * m`` / ``m * p`` / ``p / m`` when it is one value per
    row of the probabilities (a number, or a tensor whose key axis is
    broadcast: a head mask of (1, H, 1, 1), a per-row weight) and leaves P's
    shape as it is; else None.  In-place products are not followed."""
    node = op.node
    if node.target in (operator.imul, operator.itruediv) or str(node.target).endswith("_"):
        return None
    a, b = op.kw.get("input"), op.kw.get("other")
    if op.name == "mul" and b is p and a is not p:
        a, b = b, a
    if a is not p or b is p or (op.name == "div" and op.kw.get("rounding_mode") is not None):
        return None
    if isinstance(b, (int, float)) and not isinstance(b, bool):
        return b if math.isfinite(b) and (b != 0 or op.name == "mul") else None
    ev = C.example_value(b) if isinstance(b, fx.Node) else None
    ps, outs = C.shape_of(p), C.shape_of(node)
    # a boolean or integer factor (a query-padding mask, ``p * keep[..., None]``)
    # only multiplies: P / False is inf, which a row of P·V does not reproduce
    if not isinstance(ev, torch.Tensor) or not (ev.is_floating_point() or op.name == "mul" and not ev.is_complex()) \
            or ps is None or outs is None or len(ev.shape) > len(ps) or len(outs) != len(ps) \
            or C.example_value(node).dtype != C.example_value(p).dtype:
        return None
    from .analyze.values import _size_eq, is_one
    if not all(_size_eq(x, y) for x, y in zip(outs, ps)):
        return None
    if len(ev.shape) and not is_one(ev.shape[-1]):
        return None
    return b


def _zero_fill(op: C.COp, p: fx.Node):
    """``p.masked_fill(m, 0)``, ``where(m, 0, p)`` or ``where(m, p, 0)``: P
    set to 0 under a boolean tensor ``m``, out of place, with P's shape and
    dtype.  The 0 is a number, a 0-d
    tensor (CPM-Ant's ``torch.scalar_tensor(0)``: the analysis proves it 0)
    or ``zeros_like(p)``; ``(m, zero_where_true, zero)``, else None."""
    node = op.node
    if str(node.target).endswith("_") or C.shape_of(node) != C.shape_of(p) \
            or C.example_value(node).dtype != C.example_value(p).dtype:
        return None
    if op.name == "masked_fill":
        cond, zero, kept, when_true = op.kw.get("mask"), op.kw.get("value"), op.kw.get("input"), True
    elif op.name == "where":
        cond, a, b = op.kw.get("condition"), op.kw.get("input"), op.kw.get("other")
        (zero, kept), when_true = ((a, b), True) if b is p else ((b, a), False)
    else:
        return None
    if isinstance(zero, fx.Node):
        zv = C.example_value(zero)
        zero_ok = zero is not p and (_like_zero_fill(zero, p) or isinstance(zv, torch.Tensor) and zv.dim() == 0)
    else:
        zero_ok = isinstance(zero, (int, float)) and not isinstance(zero, bool) and zero == 0
    ev = C.example_value(cond) if isinstance(cond, fx.Node) else None
    if kept is not p or cond is p or not zero_ok or not isinstance(ev, torch.Tensor) or ev.dtype != torch.bool:
        return None
    return cond, when_true, zero


def _row_zeroing(op: C.COp, p: fx.Node):
    """A zero fill (``_zero_fill``) whose mask is one value per row of P (its
    key axis broadcast: Flamingo's ``attn.masked_fill(text_without_media,
    0.)``) and whose 0 is a number or ``zeros_like(p)``: ``(m,
    zero_where_true)``, else None.  The rows it zeroes are zero rows of P·V
    ([Note: rows of P set to 0])."""
    fill = _zero_fill(op, p)
    if fill is None:
        return None
    cond, when_true, zero = fill
    if isinstance(zero, fx.Node) and not _like_zero_fill(zero, p):
        return None          # a 0-d tensor: left to the analysis of the scores' own mask
    from .analyze.values import is_one
    ev, ps = C.example_value(cond), C.shape_of(p)
    if ps is None or ev.dim() > len(ps) or ev.dim() == 0 or not is_one(ev.shape[-1]):
        return None
    return cond, when_true


def _zeroes_where(op: C.COp, p: fx.Node) -> bool:
    """A zero fill (``_zero_fill``) with a number or a 0-d tensor as the 0;
    the analysis proves the zeros fall where the scores were masked ([Note:
    probabilities zeroed by the mask])."""
    fill = _zero_fill(op, p)
    return fill is not None and not (isinstance(fill[2], fx.Node) and _like_zero_fill(fill[2], p))


def _reaches_product(sm: fx.Node, depth: int = 8, limit: int = 64) -> Optional[fx.Node]:
    """A contraction that ``sm`` (a softmax of Q·Kᵀ scores, or an op after it
    the matcher cannot follow) feeds within ``depth`` ops of any kind
    (two maps combined in a way distribute does not take, DeepViT's heads mixed
    after the softmax, an XSoftmax-style in-place zeroing): that softmax is
    attention the matcher cannot follow, reported as declined rather than
    passed unseen.  None when there is none."""
    return C.user_within(sm, depth, lambda u: C.contraction(u) is not None, limit)


def _leads_to_pv(u: fx.Node, p: fx.Node, depth: int = 6) -> bool:
    for _ in range(depth):
        op = C.canonical(u)
        follows = op is not None and (op.name in _POST_OPS and op.kw.get("input") is p
                                      or op.name in ("mul", "div") and _row_factor(op, p) is not None
                                      or _row_zeroing(op, p) is not None or _zeroes_where(op, p))
        if not follows or len(u.users) != 1:
            return False
        nxt = next(iter(u.users))
        if _pv_of(nxt, u) is not None:
            return True
        p, u = u, nxt
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


def _build(sm, x, qk: C.Contraction, pv: C.Contraction, p_index, dropout_p, swapped=False, post=(),
           sink=None, start=None):
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
    chain = chain_nodes(qk.node, x, sm)
    heads = _heads_view(chain, C.shape_of(qk.node)) if len(batch) == 1 else None
    pn, plabels = pv.operand(p_index)
    if swapped:     # the labels of P itself: (.., query, key)
        plabels = plabels[:-2] + plabels[-1] + plabels[-2]
    vn, vlabels = pv.operand(1 - p_index)
    p_lead, p_tail = C.shape_of(pn)[:-2], tuple(C.shape_of(pn)[-2:])
    if not _same_lead(p_tail[::-1] if swapped else p_tail, C.shape_of(qk.node)[-2:]):
        raise Decline("P·V reads the probabilities reshaped across their query and key axes")
    if heads is None and len(batch) == 2 and _flattened_lead(p_lead, C.shape_of(qk.node)[:-2]):
        # [B, H, Lq, Lk] scores, P reshaped to [B*H, Lq, Lk] for a bmm with a
        # [B*H, Lk, Dv] value: only views lie between the softmax and P·V
        # (_POST_OPS), so P's flat batch is b * H + h, and the value's is read
        # so too (split with ``heads``, a static head count as _heads_view's;
        # the output flattened back)
        heads = tuple(C.shape_of(qk.node)[:-2])
    elif not (_same_lead(p_lead, C.shape_of(qk.node)[:-2])
              or (heads is not None and _same_lead(p_lead, heads))):
        raise Decline("P·V is batched differently from Q·Kᵀ")
    dv = [lab for lab in vlabels if lab not in plabels]
    if len(dv) != 1:
        raise Decline("P·V is not a contraction over the key axis")
    v = _operand(vn, vlabels, plabels[:-2] + plabels[-1] + dv[0], allow_factor=False)
    wide_k, wide_v = (peel(kn, klabels)[0], peel(vn, vlabels)[0])
    _check_layouts(q, k, v, C.shape_of(qk.node), wide_k, wide_v, heads)
    for operand in (q, k, v):
        if mutated_between(operand.node, qk.node, pv.node):
            raise Decline("an input of the attention is modified in place inside the site")
    op_out = plabels[:-2] + plabels[-2] + dv[0]
    if sorted(pv.out_labels) != sorted(op_out):
        raise Decline("P·V output has an unexpected layout")
    for operand, name in ((q, "query"), (k, "key"), (v, "value")):
        if not C.example_value(operand.node).dtype.is_floating_point:
            raise Decline(f"{name} is not a floating-point tensor")
    dtype_users = _check_chain_users(chain, _softmax_body(x, sm), x)
    lse_users = [u for u in dtype_users if C.canonical(u).name == "logsumexp"]
    dtype_users = [u for u in dtype_users if u not in lse_users]
    if lse_users and (len(batch) != 2 or heads is not None):
        raise Decline("the scores' logsumexp is read, on scores that are not [B, H, Lq, Lk]")
    if len(batch) == 3:
        _check_grouped(q, k, v, C.shape_of(qk.node))
    site = {sm, x, qk.node} | chain
    scales = _row_scales(start or sm, post, pn, plabels, pv.out_labels, site)
    if sink is not None:
        if len(batch) != 2 or heads is not None or swapped or \
                (isinstance(sink, fx.Node) and (len(C.shape_of(sink)) > 4 or C.shape_of(sink)[-1] != 1)):
            raise Decline("attention sinks on scores that are not [B, H, Lq, Lk]")
        if isinstance(sink, fx.Node) and not _precedes(sink, site) and _reads(sink, site):
            raise Decline("the attention sinks may be computed from the scores")
    zero_rows = any(C.canonical(n).name == "nan_to_num" for n in post)
    if zero_rows and (len(batch) != 2 or heads is not None):
        raise Decline("nan_to_num of the probabilities on scores that are not [B, H, Lq, Lk]")
    prevs = [start or sm, *post[:-1]]
    rows_zeroed = {n for n, prev in zip(post, prevs) if _row_zeroing(C.canonical(n), prev) is not None}
    for n in (start or sm, *post):     # zeros_like(P) beside P: a constant once P is gone
        for u in n.users:
            if _like_zero_fill(u, n):
                if not all(isinstance(d, int) for d in C.example_value(u).shape):
                    raise Decline(f"'{u.name}' is made from the probabilities' dynamic shape")
                dtype_users.append(u)
    zero_masks = [n for n in post if C.canonical(n).name in ("masked_fill", "where") and n not in rows_zeroed]
    if zero_masks and ((len(batch) != 2 and heads is None) or C.shape_of(zero_masks[0]) != C.shape_of(x)
                       or len(C.shape_of(x)) != 4):
        raise Decline("probabilities zeroed by a mask, on scores that are not [B, H, Lq, Lk]")
    return SiteMatch(sm, x, qk, pv, q, k, v, pv.out_labels, op_out, len(batch),
                     dropout_p, chain, dtype_users, heads, scales, sink, lse_users,
                     zero_rows or bool(zero_masks), zero_masks)


def _row_scales(sm, post, pn, plabels: str, out_labels: str, site: set) -> List[RowScale]:
    """The row factors among the nodes between the softmax and P·V (see RowScale)."""
    from .analyze.values import _size_eq
    out, prev = [], sm
    for n in post:
        op = C.canonical(n)
        factor = _row_factor(op, prev) if op is not None and op.name in ("mul", "div") else None
        kind = "scale"
        if factor is None and op is not None:
            zeroing = _row_zeroing(op, prev)
            if zeroing is not None:
                factor, kind = zeroing[0], "zero" if zeroing[1] else "keep"
        prev = n
        if factor is None:
            continue
        if isinstance(factor, fx.Node) and not _precedes(factor, site) and _reads(factor, site):
            raise Decline("the probabilities are scaled by a value that may be computed from the scores")
        at, to = tuple(C.shape_of(n)), tuple(C.shape_of(pn))
        shapes = None
        if len(at) != len(to) or not all(_size_eq(a, b) for a, b in zip(at, to)):
            if not all(isinstance(d, int) for d in at + to) or at[-2:] != to[-2:] or math.prod(at) != math.prod(to):
                raise Decline("the probabilities are scaled per row, then reshaped")
            shapes = (at, to)
        rows = plabels[:-1]
        out.append(RowScale(factor, op.name == "div", shapes,
                            tuple(rows.index(lab) if lab in rows else None for lab in out_labels), kind))
    return out


def _precedes(node: fx.Node, nodes: set) -> bool:
    """Whether ``node`` comes before every node of ``nodes`` in the graph (so
    reads none of them)."""
    for n in node.graph.nodes:
        if n is node:
            return True
        if n in nodes:
            return False
    return False


def _reads(node: fx.Node, nodes: set, limit: int = 256) -> bool:
    """Whether ``node`` is computed from any of ``nodes`` (True when the walk
    back is cut short: the caller declines)."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in nodes:
            return True
        if n in seen:
            continue
        seen.add(n)
        if len(seen) > limit:
            return True
        stack.extend(n.all_input_nodes)
    return False


def chain_nodes(score: fx.Node, softmax_in: fx.Node, softmax: fx.Node) -> set:
    """Nodes on a path from the contraction to the softmax input, plus the
    in-place ops on them that run before the softmax."""
    fwd, stack = set(), [score]
    while stack:
        n = stack.pop()
        if n not in fwd:
            fwd.add(n)
            if n is not softmax_in:
                # a tensor made from the scores' shape alone (full_like(s, -inf),
                # s.new_full(...)) is a side value, not a function of the scores
                stack.extend(u for u in n.users if not _shape_only(u, n) and not _dtype_only(u, n))
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
                    # what the write stores, where it reads the scores
                    # (MViTv2: s[:, :, 0:, 0:] = (s[:, :, 0:, 0:].view(..) + rel).view(..))
                    stack = list(m.all_input_nodes)
                    while stack:
                        a = stack.pop()
                        if a not in back and (a is score or _reaches(score, a, 12)):
                            back.add(a)
                            stack.extend(a.all_input_nodes)
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


def _lse_of(user: fx.Node, x: fx.Node) -> bool:
    """``torch.logsumexp(x, -1)`` of the softmax input itself (Granite's sink
    scaling): the op computes that, its lse."""
    op = C.canonical(user)
    if op is None or op.name != "logsumexp" or op.kw.get("input") is not x:
        return False
    dim = op.kw.get("dim")
    dim = dim[0] if isinstance(dim, (list, tuple)) and len(dim) == 1 else dim
    rank = len(C.shape_of(x) or ())
    return isinstance(dim, int) and rank > 0 and C.norm_dim(dim, rank) == rank - 1


def _check_chain_users(chain: set, softmax_body: set, x: Optional[fx.Node] = None) -> List[fx.Node]:
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
            if n is x and _lse_of(u, x):
                dtype_users.append(u)      # rewired to the op's lse
                continue
            if _shape_only(u, n) or _expanded_to(u, n):
                ev = C.example_value(u)
                if not all(isinstance(d, int) for d in ev.shape):
                    raise Decline(f"'{u.name}' is made from the scores' dynamic shape")
                dtype_users.append(u)      # rewritten as a fresh constant of that shape
                continue
            raise Decline(f"the scores are also used by '{u.name}'")
    return dtype_users


def _heads_view(chain: set, score_shape) -> Optional[Tuple]:
    """For 3-D scores [B*H, Lq, Lk]: the (B, H) of a 4-D view of them in the
    chain, so that tensors indexed per batch or per head keep their meaning."""
    from .analyze.values import _size_eq, _sym
    for n in chain:
        s = C.shape_of(n)
        if s is not None and len(s) == 4 and isinstance(s[1], int):
            if _size_eq(_sym(s[0]) * s[1], score_shape[0]):
                return (s[0], s[1])
    return None


def _same_lead(a, b) -> bool:
    from .analyze.values import _same_sizes
    return _same_sizes(tuple(a), tuple(b))


def _flattened_lead(a, b) -> bool:
    """``a`` is the one axis of ``b``'s two leading axes flattened ([B*H] of
    [B, H]), the second of them (the heads) of a static size."""
    from .analyze.values import _size_eq, _sym
    return len(a) == 1 and len(b) == 2 and isinstance(b[1], int) and _size_eq(a[0], _sym(b[0]) * b[1])
