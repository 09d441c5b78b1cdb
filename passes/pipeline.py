"""The attention pass: match → analyze → rewrite over one dynamo graph.

Entry point: ``attention_pass(gm, example_inputs, graph_id) -> list[Site]``.
Each site found is fused (rewritten into one ``attn_compiler::attention``
call) or declined with a reason; either way it is returned as a report row.
A failure inside the pass for one site declines that site and leaves the
graph as it was: the user's model never crashes because of us.
"""
from __future__ import annotations

import logging
import operator
from collections import Counter
from typing import Dict, List, Optional

import sympy
import torch
import torch.fx as fx

from attn_compiler._compat import is_fake_tensor
from attn_compiler.report import DECLINED, FUSED, Site, location_from_stack_trace
from attn_compiler.sdpa import sdpa_attention

from .analyze import spec as S
from .analyze.build import analyze
from .analyze.verify import SideChecker
from .analyze.values import _CASTS, Decline
from .distribute import distribute, restore
from .join import join, operands as joined_operands, unjoin
from .relayout import relayout
from .match import Declined, find_sites
from . import canonicalize as C
from .operands import _VIEW_OPS, mutating_users, op_lead, shares_storage, storage_root
from .choose import ORIGINAL, SDPA, choose, decision_features
from .rewrite import op_node, rewrite, undo

log = logging.getLogger("attn_compiler")
counters: Counter = Counter()  # "fused", "declined": tests observe these


def real_values(gm: fx.GraphModule, example_inputs) -> Dict[fx.Node, torch.Tensor]:
    """The real tensors behind placeholders and ``get_attr`` nodes (dynamo
    passes real example inputs; registered buffers are read from them)."""
    out = {}
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for n, v in zip(phs, example_inputs):
        if isinstance(v, torch.Tensor) and not is_fake_tensor(v):
            out[n] = v
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            try:
                v = _attr(gm, n.target)
            except AttributeError:
                continue
            if isinstance(v, torch.Tensor):
                out[n] = v
    return out


