"""nn.MultiheadAttention: with ``need_weights=True`` (its default) and the
weights dropped by the caller, the call is fused into the attention op and
computes what eager computes (outputs, input gradients and every parameter's
gradient, golden-relative to a float64 golden).  Calls whose weights are used,
or that the rewrite cannot express, are declined and left exactly as eager;
``need_weights=False`` (PyTorch already runs SDPA) is not a site at all.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable

import pytest
import torch
import torch.nn as nn

import attn_compiler
from attn_compiler.passes.pipeline import counters
from attn_compiler.testing import golden_check

B, L, E, NH = 2, 9, 32, 4
F32 = torch.float32


def _t(*shape, dtype=F32, grad=True):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def _pad(b=B, s=L, full_row=False):
    """(B, S) bool key_padding_mask, True = padding."""
    pad = torch.zeros(b, s, dtype=torch.bool)
    pad[0, s - 3:] = True
    pad[1, 5:] = True
    if full_row:
        pad[1, :] = True
    return pad


def _float_pad():
    """(B, S) additive float key_padding_mask: -inf at the padding."""
    return torch.zeros(B, L).masked_fill(_pad(), float("-inf"))


def _causal_bool(lq=L, lk=L):
    return torch.ones(lq, lk, dtype=torch.bool).triu(1)


def _per_head_float(lq=L, lk=L):
    """(B*H, Lq, Lk) float mask: random bias, two keys -inf for every query."""
    m = torch.randn(B * NH, lq, lk)
    m[:, :, 1] = float("-inf")
    m[:, :, lk - 1] = float("-inf")
    return m


class DropWeights(nn.Module):
    """Calls the attention module and drops the weights, as models do:
    ``out, _ = mha(q, k, v, ...)`` ("unpack") or ``mha(q, k, v, ...)[0]`` ("index")."""

    def __init__(self, mha: nn.MultiheadAttention, style: str = "unpack"):
        super().__init__()
        self.mha = mha
        self.style = style

    def forward(self, q, k, v, attn_mask=None, key_padding_mask=None):
        if self.style == "unpack":
            out, _ = self.mha(q, k, v, attn_mask=attn_mask, key_padding_mask=key_padding_mask)
            return out
        return self.mha(q, k, v, attn_mask=attn_mask, key_padding_mask=key_padding_mask)[0]


class SelfAttn(DropWeights):
    """Self-attention: the one input x is query, key and value."""

    def forward(self, x, attn_mask=None, key_padding_mask=None):
        return super().forward(x, x, x, attn_mask, key_padding_mask)


@dataclasses.dataclass
class Case:
    id: str
    build: Callable                  # () -> (module, [args])
    nan_rows: bool = False           # eager gives NaN (a fully padded row): ours must match


def _self(batch_first=True, style="unpack", attn_mask=None, pad=None, **ctor):
    def build():
        m = SelfAttn(nn.MultiheadAttention(E, NH, batch_first=batch_first, **ctor), style)
        x = _t(B, L, E) if batch_first else _t(L, B, E)
        return m, [x, attn_mask() if attn_mask else None, pad() if pad else None]
    return build


def _cross(batch_first=True, lq=7, lk=11, kdim=None, vdim=None, attn_mask=None, pad=None, style="index"):
    def build():
        m = DropWeights(nn.MultiheadAttention(E, NH, batch_first=batch_first, kdim=kdim, vdim=vdim), style)
        kd, vd = kdim or E, vdim or E
        if batch_first:
            q, k, v = _t(B, lq, E), _t(B, lk, kd), _t(B, lk, vd)
        else:
            q, k, v = _t(lq, B, E), _t(lk, B, kd), _t(lk, B, vd)
        return m, [q, k, v, attn_mask() if attn_mask else None, pad() if pad else None]
    return build


CASES = [
    Case("self_batch_first_unpack", _self(True, "unpack")),
    Case("self_seq_first_index", _self(False, "index")),
    Case("self_no_bias", _self(True, bias=False)),
    Case("cross_batch_first_same_dims", _cross(True)),
    Case("cross_seq_first_same_dims", _cross(False, style="unpack")),
    Case("cross_kdim_vdim_batch_first", _cross(True, kdim=24, vdim=20)),
    Case("cross_kdim_vdim_seq_first", _cross(False, kdim=24, vdim=20)),
    Case("causal_bool_2d", _self(True, attn_mask=_causal_bool)),
    Case("causal_float_generate_square_subsequent_mask",
         _self(False, attn_mask=lambda: nn.Transformer.generate_square_subsequent_mask(L))),
    Case("per_head_float_3d", _self(True, attn_mask=_per_head_float)),
    Case("per_head_float_3d_cross", _cross(True, attn_mask=lambda: _per_head_float(7, 11))),
    Case("key_padding_bool", _self(True, pad=_pad)),
    Case("key_padding_bool_cross_kdim", _cross(False, kdim=24, vdim=20, pad=lambda: _pad(s=11))),
    Case("key_padding_fully_padded_row", _self(True, pad=lambda: _pad(full_row=True)), nan_rows=True),
    Case("causal_and_key_padding", _self(True, attn_mask=_causal_bool, pad=_pad)),
    Case("per_head_and_float_key_padding", _self(False, attn_mask=_per_head_float, pad=_float_pad)),
]


def _to64(a):
    if isinstance(a, torch.Tensor) and a.dtype.is_floating_point:
        return a.detach().double().requires_grad_(a.requires_grad)
    return a


def _wrt(m, args):
    return [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad] + \
        [p for p in m.parameters() if p.requires_grad]


def _names(m, args):
    return [f"arg{i}" for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad] + \
        [n for n, p in m.named_parameters() if p.requires_grad]


def _fused_mha(rows, sites=1):
    fused = [r for r in rows if r.status == "fused"]
    others = [(r.status, r.reason) for r in rows if r.status != "fused"]
    assert len(fused) == sites and not others, f"fused {len(fused)}, others {others}"
    for r in fused:
        assert r.features.get("module") == "nn.MultiheadAttention", r.features
    return fused


def _compile(m):
    torch._dynamo.reset()
    attn_compiler.reset()
    return torch.compile(m, backend=attn_compiler.backend(inner="aot_eager"))


def check(case: Case, backward=True):
    torch.manual_seed(0)
    m, args = case.build()
    m64 = copy.deepcopy(m).double()
    args64 = [_to64(a) for a in args]
    before = counters["fused"]
    ours = _compile(m)(*args)
    _fused_mha(list(attn_compiler.report()))
    assert counters["fused"] - before == 1
    eager = m(*args)
    golden = m64(*args64)
    if case.nan_rows:
        assert torch.isnan(eager).any(), "the case was meant to give NaN rows in eager"
        assert torch.equal(torch.isnan(ours), torch.isnan(eager)), "NaN rows differ from eager"
    golden_check(ours, eager, golden, name=f"{case.id} out")
    if not backward:
        return
    cot = torch.randn(golden.shape, dtype=torch.float64)
    g_ours = torch.autograd.grad(ours, _wrt(m, args), cot.float())
    g_eager = torch.autograd.grad(eager, _wrt(m, args), cot.float())
    g_gold = torch.autograd.grad(golden, _wrt(m64, args64), cot)
    for name, a, b, c in zip(_names(m, args), g_ours, g_eager, g_gold):
        if case.nan_rows:
            assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{name}: NaN positions differ from eager"
        golden_check(a, b, c, name=f"{case.id} d{name}")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_mha_weights_dropped_fused(case):
    check(case)


class DeadWeights(SelfAttn):
    """WavLM (transformers): the weights are broadcast to every head and then
    dropped; dynamo keeps the dead ops in the graph."""

    def forward(self, x, attn_mask=None, key_padding_mask=None):
        out, w = self.mha(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask)
        w = w[:, None].broadcast_to(w.shape[:1] + (NH,) + w.shape[1:])
        return out


def test_mha_weights_only_feeding_dead_ops_fused():
    def build():
        m = DeadWeights(nn.MultiheadAttention(E, NH, batch_first=True))
        return m, [_t(B, L, E), None, _pad()]
    check(Case("dead_weights", build))


class WeightsAssigned(SelfAttn):
    """The weights reach the output only through an assignment into another
    tensor (``store[0] = w``): a use, though the assignment has no users."""

    def forward(self, x, attn_mask=None, key_padding_mask=None):
        out, w = self.mha(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask)
        store = torch.zeros((2,) + tuple(w.shape), dtype=w.dtype)
        store[0] = w
        return out, store


def test_mha_weights_assigned_elsewhere_declined():
    torch.manual_seed(0)
    m = WeightsAssigned(nn.MultiheadAttention(E, NH, batch_first=True))
    rows = _exactly_eager(m, [_t(B, L, E), None, _pad()])
    assert [r.status for r in rows] == ["declined"], [(r.status, r.reason) for r in rows]


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_mha_eval_no_grad(batch_first):
    """Inference: eval mode under no_grad (eager may take its fast path)."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, NH, dropout=0.1, batch_first=batch_first).eval()
    m = SelfAttn(mha)
    m64 = copy.deepcopy(m).double()
    x = _t(B, L, E, grad=False) if batch_first else _t(L, B, E, grad=False)
    pad = _pad()
    with torch.no_grad():
        ours = _compile(m)(x, None, pad)
        eager = m(x, None, pad)
        golden = m64(x.double(), None, pad)
    rows = list(attn_compiler.report())
    _fused_mha(rows)
    assert rows[0].features.get("dropout") == 0.0, rows[0].features
    golden_check(ours, eager, golden, name="eval out")


