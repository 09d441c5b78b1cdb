"""Research attention forms as written, bf16: eager, inductor, attn_compiler.

- ``differential``: the Differential Transformer's attention as its reference
  code writes it (2H heads of q and k, H heads of v at twice the head dim, a
  causal -inf mask, the softmax in float32, each pair of maps subtracted with
  a learned lambda before P·V).  attn_compiler runs it as one causal
  attention over the 2H heads ([Note: maps combined before P·V]).
- ``conformer``: ESPnet / WeNet / FastSpeech2-Conformer relative-position
  attention: content scores plus a position term (a (B, H, N, N) float tensor
  the model computes from q), ``masked_fill(mask, finfo.min)``, softmax, and the
  probabilities zeroed again under the mask (key padding).  attn_compiler reads
  the position term as a captured tensor and zeroes P in the kernel (the
  spec's ``zero_masked``).
- ``transformer_xl``: Transformer-XL's relative attention as the Hugging Face
  port writes it: (N, B, H, D) inputs, [query, key, batch, head] scores (a
  content einsum plus a relative-shifted position einsum), scaled in place, a
  causal mask built in the graph and filled in float32, the softmax over dim 1.
  attn_compiler relays the scores out with the keys last ([Note: scores in
  another layout]) and reads the shifted position term as a captured tensor
  (with its gradient).
- ``softmax_one``: "softmax plus one" written out (the row max clamped at 0,
  ``exp(-m)`` added to the denominator), causal by a mask built in the graph.
  attn_compiler runs it as causal attention with a sink logit of 0 (the
  output times sigmoid(lse)).
- ``lilt``: LiLT's text and layout streams (text head dim D, layout D / 4):
  two softmaxes over the same summed logits, one per stream's values, with a
  key-padding mask.  attn_compiler joins each sum of two products into one
  product of head dim 5D / 4 ([Note: scores summed from two products]).
- ``mla_absorbed``: DeepSeek-V3's reference latent attention, "absorb" path
  (H query heads against a (B, N, D) latent cache and (B, N, D / 2) rotary
  keys, scores in [batch, query, head, key] layout, causal): one key head,
  the two products joined into a head dim of 3D / 2, the cache read as V.
- ``convit``: ConViT's gated positional attention (timm's GPSA): the content
  softmax and a softmax of learned positional scores mixed per head by a
  sigmoid gate, divided by the mixture's row sums, then P·V (N a square
  grid).  attn_compiler runs the content map as one site and the positional
  one as a product of its own ([Note: a mixture of maps renormalized]).

    PYTHONPATH=. python bench/bench_research.py --out OUT      # GPU
    python bench/bench_research.py --smoke                      # CPU, tiny shapes

Per form, shape and implementation: ms of a forward under no_grad and of a
forward+backward (host included; ``graph_ms``: the forward as CUDA-graph
replays), peak MiB of the forward+backward, and the relative error of the
output against float32 eager.
"""
from __future__ import annotations

import math
import os
import sys

import common
import torch
import torch.nn as nn
import torch.nn.functional as F

# the hand-written forms the tests compile (tests/forms.py)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from forms import ConViTGatedPositional, DifferentialAttention, deepseek_mla_absorbed, lilt_text_and_layout  # noqa: E402

IMPLS = ("eager", "inductor", "attn_compiler")
# (form, batch, heads, length, head dim)
SHAPES = (("differential", 4, 16, 2048, 64), ("differential", 1, 16, 8192, 64),
          ("conformer", 8, 8, 1024, 64), ("conformer", 4, 8, 2048, 64),
          ("transformer_xl", 4, 16, 1024, 64), ("transformer_xl", 2, 16, 4096, 64),
          ("softmax_one", 4, 16, 2048, 128), ("softmax_one", 1, 16, 8192, 128),
          ("lilt", 8, 12, 512, 64), ("lilt", 4, 12, 2048, 64),
          ("mla_absorbed", 4, 16, 2048, 128), ("mla_absorbed", 1, 16, 8192, 128),
          # convit_base at 224 px (14x14 patches), and a 32x32 grid
          ("convit", 64, 16, 196, 48), ("convit", 8, 16, 1024, 48))
