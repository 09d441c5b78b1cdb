"""Host time per call of the attention op, against SDPA: what a call costs the
CPU when the GPU is not the limit (short sequences, decode, small batches).

    PYTHONPATH=. python bench/bench_host.py [--shapes 1x1x128x64,16x16x1024x128] [--out OUT]
    python bench/bench_host.py --smoke            # CPU: tiny shapes, kernels in the interpreter
    PYTHONPATH=. python bench/bench_host.py --compiled   # and the compiled paths, per call

For each shape (causal, bf16; fp32 with --smoke) and each entry point (our
launchers ``kernels.forward`` / ``kernels.backward``, ``dispatch``, the op with
and without inputs needing gradients, an eager forward+backward through
autograd; SDPA's forward and forward+backward), a loop of ``--n`` calls without
synchronising gives the host's µs per call; "synced" adds the final
synchronise, so it is the larger of host and GPU time.  The kernels' own time
(CUDA-graph replays) is printed beside them.  Our kernels are forced
(``ops.implementation("triton")``) after one tuned call per shape.  With
``--compiled``, the hand-written causal attention compiled with the backend
(its never-slower choice, reported per site), with inductor alone, and SDPA
compiled, per inference forward and per training step.  Rows go
to OUT/host.jsonl; the table is printed last.  Method of bench/RESULTS.md runs
29-31.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before any kernel module is imported

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch.nn.functional as F  # noqa: E402
from common import environment  # noqa: E402
from impls import ours_spec  # noqa: E402
from results import Results, markdown_table  # noqa: E402

from attn_compiler import dispatch, kernels, ops  # noqa: E402


def _sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def host_us(fn, n: int, dev) -> tuple:
    """(host µs per call, synced µs per call) of ``n`` calls after warm-up."""
    for _ in range(max(2, n // 10)):
        fn()
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    _sync(dev)
    t2 = time.perf_counter()
    return (t1 - t0) / n * 1e6, (t2 - t0) / n * 1e6


def graph_us(fn, dev) -> float:
    """The kernels' own time: CUDA-graph replays (None off CUDA)."""
    if dev.type != "cuda":
        return None
    return dispatch.graph_bench(fn) * 1e3


