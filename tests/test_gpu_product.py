"""The product path on a GPU (skipped without one): torch.compile with inductor
as the inner compiler runs the generated Triton kernels, CUDA graphs
(mode="reduce-overhead") and dynamic sequence lengths work, and every fused
site reports its never-slower decision."""
import pytest
import torch
import torch.nn as nn

import attn_compiler
import forms
from attn_compiler import dispatch
from attn_compiler.testing import golden_check

pytestmark = pytest.mark.gpu


class SoftcapCausal(nn.Module):
    """Gemma-2 style: soft-capped scores, causal mask built in the graph."""

    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        s = 30.0 * torch.tanh(s.float() / 30.0)
        L = q.shape[-2]
        mask = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~mask, float("-inf"))
        return torch.softmax(s, dim=-1).to(q.dtype) @ v


def _inputs(B=2, H=8, L=512, D=128, dtype=torch.bfloat16, grad=True):
    return [torch.randn(B, H, L, D, device="cuda", dtype=dtype, requires_grad=grad) for _ in range(3)]


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_inductor_runs_triton_kernels(mode):
    torch.manual_seed(0)
    torch._dynamo.reset()
    attn_compiler.reset()
    model = SoftcapCausal()
    compiled = torch.compile(model, backend=attn_compiler.backend(inner="inductor", mode=mode))
    args = _inputs(L=2048)    # large enough that the fused kernel clearly wins the never-slower timing
    for _ in range(3):        # CUDA graphs: warm-up, record, replay
        out = compiled(*args)
    golden = model(*[a.detach().double() for a in args])
    eager = model(*args)
    golden_check(out.detach(), eager.detach(), golden, name="out")
    rep = attn_compiler.report()
    assert rep.fused, str(rep)
    site = rep.fused[0]
    assert site.features.get("choice") in ("attn_compiler", "sdpa"), str(rep)
    assert "times_ms" in site.features, str(rep)
    assert any(k.startswith("fwd|") for k in dispatch.tunings()), dispatch.tunings()


def test_dynamic_lengths_reuse_one_tuning():
    torch.manual_seed(0)
    torch._dynamo.reset()
    attn_compiler.reset()
    model = SoftcapCausal()
    compiled = torch.compile(model, backend=attn_compiler.backend(), dynamic=True)
    before = set(dispatch.tunings())          # tunings are per process: other tests' stay
    with dispatch.implementation("triton"):
        for L in (300, 301, 317, 500):
            args = _inputs(L=L, grad=False)
            out = compiled(*args)
            golden = model(*[a.double() for a in args])
            golden_check(out, model(*args), golden, name=f"L={L}")
    # lengths 300..500 share the 512 bucket: one tuning for all of them
    keys = [k for k in set(dispatch.tunings()) - before if k.startswith("fwd|") and " d128 " in k]
    buckets = {k.split("|")[2] for k in keys}
    assert buckets and all("lq512 lk512" in b for b in buckets), buckets


def test_training_step_matches_eager_gradients():
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = SoftcapCausal()
    compiled = torch.compile(model, backend=attn_compiler.backend())
    args = _inputs(L=384)
    g = torch.randn(2, 8, 384, 128, device="cuda", dtype=torch.bfloat16)
    ours = torch.autograd.grad(compiled(*args), args, g)
    eager = torch.autograd.grad(model(*args), args, g)
    d = [a.detach().double().requires_grad_() for a in args]
    gold = torch.autograd.grad(model(*d), d, g.double())
    for name, o, e, r in zip("qkv", ours, eager, gold):
        golden_check(o, e, r, name=f"d{name}")