def test_mha_dropout_train_and_eval():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, NH, dropout=0.2, batch_first=True)
    m = SelfAttn(mha).train()
    x = _t(B, L, E)
    compiled = _compile(m)
    outs = [compiled(x) for _ in range(32)]
    (row,) = _fused_mha(list(attn_compiler.report()))
    assert row.features.get("dropout") == pytest.approx(0.2), row.features
    assert all(torch.isfinite(o).all() for o in outs)
    assert not torch.equal(outs[0], outs[1]), "two training calls gave the same output: no dropout?"
    grads = torch.autograd.grad(outs[0].sum(), [x, mha.in_proj_weight, mha.out_proj.weight])
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    # eval: equal to eager without dropout
    m.eval()
    m64 = copy.deepcopy(m).double()
    ours = _compile(m)(x)
    _fused_mha(list(attn_compiler.report()))
    eager = m(x)
    golden_check(ours, eager, m64(_to64(x)), name="eval out")
    # the mean over training calls is close to the eval output (E[keep / (1-p)] = 1)
    rel = (torch.stack(outs).mean(0) - eager).norm() / eager.norm()
    assert rel < 0.2, f"mean of 32 dropout outputs is {rel:.3f} (relative) from the eval output"


# ---- not fused: exactly eager -------------------------------------------------------------

