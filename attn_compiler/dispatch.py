"""Which implementation runs one call of the attention op, with which tuned config.

Entry points: ``forward(...)`` and ``backward(...)`` (called by
``attn_compiler.ops``), ``implementation(name)`` (a context manager forcing one
implementation: ``"auto"``, ``"triton"``, ``"reference"``) and ``tunings()``
(what the autotuner chose in this process, for the report).

``auto`` runs the generated Triton kernels on CUDA tensors whenever they can
compute the spec (``kernels.unsupported_reason``), else the blockwise PyTorch
reference (CPU, float64, head dims over 256).  On CUDA every (kernel family,
generated source, shape bucket) is tuned once: the candidates are kernel
configs (on Hopper also the forward's tensor-descriptor "tma" variant, and for
the forward of short queries the split-KV decode kernel), each checked against
the first one's output and then timed as CUDA-graph replays; the choice is
kept in the persistent cache (``autotune.TuneCache``), keyed by a hash of the
generated source and of the launcher code.  Under CUDA-graph
capture, or with ``ATTN_COMPILER_AUTOTUNE=0``, the cached or default config
runs without timing.  ``ATTN_COMPILER_AUTOTUNE=max`` tries the whole pruned
config space instead of the short list.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import threading
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from attn_compiler import autotune, kernels, reference
from attn_compiler.testing import disagreement
from attn_compiler.autotune import KernelConfig
from attn_compiler.passes.analyze.spec import AttentionSpec
from attn_compiler.templates import codegen

log = logging.getLogger("attn_compiler")

IMPLEMENTATIONS = ("auto", "triton", "reference")
_impl = "auto"
_lock = threading.Lock()
_tunings: Dict[str, autotune.Choice] = {}

# Short candidate lists (block_m, block_n, num_warps, num_stages); the pruning
# rules of autotune drop the ones that do not fit a problem.
_SHORT = {
    # the first few get variants below; measured winners on the H200 (bf16, D=128,
    # 4k): 128x128 w8 s3 causal, 128x64 w4 s2 non-causal, 64x64 w4 s3 tma with a bias
    "fwd": [(64, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 2), (64, 32, 4, 2)],
    # bwd (M, N): dK/dV own N key rows and step M query rows; dQ the mirror.
    # Measured (bwd ms, 4x16x4096x128 causal / non-causal / 1x16x16384 causal;
    # 8x16x2048x64 causal): 64x128 w8 s3 2.09 / 3.37 / 7.15 (FlexAttention's
    # tile for D=128; s2 is 10 % slower), 64x64 w4 s2 2.17 / 3.47 / 7.83,
    # 32x64 w4 s3 best at D=64 (0.66 vs 0.70); 32x128 w8 lost everywhere (3.07 s2).
    # 64x128 w8 s2 and 32x32 w4 s1 never won a 16-bit pointer backward (runs 8-10;
    # 32x32 is float32's and D=256's default, which the tuner always adds):
    # 64x128 w8 s2 only for the learned-bias tma variant (its winner in run 6).
    "bwd": [(64, 128, 8, 3), (64, 64, 4, 2), (32, 64, 4, 3)],
    # decode: 1x32:8x32768x128 bf16 (B=1), whole op in µs with the split count of
    # 4 programs per SM (64 splits) / the best of 16-128 splits: 16x128 w4 s3
    # 44.6 / 37.5 (16 splits), 16x64 w4 s3 45.9 / 38.2 (32), 16x64 w4 s2 40.5 /
    # 40.5; at B=8 (8 splits either way) 246, 280, 247 (SDPA 37.0 and 245)
    "decode": [(16, 128, 4, 3), (16, 64, 4, 3), (16, 64, 4, 2), (16, 128, 8, 3), (16, 256, 8, 2),
               (16, 32, 4, 2)],
}
# More tiles for some head dims: (family, smallest D, largest D, tiles),
# added after the family's list above.
# - D over 128 (tiles 256 wide along D), where the smem rule leaves only 4-warp
#   tiles of the lists above (128x64 w4 s2 spills: 120-160 TFLOP/s).  Measured
#   at 4x16x4096xD non-causal (bf16, TFLOP/s, D 192 / 256, bench/RESULTS.md run
#   164): forward 128x64 w8 s2 403-412 / 513 against the best of the list above
#   316 / 402 (64x32 w4 s2); backward 64x64 w8 s2 161 / 214 and 64x32 w4 s2 146
#   / 208 against 117 / 155 (64x64 w4 s2).
# - D up to 64, backward (run 167, bf16, kernels alone, ms; the best of the
#   list above in brackets): 64x64 w4 s3 1.062 at 4x16x4096x64 causal (1.112),
#   0.363 at 16x16x1024x64 causal (0.372); 32x128 w4 s3 with dQ on 128x64 w8 s3
#   1.864 at 4x16x4096x64 non-causal (1.994), 0.530 at 16x16x1024x64 (0.566).
#   At D=128 neither beat the list (run 168).
_SHORT_BY_HEAD_DIM = [
    ("fwd", 129, 256, [(128, 64, 8, 2)]),
    ("bwd", 129, 256, [(64, 64, 8, 2), (64, 32, 4, 2)]),
    ("bwd", 1, 64, [(64, 64, 4, 3), (32, 128, 4, 3, "ptr", (128, 64, 8, 3))]),
]


@contextlib.contextmanager
def implementation(name: str) -> Iterator[None]:
    """Force the op's implementation inside the context (tests, benchmarks)."""
    global _impl
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {name!r}; use one of {IMPLEMENTATIONS}")
    old, _impl = _impl, name
    try:
        yield
    finally:
        _impl = old


