"""A query of batch 1 broadcast over the batch by the matmul (learned latents)."""
import torch

import attn_compiler
from attn_compiler.testing import golden_check
from forms import PerceiverLatents


def test_latent_queries_broadcast_over_the_batch():
    torch.manual_seed(0)
    model = PerceiverLatents()
    k, v = (torch.randn(3, 4, 11, 16, requires_grad=True) for _ in range(2))
    golden_model = PerceiverLatents()
    golden_model.load_state_dict(model.state_dict())
    golden_model.double()
    kd, vd = (t.detach().double().requires_grad_() for t in (k, v))
    golden, eager = golden_model(kd, vd), model(k, v)
    torch._dynamo.reset()
    attn_compiler.reset()
    ours = torch.compile(model, backend=attn_compiler.backend(inner="aot_eager"))(k, v)
    rep = attn_compiler.report()
    assert len(rep.fused) == 1 and not rep.declined, str(rep)
    golden_check(ours.detach(), eager.detach(), golden.detach())
    w = torch.randn(ours.shape)
    got = torch.autograd.grad((ours * w).sum(), (k, v, model.latents))
    ref = torch.autograd.grad((eager * w).sum(), (k, v, model.latents))
    gold = torch.autograd.grad((golden * w.double()).sum(), (kd, vd, golden_model.latents))
    for a, b, c in zip(got, ref, gold):
        golden_check(a, b, c)
