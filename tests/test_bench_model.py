"""bench/bench_model.py runs end to end on CPU (``--smoke``: a tiny GPT, fp32,
aot_eager inside the backend): every path passes its loss check against
eager and is timed, and the backend fuses every attention site."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_model_smoke(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO, ATTN_COMPILER_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, os.path.join(REPO, "bench", "bench_model.py"), "--smoke",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "model.jsonl")]
    assert [r["path"] for r in rows] == ["eager", "inductor", "attn_compiler", "sdpa+inductor"]
    assert all(r["status"] == "OK" and r["train_ms"] > 0 and r["infer_ms"] > 0 for r in rows), rows
    ours = rows[2]
    assert "declined" in ours["sites"] and " 0 declined" in ours["sites"], ours
    assert ours["choices"] == ["attn_compiler"], ours
    assert "| attn_compiler" in proc.stdout


def test_bench_hf_train_smoke_with_attention_dropout(tmp_path):
    """bench/bench_hf_train.py --smoke --attention-dropout: the LLaMA step runs
    on every path with dropout in its attention, and the backend fuses both
    sites (a site with dropout is not dropped for drawing its own masks)."""
    env = dict(os.environ, PYTHONPATH=REPO, ATTN_COMPILER_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, os.path.join(REPO, "bench", "bench_hf_train.py"), "--smoke",
                           "--attention-dropout", "0.1", "--checkpoint", "no", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "hf_train.jsonl")]
    assert [r["path"] for r in rows] == ["hf_sdpa+inductor", "inductor", "attn_compiler"]
    assert all(r["attention_dropout"] == 0.1 and r["ms"] > 0 and r["loss_vs_first"] < 0.05 for r in rows), rows
    assert rows[2]["sites"].startswith("2 attention sites: 2 fused, 0 declined"), rows[2]


def test_bench_longctx_smoke(tmp_path):
    """bench/bench_longctx.py --smoke: the first call and a later one of the
    causal layer, inference and training, fused and matching SDPA."""
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "bench", "bench_longctx.py"), "--smoke",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "longctx.jsonl")]
    assert [r["passes"] for r in rows] == ["inference", "training"]
    assert all("error" not in r and r["choice"] == "attn_compiler" and r["err"] < 1e-5 and r["first_s"] > 0
               and r["ms"] > 0 for r in rows), rows


def test_bench_static_cache_smoke(tmp_path):
    """bench/bench_static_cache.py --smoke: a prefill and a decode step against
    a static cache's additive mask, ours (map / extent on and off) matching SDPA."""
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "bench", "bench_static_cache.py"), "--smoke",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "static_cache.jsonl")]
    assert [r["step"] for r in rows] == ["prefill", "decode"]
    assert all("error" not in r and r["err"] < 1e-5 and min(r["ours"], r["ours_all_keys"], r["sdpa"]) > 0
               for r in rows), rows


def test_bench_timm_smoke(tmp_path):
    """bench/bench_timm.py --smoke (where timm is installed): a tiny ViT and
    ConViT on every path, every attention site fused (inference and training
    graphs), the logits matching float32 eager."""
    import pytest
    pytest.importorskip("timm", reason="timm is not installed")
    env = dict(os.environ, PYTHONPATH=REPO, ATTN_COMPILER_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, os.path.join(REPO, "bench", "bench_timm.py"), "--smoke",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "timm.jsonl")]
    assert [r["impl"] for r in rows] == ["eager", "inductor", "attn_compiler", "sdpa+inductor"] * 2
    assert all("error" not in r and r["infer_ms"] > 0 and r["train_ms"] > 0 and r["rel_err"] < 1e-5
               for r in rows), rows
    assert [r["sites"] for r in rows if r["impl"] == "attn_compiler"] == [
        "24 attention sites: 24 fused, 0 declined; chosen: attn_compiler x24"] * 2
