"""Rewrite: replace a matched site by one call of the attention op.

Entry point: ``rewrite(gm, match, analysis, replaced) -> fx.Node`` (the node
now producing the site's output).  New nodes go in front of the P·V
contraction; its users are redirected; the old chain is left for dead-code
elimination (pipeline.py runs it once after all sites).
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Dict

import torch
import torch.fx as fx

from attn_compiler import layout

from . import canonicalize as C
from .analyze.values import Decline, _size_eq
from .operands import mutating_users, view_writers
from attn_compiler import ops as _ops


def rewrite(gm: fx.GraphModule, m, analysis, replaced: Dict[fx.Node, fx.Node]) -> fx.Node:
    g = gm.graph
    get = lambda n: replaced.get(n, n)  # noqa: E731  operands may be earlier sites' outputs
    qdev = getattr(C.example_value(m.q.node), "device", None)
    for c in analysis.captures:
        ev = C.example_value(c.node)
        dev = getattr(ev, "device", qdev)
        # dynamo's wrapped float under dynamic=True is a CPU scalar beside CUDA
        # operands: the op reads it ([Note: CPU scalars beside CUDA operands])
        if dev != qdev and not (dev.type == "cpu" and not ev.requires_grad
                               and all(isinstance(n, int) and n == 1 for n in ev.shape)):
            raise Decline(f"a captured tensor of shape {tuple(ev.shape)} on {dev}, the queries on {qdev}")
    anchor = m.pv.node
    created = []
    lse_users = list(m.lse_users)
    op_at = _op_position(g, anchor, lse_users, [get(o.node) for o in (m.q, m.k, m.v)]
                         + [get(c.node) for c in analysis.captures])
    try:
        def call(fn, *args):
            n = g.call_function(fn, args)
            n.meta["stack_trace"] = anchor.meta.get("stack_trace")
            created.append(n)
            return n

        with g.inserting_before(op_at):
            heads = m.heads[1] if m.heads is not None else None
            q, k, v = (call(layout.to_op_layout, get(o.node), o.labels, o.target,
                            None if _lead_is_one(o) else heads) for o in (m.q, m.k, m.v))
            if m.q.expand_batch:
                q = call(layout.expand_batch, q, k)
            caps = [call(layout.captured_view, get(c.node), c.axes, heads, q if layout.CYCLIC_B in c.axes else None,
                         *((c.pad,) if any(c.pad) else ()))
                    for c in analysis.captures]
            seed = call(layout.dropout_seed) if analysis.spec.dropout_p > 0 else None
            spec = analysis.spec
            if _heads_inside_rows(anchor, m):
                spec = dataclasses.replace(spec, out_heads_inner=True)
            res = call(_ops.fused_attention, q, k, v, caps, spec.dumps(), seed)
        rewired = []
        for u in lse_users:              # logsumexp(scores, -1) -> the op's lse
            with g.inserting_before(u):
                op = C.canonical(u)
                new = call(layout.lse_as, call(operator.getitem, res, 1), bool(op.kw.get("keepdim", False)),
                           C.example_value(u).dtype)
            rewired.append((u, new))
        with g.inserting_before(anchor):
            out = call(operator.getitem, res, 0)
            if m.sink is not None:          # the sink's share of the denominator, from lse
                out = call(layout.with_sink, out, call(operator.getitem, res, 1),
                           get(m.sink) if isinstance(m.sink, fx.Node) else m.sink)
            if m.zero_empty_rows:
                out = call(layout.zero_empty_rows, out, call(operator.getitem, res, 1))
            group = C.shape_of(m.qk.node)[2] if m.batch_rank == 3 else None
            final = call(layout.from_op_layout, out, m.op_out_labels, m.out_labels, group)
            for rs in m.row_scales:
                factor = get(rs.factor) if isinstance(rs.factor, fx.Node) else rs.factor
                final = call(layout.scale_rows, final, factor, rs.div, rs.shapes, rs.axes, rs.kind)
            if mutating_users(anchor) or view_writers(anchor):
                # the user writes the attention output in place (``o += x``): the op
                # saved its output for the backward, so the user gets a copy
                final = call(torch.clone, final)
        _fake_run(created, get, anchor)
    except Exception:
        for n in reversed(created):
            g.erase_node(n)
        raise
    anchor.replace_all_uses_with(final)
    replaced[anchor] = final
    final.meta["attn_compiler_nodes"] = list(created)     # what undo() erases
    for u, new in rewired:
        u.replace_all_uses_with(new)
    final.meta["attn_compiler_rewired"] = rewired            # what undo() puts back
    for u in m.dtype_users:
        with g.inserting_before(u):
            op = C.canonical(u)
            if op.name == "type_as":    # y.type_as(scores) -> y.to(scores.dtype)
                dtype = C.example_value(op.kw["other"]).dtype
                new = g.call_method("to", (op.kw["input"], dtype))
            elif op.name == "expand_as":      # mask.expand_as(scores) -> mask.expand(shape)
                new = g.call_method("expand", (op.kw["input"], tuple(C.example_value(u).shape)))
            else:                                     # full_like(scores, v) -> full(shape, v)
                ev = C.example_value(u)
                new = g.call_function(_constant_like, (tuple(ev.shape), C.fill_value(C.canonical(u)),
                                                       ev.dtype, ev.device))
        new.meta.update(u.meta)
        u.replace_all_uses_with(new)
        g.erase_node(u)
    return final


def _op_position(g: fx.Graph, anchor: fx.Node, lse_users, inputs) -> fx.Node:
    """Where the op call goes: before P·V, or before the first reader of the
    scores' logsumexp when that comes first (Granite computes it before the
    softmax); every input of the op must be defined there."""
    if not lse_users:
        return anchor
    pos = {n: i for i, n in enumerate(g.nodes)}
    at = min([anchor, *lse_users], key=pos.__getitem__)
    late = [n for n in inputs if isinstance(n, fx.Node) and pos[n] >= pos[at]]
    if late:
        raise Decline(f"'{late[0].name}', an input of the attention, is made after the scores' logsumexp")
    return at


def _constant_like(shape, fill, dtype, device) -> torch.Tensor:
    """What a shape-only user of the scores made (full_like(scores, v), ...),
    without the scores."""
    return torch.full(shape, fill, dtype=dtype, device=device)


def _fake_run(created, get, anchor: fx.Node) -> None:
    """Run the new nodes on the graph's fake tensors before committing the
    rewrite: a layout or op error, or an output that differs from the
    replaced node's in shape or dtype, raises here (the site is declined)
    instead of inside the inner compiler or the user's model."""
    from torch.fx.node import map_arg

    env = {}

    def val(n):
        return env[n] if n in env else C.example_value(get(n))

    want = C.example_value(anchor)
    mode = getattr(want, "fake_mode", None)
    if mode is None:
        return  # no fake tensors recorded: nothing to run against
    with mode:
        for n in created:
            env[n] = n.target(*map_arg(n.args, val), **map_arg(n.kwargs, val))
            n.meta["example_value"] = env[n]
    got = env[created[-1]]
    if got.dtype != want.dtype or len(got.shape) != len(want.shape) or not all(
            _size_eq(a, b) for a, b in zip(got.shape, want.shape)):
        raise RuntimeError(f"rewritten site gives {tuple(got.shape)} {got.dtype}, "
                           f"the graph had {tuple(want.shape)} {want.dtype}")


