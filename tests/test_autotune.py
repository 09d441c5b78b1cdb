"""The autotuner: config spaces and their named prune rules, shape buckets, the
persistent cache (corrupt files, two processes writing at once) and ``tune``."""
import dataclasses
import json
import logging
import multiprocessing

import pytest
import torch

from attn_compiler import autotune
from attn_compiler.autotune import (
    Choice,
    KernelConfig,
    ShapeBucket,
    TuneCache,
    TuneKey,
    TuningUnavailable,
    config_space,
    default_config,
    make_key,
    pruned_configs,
    shape_bucket,
    tune,
)

PROBLEM = {"head_dim": 64, "dtype": torch.bfloat16, "lq": 1024, "lk": 1024, "causal": False, "hopper": False}


@pytest.fixture(autouse=True)
def _tuning_on(monkeypatch, tmp_path):
    """Tuning enabled, and the default cache in a temporary folder."""
    monkeypatch.delenv("ATTN_COMPILER_AUTOTUNE", raising=False)
    monkeypatch.setenv("ATTN_COMPILER_CACHE_DIR", str(tmp_path / "default-cache"))


# ---------------------------------------------------------------------------
# configs


def test_config_is_frozen_hashable_and_round_trips():
    cfg = KernelConfig(128, 64, 8, 3)
    assert str(cfg) == "128x64 w8 s3 ptr"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.block_m = 64
    assert len({cfg, KernelConfig(128, 64, 8, 3), KernelConfig(128, 64, 8, 3, "tma")}) == 2
    assert KernelConfig.from_dict(cfg.as_dict()) == cfg
    assert json.loads(json.dumps(cfg.as_dict())) == cfg.as_dict()


def test_config_with_its_own_dq_tile():
    """A backward config may give its dQ launch its own tile; the default is the
    mirror of the main tile.  It round-trips through the cache's JSON (a list)."""
    plain = KernelConfig(64, 128, 8, 3)
    assert plain.dq_launch() == (128, 64, 8, 3) and plain.dq_as_tile() == KernelConfig(64, 128, 8, 3)
    cfg = KernelConfig(64, 64, 4, 2, dq=(128, 64, 8, 3))
    assert str(cfg) == "64x64 w4 s2 ptr +dQ 128x64 w8 s3"
    assert cfg.dq_launch() == (128, 64, 8, 3) and cfg.dq_as_tile() == KernelConfig(64, 128, 8, 3)
    assert KernelConfig.from_dict(json.loads(json.dumps(cfg.as_dict()))) == cfg
    assert "dq" not in plain.as_dict()           # the cache's entries as before
    assert len({cfg, KernelConfig(64, 64, 4, 2, dq=[128, 64, 8, 3]), KernelConfig(64, 64, 4, 2)}) == 2
    for bad, message in [((128, 64, 8), "dq must be"), ((128, 48, 8, 3), "block_n"), ((128, 64, 3, 3), "num_warps")]:
        with pytest.raises(ValueError, match=message):
            KernelConfig(64, 64, 4, 2, dq=bad)
    with pytest.raises(ValueError, match="mirrored tile"):
        KernelConfig(64, 64, 4, 2, "fused", dq=(128, 64, 8, 3))


def test_decode_config_with_its_programs_per_sm():
    """A decode config may set the program slots per multiprocessor its split
    count fills; it round-trips through the cache's JSON and is omitted there
    when unset (older entries load unchanged)."""
    cfg = KernelConfig(16, 128, 4, 3, per_sm=1)
    assert str(cfg) == "16x128 w4 s3 ptr 1/SM"
    assert KernelConfig.from_dict(json.loads(json.dumps(cfg.as_dict()))) == cfg
    assert "per_sm" not in KernelConfig(16, 128, 4, 3).as_dict()
    assert cfg != KernelConfig(16, 128, 4, 3)
    for bad in (-1, 33, 1.5):
        with pytest.raises(ValueError, match="per_sm"):
            KernelConfig(16, 128, 4, 3, per_sm=bad)