def current() -> str:
    return _impl


def tunings() -> Dict[str, autotune.Choice]:
    """Choices made by the autotuner in this process: cache key -> Choice."""
    with _lock:
        return dict(_tunings)


def _use_triton(q, k, v, spec: AttentionSpec, captured=()) -> bool:
    if _impl == "reference":
        return False
    why = kernels.unsupported_reason(q, k, v, spec, captured)
    if _impl == "triton":
        if why is not None:
            raise NotImplementedError(f"the Triton kernels cannot run this call: {why}")
        return True
    return q.is_cuda and why is None


# ---- config candidates -------------------------------------------------------------

_TMA_FWD = {(64, 64, 4, 3), (128, 128, 8, 3), (128, 64, 4, 2)}
# with a learned-bias plane (a third (M, N) tile per stage): 128x64 w8 s3 tma was
# its fastest forward (0.82-0.85 ms causal at 4x16x4096x128, runs 19-28); without
# it among the candidates the tuner's best was 1.03 ms (runs 84-85)
_TMA_FWD_PLANE = {(128, 64, 8, 3)}


def _configs(family: str, q, k, v, spec: AttentionSpec) -> List[KernelConfig]:
    D, Lq, Lk = q.shape[-1], q.shape[2], k.shape[2]
    causal = spec.mask_kind.startswith("causal")
    if os.environ.get("ATTN_COMPILER_AUTOTUNE", "").strip().lower() == "max":
        space = autotune.config_space(family, head_dim=D, dtype=q.dtype, lq=Lq, lk=Lk, causal=causal,
                                      hopper=False)
        return [c for c in space if c.variant != "tma"]
    # a learned-bias plane streams a (M, N) tile per stage beside K and V in the
    # forward: the smem rule drops tiles that would then only fail to launch
    plane_bytes = sum(getattr(torch, spec.captured[i].dtype).itemsize for i in codegen.tma_planes(spec))
    problem = autotune.Problem(D, q.dtype, Lq, Lk, causal, False, plane_bytes if family == "fwd" else 0)
    tiles = _SHORT[family] + [t for fam, lo, hi, more in _SHORT_BY_HEAD_DIM if fam == family and lo <= D <= hi
                               for t in more]
    out = [c for c in (KernelConfig(*t) for t in tiles)
           if autotune.first_failing_rule(family, c, problem) is None]
    if family == "decode":
        # the first tiles also with fewer, longer splits (1 or 2 programs per SM)
        out += [dataclasses.replace(c, per_sm=k) for c in out[:2] for k in (1, 2)]
    if family == "fwd" and kernels.is_hopper(q):
        # some tiles with K/V through tensor descriptors (TMA); a call they do not
        # suit raises and the tuner drops them.  With V asked for beside K
        # ([Note: V beside K] in the template) 128x128 w8 s3 tma is the fastest
        # forward at D=128 (4x16x4096x128: 538 TFLOP/s vs 513 for the pointer
        # tiles, causal 447 vs 443; 1x16x16384: 562 vs 520, bench/RESULTS.md run 81)
        tiles = _TMA_FWD | (_TMA_FWD_PLANE if codegen.tma_planes(spec) else set())
        out += [dataclasses.replace(c, variant="tma") for c in out
                if (c.block_m, c.block_n, c.num_warps, c.num_stages) in tiles]
    if family == "bwd":
        short = list(out)
        # the second tile's dK/dV with the first's dQ launch (64x64 w4 s2 +dQ
        # 128x64 w8 s3: 3.29 ms non-causal at 4x16x4096x128 vs 3.38 / 3.44 for
        # either tile alone; causal 2.12 vs 2.09, bench/RESULTS.md run 11)
        if len(short) >= 2:
            c = dataclasses.replace(short[1], dq=short[0].dq_launch())
            if autotune.first_failing_rule(family, c, problem) is None:
                out.append(c)
        # the same tiles with dK/dV and dQ in one launch
        out += [dataclasses.replace(c, variant="fused") for c in short[:2]]
        if spec.mask_kind.startswith("causal"):
            out += [dataclasses.replace(c, variant="paired") for c in short[:2]]
        if kernels.is_hopper(q) and codegen.tma_planes(spec):
            # and with a learned bias read through tensor descriptors
            tma = short[:2] + [KernelConfig(64, 128, 8, 2)]
            out += [dataclasses.replace(c, variant="tma") for c in tma
                    if autotune.first_failing_rule(family, c, problem) is None]
        elif kernels.is_hopper(q) and not causal and codegen.no_planes(spec):
            # Q, dO, K, V tiles through descriptors: 64x64 w4 s2 tma +dQ 128x64 w8 s3
            # was the fastest backward without a mask at D=128 (4x16x4096: 419 TFLOP/s
            # vs 410 for the best pointer tiles, 1x16x16384: 443 vs 427); under a
            # causal mask and at D=64 the pointer tiles won (bench/RESULTS.md run 82)
            out += [dataclasses.replace(c, variant="tma") for c in out[len(short):len(short) + 1]]
    return out or [kernels.default_config(family, q)]


