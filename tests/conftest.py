"""Shared test setup: Triton's interpreter on CPU, the gpu marker, a clean site report."""
import os

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU the generated Triton kernels run in Triton's interpreter on CPU
# tensors.  Read when a @triton.jit function runs: set before any kernel module
# is imported.  With a GPU they compile for it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_bfloat16_as_on_a_gpu():
    """Triton 3.6's interpreter keeps bfloat16 as raw 16-bit patterns and gets
    two things wrong that a GPU does right: ``tl.dot`` multiplies the patterns
    as integers (~1e10 off on a 16x16 product), and float32 -> bfloat16 casts
    truncate instead of rounding to nearest even (errors twice a GPU's, and
    biased).  The kernels' bfloat16 numbers are checked as the GPU computes
    them: both are replaced, for bfloat16 only."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    if builder is None or not hasattr(builder, "create_dot") or not hasattr(builder, "cast_impl"):
        return
    handle = interpreter.TensorHandle

    def widen(t):
        if t.dtype.scalar == tl.bfloat16:
            return (t.data.astype(np.uint32) << 16).view(np.float32)
        return t.data

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc, _orig=builder.create_dot):
        if tl.bfloat16 not in (a.dtype.scalar, b.dtype.scalar):
            return _orig(self, a, b, d, input_precision, max_num_imprecise_acc)
        return handle(np.matmul(widen(a), widen(b), dtype=d.data.dtype) + d.data, d.dtype.scalar)

    def cast_impl(self, src, dst_type, _orig=builder.cast_impl):
        if not (src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16):
            return _orig(self, src, dst_type)
        x = np.asarray(src.data, dtype=np.float32)
        bits = x.view(np.uint32).astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)   # to nearest, ties even
        nan = np.where(np.signbit(x), 0xFFC0, 0x7FC0).astype(np.uint16)
        return handle(np.where(np.isnan(x), nan, rounded), dst_type.scalar)

    builder.create_dot = create_dot
    builder.cast_impl = cast_impl


def _interpreter_float32_dot_deterministic():
    """Triton's interpreter multiplies float32 tiles with numpy's BLAS, whose
    rounding may depend on more than the operands (seen on an AMD EPYC: the
    same (M, D) x (D, N) product rounded differently in the backward's
    preprocess and in its dQ kernel).  The [Note: exact rows] of the
    generated backward rests on the two giving dP to the bit, as a GPU does
    for one tile and warp layout.  Here a float32 product is taken in float64
    and rounded once: the same bits for the same operands, and at least as
    close to the exact product as the GPU's."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    if builder is None or not hasattr(builder, "create_dot"):
        return
    handle = interpreter.TensorHandle

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc, _orig=builder.create_dot):
        if not (a.dtype.scalar == b.dtype.scalar == d.dtype.scalar == tl.float32):
            return _orig(self, a, b, d, input_precision, max_num_imprecise_acc)
        exact = np.matmul(a.data.astype(np.float64), b.data.astype(np.float64)) + d.data
        return handle(exact.astype(np.float32), d.dtype.scalar)

    builder.create_dot = create_dot
    builder.create_fp_trunc = lambda self, src, dst_type: self.cast_impl(src, dst_type)


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_bfloat16_as_on_a_gpu()
    _interpreter_float32_dot_deterministic()


# The kernel tests run on the GPU where there is one (kernel_checks.DEVICE):
# there they also count as gpu tests, so `pytest -m gpu` checks the kernels
# compiled for the device, not only through the interpreter (a block map
# allocated on the CPU passed every interpreted test and failed every launch).
ON_DEVICE_MODULES = frozenset({"test_attention_fwd.py", "test_attention_bwd.py", "test_attention_decode.py",
                               "test_attention_split_keys.py", "test_attention_split_heads.py",
                               "test_relayout.py", "test_additive_masks.py"})


@pytest.hookimpl(tryfirst=True)      # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        if os.environ.get("TRITON_INTERPRET") != "1":
            for item in items:
                if item.path.name in ON_DEVICE_MODULES:
                    item.add_marker(pytest.mark.gpu)
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
