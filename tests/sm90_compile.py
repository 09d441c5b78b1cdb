"""Compile the generated kernels for a Hopper GPU (sm_90) on a machine without one.

Run as a script (``python tests/sm90_compile.py [--regs] [case ...]``) in a process where Triton's
interpreter is off: the launchers of ``attn_compiler.kernels`` run on CPU
tensors as usual, but every kernel launch only compiles (``JITFunction.warmup``)
for an sm_90 target through Triton's real code generator and ptxas.  This catches
what the interpreter cannot: type errors of the Triton front end (a variable
redefined with another dtype in one branch), layout and lowering failures, and
kernels asking for more shared memory than a Hopper multiprocessor has.

Prints one JSON line per compiled kernel and a last line ``{"failures": N}``
(or only ``{"unavailable": why}`` when this Triton cannot compile a trivial
kernel this way); ``tests/test_sm90_compile.py`` runs it and asserts N == 0.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import traceback

os.environ.pop("TRITON_INTERPRET", None)

import sympy  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.driver import CudaDriver  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

# opt-in shared memory per block on H100/H200 (227 KiB)
HOPPER_SMEM = 232448


class _Sm90Driver(CudaDriver):
    """The CUDA driver's code paths with a fixed sm_90 target and no device."""

    def __init__(self):  # no libcuda: nothing is loaded or launched
        self.utils = None

    @classmethod
    def is_active(cls):
        return True

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


COMPILED: list = []
# ``--regs``: also run ptxas -v on each kernel's PTX and record its registers
# and spill bytes (what a GPU run reports as n_regs / n_spills), for studying
# register pressure without a GPU
REGS = "--regs" in sys.argv
# ``--serialized``: record the kernels whose wgmma ptxas serializes for the
# code's shape (its performance note C7515: one wait after every wgmma; see
# [Note: FULL walk first] in templates/attention_bwd.py.tmpl).  Its other
# reason, too few registers for the pipeline, is a tile's size (head dim 256
# at 4 warps), which the tuner weighs by timing; it is not recorded.
SERIAL = "--serialized" in sys.argv
SERIALIZED: list = []
# float32 atomic adds issued one element at a time (``atom.global...add.f32``
# without ``.v2``/``.v4``) in a kernel: a captured gradient's adds along an
# axis Triton could not prove aligned ([Note: tile starts as multiples])
SCALAR_ATOMICS: list = []


def _ptxas_log(kernel) -> str:
    import subprocess
    import tempfile
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.asm["ptx"])
    try:
        return subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                              capture_output=True, text=True).stderr
    finally:
        os.unlink(f.name)


def _ptxas_usage(log: str) -> str:
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return (f" regs={regs.group(1) if regs else '?'}"
            f" spill_st={spill.group(1) if spill else '?'} spill_ld={spill.group(2) if spill else '?'}")


@triton.jit
def _probe(X, n):
    tl.store(X, tl.load(X) + n)


def _compile_only(self, grid):
    def launch(*args, **kwargs):
        kernel = self.warmup(*args, grid=grid, **kwargs)
        log = _ptxas_log(kernel) if REGS or SERIAL else ""
        if "C7515" in log:
            SERIALIZED.append(self.fn.__name__)
        if re.search(r"atom\.global\.[\w.]*add\.f32", kernel.asm["ptx"]):
            SCALAR_ATOMICS.append(self.fn.__name__)
        name = self.fn.__name__ + (_ptxas_usage(log) if REGS else "")
        COMPILED.append((name, kernel.metadata.shared, kernel.metadata.num_warps))
    return launch


