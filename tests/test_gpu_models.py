"""Real Hugging Face models on the GPU in bfloat16, every fused site on the
generated Triton kernels (skipped without a GPU).

The CPU suite runs these models through Triton's interpreter (float32 and
bfloat16, the interpreter's bfloat16 products and casts corrected in
conftest.py); here the same models run compiled for the GPU in bfloat16,
forward and backward, golden-relative to eager bfloat16 against a float64
golden of the same (rounded) weights.  GPT-2 under
inductor is the bf16 training step with inductor as the inner compiler.
"""
import pytest
import torch

pytest.importorskip("transformers")

from test_real_models import KERNEL_CASES, check_on_kernels, check_relpos_inference, sam_vision, vitdet  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::RuntimeWarning")
@pytest.mark.parametrize("case", sorted(KERNEL_CASES))
def test_real_model_bf16_on_the_kernels(case, counted):
    build, kwargs, n_sites = KERNEL_CASES[case]
    kwargs = kwargs()
    check_on_kernels(build, kwargs.pop("inputs"), n_sites, device="cuda", dtype=torch.bfloat16, **kwargs)
    assert counted["forward"] >= n_sites and counted["backward"] >= n_sites, counted


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::RuntimeWarning")
@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
@pytest.mark.parametrize("build", [sam_vision, vitdet])
def test_decomposed_relative_positions_bf16_on_the_kernels(build, inner, counted):
    """SAM / ViTDet inference in bfloat16 on the GPU kernels: the height and
    width terms read at kv // kw and kv % kw (``counted``: no timing, so the
    tiny sites are not kept as written for their host cost)."""
    check_relpos_inference(build, True, device="cuda", dtype=torch.bfloat16, inner=inner)
    assert counted["forward"] >= 2, counted
