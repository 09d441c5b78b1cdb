"""diffusers' classic attention processor: ``baddbmm`` over ``torch.empty``
with ``beta=0`` (the garbage input must be ignored, as PyTorch does) or over
an additive mask with ``beta=1``."""
import pytest
import torch

import attn_compiler
from attn_compiler.testing import golden_check
from forms import diffusers_attn_processor


@pytest.mark.parametrize("with_mask", [False, True])
def test_diffusers_attn_processor(with_mask):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, n, 8, generator=g, requires_grad=True) for n in (9, 11, 11))
    mask = torch.randn(6, 1, 11, generator=g) if with_mask else None
    args = (q, k, v) if mask is None else (q, k, v, mask)
    golden = diffusers_attn_processor(*[a.detach().double() for a in args])
    eager = diffusers_attn_processor(*args)
    torch._dynamo.reset()
    attn_compiler.reset()
    ours = torch.compile(diffusers_attn_processor,
                         backend=attn_compiler.backend(inner="aot_eager"))(*args)
    rep = attn_compiler.report()
    assert len(rep.fused) == 1 and not rep.declined, str(rep)
    golden_check(ours.detach(), eager.detach(), golden)
    gq = torch.autograd.grad(ours.sum(), q)[0]
    torch.testing.assert_close(gq, torch.autograd.grad(eager.sum(), q)[0], rtol=1e-4, atol=1e-5)
