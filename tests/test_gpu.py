"""The backend on CUDA tensors (skipped without a GPU): sites found the same
way as on CPU (registered buffers are checked on their own device) and the
op's numbers right on the device."""
import copy

import pytest
import sympy
import torch

import attn_compiler
from attn_compiler.models.gpt import GPT, GPTConfig
from attn_compiler.testing import golden_check

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpt_on_cuda_is_fused_causal_and_matches(dtype, monkeypatch, tmp_path):
    """The sites are found and fused on CUDA, and our kernels' numbers are
    right there.  At this size (2x4x48x16) the never-slower choice may keep
    the original or take SDPA by a few µs either way, so it is told to take
    our op (its timing replaced, in a cache of its own)."""
    from attn_compiler.passes import choose
    monkeypatch.setenv("ATTN_COMPILER_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(choose, "BENCH", lambda fn: 1.0 if fn.name == "attn_compiler" else 2.0)
    monkeypatch.setattr(choose, "LAUNCH_COST", lambda step, replay_ms: (step(), replay_ms)[1])
    torch.manual_seed(0)
    model = GPT(GPTConfig()).cuda()
    idx = torch.randint(0, 256, (2, 48), device="cuda")
    golden = GPT(GPTConfig()).cuda().double()
    golden.load_state_dict(model.state_dict())
    model = model.to(dtype)
    ref = golden(idx)
    ref = ref[0] if isinstance(ref, tuple) else ref
    eager = model(idx)
    eager = eager[0] if isinstance(eager, tuple) else eager
    torch._dynamo.reset()
    attn_compiler.reset()
    ours = torch.compile(model, backend=attn_compiler.backend(inner="aot_eager"))(idx)
    ours = ours[0] if isinstance(ours, tuple) else ours
    rep = attn_compiler.report()
    assert len(rep.fused) == 2 and all(s.features["mask"] == "causal" for s in rep.fused), str(rep)
    assert all(s.features["choice"] == "attn_compiler" for s in rep.fused), str(rep)
    golden_check(ours.detach(), eager.detach(), ref.detach())


def test_op_forward_backward_on_cuda():
    from attn_compiler.testing import reference_attention
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 77, 64, device="cuda", dtype=torch.float64, requires_grad=True)
               for _ in range(3))

    def f(q, k, v):
        s = (q @ k.transpose(-1, -2)) * 64 ** -0.5
        i = torch.arange(77, device=q.device)
        s = s.masked_fill(i[None, :] > i[:, None], float("-inf"))
        return s.softmax(-1) @ v

    torch._dynamo.reset()
    ours = torch.compile(f, backend=attn_compiler.backend(inner="aot_eager"))(q, k, v)
    ref = reference_attention(q, k, v, causal=True)
    torch.testing.assert_close(ours, ref)
    g1 = torch.autograd.grad(ours.sum(), (q, k, v))
    g2 = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_on_the_second_gpu(dtype, monkeypatch, tmp_path):
    """A model on cuda:1 while cuda:0 is current (``device_map="auto"``
    splits a model so): the never-slower timing and the kernels run on the
    site's GPU; our op chosen, fused, forward and backward as eager."""
    from attn_compiler.passes import choose
    monkeypatch.setenv("ATTN_COMPILER_CACHE_DIR", str(tmp_path))
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    torch.manual_seed(0)
    model = GPT(GPTConfig()).to(dev)
    golden = GPT(GPTConfig()).to(dev).double()
    golden.load_state_dict(model.state_dict())
    model = model.to(dtype)
    idx = torch.randint(0, 256, (2, 96), device=dev)
    timed = []
    bench = choose.graph_bench

    def spy(fn):
        timed.append(torch.cuda.current_device())
        return bench(fn)
    monkeypatch.setattr(choose, "BENCH", spy)

    def run(m):
        out = m(idx)
        out = out[0] if isinstance(out, tuple) else out
        out.float().pow(2).mean().backward()
        return out.detach(), [p.grad for p in m.parameters()]

    torch._dynamo.reset()
    attn_compiler.reset()
    ours = copy.deepcopy(model)
    o, g = run(torch.compile(ours, backend=attn_compiler.backend(inner="aot_eager")))
    e, ge = run(model)
    r, gr = run(golden)
    rep = attn_compiler.report()
    assert len(rep.fused) == 2, str(rep)
    assert timed and set(timed) == {1}, timed
    assert torch.cuda.current_device() == 0
    golden_check(o, e, r)
    for a, b, c in zip(g, ge, gr):
        golden_check(a, b, c)


def test_sdpa_candidate_backward_on_cudnn_in_either_gradient_layout():
    """[Note: cuDNN's backward with the output's layout]  cuDNN's SDPA
    backward at one shape, called with the output's gradient contiguous, then
    in the (B, N, H, D) layout, then both again: every call's gradients
    within bf16's agreement of float64 (without the re-layout the second
    layout's were 1.3-1.4 off)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from attn_compiler import sdpa
    from attn_compiler.passes.analyze.spec import D as head_dim
    from attn_compiler.passes.analyze.spec import AttentionSpec, score
    from attn_compiler.testing import rel_err
    B, H, N, D = 2, 4, 18, 8
    spec = AttentionSpec(score_mod=score, scale=1 / sympy.sqrt(head_dim), out_dtype="bfloat16",
                         prob_dtype="bfloat16").dumps()
    for i, layout in enumerate(["contiguous", "bnhd", "contiguous", "bnhd"]):
        g = torch.Generator().manual_seed(i)
        q, k, v = (torch.randn(B, N, H, D, generator=g).cuda().bfloat16().transpose(1, 2).requires_grad_(True)
                   for _ in range(3))
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            out, _ = sdpa.sdpa_attention(q, k, v, [], spec)
            dout = torch.randn(B, H, N, D, generator=g) if layout == "contiguous" else \
                torch.randn(B, N, H, D, generator=g).transpose(1, 2)
            got = torch.autograd.grad(out, (q, k, v), dout.cuda().bfloat16())
        qq, kk, vv = (t.detach().double().requires_grad_(True) for t in (q, k, v))
        want = torch.autograd.grad(torch.nn.functional.scaled_dot_product_attention(qq, kk, vv), (qq, kk, vv),
                                   dout.cuda().double())
        errs = [rel_err(a, b) for a, b in zip(got, want)]
        assert max(errs) < 2e-2, (layout, i, errs)