def entry_points(B: int, H: int, N: int, D: int, dtype, dev):
    """(name, callable) per entry point, and the kernels' graph times."""
    spec = ours_spec(True, "none", dtype)
    sp = ops._spec(spec)
    mk = lambda: torch.randn(B, H, N, D, dtype=dtype, device=dev)  # noqa: E731
    q, k, v = mk(), mk(), mk()
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    with ops.implementation("triton"):
        out, lse = ops.attention(q, k, v, [], spec)                  # tunes the forward
        go = torch.randn_like(out)
        dispatch.backward(go, q, k, v, [], out, lse, sp, None)      # and the backward
        fwd_cfg = dispatch._picked[dispatch._signature("fwd", sp, q, k, v, [])][1]
        bwd_cfg = dispatch._picked[dispatch._signature("bwd", sp, q, k, v, [])][1]
    kernel_us = {"fwd": graph_us(lambda: kernels.forward(q, k, v, [], sp, None, fwd_cfg), dev),
                 "bwd": graph_us(lambda: kernels.backward(go, q, k, v, [], out, lse, sp, None, bwd_cfg), dev)}

    def op_backward():
        with torch.no_grad():
            torch.ops.attn_compiler.attention_backward(go, q, k, v, [], out, lse, spec, None)

    ours = [
        ("kernels.forward", lambda: kernels.forward(q, k, v, [], sp, None, fwd_cfg)),
        ("dispatch.forward", lambda: dispatch.forward(q, k, v, [], sp, None)),
        ("op forward, no grad", lambda: ops.attention(q, k, v, [], spec)),
        ("op forward, inputs need grad", lambda: ops.attention(qg, kg, vg, [], spec)),
        ("kernels.backward", lambda: kernels.backward(go, q, k, v, [], out, lse, sp, None, bwd_cfg)),
        ("op backward, no grad", op_backward),
        ("forward+backward (autograd)", lambda: ops.attention(qg, kg, vg, [], spec)[0].backward(go)),
    ]
    theirs = [
        ("sdpa forward", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
        ("sdpa forward+backward", lambda: F.scaled_dot_product_attention(qg, kg, vg, is_causal=True).backward(go)),
    ]
    return ours, theirs, kernel_us, (fwd_cfg, bwd_cfg)


def compiled_steps(B: int, H: int, N: int, D: int, dtype, dev):
    """Yields (name, callable, note) per compiled path of the hand-written
    causal attention (inference forward under no_grad, and a training
    forward+backward): the backend with its never-slower choice (inductor
    inside, no CUDA graphs; the note says what it chose), inductor alone, and
    compiled SDPA.  Each is compiled (dynamo reset before) as it is yielded:
    time it before taking the next."""
    import attn_compiler
    from impls import HandWrittenAttention, compile_attn_compiler, site_note

    mk = lambda: torch.randn(B, H, N, D, dtype=dtype, device=dev)  # noqa: E731
    q, k, v = mk(), mk(), mk()
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    go = torch.randn_like(q)
    paths = {"backend": lambda: compile_attn_compiler(HandWrittenAttention(causal=True)),
             "inductor": lambda: torch.compile(HandWrittenAttention(causal=True), dynamic=False),
             "sdpa": lambda: torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                                           dynamic=False)}
    for path, build in paths.items():
        for training in (False, True):
            torch._dynamo.reset()
            fn = build()
            if training:
                def step(fn=fn):
                    fn(qg, kg, vg).backward(go)
            else:
                def step(fn=fn):
                    with torch.no_grad():
                        fn(q, k, v)
            step()                                        # compiles (and, for the backend, decides)
            note = ""
            if path == "backend":
                note = site_note() + "; " + "; ".join(
                    str(s.features.get("choice_note", "")) for s in attn_compiler.report())
            yield f"compiled {'fwd+bwd' if training else 'fwd'}, {path}", step, note


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="1x1x128x64,16x16x1024x128", help="comma list of BxHxNxD (causal)")
    ap.add_argument("--n", type=int, default=300, help="calls per measurement")
    ap.add_argument("--smoke", action="store_true", help="CPU check: 1x1x32x16 fp32, 3 calls, interpreter kernels")
    ap.add_argument("--compiled", action="store_true",
                    help="also the compiled paths: the backend (never-slower choice), inductor alone, SDPA")
    ap.add_argument("--out", default=os.path.join("bench", "out"))
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        shapes, n, dtype = [(1, 1, 32, 16)], 3, torch.float32
    else:
        if dev.type != "cuda":
            ap.error("needs a CUDA GPU (or --smoke)")
        shapes = [tuple(int(x) for x in s.lower().split("x")) for s in args.shapes.split(",")]
        n, dtype = args.n, torch.bfloat16
    results = Results(args.out, "host", environment())
    table = []
    for B, H, N, D in shapes:
        shape = f"{B}x{H}x{N}x{D}"
        ours, theirs, kernel_us, cfgs = entry_points(B, H, N, D, dtype, dev)
        print(f"{shape}: kernels (graph replays) fwd {kernel_us['fwd']} us, bwd {kernel_us['bwd']} us; "
              f"configs {cfgs[0]} / {cfgs[1]}", flush=True)
        with ops.implementation("triton"):
            for name, fn in ours + theirs:
                host, synced = host_us(fn, n, dev)
                results.add({"impl": "sdpa" if name.startswith("sdpa") else "ours_triton", "shape": shape,
                             "causal": True, "pass": name, "status": "ok", "ms": round(host / 1e3, 5),
                             "host_us": round(host, 1),
                             "synced_us": round(synced, 1), "kernel_fwd_us": kernel_us["fwd"],
                             "kernel_bwd_us": kernel_us["bwd"]})
                table.append([shape, name, f"{host:.1f}", f"{synced:.1f}"])
        if args.compiled:
            for name, fn, note in compiled_steps(B, H, N, D, dtype, dev):
                if note:
                    print(f"{shape}: {name}: {note}", flush=True)
                host, synced = host_us(fn, n, dev)
                results.add({"impl": name.rsplit(", ", 1)[-1], "shape": shape, "causal": True, "pass": name,
                             "status": "ok", "ms": round(synced / 1e3, 5), "host_us": round(host, 1),
                             "synced_us": round(synced, 1), "note": note})
                table.append([shape, name, f"{host:.1f}", f"{synced:.1f}"])
    print()
    print(markdown_table(table, ["shape", "entry point", "host µs", "synced µs"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
