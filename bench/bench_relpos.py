"""SAM / ViTDet image-encoder attention with decomposed relative positions,
inference (no grad), bf16.

The module is Hugging Face's SAM attention as written: the height and width
terms ``rel_h = einsum(q, R_h)``, ``rel_w = einsum(q, R_w)`` are added to the
scores viewed as (B*H, qh, qw, kh, kw), softmax in float32, then ·V.  What is
compared, on the same q, k, v and relative-position tables:

- ``eager``: the module as written (it builds the (B*H, N, N) scores and bias);
- ``inductor``: ``torch.compile`` of the module;
- ``attn_compiler``: the module compiled by our backend (inner inductor): the
  op reads rel_h at kv // kw and rel_w at kv % kw, nothing N x N is built;
- ``sdpa_bias``: SDPA with the decomposed bias expanded to (B, H, N, N) as its
  attn_mask (Hugging Face's SDPA path for SAM does this);
- ``flex``: FlexAttention with a score_mod that reads rel_h / rel_w at
  kv // kw and kv % kw (``flex_64``: the same with 64 x 64 tiles, for shapes
  where its default tiles do not fit).

    PYTHONPATH=. python bench/bench_relpos.py --out OUT      # GPU
    python bench/bench_relpos.py --smoke                      # CPU, tiny shapes

Prints ms per call (host included: a single layer this small is bound by
its launches), ms of CUDA-graph replays (the GPU's share: what the layer
costs inside a model that keeps the GPU busy), TFLOP/s (4·B·H·N²·D, per
call) and peak MiB per implementation, and the error of each against
float32 eager.
"""
from __future__ import annotations

import sys

import common
import torch
import torch.nn as nn

IMPLS = ("eager", "inductor", "attn_compiler", "sdpa_bias", "flex", "flex_64")
# (batch*windows, heads, grid h, grid w, head dim): SAM ViT-B global and
# windowed layers, SAM ViT-H global
SHAPES = ((1, 12, 64, 64, 64), (25, 12, 14, 14, 64), (1, 16, 64, 64, 80))
SMOKE_SHAPES = ((1, 2, 3, 4, 16),)


class SamAttention(nn.Module):
    """The attention core of Hugging Face's SamVisionAttention (eager path)."""

    def __init__(self, h: int, w: int, heads: int, dim: int) -> None:
        super().__init__()
        self.size, self.heads, self.scale = (h, w), heads, dim ** -0.5
        self.rel_pos_h = nn.Parameter(0.1 * torch.randn(2 * h - 1, dim))
        self.rel_pos_w = nn.Parameter(0.1 * torch.randn(2 * w - 1, dim))

    @staticmethod
    def rel_table(size: int, rel_pos: torch.Tensor) -> torch.Tensor:
        coords = torch.arange(size, device=rel_pos.device)
        return rel_pos[(coords[:, None] - coords[None, :] + size - 1).long()]

    def terms(self, query: torch.Tensor):
        h, w = self.size
        bh, _, c = query.shape
        r_q = query.reshape(bh, h, w, c)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, self.rel_table(h, self.rel_pos_h))
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, self.rel_table(w, self.rel_pos_w))
        return rel_h, rel_w

    def forward(self, query, key, value):   # (B*H, N, D) each
        h, w = self.size
        attn = (query * self.scale) @ key.transpose(-2, -1)
        rel_h, rel_w = self.terms(query)
        bias = (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape_as(attn)
        attn = torch.softmax(attn + bias, dtype=torch.float32, dim=-1).to(query.dtype)
        return attn @ value


def build(name: str, mod: SamAttention):
    h, w = mod.size
    fn = common.compiled_module(name, mod)
    if fn is not None:
        return fn
    if name == "sdpa_bias":
        def sdpa(q, k, v):
            rel_h, rel_w = mod.terms(q)
            bias = (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape(q.shape[0], 1, h * w, h * w)
            out = torch.nn.functional.scaled_dot_product_attention(
                q[:, None], k[:, None], v[:, None], attn_mask=bias.to(q.dtype), scale=mod.scale)
            return out[:, 0]
        return sdpa
    if name in ("flex", "flex_64"):
        from torch.nn.attention.flex_attention import flex_attention
        flex = torch.compile(flex_attention)
        opts = {"BLOCK_M": 64, "BLOCK_N": 64} if name == "flex_64" else None

        def run(q, k, v):
            rel_h, rel_w = mod.terms(q)
            rh = rel_h.reshape(q.shape[0], h * w, h).float()
            rw = rel_w.reshape(q.shape[0], h * w, w).float()

            def score_mod(score, b, hh, qi, kv):
                return score + rh[hh, qi, kv // w] + rw[hh, qi, kv % w]
            return flex(q[None], k[None], v[None], score_mod=score_mod, scale=mod.scale,
                        kernel_options=opts)[0]
        return run
    raise ValueError(name)


def main(argv=None) -> int:
    args, dev, dtype, names = common.model_args(__doc__, IMPLS, argv)
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    rows = []
    env = common.environment()
    for (bh_batch, heads, h, w, d) in shapes:
        torch.manual_seed(0)
        n = h * w
        mod = SamAttention(h, w, heads, d).to(dev, dtype).eval()
        q, k, v = (torch.randn(bh_batch * heads, n, d, device=dev, dtype=dtype) for _ in range(3))
        with torch.no_grad():
            ref = mod.float()(q.float(), k.float(), v.float())
            mod.to(dtype)
            for name in names:
                common.reset_compiled()
                if name == "attn_compiler":
                    import attn_compiler
                    attn_compiler.reset()

                def measure(row, name=name):
                    fn = build(name, mod)
                    out = fn(q, k, v)
                    row["rel_err"] = float((out.float() - ref).norm() / ref.norm())
                    row["ms"] = common.time_ms(lambda: fn(q, k, v))
                    row["graph_ms"] = common.time_graph_ms(lambda: fn(q, k, v))
                    row["tflops"] = 4 * bh_batch * heads * n * n * d / row["ms"] / 1e9
                    row["peak_mib"] = common.peak_mib(lambda: fn(q, k, v))
                    if name == "attn_compiler":
                        row["sites"] = common.sites_summary()
                rows.append(common.model_row(dict(env, impl=name, shape=f"{bh_batch}x{heads}x{h}x{w}x{d}"),
                                             measure))
    common.finish_rows(rows, args.out, "relpos", ["shape", "impl", "ms", "graph_ms", "tflops", "peak_mib", "rel_err", "sites"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