class WeightsReturned(nn.Module):
    def __init__(self, **ctor):
        super().__init__()
        self.mha = nn.MultiheadAttention(E, NH, batch_first=True, **ctor)

    def forward(self, x, key_padding_mask=None):
        return self.mha(x, x, x, key_padding_mask=key_padding_mask)


class WeightsUsed(WeightsReturned):
    """The head-averaged weights feed a regulariser added to the output."""

    def forward(self, x, key_padding_mask=None):
        out, w = self.mha(x, x, x, key_padding_mask=key_padding_mask)
        return out + w.sum(dim=-1, keepdim=True).mean(dim=1, keepdim=True)


class NoWeights(WeightsReturned):
    def forward(self, x, key_padding_mask=None):
        out, w = self.mha(x, x, x, key_padding_mask=key_padding_mask, need_weights=False)
        assert w is None
        return out


def _flat(o):
    return list(o) if isinstance(o, (tuple, list)) else [o]


def _exactly_eager(m, args):
    """Compile and run; every output and every gradient equals eager's."""
    torch.manual_seed(0)
    ours = _flat(_compile(m)(*args))
    rows = list(attn_compiler.report())
    eager = _flat(m(*args))
    assert len(ours) == len(eager)
    for a, b in zip(ours, eager):
        torch.testing.assert_close(a, b)
    wrt = _wrt(m, args)
    cots = [torch.randn_like(o) for o in eager]
    g_ours = torch.autograd.grad(ours, wrt, cots, allow_unused=True)
    g_eager = torch.autograd.grad(eager, wrt, cots, allow_unused=True)
    for a, b in zip(g_ours, g_eager):
        if a is not None or b is not None:
            torch.testing.assert_close(a, b)
    return rows


