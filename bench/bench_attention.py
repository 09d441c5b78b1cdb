"""Attention forward and forward+backward: our kernels and the product path
against SDPA's backends, FlexAttention, eager and torch.compile (inductor).

    PYTHONPATH=. python bench/bench_attention.py --quick --out bench/out      # GPU, 6-9 min
    TRITON_INTERPRET=1 python bench/bench_attention.py --smoke --out /tmp/b   # CPU, tiny

One case = shape B×H×N×D, causal or not, a score variant (impls.py) and a dtype.
Per case: random inputs, a float64 golden (output and gradients), then for each
implementation a forward row and a forward+backward row (common.measure:
compile apart, numerics, peak memory, median time).  The forward is timed on
inputs that require grad (the forward of a training step), so one compile
serves both rows.  Rows go to OUT/attention.jsonl as they come; the short
table (TFLOP/s per case and implementation) is printed at the end.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import warnings
from collections.abc import Callable, Sequence

import common
import impls
import torch
from results import Results, attention_summary

IMPLS = ("ours_triton", "attn_compiler", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "flex", "eager",
         "compile_inductor")
PASSES = ("fwd", "fwd+bwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FULL_N = (4096, 16384, 1024, 8192, 2048)    # in priority order (build_cases)
QUICK_N = (4096, 16384, 1024)
TOKENS = 16384                          # B·N is kept at this, so B = TOKENS // N
VARIANT_SHAPE = (4, 16, 4096, 128)      # the score variants run here, causal
SMOKE_SHAPE = (1, 2, 64, 32)            # CPU: fp32, the Triton interpreter


@dataclasses.dataclass(frozen=True)
class Case:
    B: int
    H: int
    N: int
    D: int
    causal: bool
    variant: str = "none"
    dtype: torch.dtype = torch.bfloat16

    @property
    def shape(self) -> str:
        return f"{self.B}x{self.H}x{self.N}x{self.D}"

    def flops(self, bwd: bool) -> float:
        return common.attention_flops(self.B, self.H, self.N, self.N, self.D, self.causal, bwd)


@dataclasses.dataclass
class Inputs:
    q: torch.Tensor                      # (B, H, N, D), requires grad
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor                   # (B, H, N, D)
    extra: torch.Tensor | None           # alibi slopes (1, H, 1, 1) fp32, or bias (1, H, N, N) (grad)

    def leaves(self) -> list[torch.Tensor]:
        grads = [self.extra] if self.extra is not None and self.extra.requires_grad else []
        return [self.q, self.k, self.v, *grads]


def make_inputs(case: Case, device, seed: int = 0) -> Inputs:
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (case.B, case.H, case.N, case.D)

    def randn(*size, grad=True):
        return torch.randn(size, generator=g, device=device, dtype=case.dtype).requires_grad_(grad)

    extra = None
    if case.variant == "alibi":
        extra = impls.alibi_slopes(case.H, device)
    elif case.variant == "bias":
        extra = randn(1, case.H, case.N, case.N)
    elif case.variant == "padding":
        extra = impls.padding_mask(case.B, case.N, case.dtype, device)
    elif case.variant == "keypad":
        extra = impls.keypad_keep(case.B, case.N, device)
    return Inputs(randn(*shape), randn(*shape), randn(*shape), randn(*shape, grad=False), extra)


def _keep_mask(causal: bool, keep, kv, qi):
    """The golden's bool mask (True = kept): causal and / or the key padding."""
    mask = (kv <= qi) if causal else None
    if keep is not None:
        mask = keep if mask is None else keep & mask
    return mask


