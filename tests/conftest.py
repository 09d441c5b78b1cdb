"""Shared test setup: Triton's interpreter on CPU, the gpu marker, a clean site report."""
import os

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU the generated Triton kernels run in Triton's interpreter on CPU
# tensors.  Read when a @triton.jit function runs: set before any kernel module
# is imported.  With a GPU they compile for it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _fresh_report():
    """Each test starts with an empty site report."""
    try:
        import attn_compiler
        reset = attn_compiler.reset
    except (ImportError, AttributeError):  # the package is being written in parallel
        reset = None
    if reset is not None:
        reset()
    yield


@pytest.fixture
def counted(monkeypatch):
    """Counts of kernels.forward / kernels.backward calls; no tuned pick carried
    over, no timing (the default config runs)."""
    from attn_compiler import dispatch, kernels
    monkeypatch.setenv("ATTN_COMPILER_AUTOTUNE", "0")
    calls = {"forward": 0, "backward": 0}
    for name in calls:
        fn = getattr(kernels, name)

        def wrapper(*args, _fn=fn, _name=name, **kw):
            calls[_name] += 1
            return _fn(*args, **kw)
        monkeypatch.setattr(kernels, name, wrapper)
    monkeypatch.setattr(dispatch, "_picked", {})
    return calls