def test_dq_tile_is_pruned_by_the_same_rules():
    """The rules see the dQ tile as a config of its own ("dq_" + the rule's name)."""
    p = autotune.Problem(128, torch.float32, 1024, 1024, False, False)
    fits = KernelConfig(32, 32, 4, 1)
    assert autotune.first_failing_rule("bwd", fits, p) is None
    assert autotune.first_failing_rule("bwd", KernelConfig(32, 32, 4, 1, dq=(128, 128, 8, 3)), p) == "dq_smem"
    short_keys = autotune.Problem(64, torch.bfloat16, 1024, 16, False, False)
    assert autotune.first_failing_rule("bwd", fits, short_keys) is None
    assert autotune.first_failing_rule("bwd", KernelConfig(32, 32, 4, 1, dq=(128, 32, 4, 1)), short_keys) \
        == "dq_block_n_over_lk"


GOOD = {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 2}


@pytest.mark.parametrize("fields, message", [
    ({**GOOD, "block_m": 48}, "block_m"),
    ({**GOOD, "block_n": 8}, "block_n"),
    ({**GOOD, "num_warps": 3}, "num_warps"),
    ({**GOOD, "num_stages": 0}, "num_stages"),
    ({**GOOD, "variant": "wgmma"}, "variant"),
    ({**GOOD, "stages": 2}, "unknown"),
])
def test_bad_config_is_rejected(fields, message):
    with pytest.raises(ValueError, match=message):
        KernelConfig.from_dict(fields)