def _cases():
    from attn_compiler.autotune import KernelConfig
    from attn_compiler.passes.analyze.spec import (D, AttentionSpec, CapturedTensor, captured_call, h, kv_idx,
                                                   q_idx, score)

    t0 = captured_call(0)

    def spec(mod, dtype="bfloat16", captured=(), group=1, dropout_p=0.0):
        return AttentionSpec(score_mod=mod, scale=1 / sympy.sqrt(D), captured=tuple(captured), gqa_group=group,
                             dropout_p=dropout_p, out_dtype=dtype, prob_dtype=dtype,
                            score_dtype=dtype)

    def masked(keep, value=score, fill=-sympy.oo):
        return sympy.Piecewise((value, keep), (fill, True))

    causal = kv_idx <= q_idx
    f32_min = float(torch.finfo(torch.float32).min)
    bf16_min = float(torch.finfo(torch.bfloat16).min)
    plane = CapturedTensor((False, True, True, True), "bfloat16", requires_grad=True)
    slopes = CapturedTensor((False, True, False, False), "float32")
    keep = CapturedTensor((True, False, False, True), "bool")
    additive = CapturedTensor((True, False, False, True), "bfloat16")
    static = CapturedTensor((True, False, True, True), "bfloat16")
    per_query = CapturedTensor((True, False, True, False), "bfloat16", requires_grad=True)
    # name, spec, captured tensors (given B, H, L), the families' extra variants
    cases = [
        ("plain", spec(score), lambda B, H, L: [], ()),
        ("causal", spec(masked(causal)), lambda B, H, L: [], ("paired", "fused", "tma")),
        ("window", spec(masked(causal & (q_idx - kv_idx < 100))), lambda B, H, L: [], ()),
        ("softcap", spec(masked(causal, 50.0 * sympy.tanh(score / 50.0))), lambda B, H, L: [], ()),
        ("alibi", spec(masked(causal, score + t0 * (kv_idx - q_idx)), captured=[slopes]),
         lambda B, H, L: [torch.rand(1, H, 1, 1)], ()),
        ("bias", spec(score + t0, captured=[plane]),
         lambda B, H, L: [torch.randn(1, H, L, L, dtype=torch.bfloat16)], ("tma", "fused")),
        # the band's walks start at runtime tile indices: the bias's loads and
        # its gradient's adds must still see aligned tiles
        ("causal_bias", spec(masked(causal, score + t0), captured=[plane]),
         lambda B, H, L: [torch.randn(1, H, L, L, dtype=torch.bfloat16)], ("fused",)),
        ("padding", spec(masked(sympy.Ne(t0, 0)), captured=[keep]),
         lambda B, H, L: [torch.ones(B, 1, 1, L, dtype=torch.bool)], ("fused", "paired", "tma")),
        ("hf_causal_padding", spec(masked(causal, score + t0, f32_min), captured=[additive]),
         lambda B, H, L: [torch.zeros(B, 1, 1, L, dtype=torch.bfloat16)], ("paired",)),
        # a mask received as a value (static cache): the block map's ZERO tiles
        ("static_cache", spec(score + t0, captured=[static]),
         lambda B, H, L: [torch.zeros(B, 1, L, L, dtype=torch.bfloat16).masked_fill(
             torch.ones(L, L, dtype=torch.bool).triu(1), bf16_min)], ("fused", "tma")),
        ("dropout", spec(masked(causal), dropout_p=0.1), lambda B, H, L: [], ()),
        ("gqa_fp16", spec(masked(causal), dtype="float16", group=4), lambda B, H, L: [], ()),
        ("fp32", spec(masked(causal), dtype="float32"), lambda B, H, L: [], ()),
        # float32 tanh (_tanh_f32), ALiBi slopes printed from 2 ** (-h - 1) (MPT's form)
        ("softcap_fp32", spec(masked(causal, 50.0 * sympy.tanh(score / 50.0)), dtype="float32"),
         lambda B, H, L: [], ()),
        ("upcast_qk", spec(masked(causal), dtype="float16"), lambda B, H, L: [], ()),
        ("alibi_pow2", spec(masked(causal, score + 2 ** (-h - 1) * (kv_idx - q_idx))), lambda B, H, L: [], ()),
        # a per-query vector with a gradient: a vector along dK/dV's walk, atomics in dQ
        ("temperature", spec(masked(causal, score * t0), captured=[per_query]),
         lambda B, H, L: [torch.rand(B, 1, L, 1, dtype=torch.bfloat16) + 0.5], ()),
    ]
    shapes = [(2, 4, 256, 128), (1, 4, 200, 80)]      # tiles that divide / an uneven length and head dim
    # the other head dims the tuner's rules treat differently, for a few cases
    more_shapes = {"causal": [(2, 4, 256, 64), (1, 2, 128, 256)], "bias": [(2, 4, 256, 64)],
                   "padding": [(1, 2, 128, 256)],
                   # float32 over 128 wide: its default forward once asked for 256 KiB (3xTF32's Q copy)
                   "fp32": [(1, 2, 128, 256), (1, 2, 128, 192)]}
    fwd = [KernelConfig(128, 128, 8, 3), KernelConfig(128, 64, 4, 2)]
    bwd = [KernelConfig(64, 64, 4, 2), KernelConfig(64, 128, 8, 3), KernelConfig(64, 64, 4, 2, dq=(128, 64, 8, 3))]
    return cases, shapes, more_shapes, fwd, bwd, KernelConfig


