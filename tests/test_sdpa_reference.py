"""PyTorch's documented math reference of SDPA, as research code copies it:
fused, with the in-place causal bias read as a predicate (not a tensor)."""
import pytest
import torch

import attn_compiler
from attn_compiler.testing import golden_check
from forms import sdpa_math_reference


def _mask():
    g = torch.Generator().manual_seed(3)
    m = torch.rand(10, 10, generator=g) > 0.3
    return m | torch.eye(10, dtype=torch.bool)


@pytest.mark.parametrize("kw,mask_kind", [
    (dict(is_causal=True), "causal"),
    (dict(is_causal=True, enable_gqa=True), "causal"),
    (dict(attn_mask="bool", enable_gqa=True), "tensor"),
    (dict(is_causal=True, attn_mask="bool"), "causal+tensor"),
    (dict(attn_mask="float"), "additive t0"),      # SDPA: a float attn_mask is added
])
def test_sdpa_math_reference(kw, mask_kind):
    kw = dict(kw)
    if kw.get("attn_mask") == "bool":
        kw["attn_mask"] = _mask()
    elif kw.get("attn_mask") == "float":
        kw["attn_mask"] = torch.randn(10, 10, generator=torch.Generator().manual_seed(4))
    hkv = 2 if kw.get("enable_gqa") else 8
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 10, 16, generator=g, requires_grad=True)
    k = torch.randn(2, hkv, 10, 16, generator=g, requires_grad=True)
    v = torch.randn(2, hkv, 10, 16, generator=g, requires_grad=True)

    def fn(q, k, v):
        return sdpa_math_reference(q, k, v, **kw)

    golden_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    gkw = {key: (val.double() if torch.is_tensor(val) and val.is_floating_point() else val)
           for key, val in kw.items()}
    golden = sdpa_math_reference(*golden_in, **gkw)
    eager = fn(q, k, v)
    torch._dynamo.reset()
    attn_compiler.reset()
    ours = torch.compile(fn, backend=attn_compiler.backend(inner="aot_eager"))(q, k, v)
    rep = attn_compiler.report()
    assert len(rep.fused) == 1 and not rep.declined, str(rep)
    assert rep.fused[0].features["mask"] == mask_kind
    golden_check(ours.detach(), eager.detach(), golden.detach())
    w = torch.randn(ours.shape, generator=torch.Generator().manual_seed(9))
    for a, b, c in zip(torch.autograd.grad((ours * w).sum(), (q, k, v)),
                       torch.autograd.grad((eager * w).sum(), (q, k, v)),
                       torch.autograd.grad((golden * w.double()).sum(), golden_in)):
        golden_check(a, b, c)