def _attr(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


FOLDED = "attn_compiler_folded"   # gm.meta key: what the fused sites read as constants


def folded_inputs(gm: fx.GraphModule) -> List[tuple]:
    """``(placeholder position or None, tensor)`` for every registered buffer or
    constant whose values a fused site of ``gm`` holds as an expression (a tril
    buffer read as causal); the backend guards them ([Note: folded buffers])."""
    return list(gm.meta.get(FOLDED, ()))


# copies, casts, views and reads of a size: a result of one that nothing
# reads is dead code
_UNREAD_OK = frozenset(_CASTS | _VIEW_OPS | {"broadcast_to", "size", "sym_size", "dim", "numel"})


def drop_unread(gm: fx.GraphModule) -> int:
    """Erase copies, casts, views and size reads whose result nothing reads
    (dynamo keeps them: x-transformers' ``qk_similarities = sim.clone()``,
    kept for intermediates it then drops; WavLM's broadcast of the
    ``nn.MultiheadAttention`` weights it then drops).  Such a node would read
    as a second use of the scores (or of the weights) and decline the site;
    the inner compiler drops them anyway.  Walking the graph backwards erases
    a dead chain whole.  An op that writes its input (``y.unsqueeze_(0)``,
    which the canonical name spells ``unsqueeze``) or has a side effect is
    never erased, nor an assignment (none of these ops).  Returns how many
    were erased."""
    erased = 0
    for n in reversed(list(gm.graph.nodes)):
        if n.users or n.op not in ("call_function", "call_method"):
            continue
        op = C.canonical(n)
        writes = bool(n.args) and isinstance(n.args[0], fx.Node) and n in mutating_users(n.args[0])
        if op is not None and op.name in _UNREAD_OK and not writes and not n.is_impure():
            gm.graph.erase_node(n)
            erased += 1
    return erased


# out-of-place ops for in-place writes, by canonical name (``masked_fill_`` and
# ``x *= y`` are "masked_fill" and "mul" to the canonicalizer)
_OUT_OF_PLACE = {"masked_fill": "masked_fill", "mul": operator.mul, "div": operator.truediv,
                 "add": operator.add, "sub": operator.sub}


# [Note: in-place writes made out of place]  An in-place write to a tensor the
# graph itself made (a softmax's output, an einsum's result or a view of it)
# reads, to the matcher, as one more use of that tensor: XSoftmax as Hugging
# Face's SEW-D writes it (``p = softmax(s); p.masked_fill_(rmask, 0); p @ v``)
# or Funnel's ``positional_attn *= cls_mask`` on a slice of an einsum's result.
# ``functionalize_writes`` rewrites such a write ``x.op_(y)`` as ``x2 = x.op(y)``
# and makes every later use of ``x`` read ``x2``, which holds what ``x`` held
# then.  That is the same program when nothing else can see the write: the
# tensor's storage was allocated inside the graph (not an input, a buffer or a
# parameter), no other view of that storage is read after the write, and the
# out-of-place op keeps ``x``'s dtype (``x += y`` keeps x's dtype where ``x + y``
# promotes).  Writes are taken one at a time, in graph order, so a chain of
# writes becomes a chain of ops.  The rewrite holds whether or not a site is
# then fused (AOTAutograd functionalizes the graph in the same way).  A write
# to a slice of a tensor whose base is read afterwards (``s[:, :, 1:,
# 1:].add_(b)`` before ``softmax(s)``) becomes the assignment that writes the
# same values to the same storage, ``s[:, :, 1:, 1:] = s[:, :, 1:, 1:] + b``
# (``_written_back``); a side tensor so written is read at run time.


def functionalize_writes(gm: fx.GraphModule) -> int:
    """Rewrite in-place writes as out-of-place ops where nothing else can see
    them ([Note: in-place writes made out of place]); returns how many."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}     # the rewrite adds no node
    count = 0
    for m in list(gm.graph.nodes):
        x = m.args[0] if m.op in ("call_method", "call_function") and m.args else None
        if not isinstance(x, fx.Node) or m not in mutating_users(x):
            continue
        target = _out_of_place(m, x)
        aliases = _aliases(x) if target is not None else None
        if aliases is None:
            continue
        at = order[m]
        # views made before the write and read after it would see it (views made
        # after it from x follow x to the new node)
        if any(u is not m and order[u] > at for a in aliases if a is not x and order[a] < at for u in a.users):
            if _written_back(gm, m, x, target):
                order = {n: i for i, n in enumerate(gm.graph.nodes)}
                count += 1
            continue
        later = [u for u in x.users if u is not m and order[u] > at]
        m.target = target
        m.meta.pop("_ac_canon", None)
        for u in later:
            u.replace_input_with(x, m)
            u.meta.pop("_ac_canon", None)
        count += 1
    return count


def _written_back(gm: fx.GraphModule, m: fx.Node, x: fx.Node, target) -> bool:
    """``base[idx].op_(y)``, whose base is read afterwards, as ``t =
    base[idx].op(y); base[idx] = t``: the same write to the same storage,
    spelled as the assignment the matcher reads (``s[:, :, 1:, 1:].add_(b)``
    as ``s[:, :, 1:, 1:] += b``, [Note: scores assigned in part]).  Only for
    an index of ints and slices with int bounds, and a write whose own result
    is not used."""
    if m.users or not (x.op == "call_function" and x.target is operator.getitem) \
            or not isinstance(x.args[0], fx.Node):
        return False
    idx = x.args[1]
    items = idx if isinstance(idx, tuple) else (idx,)
    for i in items:
        if isinstance(i, slice):
            if not all(b is None or isinstance(b, int) for b in (i.start, i.stop, i.step)):
                return False
        elif not (i is None or i is Ellipsis or isinstance(i, int) and not isinstance(i, bool)):
            return False
    m.target = target
    m.meta.pop("_ac_canon", None)
    with gm.graph.inserting_after(m):
        w = gm.graph.call_function(operator.setitem, (x.args[0], idx, m))
    w.meta["stack_trace"] = m.meta.get("stack_trace")
    return True


# ops whose result is always a new tensor (never one of their inputs)
_ALLOCATES = frozenset({"matmul", "bmm", "mm", "einsum", "baddbmm", "softmax", "log_softmax", "add", "sub", "rsub",
                        "mul", "div", "masked_fill", "where", "exp", "tanh", "neg", "pow", "clone"})


def _aliases(x: fx.Node):
    """The nodes sharing ``x``'s storage: its root (a tensor an op of the graph
    allocated: ``_ALLOCATES``) and every view, cast, dropout or in-place
    result of it (each may return its input itself); None when the root is
    anything else (an input, a buffer, an op that may return an input)."""
    root = storage_root(x, casts=True)
    op = C.canonical(root)
    if root.op not in ("call_function", "call_method") or op is None or op.name not in _ALLOCATES:
        return None
    out, stack = {root}, [root]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u not in out and u.args and u.args[0] is n and shares_storage(u, n, casts=True):
                out.add(u)
                stack.append(u)
    return out


def _out_of_place(m: fx.Node, x: fx.Node):
    """The out-of-place target of the in-place write ``m`` on ``x`` (a method
    such as ``masked_fill_``, or ``*=``) when it keeps ``x``'s dtype, or None."""
    op = C.canonical(m)
    if op is None or op.name not in _OUT_OF_PLACE or m.op not in ("call_method", "call_function"):
        return None
    target = _OUT_OF_PLACE[op.name] if m.op == "call_function" else m.target[:-1]
    if m.op == "call_method" and m.target != op.name + "_" or m.op == "call_function" and \
            getattr(m.target, "__module__", "") not in ("_operator", "operator"):
        return None
    if len(m.args) < 2 or any(a is x for a in list(m.args[1:]) + list(m.kwargs.values())):
        return None
    xv = C.example_value(x)
    if not isinstance(xv, torch.Tensor):
        return None
    if op.name == "masked_fill":
        return target
    other = m.args[1]
    ov = C.example_value(other) if isinstance(other, fx.Node) else other
    # a scale dynamo made a run-time scalar (``self.scale`` under dynamic=True:
    # ``s.mul_(scale.item())``) promotes as a number of its kind
    ov = {torch.SymFloat: 1.0, torch.SymInt: 1, torch.SymBool: True}.get(type(ov), ov)
    if not isinstance(ov, (torch.Tensor, int, float, bool)) or isinstance(ov, torch.Tensor) and ov.shape != () \
            and torch.broadcast_shapes(ov.shape, xv.shape) != xv.shape:
        return None
    try:
        promoted = torch.result_type(xv, ov)
    except Exception:  # noqa: BLE001 - a value torch cannot promote: leave the write
        return None
    return target if promoted == xv.dtype else None