@functools.lru_cache(maxsize=None)
def _file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def source_digest(spec: AttentionSpec, families, extra_files=()) -> str:
    """A hash of everything that decides what a tuning measured: the generated
    source of ``families`` for ``spec`` and the launchers (kernels.py, this
    module, ``extra_files``), so a cached choice never outlives the code."""
    h = hashlib.sha256()
    for fam in families:
        h.update(codegen.generate(fam, spec).digest.encode())
    for path in (kernels.__file__, __file__, *extra_files):
        h.update(_file_digest(path).encode())
    return h.hexdigest()[:20]


def _key(family: str, spec: AttentionSpec, q, k, v) -> str:
    families = ("bwd",) if family == "bwd" else ("fwd", "decode")
    B, Hq, Lq, D = q.shape
    bucket = autotune.shape_bucket(B, Hq, k.shape[1], Lq, k.shape[2], D, v.shape[-1], q.dtype)
    return autotune.make_key(family, source_digest(spec, families), bucket)


def graph_bench(fn) -> float:
    """Median ms of CUDA-graph replays of ``fn``: kernel time without the
    Python launch cost, which would otherwise decide between small kernels
    (a one-launch forward vs the two-launch split-KV decode).  Falls back to
    timing the launches when ``fn`` cannot be captured."""
    from triton.testing import do_bench, do_bench_cudagraph

    try:
        return do_bench_cudagraph(fn, rep=50, return_mode="median")
    except Exception:  # noqa: BLE001 - not capturable: time it the plain way
        return do_bench(fn, warmup=25, rep=100, return_mode="median")


