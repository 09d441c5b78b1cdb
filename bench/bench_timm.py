"""Whole timm models, bf16 inference and a training step: the hand-written
attention path compiled by our backend against what a timm user runs.

timm's attention modules carry two paths: ``fused_attn`` on (the default:
``F.scaled_dot_product_attention``) and off (``q @ k.transpose(-2, -1)``,
softmax, ``@ v``, written out). Paths, each on a copy of the same weights:

- ``eager``: the written-out path as it runs;
- ``inductor``: ``torch.compile`` of the written-out path;
- ``attn_compiler``: the written-out path through our backend (inner
  inductor; the never-slower choice may keep a site as written or pick SDPA);
- ``sdpa+inductor``: timm's default (``fused_attn`` on) under
  ``torch.compile``: what a timm user runs today.  ConViT's gated positional
  layers have no SDPA path (the mixture of two maps), so there it covers the
  last two (plain) blocks only.

Rows: ms per inference call (no grad) and per training step (forward,
``logits.float().square().mean()``, backward; no optimizer), peak MiB of the
step beyond the inputs, the logits' error against float32 eager, and the
sites our backend saw.  timm is needed (not a dependency of the package).

    PYTHONPATH=. python bench/bench_timm.py --out OUT        # GPU
    python bench/bench_timm.py --smoke                        # CPU, tiny models
"""
from __future__ import annotations

import argparse
import copy
import sys

import common
import torch

IMPLS = ("eager", "inductor", "attn_compiler", "sdpa+inductor")
# (timm name, batch, image size, keyword arguments)
MODELS = (("vit_base_patch16_224", 64, 224, {}), ("convit_base", 64, 224, {}))
# more models with hand-written attention, by name only (``--models``): Swin's
# windows with a relative-position bias and a shift mask, EVA-02's rotary
# queries and keys, BEiT's relative-position bias
MORE_MODELS = (("swin_tiny_patch4_window7_224", 64, 224, {}), ("eva02_small_patch14_224", 64, 224, {}),
               ("beit_base_patch16_224", 64, 224, {}))
SMOKE_MODELS = (("vit_tiny_patch16_224", 2, 32, {"patch_size": 8}), ("convit_tiny", 2, 32, {}))


def _fused(model: torch.nn.Module, on: bool) -> torch.nn.Module:
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = on
    return model


def build(name: str, base: torch.nn.Module) -> torch.nn.Module:
    model = _fused(copy.deepcopy(base), name == "sdpa+inductor")
    if name == "attn_compiler":
        import attn_compiler
        attn_compiler.reset()
    return common.compiled_module("inductor" if name == "sdpa+inductor" else name, model)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny models, float32 (CPU)")
    ap.add_argument("--models", default=None, help="comma-separated timm names (default: the list above)")
    ap.add_argument("--only", default=",".join(IMPLS))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    try:
        import timm
    except ImportError:
        print("bench_timm: timm is not installed", file=sys.stderr)
        return 1
    dev = common.device()
    dtype = torch.float32 if args.smoke or not common.on_cuda() else torch.bfloat16
    models = SMOKE_MODELS if args.smoke else MODELS
    if args.models:
        known = {m[0]: m for m in models + MORE_MODELS}
        models = [known.get(n, (n, 64, 224, {})) for n in args.models.split(",")]
    rows, env = [], common.environment()
    for model_name, batch, size, kw in models:
        torch.manual_seed(0)
        base = _fused(timm.create_model(model_name, pretrained=False, img_size=size, **kw), False).to(dev)
        x32 = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(dev)
        with torch.no_grad():
            ref = base.eval()(x32).float()
        base.to(dtype)
        for m in base.modules():      # ConViT's position table: a plain attribute in some timm versions
            if isinstance(getattr(m, "rel_indices", None), torch.Tensor):
                m.rel_indices = m.rel_indices.to(dtype)
        x = x32.to(dtype)
        for name in [n for n in args.only.split(",") if n]:
            common.reset_compiled()

            def measure(row, name=name):
                model = build(name, base)
                model.eval()
                with torch.no_grad():
                    out = model(x)
                    row["rel_err"] = float((out.float() - ref).norm() / ref.norm())
                    row["infer_ms"] = common.time_ms(lambda: model(x))
                model.train()
                params = [p for p in model.parameters() if p.requires_grad]

                def step():
                    model(x).float().square().mean().backward()
                step()
                row["train_ms"] = common.time_ms(step, grad_to_none=params)
                row["peak_mib"] = common.peak_mib(step)
                if name == "attn_compiler":
                    row["sites"] = common.sites_summary()
            row = dict(env, model=model_name, impl=name, batch=batch, image=size,
                       dtype=str(dtype).removeprefix("torch."))
            rows.append(common.model_row(row, measure))
        common.free_memory()
    common.finish_rows(rows, args.out, "timm", ["model", "impl", "batch", "infer_ms", "train_ms", "peak_mib",
                                                  "rel_err", "sites"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
