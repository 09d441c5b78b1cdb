"""attn_compiler.dispatch: which implementation runs the ``attn_compiler::attention``
op, through the op itself (autograd, opcheck, torch.compile).

On CPU ``implementation("triton")`` runs the generated kernels in Triton's
interpreter: the path CI takes to run the kernels inside a compiled model (with
a GPU the same tests run the compiled kernels, autotuning off).  ``"auto"``
runs the blockwise reference on CPU tensors.
"""
from __future__ import annotations

import dataclasses

import pytest
import sympy
import torch
from torch import nn

import attn_compiler
from attn_compiler import dispatch, kernels, ops
from attn_compiler.testing import golden_check
from kernel_checks import T0, captured_spec, causal_mod, kv_idx, make_spec, masked, q_idx, qkv, randn, score

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::RuntimeWarning")   # numpy inside Triton's interpreter


def _bias_problem(dtype=torch.float32, device=None):
    q, k, v = qkv(B=2, Hq=4, Hkv=2, Lq=21, Lk=29, dtype=dtype, seed=1, device=device)
    bias = randn(1, 4, 21, 29, seed=2).to(q.device, dtype)
    spec = make_spec(causal_mod(score + T0), dtype=dtype, group=2, captured=[captured_spec(".HQK", grad=True)])
    return [t.requires_grad_() for t in (q, k, v, bias)], spec


def _fwd_bwd(leaves, spec, impl):
    q, k, v, bias = leaves
    with dispatch.implementation(impl):
        out, lse = ops.attention(q, k, v, [bias], spec)
        grads = torch.autograd.grad(out, leaves, torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out))
    return [out, *grads], lse


def test_triton_equals_the_reference_forward_and_backward(counted):
    leaves, spec = _bias_problem()
    ours, lse = _fwd_bwd(leaves, spec, "triton")
    assert counted == {"forward": 1, "backward": 1}
    eager, eager_lse = _fwd_bwd(leaves, spec, "reference")
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    golden, _ = _fwd_bwd(leaves64, spec, "reference")
    for what, a, e, g in zip(["out", "dq", "dk", "dv", "dbias"], ours, eager, golden, strict=True):
        assert a.dtype == e.dtype and a.shape == e.shape, what
        golden_check(a, e, g, name=what)
    torch.testing.assert_close(lse, eager_lse, rtol=1e-5, atol=1e-5)


def test_triton_refuses_float64_with_a_reason():
    leaves, spec = _bias_problem(torch.float64)
    with dispatch.implementation("triton"), pytest.raises(NotImplementedError, match="float64"):
        ops.attention(*leaves[:3], [leaves[3]], spec)


def test_unknown_implementation():
    with pytest.raises(ValueError, match="unknown implementation 'cuda'"), dispatch.implementation("cuda"):
        pass
    assert dispatch.current() == "auto"


def test_auto_runs_the_reference_on_cpu(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the Triton kernels ran under 'auto' on CPU")
    monkeypatch.setattr(kernels, "forward", boom)
    monkeypatch.setattr(kernels, "backward", boom)
    monkeypatch.setattr(kernels, "decode", boom)
    leaves, spec = _bias_problem(device="cpu")
    ours, _ = _fwd_bwd(leaves, spec, "auto")
    ref, _ = _fwd_bwd(leaves, spec, "reference")
    for a, b in zip(ours, ref, strict=True):
        assert torch.equal(a, b)


def test_implementation_is_restored_after_an_error():
    with pytest.raises(RuntimeError), dispatch.implementation("triton"):
        assert dispatch.current() == "triton"
        raise RuntimeError
    assert dispatch.current() == "auto"


# ---- torch.compile: the interpreter inside a compiled model ---------------------------------

class CausalSelfAttention(nn.Module):
    """Hand-written causal attention as GPT-style models write it; (B, H, L, D) in."""

    def forward(self, q, k, v):
        L = q.shape[-2]
        s = (q @ k.transpose(-2, -1)) * (1.0 / q.shape[-1] ** 0.5)          # (B, H, L, L)
        mask = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~mask, float("-inf"))
        return torch.softmax(s, dim=-1) @ v                                  # (B, H, L, D)


