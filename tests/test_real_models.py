"""Real Hugging Face transformers models, end to end through the backend.

Each model is built from a tiny config (random init, seeded, dropout 0,
``attn_implementation="eager"`` so the attention is the hand-written
``q @ kᵀ * scaling + mask -> softmax -> @ v`` code), compiled with
``attn_compiler.backend``, run forward in train mode and backward on a scalar
loss (a fixed random projection of the output).  We assert:

* every attention site is fused: the report holds exactly
  ``layers × kinds`` fused rows (kinds: self, cross) and no declined row;
* logits and every parameter gradient are golden-relative to eager
  (STYLE.md §2): float64 golden from a ``.double()`` deep copy, eager fp32
  reference, ours fp32 compiled; ``golden_check(ours, eager, golden)``.

Also: LLaMA prefill + one-token decode with a KV cache (``cache=``), and GPT-2 called
with two sequence lengths (the second may recompile with dynamic shapes).
"""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import attn_compiler  # noqa: E402
from attn_compiler.testing import golden_check  # noqa: E402

B = 2  # batch
VOCAB = 100
LAYERS = 2


# ---------------------------------------------------------------- helpers

def _seeded(build):
    torch.manual_seed(0)
    model = build()
    model.train()  # dropout is 0 in every config: train mode only changes code paths
    return model


def _ids(L, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (B, L), generator=g)


def _cast_inputs(inputs, dtype):
    return {k: v.to(dtype) if torch.is_floating_point(v) else v for k, v in inputs.items()}


def _report_text(rows):
    return "\n".join(f"  {s.status:8s} {s.location} {s.reason}" for s in rows) or "  (no rows)"


def _assert_all_fused(rows, expected, what=""):
    rows = list(rows)
    fused = [s for s in rows if s.status == "fused"]
    declined = [s for s in rows if s.status != "fused"]
    assert len(fused) == expected and not declined, (
        f"{what}: expected {expected} fused sites and none declined, got {len(fused)} fused, "
        f"{len(declined)} declined:\n{_report_text(rows)}")


def _compile(model, inner="aot_eager", **kw):
    torch._dynamo.reset()
    attn_compiler.reset()
    return torch.compile(model, backend=attn_compiler.backend(inner=inner), **kw)


def _logits(out):
    return out.logits


def _step(model, inputs, output_fn, autocast=None):
    ctx = torch.autocast(_device_of(inputs), dtype=autocast) if autocast else contextlib.nullcontext()
    with ctx:           # the forward under autocast, the backward after it, as in training
        out = output_fn(model(**inputs))
    # A fixed random projection as the loss: pow(2).mean() after a final
    # LayerNorm is (almost) constant and would leave the gradients ~0.
    g = torch.Generator().manual_seed(5)
    weights = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device, out.dtype)
    (out * weights).mean().backward()  # in the output's dtype: the golden stays float64
    module = getattr(model, "_orig_mod", model)  # a compiled model's parameters, unprefixed
    grads = {n: p.grad for n, p in module.named_parameters()}
    return out.detach(), grads


def check_grads(ours, eager, golden, what=""):
    """Golden-relative check of every parameter gradient, and of all of them at once.

    A gradient that is zero in exact math (a key projection's bias: softmax
    ignores a per-row constant) is pure rounding noise, and a relative check
    of it alone would compare noise with noise; those, with a golden norm
    under 1e-6 of the whole gradient's, are checked only in the concatenation.
    """
    names = [n for n, g in golden.items() if g is not None]
    for n, g in golden.items():
        if g is None:
            assert ours[n] is None and eager[n] is None, f"{what}{n}: gradient where eager has none"
        else:
            assert ours[n] is not None, f"{what}no gradient for {n}"
    cat = lambda grads: torch.cat([grads[n].flatten().double() for n in names])
    total = cat(golden).norm().item()
    mismatched = []
    for n in names:
        if golden[n].double().norm().item() < 1e-6 * total:
            continue
        try:
            golden_check(ours[n], eager[n], golden[n], name=f"{what}grad {n}")
        except AssertionError as e:
            mismatched.append(str(e))
    try:
        golden_check(cat(ours).float(), cat(eager).float(), cat(golden), name=f"{what}all grads")
    except AssertionError as e:
        mismatched.append(str(e))
    assert not mismatched, "gradients off:\n" + "\n".join(mismatched)


