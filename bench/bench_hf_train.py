"""A Hugging Face LLaMA training step (forward, loss, backward; no optimizer),
bf16, with and without gradient checkpointing.

Paths, each on a fresh copy of the same random weights:

- ``hf_sdpa+inductor``: the model with Hugging Face's default SDPA attention,
  ``torch.compile(model)`` (what most users run);
- ``inductor``: the model with eager attention, ``torch.compile(model)``;
- ``attn_compiler``: the model with eager attention compiled by our backend
  (inner inductor).

With ``--checkpoint`` every decoder layer runs under
``gradient_checkpointing_enable()``; our backend fuses the attention inside
those regions too.

    PYTHONPATH=. python bench/bench_hf_train.py --out OUT                 # GPU
    python bench/bench_hf_train.py --smoke                                 # CPU, tiny

``--dynamic`` compiles every path with ``dynamic=True`` (the scale then
reaches the graph as a 0-d CPU tensor: [Note: CPU scalars beside CUDA operands]).
``--attention-dropout P`` sets the config's attention dropout (each path
then draws its own masks, so the losses differ by the noise of the draws).

Prints ms per step and peak MiB of a step beyond the inputs; each path's loss
is compared with the first path's before it is timed.
"""
from __future__ import annotations

import argparse
import sys

import common
import torch

PATHS = ("hf_sdpa+inductor", "inductor", "attn_compiler")


def build(path: str, cfg, state, checkpoint: bool, dtype, dev, dynamic=None):
    import transformers
    cfg = transformers.LlamaConfig(**cfg.to_dict())
    cfg._attn_implementation = "sdpa" if path.startswith("hf_sdpa") else "eager"
    model = transformers.LlamaForCausalLM(cfg)
    model.load_state_dict(state)
    model.to(dev, dtype).train()
    if checkpoint:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    if path == "attn_compiler":
        import attn_compiler
        attn_compiler.reset()
        return torch.compile(model, backend=attn_compiler.backend(), dynamic=dynamic)
    return torch.compile(model, dynamic=dynamic)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--checkpoint", default="no,yes", help="no, yes or both (comma-separated)")
    ap.add_argument("--dynamic", action="store_true", help="torch.compile(..., dynamic=True) on every path")
    ap.add_argument("--attention-dropout", type=float, default=0.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import transformers
    if args.smoke:
        args.layers, args.hidden, args.heads, args.kv_heads, args.batch, args.seq = 2, 32, 4, 2, 2, 16
    dev = common.device()
    dtype = torch.bfloat16 if common.on_cuda() else torch.float32
    cfg = transformers.LlamaConfig(vocab_size=32000 if not args.smoke else 100, hidden_size=args.hidden,
                                   intermediate_size=int(args.hidden * 8 / 3) // 64 * 64 or 64,
                                   num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                   num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq,
                                   attention_dropout=args.attention_dropout)
    torch.manual_seed(0)
    state = transformers.LlamaForCausalLM(cfg).state_dict()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(1)).to(dev)
    rows, env, base_loss = [], common.environment(), {}
    for ckpt in [c == "yes" for c in args.checkpoint.split(",")]:
        for path in [p for p in args.paths.split(",") if p]:
            common.reset_compiled()

            def measure(row, path=path, ckpt=ckpt):
                model = build(path, cfg, state, ckpt, dtype, dev, True if args.dynamic else None)

                def step():
                    loss = model(input_ids=ids, labels=ids).loss
                    loss.backward()
                    return loss

                loss = float(step())
                base_loss.setdefault(ckpt, loss)
                row["loss"], row["loss_vs_first"] = loss, abs(loss - base_loss[ckpt]) / abs(base_loss[ckpt])
                params = list(model.parameters())
                row["ms"] = common.time_ms(step, grad_to_none=params)
                for p in params:
                    p.grad = None
                row["peak_mib"] = common.peak_mib(step)
                if path == "attn_compiler":
                    row["sites"] = common.sites_summary()
            row = dict(env, path=path, checkpoint=ckpt, layers=args.layers, hidden=args.hidden,
                       heads=f"{args.heads}:{args.kv_heads}", batch=args.batch, seq=args.seq,
                       dynamic=args.dynamic, attention_dropout=args.attention_dropout)
            rows.append(common.model_row(row, measure))
    common.finish_rows(rows, args.out, "hf_train", ["checkpoint", "path", "ms", "peak_mib", "loss_vs_first", "sites"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