@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
def test_compiled_module_runs_the_kernels(counted, inner):
    torch._dynamo.reset()
    attn_compiler.reset()
    q, k, v = (t.requires_grad_() for t in qkv(B=1, Hq=2, Lq=24, seed=3))
    model = CausalSelfAttention()
    compiled = torch.compile(model, backend=attn_compiler.backend(inner=inner))
    with dispatch.implementation("triton"):
        out = compiled(q, k, v)
        grads = torch.autograd.grad(out.sin().sum(), (q, k, v))
    assert len(attn_compiler.report().fused) == 1, str(attn_compiler.report())
    assert counted["forward"] >= 1 and counted["backward"] >= 1
    ref = model(q, k, v)
    ref_grads = torch.autograd.grad(ref.sin().sum(), (q, k, v))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


# ---- opcheck ------------------------------------------------------------------------------

def test_opcheck_with_the_triton_implementation(counted):
    q, k, v = (t.requires_grad_() for t in qkv(B=1, Hq=2, Hkv=1, Lq=17, Lk=20, seed=4))
    bias = randn(1, 2, 17, 20, seed=5).requires_grad_()
    # a non-band index mask: the kernels walk a block map (MODE 3)
    spec = make_spec(masked(sympy.Ne(q_idx - kv_idx, 5), score + T0), group=2,
                     captured=[captured_spec(".HQK", grad=True)]).dumps()
    with dispatch.implementation("triton"):
        torch.library.opcheck(torch.ops.attn_compiler.attention.default, (q, k, v, [bias], spec, None))
    assert counted["forward"] >= 1 and counted["backward"] >= 1     # test_aot_dispatch_dynamic differentiates



def test_backward_candidates_cross_the_first_two_dq_tiles():
    """The backward's candidates include the second tile's dK/dV with the
    first tile's dQ launch (run 11 of bench/RESULTS.md: faster than either
    tile alone without a mask); every candidate passes the prune rules, its dQ
    tile included."""
    from attn_compiler import autotune
    from attn_compiler.autotune import KernelConfig
    q = torch.empty(2, 4, 4096, 128, dtype=torch.bfloat16)
    spec = make_spec(causal_mod(), dtype=torch.bfloat16)
    cands = dispatch._configs("bwd", q, q, q, spec)
    assert KernelConfig(64, 64, 4, 2, dq=(128, 64, 8, 3)) in cands
    assert [c for c in cands if c.dq] == [KernelConfig(64, 64, 4, 2, dq=(128, 64, 8, 3))]
    assert not any(c.dq and c.variant != "ptr" for c in cands)
    problem = autotune.Problem(128, torch.bfloat16, 4096, 4096, True, False)
    assert all(autotune.first_failing_rule("bwd", c, problem) is None for c in cands)
    assert len(set(cands)) == len(cands)


@pytest.mark.parametrize("head_dim", [96, 128, 192, 256])
def test_tiles_for_head_dims_over_128(head_dim):
    """Head dims over 128 (tiles 256 wide) also try 128x64 w8 s2 forward and
    64x64 w8 s2, 64x32 w4 s2 backward (bench/RESULTS.md runs 164-165: the
    4-warp tiles the prune rules leave there spill); D <= 128 keeps its lists.
    Every candidate passes the prune rules."""
    from attn_compiler import autotune
    from attn_compiler.autotune import KernelConfig
    q = torch.empty(2, 4, 4096, head_dim, dtype=torch.bfloat16)
    spec = make_spec(causal_mod(), dtype=torch.bfloat16)
    fwd, bwd = dispatch._configs("fwd", q, q, q, spec), dispatch._configs("bwd", q, q, q, spec)
    big = head_dim > 128
    assert (KernelConfig(128, 64, 8, 2) in fwd) == big
    assert (KernelConfig(64, 64, 8, 2) in bwd) == big and (KernelConfig(64, 32, 4, 2) in bwd) == big
    problem = autotune.Problem(head_dim, torch.bfloat16, 4096, 4096, True, False)
    assert all(autotune.first_failing_rule("fwd", c, problem) is None for c in fwd)
    assert all(autotune.first_failing_rule("bwd", c, problem) is None for c in bwd)