def precompile_check() -> dict:
    """``kernels.precompile`` on the tuner's backward and forward candidates
    of a causal bf16 site: how many kernels it compiled, and how many the same
    calls then still compile when launched (none: the launches find them)."""
    from attn_compiler import kernels
    from attn_compiler.autotune import KernelConfig
    from attn_compiler.passes.analyze.spec import D, AttentionSpec, CapturedTensor, captured_call, kv_idx, q_idx, score

    compiles = []
    triton.knobs.runtime.jit_post_compile_hook = lambda *a, **k: compiles.append(1)
    spec = AttentionSpec(score_mod=sympy.Piecewise((score, kv_idx <= q_idx), (-sympy.oo, True)),
                         scale=1 / sympy.sqrt(D), out_dtype="bfloat16", prob_dtype="bfloat16",
                         score_dtype="bfloat16")
    q, k, v = (torch.randn(2, 4, 256, 128, dtype=torch.bfloat16) for _ in range(3))
    out, lse = torch.zeros_like(q), torch.zeros(2, 4, 256)
    bwd = [KernelConfig(64, 128, 8, 3), KernelConfig(64, 64, 4, 2), KernelConfig(64, 64, 4, 2, "fused")]
    fwd = [KernelConfig(128, 128, 8, 3), KernelConfig(128, 64, 8, 3)]
    calls = [lambda c=c: kernels.backward(out, q, k, v, [], out, lse, spec, None, c) for c in bwd]
    calls += [lambda c=c: kernels.forward(q, k, v, [], spec, None, c) for c in fwd]
    # a boolean padding mask: the block map's kernels (rows, and columns for dK/dV) too
    keep = torch.ones(2, 1, 1, 256, dtype=torch.bool)
    padded = AttentionSpec(score_mod=sympy.Piecewise((score, sympy.Ne(captured_call(0), 0)), (-sympy.oo, True)),
                           scale=1 / sympy.sqrt(D), captured=(CapturedTensor((True, False, False, True), "bool"),),
                           out_dtype="bfloat16", prob_dtype="bfloat16", score_dtype="bfloat16")
    calls.append(lambda: kernels.backward(out, q, k, v, [keep], out, lse, padded, None, bwd[0]))
    kernels.precompile(calls)
    compiled = len(compiles)
    compiles.clear()
    for call in calls:
        call()
    return {"calls": len(calls), "compiled": compiled, "compiled_again": len(compiles)}


