"""MViTv2 attention with a cls token: relative positions added to all but the
cls row and column, bf16, inference and training.

Two spellings, as the libraries write them (the attention core only; q, k, v
are given, K/V pooled to a coarser grid than Q):

- ``timm``: timm's ``cal_rel_pos_type``: ``rel_h``/``rel_w`` from einsums of
  the spatial queries, written back by
  ``attn[:, :, 1:, 1:] = (attn[:, :, 1:, 1:].view(B, H, qh, qw, kh, kw)
  + rel_h + rel_w).view(...)``; the op reads rel_h (padded by one query in
  front) at max(kv - 1, 0) // kw and rel_w at (kv - 1) % kw;
- ``tv``: torchvision's ``_add_rel_pos`` (video: time, height and width):
  the three terms summed into one (B, H, Nq - 1, Nk - 1) tensor through an
  8-D broadcast, then ``attn[:, :, 1:, 1:] += rel_pos``; the op reads the
  three terms at (kv - 1) // (kh*kw), ((kv - 1) // kw) % kh and
  (kv - 1) % kw (the summed tensor is not built).

What is compared: ``eager`` (the module as written), ``inductor``
(``torch.compile`` of it) and ``attn_compiler`` (our backend, inner inductor,
whose never-slower choice may keep the site as written). Rows: ms per call
(forward under no_grad, or forward+backward), peak MiB beyond the inputs and
the error against float32 eager.

    PYTHONPATH=. python bench/bench_mvit.py --out OUT      # GPU
    python bench/bench_mvit.py --smoke                      # CPU, tiny shapes
"""
from __future__ import annotations

import sys

import common
import torch
import torch.nn as nn

IMPLS = ("eager", "inductor", "attn_compiler")
# (form, batch, heads, (t,) qh, qw, (t,) kh, kw, head dim): timm mvitv2_small_cls
# at 224 (stage 1: 56x56 queries over 7x7 pooled keys; stage 2), torchvision
# mvit_v2_s at 16x224x224 (stage 1: 8x56x56 over 8x7x7)
SHAPES = (("timm", 32, 1, (56, 56), (7, 7), 96), ("timm", 32, 2, (28, 28), (7, 7), 96),
          ("tv", 4, 1, (8, 56, 56), (8, 7, 7), 96))
SMOKE_SHAPES = (("timm", 2, 2, (4, 3), (2, 3), 16), ("tv", 1, 2, (2, 4, 3), (2, 2, 3), 16))


def _dist(qn: int, kn: int, device) -> torch.Tensor:
    q_ratio, k_ratio = max(kn / qn, 1.0), max(qn / kn, 1.0)
    d = torch.arange(qn, device=device)[:, None] * q_ratio - torch.arange(kn, device=device)[None, :] * k_ratio
    return (d + (kn - 1) * k_ratio).long()


class MViTCls(nn.Module):
    """The attention core of MViTv2 with a cls token, timm's or torchvision's."""

    def __init__(self, form: str, q_size, k_size, dim: int) -> None:
        super().__init__()
        self.form, self.q_size, self.k_size = form, tuple(q_size), tuple(k_size)
        self.tables = nn.ParameterList(
            nn.Parameter(0.1 * torch.randn(2 * max(a, b) - 1, dim)) for a, b in zip(q_size, k_size))

    def forward(self, q, k, v):
        B, H, _, d = q.shape
        attn = (q * d ** -0.5) @ k.transpose(-2, -1)
        R = [t[_dist(a, b, q.device)] for t, a, b in zip(self.tables, self.q_size, self.k_size)]
        r_q = q[:, :, 1:].reshape(B, H, *self.q_size, d)
        if self.form == "timm":
            (qh, qw), (kh, kw) = self.q_size, self.k_size
            rel_h = torch.einsum("byhwc,hkc->byhwk", r_q, R[0])
            rel_w = torch.einsum("byhwc,wkc->byhwk", r_q, R[1])
            attn[:, :, 1:, 1:] = (attn[:, :, 1:, 1:].view(B, -1, qh, qw, kh, kw)
                                  + rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2)).view(B, -1, qh * qw, kh * kw)
        else:
            (qt, qh, qw), (kt, kh, kw) = self.q_size, self.k_size
            rel_t = torch.einsum("bythwc,tkc->bythwk", r_q, R[0])
            rel_h = torch.einsum("bythwc,hkc->bythwk", r_q, R[1])
            rel_w = torch.einsum("bythwc,wkc->bythwk", r_q, R[2])
            rel_pos = (rel_t[..., :, None, None] + rel_h[..., None, :, None]
                       + rel_w[..., None, None, :]).reshape(B, H, qt * qh * qw, kt * kh * kw)
            attn[:, :, 1:, 1:] += rel_pos
        return attn.softmax(dim=-1) @ v


def _tokens(size) -> int:
    n = 1
    for s in size:
        n *= s
    return n + 1


def main(argv=None) -> int:
    args, dev, dtype, names = common.model_args(__doc__, IMPLS, argv)
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    rows = []
    env = common.environment()
    for form, batch, heads, q_size, k_size, d in shapes:
        nq, nk = _tokens(q_size), _tokens(k_size)
        shape = f"{form} {batch}x{heads}x{nq}x{nk}x{d}"
        for mode in ("infer", "train"):
            torch.manual_seed(0)
            mod = MViTCls(form, q_size, k_size, d).to(dev)
            q = torch.randn(batch, heads, nq, d, device=dev)
            k, v = (torch.randn(batch, heads, nk, d, device=dev) for _ in range(2))
            train = mode == "train"
            with torch.no_grad():
                ref = mod(q, k, v)
            mod.to(dtype)
            q, k, v = (t.to(dtype).requires_grad_(train) for t in (q, k, v))
            for name in names:
                common.reset_compiled()
                if name == "attn_compiler":
                    import attn_compiler
                    attn_compiler.reset()

                def measure(row, name=name):
                    fn = common.compiled_module(name, mod)

                    def call():
                        if not train:
                            with torch.no_grad():
                                return fn(q, k, v)
                        out = fn(q, k, v)
                        out.backward(torch.ones_like(out))
                        return out
                    out = call()
                    row["rel_err"] = float((out.float() - ref).norm() / ref.norm())
                    row["ms"] = common.time_ms(call, grad_to_none=[q, k, v, *mod.parameters()] if train else ())
                    row["peak_mib"] = common.peak_mib(call)
                    if name == "attn_compiler":
                        row["sites"] = common.sites_summary()
                rows.append(common.model_row(dict(env, impl=name, shape=shape, mode=mode), measure))
    common.finish_rows(rows, args.out, "mvit", ["shape", "mode", "impl", "ms", "peak_mib", "rel_err", "sites"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
