"""Grammar-based fuzzing of how and where hand-written attention is called,
and of more mask spellings (the second grammar; tests/test_fuzz_forms.py draws
the spellings of the site itself).  A fixed seed draws small attention layers
and the context they run in:

- calling context: training with backward, ``torch.no_grad()``,
  ``torch.inference_mode()``, ``torch.autocast("cpu", dtype=torch.bfloat16)``
  around a float32 module, ``torch.compile(dynamic=True)`` called at two
  sequence lengths, two layers of the same code (different weights) in one
  graph;
- inputs: q/k/v from projections, contiguous (B, H, L, D) leaves, or (B, L,
  H, D) leaves transposed without ``.contiguous()``; batch 1 or 2; a decode
  step (Lq = 1 against a KV cache grown by ``torch.cat([past_k, k], dim=2)``);
  head dims 8, 24, 40;
- masks: a 0/1 int64 or float padding mask made additive in the graph with
  ``(1.0 - m[:, None, None, :].to(dtype)) * finfo.min`` or ``* -10000.0``;
  ``~mask.bool()`` / ``mask == 0`` / ``~mask`` into ``masked_fill``; an
  additive ``torch.where(mask, 0.0, float("-inf"))``; a causal
  ``torch.ones(Lq, Lk).tril() == 0``; causal and padding combined by ``&`` or
  ``|``; a causal mask sliced from a larger registered buffer by the current
  lengths; T5's learned relative position bias (an ``nn.Embedding`` over
  bucketed relative positions);
- and the first grammar's basic spellings (Q·Kᵀ by ``@``/``matmul``/``einsum``,
  softmax with or without a float32 upcast, P·V by ``@``/``matmul``).

Each case is compiled with the backend and checked as test_fuzz_forms checks
its cases: nothing escapes (compile, call, backward); outputs and the
gradients of every input and parameter match eager golden-relative (eager in
the same context: under autocast, eager under the same autocast; no gradients
under no_grad / inference_mode; a dynamic case at both lengths); the report
has one row per site per compiled graph, fused or declined with a reason that
is not an internal error, and every case here is made of spellings the README
lists as matched, so every site must be fused.

Failures the grammar found under other seeds are kept as regression cases
(``PINNED``, ``test_fuzz_context_pinned``; see the note above them).

To re-run one case outside pytest (from tests/)::

    from test_fuzz_contexts import FORMS, run_case
    failures = {}; run_case(FORMS[7], failures); print(failures)
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import random
from typing import List

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torch._dynamo.utils import counters as dynamo_counters

import attn_compiler
from forms import t5_relative_position_bucket                      # tests/ is on sys.path under pytest
from test_fuzz_forms import _check, _flat, _keep, _to64, _wrt, balanced_columns, check_row
from test_forms import _implementation

F32, BF16 = torch.float32, torch.bfloat16
SEED = 20240612
N_CASES = 90
LMAX = 32            # the registered causal buffer's size (larger than any length drawn)
T5_BUCKETS, T5_MAX_DISTANCE = 16, 32

CONTEXTS = ["train", "no_grad", "inference_mode", "autocast", "dynamic", "two_layers"]
AXES = {
    "context": CONTEXTS,
    "layout": ["proj", "bhld", "blhd_t"],
    "mask": ["none", "ext_finfo", "ext_1e4", "fill_bool", "fill_eq0", "fill_invert", "where_additive",
             "causal_tril_eq0", "causal_and_pad", "causal_or_pad", "buffer_slice"],
    "bias": ["none", "none", "t5"],
    "D": [8, 24, 40],
    "B": [1, 2],
    "scores": ["at", "matmul", "einsum"],
    "scale": ["div_sqrt", "mul", "none"],
    "softmax": ["plain", "upcast", "dtype"],
    "out": ["at", "matmul"],
}
# the padding mask's dtype each mask spelling takes (int64 / float 0/1, or bool)
MASK_DTYPES = {
    "ext_finfo": ["long", "float"], "ext_1e4": ["long", "float"], "fill_bool": ["long", "float"],
    "fill_eq0": ["long", "float", "bool"], "fill_invert": ["bool"], "where_additive": ["bool"],
    "causal_and_pad": ["long", "float", "bool"], "causal_or_pad": ["long", "float", "bool"],
}
CAUSAL_MASKS = {"causal_tril_eq0", "causal_and_pad", "causal_or_pad", "buffer_slice"}
FILLS = ["-inf", "finfo.min", "-1e9", "-1e4"]


@dataclasses.dataclass(frozen=True)
class Form:
    idx: int
    context: str
    layout: str
    decode: bool
    B: int
    H: int
    L: int                   # query length (self-attention), or the cache length before the step (decode)
    L2: int                  # the second call's length (context "dynamic")
    D: int
    mask: str
    mask_dtype: str          # "long" / "float" / "bool" (masks read from a (B, Lk) input)
    fill: str                # masked_fill / where fill
    buffer_variant: str      # buffer_slice: "bool_where" (GPT-2) or "additive" (a -inf triu buffer added)
    bias: str
    t5_bidirectional: bool
    scores: str
    scale: str
    softmax: str
    out: str
    out_proj: bool
    autocast_inside: bool    # autocast: entered inside the compiled module's forward, not around the call

    @property
    def Lq(self) -> int:
        return 1 if self.decode else self.L

    @property
    def Lk(self) -> int:
        return self.L + 1 if self.decode else self.L

    def describe(self) -> str:
        f = self
        lengths = (f"decode: Lq=1, cache {f.L} (+1)" + (f", then cache {f.L2}" if f.context == "dynamic" else "")
                   if f.decode else f"L={f.L}" + (f", then L={f.L2}" if f.context == "dynamic" else ""))
        mask = f.mask
        if f.mask in MASK_DTYPES:
            mask += f" ({f.mask_dtype} mask)"
        if f.mask in ("fill_bool", "fill_eq0", "fill_invert", "causal_tril_eq0", "causal_and_pad",
                      "causal_or_pad") or (f.mask == "buffer_slice" and f.buffer_variant == "bool_where"):
            mask += f" fill={f.fill}"
        if f.mask == "buffer_slice":
            mask += f" ({f.buffer_variant})"
        context = f.context + (" (inside forward)" if f.context == "autocast" and f.autocast_inside else "")
        return "\n".join([
            f"case{f.idx:03d}: context={context} layout={f.layout} B={f.B} H={f.H} D={f.D} {lengths}",
            f"  mask={mask} bias={f.bias}" + (f" (bidirectional={f.t5_bidirectional})" if f.bias == "t5" else ""),
            f"  scores={f.scores} scale={f.scale} softmax={f.softmax} out={f.out} out_proj={f.out_proj}"])


def _draw_forms(n: int = N_CASES, seed: int = SEED) -> List[Form]:
    rng = random.Random(seed)
    columns = balanced_columns(AXES, n, rng)
    # a third of each context's cases are decode steps; each padding spelling
    # takes its mask dtypes in turn
    decode_of = {}
    for ctx in CONTEXTS:
        idx = [i for i in range(n) if columns["context"][i] == ctx]
        flags = [j % 3 == 0 for j in range(len(idx))]
        rng.shuffle(flags)
        decode_of.update(zip(idx, flags))
    seen_mask = {}
    forms = []
    for i in range(n):
        c = {axis: columns[axis][i] for axis in AXES}
        decode = decode_of[i]
        k = seen_mask[c["mask"]] = seen_mask.get(c["mask"], -1) + 1
        dtypes = MASK_DTYPES.get(c["mask"], ["bool"])
        lo, hi = (4, 23) if decode else (5, 24)         # decode: Lk = cache + 1 <= 24
        L = rng.randint(lo, hi)
        L2 = L
        while L2 == L:
            L2 = rng.randint(lo, hi)
        layout = "proj" if c["context"] == "two_layers" else c["layout"]
        forms.append(Form(
            idx=i, context=c["context"], layout=layout, decode=decode, B=c["B"], H=rng.choice([2, 4]),
            L=L, L2=L2, D=c["D"], mask=c["mask"],
            mask_dtype=dtypes[k % len(dtypes)], fill=rng.choice(FILLS),
            buffer_variant=rng.choice(["bool_where", "additive"]), bias=c["bias"],
            t5_bidirectional=rng.random() < 0.5, scores=c["scores"], scale=c["scale"], softmax=c["softmax"],
            out=c["out"], out_proj=layout == "proj" or rng.random() < 0.3,
            autocast_inside=rng.random() < 0.5))
    return forms


FORMS = _draw_forms()


# ---- the module a form describes ----------------------------------------------------------

class ContextAttention(nn.Module):
    """One attention layer, written as the form says.  ``forward(*qkv_or_x,
    [past_k, past_v], [mask])``: q/k/v leaves (layouts "bhld", "blhd_t") or
    the hidden states x ("proj"); with ``decode`` the layer's KV cache; with a
    padding mask spelling the (B, Lk) mask."""

    def __init__(self, f: Form):
        super().__init__()
        self.f = f
        H, D = f.H, f.D
        dim = H * D
        if f.layout == "proj":
            self.q_proj = nn.Linear(dim, dim)
            # no bias on K's projection: its gradient is exactly 0 (softmax is
            # shift-invariant per row), see test_fuzz_forms.FuzzAttention
            self.k_proj = nn.Linear(dim, dim, bias=False)
            self.v_proj = nn.Linear(dim, dim)
        if f.out_proj:
            self.o_proj = nn.Linear(dim, dim)
        if f.mask == "buffer_slice":
            if f.buffer_variant == "bool_where":
                causal = torch.tril(torch.ones(LMAX, LMAX, dtype=torch.bool))
                self.register_buffer("causal", causal.view(1, 1, LMAX, LMAX), persistent=False)
            else:
                self.register_buffer("causal", torch.full((LMAX, LMAX), float("-inf")).triu(1), persistent=False)
        if f.bias == "t5":
            self.relative_attention_bias = nn.Embedding(T5_BUCKETS, H)
            with torch.no_grad():
                self.relative_attention_bias.weight.mul_(0.5)
        # the softmax's upcast: float32 as model code writes it; float64 in the
        # golden's copy (``golden_copy``), else the golden would round its
        # softmax to float32 as eager does, and eager's error would read as
        # almost 0 (a decode row whose P is ~1 at one key: dK's cancellation)
        self.upcast = F32

    # -- q, k, v ---------------------------------------------------------------
    def _heads(self, t):
        b, n, _ = t.shape
        return t.view(b, n, self.f.H, self.f.D).transpose(1, 2)

    def _qkv(self, inputs):
        f = self.f
        if f.layout == "proj":
            x, rest = inputs[0], list(inputs[1:])
            q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        else:
            (q, k, v), rest = inputs[:3], list(inputs[3:])
            if f.layout == "blhd_t":          # (B, L, H, D) -> (B, H, L, D), not made contiguous
                q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if f.decode:
            past_k, past_v = rest[:2]
            rest = rest[2:]
            k = torch.cat([past_k, k], dim=2)
            v = torch.cat([past_v, v], dim=2)
        return q, k, v, (rest[0] if rest else None)

    def compute_bias(self, Lq, Lk, device):
        """T5's position bias, (1, H, Lq, Lk); the queries sit at the end of the keys (a cache)."""
        context_position = torch.arange(Lq, dtype=torch.long, device=device)[:, None] + (Lk - Lq)
        memory_position = torch.arange(Lk, dtype=torch.long, device=device)[None, :]
        relative_position = memory_position - context_position
        buckets = t5_relative_position_bucket(relative_position, self.f.t5_bidirectional, T5_BUCKETS,
                                              T5_MAX_DISTANCE)
        values = self.relative_attention_bias(buckets)                     # (Lq, Lk, H)
        return values.permute([2, 0, 1]).unsqueeze(0)

    def _fill(self, s):
        return {"-inf": float("-inf"), "finfo.min": torch.finfo(s.dtype).min,
                "-1e9": -1e9, "-1e4": -1e4}[self.f.fill]

    def _causal_ones(self, Lq, Lk, device):
        """``torch.ones(L, L).tril()``; in a decode step offset to the cache's end."""
        if not self.f.decode:
            return torch.ones(Lq, Lk, device=device).tril()
        return torch.ones(Lq, Lk, device=device).tril(Lk - Lq)

    # -- the site --------------------------------------------------------------
    def forward(self, *inputs):
        f = self.f
        q, k, v, mask = self._qkv(inputs)
        B, H, Lq, D = q.shape
        Lk = k.shape[2]

        if f.scores == "at":
            s = q @ k.transpose(-2, -1)
        elif f.scores == "matmul":
            s = torch.matmul(q, k.transpose(2, 3))
        else:
            s = torch.einsum("bhqd,bhkd->bhqk", q, k)
        if f.scale == "div_sqrt":
            s = s / math.sqrt(D)
        elif f.scale == "mul":
            s = s * D ** -0.5

        if f.bias == "t5":
            s = s + self.compute_bias(Lq, Lk, s.device)

        dtype = s.dtype
        if f.mask == "ext_finfo":
            s = s + (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
        elif f.mask == "ext_1e4":
            s = s + (1.0 - mask[:, None, None, :].to(dtype)) * -10000.0
        elif f.mask == "fill_bool":
            s = s.masked_fill(~mask.bool()[:, None, None, :], self._fill(s))
        elif f.mask == "fill_eq0":
            s = s.masked_fill(mask[:, None, None, :] == 0, self._fill(s))
        elif f.mask == "fill_invert":
            s = s.masked_fill(~mask[:, None, None, :], self._fill(s))
        elif f.mask == "where_additive":
            s = s + torch.where(mask[:, None, None, :], 0.0, float("-inf"))
        elif f.mask == "causal_tril_eq0":
            s = s.masked_fill(self._causal_ones(Lq, Lk, s.device) == 0, self._fill(s))
        elif f.mask == "causal_and_pad":
            keep = mask if mask.dtype == torch.bool else mask.bool()
            allowed = (self._causal_ones(Lq, Lk, s.device) == 1)[None, None] & keep[:, None, None, :]
            s = s.masked_fill(~allowed, self._fill(s))
        elif f.mask == "causal_or_pad":
            drop = (self._causal_ones(Lq, Lk, s.device) == 0)[None, None] | (mask == 0)[:, None, None, :]
            s = s.masked_fill(drop, self._fill(s))
        elif f.mask == "buffer_slice":
            if f.buffer_variant == "bool_where":
                s = torch.where(self.causal[:, :, Lk - Lq:Lk, :Lk], s, self._fill(s))
            else:
                s = s + self.causal[Lk - Lq:Lk, :Lk]

        if f.softmax == "plain":
            p = F.softmax(s, dim=-1)
        elif f.softmax == "upcast":
            p = F.softmax(s.float() if self.upcast is F32 else s.double(), dim=-1).type_as(v)
        else:
            p = F.softmax(s, dim=-1, dtype=self.upcast).to(v.dtype)

        o = p @ v if f.out == "at" else torch.matmul(p, v)
        if f.out_proj:
            return self.o_proj(o.transpose(1, 2).reshape(B, Lq, H * D))
        return o.transpose(1, 2) if f.layout == "blhd_t" else o


class TwoLayers(nn.Module):
    """Two layers of the same code, different weights, in one graph, each
    added to its input as in a transformer block:
    ``forward(x, [past_k0, past_v0, past_k1, past_v1], [mask])``.

    The residual keeps the second layer's tokens apart, as a transformer
    block's does.  Without it they are near copies of one average, the second
    layer's scores are near constant, and its dQ = scale * dS K is a small
    sum of near-cancelling terms: there FlashAttention's one-pass delta =
    rowsum(dO * O) rounded 2-3x further from the golden than eager (case053,
    dlayers.1.q_proj.weight 8.4e-6 against eager's 2.5e-6).  The op's float32
    backward takes delta from the recomputed P and dP less the row's top-key
    dP ([Note: exact rows]); with it every two_layers case of this seed also
    passes without the residual."""

    def __init__(self, f: Form):
        super().__init__()
        self.f = f
        self.layers = nn.ModuleList([ContextAttention(f), ContextAttention(f)])

    def forward(self, x, *rest):
        rest = list(rest)
        caches = [rest[0:2], rest[2:4]] if self.f.decode else [[], []]
        extra = rest[4:] if self.f.decode else rest
        for layer, cache in zip(self.layers, caches):
            x = x + layer(x, *cache, *extra)
        return x


class AutocastInside(nn.Module):
    """``inner`` called under ``torch.autocast("cpu", bfloat16)`` entered in
    the compiled forward itself (the autocast region is in the graph)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.autocast = True

    def forward(self, *args):
        with torch.autocast("cpu", dtype=BF16, enabled=self.autocast):
            return self.inner(*args)


# ---- inputs ---------------------------------------------------------------------------------

def _leaf(*shape):
    return torch.randn(*shape).requires_grad_()


def _mask_input(f: Form, keep: torch.Tensor):
    return {"bool": keep, "long": keep.long(), "float": keep.float()}[f.mask_dtype]


def make_inputs(f: Form, L: int) -> list:
    """The call's arguments at (cache or sequence) length ``L``."""
    B, H, D = f.B, f.H, f.D
    Lq = 1 if f.decode else L
    Lk = L + 1 if f.decode else L
    n_new = 1 if f.decode else L
    if f.layout == "proj":
        args = [_leaf(B, Lq, H * D)]
    elif f.layout == "bhld":
        args = [_leaf(B, H, Lq, D), _leaf(B, H, n_new, D), _leaf(B, H, n_new, D)]
    else:
        args = [_leaf(B, Lq, H, D), _leaf(B, n_new, H, D), _leaf(B, n_new, H, D)]
    if f.decode:
        for _ in range(2 if f.context == "two_layers" else 1):
            args += [_leaf(B, H, L, D), _leaf(B, H, L, D)]
    if f.mask in MASK_DTYPES:
        keep = _keep(B, Lk)                        # every row keeps at least two keys
        if f.mask in ("causal_and_pad", "causal_or_pad"):
            keep[:, :2] = True                     # under the causal mask every query row keeps a key
        args.append(_mask_input(f, keep))
    return args


def build(f: Form):
    torch.manual_seed(SEED + f.idx)
    m = TwoLayers(f) if f.context == "two_layers" else ContextAttention(f)
    if f.context == "autocast" and f.autocast_inside:
        m = AutocastInside(m)
    return m.train(f.context not in ("no_grad", "inference_mode"))


# ---- running and checking -------------------------------------------------------------------

def golden_copy(m: nn.Module) -> nn.Module:
    """``m`` in float64, its softmax upcasts to float64 too, without autocast."""
    m64 = copy.deepcopy(m).double()
    for layer in m64.modules():
        if isinstance(layer, ContextAttention):
            layer.upcast = torch.float64
        if isinstance(layer, AutocastInside):
            layer.autocast = False
    return m64


def _context(f: Form):
    """What the compiled and the eager call run under."""
    if f.context == "no_grad":
        return torch.no_grad()
    if f.context == "inference_mode":
        return torch.inference_mode()
    if f.context == "autocast" and not f.autocast_inside:
        return torch.autocast("cpu", dtype=BF16)
    return contextlib.nullcontext()


def _golden_context(f: Form):
    """The float64 golden: without autocast (it computes the exact function)."""
    return contextlib.nullcontext() if f.context == "autocast" else _context(f)


def _backward(f: Form) -> bool:
    return f.context not in ("no_grad", "inference_mode")


def _sites(f: Form) -> int:
    return 2 if f.context == "two_layers" else 1


def check_sites(f: Form, rows, graphs_compiled: int):
    """One row per site in each graph dynamo compiled (a dynamic case may
    compile twice; a compile dynamo abandoned and restarted leaves no row);
    fused, or declined with a reason that is not an internal error; every
    spelling here is one the README lists as matched: fused."""
    assert rows, "no attention site reported (neither fused nor declined)"
    assert len(rows) == _sites(f) * graphs_compiled, \
        f"{graphs_compiled} graph(s) of {_sites(f)} site(s) compiled, the report has {len(rows)} rows: " + \
        "; ".join(f"graph {r.graph_id} {r.status} {r.reason!r}" for r in rows)
    graphs = {}
    for r in rows:
        graphs.setdefault(r.graph_id, []).append(r)
    for gid, rs in graphs.items():
        assert len(rs) == _sites(f), f"graph {gid}: expected {_sites(f)} site(s), report has {len(rs)}: " + \
            "; ".join(f"{r.status} {r.reason!r}" for r in rs)
    for r in rows:
        check_row(r)
    declined = [f"{r.location}: {r.reason}" for r in rows if r.status != "fused"]
    assert not declined, f"plain attention declined: {declined}"


def _call(f: Form, compiled, m, m64, args, failures: dict, tag: str):
    """One call of the compiled module, eager and the golden on ``args``,
    checked: outputs, then (outside no_grad / inference_mode) the gradients
    of every input and parameter."""
    args64 = [_to64(a) for a in args]
    with _context(f):
        ours = _flat(compiled(*args))
        eager = _flat(m(*args))
    with _golden_context(f):
        golden = _flat(m64(*args64))
    for i, (a, b, c) in enumerate(zip(ours, eager, golden)):
        _check(failures, a, b, c, f"{tag} output {i}")
    if not _backward(f):
        return
    gen = torch.Generator().manual_seed(SEED - f.idx)
    cots = [torch.randn(g.shape, dtype=torch.float64, generator=gen) for g in golden]
    named = _wrt(m, args)
    wrt = [t for _, t in named]
    wrt64 = [t for _, t in _wrt(m64, args64)]
    g_ours = torch.autograd.grad(ours, wrt, [c.to(o.dtype) for c, o in zip(cots, ours)], allow_unused=True)
    g_eager = torch.autograd.grad(eager, wrt, [c.to(o.dtype) for c, o in zip(cots, eager)], allow_unused=True)
    g_gold = torch.autograd.grad(golden, wrt64, cots, allow_unused=True)
    for (name, _), a, b, c in zip(named, g_ours, g_eager, g_gold):
        assert (a is None) == (b is None) == (c is None), f"{tag} d{name}: gradient missing in one run"
        if a is not None:
            _check(failures, a, b, c, f"{tag} d{name}")


def run_case(f: Form, failures: dict):
    torch._dynamo.reset()
    dynamo_counters.clear()
    attn_compiler.reset()
    m = build(f)
    m64 = golden_copy(m)
    compiled = torch.compile(m, backend=attn_compiler.backend(inner="aot_eager"),
                             dynamic=True if f.context == "dynamic" else None)
    torch.manual_seed(SEED + 1000 + f.idx)
    _call(f, compiled, m, m64, make_inputs(f, f.L), failures, f"L={f.L}" if f.context == "dynamic" else "")
    if f.context == "dynamic":
        _call(f, compiled, m, m64, make_inputs(f, f.L2), failures, f"L={f.L2}")
    rows = list(attn_compiler.report())
    check_sites(f, rows, dynamo_counters["stats"]["unique_graphs"])
    return rows


# Failures found by this grammar under other seeds (``_draw_forms(90, seed)``),
# kept as regression cases, on the reference path and on the generated
# kernels.  A query row whose probability sits almost all on one key
# (unscaled scores of D = 40: P 0.9994 there) makes that key's dS =
# P (dP - delta) a difference ~1/(1 - P) times smaller than its terms.  With
# FlashAttention's delta = rowsum(dO * O) dK (and dQ, a learned bias) rounded
# 5-15x further from the golden than eager here; the op's backward now takes
# dP less the row's top-key dP and delta from the recomputed P
# (attn_compiler/reference.py [Note: delta of the recomputed P], the
# generated backward's [Note: exact rows]), which cancels nothing.
PINNED = [
    # the smallest form that shows it: plain unscaled attention, one decode step, no mask
    pytest.param(Form(idx=909, context="train", layout="bhld", decode=True, B=1, H=2, L=11, L2=11, D=40,
                      mask="none", mask_dtype="bool", fill="-inf", buffer_variant="bool_where", bias="none",
                      t5_bidirectional=False, scores="at", scale="none", softmax="plain", out="at",
                      out_proj=False, autocast_inside=False),
                 id="pinned_one_hot_decode_row"),
    # as the grammar drew it (seed 2, case 69): dq 1.7e-5, dk 2.8e-5, the T5 table 1.8e-5 against eager's 1.3e-6
    pytest.param(Form(idx=69, context="dynamic", layout="blhd_t", decode=True, B=1, H=2, L=11, L2=9, D=40,
                      mask="causal_or_pad", mask_dtype="long", fill="finfo.min", buffer_variant="bool_where",
                      bias="t5", t5_bidirectional=False, scores="einsum", scale="none", softmax="dtype",
                      out="matmul", out_proj=False, autocast_inside=True),
                 id="pinned_seed2_case069"),
]


@pytest.mark.parametrize("form", [pytest.param(f, id=f"case{f.idx:03d}") for f in FORMS])
def test_fuzz_context(form: Form):
    failures = {}
    try:
        run_case(form, failures)
    except Exception as e:
        raise AssertionError(f"{form.describe()}\n{type(e).__name__}: {e}") from e
    if failures:
        raise AssertionError(form.describe() + "\n" + "\n".join(failures.values()))


@pytest.mark.parametrize("on_kernels", [False, True], ids=["reference", "kernels"])
@pytest.mark.parametrize("form", PINNED)
def test_fuzz_context_pinned(form: Form, on_kernels: bool):
    """The pinned cases, as every drawn case, on the reference and (forced)
    on the generated kernels."""
    failures = {}
    with _implementation(on_kernels):
        run_case(form, failures)
    assert not failures, form.describe() + "\n" + "\n".join(failures.values())


def test_grammar_covers_every_value():
    """Every value of every axis is drawn (after the constraints), in every
    context; decode steps and batch 1 in most contexts; every mask dtype of
    every padding spelling."""
    for axis, values in AXES.items():
        drawn = {getattr(f, axis) for f in FORMS}
        assert set(values) <= drawn, f"{axis}: {set(values) - drawn} never drawn"
    for ctx in CONTEXTS:
        of = [f for f in FORMS if f.context == ctx]
        assert len(of) >= 10, ctx
        assert any(f.decode for f in of) and any(not f.decode for f in of), ctx
        assert any(f.mask != "none" for f in of) and any(f.bias == "t5" for f in of), ctx
    assert sum(f.B == 1 for f in FORMS) >= 25
    assert {f.layout for f in FORMS if f.context != "two_layers"} == set(AXES["layout"])
    for mask, dtypes in MASK_DTYPES.items():
        assert {f.mask_dtype for f in FORMS if f.mask == mask} == set(dtypes), mask
    assert {f.buffer_variant for f in FORMS if f.mask == "buffer_slice"} == {"bool_where", "additive"}
    assert {f.autocast_inside for f in FORMS if f.context == "autocast"} == {False, True}
    assert {f.mask for f in FORMS if f.decode} >= CAUSAL_MASKS       # causal offset to the cache's end
    assert {f.t5_bidirectional for f in FORMS if f.bias == "t5"} == {False, True}