def main() -> int:
    from attn_compiler import kernels
    from attn_compiler.autotune import Problem, default_config, first_failing_rule

    driver.set_active(_Sm90Driver())
    JITFunction.__getitem__ = _compile_only
    try:        # the harness itself (Triton's internals it leans on) on a trivial kernel
        _probe[(1,)](torch.zeros(4), 1)
    except Exception as e:  # noqa: BLE001
        print(json.dumps({"unavailable": f"{type(e).__name__}: {e}"}), flush=True)
        return 0
    if "--precompile" in sys.argv:
        print(json.dumps({"precompile": precompile_check()}), flush=True)
        return 0
    cases, shapes, more_shapes, fwd_cfgs, bwd_cfgs, KernelConfig = _cases()
    only = {a for a in sys.argv[1:] if not a.startswith("--")}
    # ``--shard=i/n``: the cases i, i + n, ... (a run split over processes)
    shard = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--shard=")), "0/1")
    shard_i, shard_n = (int(x) for x in shard.split("/"))
    failures = 0
    for idx, (name, spec, make_caps, variants) in enumerate(cases):
        if (only and name not in only) or idx % shard_n != shard_i:
            continue
        dtype = getattr(torch, spec.out_dtype)
        for B, H, L, Dh in shapes + more_shapes.get(name, []):
            Hkv = H // spec.gqa_group
            qk_dtype = torch.float32 if name == "upcast_qk" else dtype     # GPT-J's q.float(), k.float()
            q = torch.randn(B, H, L, Dh, dtype=qk_dtype)
            k, v = torch.randn(B, Hkv, L, Dh, dtype=qk_dtype), torch.randn(B, Hkv, L, Dh, dtype=dtype)
            caps = make_caps(B, H, L)
            seed = torch.tensor(7, dtype=torch.int64) if spec.dropout_p else None
            if qk_dtype == torch.float32:
                fc = [default_config("fwd", Dh, qk_dtype, hopper=True)]
                bc = [default_config("bwd", Dh, qk_dtype, hopper=True)]
            else:
                fc = fwd_cfgs + [KernelConfig(c.block_m, c.block_n, c.num_warps, c.num_stages, "tma")
                                 for c in fwd_cfgs[:1] if Dh in (64, 128, 256)]
                bc = bwd_cfgs + [KernelConfig(c.block_m, c.block_n, c.num_warps, c.num_stages, var)
                                 for c in bwd_cfgs[:1] for var in variants]
            defaults = {default_config(fam, Dh, qk_dtype, hopper=True) for fam in ("fwd", "bwd")}
            # what the tuner would offer: its prune rules drop the rest
            problem = Problem(Dh, qk_dtype, L, L, "causal" in name, True)
            fc = [c for c in fc if first_failing_rule("fwd", dataclasses.replace(c, variant="ptr"), problem) is None]
            bc = [c for c in bc if first_failing_rule("bwd", dataclasses.replace(c, variant="ptr"), problem) is None]
            fc = list(dict.fromkeys(fc + [default_config("fwd", Dh, qk_dtype, hopper=True)]))
            bc = list(dict.fromkeys(bc + [default_config("bwd", Dh, qk_dtype, hopper=True)]))
            jobs = [("fwd", c, lambda c=c: kernels.forward(q, k, v, caps, spec, seed, c)) for c in fc]
            out = torch.zeros(B, H, L, Dh, dtype=dtype)
            lse = torch.zeros(B, H, L)
            jobs += [("bwd", c, lambda c=c: kernels.backward(out, q, k, v, caps, out, lse, spec, seed, c)) for c in bc]
            if kernels.decode_applies(q[:, :, :1], k, spec):
                # one query row: a captured tensor that varies along the queries keeps its first
                dcaps = [c[:, :, :1] if c.shape[2] == L else c for c in caps]
                jobs.append(("decode", None, lambda: kernels.decode(q[:, :, :1], k, v, dcaps, spec)))
            for family, config, job in jobs:
                COMPILED.clear()
                SERIALIZED.clear()
                SCALAR_ATOMICS.clear()
                rec = dict(case=name, shape=f"{B}x{H}x{L}x{Dh}", family=family, config=str(config))
                try:
                    job()
                    rec["kernels"] = [f"{n} smem={s}" for n, s, _ in COMPILED]
                    if SERIALIZED:
                        rec["serialized"] = list(SERIALIZED)
                    if SCALAR_ATOMICS:
                        rec["scalar_atomics"] = sorted(set(SCALAR_ATOMICS))
                    big = [n for n, s, _ in COMPILED if s > HOPPER_SMEM]
                    if big and config in defaults:
                        # what runs untuned (CUDA-graph capture, tuning off) must fit
                        rec["error"] = f"default config: shared memory over {HOPPER_SMEM} bytes: {big}"
                    elif big:       # a tuning candidate: the launch raises and the tuner drops it
                        rec["over_smem"] = big
                except ValueError as e:       # a variant a launcher refuses (the tuner drops it)
                    if "variant" not in str(e):
                        rec["error"] = f"ValueError: {e}"
                    else:
                        rec["refused"] = str(e)
                except Exception as e:  # noqa: BLE001 - every failure is reported
                    rec["error"] = f"{type(e).__name__}: {str(e)[-1500:]}"
                    rec["trace"] = traceback.format_exc()[-1500:]
                failures += "error" in rec
                print(json.dumps(rec), flush=True)
    print(json.dumps({"failures": failures}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
