"""Print the generated Triton kernel of an attention spec.

    python -m attn_compiler.templates [--family fwd|bwd|decode] [--mask none|causal|window:W]
                                      [--softcap C] [--bias] [--dropout P] [--spec JSON]

``--spec`` takes ``AttentionSpec.dumps()`` text (a fused site's report row holds
it under ``features["spec"]``); otherwise the spec is built from the flags.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import sympy

from attn_compiler.passes.analyze.spec import (
    D, AttentionSpec, CapturedTensor, captured_call, kv_idx, q_idx, score)
from attn_compiler.templates import codegen


def spec_from_flags(mask: str = "none", softcap: Optional[float] = None, bias: bool = False,
                    dropout: float = 0.0, dtype: str = "bfloat16") -> AttentionSpec:
    z = score
    if softcap:
        z = softcap * sympy.tanh(score / softcap)
    captured = ()
    if bias:
        z = z + captured_call(0)
        captured = (CapturedTensor((False, True, True, True), "float32", requires_grad=True),)
    if mask == "causal":
        z = sympy.Piecewise((z, kv_idx <= q_idx), (-sympy.oo, True))
    elif mask.startswith("window:"):
        w = int(mask.split(":", 1)[1])
        z = sympy.Piecewise((z, (kv_idx <= q_idx) & (kv_idx > q_idx - w)), (-sympy.oo, True))
    elif mask != "none":
        raise ValueError(f"unknown mask {mask!r}: none, causal or window:W")
    return AttentionSpec(score_mod=z, scale=1 / sympy.sqrt(D), captured=captured, dropout_p=dropout,
                         out_dtype=dtype, prob_dtype=dtype, score_dtype=dtype)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m attn_compiler.templates",
                                description="print the generated Triton kernel of an attention spec")
    p.add_argument("--family", choices=codegen.FAMILIES, default="fwd")
    p.add_argument("--spec", help="AttentionSpec.dumps() text (overrides the flags below)")
    p.add_argument("--mask", default="none", help="none, causal or window:W")
    p.add_argument("--softcap", type=float, default=None)
    p.add_argument("--bias", action="store_true", help="an additive bias tensor (with its gradient)")
    p.add_argument("--dropout", type=float, default=0.0)
    args = p.parse_args(argv)
    try:
        spec = AttentionSpec.loads(args.spec) if args.spec else spec_from_flags(
            args.mask, args.softcap, args.bias, args.dropout)
        why = codegen.unsupported_reason(spec)
        if why:
            print(f"no kernel: {why}", file=sys.stderr)
            return 2
        print(codegen.generate(args.family, spec).source)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
