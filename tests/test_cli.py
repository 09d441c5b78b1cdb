"""The command line: ``explain`` on a user's file, ``demo`` end to end, ``report`` of the
autotune cache, errors."""
import os
import subprocess
import sys
import textwrap

import pytest

from attn_compiler.cli import main

MODEL_FILE = textwrap.dedent('''
    import math
    import torch


    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            s = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
            return torch.softmax(s, dim=-1) @ v


    def make():
        q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
        return Attention(), (q, k, v)


    class WithInputs(Attention):
        def example_inputs(self):
            return tuple(torch.randn(1, 2, 8, 16) for _ in range(3))


    def make_with_inputs():
        return WithInputs()


    NOT_CALLABLE = 3
''')


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "mymodel.py"
    path.write_text(MODEL_FILE)
    return str(path)


def test_help_lists_commands():
    proc = subprocess.run([sys.executable, "-m", "attn_compiler", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert "demo" in proc.stdout and "explain" in proc.stdout and "report" in proc.stdout


@pytest.mark.parametrize("factory", ["make", "make_with_inputs"])
def test_explain_runs(model_file, factory, capsys):
    assert main(["explain", f"{model_file}:{factory}"]) == 0
    out = capsys.readouterr().out
    assert "attn_compiler explain" in out


def test_explain_lists_the_site(model_file, capsys):
    assert main(["explain", f"{model_file}:make"]) == 0
    out = capsys.readouterr().out
    assert "1 fused" in out and "mymodel.py:" in out


@pytest.mark.parametrize("target, message", [
    ("nowhere.py:make", "no such file"),
    ("{file}:missing", "has no 'missing'"),
    ("{file}:NOT_CALLABLE", "not callable"),
    ("{file}", "expected FILE.py:FACTORY"),
])
def test_explain_friendly_errors(model_file, target, message, capsys):
    assert main(["explain", target.format(file=model_file)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    proc = subprocess.run(
        [sys.executable, "-m", "attn_compiler", "demo", "--inner", "eager", "--device", "cpu"],
        cwd=tmp_path_factory.mktemp("demo"), capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return proc


def test_demo_numerics_pass(demo_run):
    assert demo_run.returncode == 0, demo_run.stdout + demo_run.stderr
    assert "numerics: ok" in demo_run.stdout
    assert "logits" in demo_run.stdout


def test_demo_fuses_every_layer(demo_run):
    assert "2 attention sites: 2 fused, 0 declined" in demo_run.stdout


def test_report_empty_cache(tmp_path, capsys):
    assert main(["report", "--cache-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == f"autotune cache {tmp_path / 'autotune.json'}: empty"


def test_report_lists_entries_and_clears(tmp_path, capsys):
    import torch

    from attn_compiler.autotune import KernelConfig, TuneCache, make_key, shape_bucket

    cache = TuneCache(tmp_path / "autotune.json")
    for lq, family in ((1024, "fwd"), (128, "fwd"), (1024, "bwd")):
        bucket = shape_bucket(2, 8, 2, lq, lq, 64, 64, torch.bfloat16)
        key = make_key(family, "0123456789abcdef0123", bucket, gpu="NVIDIA H200", triton="3.6.0")
        cache.put(key, {"choice": "triton 128x64", "config": KernelConfig(128, 64, 4, 3).as_dict(),
                        "times_ms": {"triton 128x64": 0.25, "eager": 1.5, "triton 64x32": None},
                        "errors": {"triton 64x32": "OutOfResources"}, "created": "2025-01-01T00:00:00"})
    assert main(["report", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"autotune cache {tmp_path / 'autotune.json'}: 3 entries")
    rows = [line for line in out.splitlines() if "NVIDIA H200" in line]
    assert len(rows) == 3
    assert "bwd" in rows[0] and "lq128 " in rows[1] and "lq1024 " in rows[2]  # sorted by family, bucket
    for row in rows:
        assert "0123456789ab" in row and "0123456789abcdef" not in row  # spec hash shortened
        assert "128x64 w4 s3 ptr" in row and "0.25" in row
        assert "eager 1.5, triton 64x32 failed" in row

    assert main(["report", "--cache-dir", str(tmp_path), "--clear"]) == 0
    assert "cleared 3 entries" in capsys.readouterr().out
    assert main(["report", "--cache-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.rstrip().endswith(": empty")
