"""The compile-time check of folded masks: a wrong folding declines the site."""
import sympy
import torch
import torch.fx as fx

import attn_compiler
from attn_compiler.passes.analyze import side as side_module
from attn_compiler.passes.analyze.values import AX, Val
from attn_compiler.passes.analyze.verify import SideChecker


def _tril_graph():
    def f(ones, x):
        return torch.tril(ones) + x
    gm = fx.symbolic_trace(f)
    node = next(nd for nd in gm.graph.nodes if nd.target is torch.tril)
    return gm, node


def test_checker_accepts_the_right_form_and_rejects_a_wrong_one():
    gm, node = _tril_graph()
    checker = SideChecker(gm, [torch.ones(7, 7), torch.zeros(7, 7)])
    right = Val(sympy.Piecewise((1, AX[0] <= AX[1]), (0, True)), (7, 7))
    wrong = Val(sympy.Piecewise((1, AX[0] < AX[1]), (0, True)), (7, 7))
    assert checker.check(node, right, {}) is None
    assert "does not match" in checker.check(node, wrong, {})


def causal(q, k, v):
    n = q.shape[-2]
    s = (q @ k.transpose(-1, -2)).masked_fill(torch.tril(torch.ones(n, n)) == 0, float("-inf"))
    return s.softmax(-1) @ v


def _assert_causal_declined(words, inner):
    """Compile ``causal``: one site, declined with ``words`` in the reason,
    and the numbers exactly eager's."""
    q, k, v = (torch.randn(2, 3, 9, 8) for _ in range(3))
    torch._dynamo.reset()
    attn_compiler.reset()
    out = torch.compile(causal, backend=attn_compiler.backend(inner=inner))(q, k, v)
    rep = attn_compiler.report()
    assert len(rep.declined) == 1 and words in rep.declined[0].reason, str(rep)
    torch.testing.assert_close(out, causal(q, k, v))


def test_a_wrong_folding_declines_the_site(monkeypatch):
    original = side_module.SideValues.side_op

    def off_by_one(self, node, op):  # a deliberately wrong reading of tril
        v = original(self, node, op)
        if op.name == "tril":
            v = Val(v.expr.xreplace({AX[0]: AX[0] + 1}), v.shape)
        return v

    monkeypatch.setattr(side_module.SideValues, "side_op", off_by_one)
    _assert_causal_declined("does not match", inner="eager")


def bias_written_in_place(q, k, v, bias):
    n = q.shape[-2]
    bias.add_(torch.ones(n, n).tril())  # not idempotent: a second write would show
    s = q @ k.transpose(-1, -2) + bias
    return s.softmax(-1) @ v


def test_the_check_never_writes_the_users_tensors():
    q, k, v = (torch.randn(2, 3, 7, 8) for _ in range(3))
    bias = torch.zeros(7, 7)
    torch._dynamo.reset()
    attn_compiler.reset()
    out = torch.compile(bias_written_in_place, backend=attn_compiler.backend(inner="eager"))(
        q, k, v, bias)
    # the write is not folded: the op reads the written bias, as the model does
    assert len(attn_compiler.report().fused) == 1
    assert torch.equal(bias, torch.ones(7, 7).tril())  # written once, by the model
    torch.testing.assert_close(out, bias_written_in_place(q, k, v, torch.zeros(7, 7)))


def test_a_broken_rewrite_is_declined_before_it_reaches_the_model(monkeypatch):
    from attn_compiler import layout

    original = layout.to_op_layout

    def wrong_layout(x, labels, target, heads=None):  # a bug of ours: drops a query row
        y = original(x, labels, target, heads)
        return y[..., 1:, :] if target.endswith("ij") else y  # the query's layout

    monkeypatch.setattr(layout, "to_op_layout", wrong_layout)
    _assert_causal_declined("internal error", inner="aot_eager")
