"""A graph break between Q·Kᵀ and the softmax: the attention is split over two
graphs, so it cannot be fused; the report must say so instead of staying
silent."""
import torch

import attn_compiler


def split_attention(q, k, v):
    s = q @ k.transpose(-1, -2) / 8 ** 0.5
    torch._dynamo.graph_break()
    return torch.softmax(s, -1) @ v


def test_graph_break_is_reported_and_numbers_unchanged():
    q, k, v = (torch.randn(2, 4, 12, 8) for _ in range(3))
    torch._dynamo.reset()
    out = torch.compile(split_attention, backend=attn_compiler.backend(inner="aot_eager"))(q, k, v)
    rep = attn_compiler.report()
    assert len(rep) == 1 and rep[0].status == "declined", str(rep)
    assert "graph break" in rep[0].reason
    torch.testing.assert_close(out, split_attention(q, k, v))


def plain_softmax_of_input(x, v):
    return torch.softmax(x, -1) @ v   # a softmax of an input with no Q·Kᵀ anywhere


def test_softmax_of_an_input_matrix_is_reported_as_split():
    x, v = torch.randn(2, 4, 12, 12), torch.randn(2, 4, 12, 8)
    torch._dynamo.reset()
    torch.compile(plain_softmax_of_input, backend=attn_compiler.backend(inner="eager"))(x, v)
    rep = attn_compiler.report()
    # softmax(x) @ v of a graph input is attention-shaped; the scores were made elsewhere
    assert [r.status for r in rep] == ["declined"]
