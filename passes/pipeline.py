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
from .match import Declined, find_sites
from . import canonicalize as C
from .operands import _VIEW_OPS, mutating_users, op_lead
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


# copies, casts and views: a result of one that nothing reads is dead code
_UNREAD_OK = frozenset(_CASTS | _VIEW_OPS)


def drop_unread(gm: fx.GraphModule) -> int:
    """Erase copies, casts and views whose result nothing reads (dynamo keeps
    them: x-transformers' ``qk_similarities = sim.clone()``, kept for
    intermediates it then drops).  Such a node would read as a second use of
    the scores and decline the site; the inner compiler drops them anyway.
    Returns how many were erased."""
    erased = 0
    for n in reversed(list(gm.graph.nodes)):
        if n.users or n.op not in ("call_function", "call_method"):
            continue
        op = C.canonical(n)
        if op is not None and op.name in _UNREAD_OK:
            gm.graph.erase_node(n)
            erased += 1
    return erased


_OUT_OF_PLACE_OPERATORS = {"iadd": operator.add, "isub": operator.sub, "imul": operator.mul,
                            "itruediv": operator.truediv}


def functionalize_probability_writes(gm: fx.GraphModule) -> int:
    """Rewrite in-place writes to a softmax's output as out-of-place ops.

    ``p = softmax(s); p.masked_fill_(rmask, 0); p @ v`` (XSoftmax as Hugging
    Face's SEW-D writes it) reads as P used twice.  The write becomes
    ``p2 = p.masked_fill(rmask, 0)``, and every use of ``p`` after it reads
    ``p2``, which holds what ``p`` held then.  A chain of writes is handled
    one write at a time.  The softmax allocates ``p``, so only views can
    alias it: a view made before the write would see the write, so then
    nothing is rewritten.  The rewrite holds whether or not the site is
    fused.  Returns how many writes were rewritten."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    count = 0
    for sm in list(gm.graph.nodes):
        op = C.canonical(sm)
        if op is None or op.name != "softmax":
            continue
        x = sm
        while True:
            writes = sorted(mutating_users(x), key=order.__getitem__)
            if not writes:
                break
            m = writes[0]
            out_of_place = _out_of_place(m)
            if out_of_place is None or x in m.args[1:] or x in m.kwargs.values() or any(
                    order[u] < order[m] and C.canonical(u) is not None and C.canonical(u).name in _VIEW_OPS
                    for u in x.users):
                break
            later = [u for u in x.users if u is not m and order[u] > order[m]]
            m.target = out_of_place
            m.meta.pop("_ac_canon", None)
            for u in later:
                u.replace_input_with(x, m)
                u.meta.pop("_ac_canon", None)
            count += 1
            x = m
    return count


def _out_of_place(m: fx.Node):
    """The out-of-place target of the in-place call ``m`` (a method such as
    ``masked_fill_``, or ``*=``), or None."""
    if m.op == "call_method" and m.target.endswith("_") and not m.target.startswith("_"):
        name = m.target[:-1]
        return name if name in ("masked_fill", "mul", "div", "add", "sub", "where", "clamp", "nan_to_num") else None
    if m.op == "call_function":
        return _OUT_OF_PLACE_OPERATORS.get(getattr(m.target, "__name__", ""))
    return None


def attention_pass(gm: fx.GraphModule, example_inputs, graph_id: int = 0, body: bool = False) -> List[Site]:
    """``body``: ``gm`` is the subgraph of a higher-order op (``_subgraphs``)."""
    dropped = drop_unread(gm)
    written = functionalize_probability_writes(gm)
    distributed = distribute(gm)          # [Note: maps combined before P·V]
    if dropped or written or distributed:
        gm.recompile()
    values = real_values(gm, example_inputs)
    checker = SideChecker(gm, example_inputs)
    sites, replaced, dead, internal, fused_products = [], {}, [], set(), set()
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
    restored = [d for d in distributed if not any(p in fused_products for p in d.products)]
    for d in restored:                    # unfused: the user's nodes, as written
        restore(gm, d)
    gm.meta[FOLDED] = list(folded.values())
    modules = _module_sites(gm, graph_id, len(sites))
    sites += modules
    for sub, inputs in _subgraphs(gm, values):
        for site in attention_pass(sub, inputs, graph_id, body=True):
            site.ordinal = len(sites)
            sites.append(site)
    if dead or restored or any(s.status == FUSED for s in modules):
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


def _spec_features(spec: S.AttentionSpec) -> dict:
    """The report columns every site takes from its spec."""
    return {"scale": _scale_text(spec), "mask": spec.mask_kind, "score_mod": spec.describe_mod(),
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
        if name.endswith("_") and not name.startswith("_") or "rand" in name:
            continue
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
