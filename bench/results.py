"""Result rows: JSON lines written as they come, and the tables made from them.

Row fields (README.md in this folder says what each means): ``impl, shape, B,
H, N or Lk, D, causal, variant, dtype, pass, status, ms, tflops, pct_peak`` or
``gbps, pct_bw``, ``peak_mib, rel_err, errs, first_call_s, note`` and the
environment (``device, torch, triton, date``).  ``status`` is one of
``ok, FAIL, error, unsupported, skipped``.

No torch import here: plot.py reads results without it.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

PEAK_TFLOPS = 798.0        # dense bf16 matmul, measured on one H200 (ENVIRONMENT.md)
PEAK_GBPS = 4300.0         # device-to-device copy, same card
OK, FAIL, ERROR, UNSUPPORTED, SKIPPED = "ok", "FAIL", "error", "unsupported", "skipped"
_CELL = {FAIL: "FAIL", ERROR: "err", UNSUPPORTED: "n/a", SKIPPED: "skip"}
LEGEND = "FAIL: numerics off, err: raised, n/a: unsupported, skip: not run"


class Results:
    """Rows of one benchmark, appended to ``OUT/<name>.jsonl`` as they come."""

    def __init__(self, out_dir: str, name: str, env: dict[str, str]) -> None:
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, f"{name}.jsonl")
        self.md_path = os.path.join(out_dir, f"{name}.md")
        self.rows: list[dict[str, Any]] = []
        self.env = env
        self.t0 = time.perf_counter()
        open(self.path, "w").close()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def add(self, row: dict[str, Any]) -> dict[str, Any]:
        row = {**row, **self.env}
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        print(f"[{self.elapsed():6.1f}s] {progress_line(row)}", flush=True)
        return row

    def write_markdown(self, columns: Sequence[str]) -> None:
        """Every row, every listed column, as a markdown table beside the JSON lines."""
        with open(self.md_path, "w") as f:
            f.write(f"{self.env['device']}, torch {self.env['torch']}, triton {self.env['triton']}, "
                    f"{self.env['date']}\n\n")
            f.write(markdown_table([[fmt(r.get(c)) for c in columns] for r in self.rows], columns) + "\n")


def load_rows(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def fmt(x: Any) -> str:
    """Numbers for tables: 3 significant digits, errors in e-notation, None as '-'."""
    if x is None or x == "":
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        if x != 0 and abs(x) < 0.01:
            return f"{x:.1e}"
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def markdown_table(rows: Iterable[Sequence[str]], headers: Sequence[str]) -> str:
    try:
        from tabulate import tabulate

        return tabulate(list(rows), headers=list(headers), tablefmt="github", disable_numparse=True)
    except ImportError:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)


def cell(row: dict[str, Any], metric: str) -> str:
    """One pivot cell: the metric when the row is ok, else its status."""
    if row["status"] == OK:
        return fmt(row.get(metric))
    return _CELL.get(row["status"], row["status"])


def pivot(rows: Sequence[dict[str, Any]], key: Callable[[dict[str, Any]], tuple], key_names: Sequence[str],
          metric: str) -> str:
    """A short table: one line per ``key(row)``, one column per implementation."""
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    lines: dict[tuple, dict[str, str]] = {}
    for r in rows:
        lines.setdefault(key(r), {})[r["impl"]] = cell(r, metric)
    body = [[*map(str, k), *(v.get(i, "") for i in impls)] for k, v in lines.items()]
    return markdown_table(body, [*key_names, *impls])


def notes(rows: Sequence[dict[str, Any]], width: int = 120, most: int = 10) -> str:
    """Distinct failure notes, one line each with how many rows gave it; at most ``most`` lines."""
    seen: dict[tuple[str, str, str], int] = {}
    for r in rows:
        if r["status"] in (FAIL, ERROR, UNSUPPORTED, SKIPPED) and r.get("note"):
            who = "rows" if r["status"] == SKIPPED else r["impl"]      # a skip is per case, not per impl
            k = (r["status"], who, r["note"].removeprefix("forward: ")[:width])
            seen[k] = seen.get(k, 0) + 1
    lines = [f"- {s} {i} (x{n}): {note}" for (s, i, note), n in seen.items()]
    more = [f"- ... {len(lines) - most} more (the .md file beside the rows has every note)"] if len(lines) > most else []
    return "\n".join(lines[:most] + more)


def progress_line(row: dict[str, Any]) -> str:
    what = f"{row['impl']:<16} {row['shape']:<18} {'causal' if row.get('causal') else 'full':<6} " \
           f"{row.get('variant', '-'):<7} {row['pass']:<7}"
    if row["status"] != OK:
        return f"{what} {row['status']}: {row.get('note', '')}"
    rate = f"{fmt(row['gbps'])} GB/s" if row.get("gbps") is not None else f"{fmt(row.get('tflops'))} TFLOP/s"
    return (f"{what} {fmt(row['ms'])} ms  {rate}  peak {fmt(row.get('peak_mib'))} MiB  "
            f"err {fmt(row.get('rel_err'))}  first call {fmt(row.get('first_call_s'))} s")


# ---- the short tables of each benchmark ----------------------------------------------

def _dtypes(rows: Sequence[dict[str, Any]]) -> str:
    return "/".join(dict.fromkeys(r["dtype"] for r in rows))


def attention_summary(rows: Sequence[dict[str, Any]]) -> str:
    """TFLOP/s per case and implementation; peak MiB of fwd+bwd; failure notes."""
    def key(r):
        return (r["shape"], "causal" if r["causal"] else "full", r["variant"], r["pass"])

    names = ("shape", "mask", "variant", "pass")
    parts = [f"attention TFLOP/s, {_dtypes(rows)} ({LEGEND})", pivot(rows, key, names, "tflops")]
    bwd = [r for r in rows if r["pass"] == "fwd+bwd"]
    if any(r.get("peak_mib") is not None for r in bwd):
        parts += ["", "attention peak MiB, fwd+bwd", pivot(bwd, key, names, "peak_mib")]
    failures = notes(rows)
    return "\n".join(parts + (["", failures] if failures else []))


def decode_summary(rows: Sequence[dict[str, Any]]) -> str:
    """GB/s of K/V read and ms per case and implementation; failure notes."""
    def key(r):
        return (r["shape"],)

    names = ("BxHq:HkvxLkxD",)
    parts = [f"decode GB/s of K/V read, {_dtypes(rows)} ({LEGEND})", pivot(rows, key, names, "gbps"),
             "", "decode ms", pivot(rows, key, names, "ms")]
    failures = notes(rows)
    return "\n".join(parts + (["", failures] if failures else []))
