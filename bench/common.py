"""What the benchmarks here share: FLOP and byte counts, timing, peak memory,
numerics against a float64 golden, and the sweep over implementations.

Entry points for a benchmark script: :func:`run_sweep` walks the cases within
a time budget; :func:`run_impls` builds each implementation for one case and
hands each of its passes to :func:`measure`: first call (compile, timed apart)
-> numerics -> peak memory -> steady-state median time.  Every failure becomes
a row (results.py), never a crash.

Conventions (README.md in this folder):

- forward FLOPs = 4·B·H·Lq·Lk·D (two matmuls of 2·Lq·Lk·D each), half of that
  when causal; a backward is 2.5× the forward, so fwd+bwd = 3.5× fwd.
- % of peak is against the measured dense bf16 matmul rate of one H200
  (798 TFLOP/s); decode GB/s against its measured device copy rate (4.3 TB/s).
- a row whose numerics fail is marked FAIL and never timed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from results import (
    ERROR,
    FAIL,
    OK,
    PEAK_GBPS,
    PEAK_TFLOPS,
    SKIPPED,
    UNSUPPORTED,
    Results,
    fmt,
    markdown_table,
)

# one FLOP count for the benchmarks and the site report
from attn_compiler.report import BWD_FACTOR, attention_flops  # noqa: E402,F401

TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 1e-3, torch.float32: 1e-5, torch.float64: 1e-10}

# SDPA's words for "no backend can run this case": unsupported, not broken.
_UNSUPPORTED_HINTS = ("No available kernel", "No viable backend")
# After one of these the CUDA context is unusable: the sweep stops.
_FATAL_HINTS = ("illegal memory access", "device-side assert", "unspecified launch failure",
                "misaligned address", "illegal instruction")


# ---- physics -------------------------------------------------------------------

def kv_bytes(B: int, Lk: int, Hkv: int, D: int, itemsize: int = 2) -> float:
    """Bytes of K and V a decode step must read once: 2·B·Lk·Hkv·D·itemsize."""
    return 2.0 * B * Lk * Hkv * D * itemsize


# ---- device helpers ----------------------------------------------------------------

def on_cuda() -> bool:
    return torch.cuda.is_available()


def device() -> torch.device:
    return torch.device("cuda" if on_cuda() else "cpu")


def sync() -> None:
    if on_cuda():
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    if on_cuda():
        torch.cuda.empty_cache()


def reset_compiled() -> None:
    """Forget compiled graphs, so each case compiles fresh (no recompile limit,
    no automatic dynamic shapes carried over from the previous case)."""
    from attn_compiler._compat import reset_dynamo

    reset_dynamo()


def environment() -> dict[str, str]:
    """Device, versions and date: stamped on every row."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "-"
    name = torch.cuda.get_device_name() if on_cuda() else f"cpu ({platform.machine()})"
    return {"device": name, "torch": torch.__version__, "triton": triton_version,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


# ---- timing and memory -----------------------------------------------------------

def _clear_grads(tensors: Sequence[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def time_ms(fn: Callable[[], Any], grad_to_none: Sequence[torch.Tensor] = (), cpu_reps: int = 3) -> float:
    """Median milliseconds of ``fn()``: Triton's do_bench on CUDA (L2 flushed
    between calls), else the median of a few perf_counter runs after one warm-up."""
    if on_cuda():
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, grad_to_none=list(grad_to_none) or None,
                              return_mode="median"))
    _clear_grads(grad_to_none)
    fn()
    times = []
    for _ in range(cpu_reps):
        _clear_grads(grad_to_none)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mib(fn: Callable[[], Any]) -> float | None:
    """MiB allocated at the peak of one ``fn()`` call beyond what was already
    allocated (the inputs); None off CUDA."""
    if not on_cuda():
        return None
    sync()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# ---- numerics ----------------------------------------------------------------------

def rel_errors(got: dict[str, torch.Tensor | None], golden: dict[str, torch.Tensor]) -> dict[str, float]:
    """‖got − golden‖/‖golden‖ per name (float64; NaN or inf where the golden has none is inf)."""
    from attn_compiler.testing import rel_err

    out = {}
    for name, ref in golden.items():
        t = got.get(name)
        out[name] = math.inf if t is None else rel_err(t, ref)
    return out


def worst(errs: dict[str, float]) -> tuple[str, float]:
    """The name and value of the largest error (NaN counts as largest)."""
    name = max(errs, key=lambda k: math.inf if math.isnan(errs[k]) else errs[k])
    return name, errs[name]


# ---- one measurement -----------------------------------------------------------------

def short_error(exc: BaseException, width: int = 160) -> str:
    """``Type: first non-empty line of the message``, truncated."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= width else text[: width - 3] + "..."


def model_row(row: dict[str, Any], measure: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """One row of the whole-model benchmarks (bench_sam, bench_relpos,
    bench_hf_train): ``measure(row)`` fills it; an error it raises becomes the
    row's ``error`` (a failing path is a row, not a stop).  Printed as it
    comes; GPU memory freed after."""
    try:
        measure(row)
    except Exception as e:  # noqa: BLE001 - see above
        row["error"] = short_error(e)
    print(json.dumps(row, default=str), flush=True)
    free_memory()
    return row


def sites_summary() -> str:
    """What the backend did with the sites it saw since its last reset, and
    what the never-slower choice picked for the fused ones."""
    import collections

    import attn_compiler

    rep = attn_compiler.report()
    picks = collections.Counter(str(s.features["choice"]) for s in rep.fused if s.features.get("choice"))
    chosen = ", ".join(f"{k} x{v}" for k, v in sorted(picks.items()))
    return rep.summary() + (f"; chosen: {chosen}" if chosen else "")


def finish_rows(rows: Sequence[dict[str, Any]], out: str | None, name: str, columns: Sequence[str]) -> None:
    """``OUT/<name>.jsonl`` (with ``out``), then ``columns`` of every row as a
    markdown table; a row that failed shows its error instead."""
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r, default=str) + "\n" for r in rows)
    table = [[fmt(r.get(c)) for c in columns] if "error" not in r
             else [fmt(r.get(columns[0])), fmt(r.get(columns[1])), "error: " + r["error"][:70]] + [""] * (len(columns) - 3)
             for r in rows]
    print("\n" + markdown_table(table, columns))


def classify_error(exc: BaseException) -> str:
    if isinstance(exc, NotImplementedError) or any(h in str(exc) for h in _UNSUPPORTED_HINTS):
        return UNSUPPORTED
    return ERROR


def is_fatal(note: str) -> bool:
    """Whether an error message means the CUDA context is lost."""
    return any(h in note for h in _FATAL_HINTS)


@dataclasses.dataclass
class Work:
    """What to measure: ``run()`` does one call (forward, or forward+backward);
    ``outputs(result)`` gives the tensors to compare with ``golden`` (float64,
    same names); ``flops`` or ``nbytes`` turn time into a rate."""

    run: Callable[[], Any]
    outputs: Callable[[Any], dict[str, torch.Tensor | None]]
    golden: dict[str, torch.Tensor]
    tolerance: float
    flops: float | None = None
    nbytes: float | None = None
    grad_to_none: Sequence[torch.Tensor] = ()
    graph: bool = False       # time CUDA-graph replays (launch overhead out: decode-sized work)


def model_args(doc: str, impls: Sequence[str], argv=None, forms: bool = False):
    """The whole-module benchmarks' command line (bench_relpos, bench_research,
    bench_mvit): ``--smoke`` (tiny shapes, float32), ``--only`` (implementations),
    ``--out`` and, with ``forms``, ``--forms``.  Returns (args, device, dtype,
    the implementation names)."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, float32 (CPU)")
    ap.add_argument("--only", default=",".join(impls))
    if forms:
        ap.add_argument("--forms", default=None, help="comma-separated forms (default: all)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dtype = torch.float32 if args.smoke or not on_cuda() else torch.bfloat16
    return args, device(), dtype, [n for n in args.only.split(",") if n]


def compiled_module(name: str, mod: torch.nn.Module):
    """``mod`` as ``eager``, ``inductor`` (torch.compile) or ``attn_compiler``
    (our backend, inner inductor) runs it; None for another name."""
    if name == "eager":
        return mod
    if name == "inductor":
        return torch.compile(mod)
    if name == "attn_compiler":
        import attn_compiler
        return torch.compile(mod, backend=attn_compiler.backend())
    return None


def time_graph_ms(fn: Callable[[], Any]) -> float:
    """Median milliseconds of ``fn()`` replayed from a CUDA graph (METHOD: many
    small launches are timed as graph replays); falls back to ``time_ms``."""
    if not on_cuda():
        return time_ms(fn)
    from triton.testing import do_bench_cudagraph

    fn()                      # warm up (and tune) outside the capture
    sync()
    return float(do_bench_cudagraph(fn, rep=100, return_mode="median"))


def measure(work: Work) -> dict[str, Any]:
    """first call (compile, timed apart) -> numerics -> peak memory -> timing.

    Returns the measured fields of one row; any exception becomes an
    ``error``/``unsupported`` row with the message, never a crash.
    """
    row: dict[str, Any] = {"status": ERROR, "ms": None, "first_call_s": None, "rel_err": None,
                           "peak_mib": None, "note": ""}
    try:
        _clear_grads(work.grad_to_none)
        t0 = time.perf_counter()
        result = work.run()
        sync()
        row["first_call_s"] = round(time.perf_counter() - t0, 3)
        errs = rel_errors(work.outputs(result), work.golden)
        del result
        name, err = worst(errs)
        row["rel_err"] = err
        row["errs"] = errs
        if not err <= work.tolerance:   # NaN fails too
            row.update(status=FAIL, note=f"numerics: {name} rel err {err:.2e} > {work.tolerance:.0e}")
            return row
        row["peak_mib"] = peak_mib(lambda: (_clear_grads(work.grad_to_none), work.run()))
        if work.graph:
            try:
                ms = time_graph_ms(work.run)
                row["timing"] = "cuda graph"
            except Exception as exc:  # noqa: BLE001 - not capturable: time the launches
                ms = time_ms(work.run, work.grad_to_none)
                row["timing"] = f"launches (graph capture failed: {short_error(exc, 60)})"
        else:
            ms = time_ms(work.run, work.grad_to_none)
        row.update(status=OK, ms=ms)
        if work.flops is not None:
            row["tflops"] = work.flops / (ms * 1e-3) / 1e12
            row["pct_peak"] = 100.0 * row["tflops"] / PEAK_TFLOPS
        if work.nbytes is not None:
            row["gbps"] = work.nbytes / (ms * 1e-3) / 1e9
            row["pct_bw"] = 100.0 * row["gbps"] / PEAK_GBPS
    except Exception as exc:  # noqa: BLE001 - every failure becomes a row
        row.update(status=classify_error(exc), note=short_error(exc))
        if is_fatal(str(exc)):
            row["fatal"] = True
    finally:
        _clear_grads(work.grad_to_none)
        free_memory()
    return row


# ---- the sweep -------------------------------------------------------------------------

@dataclasses.dataclass
class Impl:
    """One implementation built for one case."""

    forward: Callable[[], torch.Tensor]                        # one forward call -> out
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext  # around fwd and bwd
    note: Callable[[], str] = str                              # appended to the note of every row


Row = Callable[..., dict]        # row(impl_name, pass_name, **fields) -> the full row of a case


def run_impls(names: Sequence[str], passes: Sequence[str], build: Callable[[str], Impl],
              works: Callable[[Impl], dict[str, Work]], row: Row, results: Results) -> bool:
    """Build each implementation and measure each of its passes; True when the
    CUDA context was lost (the caller stops)."""
    for name in names:
        reset_compiled()
        try:
            impl = build(name)
        except Exception as exc:  # noqa: BLE001 - a baseline that cannot be built is a row
            for p in passes:
                results.add(row(name, p, status=classify_error(exc), note=short_error(exc)))
            continue
        failed = None
        for p, work in works(impl).items():
            if p not in passes:
                continue
            if failed is not None:      # the forward raised: do not compile again to learn it twice
                results.add(row(name, p, status=failed["status"], note="forward: " + failed["note"]))
                continue
            fields = measure(work)
            said = impl.note()
            if said:
                fields["note"] = "; ".join(n for n in (fields["note"], said) if n)
            results.add(row(name, p, **fields))
            if fields.get("fatal"):
                return True
            if fields["status"] in (ERROR, UNSUPPORTED):
                failed = fields
        del impl
    return False


def run_sweep(cases: Sequence[Any], run_case: Callable[[Any], bool], skip: Callable[[Any, str], None],
              budget_s: float | None, elapsed: Callable[[], float]) -> None:
    """``run_case`` each case in order; ``skip(case, why)`` those past the budget
    (a case is not started when a case of the mean length so far would end past
    it) or after the CUDA context was lost."""
    took: list[float] = []
    stop = ""
    for case in cases:
        start = elapsed()
        if not stop and budget_s is not None and start + statistics.fmean(took or [0.0]) > budget_s:
            stop = f"time budget of {budget_s:.0f} s"
        if stop:
            skip(case, stop)
            continue
        try:
            lost = run_case(case)
        except Exception as exc:  # noqa: BLE001 - inputs or golden failed (e.g. out of memory)
            skip(case, f"the case could not be set up: {short_error(exc)}")
            lost = is_fatal(str(exc))
        if lost:
            stop = "CUDA context lost by an earlier error"
        took.append(elapsed() - start)


def sweep_and_report(cases: Sequence[Any], names: Sequence[str], passes: Sequence[str],
                     run_case: Callable[[Any], bool], row_of: Callable[[Any], Row], results: Results,
                     budget_s: float | None, columns: Sequence[str], summary: Callable[[list], str]) -> None:
    """The end of every benchmark script: the sweep (cases past the budget are
    written as skipped), every row as markdown, the short table printed last."""
    run_sweep(cases, run_case, lambda case, why: skipped(names, passes, row_of(case), results, why),
              budget_s, results.elapsed)
    results.write_markdown(columns)
    print(f"\n{summary(results.rows)}\n\nrows: {results.path} ({len(results.rows)}), "
          f"all columns: {results.md_path}; {results.elapsed():.0f} s", flush=True)


def skipped(names: Sequence[str], passes: Sequence[str], row: Row, results: Results, why: str) -> None:
    for name in names:
        for p in passes:
            results.add(row(name, p, status=SKIPPED, note=why))