SMOKE_SHAPES = (("differential", 1, 2, 32, 16), ("conformer", 2, 2, 24, 16), ("transformer_xl", 2, 2, 24, 16),
                ("softmax_one", 2, 2, 24, 16), ("lilt", 2, 2, 24, 16), ("mla_absorbed", 2, 2, 24, 16),
                ("convit", 2, 2, 25, 16))


class Conformer(nn.Module):
    """q, k, v (B, H, N, D); pos (B, H, N, N): the position term; keep (B, 1, N) int."""

    def forward(self, q, k, v, pos, keep):
        scores = (torch.matmul(q, k.transpose(-2, -1)) + pos) / math.sqrt(q.shape[-1])
        mask = keep.unsqueeze(1).eq(0)
        scores = scores.masked_fill(mask, float(torch.finfo(scores.dtype).min))
        attn = torch.softmax(scores, dim=-1).masked_fill(mask, 0.0)
        return torch.matmul(attn, v)


def _rel_shift(x):
    zero_pad = torch.zeros((x.size(0), 1) + x.size()[2:], device=x.device, dtype=x.dtype)
    x_padded = torch.cat([zero_pad, x], dim=1).view((x.size(1) + 1, x.size(0)) + x.size()[2:])
    return x_padded[1:].view_as(x)


class TransformerXL(nn.Module):
    """q, k, v (N, B, H, D); r (N, H, D): the position keys."""

    def __init__(self, h: int, d: int) -> None:
        super().__init__()
        self.r_w_bias = nn.Parameter(0.1 * torch.randn(h, d))
        self.r_r_bias = nn.Parameter(0.1 * torch.randn(h, d))
        self.scale = d ** -0.5

    def forward(self, q, k, v, r):
        n = q.size(0)
        ac = torch.einsum("ibnd,jbnd->ijbn", (q + self.r_w_bias, k))
        bd = _rel_shift(torch.einsum("ibnd,jnd->ijbn", (q + self.r_r_bias, r)))
        score = ac + bd
        score.mul_(self.scale)
        mask = torch.triu(q.new_ones(n, n), diagonal=1).bool()[:, :, None]
        score = score.float().masked_fill(mask[:, :, :, None], -float("inf")).type_as(score)
        return torch.einsum("ijbn,jbnd->ibnd", (F.softmax(score, dim=1), v))


