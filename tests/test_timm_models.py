"""timm models with their hand-written attention path (``fused_attn`` off).

timm is not a CI dependency (it pulls torchvision); these tests run where it
is installed.
"""
import pytest
import torch

import attn_compiler
from attn_compiler.testing import golden_check

timm = pytest.importorskip("timm", reason="timm is not installed")


def _unfuse(model):
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    return model


@pytest.mark.parametrize("name,sites", [("vit_tiny_patch16_224", 12), ("deit_tiny_patch16_224", 12)])
def test_timm_vision_transformer(name, sites):
    torch.manual_seed(0)
    model = _unfuse(timm.create_model(name, pretrained=False, img_size=32, patch_size=8,
                                      num_classes=5))
    x = torch.randn(2, 3, 32, 32)
    golden = model.double()(x.double()).detach()
    model.float()
    eager = model(x).detach()
    torch._dynamo.reset()
    attn_compiler.reset()
    ours = torch.compile(model, backend=attn_compiler.backend(inner="aot_eager"))(x)
    rep = attn_compiler.report()
    assert len(rep.fused) == sites and not rep.declined, str(rep)
    golden_check(ours.detach(), eager, golden)
