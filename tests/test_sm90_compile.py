"""The generated kernels compile for the H200 (sm_90) on any machine.

Triton's interpreter runs the kernels' arithmetic on CPU but skips the real
front end and code generator: a kernel can pass every interpreted test and
still fail to compile on the GPU (a branch redefining a variable with another
dtype) or ask for more shared memory than Hopper has.  ``sm90_compile.py``
compiles every family, mask mode and launch variant for an sm_90 target through
Triton and ptxas, without a GPU, in a process with the interpreter off.
"""
import json
import os
import subprocess
import sys
import tempfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def test_generated_kernels_compile_for_sm90():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    # the cases split over processes, one per core (two at most): a compile
    # is one core's work, and this is the suite's longest test
    n = max(1, min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
    files = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in range(n)]
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "sm90_compile.py"), "--serialized",
                               f"--shard={i}/{n}"], env=env, stdout=o, stderr=e, text=True)
             for i, (o, e) in enumerate(files)]
    records = []
    for proc, (o, e) in zip(procs, files):
        proc.wait(timeout=3000)
        o.seek(0)
        e.seek(0)
        out, err = o.read(), e.read()
        shard = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        if shard and "unavailable" in shard[-1]:
            pytest.skip(f"this Triton cannot compile for sm_90 without a GPU here: {shard[-1]['unavailable']}")
        if not shard or "failures" not in shard[-1]:
            pytest.fail(f"sm90_compile.py did not finish (rc {proc.returncode}):\n{err[-3000:]}")
        records += shard[:-1]       # (its last line: the shard's count of failures)
    compiled = [r for r in records if "kernels" in r]
    assert len(compiled) >= 40, f"too few kernels compiled: {len(compiled)}"
    failed = [r for r in records if "error" in r]
    assert not failed, "\n\n".join(
        f"{r['case']} {r['shape']} {r['family']} {r['config']}: {r['error']}" for r in failed)
    # ptxas serializes a kernel's wgmma (C7515) when it cannot keep them in
    # flight ([Note: FULL walk first]); the known cases left, each timed by
    # the tuner beside variants that compile without it:
    # - a learned bias's transposed (query, key) tile in dK/dV read through
    #   pointers (its "tma" variant compiles without it);
    # - Hugging Face's additive padding row read through pointers in the
    #   forward and dQ since its loads are vectorized ([Note: tile starts as
    #   multiples]; bench/RESULTS.md run 110: the forward's 128x128 pointer
    #   tile got faster all the same, 832 -> 729 us, the dQ of 64x128 slower,
    #   2194 -> 2293; the best tiles, "tma" forward and "fused" backward, are
    #   not serialized)
    # - a static cache's mask plane (a mask received as values) read through
    #   pointers in the backward at a row stride Triton cannot take as a
    #   multiple of 16 (the uneven length 200; so with the block map's ZERO
    #   tiles off too); its "tma" variant compiles without it
    known = {"bias": {"attention_bwd_dkdv", "attention_bwd_fused"},
             "hf_causal_padding": {"attention_fwd", "attention_bwd_dq"},
             "static_cache": {"attention_bwd_dkdv", "attention_bwd_dq", "attention_bwd_fused"}}
    serialized = [r for r in records if r.get("serialized")
                  and not ("tma" not in r["config"] and set(r["serialized"]) <= known.get(r["case"], set()))]
    assert not serialized, "wgmma serialized by ptxas:\n" + "\n".join(
        f"{r['case']} {r['shape']} {r['family']} {r['config']}: {r['serialized']}" for r in serialized)
    # a learned bias's gradient (a (query, key) plane) is added 2-4 floats per
    # instruction when its tiles are known aligned ([Note: tile starts as
    # multiples]): with Lk a multiple of 16 nothing is added one float at a time
    planes = [r for r in records if r["case"] in ("bias", "causal_bias") and r["family"] == "bwd"
              and r["shape"].endswith("x256x128") and r.get("scalar_atomics")]
    assert not planes, "a bias plane's gradient added one float at a time:\n" + "\n".join(
        f"{r['case']} {r['shape']} {r['config']}: {r['scalar_atomics']}" for r in planes)


def test_precompile_leaves_nothing_to_compile():
    """``kernels.precompile`` (the tuner's parallel compile, Triton's
    AsyncCompileMode) compiles every kernel of a site's candidates without
    launching them; the same calls then compile nothing more."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, os.path.join(HERE, "sm90_compile.py"), "--precompile"], env=env,
                          capture_output=True, text=True, timeout=900)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if records and "unavailable" in records[-1]:
        pytest.skip(f"this Triton cannot compile for sm_90 without a GPU here: {records[-1]['unavailable']}")
    assert records and "precompile" in records[-1], proc.stderr[-3000:]
    got = records[-1]["precompile"]
    # 3 backward configs (preprocess shared, dK/dV + dQ, one fused launch), 2 forwards and a
    # block-map backward (its preprocess, dK/dV, dQ; the map's tile kinds for the dK/dV and
    # the dQ tiles, its run ends (one kernel for both) and its columns)
    assert got["compiled"] == 15 and got["compiled_again"] == 0, got