def _choose(family: str, key: str, candidates: Dict[str, Callable[[], object]],
            configs: Dict[str, Optional[KernelConfig]], default: str) -> str:
    """The candidate name to run (tuned on CUDA, else ``default``)."""
    with _lock:
        hit = _tunings.get(key)
    if hit is not None and hit.name in candidates:
        return hit.name
    on_cuda = torch.cuda.is_available() and not os.environ.get("TRITON_INTERPRET") == "1"
    if not on_cuda:
        return default
    first: List[object] = []

    def check(name, result):
        if not first:
            first.append(result)
            return None
        a = result[0] if isinstance(result, (tuple, list)) else result
        b = first[0][0] if isinstance(first[0], (tuple, list)) else first[0]
        return disagreement(a, b)

    try:
        choice = autotune.tune(key, candidates, check=check, configs=configs, bench=graph_bench,
                               prepare=lambda: kernels.precompile(list(candidates.values())))
    except autotune.TuningUnavailable:
        return default
    with _lock:
        _tunings[key] = choice
    if not choice.from_cache:
        log.info("autotune %s: %s (%.3f ms)", key, choice.name, choice.times_ms.get(choice.name) or 0.0)
    return choice.name


# ---- entry points ---------------------------------------------------------------------

def _signature(family: str, spec: AttentionSpec, q, k, v, captured) -> tuple:
    """What decides a call's implementation and config: the spec, shapes,
    strides (the kernels index in int32 within a head: ``kernels.unsupported_reason``),
    dtypes, device and the forced implementation."""
    return (family, spec.dumps(), q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype,
            k.dtype, v.dtype, q.device, tuple((t.shape, t.stride()) for t in captured), _impl)


_picked: Dict[tuple, Tuple[Callable, Optional[KernelConfig]]] = {}
_MAX_PICKED = 4096
_REFERENCE = (None, None)     # in _picked: the call runs the PyTorch reference


def _runs_reference(sig: tuple, q, k, v, spec: AttentionSpec, captured) -> bool:
    """Whether a call runs the reference, decided once per signature (a call
    under "triton" that the kernels cannot run raises every time)."""
    hit = _picked.get(sig)
    if hit is not None:
        return hit is _REFERENCE
    if _use_triton(q, k, v, spec, captured):
        return False
    if len(_picked) >= _MAX_PICKED:
        _picked.clear()
    _picked[sig] = _REFERENCE
    return True


def _pick(family: str, sig: tuple, build: Callable[[], Tuple[dict, dict, str]]):
    """(kernel function, config) for a call signature: tuned once, then a dict lookup."""
    hit = _picked.get(sig)
    if hit is not None:
        return hit
    candidates, configs, default, key, fns = build()
    name = _choose(family, key, candidates, configs, default)
    hit = (fns[name], configs.get(name))
    if len(_picked) >= _MAX_PICKED:      # many distinct dynamic lengths: start over (tunings stay)
        _picked.clear()
    _picked[sig] = hit
    return hit


