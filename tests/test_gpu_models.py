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


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_static_cache_generation_under_cuda_graphs_through_transformers(counted):
    """transformers' own CUDA-graph path for a static cache (``generate(...,
    cache_implementation="static", compile_config=CompileConfig(backend=...))``,
    ``mode="reduce-overhead"``, the backend given as a callable): the decoding
    step's sites fused, and the tokens and logits those of the uncompiled
    generation (bench/RESULTS.md runs 150-154).  ``counted``: no timing, so
    the never-slower choice (a decode step this small may be kept as written,
    run 157) does not decide what is tested."""
    import transformers
    from transformers.generation.configuration_utils import CompileConfig

    import attn_compiler

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    cfg._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(cfg).cuda().eval()
    ids = torch.randint(3, 1000, (2, 256), device="cuda")
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :17] = 0
    kw = dict(input_ids=ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
              cache_implementation="static", return_dict_in_generate=True, output_logits=True)
    torch._dynamo.reset()
    attn_compiler.reset()
    with torch.no_grad():
        plain = model.generate(**kw, disable_compile=True)
        ours = model.generate(**kw, compile_config=CompileConfig(backend=attn_compiler.backend,
                                                                 mode="reduce-overhead"))
    rows = list(attn_compiler.report())
    assert rows and all(r.status == "fused" for r in rows), [(r.status, r.reason) for r in rows]
    assert counted["forward"] >= 1, counted
    assert torch.equal(ours.sequences, plain.sequences)
    for a, b in zip(ours.logits, plain.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