class Causal(nn.Module):
    """Plain causal attention, as nanoGPT writes it without SDPA."""

    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        L = q.shape[-2]
        s = s.masked_fill(~torch.ones(L, L, dtype=torch.bool, device=q.device).tril(), float("-inf"))
        return torch.softmax(s.float(), dim=-1).to(q.dtype) @ v


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_a_tiny_site_is_timed_by_its_calls_without_cuda_graphs(mode, monkeypatch, tmp_path):
    """[Note: host cost without CUDA graphs]: at 1x1x128x64 our kernels take a
    few µs and a call of the op ~100 µs of Python, so without CUDA graphs the
    site keeps SDPA or the original and says why; with torch.compile's
    mode="reduce-overhead" (through the registered backend's entry point) the
    host cost is not counted."""
    from attn_compiler.backend import attn_compiler_backend

    monkeypatch.setenv("ATTN_COMPILER_CACHE_DIR", str(tmp_path))     # a decision made now, not cached
    torch.manual_seed(0)
    torch._dynamo.reset()
    attn_compiler.reset()
    model = Causal()
    compiled = torch.compile(model, backend=attn_compiler_backend, mode=mode)
    args = _inputs(B=1, H=1, L=128, D=64, grad=False)
    for _ in range(3):
        out = compiled(*args)
    golden = model(*[a.double() for a in args])
    golden_check(out, model(*args), golden, name=f"tiny/{mode}")
    site = attn_compiler.report()[0]
    note = str(site.features.get("choice_note", ""))
    if mode == "default":
        assert "timed by its calls" in note and site.features["choice"] != "attn_compiler", str(site.features)
    else:
        assert "timed by its calls" not in note, str(site.features)


