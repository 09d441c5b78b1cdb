"""The command line: ``explain`` on a user's file, ``demo`` end to end, errors."""
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
    assert "demo" in proc.stdout and "explain" in proc.stdout


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