def attention_pass(gm: fx.GraphModule, example_inputs, graph_id: int = 0, body: bool = False) -> List[Site]:
    """``body``: ``gm`` is the subgraph of a higher-order op (``_subgraphs``)."""
    dropped = drop_unread(gm)
    written = functionalize_writes(gm)         # [Note: in-place writes made out of place]
    relaid = relayout(gm)                 # [Note: scores in another layout]
    distributed = distribute(gm)          # [Note: maps combined before P·V]
    joined = join(gm)                     # [Note: scores summed from two products]
    if dropped or written or relaid or distributed or joined:
        gm.recompile()
    values = real_values(gm, example_inputs)
    checker = SideChecker(gm, example_inputs)
    sites, replaced, dead, internal, fused_products, fused_operands = [], {}, [], set(), set(), set()
    positions = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    folded: Dict[fx.Node, tuple] = {}
    for ordinal, item in enumerate(find_sites(gm)):
        node = item.node if isinstance(item, Declined) else item.softmax
        loc = location_from_stack_trace(node.meta.get("stack_trace"))
        site = Site(DECLINED, location=loc, graph_id=graph_id, ordinal=ordinal)
        if isinstance(item, Declined):
            site.reason = item.reason
        else:
            try:
                analysis = analyze(item, values, checker)
                if body and analysis.folded:
                    # the guard of [Note: folded buffers] re-compiles the parent graph as
                    # dynamo gave it, but a body is shared with it: nothing is folded there
                    raise Decline("a mask read as a constant inside a checkpointed or nested region")
                site.features = features(item, analysis.spec)
                sources = [replaced.get(o.node, o.node) for o in (item.q, item.k, item.v)]
                final = rewrite(gm, item, analysis, replaced)
                site.features["spec"] = op_node(final).args[4]   # with the rewrite's output layout
                decision = choose(gm, item, analysis, final, op_node(final), checker, sources)
                site.features.update(decision_features(decision))
                if decision.choice == ORIGINAL:
                    undo(gm, item.pv.node, final, replaced)
                    site.reason = _kept_reason(decision)
                else:
                    if decision.choice == SDPA:
                        op_node(final).target = sdpa_attention
                    site.status = FUSED
                    fused_products.add(item.pv.node)
                    fused_operands.update(sources)
                    dead.append(item.pv.node)
                    dead.extend(item.lse_users)         # rewired to the op's lse
                    internal |= item.chain
                    for n in analysis.folded:
                        folded[n] = (positions.get(n), values[n])
            except Decline as e:
                site.reason = str(e)
            except Exception as e:  # noqa: BLE001 - a bug of ours must not break the model
                log.warning("attention site at %s left unfused after an internal error: %r",
                            loc, e, exc_info=log.isEnabledFor(logging.DEBUG))
                site.reason = f"internal error: {type(e).__name__}: {e}"
        counters[site.status] += 1
        log.info("attention site %s: %s %s", loc, site.status, site.reason)
        sites.append(site)
    restored = [d for d in relaid + distributed if not any(p in fused_products for p in d.products)]
    for d in restored:                    # unfused: the user's nodes, as written
        restore(gm, d)
    unjoined = False
    for j in reversed(joined):            # a join of a join (three products) goes back first
        if any(n in fused_operands for n in joined_operands(j)):
            dead.append(j.old)            # the user's sum, read by nothing now
        else:
            unjoin(gm, j)
            unjoined = True
    gm.meta[FOLDED] = list(folded.values())
    modules = _module_sites(gm, graph_id, len(sites))
    sites += modules
    for sub, inputs in _subgraphs(gm, values):
        for site in attention_pass(sub, inputs, graph_id, body=True):
            site.ordinal = len(sites)
            sites.append(site)
    if dead or restored or unjoined or any(s.status == FUSED for s in modules):
        _remove_dead(gm, dead, internal)
        gm.graph.lint()
        gm.recompile()
    return sites