def _device_of(inputs) -> str:
    return next(iter(inputs.values())).device.type


def check_model(build, inputs, n_sites, *, inner="aot_eager", output_fn=_logits,
                golden_inputs=None, golden_prepare=None, device=None, dtype=None, autocast=None,
                compile_kwargs=None):
    """Forward + backward through eager fp32, float64 golden and ours; compare all.

    The loss is a fixed random projection of ``output_fn(model output)``.  ``golden_inputs``
    (default: ``inputs`` cast to float64) replaces the golden model's inputs
    where the float64 model needs an equivalent spelling; ``golden_prepare``
    switches the golden model to an equivalent code path that runs in float64.
    ``device``/``dtype`` move the model and its inputs (eager and ours then run
    in ``dtype``; the golden is the same rounded weights in float64).
    ``autocast``: eager's and ours forwards run under ``torch.autocast`` to that
    dtype (mixed-precision training; the golden runs in float64 without it).
    ``compile_kwargs`` go to ``torch.compile`` (``dynamic=True``).
    """
    model = _seeded(build)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
        inputs = {k: v.to(device=device, dtype=dtype if torch.is_floating_point(v) else None)
                  for k, v in inputs.items()}
    golden_model = copy.deepcopy(model).double()
    if golden_prepare is not None:
        golden_prepare(golden_model)
    ours_model = copy.deepcopy(model)

    eager_out, eager_grads = _step(model, inputs, output_fn, autocast)
    if golden_inputs is None:
        golden_inputs = _cast_inputs(inputs, torch.float64)
    elif device is not None:
        golden_inputs = {k: v.to(device) for k, v in golden_inputs.items()}
    gold_out, gold_grads = _step(golden_model, golden_inputs, output_fn)
    compiled = _compile(ours_model, inner, **(compile_kwargs or {}))
    ours_out, ours_grads = _step(compiled, inputs, output_fn, autocast)

    _assert_all_fused(attn_compiler.report(), n_sites, "forward")
    golden_check(ours_out, eager_out, gold_out, name="output")
    check_grads(ours_grads, eager_grads, gold_grads)


# ---------------------------------------------------------------- configs

def gpt2():
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=LAYERS, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        attn_implementation="eager")
    return transformers.GPT2LMHeadModel(cfg)


def llama():
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attention_dropout=0.0, attn_implementation="eager")
    return transformers.LlamaForCausalLM(cfg)


def bert():
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, attn_implementation="eager")
    return transformers.BertForMaskedLM(cfg)


def layoutlm():
    """LayoutLM builds Hugging Face's extended mask in its forward:
    ``(1.0 - mask) * finfo.min`` added to the scores ([Note: grouped side
    values]: written out, the score vanished in float32)."""
    cfg = transformers.LayoutLMConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, max_2d_position_embeddings=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager")
    return transformers.LayoutLMForMaskedLM(cfg)


def gpt_oss():
    """GPT-OSS: attention sinks (a learned logit per head beside the keys),
    GQA, sliding-window and full layers, a mixture of experts."""
    cfg = transformers.GptOssConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=64, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
        attn_implementation="eager")
    model = transformers.GptOssForCausalLM(cfg)
    model.set_experts_implementation("eager")      # the grouped expert matmul has no float64 path
    with torch.no_grad():      # sinks start at 0; spread them so they matter
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.sinks.copy_(torch.linspace(-1.0, 1.5, 4) + i)
    return model


def granite_swa():
    """Granite SWA: sinks applied after the attention as
    sigmoid(logsumexp(scores) - sink); the logsumexp is the op's lse."""
    cfg = transformers.GraniteSWAConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=0, eos_token_id=1, pad_token_id=0, attn_implementation="eager")
    model = transformers.GraniteSWAForCausalLM(cfg)
    with torch.no_grad():      # sinks start at 0; spread them so they matter
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.sinks.copy_(torch.linspace(-1.0, 1.5, 4) - i)
    return model


