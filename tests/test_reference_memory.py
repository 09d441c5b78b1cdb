"""The blockwise reference never builds an Lq x Lk matrix for a whole head.

At Lq = Lk = 16384 one head's fp32 scores take 1 GiB (and their gradient another);
forward + backward of a causal site must raise the peak RSS far less than that.
Runs in a fresh process so the peak belongs to this measurement alone; a small
warm-up run first takes the one-off costs (lazy imports, allocator pools).
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(r"""
    import json, resource, sys
    import sympy, torch
    from attn_compiler import ops
    from attn_compiler.passes.analyze.spec import AttentionSpec, D, kv_idx, q_idx, score
    from attn_compiler.testing import reference_attention

    torch.manual_seed(0)
    spec = AttentionSpec(sympy.Piecewise((-sympy.oo, kv_idx > q_idx), (score, True)), 1 / sympy.sqrt(D))

    def run(L):
        q, k, v = (torch.randn(1, 1, L, 16, requires_grad=True) for _ in range(3))
        out, lse = ops.attention(q, k, v, [], spec)
        out.sum().backward()
        return q, k, v, out

    def rss_mib():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux

    run(512)
    base = rss_mib()
    L = int(sys.argv[1])
    q, k, v, out = run(L)
    peak = rss_mib()
    # the last 32 rows against an eager computation of just those rows
    rows = slice(L - 32, L)
    qr = q.detach()[:, :, rows].requires_grad_()
    keep = torch.arange(L).view(1, -1) <= torch.arange(L - 32, L).view(-1, 1)
    ref = reference_attention(qr, k.detach(), v.detach(), mask=keep)
    (dq_ref,) = torch.autograd.grad(ref.sum(), qr)
    err_out = ((out[:, :, rows] - ref).norm() / ref.norm()).item()
    err_dq = ((q.grad[:, :, rows] - dq_ref).norm() / dq_ref.norm()).item()
    print(json.dumps(dict(base=base, peak=peak, err_out=err_out, err_dq=err_dq,
                          finite=bool(torch.isfinite(out).all() and torch.isfinite(q.grad).all()))))
""")

L = 16384
SCORES_MIB = L * L * 4 / 2**20          # one head's fp32 scores: 1024 MiB


def test_forward_backward_memory_is_linear():
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(L)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    grown = r["peak"] - r["base"]
    # inputs, outputs and grads are ~6 MiB; blocks of 1M fp32 are 4 MiB each
    assert grown < SCORES_MIB / 4, f"peak RSS grew {grown:.0f} MiB (scores would be {SCORES_MIB:.0f} MiB)"
    assert r["finite"]
    assert r["err_out"] < 1e-5 and r["err_dq"] < 1e-4, r