# Higher-order ops whose first argument is a subgraph that runs as part of the
# graph: ``torch.utils.checkpoint`` regions (Hugging Face's and timm's gradient
# checkpointing), dynamo's plain ``wrap`` and ``torch.compiler.nested_compile_region``
# (``invoke_subgraph``: one body for every call of the region).  Their bodies get the attention
# pass too; the op call inside is recomputed in the backward like any other.
_SUBGRAPH_OPS = {"tag_activation_checkpoint": 1, "wrap": 1, "invoke_subgraph": 2}  # name: first operand


def _subgraphs(gm: fx.GraphModule, values: Dict[fx.Node, torch.Tensor]):
    """``(body, example inputs)`` for each subgraph a higher-order op of ``gm``
    runs; an input is the parent's real tensor where it has one, else the
    fake tensor dynamo recorded (nothing in a body is then folded from it)."""
    seen = set()
    for n in gm.graph.nodes:
        name = getattr(n.target, "__name__", "") if n.op == "call_function" else ""
        if name not in _SUBGRAPH_OPS or not n.args or not isinstance(n.args[0], fx.Node) \
                or n.args[0].op != "get_attr" or n.args[0].target in seen:
            continue
        body = getattr(gm, n.args[0].target, None)
        if not isinstance(body, fx.GraphModule):
            continue
        seen.add(n.args[0].target)
        inputs = [values.get(a, a.meta.get("example_value")) if isinstance(a, fx.Node) else a
                  for a in n.args[_SUBGRAPH_OPS[name]:]]
        yield body, inputs


def _kept_reason(decision) -> str:
    t = decision.times_ms
    if t.get(ORIGINAL) is None:         # not timed: the original disagreed
        return decision.note
    why = (f"kept as written: the original subgraph is faster "
           f"({t[ORIGINAL]:.3f} ms vs {t.get('attn_compiler') or float('nan'):.3f} ms fused)")
    return f"{why}; {decision.note}" if decision.note else why


