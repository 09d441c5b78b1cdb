"""bench/bench_host.py runs end to end on CPU (``--smoke``: the kernels in the
interpreter), its compiled paths included, and writes a row per entry point."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_host_smoke_with_compiled_paths(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO, ATTN_COMPILER_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, os.path.join(REPO, "bench", "bench_host.py"), "--smoke", "--compiled",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "host.jsonl")]
    passes = {r["pass"] for r in rows if r.get("status") == "ok"}
    for name in ("kernels.forward", "op forward, no grad", "forward+backward (autograd)",
                 "compiled fwd, backend", "compiled fwd+bwd, backend", "compiled fwd, inductor",
                 "compiled fwd+bwd, sdpa"):
        assert name in passes, sorted(passes)
    backend = [r for r in rows if r["pass"] == "compiled fwd, backend"][0]
    assert "fused 1/1" in backend["note"], backend
    assert "| compiled fwd+bwd, sdpa" in proc.stdout
