"""A whole SAM image encoder (ViT-B: 12 layers, 12 heads of 64, 14x14 windows,
global attention in layers 2, 5, 8, 11 over 64x64 tokens), Hugging Face's
``SamVisionModel`` with random weights, bf16 inference at 1024x1024.

What a user picks from: Hugging Face's ``eager`` and ``sdpa`` attention
(SDPA gets the decomposed relative-position bias built as an N x N mask),
``torch.compile`` of the eager model, and the eager model compiled by our
backend (inner inductor), where every attention is fused and the height and
width terms are read along the split key axis.

    PYTHONPATH=. python bench/bench_sam.py --out OUT        # GPU
    python bench/bench_sam.py --smoke                        # CPU, a tiny encoder

Prints ms per image batch (per call, and as CUDA-graph replays: the GPU's
share without the host's launches), peak MiB above the inputs, the error against the
float32 eager encoder, and the sites our backend fused.
"""
from __future__ import annotations

import argparse
import copy
import sys

import common
import torch

IMPLS = ("hf_eager", "hf_sdpa", "inductor", "attn_compiler")


def config(smoke: bool):
    import transformers
    if smoke:
        return transformers.SamVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                            image_size=64, patch_size=8, mlp_dim=64, output_channels=16,
                                            window_size=4, global_attn_indexes=[1])
    return transformers.SamVisionConfig()      # ViT-B: 768 wide, 12 layers, 1024x1024 images


def build(name: str, cfg, state, dtype, dev):
    import transformers
    cfg = copy.deepcopy(cfg)
    cfg._attn_implementation = "sdpa" if name == "hf_sdpa" else "eager"
    model = transformers.SamVisionModel(cfg).eval()
    model.load_state_dict(state)
    model.to(dev, dtype)
    if name == "inductor":
        return torch.compile(model)
    if name == "attn_compiler":
        import attn_compiler
        attn_compiler.reset()
        return torch.compile(model, backend=attn_compiler.backend())
    return model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--only", default=",".join(IMPLS))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import transformers
    dev = common.device()
    dtype = torch.bfloat16 if common.on_cuda() and not args.smoke else torch.float32
    cfg = config(args.smoke)
    torch.manual_seed(0)
    cfg_eager = copy.deepcopy(cfg)
    cfg_eager._attn_implementation = "eager"
    ref_model = transformers.SamVisionModel(cfg_eager).eval()
    state = ref_model.state_dict()
    size = cfg.image_size
    pixels = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = ref_model.to(dev)(pixel_values=pixels.to(dev)).last_hidden_state.float()
    del ref_model
    common.free_memory()
    x = pixels.to(dev, dtype)
    rows, env = [], common.environment()
    for name in [n for n in args.only.split(",") if n]:
        common.reset_compiled()

        def measure(row, name=name):
            model = build(name, cfg, state, dtype, dev)
            with torch.no_grad():
                out = model(pixel_values=x).last_hidden_state
                row["rel_err"] = float((out.float() - ref).norm() / ref.norm())
                row["ms"] = common.time_ms(lambda: model(pixel_values=x))
                row["graph_ms"] = common.time_graph_ms(lambda: model(pixel_values=x))
                row["peak_mib"] = common.peak_mib(lambda: model(pixel_values=x))
            if name == "attn_compiler":
                row["sites"] = common.sites_summary()
        row = dict(env, impl=name, batch=args.batch, image=size, dtype=str(dtype).removeprefix("torch."))
        rows.append(common.model_row(row, measure))
    common.finish_rows(rows, args.out, "sam", ["impl", "batch", "ms", "graph_ms", "peak_mib", "rel_err", "sites"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
