"""kernels._launch: the compiled kernel's own launcher replays a launch whose
arguments fingerprint like an earlier one ([Note: fast launches]).  Checked on
CPU with a stand-in for Triton's JITFunction and compiled kernel."""
import inspect
import types

import pytest
import torch

from attn_compiler import kernels


class _Compiled:
    def __init__(self, log):
        self.log = log
        self.function = "fn"
        self.packed_metadata = "meta"

    def run(self, g0, g1, g2, stream, function, meta, launch_meta, enter, exit_, *args):
        self.log.append(("direct", (g0, g1, g2), stream, args))


class _Kernel:
    """Triton's JITFunction as far as _launch uses it: ``kernel[grid](*args,
    **kw)`` (the normal path: binds, compiles, launches, returns the compiled
    kernel), ``signature`` and ``params``."""

    def __init__(self, fn, constexprs=()):
        self.signature = inspect.signature(fn)
        self.params = [types.SimpleNamespace(name=n, is_constexpr=n in constexprs) for n in self.signature.parameters]
        self.log = []
        self.compiled = []

    def __getitem__(self, grid):
        def runner(*args, **kw):
            bound = self.signature.bind(*args, **{k: v for k, v in kw.items() if k in self.signature.parameters})
            bound.apply_defaults()
            self.log.append(("triton", tuple(grid), None, tuple(bound.arguments.values())))
            c = _Compiled(self.log)
            self.compiled.append(c)
            return c
        return runner


def _fn(X, Y, n, scale, x0, BLOCK, FLAG=True):
    pass


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda dev: 1234, raising=False)
    monkeypatch.setattr(kernels, "_launchers", {})


def test_a_repeated_launch_calls_the_compiled_launcher_with_every_argument_in_order(fake_cuda):
    k = _Kernel(_fn, constexprs=("BLOCK", "FLAG"))
    x, y = torch.zeros(8), torch.zeros(8)
    kernels._launch(k, (3, 2), x, y, 64, 0.5, (1 << 40) + 5, BLOCK=16, num_warps=4)
    kernels._launch(k, (3, 2), x, y, 64, 0.5, (1 << 40) + 21, BLOCK=16, num_warps=4)
    assert [e[0] for e in k.log] == ["triton", "direct"]
    _, grid, stream, args = k.log[1]
    # the parameters after the positional ones come from the keywords or their defaults, in order
    assert grid == (3, 2, 1) and stream == 1234 and args == (x, y, 64, 0.5, (1 << 40) + 21, 16, True)
    assert k.log[0][3] == (x, y, 64, 0.5, (1 << 40) + 5, 16, True)    # Triton's own binding agrees


@pytest.mark.parametrize("change", ["int value", "big int divisibility", "float value", "alignment", "dtype",
                                    "constexpr", "num_warps"])
def test_anything_that_may_change_the_specialisation_takes_the_normal_path(fake_cuda, change):
    k = _Kernel(_fn, constexprs=("BLOCK", "FLAG"))
    base = torch.zeros(16)
    args = dict(X=base, Y=base, n=64, scale=0.5, x0=(1 << 40) + 5)
    kw = dict(BLOCK=16, num_warps=4)
    kernels._launch(k, (1,), *args.values(), **kw)
    if change == "int value":
        args["n"] = 65
    elif change == "big int divisibility":
        args["x0"] = 1 << 40                      # divisible by 16: Triton specialises on it
    elif change == "float value":
        args["scale"] = 0.25
    elif change == "alignment":
        args["Y"] = base[1:]                     # 4 bytes off: not 16-byte aligned
    elif change == "dtype":
        args["Y"] = base.half()
    elif change == "constexpr":
        kw["BLOCK"] = 32
    else:
        kw["num_warps"] = 8
    kernels._launch(k, (1,), *args.values(), **kw)
    assert [e[0] for e in k.log] == ["triton", "triton"]
    kernels._launch(k, (1,), *args.values(), **kw)      # and that fingerprint is then kept too
    assert [e[0] for e in k.log] == ["triton", "triton", "direct"]


