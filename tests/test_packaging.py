"""Packaging: the entry point, a lazy import, and no generic top-level packages.

These run fresh interpreters in an empty folder (not the repository root), so
they see the installed package the way a user does.
"""
import importlib.metadata
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

try:
    importlib.metadata.distribution("attn_compiler")
    INSTALLED = True
except importlib.metadata.PackageNotFoundError:
    INSTALLED = False

needs_install = pytest.mark.skipif(not INSTALLED, reason="attn_compiler is not installed (pip install -e .)")


def run_python(code: str, cwd, timeout: float = 600) -> str:
    """Run ``code`` in a fresh interpreter in ``cwd``; its stdout (fails on a non-zero exit)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@needs_install
def test_entry_point_registers_backend_without_import(tmp_path):
    code = """
import sys, torch
model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
compiled = torch.compile(model, backend="attn_compiler")
x = torch.randn(2, 8)
torch.testing.assert_close(compiled(x), model(x))
assert "attn_compiler" in sys.modules  # loaded by dynamo through the entry point
print("ok")
"""
    assert run_python(code, tmp_path).strip().endswith("ok")


@needs_install
def test_entry_point_is_declared():
    eps = importlib.metadata.entry_points(group="torch_dynamo_backends")
    assert {ep.name: ep.value for ep in eps}.get("attn_compiler") == \
        "attn_compiler.backend:attn_compiler_backend"


@needs_install
def test_import_is_lazy(tmp_path):
    code = """
import json, logging, os, sys
env, handlers = dict(os.environ), list(logging.getLogger().handlers)
import attn_compiler
print(json.dumps({
    "modules": sorted(m for m in sys.modules if m.split(".")[0] in
                      ("attn_compiler", "transformers", "triton", "torch", "sympy")),
    "env_same": dict(os.environ) == env,
    "handlers_same": list(logging.getLogger().handlers) == handlers,
    "callables": [callable(attn_compiler.backend), callable(attn_compiler.report),
                  callable(attn_compiler.reset)],
    "version": attn_compiler.__version__,
}))
"""
    out = json.loads(run_python(code, tmp_path))
    mods = out["modules"]
    for heavy in ("transformers", "triton", "attn_compiler.passes", "attn_compiler.ops",
                  "attn_compiler.backend", "attn_compiler.templates"):
        assert heavy not in mods, f"import attn_compiler imported {heavy}"
    assert out["env_same"] and out["handlers_same"]
    assert out["callables"] == [True, True, True]
    assert out["version"] == importlib.metadata.version("attn_compiler")


def test_public_functions_survive_submodule_imports():
    import attn_compiler
    import attn_compiler.backend  # noqa: F401  (the submodule of the same name)
    import attn_compiler.report  # noqa: F401
    from attn_compiler.backend import attn_compiler_backend

    assert callable(attn_compiler_backend)
    assert callable(attn_compiler.backend) and not isinstance(attn_compiler.backend, type(attn_compiler))
    assert len(attn_compiler.report()) == 0
    from attn_compiler import report

    assert callable(report.record) and report is attn_compiler.report  # module, callable


@needs_install
def test_passes_and_templates_live_under_attn_compiler(tmp_path):
    code = """
import importlib, importlib.util, json
import attn_compiler.passes, attn_compiler.templates
from attn_compiler.passes.analyze import AttentionSpec, CapturedTensor
import attn_compiler.passes.analyze.spec as spec
print(json.dumps({
    "top": [importlib.util.find_spec(n) is None for n in ("passes", "templates")],
    "names": [attn_compiler.passes.__name__, attn_compiler.templates.__name__],
    "same": spec.AttentionSpec is AttentionSpec,
}))
"""
    out = json.loads(run_python(code, tmp_path))
    assert out["top"] == [True, True], "passes/templates importable as top-level packages"
    assert out["names"] == ["attn_compiler.passes", "attn_compiler.templates"]
    assert out["same"]


@needs_install
def test_every_subpackage_is_importable(tmp_path):
    """Each folder with an __init__.py under passes/ and templates/ maps to attn_compiler.*."""
    names = []
    for root in ("passes", "templates"):
        for init in sorted((REPO / root).rglob("__init__.py")):
            rel = init.parent.relative_to(REPO).parts
            names.append(".".join(("attn_compiler",) + rel))
    code = f"import importlib\nfor n in {names!r}:\n    importlib.import_module(n)\nprint('ok')"
    assert run_python(code, tmp_path).strip() == "ok"
