"""templates/codegen.py: the sympy -> Triton printer, template filling, the
on-disk kernel cache and the mask facts the launchers read.

The printer's reference semantics are ``passes.analyze.torch_eval.evaluate``
(what the blockwise reference runs): each printed expression is evaluated by
a one-program probe kernel over a 16 x 16 tile (q_idx down, kv_idx across,
score and t0 from a grid holding zeros, integers and fractions) and compared
with ``evaluate`` on the same tile.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import sys

import pytest
import sympy
import torch

from attn_compiler.passes.analyze import torch_eval
from attn_compiler.passes.analyze.spec import (
    D, Lk, Lq, AttentionSpec, CapturedTensor, b, captured, captured_call, h, kv_idx, q_idx, score)
from attn_compiler.templates import codegen
from attn_compiler.templates.codegen import Band, TritonPrinter, Unsupported
from attn_compiler.autotune import KernelConfig
from kernel_checks import DEVICE, check_forward, qkv

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::RuntimeWarning")   # numpy inside Triton's interpreter

oo = sympy.oo
T0 = captured_call(0)
N = 16                                    # probe tile: N x N
ENV_SCALARS = dict(b=1, h=2, Lq=13, Lk=11, D=24)


# ---- the probe kernel -----------------------------------------------------------------

_PROBE = '''
import triton
import triton.language as tl


@triton.jit
def probe(S, T0, Out, off_b, off_h, Lq, Lk, N: tl.constexpr, HEAD_D: tl.constexpr):
    q_idx = tl.arange(0, N)[:, None]
    kv_idx = tl.arange(0, N)[None, :]
    tile = q_idx * N + kv_idx
    score = tl.load(S + tile)
    t0 = tl.load(T0 + tile)
    value = {expr}
    tl.store(Out + tile, tl.zeros([N, N], dtype=tl.float32) + value)
'''


def _grid(seed_shift: float) -> torch.Tensor:
    """(N, N) float32: quarter steps over [-4, 4) (exact zeros, integers, halves)
    then a few irregular values."""
    x = torch.arange(N * N, dtype=torch.float32).view(N, N) / 32.0 - 4.0 + seed_shift
    x[0, :4] = torch.tensor([0.0, -0.0, 1e-3, -7.3])
    return x


SCORE, T0_GRID = _grid(0.0), _grid(0.25).flip(1)


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("probes")


def _run_probe(text: str, folder) -> torch.Tensor:
    name = f"attn_compiler_test_probe_{abs(hash(text)) % 10**12}"
    path = folder / f"{name}.py"
    path.write_text(_PROBE.format(expr=text))
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod               # triton's jit looks functions up by module
    spec.loader.exec_module(mod)
    out = torch.empty(N, N, device=DEVICE)
    e = ENV_SCALARS
    mod.probe[(1,)](SCORE.to(DEVICE), T0_GRID.to(DEVICE), out, e["b"], e["h"], e["Lq"], e["Lk"], N=N,
                    HEAD_D=e["D"])
    return out.cpu()


def _reference(expr) -> torch.Tensor:
    env = dict(ENV_SCALARS, score=SCORE, t0=T0_GRID, q_idx=torch.arange(N).view(N, 1),
               kv_idx=torch.arange(N).view(1, N))
    return torch.broadcast_to(torch_eval.evaluate(expr, env), (N, N)).to(torch.float32)


def _half_pos(x):
    return sympy.Abs(x) + sympy.Rational(1, 2)


PRINTER_CASES = {
    # arithmetic
    "add": score + q_idx + 1.5,
    "add_integers": kv_idx - q_idx + 3,
    "mul": sympy.Float(0.5) * score * kv_idx,
    "mul_divide": score / (kv_idx + 1),
    "pi": sympy.pi * score,
    # powers
    "sqrt": sympy.sqrt(kv_idx + 1),
    "rsqrt": score / sympy.sqrt(kv_idx + 1),
    "reciprocal": 1 / score,                         # 1/±0 = ±inf on both sides
    "int_power": score ** 3,
    "int_power_of_index": (kv_idx - q_idx) ** 2,
    "negative_int_power": score ** -2,
    "general_power": sympy.Abs(score) ** sympy.Float(1.5),
    "symbolic_exponent": (kv_idx + 1) ** (score / 4),
    # elementary functions
    "exp": sympy.exp(score / 2),
    "log": sympy.log(sympy.Abs(score)),              # log 0 = -inf
    "tanh": 3 * sympy.tanh(score / 3),
    "sin": sympy.sin(score),
    "cos": sympy.cos(score),
    "abs": sympy.Abs(score - 1),
    "sign": sympy.sign(score),
    "floor": sympy.floor(score),
    "ceiling": sympy.ceiling(score),
    "floor_of_index_ratio": sympy.floor((kv_idx + q_idx) / 4),
    # Mod: the sign of the divisor, integer and float
    "mod_int": sympy.Mod(kv_idx - q_idx, 3),
    "mod_int_negative_divisor": sympy.Mod(kv_idx - q_idx, -3),
    "mod_float": sympy.Mod(score, 1.5),
    "mod_float_negative_divisor": sympy.Mod(score, -1.5),
    "max": sympy.Max(score, sympy.Float(0.5), kv_idx / 4),
    "min_mixed": sympy.Min(score, q_idx - kv_idx),
    "max_int": sympy.Max(kv_idx, q_idx),
    "heaviside": sympy.Heaviside(score),
    "heaviside_h0": sympy.Heaviside(score, 1),
    # relations and logic (0/1 in the probe's float sum)
    "eq": sympy.Eq(kv_idx, q_idx),
    "ne": sympy.Ne(kv_idx, q_idx + 1),
    "lt": score < kv_idx - 8,
    "le": kv_idx <= q_idx,
    "gt": score > 0.5,
    "ge": q_idx - kv_idx >= 3,
    "and": sympy.And(kv_idx <= q_idx, score > 0),
    "or": sympy.Or(kv_idx > q_idx + 2, score < -1),
    "not": sympy.Not(sympy.And(kv_idx <= q_idx, score > 0)),
    # Piecewise: from the last piece, -oo exact, no True branch -> nan
    "piecewise_neginf": sympy.Piecewise((score, kv_idx <= q_idx), (-oo, True)),
    "piecewise_no_true_branch": sympy.Piecewise((score, kv_idx <= q_idx)),
    "piecewise_three_pieces": sympy.Piecewise((score, kv_idx < q_idx), (2 * score, sympy.Eq(kv_idx, q_idx)),
                                              (-oo, True)),
    "piecewise_of_indices": sympy.Piecewise((kv_idx, kv_idx < q_idx), (q_idx, True)),
    # every symbol, and a captured tensor
    "symbols": score + b + 2 * h + Lq - Lk + D,
    "index_vs_size": sympy.Piecewise((score, kv_idx < Lk - Lq + q_idx), (-oo, True)),
    "captured": score * T0 + T0,
    "captured_in_mask": sympy.Piecewise((score, T0 > 0), (sympy.Float(-1e9), True)),
    # constant sub-expressions print as their values (DeBERTa-v2's sqrt(6) scale,
    # MPT's ALiBi slopes 2 ** (-2 h - 2), a power of another constant base)
    "constant_sqrt": sympy.sqrt(6) * score / 12,
    "constant_log": sympy.log(2) * score + sympy.pi,
    "power_of_two": 2 ** (-2 * h - 2) * (kv_idx - 8) + score,
    "power_of_constant": 3 ** (h / 4) * score,
}


@pytest.mark.parametrize("name", list(PRINTER_CASES))
def test_printer_matches_torch_eval(name, probe_dir):
    expr = PRINTER_CASES[name]
    text = TritonPrinter()(expr)
    ours = _run_probe(text, probe_dir)
    want = _reference(expr)
    assert torch.equal(torch.isnan(ours), torch.isnan(want)), text
    torch.testing.assert_close(ours, want, rtol=2e-6, atol=1e-6, equal_nan=True, msg=lambda m: f"{text}\n{m}")


def test_printer_tanh_forms():
    """float32 specs call the common template's _tanh_f32 (accurate near 0, see
    the fp32 softcap kernel test); specs whose eager scores are bfloat16
    (score_dtype) _tanh_bf16 (the hardware's tanh on a GPU); bfloat16 outputs
    of scores upcast to float32 and float16 specs print 2·sigmoid(2x) - 1."""
    assert "tl.sigmoid" in TritonPrinter()(sympy.tanh(score))
    assert TritonPrinter(precise_tanh=True)(sympy.tanh(score)) == "_tanh_f32(score)"
    assert TritonPrinter(fast_tanh=True)(sympy.tanh(score)) == "_tanh_bf16(score)"
    assert TritonPrinter(precise_tanh=True, fast_tanh=True)(sympy.tanh(score)) == "_tanh_f32(score)"
    mod = 30 * sympy.tanh(score / 30)
    bf16 = dict(out_dtype="bfloat16", prob_dtype="bfloat16")
    fp32 = codegen.generate("fwd", _spec(mod, out_dtype="float32", prob_dtype="float32")).source
    fast = codegen.generate("fwd", _spec(mod, score_dtype="bfloat16", **bf16)).source
    fp16 = codegen.generate("fwd", _spec(mod, out_dtype="float16", prob_dtype="float16",
                                         score_dtype="float16")).source
    upcast = codegen.generate("fwd", _spec(mod, score_dtype="float32", **bf16)).source
    assert fp32.count("_tanh_f32(") > 1 and fp32.count("_tanh_bf16(") == 1   # called / only defined
    assert fast.count("_tanh_bf16(") > 1 and fast.count("_tanh_f32(") == 1
    for src in (fp16, upcast):
        assert src.count("_tanh_bf16(") == 1 and src.count("_tanh_f32(") == 1
        assert src.count("tl.sigmoid(") > 1            # the template's own fallback is one
    assert "tanh.approx.f32" in fast


def test_printer_keeps_index_arithmetic_integer():
    p = TritonPrinter()
    assert "." not in p(kv_idx - q_idx + 3)
    assert p(sympy.Mod(kv_idx, 4)) == "(((kv_idx) % (4) + (4)) % (4))"
    assert p(sympy.floor(kv_idx)) == "kv_idx"          # floor of an integer is itself
    assert p(sympy.true) == "1" and p(sympy.false) == "0"
    assert p(-oo) == 'float("-inf")'


def test_printer_renames_symbols():
    assert TritonPrinter({"score": "s", "q_idx": "rows"})(score + q_idx) in ("(s + rows)", "(rows + s)")


@pytest.mark.parametrize("expr, match", [
    (score + sympy.Symbol("foo"), "unknown symbol foo"),
    (captured(0)(b, h, q_idx + 1, kv_idx), "shifted"),
    (sympy.erf(score), "erf"),
    (score + sympy.I, "ImaginaryUnit|non-real"),
], ids=["unknown_symbol", "shifted_captured_read", "unsupported_function", "complex_constant"])
def test_printer_unsupported(expr, match):
    with pytest.raises(Unsupported, match=match):
        TritonPrinter()(expr)


# ---- specs --------------------------------------------------------------------------

def _spec(mod, captured=(), **kw) -> AttentionSpec:
    return AttentionSpec(score_mod=mod, scale=1 / sympy.sqrt(D), captured=tuple(captured), **kw)


CAUSAL = sympy.Piecewise((score, kv_idx <= q_idx), (-oo, True))
BIAS_GRAD = CapturedTensor((False, True, True, True), "float32", True)


def test_unsupported_reason():
    assert codegen.unsupported_reason(_spec(CAUSAL)) is None
    why = codegen.unsupported_reason(_spec(CAUSAL, softmax_dtype="float64"))
    assert why is not None and "float64" in why
    why = codegen.unsupported_reason(_spec(sympy.erf(score)))
    assert why is not None and "erf" in why


@pytest.mark.parametrize("family", codegen.FAMILIES)
def test_generate_fills_every_hook_and_names_the_spec(family):
    spec = _spec(CAUSAL + captured_call(0), captured=[BIAS_GRAD], dropout_p=0.1)
    gen = codegen.generate(family, spec)
    assert gen.family == family and "{{" not in gen.source and "}}" not in gen.source
    header = gen.source[:gen.source.index("import triton")]
    assert spec.dumps() in header
    compile(gen.source, f"<{family}>", "exec")      # valid Python
    kernel = {"fwd": "def attention_fwd(", "bwd": "def attention_bwd_dq(", "decode": "def attention_decode_split("}
    assert kernel[family] in gen.source


def test_generate_is_deterministic_and_spec_dependent():
    spec = _spec(CAUSAL)
    first = codegen.generate("fwd", spec)
    codegen._generate.cache_clear()                   # regenerate from scratch
    again = codegen.generate("fwd", AttentionSpec.loads(spec.dumps()))
    assert again.source == first.source and again.digest == first.digest
    other = codegen.generate("fwd", _spec(sympy.Piecewise((score, kv_idx <= q_idx + 1), (-oo, True))))
    assert other.source != first.source and other.digest != first.digest
    assert codegen.generate("bwd", spec).digest != first.digest


def test_generate_unknown_family():
    with pytest.raises(ValueError, match="unknown kernel family"):
        codegen.generate("fwdd", _spec(score))


def test_fill_reports_missing_hooks():
    assert codegen.fill("a {{X}} b\n    {{Y}}\n", {"X": 1, "Y": ["p", "q"]}) == "a 1 b\n    p\n    q\n"
    with pytest.raises(KeyError):
        codegen.fill("{{MISSING}}", {})


# ---- the on-disk cache --------------------------------------------------------------------

@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """Kernels written under tmp_path; nothing loaded in this process counts."""
    monkeypatch.setenv("ATTN_COMPILER_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(codegen, "_modules", {})
    monkeypatch.setattr(codegen, "_by_spec", {})
    return tmp_path / "kernels"


def _module_path(folder, family, spec):
    return folder / f"attn_compiler_gen_{family}_{codegen.generate(family, spec).digest}.py"


def test_load_writes_into_the_cache_dir(fresh_cache):
    spec = _spec(CAUSAL)
    assert codegen.cache_dir() == fresh_cache
    mod = codegen.load("fwd", spec)
    path = _module_path(fresh_cache, "fwd", spec)
    assert path.read_text() == codegen.generate("fwd", spec).source
    assert hasattr(mod, "attention_fwd") and hasattr(mod, "attention_block_kinds")
    assert codegen.load("fwd", spec) is mod                   # in memory after the first load
    assert not list(fresh_cache.glob("*.tmp"))                # the atomic write left nothing behind


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_load_rewrites_a_corrupt_file(fresh_cache, damage):
    spec = _spec(sympy.Piecewise((score, kv_idx <= q_idx), (sympy.Float(-1e9), True)))
    path = _module_path(fresh_cache, "decode", spec)
    source = codegen.generate("decode", spec).source
    fresh_cache.mkdir(parents=True)
    path.write_text({"garbage": "def broken(:\n", "truncated": source[: len(source) // 2],
                     "empty": ""}[damage])
    mod = codegen.load("decode", spec)
    assert path.read_text() == source and hasattr(mod, "attention_decode_reduce")


# ---- mask facts -------------------------------------------------------------------------

@pytest.mark.parametrize("mod, band, at", [
    (CAUSAL, Band(None, 0), (None, 0)),
    (sympy.Piecewise((score, kv_idx <= q_idx + Lk - Lq), (-oo, True)), Band(None, Lk - Lq), (None, 32)),
    (sympy.Piecewise((score, (kv_idx <= q_idx) & (q_idx - kv_idx < 8)), (-oo, True)), Band(-7, 0), (-7, 0)),
    (sympy.Piecewise((-oo, (kv_idx > q_idx) | (q_idx - kv_idx >= 8)), (score, True)), Band(-7, 0), (-7, 0)),
    (score, None, None),
    (3 * sympy.tanh(score / 3), None, None),
    (sympy.Piecewise((score, sympy.Ne(T0, 0)), (-oo, True)), None, None),           # a tensor mask
    (sympy.Piecewise((score, sympy.Mod(kv_idx, Lk) <= q_idx), (-oo, True)), None, None),
], ids=["causal", "offset_causal", "window", "window_as_negation", "none", "softcap", "tensor", "mod"])
def test_band_of(mod, band, at):
    caps = [CapturedTensor((True, False, False, True), "bool")] if mod.has(T0) else []
    got = codegen.band_of(_spec(mod, caps))
    if band is None:
        assert got is None
        return
    assert sympy.simplify(got.lo - band.lo) == 0 if band.lo is not None else got.lo is None
    assert sympy.simplify(got.hi - band.hi) == 0
    assert got.at(21, 53) == at


@pytest.mark.parametrize("mod, finite", [
    (sympy.Piecewise((score, kv_idx <= q_idx), (sympy.Float(float(torch.finfo(torch.float32).min)), True)), True),
    (sympy.Piecewise((score, kv_idx <= q_idx), (sympy.Float(-1e9), True)), True),
    (sympy.Piecewise((score, kv_idx <= q_idx), (sympy.Float(-1e4), True)), True),     # the threshold itself
    (sympy.Piecewise((score, kv_idx <= q_idx), (-oo, True)), False),
    (sympy.Piecewise((score, kv_idx <= q_idx), (sympy.Float(-100.0), True)), False),  # a bias, not a mask
    (score, False),
    (score + T0, False),          # the fill is in the tensor: invisible here
], ids=["finfo_min", "-1e9", "-1e4", "-inf", "-100", "none", "additive_tensor"])
def test_has_finite_fill(mod, finite):
    caps = [CapturedTensor((True, False, False, True), "float32")] if mod.has(T0) else []
    assert _spec(mod, caps).has_finite_fill is finite


def test_spec_text_round_trip_keeps_the_kernel():
    spec = dataclasses.replace(_spec(CAUSAL), dropout_p=0.25)
    assert codegen.generate("fwd", AttentionSpec.loads(spec.dumps())).digest == codegen.generate("fwd", spec).digest
    assert math.isclose(codegen._Hooks(spec).threshold(), 0.25 * 2 ** 32)


def test_templates_cli_prints_a_kernel(capsys):
    """``python -m attn_compiler.templates`` prints the generated source of a spec."""
    from attn_compiler.templates.__main__ import main

    assert main(["--mask", "causal", "--softcap", "30", "--family", "bwd"]) == 0
    src = capsys.readouterr().out
    assert "def attention_bwd_dkdv" in src and "tl.sigmoid" in src and "Notation" in src
    assert main(["--mask", "window:8", "--bias"]) == 0
    assert "def attention_fwd" in capsys.readouterr().out
    assert main(["--mask", "sideways"]) == 2
    assert "unknown mask" in capsys.readouterr().err


def _walk(source: str, func: str, loop: str) -> tuple[str, str]:
    """(code before the block loop, the loop's body) of a generated block function."""
    body = source[source.index(f"def {func}("):]
    body = body[:body.index("\n\n\n")]
    i = body.index(loop)
    return body[:i], body[i:]


def test_walk_invariant_tensors_load_once_per_walk():
    """A per-head slope (ALiBi) is read once before the KV walk, not per tile;
    a learned bias (q and k axes) per tile; in dK/dV (walking queries) a key
    padding mask is the invariant one."""
    slope = CapturedTensor((False, True, False, False), "float32")
    alibi = _spec(sympy.Piecewise((score + captured_call(0) * (kv_idx - q_idx), kv_idx <= q_idx), (-oo, True)),
                  captured=[slope])
    before, loop = _walk(codegen.generate("fwd", alibi).source, "_fwd_blocks", "for start_n in range")
    assert "t0 = tl.load(T0" in before and "t0 = tl.load(" not in loop
    before, loop = _walk(codegen.generate("fwd", _spec(CAUSAL + captured_call(0), captured=[BIAS_GRAD])).source,
                         "_fwd_blocks", "for start_n in range")
    assert "t0 = " not in before and "t0 = tl.load(" in loop and "T0.load([TILE0, start_n])" in loop
    pad = CapturedTensor((True, False, False, True), "bool")
    padded = _spec(sympy.Piecewise((score, sympy.Ne(captured_call(0), 0)), (-oo, True)), captured=[pad])
    before, loop = _walk(codegen.generate("bwd", padded).source, "_dkdv_blocks", "for start_m in range")
    assert "t0 = tl.load(T0" in before and "t0 = tl.load(" not in loop
    before, loop = _walk(codegen.generate("bwd", padded).source, "_dq_blocks", "for start_n in range")
    assert "t0 = " not in before and "t0 = tl.load(" in loop


def test_finite_fill_scores_stay_in_natural_units():
    """[Note: finite fills]: with a float tensor added to the score (an HF
    additive mask may hold finfo.min) z2 is z, exponentiated as (z2 - m)·log2 e;
    without one, z2 = z·log2 e and no per-score clamp exists either way."""
    fills = codegen.generate("fwd", _spec(score + captured_call(0), captured=[BIAS_GRAD])).source
    plain = codegen.generate("fwd", _spec(sympy.tanh(score))).source
    assert "z2 = z\n" in fills and "FINITE_FILL = tl.constexpr(True)" in fills
    assert "z2 = z * 1.44" in plain and "FINITE_FILL = tl.constexpr(False)" in plain
    assert "tl.maximum(z *" not in fills + plain


def test_raw_full_tiles_only_for_positive_scale_without_score_mod():
    """[Note: scaled after the max]: specs that only mask (or do nothing to)
    a positively scaled score take the row max of qk in FULL tiles; a score
    modification, a finite fill or a scale that may be negative do not; and
    the kernels agree with the golden for both kinds (a negative scale)."""
    def raw(spec):
        return "RAW_FULL = tl.constexpr(True)" in codegen.generate("fwd", spec).source
    assert raw(_spec(score)) and raw(_spec(CAUSAL))
    assert not raw(_spec(sympy.tanh(score)))
    assert not raw(_spec(score + captured_call(0), captured=[BIAS_GRAD]))
    negative = AttentionSpec(score_mod=CAUSAL, scale=-1 / sympy.sqrt(D))
    assert not raw(negative)
    q, k, v = qkv(Lq=37, Lk=45, seed=5)
    for spec in (_spec(CAUSAL), negative):
        check_forward(q, k, v, [], spec, config=KernelConfig(16, 16, 4, 1))