def test_launch_hooks_and_unknown_argument_types_keep_the_normal_path(fake_cuda, monkeypatch):
    import triton

    k = _Kernel(_fn, constexprs=("BLOCK", "FLAG"))
    x = torch.zeros(8)
    for _ in range(2):
        kernels._launch(k, (1,), x, x, 64, "not a number", 7, BLOCK=16)
    monkeypatch.setattr(triton.knobs.runtime, "launch_enter_hook", lambda *a: None)
    for _ in range(2):
        kernels._launch(k, (1,), x, x, 64, 0.5, 7, BLOCK=16)
    assert [e[0] for e in k.log] == ["triton"] * 4


def test_torch_without_cuda_keeps_the_normal_path(monkeypatch):
    # Triton's driver can compile for a GPU that torch does not see (the sm_90
    # compile harness): the launch is Triton's own
    def no_cuda():
        raise AssertionError("Torch not compiled with CUDA enabled")
    monkeypatch.setattr(torch.cuda, "current_device", no_cuda)
    monkeypatch.setattr(kernels, "_launchers", {})
    k = _Kernel(_fn, constexprs=("BLOCK", "FLAG"))
    x = torch.zeros(8)
    for _ in range(2):
        kernels._launch(k, (1,), x, x, 64, 0.5, 7, BLOCK=16)
    assert [e[0] for e in k.log] == ["triton"] * 2 and kernels._launchers == {}


def test_a_constexpr_passed_by_position_is_never_replayed(fake_cuda):
    def fn(X, BLOCK):
        pass
    k = _Kernel(fn, constexprs=("BLOCK",))
    x = torch.zeros(8)
    for _ in range(3):
        kernels._launch(k, (1,), x, 2**40 + 1)      # a constexpr keyed by its class only would be wrong
    assert [e[0] for e in k.log] == ["triton"] * 3


@pytest.mark.parametrize("fast", [False, True])
def test_launches_route_through_the_direct_launcher_only_when_compiled(fake_cuda, monkeypatch, fast):
    # Triton's interpreter (the CPU suite) has no compiled launcher: _grid keeps kernel[grid] there
    monkeypatch.setattr(kernels, "_fast_launches", fast)
    k = _Kernel(_fn, constexprs=("BLOCK", "FLAG"))
    x = torch.zeros(8)
    for _ in range(2):
        kernels._grid(k, (1,))(x, x, 64, 0.5, 7, BLOCK=16)
    assert [e[0] for e in k.log] == (["triton", "direct"] if fast else ["triton", "triton"])


# ---- launch plans ([Note: launch plans]) -------------------------------------------

def test_a_launch_plan_is_kept_per_layout_and_never_reused_across_strides(monkeypatch):
    """Same shapes, two memory layouts (contiguous, and heads-inner as a
    transposed view): each call gets its own plan and golden-relative numbers,
    forward and backward; a layout's second call reuses its plan."""
    from kernel_checks import causal_mod, check_backward, check_forward, make_spec

    monkeypatch.setattr(kernels, "_plans", {})
    spec = make_spec(causal_mod())
    torch.manual_seed(0)
    flat = [torch.randn(1, 2, 24, 16) for _ in range(3)]
    inner = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in flat]       # (B, L, H, D) storage
    assert inner[0].stride() != flat[0].stride()
    for q, k, v in (flat, inner, flat, inner):
        check_forward(q, k, v, [], spec)
        check_backward(q, k, v, [], spec)
    assert len(kernels._plans) == 4          # (fwd, bwd) x two layouts: the repeats hit


def test_a_plan_is_built_only_for_inputs_that_pass_the_checks(monkeypatch):
    import sympy

    from attn_compiler.passes.analyze.spec import D, AttentionSpec, score

    monkeypatch.setattr(kernels, "_plans", {})
    spec = AttentionSpec(score_mod=score, scale=1 / sympy.sqrt(D), out_dtype="float32", prob_dtype="float32")
    q, k, v = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 16)
    for _ in range(2):      # the check runs again: a failed build leaves no plan behind
        with pytest.raises(ValueError, match="head dims differ"):
            kernels.forward(q, k, v, [], spec)
    assert kernels._plans == {}
