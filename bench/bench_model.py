"""A whole model, end to end: the nanoGPT-style GPT of ``attn_compiler.models``
(attention written by hand: ``q @ kᵀ``, a registered tril buffer, softmax,
``@ v``), per inference forward and per training step (forward, loss,
backward; no optimizer), in bf16.

    PYTHONPATH=. python bench/bench_model.py --out OUT            # GPU
    python bench/bench_model.py --smoke --out /tmp/m              # CPU: tiny, aot_eager inside

Paths, each on a fresh copy of the same weights:

- ``eager``: the model as written;
- ``inductor``: ``torch.compile(model)``;
- ``attn_compiler``: ``torch.compile(model, backend="attn_compiler")``;
- ``sdpa+inductor``: the attention rewritten by hand as
  ``F.scaled_dot_product_attention(q, k, v, is_causal=True)`` (what a user
  would change the code to), then ``torch.compile(model)``.

Every path's loss is checked against eager's (relative 2e-2 in bf16) before it
is timed; times are ``triton.testing.do_bench`` medians (gradients reset
between steps), peak memory is one call's peak beyond the inputs. Rows go to
OUT/model.jsonl; the table is printed last.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import types

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import environment, peak_mib, reset_compiled, time_ms  # noqa: E402
from results import fmt, markdown_table  # noqa: E402

import attn_compiler  # noqa: E402
from attn_compiler.models.gpt import GPT, CausalSelfAttention, GPTConfig  # noqa: E402

PATHS = ("eager", "inductor", "attn_compiler", "sdpa+inductor")


def _sdpa_forward(self: CausalSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """The same attention written with SDPA (nanoGPT's flash path)."""
    B, T, C = x.size()
    q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
    hs = C // self.n_head
    q, k, v = (t.view(B, T, self.n_head, hs).transpose(1, 2) for t in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=True)
    y = y.transpose(1, 2).contiguous().view(B, T, C)
    return self.resid_dropout(self.c_proj(y))


def build(path: str, base: GPT, inner: str) -> torch.nn.Module:
    model = copy.deepcopy(base)
    if path == "sdpa+inductor":
        for m in model.modules():
            if isinstance(m, CausalSelfAttention):
                m.forward = types.MethodType(_sdpa_forward, m)
    if path == "eager":
        return model
    if path == "attn_compiler":
        return torch.compile(model, backend=attn_compiler.backend(inner=inner))
    return torch.compile(model, backend=inner)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--embd", type=int, default=768)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=str, default="1024,2048", help="sequence lengths, comma-separated")
    p.add_argument("--paths", type=str, default=",".join(PATHS))
    p.add_argument("--smoke", action="store_true", help="CPU: a tiny GPT, fp32, aot_eager inside")
    p.add_argument("--out", type=str, default="bench/out")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.smoke
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    inner = "inductor" if cuda else "aot_eager"
    if args.smoke:
        args.layers, args.heads, args.embd, args.batch, args.seq = 2, 2, 32, 2, "16"
    seqs = [int(s) for s in args.seq.split(",")]
    paths = [s for s in args.paths.split(",") if s]
    os.makedirs(args.out, exist_ok=True)
    out_path = os.path.join(args.out, "model.jsonl")
    open(out_path, "w").close()
    env = environment()
    rows = []
    for T in seqs:
        cfg = GPTConfig(vocab_size=50304 if cuda else 256, block_size=T, n_layer=args.layers,
                        n_head=args.heads, n_embd=args.embd)
        torch.manual_seed(0)
        base = GPT(cfg).to(dev, dtype)
        g = torch.Generator(device=dev).manual_seed(1)
        idx = torch.randint(0, cfg.vocab_size, (args.batch, T), device=dev, generator=g)
        tgt = torch.randint(0, cfg.vocab_size, (args.batch, T), device=dev, generator=g)
        want = None
        for path in paths:
            reset_compiled()
            attn_compiler.reset()
            shape = f"{args.batch}x{T} L{args.layers} H{args.heads} C{args.embd}"
            row = dict(env, bench="model", shape=shape, path=path, dtype=str(dtype).removeprefix("torch."))
            try:
                model = build(path, base, inner)
                params = [q for q in model.parameters() if q.requires_grad]

                def step():
                    return model(idx, tgt)[1].backward()

                def infer():
                    with torch.no_grad():
                        return model(idx)[0]

                loss = model(idx, tgt)[1].float().item()          # compiles (training graphs)
                want = loss if want is None else want
                rel = abs(loss - want) / abs(want)
                row["loss"], row["loss_rel_vs_first"] = loss, rel
                if rel > (2e-2 if dtype == torch.bfloat16 else 1e-4):
                    row["status"] = "FAIL"
                    _add(rows, row, out_path)
                    continue
                step()
                infer()
                row["train_ms"] = time_ms(step, grad_to_none=params)
                row["infer_ms"] = time_ms(infer)
                row["train_tok_s"] = args.batch * T / row["train_ms"] * 1e3
                row["train_peak_mib"] = peak_mib(step)
                row["infer_peak_mib"] = peak_mib(infer)
                if path == "attn_compiler":
                    rep = attn_compiler.report()
                    row["sites"] = rep.summary()
                    row["choices"] = sorted({str(s.features.get("choice")) for s in rep.fused})
                row["status"] = "OK"
            except Exception as e:  # noqa: BLE001 - one failing path is a row, not a crash
                row["status"] = "ERROR"
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            _add(rows, row, out_path)
    cols = ["shape", "path", "status", "train_ms", "train_tok_s", "infer_ms", "train_peak_mib", "infer_peak_mib",
            "choices"]
    print(markdown_table([[fmt(r.get(c)) if not isinstance(r.get(c), (str, list)) else str(r.get(c))
                           for c in cols] for r in rows], cols))
    return 0


def _add(rows: list, row: dict, path: str) -> None:
    rows.append(row)
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
    print({k: v for k, v in row.items() if k not in ("device", "torch", "triton", "date")}, flush=True)


if __name__ == "__main__":
    sys.exit(main())