def _padding_mask(L):
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, L - 3:] = 0  # row 0 right-padded, row 1 full
    return mask


# ---------------------------------------------------------------- tests: core three

def test_gpt2():
    check_model(gpt2, {"input_ids": _ids(9)}, LAYERS)


def test_gpt2_inductor():
    check_model(gpt2, {"input_ids": _ids(9)}, LAYERS, inner="inductor")


def test_gpt2_padding_mask():
    L = 9
    check_model(gpt2, {"input_ids": _ids(L), "attention_mask": _padding_mask(L)}, LAYERS)


def gpt2_reordered():
    """GPT-2's ``reorder_and_upcast_attn``: fp32 ``baddbmm`` over [B*H, L, D],
    scores viewed as [B, H, L, L] before the mask, softmax and a 4-D P·V."""
    model = gpt2()
    for block in model.transformer.h:
        block.attn.reorder_and_upcast_attn = True
    return model


def _plain_gpt2_path(model):
    """The reordered path insists on float32; the golden takes the plain path
    (the same function) in float64."""
    for block in model.transformer.h:
        block.attn.reorder_and_upcast_attn = False


def test_gpt2_reorder_and_upcast_attn():
    check_model(gpt2_reordered, {"input_ids": _ids(9)}, LAYERS, golden_prepare=_plain_gpt2_path)


def test_llama_gqa():
    check_model(llama, {"input_ids": _ids(11)}, LAYERS)


def _causal_padding_mask_4d(pad, dtype, fill=-1e30):
    """(B, 1, L, L) additive causal+padding mask for the float64 golden.

    LLaMA's eager code runs softmax in float32 even for a float64 model, and
    float64's ``finfo.min`` (the mask value transformers uses) turns into -inf
    there: fully masked rows (left padding + causal) become NaN and spread.
    -1e30 is finite in float32 and still swamps every score, so it is the same
    math as the fp32 model's ``finfo(float32).min`` mask (a fully masked row
    attends uniformly to all keys).
    """
    L = pad.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    keep = causal[None, None] & pad.bool()[:, None, None, :]
    return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, fill)


def _llama_left_padding():
    """check_model's keyword arguments for LLaMA with left padding, as in batched
    generation: rows 0-2 of batch 1 fully masked."""
    L = 10
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, :3] = 0
    ids = _ids(L)
    return {"inputs": {"input_ids": ids, "attention_mask": mask},
            "golden_inputs": {"input_ids": ids, "attention_mask": _causal_padding_mask_4d(mask, torch.float64)}}


def test_llama_gqa_left_padding():
    kwargs = _llama_left_padding()
    check_model(llama, kwargs.pop("inputs"), LAYERS, **kwargs)


def test_bert_padding_mask():
    L = 12
    check_model(bert, {"input_ids": _ids(L), "attention_mask": _padding_mask(L)}, LAYERS)


# ---------------------------------------------------------------- decode, dynamic length

def _eval_forward(model, **kw):
    with torch.no_grad():
        return model(**kw)


def test_llama_kv_cache_decode():
    model = _seeded(llama).eval()
    golden_model = copy.deepcopy(model).double()
    compiled = _compile(copy.deepcopy(model))
    prompt, nxt = _ids(8), _ids(1, seed=2)

    results = {}
    for name, m in (("eager", model), ("golden", golden_model), ("ours", compiled)):
        pre = _eval_forward(m, input_ids=prompt, use_cache=True)
        if name == "ours":
            prefill_rows = list(attn_compiler.report())
        dec = _eval_forward(m, input_ids=nxt, cache=pre.cache, use_cache=True)
        results[name] = (pre.logits, dec.logits)

    _assert_all_fused(prefill_rows, LAYERS, "prefill")
    decode_rows = list(attn_compiler.report())[len(prefill_rows):]
    _assert_all_fused(decode_rows, LAYERS, "decode step")
    for i, step in enumerate(("prefill", "decode")):
        golden_check(results["ours"][i], results["eager"][i], results["golden"][i],
                     name=f"{step} logits")


