"""Operator spellings that other torch versions record: dynamo in torch 2.11
writes ``a == b`` as ``a.__eq__(b)`` (a call_method of the dunder), where
2.13 writes ``operator.eq(a, b)``.  The pass must read both the same way."""
import operator

import torch
import torch.fx as fx

from attn_compiler.passes.pipeline import attention_pass

_DUNDER = {operator.eq: "__eq__", operator.ne: "__ne__", operator.mul: "__mul__",
           operator.truediv: "__truediv__", operator.add: "__add__", operator.invert: "__invert__",
           operator.and_: "__and__", operator.getitem: "__getitem__", operator.sub: "__sub__"}


def causal_padded(q, k, v, pad):
    n = q.shape[-2]
    i = torch.arange(n)
    keep = (i[None, :] <= i[:, None]) & (pad[:, None, None, :] != 0)
    s = (q @ k.transpose(-1, -2)) / 4.0
    s = s.masked_fill(~keep, float("-inf"))
    s = s.masked_fill(torch.tril(torch.ones(n, n)) == 0, float("-inf"))
    return s.softmax(-1) @ v


def _as_dunder_methods(gm: fx.GraphModule) -> int:
    """Rewrite operator.* calls as tensor dunder method calls; how many."""
    count = 0
    for n in list(gm.graph.nodes):
        if n.op == "call_function" and n.target in _DUNDER:
            n.op, n.target = "call_method", _DUNDER[n.target]
            count += 1
    gm.recompile()
    return count


def test_dunder_method_graph_is_read_like_operator_graph():
    q, k, v = (torch.randn(2, 3, 9, 16) for _ in range(3))
    pad = torch.ones(2, 9)
    pad[1, -2:] = 0
    seen = {}

    def backend(gm, example_inputs):
        seen["rewritten"] = _as_dunder_methods(gm)
        seen["sites"] = attention_pass(gm, example_inputs)
        return gm

    torch._dynamo.reset()
    out = torch.compile(causal_padded, backend=backend)(q, k, v, pad)
    assert seen["rewritten"] >= 5
    sites = seen["sites"]
    assert [s.status for s in sites] == ["fused"], [s.reason for s in sites]
    assert sites[0].features["mask"] == "causal+tensor"
    torch.testing.assert_close(out, causal_padded(q, k, v, pad))