@pytest.mark.parametrize("family", autotune.FAMILIES)
@pytest.mark.parametrize("head_dim", [64, 80, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hopper", [False, True])
def test_spaces_are_nonempty_and_split_the_full_space(family, head_dim, dtype, hopper):
    problem = dict(PROBLEM, head_dim=head_dim, dtype=dtype, hopper=hopper, causal=True)
    kept = config_space(family, **problem)
    dropped = pruned_configs(family, **problem)
    assert kept and not set(kept) & set(dropped)
    assert len(set(kept)) == len(kept)
    names = {name for name, _ in autotune.PRUNE_RULES[family]}
    assert set(dropped.values()) <= names


def test_fwd_space_axes():
    space = config_space("fwd", **PROBLEM)
    assert {c.block_m for c in space} == {64, 128}
    assert {c.block_n for c in space} == {32, 64, 128}
    assert {c.num_warps for c in space} == {4, 8}
    assert {c.num_stages for c in space} == {2, 3, 4}
    assert {c.variant for c in space} == {"ptr"}
    assert {c.variant for c in config_space("fwd", **dict(PROBLEM, hopper=True))} == {"ptr", "tma"}


def _dropped_by(family, rule, **changes):
    return {c for c, r in pruned_configs(family, **dict(PROBLEM, **changes)).items() if r == rule}


def test_rule_block_m_over_lq():
    dropped = _dropped_by("fwd", "block_m_over_lq", lq=40)  # next_pow2(40) = 64
    assert dropped and all(c.block_m == 128 for c in dropped)
    assert all(c.block_m == 64 for c in config_space("fwd", **dict(PROBLEM, lq=40)))
    assert {c.block_m for c in config_space("fwd", **dict(PROBLEM, lq=1))} == {64}  # smallest M stays
    assert not _dropped_by("fwd", "block_m_over_lq", lq=65)
    assert {c.block_m for c in _dropped_by("bwd", "block_m_over_lq", lq=20)} == {64, 128}


def test_rule_block_n_over_lk():
    assert {c.block_n for c in _dropped_by("fwd", "block_n_over_lk", lk=33)} == {128}
    assert {c.block_n for c in _dropped_by("decode", "block_n_over_lk", lk=20)} == {64, 128, 256}
    assert {c.block_n for c in config_space("decode", **dict(PROBLEM, lk=20))} == {32}


def test_rule_causal_wide_n():
    dropped = _dropped_by("fwd", "causal_wide_n", causal=True)
    assert dropped == {c for c in autotune._full_space("fwd", False) if c.block_n > c.block_m}
    assert not _dropped_by("fwd", "causal_wide_n", causal=False)


def test_rule_hopper_8warps_small_tile():
    dropped = _dropped_by("fwd", "hopper_8warps_small_tile", hopper=True)
    assert dropped and all(c.num_warps == 8 and c.block_m * c.block_n < 128 * 128 for c in dropped)
    eights = {c for c in config_space("fwd", **dict(PROBLEM, hopper=True)) if c.num_warps == 8}
    assert eights and all((c.block_m, c.block_n) == (128, 128) for c in eights)
    assert not _dropped_by("fwd", "hopper_8warps_small_tile", hopper=False)


def test_rule_smem():
    # fp32, D=128: 128x128 with 4 stages needs (128*128 + 2*4*128*128)*4 bytes = 576 KiB
    assert KernelConfig(128, 128, 8, 4) in _dropped_by("fwd", "smem", head_dim=128, dtype=torch.float32)
    # D=64 bf16: the largest fwd tile, (128*64 + 2*4*128*64)*2 = 144 KiB, fits
    assert not _dropped_by("fwd", "smem")
    for c in config_space("bwd", **dict(PROBLEM, head_dim=128, dtype=torch.float32)):
        assert autotune._bwd_smem(c, autotune.Problem(128, torch.float32, 1024, 1024, False, False)) \
            <= autotune.SMEM_BYTES


def test_rule_big_head_dim():
    dropped = _dropped_by("fwd", "big_head_dim", head_dim=256)
    assert dropped
    for c in config_space("fwd", **dict(PROBLEM, head_dim=256)):
        assert c.block_m * c.block_n <= 64 * 64 * 2 and c.num_stages <= 2
    assert not _dropped_by("fwd", "big_head_dim", head_dim=128)


@pytest.mark.parametrize("head_dim", [192, 256])
def test_float32_over_128_wide_forward_fits(head_dim):
    """Float32 holds its Q tile twice (3xTF32's split operands): at head dims
    over 128 the forward's space keeps only one-stage tiles, every one within
    shared memory by the rule's count, and the untuned default among them."""
    f32 = dict(PROBLEM, head_dim=head_dim, dtype=torch.float32)
    space = config_space("fwd", **f32)
    assert space and {c.num_stages for c in space} == {1}
    assert default_config("fwd", head_dim, torch.float32) in space
    assert KernelConfig(64, 32, 4, 2) in _dropped_by("fwd", "smem", **f32)   # 256 KiB on sm_90


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rule_one_stage(head_dim, dtype):
    """A one-stage forward tile is in the space only where its two-stage twin
    does not fit: at head dim 64 never."""
    problem = dict(PROBLEM, head_dim=head_dim, dtype=dtype)
    p = autotune.Problem(head_dim, dtype, PROBLEM["lq"], PROBLEM["lk"], False, False)
    smem = dict(autotune.PRUNE_RULES["fwd"])["smem"]
    ones = [c for c in config_space("fwd", **problem) if c.num_stages == 1]
    assert all(smem(dataclasses.replace(c, num_stages=2), p) for c in ones)
    if head_dim == 64:
        assert not ones and _dropped_by("fwd", "one_stage", **problem)


def test_rule_decode_warps_over_tile():
    dropped = _dropped_by("decode", "warps_over_tile")
    assert KernelConfig(16, 32, 8, 2) in dropped and KernelConfig(16, 64, 8, 2) not in dropped


@pytest.mark.parametrize("family, head_dim, hopper, expected", [
    ("fwd", 64, False, "128x64 w4 s3 ptr"),
    ("fwd", 128, True, "128x64 w8 s3 ptr"),
    ("fwd", 128, False, "128x64 w4 s2 ptr"),
    ("fwd", 256, True, "64x32 w4 s2 ptr"),
    ("bwd", 64, False, "64x64 w4 s2 ptr"),
    ("bwd", 256, False, "32x32 w4 s1 ptr"),
    ("decode", 128, True, "16x128 w4 s3 ptr 1/SM"),
    ("decode", 256, True, "16x64 w4 s3 ptr"),
])
def test_default_config(family, head_dim, hopper, expected):
    assert str(default_config(family, head_dim, torch.bfloat16, False, hopper)) == expected


def test_default_config_float32_uses_small_tiles():
    assert str(default_config("fwd", 128, torch.float32, False, True)) == "64x32 w4 s2 ptr"
    assert str(default_config("bwd", 128, torch.float32)) == "32x32 w4 s1 ptr"


@pytest.mark.parametrize("family", autotune.FAMILIES)
@pytest.mark.parametrize("head_dim", [64, 80, 128, 256, 512])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_default_config_fits_shared_memory(family, head_dim, dtype):
    cfg = default_config(family, head_dim, dtype)
    problem = autotune.Problem(head_dim, dtype, 4096, 4096, False, True)
    assert autotune.first_failing_rule(family, cfg, problem) in (None, "big_head_dim")
    assert dict(autotune.PRUNE_RULES[family])["smem"](cfg, problem) is False


def test_unknown_family():
    with pytest.raises(ValueError, match="unknown kernel family 'sideways'"):
        config_space("sideways", **PROBLEM)


# ---------------------------------------------------------------------------
# buckets and keys


def test_shape_bucket():
    bf16 = torch.bfloat16
    assert shape_bucket(2, 8, 8, 1000, 1000, 64, 64, bf16) == shape_bucket(2, 8, 8, 1024, 1024, 64, 64, bf16)
    assert shape_bucket(2, 8, 8, 1025, 1024, 64, 64, bf16) != shape_bucket(2, 8, 8, 1024, 1024, 64, 64, bf16)
    assert shape_bucket(3, 8, 2, 1, 5, 80, 80, bf16) == ShapeBucket(32, 4, 16, 16, 80, 80, "bfloat16")
    assert shape_bucket(1, 8, 8, 64, 64, 64, 64, bf16) != shape_bucket(1, 8, 8, 64, 64, 64, 64, torch.float16)
    assert str(shape_bucket(1, 8, 1, 100, 4000, 128, 64, torch.float32)) == \
        "bh8 g8 lq128 lk4096 d128 dv64 float32"
    with pytest.raises(ValueError, match="multiple of Hkv"):
        shape_bucket(1, 6, 4, 8, 8, 64, 64, bf16)


def test_shape_bucket_float32_precision():
    """Float32 kernels multiply as PyTorch's float32 matmul precision says
    (kernels._dot_precision): TF32 allowed is another tuning (and another
    never-slower decision), 16-bit buckets do not change."""
    old = torch.get_float32_matmul_precision()
    strict = shape_bucket(1, 8, 1, 100, 4000, 128, 64, torch.float32)
    half = shape_bucket(1, 8, 1, 100, 4000, 128, 64, torch.bfloat16)
    try:
        torch.set_float32_matmul_precision("high")
        assert str(shape_bucket(1, 8, 1, 100, 4000, 128, 64, torch.float32)) == \
            "bh8 g8 lq128 lk4096 d128 dv64 float32-tf32"
        assert shape_bucket(1, 8, 1, 100, 4000, 128, 64, torch.bfloat16) == half
    finally:
        torch.set_float32_matmul_precision(old)
    assert shape_bucket(1, 8, 1, 100, 4000, 128, 64, torch.float32) == strict


def test_key_round_trip():
    bucket = shape_bucket(1, 8, 8, 64, 64, 64, 64, torch.bfloat16)
    key = make_key("fwd", "abc123", bucket, gpu="NVIDIA H200|x", triton="3.6.0")
    assert TuneKey.parse(key) == TuneKey("fwd", "abc123", str(bucket), "NVIDIA H200/x", "3.6.0")
    assert TuneKey.parse(make_key("bwd", "s", bucket)).gpu == autotune.gpu_name()


# ---------------------------------------------------------------------------
# cache

ENTRY = {"choice": "a", "config": KernelConfig(64, 64, 4, 2).as_dict(), "times_ms": {"a": 1.0, "b": None},
         "errors": {"b": "ValueError: no"}, "created": "2025-01-01T00:00:00+00:00"}


def test_cache_path_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTN_COMPILER_CACHE_DIR", str(tmp_path / "a"))
    assert TuneCache().path == tmp_path / "a" / "autotune.json"
    monkeypatch.delenv("ATTN_COMPILER_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert TuneCache().path == tmp_path / "xdg" / "attn_compiler" / "autotune.json"


def test_tuning_enabled(monkeypatch):
    assert autotune.tuning_enabled()
    for off in ("0", "false", "off"):
        monkeypatch.setenv("ATTN_COMPILER_AUTOTUNE", off)
        assert not autotune.tuning_enabled()


def test_cache_round_trip(tmp_path):
    path = tmp_path / "sub" / "autotune.json"
    cache = TuneCache(path)
    assert cache.get("k") is None and cache.entries() == {}
    cache.put("k", ENTRY)
    assert cache.get("k") == ENTRY
    assert TuneCache(path).get("k") == ENTRY  # a new reader sees the file
    assert json.loads(path.read_text())["version"] == autotune.CACHE_VERSION
    cache.get("k")["choice"] = "mutated"  # returned copies do not alias the cache
    assert cache.get("k")["choice"] == "a"
    cache.clear()
    assert cache.entries() == {} and not path.exists()


def test_cache_sees_other_writers(tmp_path):
    path = tmp_path / "autotune.json"
    reader, writer = TuneCache(path), TuneCache(path)
    assert reader.get("k") is None
    writer.put("k", ENTRY)
    assert reader.get("k") == ENTRY


@pytest.mark.parametrize("garbage", [
    b"{not json", b"\xff\xfe\x00", b"", b"[1, 2]", b'{"entries": []}',
    b'{"version": 999, "entries": {"k": {"choice": "a"}}}',
])
def test_corrupt_cache_is_tolerated(tmp_path, caplog, garbage):
    path = tmp_path / "autotune.json"
    path.write_bytes(garbage)
    cache = TuneCache(path)
    with caplog.at_level(logging.WARNING, logger="attn_compiler"):
        assert cache.get("k") is None
        assert cache.get("other") is None
    warnings = [r for r in caplog.records if "ignoring autotune cache" in r.getMessage()]
    assert len(warnings) == 1
    cache.put("k", ENTRY)
    data = json.loads(path.read_text())
    assert data == {"version": autotune.CACHE_VERSION, "entries": {"k": ENTRY}}


def test_unwritable_cache_keeps_results_in_memory(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cache = TuneCache(blocker / "autotune.json")  # its folder cannot be created
    with caplog.at_level(logging.WARNING, logger="attn_compiler"):
        cache.put("k", ENTRY)
        cache.put("k2", ENTRY)
    assert cache.get("k") == ENTRY and set(cache.entries()) == {"k", "k2"}
    assert sum("cannot write autotune cache" in r.getMessage() for r in caplog.records) == 1


def _put_many(path, prefix, barrier):
    cache = TuneCache(path)
    barrier.wait()
    for i in range(20):
        cache.put(f"{prefix}{i}", dict(ENTRY, choice=f"{prefix}{i}"))


def test_concurrent_puts_from_two_processes(tmp_path):
    path = str(tmp_path / "autotune.json")
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_put_many, args=(path, prefix, barrier)) for prefix in ("p", "q")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    entries = TuneCache(path).entries()
    assert set(entries) == {f"{prefix}{i}" for prefix in "pq" for i in range(20)}
    assert all(e["choice"] == k for k, e in entries.items())


# ---------------------------------------------------------------------------
# tune


class Candidate:
    """A zero-argument candidate that counts its calls and returns ``value``."""

    def __init__(self, ms, value=1.0, error=None):
        self.ms, self.value, self.error, self.calls = ms, value, error, 0

    def __call__(self):
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self.value


def fake_bench(fn):
    return fn.ms


def test_tune_picks_the_fastest_correct_candidate(tmp_path):
    cache = TuneCache(tmp_path / "autotune.json")
    cands = {
        "slow": Candidate(2.0),
        "fast_but_raises": Candidate(0.1, error=RuntimeError("out of resources: shared memory")),
        "fast_but_wrong": Candidate(0.2, value=float("nan")),
        "fast": Candidate(0.5),
    }
    configs = {"slow": KernelConfig(64, 32, 4, 2), "fast": KernelConfig(128, 64, 4, 3)}

    def check(name, result):
        return None if result == 1.0 else f"max error {result} vs reference"

    choice = tune("key", cands, cache=cache, check=check, bench=fake_bench, configs=configs)
    assert choice.name == "fast" and choice.config == configs["fast"] and not choice.from_cache
    assert choice.times_ms == {"slow": 2.0, "fast_but_raises": None, "fast_but_wrong": None, "fast": 0.5}
    assert set(choice.errors) == {"fast_but_raises", "fast_but_wrong"}
    assert "out of resources" in choice.errors["fast_but_raises"]
    assert "max error nan" in choice.errors["fast_but_wrong"]
    assert choice.speedup_over("slow") == pytest.approx(4.0)
    assert choice.speedup_over("fast_but_raises") is None

    calls = {name: c.calls for name, c in cands.items()}
    again = tune("key", cands, cache=cache, check=check, bench=fake_bench, configs=configs)
    assert again.from_cache and again.name == "fast" and again.config == configs["fast"]
    assert again.times_ms == choice.times_ms and again.errors == choice.errors
    assert {name: c.calls for name, c in cands.items()} == calls  # nothing ran

    entry = TuneCache(cache.path).get("key")  # persisted for the next process
    assert entry["choice"] == "fast" and entry["times_ms"]["fast_but_raises"] is None


def test_tune_uses_the_default_cache(tmp_path):
    choice = tune("k", {"a": Candidate(1.0)}, bench=fake_bench)
    assert choice.config is None
    assert TuneCache(tmp_path / "default-cache" / "autotune.json").get("k")["choice"] == "a"


def test_tune_again_when_the_cached_choice_is_gone(tmp_path):
    cache = TuneCache(tmp_path / "autotune.json")
    tune("k", {"old": Candidate(1.0)}, cache=cache, bench=fake_bench)
    choice = tune("k", {"new": Candidate(2.0)}, cache=cache, bench=fake_bench)
    assert choice.name == "new" and not choice.from_cache


def test_tune_all_fail_raises(tmp_path):
    cache = TuneCache(tmp_path / "autotune.json")
    cands = {"a": Candidate(1.0, error=ValueError("bad tile")), "b": Candidate(float("inf"))}
    with pytest.raises(RuntimeError, match="every candidate failed") as info:
        tune("k", cands, cache=cache, bench=fake_bench)
    assert "a: ValueError: bad tile" in str(info.value) and "b: timing" in str(info.value)
    assert cache.get("k") is None


def test_tune_off(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTN_COMPILER_AUTOTUNE", "0")
    cand = Candidate(1.0)
    with pytest.raises(TuningUnavailable, match="off"):
        tune("k", {"a": cand}, cache=TuneCache(tmp_path / "autotune.json"), bench=fake_bench)
    assert cand.calls == 0


def test_tune_under_graph_capture(monkeypatch, tmp_path):
    cache = TuneCache(tmp_path / "autotune.json")
    monkeypatch.setattr(autotune, "_capturing", lambda: True)
    cand = Candidate(1.0)
    with pytest.raises(TuningUnavailable, match="CUDA-graph capture"):
        tune("k", {"a": cand}, cache=cache, bench=fake_bench)
    assert cand.calls == 0
    cache.put("k", dict(ENTRY, choice="a"))
    choice = tune("k", {"a": cand}, cache=cache, bench=fake_bench)
    assert isinstance(choice, Choice) and choice.from_cache and cand.calls == 0
    assert choice.config == KernelConfig(64, 64, 4, 2)


def test_not_capturing_on_cpu():
    assert autotune._capturing() is (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())