def test_gpt2_two_sequence_lengths():
    model = _seeded(gpt2)
    golden_model = copy.deepcopy(model).double()
    compiled = _compile(copy.deepcopy(model))
    seen = 0
    for L in (7, 13):
        ids = _ids(L, seed=L)
        for m in (model, golden_model, compiled):
            m.zero_grad(set_to_none=True)
        eager_logits, eager_grads = _step(model, {"input_ids": ids}, _logits)
        gold_logits, gold_grads = _step(golden_model, {"input_ids": ids}, _logits)
        ours_logits, ours_grads = _step(compiled, {"input_ids": ids}, _logits)
        rows = list(attn_compiler.report())
        # the first call compiles; the second may recompile (dynamic) or reuse nothing else
        _assert_all_fused(rows[seen:], LAYERS, f"call with L={L}")
        seen = len(rows)
        golden_check(ours_logits, eager_logits, gold_logits, name=f"logits L={L}")
        check_grads(ours_grads, eager_grads, gold_grads, what=f"L={L}: ")


# ---------------------------------------------------------------- more families

def mistral():
    cfg = transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        sliding_window=4, attention_dropout=0.0, attn_implementation="eager")
    return transformers.MistralForCausalLM(cfg)


def qwen2():
    cfg = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        use_sliding_window=True, sliding_window=4, max_window_layers=LAYERS,
        layer_types=["sliding_attention", "full_attention"], attention_dropout=0.0,
        attn_implementation="eager")
    return transformers.Qwen2ForCausalLM(cfg)


def t5():
    cfg = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=LAYERS,
        num_decoder_layers=LAYERS, num_heads=4, relative_attention_num_buckets=8,
        relative_attention_max_distance=16, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, attn_implementation="eager")
    return transformers.T5ForConditionalGeneration(cfg)


def bloom():
    cfg = transformers.BloomConfig(
        vocab_size=VOCAB, hidden_size=32, n_layer=LAYERS, n_head=4, hidden_dropout=0.0,
        attention_dropout=0.0, bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    return transformers.BloomForCausalLM(cfg)


def opt():
    cfg = transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, ffn_dim=64,
        num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
        dropout=0.0, attention_dropout=0.0, layerdrop=0.0, pad_token_id=1, bos_token_id=0,
        eos_token_id=0, attn_implementation="eager")
    return transformers.OPTForCausalLM(cfg)


def vit():
    cfg = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, image_size=16, patch_size=4,
        num_channels=3, attn_implementation="eager")
    return transformers.ViTModel(cfg, add_pooling_layer=False)


def test_mistral_sliding_window_gqa():
    check_model(mistral, {"input_ids": _ids(11)}, LAYERS)


def test_qwen2_sliding_and_full_layers():
    check_model(qwen2, {"input_ids": _ids(11)}, LAYERS)


def test_t5_relative_bias_cross_attention():
    Ls, Lt = 9, 7
    # encoder self + decoder self + decoder cross, per layer
    check_model(t5, {"input_ids": _ids(Ls), "attention_mask": _padding_mask(Ls),
                     "decoder_input_ids": _ids(Lt, seed=3)}, 3 * LAYERS)


def test_bloom_alibi_padding_mask():
    L = 10
    check_model(bloom, {"input_ids": _ids(L), "attention_mask": _padding_mask(L)}, LAYERS)


def test_opt():
    check_model(opt, {"input_ids": _ids(9)}, LAYERS)


def test_vit_bidirectional():
    g = torch.Generator().manual_seed(4)
    pixels = torch.randn(B, 3, 16, 16, generator=g)  # 16 patches + [CLS] = 17 tokens
    check_model(vit, {"pixel_values": pixels}, LAYERS,
                output_fn=lambda out: out.last_hidden_state)


