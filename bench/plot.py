"""Plots and the short tables of a benchmark run, from the JSON lines in OUT.

    python bench/plot.py bench/out

Writes beside the rows (only the rows with status ok are drawn):

- ``attention_tflops.png``: TFLOP/s against N per implementation, one panel
  per (head dim, mask, pass), plain scores only;
- ``attention_memory.png``: peak MiB of fwd+bwd against N (log scale);
- ``attention_variants.png``: TFLOP/s of the score variants (softcap, ALiBi, padding,
  learned bias), bars per implementation;
- ``decode_gbps.png``: GB/s of K/V read per decode case, bars per implementation,
  with the card's copy rate drawn across.

Then prints the short tables of both benchmarks (last, so a log tail shows them).
Without matplotlib the plots are skipped with a message; the tables still print.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from results import (
    OK,
    PEAK_GBPS,
    PEAK_TFLOPS,
    attention_summary,
    decode_summary,
    load_rows,
)


def _series(rows: Sequence[dict[str, Any]], metric: str) -> dict[str, list[tuple[int, float]]]:
    """impl -> [(N, value)] sorted by N."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if r["status"] == OK and r.get(metric) is not None:
            out.setdefault(r["impl"], []).append((r["N"], r[metric]))
    return {k: sorted(v) for k, v in out.items()}


def _title(rows: Sequence[dict[str, Any]]) -> str:
    r = rows[0]
    return f"{r['device']}, torch {r['torch']}, triton {r['triton']}, {r['dtype']}"


def _n_label(rows: Sequence[dict[str, Any]]) -> str:
    tokens = {r["B"] * r["N"] for r in rows}
    heads = {r["H"] for r in rows}
    said = ([f"B·N = {tokens.pop()}"] if len(tokens) == 1 else []) + ([f"H = {heads.pop()}"] if len(heads) == 1 else [])
    return f"N ({', '.join(said)})" if said else "N"


def _lines(plt, rows, metric: str, passes: Sequence[str], ylabel: str, path: str, log_y: bool = False):
    panels = sorted({(r["D"], r["causal"], r["pass"]) for r in rows if r["pass"] in passes},
                    key=lambda p: (-p[0], not p[1], passes.index(p[2])))
    if not panels:
        return None
    cols = len(passes)
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.5 * cols, 4.2 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (D, causal, pss) in zip(axes.flat, panels):
        sel = [r for r in rows if (r["D"], r["causal"], r["pass"]) == (D, causal, pss)]
        for impl, pts in _series(sel, metric).items():
            ax.plot([n for n, _ in pts], [y for _, y in pts], marker="o", label=impl)
        ax.set_xscale("log", base=2)
        if log_y:
            ax.set_yscale("log")
        ax.set_title(f"D={D}, {'causal' if causal else 'full'}, {pss}")
        ax.set_xlabel(_n_label(sel))
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(_title(rows))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _bars(plt, rows, group, metric: str, ylabel: str, path: str, ceiling: float | None = None):
    """Grouped bars: one group per ``group(row)``, one bar per implementation."""
    ok = [r for r in rows if r["status"] == OK and r.get(metric) is not None]
    if not ok:
        return None
    groups = list(dict.fromkeys(group(r) for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in ok))     # those with nothing to draw are left out
    values = {(group(r), r["impl"]): r[metric] for r in ok}
    width = 0.8 / len(impls)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.3 * len(groups) * max(1, len(impls)) * 0.35), 4.5))
    for i, impl in enumerate(impls):
        xs = [g + (i - (len(impls) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [values.get((g, impl), 0.0) for g in groups], width, label=impl)
    if ceiling is not None:
        ax.axhline(ceiling, color="k", linestyle="--", linewidth=1, label=f"{ceiling:.0f}")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(_title(rows))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot(out_dir: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (the tables follow)")
        return []
    att = load_rows(os.path.join(out_dir, "attention.jsonl"))
    dec = load_rows(os.path.join(out_dir, "decode.jsonl"))
    plain = [r for r in att if r["variant"] == "none"]
    variants = [r for r in att if r["variant"] != "none"]
    made = [
        _lines(plt, plain, "tflops", ("fwd", "fwd+bwd"), f"TFLOP/s (peak {PEAK_TFLOPS:.0f})",
               os.path.join(out_dir, "attention_tflops.png")) if plain else None,
        _lines(plt, plain, "peak_mib", ("fwd+bwd",), "peak MiB beyond the inputs",
               os.path.join(out_dir, "attention_memory.png"), log_y=True)
        if any(r.get("peak_mib") for r in plain) else None,
        _bars(plt, variants, lambda r: f"{r['variant']} {r['shape']}\n{'causal' if r['causal'] else 'full'} "
              f"{r['pass']}", "tflops", "TFLOP/s", os.path.join(out_dir, "attention_variants.png"))
        if variants else None,
        _bars(plt, dec, lambda r: r["shape"], "gbps", "GB/s of K/V read", os.path.join(out_dir, "decode_gbps.png"),
              ceiling=PEAK_GBPS) if dec else None,
    ]
    return [p for p in made if p]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default=os.path.join("bench", "out"), help="folder of the *.jsonl rows")
    ap.add_argument("--no-table", action="store_true", help="plots only")
    args = ap.parse_args(argv)
    for path in plot(args.out):
        print(f"wrote {path}")
    if not args.no_table:
        att = load_rows(os.path.join(args.out, "attention.jsonl"))
        dec = load_rows(os.path.join(args.out, "decode.jsonl"))
        if att:
            print(f"\n{_title(att)}\n{attention_summary(att)}")
        if dec:
            print(f"\n{decode_summary(dec)}")
        if not att and not dec:
            print(f"no rows in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
