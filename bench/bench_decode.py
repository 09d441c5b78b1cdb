"""Decode: one query token per sequence against a long KV cache, 32 query heads
over 8 KV heads (GQA group 4), D=128, bf16.  What counts is how fast K and V
are read: GB/s = 2·B·Lk·Hkv·D·2 bytes / time, against the card's 4.3 TB/s.

    PYTHONPATH=. python bench/bench_decode.py --out bench/out                 # GPU, 1-2 min
    TRITON_INTERPRET=1 python bench/bench_decode.py --smoke --out /tmp/b      # CPU, tiny

Implementations: ``sdpa`` (enable_gqa=True, SDPA picks the backend),
``sdpa_expanded`` (K/V repeated to 32 heads beforehand, not timed), ``flex``
(compiled, enable_gqa=True), ``eager`` (hand-written, repeat_kv inside),
``ours_triton`` (the op on the narrow K/V, gqa_group=4) and ``attn_compiler``
(the hand-written module compiled by the backend).  Inference only (no grad).
Rows go to OUT/decode.jsonl; the short GB/s table is printed at the end.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Sequence

import common
import impls
import torch
from results import Results, decode_summary

IMPLS = ("ours_triton", "attn_compiler", "sdpa", "sdpa_expanded", "flex", "eager")
KV_LENS = (32768, 8192)
BATCHES = (1, 8)
HEADS = (32, 8)                  # query heads, KV heads
HEAD_DIM = 128


@dataclasses.dataclass(frozen=True)
class Case:
    B: int
    Hq: int
    Hkv: int
    Lk: int
    D: int
    dtype: torch.dtype = torch.bfloat16

    @property
    def shape(self) -> str:
        return f"{self.B}x{self.Hq}:{self.Hkv}x{self.Lk}x{self.D}"

    @property
    def group(self) -> int:
        return self.Hq // self.Hkv

    @property
    def nbytes(self) -> float:
        return common.kv_bytes(self.B, self.Lk, self.Hkv, self.D, torch.finfo(self.dtype).bits // 8)


SMOKE = Case(B=1, Hq=8, Hkv=2, Lk=256, D=32, dtype=torch.float32)    # CPU: fp32, the interpreter


@dataclasses.dataclass
class Inputs:
    q: torch.Tensor              # (B, Hq, 1, D)
    k: torch.Tensor              # (B, Hkv, Lk, D)
    v: torch.Tensor


def make_inputs(case: Case, device, seed: int = 0) -> Inputs:
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*size):
        return torch.randn(size, generator=g, device=device, dtype=case.dtype)

    return Inputs(randn(case.B, case.Hq, 1, case.D), randn(case.B, case.Hkv, case.Lk, case.D),
                  randn(case.B, case.Hkv, case.Lk, case.D))


def golden(x: Inputs) -> dict[str, torch.Tensor]:
    """float64 output of the project's eager reference, one sequence at a time."""
    from attn_compiler.testing import reference_attention

    outs = [reference_attention(*(t[b:b + 1].to(torch.float64) for t in (x.q, x.k, x.v)))
            for b in range(x.q.shape[0])]
    return {"out": torch.cat(outs)}


# ---- implementations: build(case, inputs) -> Impl ---------------------------------

def _sdpa(case: Case, x: Inputs) -> common.Impl:
    import torch.nn.functional as F

    return common.Impl(lambda: F.scaled_dot_product_attention(x.q, x.k, x.v, enable_gqa=True))


def _sdpa_expanded(case: Case, x: Inputs) -> common.Impl:
    import torch.nn.functional as F

    k = x.k.repeat_interleave(case.group, dim=1)           # (B, Hq, Lk, D), outside the timing
    v = x.v.repeat_interleave(case.group, dim=1)
    return common.Impl(lambda: F.scaled_dot_product_attention(x.q, k, v))


def _flex(case: Case, x: Inputs) -> common.Impl:
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    return common.Impl(lambda: compiled(x.q, x.k, x.v, enable_gqa=True))