# [Note: the output with the heads inside the rows]  Models put the heads back
# beside each other right after P·V: ``o.transpose(1, 2).reshape(B, L, H·D)``
# (timm, nanoGPT), ``.transpose(1, 2).contiguous()`` (Hugging Face), or an
# einsum that writes (B, Lq, H, D).  SDPA returns its output laid out as
# (B, Lq, H, D), so there that is a view; a contiguous (B, H, Lq, D) output
# makes it a copy, a second (B, Lq, H·D) tensor that the projection after it
# saves for its backward (ViT-B training: 223 MiB more at batch 64, run 174).
# So where every user of the site's output is that transpose (or the user's
# contraction writes that order), the op lays its output out as (B, Lq, H, D)
# (``AttentionSpec.out_heads_inner``; the kernels write any strides).  Not
# where a user reads the output in its own layout: a ``view`` of a tensor laid
# out otherwise than the code was traced with would fail; nor where the op's
# output is scaled or copied first (sinks, rows zeroed, in-place writers).


def _heads_inside_rows(anchor: fx.Node, m) -> bool:
    """Whether the site's output is only read with its heads inside its rows
    (see the note)."""
    ol, ul = m.op_out_labels, m.out_labels
    if len(ol) != 4 or m.sink is not None or m.zero_empty_rows or m.row_scales \
            or mutating_users(anchor) or view_writers(anchor):
        return False
    if ul != ol:                            # the user's contraction writes another axis order
        return sorted(ul) == sorted(ol) and [ol.index(a) for a in ul] == [0, 2, 1, 3]
    users = list(anchor.users)
    return bool(users) and all(
        (op := C.canonical(u)) is not None and op.kw.get("input") is anchor and C.permutation(op, 4) == [0, 2, 1, 3]
        for u in users)


def _lead_is_one(o) -> bool:
    """A [1, L, D] operand broadcasts over the whole batch: nothing to split."""
    sizes = dict(zip(o.labels, C.shape_of(o.node)))
    lead = [sizes.get(lab, 1) for lab in o.target[:-2]]
    return len(lead) == 1 and isinstance(lead[0], int) and lead[0] == 1


def op_node(final: fx.Node) -> fx.Node:
    """The attention op call among the nodes a rewrite created."""
    return next(n for n in final.meta["attn_compiler_nodes"]
                if n.target is _ops.fused_attention)


def undo(gm: fx.GraphModule, anchor: fx.Node, final: fx.Node, replaced: Dict[fx.Node, fx.Node]) -> None:
    """Put the original site back (its nodes were left in the graph)."""
    final.replace_all_uses_with(anchor)
    for u, new in final.meta.get("attn_compiler_rewired", ()):
        new.replace_all_uses_with(u)
    for n in reversed(final.meta["attn_compiler_nodes"]):
        if not n.users:
            gm.graph.erase_node(n)
    replaced.pop(anchor, None)