@pytest.mark.parametrize("build", [llama, bert, gpt2])
def test_autocast_bf16_training(build):
    """Mixed-precision training: the compiled model called under
    ``torch.autocast(bfloat16)`` (Hugging Face Trainer's ``bf16=True``), with
    padding; forward and gradients golden-relative to eager under the same
    autocast."""
    L = 11
    check_model(build, {"input_ids": _ids(L), "attention_mask": _padding_mask(L)}, LAYERS,
                autocast=torch.bfloat16)


def _checkpointed(build):
    def checkpointed():
        model = build()
        model.gradient_checkpointing_enable({"use_reentrant": False})
        return model
    checkpointed.__name__ = f"{build.__name__}_checkpointed"
    return checkpointed


@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
def test_gradient_checkpointing_llama(inner):
    """``gradient_checkpointing_enable()``: each decoder layer runs inside a
    ``torch.utils.checkpoint`` region, a subgraph of a higher-order op in the
    dynamo graph; its attention is fused there (recomputed in the backward
    like the rest of the layer), forward and gradients golden-relative."""
    check_model(_checkpointed(llama), {"input_ids": _ids(11)}, LAYERS, inner=inner)


def test_gradient_checkpointing_bert_padding():
    check_model(_checkpointed(bert), {"input_ids": _ids(12), "attention_mask": _padding_mask(12)}, LAYERS)


def sam_vision():
    """SAM's image encoder: windowed and global attention, both with decomposed
    relative positions built as ``rel_h[..., None] + rel_w[..., None, :]`` and
    ``reshape_as`` the scores ([Note: split key axes])."""
    cfg = transformers.SamVisionConfig(
        hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2, image_size=64, patch_size=8,
        mlp_dim=64, output_channels=16, window_size=4, global_attn_indexes=[1], use_rel_pos=True)
    cfg._attn_implementation = "eager"
    return transformers.SamVisionModel(cfg)


def vitdet():
    """ViTDet: the scores viewed as (B*H, qh, qw, kh, kw) with the height and
    width terms added there, then viewed back."""
    cfg = transformers.VitDetConfig(
        hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2, image_size=64, patch_size=8,
        mlp_ratio=2, window_size=4, window_block_indices=[0], use_relative_position_embeddings=True,
        attn_implementation="eager")
    return transformers.VitDetModel(cfg)


