"""Command line: ``python -m attn_compiler {demo,explain,report} ...``.

``demo``     compiles the shipped GPT, checks logits and every parameter gradient
             against a float64 golden (compiled error at most twice eager's, see
             ``attn_compiler.testing.golden_check``),
             prints the numerics and the site report; exits 1 if a check fails.
``explain``  compiles a model from a user's file with the eager inner backend,
             runs one forward and prints which attention sites were fused and why
             others were declined.
``report``   prints the autotune cache: per kernel family, spec and shape
             bucket, the chosen candidate, its config and the timings.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import logging
import math
import os
import re
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

DTYPES = ("float32", "bfloat16", "float16", "float64")
INNERS = ("inductor", "aot_eager", "eager")


class CliError(Exception):
    """A mistake in the command line or the user's file: printed without a traceback."""


# ---------------------------------------------------------------------------
# demo


def _forward_backward(model, idx, targets, run=None) -> Tuple[Any, Dict[str, Any]]:
    """Logits and ``{name: grad}`` of one training step (grads not applied).

    ``run``: the callable to step (e.g. the compiled ``model``); default ``model``.
    """
    model.zero_grad(set_to_none=True)
    logits, loss = (model if run is None else run)(idx, targets)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def _golden_rows(golden, eager, compiled) -> List[Tuple[str, float, float, bool]]:
    """(name, err eager, err compiled, ok) for logits and each gradient.

    ok: ``attn_compiler.testing.golden_check`` passes (compiled error at most
    2x eager's + a small dtype slack, relative to the float64 golden; NaN fails).
    """
    from attn_compiler.testing import golden_check, rel_err

    (g_out, g_grads), (e_out, e_grads), (c_out, c_grads) = golden, eager, compiled
    pairs = [("logits", g_out, e_out, c_out)]
    pairs += [(f"grad {n}", g, e_grads.get(n), c_grads.get(n)) for n, g in g_grads.items()]
    rows = []
    for name, g, e, c in pairs:
        if e is None or c is None:  # a gradient went missing
            rows.append((name, math.nan, math.nan, False))
            continue
        try:
            golden_check(c, e, g, k=2.0, name=name)
            ok = True
        except AssertionError:
            ok = False
        rows.append((name, rel_err(e, g), rel_err(c, g), ok))
    return rows


def _numerics_table(rows) -> str:
    """Logits, the worst gradient, and every failing row."""
    from tabulate import tabulate

    grads = [r for r in rows if r[0].startswith("grad ")]
    shown = [rows[0]]
    if grads:
        worst = max(grads, key=lambda r: math.inf if math.isnan(r[2]) else r[2] / (r[1] + 1e-30))
        shown.append((f"{worst[0]} (worst of {len(grads)} grads)",) + worst[1:])
    shown += [r for r in rows if not r[3] and r not in shown]
    table = [(n, f"{e:.3g}", f"{c:.3g}", "ok" if ok else "FAIL") for n, e, c, ok in shown]
    return tabulate(table, headers=("rel. error vs float64", "eager", "compiled", "check"),
                    disable_numparse=True)


def run_demo(args: argparse.Namespace) -> int:
    import torch

    import attn_compiler
    from attn_compiler._compat import reset_dynamo
    from attn_compiler.models import GPT, GPTConfig

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: no CUDA device is available here")
    dtype_name = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)

    torch.manual_seed(args.seed)
    base = GPT(GPTConfig(block_size=args.seq))
    g = torch.Generator().manual_seed(args.seed + 1)
    idx = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), generator=g).to(device)
    targets = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), generator=g).to(device)

    golden = _forward_backward(copy.deepcopy(base).to(device, torch.float64), idx, targets)
    eager = _forward_backward(copy.deepcopy(base).to(device, dtype), idx, targets)

    attn_compiler.reset()
    reset_dynamo()
    model = copy.deepcopy(base).to(device, dtype)
    compiled_model = torch.compile(model, backend=attn_compiler.backend(inner=args.inner))
    compiled = _forward_backward(model, idx, targets, run=compiled_model)

    rows = _golden_rows(golden, eager, compiled)
    ok = all(r[3] for r in rows)
    print(f"attn_compiler demo: GPT {base.config.n_layer} layers, {base.config.n_head} heads, "
          f"batch {args.batch} x seq {args.seq}, {dtype_name} on {device}, inner={args.inner}")
    print()
    print(_numerics_table(rows))
    print()
    print(attn_compiler.report())
    print()
    print("numerics: " + ("ok" if ok else "FAILED (compiled error above 2x eager's)"))
    return 0 if ok else 1


# ---------------------------------------------------------------------------
# explain


def _load_factory(target: str):
    """The callable named by ``FILE.py:FACTORY``."""
    path, sep, name = target.rpartition(":")
    if not sep or not path or not name:
        raise CliError(f"expected FILE.py:FACTORY, got {target!r}")
    if not os.path.isfile(path):
        raise CliError(f"no such file: {path}")
    module_name = "_attn_compiler_explain_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise CliError(f"cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    folder = os.path.dirname(os.path.abspath(path))
    sys.path.insert(0, folder)  # so the file can import its neighbours
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise CliError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        sys.path.remove(folder)
    factory = getattr(module, name, None)
    if factory is None:
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise CliError(f"{path} has no {name!r}; callables there: {', '.join(found) or 'none'}")
    if not callable(factory):
        raise CliError(f"{path}:{name} is not callable")
    return factory