class SoftmaxOne(nn.Module):
    """q, k, v (B, H, N, D): causal softmax plus one, written out."""

    def forward(self, q, k, v):
        s = torch.matmul(q, k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        n = q.shape[-2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        m = s.amax(dim=-1, keepdim=True).clamp(min=0)
        e = torch.exp(s - m)
        return torch.matmul(e / (torch.exp(-m) + e.sum(dim=-1, keepdim=True)), v)


class Lilt(nn.Module):
    """q, k, v (B, H, N, D); ql, kl, vl (B, H, N, D / 4); mask (B, 1, 1, N) additive."""

    def forward(self, *xs):
        return lilt_text_and_layout(*xs)


class MLAAbsorbed(nn.Module):
    """q_nope (B, N, H, D), q_pe (B, N, H, D / 2), kv (B, N, D), pe (B, N, D / 2), mask (N, N)."""

    def forward(self, *xs):
        return deepseek_mla_absorbed(*xs)


def inputs(form: str, b: int, h: int, n: int, d: int, dev, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dev, dtype)
    if form == "differential":
        return [rnd(b, 2 * h, n, d), rnd(b, 2 * h, n, d), rnd(b, h, n, 2 * d)]
    if form in ("softmax_one", "convit"):
        return [rnd(b, h, n, d), rnd(b, h, n, d), rnd(b, h, n, d)]
    if form == "transformer_xl":
        return [rnd(n, b, h, d), rnd(n, b, h, d), rnd(n, b, h, d), rnd(n, h, d)]
    if form == "lilt":
        pad = torch.zeros(b, 1, 1, n)
        pad[b // 2:, :, :, (3 * n) // 4:] = -1e4         # half the batch pads its last quarter
        return [rnd(b, h, n, d), rnd(b, h, n, d), rnd(b, h, n, d), rnd(b, h, n, d // 4), rnd(b, h, n, d // 4),
                rnd(b, h, n, d // 4), pad.to(dev, dtype)]
    if form == "mla_absorbed":
        mask = torch.full((n, n), float("-inf")).triu(1)
        return [rnd(b, n, h, d), rnd(b, n, h, d // 2), rnd(b, n, d), rnd(b, n, d // 2), mask.to(dev, dtype)]
    keep = torch.ones(b, 1, n, dtype=torch.long, device=dev)
    keep[b // 2:, :, (3 * n) // 4:] = 0              # half the batch pads its last quarter
    return [rnd(b, h, n, d), rnd(b, h, n, d), rnd(b, h, n, d), rnd(b, h, n, n), keep]


def _choices() -> str:
    """Per fused site (training graph last): the never-slower choice and the
    candidates' timed ms."""
    import attn_compiler
    out = []
    for r in attn_compiler.report():
        if "choice" not in r.features:
            continue
        times = r.features.get("times_ms") or {}
        errors = r.features.get("errors") or {}
        out.append(f"{r.features.get('choice')} (" + ", ".join(
            f"{k} {v:.3g}" if v is not None else f"{k} failed: {str(errors.get(k, '?'))[:120]}"
            for k, v in times.items()) + ")")
    return "; ".join(out)


def main(argv=None) -> int:
    args, dev, dtype, names = common.model_args(__doc__, IMPLS, argv, forms=True)
    rows, env = [], common.environment()
    for form, b, h, n, d in (SMOKE_SHAPES if args.smoke else SHAPES):
        if args.forms and form not in args.forms.split(","):
            continue
        torch.manual_seed(0)
        mod = {"differential": lambda: DifferentialAttention(d), "conformer": Conformer,
               "transformer_xl": lambda: TransformerXL(h, d), "softmax_one": SoftmaxOne, "lilt": Lilt,
               "mla_absorbed": MLAAbsorbed, "convit": lambda: ConViTGatedPositional(h, n)}[form]().to(dev)
        xs = inputs(form, b, h, n, d, dev, dtype)
        with torch.no_grad():
            ref = mod(*[x.float() if x.is_floating_point() else x for x in xs])
        mod.to(dtype)
        grads = list(xs[:3])
        for name in names:
            common.reset_compiled()
            if name == "attn_compiler":
                import attn_compiler
                attn_compiler.reset()

            def measure(row, name=name):
                fn = common.compiled_module(name, mod)
                with torch.no_grad():
                    out = fn(*xs)
                    row["rel_err"] = float((out.float() - ref).norm() / ref.norm())
                    row["fwd_ms"] = common.time_ms(lambda: fn(*xs))
                    row["graph_ms"] = common.time_graph_ms(lambda: fn(*xs))
                for x in grads:
                    x.requires_grad_(True)
                try:
                    def step():
                        fn(*xs).float().sum().backward()
                    step()
                    row["fwd_bwd_ms"] = common.time_ms(step, grad_to_none=grads + list(mod.parameters()))
                    row["peak_mib"] = common.peak_mib(step)
                finally:
                    for x in grads:
                        x.requires_grad_(False)
                        x.grad = None
                if name == "attn_compiler":
                    row["sites"] = common.sites_summary()
                    row["choices"] = _choices()
            rows.append(common.model_row(dict(env, impl=name, form=form, shape=f"{b}x{h}x{n}x{d}"), measure))
    common.finish_rows(rows, args.out, "research",
                       ["form", "shape", "impl", "fwd_ms", "graph_ms", "fwd_bwd_ms", "peak_mib", "rel_err", "sites",
                        "choices"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