class TrilBufferAttention(nn.Module):
    """nanoGPT's attention core on a registered tril buffer (read as causal)."""

    def __init__(self, n=1024):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(n, n, device="cuda")).view(1, 1, n, n))

    def forward(self, q, k, v):
        T = q.shape[-2]
        att = (q @ k.transpose(-2, -1)) * (1.0 / q.shape[-1] ** 0.5)
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        return torch.softmax(att, dim=-1) @ v


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_a_rewritten_tril_buffer_is_followed(mode, monkeypatch, tmp_path):
    """[Note: folded buffers] with inductor (and CUDA graphs): the buffer read
    as causal is rewritten in place to a sliding window; the next call gives
    the window's answer.  The site is told to keep our op (its timing
    replaced, in a cache of its own): at this size (a forward of 2x8x1024)
    the never-slower choice may keep the original by a few µs of host time,
    and then no fused site is left to follow."""
    from attn_compiler.passes import choose
    monkeypatch.setenv("ATTN_COMPILER_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(choose, "BENCH", lambda fn: 1.0 if fn.name == "attn_compiler" else 2.0)
    monkeypatch.setattr(choose, "LAUNCH_COST", lambda step, replay_ms: (step(), replay_ms)[1])
    torch.manual_seed(0)
    torch._dynamo.reset()
    attn_compiler.reset()
    model = TrilBufferAttention()
    compiled = torch.compile(model, backend=attn_compiler.backend(inner="inductor", mode=mode))
    args = _inputs(L=1024, grad=False)
    with dispatch.implementation("triton"):
        for _ in range(3):
            out = compiled(*args)
        assert attn_compiler.report().fused[0].features["mask"] == "causal"
        torch.testing.assert_close(out, model(*args), rtol=2e-2, atol=2e-2)
        model.bias.copy_(torch.tril(torch.ones(1024, 1024, device="cuda")).triu(-63).view(1, 1, 1024, 1024))
        for _ in range(3):
            out = compiled(*args)
    want = model(*args)
    golden = model(*[a.double() for a in args])
    golden_check(out, want, golden, name="out after the buffer changed")


def test_float32_with_tf32_allowed_is_fused_and_chosen(monkeypatch, tmp_path):
    """A float32 training site with TF32 allowed (``allow_tf32 = True``): the
    kernels multiply in tf32 as eager's matmuls do, agree with the site's own
    code at TF32's precision (float16's agreement, not float32's 1e-4), and
    the kernels or SDPA win the never-slower
    timing (at 2x16x4096x128 causal ours took 7.9 ms forward + backward,
    eager 16.0, SDPA 13.1: bench/RESULTS.md run 95).  The kernels are compared
    by their replays: with the GPU tests run side by side the host is loaded,
    and our op timed call by call took 1.965 ms against 0.841 ms of kernels
    (run 133), which says nothing about the kernels."""
    from attn_compiler.passes import choose
    monkeypatch.setenv("ATTN_COMPILER_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(choose, "LAUNCH_COST", lambda step, replay_ms: replay_ms)
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        torch.manual_seed(0)
        torch._dynamo.reset()
        attn_compiler.reset()
        model = Causal()
        compiled = torch.compile(model, backend=attn_compiler.backend(inner="inductor"))
        args = _inputs(B=1, H=8, L=4096, D=64, dtype=torch.float32)
        out = compiled(*args)
        out.sum().backward()
        rep = attn_compiler.report()
        assert rep.fused, str(rep)
        site = rep.fused[0]
        assert site.features.get("choice") in ("attn_compiler", "sdpa"), str(site.features)
        golden = model(*[a.detach().double() for a in args])
        assert float((out.detach().double() - golden).norm() / golden.norm()) <= 5e-3
    finally:
        torch.set_float32_matmul_precision(old)


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
@pytest.mark.parametrize("winner", ["attn_compiler", "sdpa", "original"])
def test_float_attribute_scale_under_dynamic_true(winner, mode, monkeypatch, tmp_path):
    """[Note: CPU scalars beside CUDA operands]: the site is fused (it was
    declined on the GPU), each never-slower choice compiles with inductor
    (the SDPA one crashed the compile under symbolic sizes), CUDA graphs
    included; forward and backward golden-relative at two lengths."""
    from attn_compiler.passes import choose
    monkeypatch.setenv("ATTN_COMPILER_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(choose, "BENCH", lambda fn: 1.0 if fn.name == winner else 2.0)
    monkeypatch.setattr(choose, "LAUNCH_COST", lambda step, replay_ms: (step(), replay_ms)[1])
    torch.manual_seed(0)
    torch._dynamo.reset()
    attn_compiler.reset()
    model = forms.CausalScaledByAttribute(head_dim=128)
    compiled = torch.compile(model, backend=attn_compiler.backend(inner="inductor", mode=mode), dynamic=True)
    for L in (384, 640):
        args = _inputs(L=L)
        g = torch.randn(2, 8, L, 128, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):                  # CUDA graphs: warm-up, record, replay
            out = compiled(*args)
            ours = torch.autograd.grad(out, args, g)
        eager_out = model(*args)
        eager = torch.autograd.grad(eager_out, args, g)
        d = [a.detach().double().requires_grad_() for a in args]
        gold_out = model(*d)
        gold = torch.autograd.grad(gold_out, d, g.double())
        golden_check(out.detach(), eager_out.detach(), gold_out.detach(), name=f"L={L} out")
        for name, o, e, r in zip("qkv", ours, eager, gold):
            golden_check(o, e, r, name=f"L={L} d{name}")
    rows = list(attn_compiler.report())
    assert rows and all(r.features.get("choice") == winner for r in rows), [(r.status, r.reason) for r in rows]
    assert all(r.fused == (winner != "original") for r in rows), [(r.status, r.reason) for r in rows]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("form", ["all", "cls_token", "video"])
def test_mvitv2_relative_positions_on_the_gpu_kernels(form, dtype, counted):
    """MViTv2's decomposed relative positions as timm writes them, assigned
    back into the scores; with a cls token into all but its row and column
    ([Note: scores assigned in part]): the height term padded by one query,
    the key terms read at max(kv - 1, 0) // kw and (kv - 1) % kw; and
    torchvision's video form (time, height and width: the middle key factor
    read at ((kv - 1) // kw) % kh).  On the generated kernels on the GPU,
    forward and every gradient golden-relative to eager in the same dtype
    against float64."""
    import copy

    torch.manual_seed(0)
    if form == "video":
        sp, nq, nk = 1, 2 * 8 * 6, 2 * 4 * 3
        mod = forms.MViTv2VideoRelPos(q_size=(2, 8, 6), k_size=(2, 4, 3), dim=64).cuda()
    else:
        sp, nq, nk = int(form == "cls_token"), 192, 48
        mod = forms.MViTv2RelPos(q_size=(16, 12), k_size=(8, 6), dim=64, cls_token=form == "cls_token").cuda()
    q = torch.randn(2, 4, sp + nq, 64, device="cuda", dtype=dtype, requires_grad=True)
    k, v = (torch.randn(2, 4, sp + nk, 64, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
    args = [q, k, v]
    mod64 = copy.deepcopy(mod).double()
    mod.to(dtype)
    torch._dynamo.reset()
    attn_compiler.reset()
    with dispatch.implementation("triton"):
        ours = torch.compile(mod, backend=attn_compiler.backend(inner="aot_eager"))(*args)
        rep = attn_compiler.report()
        assert len(rep.fused) == 1 and not rep.declined, str(rep)
        eager = mod(*args)
        d = [a.detach().double().requires_grad_() for a in args]
        gold = mod64(*d)
        golden_check(ours, eager, gold, name="out")
        g = torch.randn_like(gold)
        wrt = args + list(mod.parameters())
        g_ours = torch.autograd.grad(ours, wrt, g.to(dtype))
        g_eager = torch.autograd.grad(eager, wrt, g.to(dtype))
        g_gold = torch.autograd.grad(gold, d + list(mod64.parameters()), g)
    for name, o, e, r in zip(["dq", "dk", "dv"] + [f"d{n}" for n, _ in mod.named_parameters()],
                             g_ours, g_eager, g_gold):
        golden_check(o, e, r, name=name)
    assert counted["forward"] >= 1 and counted["backward"] >= 1, counted


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("form", ["deepseek_mla_absorbed", "lilt_text_and_layout"])
def test_two_products_joined_on_the_gpu_kernels(form, dtype, counted):
    """Scores summed from two products ([Note: scores summed from two
    products]) on the generated kernels on the GPU: DeepSeek-V3's absorbed
    latent attention (128 + 64 joined into a head dim of 192, one key head
    for 8 query heads, causal) and LiLT's two streams (two sites over the
    same logits); forward and every gradient golden-relative to eager in the
    same dtype against float64."""
    torch.manual_seed(0)
    dev = "cuda"
    if form == "deepseek_mla_absorbed":
        S = 300
        args = [torch.randn(2, S, 8, 128, device=dev, dtype=dtype), torch.randn(2, S, 8, 64, device=dev, dtype=dtype),
                torch.randn(2, S, 128, device=dev, dtype=dtype), torch.randn(2, S, 64, device=dev, dtype=dtype)]
        args.append(torch.full((S, S), float("-inf"), device=dev).triu(1).to(dtype))
        fn, sites = forms.deepseek_mla_absorbed, 1
    else:
        S = 257
        args = [torch.randn(2, 4, S, d, device=dev, dtype=dtype) for d in (64, 64, 64, 16, 16, 16)]
        keep = torch.ones(2, S, dtype=torch.bool, device=dev)
        keep[1, 200:] = False
        args.append(torch.zeros(2, 1, 1, S, device=dev, dtype=dtype).masked_fill(~keep[:, None, None], -1e4))
        fn, sites = forms.lilt_text_and_layout, 2
    grad = [a.requires_grad_() for a in args[:-1]]
    torch._dynamo.reset()
    attn_compiler.reset()
    with dispatch.implementation("triton"):
        ours = torch.compile(fn, backend=attn_compiler.backend(inner="aot_eager"))(*args)
        rep = attn_compiler.report()
        assert len(rep.fused) == sites and not rep.declined, str(rep)
        eager = fn(*args)
        d = [a.detach().double().requires_grad_(a.requires_grad) for a in args]
        gold = fn(*d)
        golden_check(ours, eager, gold, name="out")
        g = torch.randn_like(gold)
        g_ours = torch.autograd.grad(ours, grad, g.to(dtype))
        g_eager = torch.autograd.grad(eager, grad, g.to(dtype))
        g_gold = torch.autograd.grad(gold, d[:-1], g)
    for i, (o, e, r) in enumerate(zip(g_ours, g_eager, g_gold)):
        golden_check(o, e, r, name=f"d{i}")
    assert counted["forward"] >= sites and counted["backward"] >= sites, counted