@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_backward_tiles_for_head_dims_up_to_64(head_dim):
    """Head dims up to 64 also try the backward on 64x64 w4 s3 and on 32x128
    w4 s3 with dQ on 128x64 w8 s3 (bench/RESULTS.md run 167: 3-7 % faster than
    the list's best at D=64, causal and not); D=128 keeps its list (run 168).
    Every candidate passes the prune rules, none is tried twice, and the
    first two tiles keep their fused variants."""
    from attn_compiler import autotune
    from attn_compiler.autotune import KernelConfig
    q = torch.empty(2, 4, 4096, head_dim, dtype=torch.bfloat16)
    for spec in (make_spec(causal_mod(), dtype=torch.bfloat16), make_spec(score, dtype=torch.bfloat16)):
        bwd = dispatch._configs("bwd", q, q, q, spec)
        small = head_dim <= 64
        assert (KernelConfig(64, 64, 4, 3) in bwd) == small
        assert (KernelConfig(32, 128, 4, 3, dq=(128, 64, 8, 3)) in bwd) == small
        assert len(set(bwd)) == len(bwd)
        assert KernelConfig(64, 128, 8, 3, "fused") in bwd and KernelConfig(64, 64, 4, 2, "fused") in bwd
        causal = spec.mask_kind.startswith("causal")
        problem = autotune.Problem(head_dim, torch.bfloat16, 4096, 4096, causal, False)
        assert all(autotune.first_failing_rule("bwd", c, problem) is None for c in bwd)


def test_decode_candidates_try_fewer_splits():
    """Decode candidates: the tiles with the launcher's split count, and the
    first two also with 1 and 2 programs per SM (B=1, KV 32k: 16 splits ran
    37.5 µs where 64 ran 44.6, bench/RESULTS.md run 12)."""
    from attn_compiler.autotune import KernelConfig
    q = torch.empty(1, 32, 1, 128, dtype=torch.bfloat16)
    k = torch.empty(1, 8, 32768, 128, dtype=torch.bfloat16)
    spec = make_spec(score, dtype=torch.bfloat16, group=4)
    cands = dispatch._configs("decode", q, k, k, spec)
    assert len(set(cands)) == len(cands)
    base = [c for c in cands if not c.per_sm]
    assert [c for c in cands if c.per_sm] == [dataclasses.replace(c, per_sm=n) for c in base[:2] for n in (1, 2)]
    assert KernelConfig(16, 128, 4, 3, per_sm=1) in cands


def test_forward_candidates_leave_room_for_a_bias_plane():
    """With a learned-bias plane the forward streams a bias tile per stage: the
    tiles that would not fit Hopper's shared memory are not offered."""
    from attn_compiler.autotune import KernelConfig
    q = torch.empty(2, 4, 4096, 128, dtype=torch.bfloat16)
    plain = dispatch._configs("fwd", q, q, q, make_spec(causal_mod(), dtype=torch.bfloat16))
    biased = dispatch._configs("fwd", q, q, q, make_spec(causal_mod(score + T0), dtype=torch.bfloat16,
                                                          captured=[captured_spec(".HQK", "bfloat16")]))
    big = KernelConfig(128, 128, 8, 3)
    assert big in plain and big not in biased
    assert KernelConfig(128, 64, 8, 3) in biased and KernelConfig(64, 64, 4, 3) in biased
    from attn_compiler import autotune
    with_plane = autotune.Problem(128, torch.bfloat16, 4096, 4096, True, True, plane_bytes=2)
    assert autotune.first_failing_rule("fwd", big, with_plane) == "smem"       # the rule says why
    assert autotune.first_failing_rule("fwd", big, dataclasses.replace(with_plane, plane_bytes=0)) is None


