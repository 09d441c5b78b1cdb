"""A long-context site through the backend: the first call (compile, the
never-slower choice, the kernels' tuning) and what it costs in time and GPU
memory, where the code as written may not fit at all.

One causal attention layer as Hugging Face writes it (scores scaled by a float
attribute, a boolean ``tril`` mask, softmax in float32, cast back:
``CausalScaledByAttribute`` of tests/forms.py), 1 x H x L x D bf16, compiled with the
default backend (inner inductor, timing on), a fresh tune cache per run.
Per length and pass (inference; training = forward and backward):

- ``first_s``: seconds of the first call, compile and tuning included;
- ``first_peak_gib``: the GPU's peak allocation during that call (the
  candidates' timing included: [Note: an original too large to run]);
- ``ms`` / ``peak_mib``: a later call, and its peak beyond the inputs;
- ``choice``, and what the report says of the original (``original``:
  its time, or why it was not run);
- ``eager_gib``: what the code as written needs for its probabilities alone
  (one B x H x L x L float32 tensor, two while training);
- ``err``: the output against SDPA's (causal) in float32.

    PYTHONPATH=. python bench/bench_longctx.py --out OUT          # GPU
    python bench/bench_longctx.py --smoke                         # CPU, tiny
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import common
import torch
import torch.nn.functional as F

# the hand-written forms the tests compile (tests/forms.py)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from forms import CausalScaledByAttribute  # noqa: E402


def measure(row: dict, L: int, H: int, D: int, training: bool, dtype, dev) -> None:
    import attn_compiler

    common.reset_compiled()
    attn_compiler.reset()
    gen = torch.Generator(device=dev).manual_seed(L)
    q, k, v = (torch.randn(1, H, L, D, device=dev, dtype=dtype, generator=gen, requires_grad=training)
               for _ in range(3))
    compiled = torch.compile(CausalScaledByAttribute(D), backend=attn_compiler.backend())

    def step():
        out = compiled(q, k, v)
        if training:
            out.float().sum().backward()
            for t in (q, k, v):
                t.grad = None
        return out

    common.sync()
    if common.on_cuda():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = step()
    common.sync()
    row["first_s"] = time.perf_counter() - t0
    if common.on_cuda():
        row["first_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    with torch.no_grad():
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
        row["err"] = float((out.detach().float() - ref).norm() / ref.norm())
    del out, ref
    rep = attn_compiler.report()
    site = rep[0] if len(rep) else None
    row["choice"] = site.features.get("choice") if site is not None and site.fused else "declined"
    if site is not None:
        times = site.features.get("times_ms") or {}
        errors = site.features.get("errors") or {}
        row["original"] = (f"{times['original']:.2f} ms" if times.get("original") is not None
                           else errors.get("original", "-")[:90])
    row["ms"] = common.time_ms(step)
    row["peak_mib"] = common.peak_mib(step)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--lengths", default="8192,16384,32768")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--passes", default="inference,training")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.lengths, args.heads, args.head_dim = "64", 2, 16
    dev = common.device()
    dtype = torch.bfloat16 if common.on_cuda() else torch.float32
    env, rows = common.environment(), []
    with tempfile.TemporaryDirectory(prefix="attn_compiler_longctx_") as cache:
        # every length tuned afresh, as a first user would; the folder goes with the run
        old_cache = os.environ.get("ATTN_COMPILER_CACHE_DIR")
        os.environ["ATTN_COMPILER_CACHE_DIR"] = cache
        try:
            for L in [int(x) for x in args.lengths.split(",")]:
                for pass_ in args.passes.split(","):
                    training = pass_ == "training"
                    eager = args.heads * L * L * 4 * (2 if training else 1) / 2**30
                    row = dict(env, L=L, heads=args.heads, head_dim=args.head_dim, passes=pass_, eager_gib=eager)
                    rows.append(common.model_row(row, lambda r, L=L, t=training: measure(
                        r, L, args.heads, args.head_dim, t, dtype, dev)))
        finally:
            if old_cache is None:
                os.environ.pop("ATTN_COMPILER_CACHE_DIR", None)
            else:
                os.environ["ATTN_COMPILER_CACHE_DIR"] = old_cache
    common.finish_rows(rows, args.out, "longctx", ["L", "passes", "first_s", "first_peak_gib", "choice",
                                                   "original", "ms", "peak_mib", "eager_gib", "err"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
