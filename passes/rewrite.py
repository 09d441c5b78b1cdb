"""Rewrite: replace a matched site by one call of the attention op.

Entry point: ``rewrite(gm, match, analysis, replaced) -> fx.Node`` (the node
now producing the site's output).  New nodes go in front of the P·V
contraction; its users are redirected; the old chain is left for dead-code
elimination (pipeline.py runs it once after all sites).
"""
from __future__ import annotations

import operator
from typing import Dict

import torch
import torch.fx as fx

from attn_compiler import layout
from attn_compiler import ops as _ops  # noqa: F401  registers torch.ops.attn_compiler


def rewrite(gm: fx.GraphModule, m, analysis, replaced: Dict[fx.Node, fx.Node]) -> fx.Node:
    g = gm.graph
    get = lambda n: replaced.get(n, n)  # noqa: E731  operands may be earlier sites' outputs
    anchor = m.pv.node
    created = []
    try:
        with g.inserting_before(anchor):
            def call(fn, *args):
                n = g.call_function(fn, args)
                n.meta["stack_trace"] = anchor.meta.get("stack_trace")
                created.append(n)
                return n

            q = call(layout.to_op_layout, get(m.q.node), m.q.labels, m.q.target)
            k = call(layout.to_op_layout, get(m.k.node), m.k.labels, m.k.target)
            v = call(layout.to_op_layout, get(m.v.node), m.v.labels, m.v.target)
            caps = [call(layout.captured_view, get(c.node), c.axes) for c in analysis.captures]
            seed = call(layout.dropout_seed, q) if analysis.spec.dropout_p > 0 else None
            res = call(torch.ops.attn_compiler.attention.default, q, k, v, caps,
                       analysis.spec.dumps(), seed)
            out = call(operator.getitem, res, 0)
            final = call(layout.from_op_layout, out, m.op_out_labels, m.out_labels)
    except Exception:
        for n in reversed(created):
            g.erase_node(n)
        raise
    anchor.replace_all_uses_with(final)
    replaced[anchor] = final
    return final
