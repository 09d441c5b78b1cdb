"""Attention against a static KV cache, as Hugging Face's generation runs it
with ``cache_implementation="static"``: the model receives one precomputed
additive mask (B, 1, Lq, Lk) of 0 and finfo.min (causal, left padding, and
the cache's unfilled slots after the last token), whose values the compiled
graph cannot see.

Per case, milliseconds (CUDA-graph replays on the GPU):

- ``ours``: the generated kernels (default configs) as the backend runs such
  a site: the prefill's block map skips the tiles of fills, the decode's
  splits share out the keys some row keeps ([Note: additive tensor masks],
  [Note: decode's key extent] in attn_compiler/kernels.py);
- ``ours_all_keys``: the same kernels walking every key (map and extent off);
- ``ours_tuned``: the op as a compiled site calls it (tuned for the shape);
- ``causal_tuned`` (prefill into an empty cache without padding): the op
  under a causal mask it knows, over the filled keys alone, tuned: what the
  site costs when the mask is no value but index arithmetic (the ceiling);
- ``sdpa``: ``F.scaled_dot_product_attention`` with the mask, K/V repeated to
  the query heads as Hugging Face's SDPA path does under a mask;
  ``sdpa_gqa``: the same with ``enable_gqa=True`` (no copy of K/V);
- ``err``: ours against SDPA in float32 (rows that keep a key).

    PYTHONPATH=. python bench/bench_static_cache.py --out OUT      # GPU
    python bench/bench_static_cache.py --smoke                     # CPU, tiny
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")      # the kernels in Triton's interpreter

import common  # noqa: E402
import impls  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from attn_compiler import kernels  # noqa: E402

MAP_MIN_KEYS = kernels.ADDITIVE_MAP_MIN_KEYS      # the library's own, restored after each "all keys" run

# (B, Hq, Hkv, Lq, Lk, tokens before the first query row, left padding per batch)
PREFILL = [(2, 32, 8, 2048, 4096, 0, (0, 256)), (1, 32, 8, 4096, 8192, 0, (0,)),
           (4, 32, 8, 1024, 4096, 1024, (0, 100, 200, 300))]
# (B, Hq, Hkv, Lk, tokens in the cache): one query row per step
DECODE = [(1, 32, 8, 32768, 4096), (1, 32, 8, 32768, 32768), (8, 32, 8, 8192, 2048), (8, 32, 8, 8192, 8192),
          (8, 32, 8, 32768, 16384), (32, 32, 8, 4096, 1024)]
SMOKE_PREFILL = [(2, 2, 1, 24, 320, 0, (0, 5))]
SMOKE_DECODE = [(2, 2, 1, 320, 100)]


def static_cache_mask(B, Lq, Lk, past, pad, dtype, dev) -> torch.Tensor:
    """Row i (position past + i) keeps keys 0..past + i, batch b's first
    pad[b] positions are padding; later slots are unfilled."""
    i = torch.arange(Lq, device=dev)[:, None] + past
    j = torch.arange(Lk, device=dev)[None, :]
    keep = (j <= i).expand(B, 1, Lq, Lk).clone()
    for b, p in enumerate(pad):
        keep[b, ..., :p] = False
    return torch.where(keep, 0.0, torch.finfo(dtype).min).to(dtype)


def _spec(Hq, Hkv, dtype):
    import sympy

    from attn_compiler.passes.analyze import spec as S

    name = str(dtype).removeprefix("torch.")
    return S.AttentionSpec(score_mod=S.score + S.captured_call(0), scale=1 / sympy.sqrt(S.D),
                           captured=(S.CapturedTensor((True, False, True, True), name),), gqa_group=Hq // Hkv,
                           out_dtype=name, prob_dtype=name, score_dtype=name)


def _walk_every_key(on: bool) -> None:
    """Map and extent off (the kernels before them) or on."""
    kernels.ADDITIVE_MAP_MIN_KEYS = 10**9 if on else MAP_MIN_KEYS
    kernels._mask_plan.cache_clear()
    kernels._plans.clear()


def measure(row, B, Hq, Hkv, Lq, Lk, mask, dtype, dev) -> None:
    gen = torch.Generator(device=dev).manual_seed(Lk + Lq)
    D = row["head_dim"]
    q = torch.randn(B, Hq, Lq, D, device=dev, dtype=dtype, generator=gen)
    k, v = (torch.randn(B, Hkv, Lk, D, device=dev, dtype=dtype, generator=gen) for _ in range(2))
    spec = _spec(Hq, Hkv, dtype)
    run = kernels.decode if Lq == 1 else kernels.forward
    kk, vv = (t.repeat_interleave(Hq // Hkv, dim=1) for t in (k, v))
    ref = F.scaled_dot_product_attention(q.float(), kk.float(), vv.float(), attn_mask=mask.float())
    rows_kept = (mask > torch.finfo(dtype).min).any(-1, keepdim=True).expand(B, Hq, Lq, D)
    for name, walk_all in (("ours_all_keys", True), ("ours", False)):
        _walk_every_key(walk_all)
        out = run(q, k, v, [mask], spec)[0]
        if name == "ours":
            diff = (out.float() - ref)[rows_kept]
            row["err"] = float(diff.norm() / ref[rows_kept].norm())
        row[name] = common.time_graph_ms(lambda: run(q, k, v, [mask], spec))
    _walk_every_key(False)
    with impls.triton_context():
        text = spec.dumps()
        row["ours_tuned"] = common.time_graph_ms(lambda: impls.ours_forward(q, k, v, [mask], text))
        filled = row["filled"]
        if Lq > 1 and filled == Lq and not any(row["pad"]):
            causal = impls.ours_spec(True, "plain", dtype, Hq // Hkv)
            kf, vf = k[:, :, :filled], v[:, :, :filled]
            row["causal_tuned"] = common.time_graph_ms(lambda: impls.ours_forward(q, kf, vf, [], causal))
    row["sdpa"] = common.time_graph_ms(lambda: F.scaled_dot_product_attention(
        q, k.repeat_interleave(Hq // Hkv, dim=1), v.repeat_interleave(Hq // Hkv, dim=1), attn_mask=mask))
    row["sdpa_gqa"] = common.time_graph_ms(lambda: F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, enable_gqa=True))
    row["speedup_vs_sdpa"] = min(row["sdpa"], row["sdpa_gqa"]) / row["ours"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--only", default="prefill,decode")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    prefill, decode = (SMOKE_PREFILL, SMOKE_DECODE) if args.smoke else (PREFILL, DECODE)
    if args.smoke:
        args.head_dim = 16
    dev = common.device()
    dtype = torch.bfloat16 if common.on_cuda() else torch.float32
    env, rows = common.environment(), []
    parts = args.only.split(",")
    for B, Hq, Hkv, Lq, Lk, past, pad in prefill if "prefill" in parts else []:
        row = dict(env, step="prefill", shape=f"{B}x{Hq}:{Hkv}x{Lq}x{Lk}", filled=past + Lq, pad=pad,
                   head_dim=args.head_dim)
        mask = static_cache_mask(B, Lq, Lk, past, pad, dtype, dev)
        rows.append(common.model_row(row, lambda r, a=(B, Hq, Hkv, Lq, Lk, mask): measure(r, *a, dtype, dev)))
    for B, Hq, Hkv, Lk, filled in decode if "decode" in parts else []:
        row = dict(env, step="decode", shape=f"{B}x{Hq}:{Hkv}x1x{Lk}", filled=filled, pad=(0,) * B,
                   head_dim=args.head_dim)
        mask = static_cache_mask(B, 1, Lk, filled - 1, (0,) * B, dtype, dev)
        rows.append(common.model_row(row, lambda r, a=(B, Hq, Hkv, 1, Lk, mask): measure(r, *a, dtype, dev)))
    common.finish_rows(rows, args.out, "static_cache", ["step", "shape", "filled", "ours", "ours_all_keys",
                                                        "ours_tuned", "causal_tuned", "sdpa", "sdpa_gqa",
                                                        "speedup_vs_sdpa", "err"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