def golden(case: Case, x: Inputs, grads: bool) -> dict[str, torch.Tensor]:
    """float64 output (and dq, dk, dv, dbias) from the project's eager reference,
    a block of query rows at a time so no float64 N×N matrix is whole."""
    from attn_compiler.testing import reference_attention

    def f64(t):
        return t.detach().to(torch.float64).requires_grad_(grads)

    q, k, v = f64(x.q), f64(x.k), f64(x.v)
    bias = f64(x.extra) if case.variant == "bias" else None
    pad = x.extra.to(torch.float64) if case.variant == "padding" else None
    slopes = x.extra.to(torch.float64) if case.variant == "alibi" else None
    keep = x.extra if case.variant == "keypad" else None                     # (B, 1, 1, N) bool
    out = torch.empty_like(q, requires_grad=False)
    rows = max(1, min(case.N, (1 << 26) // (case.B * case.H * case.N)))   # 512 MiB of fp64 scores
    kv = torch.arange(case.N, device=q.device)[None, :]                      # (1, N)
    for m0 in range(0, case.N, rows):
        m1 = min(case.N, m0 + rows)
        qi = torch.arange(m0, m1, device=q.device)[:, None]                  # (rows, 1)
        add = slopes * (kv - qi) if slopes is not None else bias[:, :, m0:m1] if bias is not None else pad
        o = reference_attention(q[:, :, m0:m1], k, v, softcap=impls.SOFTCAP if case.variant == "softcap" else None,
                                bias=add, mask=_keep_mask(case.causal, keep, kv, qi))
        if grads:
            o.backward(x.dout[:, :, m0:m1].to(torch.float64))
        out[:, :, m0:m1] = o.detach()
    gold = {"out": out}
    if grads:
        gold.update(dq=q.grad, dk=k.grad, dv=v.grad)
        if bias is not None:
            gold["dbias"] = bias.grad
    return gold


# ---- implementations: build(case, inputs) -> Impl -------------------------------

def _sdpa(backend: str) -> Callable[[Case, Inputs], common.Impl]:
    def build(case: Case, x: Inputs) -> common.Impl:
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        if case.variant == "softcap":
            raise NotImplementedError("SDPA has no score modification (tanh softcap)")
        which = getattr(SDPBackend, backend)
        dev, n = x.q.device, case.N
        above = None                                     # (N, N), True where masked
        if case.causal and case.variant != "none":
            above = torch.ones(n, n, dtype=torch.bool, device=dev).triu(1)
        mask = None
        if case.variant == "alibi":                      # built once, not timed; in q's dtype
            rel = torch.arange(n, device=dev)[None, :] - torch.arange(n, device=dev)[:, None]
            mask = x.extra * rel                         # (1, H, N, N) fp32
            if above is not None:
                mask = mask.masked_fill(above, float("-inf"))
            mask = mask.to(case.dtype)

        if case.variant == "padding":                    # (B, 1, 1, N), or (B, 1, N, N) with the causal -inf
            mask = x.extra if above is None else torch.where(above, float("-inf"), x.extra)
        if case.variant == "keypad":                     # bool, True = kept
            mask = x.extra if above is None else x.extra & ~above

        def forward():
            m = mask
            if case.variant == "bias":                   # in the call: dBias flows through it
                m = x.extra if above is None else x.extra.masked_fill(above, float("-inf"))
            with sdpa_kernel(which):
                return F.scaled_dot_product_attention(x.q, x.k, x.v, attn_mask=m,
                                                      is_causal=case.causal and m is None)

        _sdpa_probe(forward, backend)
        return common.Impl(forward)
    return build


def _sdpa_probe(forward: Callable[[], torch.Tensor], backend: str) -> None:
    """One forward, untimed: when no kernel of ``backend`` takes the case, raise
    NotImplementedError with SDPA's reasons (it gives them only as warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            forward()
        except RuntimeError as exc:
            said = (str(w.message).split("(Triggered internally")[0].strip() for w in caught)
            why = [m for m in said if m and not m.endswith(":")]     # drop the "... because:" headers
            raise NotImplementedError(f"{backend}: " + ("; ".join(why) or str(exc))) from exc


def _flex(case: Case, x: Inputs) -> common.Impl:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    score_mod = None
    if case.variant == "softcap":
        def score_mod(score, b, h, q_idx, kv_idx):
            return impls.SOFTCAP * torch.tanh(score / impls.SOFTCAP)
    elif case.variant == "alibi":
        slopes = x.extra.view(case.H)                    # (H,) fp32

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + slopes[h] * (kv_idx - q_idx)
    elif case.variant == "bias":
        bias = x.extra                                   # (1, H, N, N), requires grad

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias[0, h, q_idx, kv_idx]
    elif case.variant == "padding":
        pad = x.extra.view(case.B, case.N)               # (B, N) additive

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + pad[b, kv_idx]
    block_mask = (create_block_mask(causal, None, None, case.N, case.N, device=x.q.device)
                  if case.causal else None)
    if case.variant == "keypad":                         # the padding as a block mask (built untimed)
        keep = x.extra.view(case.B, case.N)

        def keypad(b, h, q_idx, kv_idx):
            return keep[b, kv_idx]

        def keypad_causal(b, h, q_idx, kv_idx):
            return keep[b, kv_idx] & (kv_idx <= q_idx)
        block_mask = create_block_mask(keypad_causal if case.causal else keypad, case.B, None, case.N, case.N,
                                       device=x.q.device)
    compiled = torch.compile(flex_attention, dynamic=False)
    return common.Impl(lambda: compiled(x.q, x.k, x.v, score_mod=score_mod, block_mask=block_mask))


def _eager(case: Case, x: Inputs) -> common.Impl:
    module = impls.HandWrittenAttention(case.causal, case.variant)
    return common.Impl(lambda: module(x.q, x.k, x.v, x.extra))


def _inductor(case: Case, x: Inputs) -> common.Impl:
    module = torch.compile(impls.HandWrittenAttention(case.causal, case.variant), dynamic=False)
    return common.Impl(lambda: module(x.q, x.k, x.v, x.extra))


def _attn_compiler(case: Case, x: Inputs) -> common.Impl:
    module = impls.compile_attn_compiler(impls.HandWrittenAttention(case.causal, case.variant))
    return common.Impl(lambda: module(x.q, x.k, x.v, x.extra), note=impls.site_note)


def _ours_triton(case: Case, x: Inputs) -> common.Impl:
    impls.triton_context()                               # fail early, with the reason, if missing
    spec = impls.ours_spec(case.causal, case.variant, case.dtype)
    captured = [x.extra] if x.extra is not None else []
    return common.Impl(lambda: impls.ours_forward(x.q, x.k, x.v, captured, spec), context=impls.triton_context)


BUILDERS: dict[str, Callable[[Case, Inputs], common.Impl]] = {
    "ours_triton": _ours_triton, "attn_compiler": _attn_compiler,
    "sdpa_cudnn": _sdpa("CUDNN_ATTENTION"), "sdpa_flash": _sdpa("FLASH_ATTENTION"),
    "sdpa_efficient": _sdpa("EFFICIENT_ATTENTION"),
    "flex": _flex, "eager": _eager, "compile_inductor": _inductor,
}


# ---- the sweep ----------------------------------------------------------------------

def _works(case: Case, x: Inputs, impl: common.Impl, gold: dict[str, torch.Tensor]) -> dict[str, common.Work]:
    tol = common.TOLERANCE[case.dtype]

    def fwd():
        with impl.context():
            return impl.forward()

    def fwd_bwd():
        with impl.context():
            out = impl.forward()
            out.backward(x.dout)
        return out

    def grads(out):
        got = {"out": out, "dq": x.q.grad, "dk": x.k.grad, "dv": x.v.grad}
        if case.variant == "bias":
            got["dbias"] = x.extra.grad
        return got

    return {
        "fwd": common.Work(fwd, lambda out: {"out": out}, {"out": gold["out"]}, tol, flops=case.flops(False)),
        "fwd+bwd": common.Work(fwd_bwd, grads, gold, tol, flops=case.flops(True), grad_to_none=x.leaves()),
    }


def _row(case: Case) -> common.Row:
    def row(name: str, pss: str, **fields) -> dict:
        return {"impl": name, "shape": case.shape, "B": case.B, "H": case.H, "N": case.N, "D": case.D,
                "causal": case.causal, "variant": case.variant, "dtype": str(case.dtype).removeprefix("torch."),
                "pass": pss, **fields}
    return row


def run_case(case: Case, names: Sequence[str], passes: Sequence[str], results: Results, seed: int) -> bool:
    """All rows of one case; True when the CUDA context was lost."""
    common.free_memory()
    x = make_inputs(case, common.device(), seed)
    gold = golden(case, x, grads="fwd+bwd" in passes)
    return common.run_impls(names, passes, lambda name: BUILDERS[name](case, x),
                            lambda impl: _works(case, x, impl, gold), _row(case), results)


def build_cases(args) -> list[Case]:
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float32 if args.smoke else torch.bfloat16)
    causals = {"both": (True, False), "yes": (True,), "no": (False,)}[args.causal]
    if args.shapes:
        shapes = [tuple(int(n) for n in s.lower().split("x")) for s in args.shapes.split(",")]
    elif args.smoke:
        shapes = [SMOKE_SHAPE]
    else:
        Ns = QUICK_N if args.quick else FULL_N
        Ds = (128,) if args.quick else (128, 64)
        shapes = [(TOKENS // n, 16, n, d) for d in Ds for n in Ns]
    plain = [Case(*s, causal=c, dtype=dtype) for s in shapes for c in causals]
    variants = [] if args.variants == "none" else args.variants.split(",")
    vshape = shapes[0] if args.shapes or args.smoke else VARIANT_SHAPE
    extra = [Case(*vshape, causal=True, variant=v, dtype=dtype) for v in variants]
    # Priority order, so that a run cut short by its time budget keeps the most telling
    # cases: the first shape with both maskings, then variants and the other shapes in
    # turn (causal before full).
    order, rest = plain[:len(causals)], sorted(plain[len(causals):], key=lambda c: not c.causal)
    while extra or rest:
        order += [extra.pop(0)] if extra else []
        order += [rest.pop(0)] if rest else []
    return order


COLUMNS = ("impl", "shape", "causal", "variant", "dtype", "pass", "status", "ms", "tflops", "pct_peak",
           "peak_mib", "rel_err", "first_call_s", "note")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="N in {1024, 4096, 16384}, D=128, + variants")
    ap.add_argument("--smoke", action="store_true", help=f"CPU check: {SMOKE_SHAPE} fp32, interpreter kernels")
    ap.add_argument("--only", help=f"comma list of implementations (default all: {','.join(IMPLS)})")
    ap.add_argument("--shapes", help="comma list of BxHxNxD, replacing the grid (e.g. 4x16x4096x128)")
    ap.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    ap.add_argument("--variants", default="softcap,alibi,bias,padding",
                    help="comma list of score variants, or 'none'; run causal at 4x16x4096x128 "
                         "(at the first of --shapes when given)")
    ap.add_argument("--passes", default="fwd,fwd+bwd")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="default bf16 (fp32 with --smoke)")
    ap.add_argument("--budget-s", type=float, help="start no case that would end past this many seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join("bench", "out"))
    args = ap.parse_args(argv)
    for name in (args.only or "").split(","):
        if name and name not in BUILDERS:
            ap.error(f"unknown implementation {name!r}; choose from {', '.join(IMPLS)}")
    for v in [] if args.variants == "none" else args.variants.split(","):
        if v not in impls.VARIANTS[1:]:
            ap.error(f"unknown variant {v!r}; choose from {', '.join(impls.VARIANTS[1:])} or 'none'")
    for p in args.passes.split(","):
        if p not in PASSES:
            ap.error(f"unknown pass {p!r}; choose from {', '.join(PASSES)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():       # Triton runs on CPU only interpreted; set before
        os.environ.setdefault("TRITON_INTERPRET", "1")   # any kernel module is imported
    names = args.only.split(",") if args.only else list(IMPLS)
    passes = args.passes.split(",")
    cases = build_cases(args)
    results = Results(args.out, "attention", common.environment())
    print(f"{len(cases)} cases x {len(names)} implementations x {len(passes)} passes on "
          f"{results.env['device']} (torch {results.env['torch']}, triton {results.env['triton']})", flush=True)
    common.sweep_and_report(cases, names, passes, lambda case: run_case(case, names, passes, results, args.seed),
                            _row, results, args.budget_s, COLUMNS, attention_summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
