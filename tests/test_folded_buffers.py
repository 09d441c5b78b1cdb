"""Registered buffers read as constant masks ([Note: folded buffers] in
attn_compiler/backend.py): a band buffer (nanoGPT's tril, a key-padding row)
becomes an index predicate at compile time; when the model later writes the
buffer in place or puts another tensor in its place, the compiled graph must
follow the buffer, as eager and plain inductor do, not keep the old mask."""
from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attn_compiler
from attn_compiler.backend import _FoldGuard, _snapshot

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class TrilBuffer(nn.Module):
    """nanoGPT's causal self-attention core: ``bias`` a registered tril buffer."""

    def __init__(self, n: int = 32) -> None:
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(n, n)).view(1, 1, n, n))

    def forward(self, q, k, v):
        T = q.shape[-2]
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        return F.softmax(att, dim=-1) @ v


class KeyKeepBuffer(nn.Module):
    """A key-padding row kept in a boolean buffer (the first 10 keys)."""

    def __init__(self, n: int = 13) -> None:
        super().__init__()
        keep = torch.ones(1, 1, 1, n, dtype=torch.bool)
        keep[..., 10:] = False
        self.register_buffer("keep", keep)

    def forward(self, q, k, v):
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        return s.masked_fill(~self.keep, float("-inf")).softmax(-1) @ v


def _qkv(seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4, 13, 16, generator=g).requires_grad_(grad) for _ in range(3)]


def _compile(m, inner="aot_eager"):
    torch._dynamo.reset()
    attn_compiler.reset()
    return torch.compile(m, backend=attn_compiler.backend(inner=inner))


def _fused_masks():
    return [s.features.get("mask") for s in attn_compiler.report().fused]


@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
def test_tril_buffer_written_in_place(inner, caplog):
    """The tril buffer is read as causal; after ``copy_`` of a sliding window
    into it, the compiled model gives the window's answer (with a warning)."""
    m = TrilBuffer()
    cm = _compile(m, inner)
    q, k, v = _qkv()
    torch.testing.assert_close(cm(q, k, v), m(q, k, v))
    assert _fused_masks() == ["causal"]
    m.bias.copy_(torch.tril(torch.ones(32, 32)).triu(-3).view(1, 1, 32, 32))
    with caplog.at_level(logging.WARNING, logger="attn_compiler"):
        torch.testing.assert_close(cm(q, k, v), m(q, k, v))
    assert "read as a constant mask was changed" in caplog.text
    torch.testing.assert_close(cm(q, k, v), m(q, k, v))          # and from then on


def test_key_padding_buffer_written_through_a_view():
    """A write through a view of the buffer (``keep[..., 5:] = False``) bumps
    the version counter the guard reads."""
    m = KeyKeepBuffer()
    cm = _compile(m)
    q, k, v = _qkv(1)
    torch.testing.assert_close(cm(q, k, v), m(q, k, v))
    assert len(attn_compiler.report().fused) == 1
    view = m.keep.view(13)
    view[5:] = False
    torch.testing.assert_close(cm(q, k, v), m(q, k, v))


def _step_matches(cm, m, seed):
    q, k, v = _qkv(seed, grad=True)
    qe, ke, ve = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, want = cm(q, k, v), m(qe, ke, ve)
    torch.testing.assert_close(out, want)
    out.sum().backward()
    want.sum().backward()
    for a, b in zip((q, k, v), (qe, ke, ve)):
        torch.testing.assert_close(a.grad, b.grad)


def test_buffer_replaced_and_gradients_follow():
    """Another tensor put in the buffer's place, then another storage under
    the same tensor (``.data``): the training step (outputs and gradients)
    follows the mask each time."""
    m = TrilBuffer()
    cm = _compile(m)
    _step_matches(cm, m, 2)
    m.bias = torch.tril(torch.ones(32, 32), diagonal=2).view(1, 1, 32, 32)
    _step_matches(cm, m, 3)
    m.bias.data = torch.tril(torch.ones(32, 32)).triu(-2).view(1, 1, 32, 32)
    _step_matches(cm, m, 4)


def test_unchanged_buffer_keeps_the_fused_graph(caplog):
    """No write: every call runs the fused graph and nothing is recompiled."""
    m = TrilBuffer()
    cm = _compile(m)
    with caplog.at_level(logging.WARNING, logger="attn_compiler"):
        for seed in range(3):
            q, k, v = _qkv(seed)
            torch.testing.assert_close(cm(q, k, v), m(q, k, v))
    assert "changed" not in caplog.text
    assert attn_compiler.report().fused


def test_graph_without_foldable_inputs_is_not_wrapped():
    """Only graphs that read a buffer or a constant pay for a snapshot and the check."""
    def f(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2), -1) @ v

    gm = torch.fx.symbolic_trace(f)
    assert _snapshot(gm) is None
    seen = []

    def inner(gm, example_inputs):
        seen.append(gm)
        return gm.forward

    compiled = attn_compiler.backend(inner=inner)(gm, _qkv())
    assert len(seen) == 1 and not isinstance(compiled, _FoldGuard)


def test_a_failed_recompile_runs_the_graph_as_written(caplog):
    """Should compiling the original graph fail after a change, the graph
    module itself runs (eagerly), still following the buffer."""
    calls = []

    def inner(gm, example_inputs):
        calls.append(gm)
        if len(calls) > 1:
            raise RuntimeError("no second compile here")
        return gm.forward

    m = TrilBuffer()
    torch._dynamo.reset()
    attn_compiler.reset()
    cm = torch.compile(m, backend=attn_compiler.backend(inner=inner))
    q, k, v = _qkv(5)
    torch.testing.assert_close(cm(q, k, v), m(q, k, v))
    m.bias.copy_(torch.tril(torch.ones(32, 32)).triu(-1).view(1, 1, 32, 32))
    with caplog.at_level(logging.WARNING, logger="attn_compiler"):
        torch.testing.assert_close(cm(q, k, v), m(q, k, v))
    assert "runs eagerly" in caplog.text and len(calls) == 2