@pytest.mark.parametrize("cls", [WeightsReturned, WeightsUsed], ids=["returned", "used"])
def test_mha_weights_used_declined(cls):
    torch.manual_seed(0)
    before = counters["declined"]
    rows = _exactly_eager(cls(), [_t(B, L, E), _pad()])
    assert [r.status for r in rows] == ["declined"], [(r.status, r.reason) for r in rows]
    assert "weight" in rows[0].reason.lower(), rows[0].reason
    assert counters["declined"] - before == 1


def test_mha_need_weights_false_not_a_site():
    torch.manual_seed(0)
    rows = _exactly_eager(NoWeights(), [_t(B, L, E), _pad()])
    assert rows == [], [(r.status, r.reason) for r in rows]


def test_mha_add_bias_kv_declined():
    torch.manual_seed(0)
    m = DropWeights(nn.MultiheadAttention(E, NH, batch_first=True, add_bias_kv=True))
    x = _t(B, L, E)
    rows = _exactly_eager(m, [x, x, x])
    assert [r.status for r in rows] == ["declined"], [(r.status, r.reason) for r in rows]
    reason = rows[0].reason
    assert reason and not reason.startswith("internal error") and "bias" in reason.lower(), reason


def test_mha_mismatched_mask_types_same_as_eager():
    """A float attn_mask with a bool key_padding_mask (deprecated by PyTorch: it
    warns, and dynamo breaks the graph at the warning).  Whatever is fused or
    not, the numbers are eager's (golden-relative)."""
    torch.manual_seed(0)
    m = SelfAttn(nn.MultiheadAttention(E, NH))
    m64 = copy.deepcopy(m).double()
    x, mask, pad = _t(L, B, E), _per_head_float(), _pad()
    ours = _compile(m)(x, mask, pad)
    rows = list(attn_compiler.report())
    assert all(not r.reason.startswith("internal error") for r in rows), [r.reason for r in rows]
    x64 = _to64(x)
    eager, golden = m(x, mask, pad), m64(x64, mask.double(), pad)
    golden_check(ours, eager, golden, name="out")
    cot = torch.randn(golden.shape, dtype=torch.float64)
    for name, a, b, c in zip(["x"] + [n for n, _ in m.named_parameters()],
                             torch.autograd.grad(ours, _wrt(m, [x]), cot.float()),
                             torch.autograd.grad(eager, _wrt(m, [x]), cot.float()),
                             torch.autograd.grad(golden, _wrt(m64, [x64]), cot)):
        golden_check(a, b, c, name=f"d{name}")


def test_transformer_encoder_layer_train_same_as_eager():
    """nn.TransformerEncoderLayer calls its attention with need_weights=False:
    whatever the backend does with it, the numbers are eager's (train mode,
    dropout 0 so that both runs are deterministic)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, NH, 64, dropout=0.0, batch_first=True).train()
    x = _t(B, L, E)
    rows = _exactly_eager(layer, [x, None, None, False])  # src, src_mask, src_key_padding_mask, is_causal
    for r in rows:
        assert r.status in ("fused", "declined")
        assert not r.reason.startswith("internal error"), r.reason


def test_unread_in_place_view_is_kept():
    """``drop_unread`` erases views nothing reads, but not one written in
    place (``y.unsqueeze_(0)``: its result is unused, its input changed)."""
    import torch.fx as fx

    from attn_compiler.passes.pipeline import drop_unread

    def f(x):
        y = x * 2
        y.unsqueeze_(0)
        y.transpose(0, 1)          # unread: erased
        return y.transpose(0, 1)
    gm = fx.symbolic_trace(f)
    x = torch.randn(3, 4)
    want = gm(x)
    assert drop_unread(gm) == 1
    gm.recompile()
    assert torch.equal(gm(x), want)