def check_relpos_inference(build, on_kernels, device=None, dtype=None, inner="aot_eager") -> None:
    """SAM / ViTDet image encoder under no_grad, compiled against eager (in
    ``dtype`` on ``device``) and a float64 golden of the same weights; every
    site fused with its height and width terms read along the split key axis."""
    from attn_compiler import dispatch
    from attn_compiler.passes.analyze.spec import AttentionSpec
    model = _seeded(build).eval()
    pixels = torch.randn(B, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    golden_model = copy.deepcopy(model).double()
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
        golden_model = copy.deepcopy(model).double()
        pixels = pixels.to(device=device, dtype=dtype)
    torch._dynamo.reset()
    attn_compiler.reset()
    impl = dispatch.implementation("triton") if on_kernels else contextlib.nullcontext()
    with torch.no_grad(), impl:
        ours = _compile(model, inner)(pixel_values=pixels).last_hidden_state
        eager = model(pixel_values=pixels).last_hidden_state
        golden = golden_model(pixel_values=pixels.double()).last_hidden_state
    rows = attn_compiler.report()
    _assert_all_fused(rows, LAYERS)
    for r in rows:
        maps = sorted(c.kv_map[0] for c in AttentionSpec.loads(r.features["spec"]).captured)
        assert maps == ["div", "mod"], r.features
    golden_check(ours, eager, golden, name=build.__name__)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::RuntimeWarning")
@pytest.mark.parametrize("on_kernels", [False, True], ids=["reference", "kernels"])
@pytest.mark.parametrize("build", [sam_vision, vitdet])
def test_decomposed_relative_positions_inference(build, on_kernels):
    """SAM and ViTDet image encoders under no_grad (how they are run): every
    attention fused, the (N, N) relative-position bias never built (the op
    reads the height and width terms at kv // kw and kv % kw), output
    golden-relative to eager."""
    check_relpos_inference(build, on_kernels)


def _pixels():
    return {"pixel_values": torch.randn(B, 3, 64, 64, generator=torch.Generator().manual_seed(5))}


def _hidden(out):
    return out.last_hidden_state


@pytest.mark.parametrize("build", [sam_vision, vitdet])
def test_decomposed_relative_positions_training(build):
    """Training SAM / ViTDet (ViTDet's use in detection): the height and width
    terms get their gradient along the split key axis; forward and every
    parameter gradient golden-relative to eager."""
    check_model(build, _pixels(), LAYERS, output_fn=_hidden)


# ---------------------------------------------------------------- the generated kernels

def check_on_kernels(build, inputs, n_sites, **kwargs) -> None:
    """``check_model`` with the op forced onto the generated kernels
    (``dispatch.implementation("triton")``); count the calls with the
    ``counted`` fixture."""
    from attn_compiler import dispatch
    with dispatch.implementation("triton"):
        check_model(build, inputs, n_sites, **kwargs)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::RuntimeWarning")
@pytest.mark.parametrize("on_kernels", [False, True], ids=["reference", "kernels"])
def test_layoutlm_extended_mask(on_kernels, counted):
    """LayoutLM's in-graph ``(1.0 - mask) * finfo.min`` (a wrong answer once:
    the kept scores vanished into the fill), forward and backward in float32."""
    inputs = {"input_ids": _ids(10), "attention_mask": _padding_mask(10)}
    (check_on_kernels if on_kernels else check_model)(layoutlm, inputs, LAYERS)
    if on_kernels:
        assert counted["forward"] >= LAYERS and counted["backward"] >= LAYERS, counted


# name: (model, check_model's keyword arguments, fused sites)
def longt5(attention_type, encoder_only=False):
    def build():
        cfg = transformers.LongT5Config(
            vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=LAYERS, num_decoder_layers=LAYERS,
            num_heads=4, local_radius=3, global_block_size=4, encoder_attention_type=attention_type,
            relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, attn_implementation="eager")
        return (transformers.LongT5EncoderModel if encoder_only else transformers.LongT5ForConditionalGeneration)(cfg)
    return build


KERNEL_CASES = {
    "gpt2_padding": (gpt2, lambda: {"inputs": {"input_ids": _ids(9), "attention_mask": _padding_mask(9)}}, LAYERS),
    # inductor checks the strides the op's fake promised (the kernels returned
    # gradients in q's (B, L, H, D) layout, the fake said contiguous)
    "gpt2_inductor": (gpt2, lambda: {"inputs": {"input_ids": _ids(9)}, "inner": "inductor"}, LAYERS),
    "llama_gqa_left_padding": (llama, _llama_left_padding, LAYERS),
    "bert_padding": (bert, lambda: {"inputs": {"input_ids": _ids(12), "attention_mask": _padding_mask(12)}}, LAYERS),
    "mistral_window_gqa": (mistral, lambda: {"inputs": {"input_ids": _ids(11)}}, LAYERS),
    "t5_relative_bias": (t5, lambda: {"inputs": {"input_ids": _ids(9), "attention_mask": _padding_mask(9),
                                                 "decoder_input_ids": _ids(7, seed=3)}}, 3 * LAYERS),
    "bloom_alibi_padding": (bloom, lambda: {"inputs": {"input_ids": _ids(10),
                                                       "attention_mask": _padding_mask(10)}}, LAYERS),
    "gpt_oss_sinks_padding": (gpt_oss, lambda: {"inputs": {"input_ids": _ids(10),
                                                          "attention_mask": _padding_mask(10)}}, LAYERS),
    "granite_swa_sink_scale": (granite_swa, lambda: {"inputs": {"input_ids": _ids(10),
                                                               "attention_mask": _padding_mask(10)}}, LAYERS),
    "llama_checkpointed_left_padding": (_checkpointed(llama), _llama_left_padding, LAYERS),
    "vitdet_relpos_training": (vitdet, lambda: {"inputs": _pixels(), "output_fn": _hidden}, LAYERS),
    "bert_autocast_padding": (bert, lambda: {"inputs": {"input_ids": _ids(12), "attention_mask": _padding_mask(12)},
                                             "autocast": torch.bfloat16}, LAYERS),
    # [Note: split head axes]: the local blocks' bias and mask read at h % H and h // H.
    # The encoder alone: the whole model's bfloat16 gradients miss the bound on
    # the reference path too for some inputs (eager's own rounding, amplified)
    "longt5_local_encoder_padding": (longt5("local", encoder_only=True), lambda: {
        "inputs": {"input_ids": _ids(13), "attention_mask": _padding_mask(13)}, "output_fn": _hidden}, LAYERS),
    # under dynamic=True the scale (self.scaling) is a 0-d CPU tensor read with
    # .item(): on CUDA the op reads it through a device copy ([Note: CPU
    # scalars beside CUDA operands]; it was declined there)
    "llama_dynamic_true_left_padding": (llama, lambda: dict(_llama_left_padding(),
                                                            compile_kwargs={"dynamic": True}), LAYERS),
    "gpt2_dynamic_true_inductor": (gpt2, lambda: {"inputs": {"input_ids": _ids(9)}, "inner": "inductor",
                                                  "compile_kwargs": {"dynamic": True}}, LAYERS),
}


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", sorted(KERNEL_CASES))
def test_real_model_through_the_generated_kernels(case, dtype, counted):
    """The same checks with every fused site forced onto the generated Triton
    kernels (forward and backward; Triton's interpreter on CPU): the specs real
    models produce (padding masks with finfo.min fills, left padding's fully
    masked rows, sliding windows with GQA, T5's learned relative bias with its
    gradient, Bloom's ALiBi) run through the kernels, not only through the
    reference the CPU path otherwise takes; in float32 and in bfloat16 (the
    model's weights and inputs cast, golden-relative to eager bfloat16)."""
    build, kwargs, n_sites = KERNEL_CASES[case]
    kwargs = kwargs()
    if dtype != torch.float32:
        kwargs["dtype"] = dtype
    check_on_kernels(build, kwargs.pop("inputs"), n_sites, **kwargs)
    assert counted["forward"] >= n_sites and counted["backward"] >= n_sites, counted


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::RuntimeWarning")
@pytest.mark.parametrize("on_kernels", [False, True], ids=["reference", "kernels"])
def test_float16_left_padding_rows_of_fills(on_kernels, counted):
    """LLaMA in float16 with left padding: the padded query rows keep no key,
    and eager adds finfo(float16).min in float16, where it absorbs the score
    (a uniform row).  Added in float32 it would not (a softmax of the scores,
    off from eager); the op rounds such scores to float16 as eager does
    (``AttentionSpec.rounds_scores``), on the reference path and the kernels."""
    kwargs = _llama_left_padding()
    check = check_on_kernels if on_kernels else check_model
    check(llama, kwargs.pop("inputs"), LAYERS, dtype=torch.float16, **kwargs)
    if on_kernels:
        assert counted["forward"] >= LAYERS and counted["backward"] >= LAYERS, counted


@pytest.mark.parametrize("attention_type", ["local", "transient-global"])
def test_longt5_blocked_encoder_attention(attention_type):
    """LongT5's encoder attends within blocks: 5-D scores (B, blocks, heads,
    block, 3 * block) whose position bias is read per head and whose mask is
    read per block, i.e. at h % H and h // H of the flattened heads
    ([Note: split head axes]); the transient-global variant adds a bias per
    (block, head).  Encoder, decoder self- and cross-attention all fuse."""
    Ls, Lt = 13, 7
    check_model(longt5(attention_type), {"input_ids": _ids(Ls), "attention_mask": _padding_mask(Ls),
                                          "decoder_input_ids": _ids(Lt, seed=3)}, 3 * LAYERS)