def test_hopper_forward_candidates_with_tensor_descriptors(monkeypatch):
    """On Hopper the forward also tries three tiles through tensor descriptors:
    64x64 w4 s3, 128x128 w8 s3 and 128x64 w4 s2 (the fastest forward without a
    mask, bench/RESULTS.md run 35); with a bias plane only those that fit, and
    128x64 w8 s3 (the bias plane's fastest, runs 19-28; missed in runs 84-85)."""
    from attn_compiler.autotune import KernelConfig
    monkeypatch.setattr(kernels, "is_hopper", lambda t: True)
    q = torch.empty(2, 4, 4096, 128, dtype=torch.bfloat16)
    tma = {c for c in dispatch._configs("fwd", q, q, q, make_spec(score, dtype=torch.bfloat16))
           if c.variant == "tma"}
    assert tma == {KernelConfig(64, 64, 4, 3, "tma"), KernelConfig(128, 128, 8, 3, "tma"),
                   KernelConfig(128, 64, 4, 2, "tma")}
    biased = dispatch._configs("fwd", q, q, q, make_spec(score + T0, dtype=torch.bfloat16,
                                                          captured=[captured_spec(".HQK", "bfloat16")]))
    assert KernelConfig(64, 64, 4, 3, "tma") in biased and KernelConfig(128, 128, 8, 3, "tma") not in biased
    assert KernelConfig(128, 64, 8, 3, "tma") in biased and KernelConfig(128, 64, 8, 3, "tma") not in tma


def test_offsets_past_int32_inside_a_head_are_declined():
    """The kernels index inside one (batch, head) slice in int32: a bias plane
    of 50000 x 50000 (or q rows strided past 2**31 elements) is not run by
    them (the op falls back), and ordinary long inputs are."""
    spec = make_spec(causal_mod(score + T0), dtype=torch.bfloat16, captured=[captured_spec(".HQK", "bfloat16")])
    meta = dict(dtype=torch.bfloat16, device="meta")
    q = torch.empty(1, 2, 50000, 128, **meta)
    ok_bias = torch.empty(1, 2, 4096, 4096, **meta)
    assert kernels.unsupported_reason(q, q, q, spec, [ok_bias]) is None
    huge_bias = torch.empty_strided((1, 2, 50000, 50000), (0, 50000 * 50000, 50000, 1), **meta)
    why = kernels.unsupported_reason(q, q, q, spec, [huge_bias])
    assert why is not None and "captured tensor 0" in why and "int32" in why
    # (B, L, H, D) viewed as (B, H, L, D): the row stride is H * D
    blhd = torch.empty(1, 300000, 64, 128, **meta).transpose(1, 2)
    why = kernels.unsupported_reason(blhd, blhd, blhd, make_spec(causal_mod(), dtype=torch.bfloat16))
    assert why is not None and why.startswith("q ")
    # contiguous inputs, the output laid out as (B, L, H, D) ([Note: the output
    # with the heads inside the rows]): its row stride is H * Dv
    bhld = torch.empty(1, 64, 300000, 128, **meta)
    plain = make_spec(causal_mod(), dtype=torch.bfloat16)
    assert kernels.unsupported_reason(bhld, bhld, bhld, plain) is None
    why = kernels.unsupported_reason(bhld, bhld, bhld, dataclasses.replace(plain, out_heads_inner=True))
    assert why is not None and why.startswith("the output") and "int32" in why


def test_a_cpu_scalar_beside_operands_on_another_device():
    """[Note: CPU scalars beside CUDA operands]: a one-element CPU captured
    tensor becomes a tensor on the queries' device (here "meta", which has
    the device logic and no values; the GPU tests run it on CUDA); anything
    larger, or one that needs a gradient, is refused with the reason."""
    q = torch.empty(2, 3, 5, 8, device="meta")
    scale = torch.tensor(0.125, dtype=torch.float32)
    same = [torch.empty(1, 1, 1, 1, device="meta")]
    assert dispatch._on_device(q, same) is same
    (moved,) = dispatch._on_device(q, [scale.view(1, 1, 1, 1)])
    assert moved.device.type == "meta" and moved.shape == (1, 1, 1, 1) and moved.dtype == torch.float32
    with pytest.raises(ValueError, match="only a one-element scalar"):
        dispatch._on_device(q, [torch.ones(1, 1, 5, 5)])
    with pytest.raises(ValueError, match="only a one-element scalar"):
        dispatch._on_device(q, [torch.ones(1, 1, 1, 1, requires_grad=True)])