def _module_sites(gm, graph_id: int, first: int) -> List[Site]:
    """nn.MultiheadAttention calls (passes/modules.py)."""
    from .modules import find_module_sites, rewrite_module_site

    out = []
    for ordinal, item in enumerate(find_module_sites(gm), start=first):
        loc = location_from_stack_trace(item.node.meta.get("stack_trace"))
        site = Site(DECLINED, location=loc, graph_id=graph_id, ordinal=ordinal)
        if isinstance(item, Declined):
            site.reason = item.reason
        else:
            try:
                site.features = _module_features(item)
                rewrite_module_site(gm, item)
                site.status = FUSED
            except Exception as e:  # noqa: BLE001 - a bug of ours must not break the model
                log.warning("nn.MultiheadAttention at %s left unfused: %r", loc, e)
                site.reason = f"internal error: {type(e).__name__}: {e}"
        counters[site.status] += 1
        out.append(site)
    return out


def _module_features(item) -> dict:
    return dict(_spec_features(item.spec), module="nn.MultiheadAttention",
                dtypes={"qkv": item.spec.out_dtype, "softmax": item.spec.softmax_dtype})


def _mask_text(spec: S.AttentionSpec) -> str:
    """The mask column: the predicate's kind, and the tensors added to the
    scores that may be masks by their values ([Note: additive tensor masks]:
    ``additive t0``)."""
    adds = " + ".join(f"t{i}" for i in spec.additive_masks)
    if not adds:
        return spec.mask_kind
    return f"additive {adds}" if spec.mask_kind == "none" else f"{spec.mask_kind} + additive {adds}"


def _spec_features(spec: S.AttentionSpec) -> dict:
    """The report columns every site takes from its spec."""
    return {"scale": _scale_text(spec), "mask": _mask_text(spec), "score_mod": spec.describe_mod(),
            "gqa_group": spec.gqa_group, "dropout": spec.dropout_p, "spec": spec.dumps()}


def _remove_dead(gm: fx.GraphModule, roots: List[fx.Node], internal: Optional[set] = None) -> None:
    """Erase the replaced sites' nodes that nothing uses any more (only pure
    ops: in-place or random calls are kept, except an in-place op on a fused
    site's own scores, ``scores.masked_fill_(m, v)``: that tensor is read by
    nothing but the site, which no longer runs)."""
    stack = list(roots)
    pos = {m: i for i, m in enumerate(gm.graph.nodes)}
    for n in sorted(internal or (), key=lambda m: -pos.get(m, -1)):
        target = n.args[0] if n.args else None
        if not n.users and target in internal and n in mutating_users(target) and not getattr(n, "_erased", False):
            stack.extend(n.all_input_nodes)
            gm.graph.erase_node(n)
    while stack:
        n = stack.pop()
        if getattr(n, "_erased", False) or n.users or n.op not in ("call_function", "call_method"):
            continue
        name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
        if name.endswith("_") and not name.startswith("_") or "rand" in name \
                or n.args and isinstance(n.args[0], fx.Node) and n in mutating_users(n.args[0]):
            continue        # in-place (``x *= y`` too: operator.imul) or random
        inputs = n.all_input_nodes
        gm.graph.erase_node(n)
        stack.extend(inputs)


def _scale_text(spec: S.AttentionSpec) -> str:
    sc = spec.scale
    if sympy.simplify(sc - 1 / sympy.sqrt(S.D)) == 0:
        return "1/sqrt(D)"
    if sc.is_number:
        return f"{float(sc):.6g}"
    return str(sc)


def features(m, spec: S.AttentionSpec) -> dict:
    from .canonicalize import example_value

    def shape(operand):  # in the op's layout [B, H, L, D]
        sizes = dict(zip(operand.labels, example_value(operand.node).shape))
        full = [sizes.get(lab, 1) for lab in operand.target]
        heads = m.heads if len(operand.target) == 3 else None
        return tuple(op_lead(full[:-2], heads)) + tuple(full[-2:])

    return dict(_spec_features(spec),
                dtypes={"qkv": example_value(m.q.node).dtype, "softmax": spec.softmax_dtype},
                shapes={"q": shape(m.q), "k": shape(m.k), "v": shape(m.v)},
                captured=[str(c.dims) for c in spec.captured])