def _fallback(exc: Exception, fallback):
    if _impl == "triton":
        raise exc
    log.warning("Triton attention kernel failed (%s: %s); running the PyTorch reference",
                type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
    return fallback()


# [Note: CPU scalars beside CUDA operands]  Under ``dynamic=True`` dynamo
# passes a module's float attribute (HF's ``self.scaling``, timm's
# ``self.scale``) as a 0-d CPU tensor read with ``.item()``; a site scaled by
# it captures that tensor, so a CUDA call gets a one-element CPU tensor among
# its captured ones.  The kernels read captured tensors through pointers: it
# is replaced by a CUDA tensor of the same value (read on the host: no sync),
# made by a fill on every call.  Not kept between calls: a tensor made while
# CUDA-graph trees warm up or record lives in their private memory pool, whose
# addresses graphs recorded earlier may write when replayed; a fill per call
# is an ordinary intermediate there (its value fixed in the recording, as
# inductor fixes such a scalar in its own kernels' arguments).  The rewrite
# admits only one-element CPU tensors that need no gradient (passes/rewrite.py).


def _on_device(q: torch.Tensor, captured):
    """``captured`` with one-element tensors on another device than ``q``
    replaced by device copies ([Note: CPU scalars beside CUDA operands])."""
    if not any(t.device != q.device for t in captured):
        return captured
    out = []
    for t in captured:
        if t.device != q.device:
            if t.numel() != 1 or t.requires_grad:
                raise ValueError(f"a captured tensor of shape {tuple(t.shape)} on {t.device}, the queries on "
                                 f"{q.device}: only a one-element scalar without gradient may differ")
            t = torch.full(t.shape, t.item(), dtype=t.dtype, device=q.device)
        out.append(t)
    return out


def _other_gpu(q: torch.Tensor) -> bool:
    """Whether ``q`` is on a GPU other than the current one (a model split over
    GPUs, ``device_map="auto"``): Triton launches, CUDA graphs and timing run on
    the current device, so the call runs under a guard for ``q``'s."""
    return q.is_cuda and q.get_device() != torch.cuda.current_device()


def forward(q, k, v, captured, spec: AttentionSpec, seed) -> Tuple[torch.Tensor, torch.Tensor]:
    if _other_gpu(q):
        with torch.cuda.device(q.device):
            return forward(q, k, v, captured, spec, seed)
    captured = _on_device(q, captured)
    sig = _signature("fwd", spec, q, k, v, captured)
    if _runs_reference(sig, q, k, v, spec, captured):
        return reference.attention_forward(q, k, v, captured, spec, seed)

    def build():
        candidates, configs, fns = {}, {}, {}
        families = [("fwd", kernels.forward)]
        if kernels.decode_applies(q, k, spec):
            families.append(("decode", kernels.decode))
        for fam, fn in families:
            for c in _configs(fam, q, k, v, spec):
                name = f"{fam} {c}"
                candidates[name] = functools.partial(fn, q, k, v, captured, spec, seed, c)
                configs[name], fns[name] = c, fn
        c = kernels.default_config("fwd", q)
        default = f"fwd {c}"
        if default not in candidates:
            candidates[default] = functools.partial(kernels.forward, q, k, v, captured, spec, seed, c)
            configs[default], fns[default] = c, kernels.forward
        return candidates, configs, default, _key("fwd", spec, q, k, v), fns

    try:
        fn, cfg = _pick("fwd", sig, build)
        return fn(q, k, v, captured, spec, seed, cfg)
    except Exception as exc:  # noqa: BLE001 - never fail the user's model under "auto"
        return _fallback(exc, lambda: reference.attention_forward(q, k, v, captured, spec, seed))


def backward(dout, q, k, v, captured, out, lse, spec: AttentionSpec, seed, dlse=None):
    if _other_gpu(q):
        with torch.cuda.device(q.device):
            return backward(dout, q, k, v, captured, out, lse, spec, seed, dlse)
    captured = _on_device(q, captured)
    sig = _signature("bwd", spec, q, k, v, captured)
    if _runs_reference(sig, q, k, v, spec, captured):
        return reference.attention_backward(dout, q, k, v, captured, out, lse, spec, seed, dlse)

    def build():
        candidates, configs, fns = {}, {}, {}
        cs = _configs("bwd", q, k, v, spec)
        c0 = kernels.default_config("bwd", q)
        for c in cs + ([c0] if c0 not in cs else []):
            name = f"bwd {c}"
            candidates[name] = functools.partial(kernels.backward, dout, q, k, v, captured, out, lse, spec, seed, c)
            configs[name], fns[name] = c, kernels.backward
        return candidates, configs, f"bwd {c0}", _key("bwd", spec, q, k, v), fns

    try:
        fn, cfg = _pick("bwd", sig, build)
        return fn(dout, q, k, v, captured, out, lse, spec, seed, cfg, dlse=dlse)
    except Exception as exc:  # noqa: BLE001
        return _fallback(exc, lambda: reference.attention_backward(dout, q, k, v, captured, out, lse, spec, seed,
                                                                   dlse))