def _eager(case: Case, x: Inputs) -> common.Impl:
    module = impls.HandWrittenAttention()
    return common.Impl(lambda: module(x.q, x.k, x.v))


def _attn_compiler(case: Case, x: Inputs) -> common.Impl:
    module = impls.compile_attn_compiler(impls.HandWrittenAttention())
    return common.Impl(lambda: module(x.q, x.k, x.v), note=impls.site_note)


def _ours_triton(case: Case, x: Inputs) -> common.Impl:
    impls.triton_context()                                  # fail early, with the reason, if missing
    spec = impls.ours_spec(False, "none", case.dtype, gqa_group=case.group)
    return common.Impl(lambda: impls.ours_forward(x.q, x.k, x.v, [], spec), context=impls.triton_context)


BUILDERS: dict[str, Callable[[Case, Inputs], common.Impl]] = {
    "ours_triton": _ours_triton, "attn_compiler": _attn_compiler, "sdpa": _sdpa,
    "sdpa_expanded": _sdpa_expanded, "flex": _flex, "eager": _eager,
}


# ---- the sweep --------------------------------------------------------------------------

def _row(case: Case) -> common.Row:
    def row(name: str, pss: str, **fields) -> dict:
        return {"impl": name, "shape": case.shape, "B": case.B, "H": case.Hq, "Hkv": case.Hkv, "Lk": case.Lk,
                "D": case.D, "causal": False, "variant": f"gqa{case.group}",
                "dtype": str(case.dtype).removeprefix("torch."), "pass": pss, **fields}
    return row


def run_case(case: Case, names: Sequence[str], results: Results, seed: int) -> bool:
    """All rows of one case; True when the CUDA context was lost."""
    common.free_memory()
    x = make_inputs(case, common.device(), seed)
    gold = golden(x)

    def works(impl: common.Impl) -> dict[str, common.Work]:
        def run():
            with torch.no_grad(), impl.context():
                return impl.forward()

        return {"decode": common.Work(run, lambda out: {"out": out}, gold, common.TOLERANCE[case.dtype],
                                      flops=common.attention_flops(case.B, case.Hq, 1, case.Lk, case.D,
                                                                   False, False),
                                      nbytes=case.nbytes, graph=True)}

    return common.run_impls(names, ("decode",), lambda name: BUILDERS[name](case, x), works, _row(case),
                            results)


def build_cases(args) -> list[Case]:
    if args.smoke:
        return [SMOKE]
    batches = [int(b) for b in args.batch.split(",")]
    lens = [int(n) for n in args.kv_len.split(",")]
    return [Case(b, *HEADS, n, HEAD_DIM) for n in lens for b in batches]


COLUMNS = ("impl", "shape", "dtype", "status", "ms", "gbps", "pct_bw", "peak_mib", "rel_err", "first_call_s",
           "note")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU check: tiny fp32 case, interpreter kernels")
    ap.add_argument("--only", help=f"comma list of implementations (default all: {','.join(IMPLS)})")
    ap.add_argument("--batch", default=",".join(map(str, BATCHES)))
    ap.add_argument("--kv-len", default=",".join(map(str, KV_LENS)))
    ap.add_argument("--budget-s", type=float, help="start no case that would end past this many seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join("bench", "out"))
    args = ap.parse_args(argv)
    names = args.only.split(",") if args.only else list(IMPLS)
    for name in names:
        if name not in BUILDERS:
            ap.error(f"unknown implementation {name!r}; choose from {', '.join(IMPLS)}")
    if not torch.cuda.is_available():       # Triton runs on CPU only interpreted; set before
        os.environ.setdefault("TRITON_INTERPRET", "1")   # any kernel module is imported
    cases = build_cases(args)
    results = Results(args.out, "decode", common.environment())
    print(f"{len(cases)} cases x {len(names)} implementations on {results.env['device']}", flush=True)
    common.sweep_and_report(cases, names, ("decode",), lambda case: run_case(case, names, results, args.seed),
                            _row, results, args.budget_s, COLUMNS, decode_summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