def _model_and_args(factory) -> Tuple[Any, tuple]:
    """Call FACTORY(): ``(model, args)`` or a model with ``example_inputs()``."""
    made = factory()
    if isinstance(made, tuple) and len(made) == 2 and callable(made[0]):
        model, example = made
    elif callable(made) and hasattr(made, "example_inputs"):
        model, example = made, made.example_inputs()
    else:
        raise CliError("FACTORY() must return (model, example_args) or a model "
                       "with an example_inputs() method")
    return model, example if isinstance(example, tuple) else (example,)


def run_explain(args: argparse.Namespace) -> int:
    import torch

    import attn_compiler
    from attn_compiler._compat import reset_dynamo

    model, example = _model_and_args(_load_factory(args.target))
    if isinstance(model, torch.nn.Module):
        model.train(args.train)
    attn_compiler.reset()
    reset_dynamo()
    compiled = torch.compile(model, backend=attn_compiler.backend(inner=args.inner))
    with torch.set_grad_enabled(args.train):
        compiled(*example)
    print(f"attn_compiler explain {args.target} ({'training' if args.train else 'inference'})")
    print(attn_compiler.report())
    return 0


# ---------------------------------------------------------------------------
# report


def _natural(text: str) -> Tuple[Any, ...]:
    """Sort key that orders ``lq128`` before ``lq1024``."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text))


def _config_text(config: Optional[dict]) -> str:
    from attn_compiler.autotune import KernelConfig

    if config is None:
        return "-"
    try:
        return str(KernelConfig.from_dict(config))
    except (TypeError, ValueError):
        return str(config)


def _autotune_rows(entries: Dict[str, dict]) -> List[Tuple[str, ...]]:
    """One row per cache entry, sorted by key; the spec hash is shortened."""
    from attn_compiler.autotune import TuneKey

    rows = []
    for key, entry in entries.items():
        parts = TuneKey.parse(key) or TuneKey(key, "?", "?", "?", "?")
        choice = str(entry.get("choice"))
        times = entry.get("times_ms") if isinstance(entry.get("times_ms"), dict) else {}
        timed = {n: t for n, t in times.items() if isinstance(t, (int, float))}
        others = sorted((t, n) for n, t in timed.items() if n != choice)
        rest = [f"{n} {t:.4g}" for t, n in others]
        rest += [f"{n} failed" for n in sorted(set(times) - set(timed) - {choice})]
        best = f"{timed[choice]:.4g}" if choice in timed else "-"
        rows.append((parts.family, parts.spec_hash[:12], parts.bucket, parts.gpu, parts.triton,
                     choice, _config_text(entry.get("config")), best, ", ".join(rest) or "-"))
    return sorted(rows, key=lambda r: tuple(_natural(c) for c in r[:6]))


def run_report(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from attn_compiler.autotune import TuneCache

    cache = TuneCache(None if args.cache_dir is None else os.path.join(args.cache_dir, "autotune.json"))
    entries = cache.entries()
    if args.clear:
        try:
            cache.clear()
        except OSError as exc:
            raise CliError(f"cannot clear {cache.path}: {exc}") from exc
        print(f"autotune cache {cache.path}: cleared {len(entries)} entries")
        return 0
    if not entries:
        print(f"autotune cache {cache.path}: empty")
        return 0
    print(f"autotune cache {cache.path}: {len(entries)} entries")
    headers = ("family", "spec hash", "shape bucket", "GPU", "triton", "choice", "config",
               "best ms", "others (ms)")
    print(tabulate(_autotune_rows(entries), headers=headers, disable_numparse=True))
    return 0


# ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m attn_compiler",
        description="A torch.compile backend that fuses hand-written attention.")
    p.add_argument("-v", "--verbose", action="store_true", help="log what the backend does")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("demo", help="compile a small GPT, check numerics, print the site report")
    d.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    d.add_argument("--inner", choices=INNERS, default="inductor", help="compiler for the rest of the graph")
    d.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on cuda, float32 on cpu")
    d.add_argument("--batch", type=int, default=2)
    d.add_argument("--seq", type=int, default=64, help="sequence length (also the block size)")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=run_demo)

    e = sub.add_parser("explain", help="which attention sites of a model are fused, and why not")
    e.add_argument("target", metavar="FILE.py:FACTORY",
                   help="FACTORY() returns (model, example_args) or a model with example_inputs()")
    e.add_argument("--train", action="store_true", help="train mode with gradients (default: eval, no_grad)")
    e.add_argument("--inner", choices=INNERS, default="eager", help="compiler for the rest of the graph")
    e.set_defaults(func=run_explain)

    r = sub.add_parser("report", help="print the autotune cache: chosen kernels and their timings")
    r.add_argument("--cache-dir", metavar="DIR",
                   help="folder of autotune.json (default: $ATTN_COMPILER_CACHE_DIR, else "
                        "$XDG_CACHE_HOME/attn_compiler, else ~/.cache/attn_compiler)")
    r.add_argument("--clear", action="store_true", help="delete every entry instead of printing them")
    r.set_defaults(func=run_report)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.verbose:
        logging.basicConfig(format="%(name)s: %(message)s")
        logging.getLogger("attn_compiler").setLevel(logging.DEBUG)
    try:
        return args.func(args)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
