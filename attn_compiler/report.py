"""Site records: one row per attention site the backend looked at.

The backend calls :func:`record` for each site it fused or declined; users call
``attn_compiler.report()`` (a :class:`Report`, printable as a table) and
``attn_compiler.reset()``. The registry is process-global and thread-safe.

The module itself is callable: ``attn_compiler.report()`` is ``report()``, and
``from attn_compiler import report; report.record(...)`` reaches the registry.

``Site.features`` keys the table knows (all optional): ``scale``, ``mask``,
``score_mod``, ``gqa_group``, ``dropout``, ``dtypes`` (str, sequence or
mapping), ``shapes`` (mapping name -> shape, or a sequence of shapes).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
import textwrap
import threading
import types
from typing import Any, Dict, Iterable, List, Mapping, Optional

log = logging.getLogger("attn_compiler")

FUSED = "fused"
DECLINED = "declined"
UNKNOWN_LOCATION = "<unknown>"

# 'File "/a/b/model.py", line 42, in forward' (the 'in ...' part may be missing)
_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+)(?:, in (?P<func>[^\s,]+))?')
# Frames in these folders are library code, not the user's: a frame whose
# directory path holds one of them is skipped, except the shipped example models.
_SITE_DIRS = ("site-packages", "dist-packages")
_USER_LIKE_DIRS = (("attn_compiler", "models"),)


@dataclasses.dataclass
class Site:
    """One attention site: fused into the op, or declined with a reason."""

    status: str                       # FUSED | DECLINED
    reason: str = ""                  # why it was declined; "" when fused
    location: str = UNKNOWN_LOCATION  # "model.py:42 in forward"
    features: Dict[str, Any] = dataclasses.field(default_factory=dict)
    graph_id: Optional[int] = None    # which compiled graph (dynamo frame) it was in
    ordinal: int = 0                  # its number within that graph

    def __post_init__(self) -> None:
        if self.status not in (FUSED, DECLINED):
            raise ValueError(f"Site.status must be {FUSED!r} or {DECLINED!r}, not {self.status!r}")

    @property
    def fused(self) -> bool:
        return self.status == FUSED


def _basename(path: str) -> str:
    """File name of a POSIX or Windows path."""
    return re.split(r"[\\/]", path)[-1]


def _is_library_frame(path: str) -> bool:
    path = path.replace("\\", "/")
    dirs = path.split("/")[:-1]
    for user_dirs in _USER_LIKE_DIRS:
        n = len(user_dirs)
        if any(tuple(dirs[i:i + n]) == user_dirs for i in range(len(dirs) - n + 1)):
            return False
    if "attn_compiler" in dirs:
        return True
    # torch itself: its installed package folder, not any folder called "torch"
    # (a virtual environment under /opt/torch/ holds user code too)
    if any(a in _SITE_DIRS and b == "torch" for a, b in zip(dirs, dirs[1:])):
        return True
    torch_mod = sys.modules.get("torch")
    root = os.path.dirname(getattr(torch_mod, "__file__", "") or "")
    return bool(root) and path.startswith(root.replace("\\", "/") + "/")


def location_from_stack_trace(stack_trace: Optional[str]) -> str:
    """``"model.py:42 in forward"`` for the innermost frame of the user's code.

    ``stack_trace`` is an FX node's ``meta["stack_trace"]`` (a Python traceback
    text, outermost frame first). Frames inside torch or attn_compiler are
    skipped; ``"<unknown>"`` when no frame is left.
    """
    if not stack_trace:
        return UNKNOWN_LOCATION
    for m in reversed(list(_FRAME.finditer(stack_trace))):
        if _is_library_frame(m["file"]):
            continue
        where = f"{_basename(m['file'])}:{m['line']}"
        return f"{where} in {m['func']}" if m["func"] else where
    return UNKNOWN_LOCATION


# ---------------------------------------------------------------------------
# registry

_lock = threading.Lock()
_sites: List[Site] = []


def record(site: Site) -> None:
    """Add one site to the process-wide registry."""
    with _lock:
        _sites.append(site)
    log.debug("attention site %s at %s %s", site.status, site.location, site.reason)


def report() -> "Report":
    """A snapshot of the sites recorded since the last :func:`reset`."""
    with _lock:
        return Report(_sites)


def reset() -> None:
    """Forget every recorded site."""
    with _lock:
        _sites.clear()


# ---------------------------------------------------------------------------
# rendering

COLUMNS = ("#", "status", "location", "mask", "score mod", "scale", "GQA",
           "dropout", "dtypes", "shapes", "reason")
_EXPR_WIDTH = 40     # sympy expressions are cut to this many characters
_REASON_WIDTH = 44   # reasons are wrapped at this width
_SHORT_DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32",
                 "float64": "fp64", "float8_e4m3fn": "fp8e4m3", "float8_e5m2": "fp8e5m2"}


def _shorten(text: Any, width: int = _EXPR_WIDTH) -> str:
    """One line of at most ``width`` characters, cut in the middle."""
    s = " ".join(str(text).split())
    if len(s) <= width:
        return s
    keep = width - 3
    return s[: (keep + 1) // 2] + "..." + s[len(s) - keep // 2:]


def _dash(value: Any) -> bool:
    return value is None or value == "" or value is False


def _fmt_number(value: Any) -> str:
    if _dash(value):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return _shorten(value, 24)


def _fmt_dtype(d: Any) -> str:
    name = str(d).replace("torch.", "")
    return _SHORT_DTYPES.get(name, name)


def _fmt_dtypes(value: Any) -> str:
    if _dash(value):
        return "-"
    if isinstance(value, Mapping):
        return "\n".join(f"{k} {_fmt_dtype(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple, set)):
        names = [_fmt_dtype(v) for v in value]
        return ",".join(dict.fromkeys(names))  # keep order, drop repeats
    return _fmt_dtype(value)


def _fmt_shape(shape: Any) -> str:
    if isinstance(shape, (list, tuple)) or type(shape).__name__ == "Size":
        return "x".join(str(s) for s in shape)
    return _shorten(shape, 24)


def _fmt_shapes(value: Any) -> str:
    if _dash(value):
        return "-"
    if isinstance(value, Mapping):
        return "\n".join(f"{k} {_fmt_shape(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], (list, tuple)):
        return "\n".join(_fmt_shape(v) for v in value)
    return _fmt_shape(value)


def _row(i: int, site: Site) -> List[str]:
    f = site.features
    gqa = f.get("gqa_group")
    return [
        str(i),
        site.status,
        site.location,
        "-" if _dash(f.get("mask")) else _shorten(f["mask"]),
        "-" if _dash(f.get("score_mod")) else _shorten(f["score_mod"]),
        _fmt_number(f.get("scale")),
        "-" if gqa in (None, 1) else str(gqa),
        "-" if f.get("dropout") in (None, 0, 0.0) else _fmt_number(f["dropout"]),
        _fmt_dtypes(f.get("dtypes")),
        _fmt_shapes(f.get("shapes")),
        textwrap.fill(" ".join(site.reason.split()), _REASON_WIDTH) if site.reason else "",
    ]


TUNE_COLUMNS = ("#", "pass", "candidates", "choice", "TFLOP/s", "% peak", "vs original", "vs SDPA", "kernels")
PEAK_TFLOPS = 798.0   # dense bf16 matmul measured on the H200 (ENVIRONMENT.md)


BWD_FACTOR = 2.5   # backward FLOPs / forward FLOPs (dQ, dK, dV and the recomputed scores)


def attention_flops(B: int, H: int, Lq: int, Lk: int, D: int, causal: bool, bwd: bool) -> float:
    """The FLOPs TFLOP/s figures count (here and in bench/): 4·B·H·Lq·Lk·D for
    the forward (Q·Kᵀ and P·V), halved under a causal mask; ×3.5 with the backward."""
    fwd = 4.0 * B * H * Lq * Lk * D * (0.5 if causal else 1.0)
    return fwd * (1.0 + BWD_FACTOR) if bwd else fwd


def site_flops(f: Mapping[str, Any]) -> Optional[float]:
    """``attention_flops`` of a fused site's features (None without shapes)."""
    shapes = f.get("shapes") or {}
    try:
        B, H, Lq, D = (int(x) for x in shapes["q"])
        Lk = int(shapes["k"][2])
    except (KeyError, TypeError, ValueError):
        return None
    return attention_flops(B, H, Lq, Lk, D, str(f.get("mask", "")).startswith("causal"), bool(f.get("training")))


def _tune_row(i: int, site: Site) -> List[str]:
    f = site.features
    times = f["times_ms"]
    choice = f.get("choice", "")
    best = times.get(choice)
    errors = f.get("errors") or {}
    cand = "\n".join(f"{k} {v:.3f}" if v is not None
                     else f"{k} {'rejected' if 'rejected' in errors.get(k, '') else 'failed'}"
                     for k, v in times.items())
    flops = site_flops(f)
    tf = flops / (best * 1e-3) / 1e12 if flops and best else None

    def ratio(name):
        other = times.get(name)
        return f"{other / best:.2f}x" if other and best else "-"
    kernels = f.get("kernels") or {}
    return [str(i), "fwd+bwd" if f.get("training") else "fwd", cand, choice,
            "-" if tf is None else f"{tf:.1f}", "-" if tf is None else f"{100 * tf / PEAK_TFLOPS:.0f}%",
            ratio("original"), ratio("sdpa"), "\n".join(f"{k} {v}" for k, v in kernels.items()) or "-"]


def _plain(value: Any) -> Any:
    """``value`` made of JSON types only (sympy, torch and other objects as str)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)) or type(value).__name__ == "Size":
        return [_plain(v) for v in value]
    return str(value)


class Report(list):
    """The recorded sites (a list of :class:`Site`); ``str()`` gives a table."""

    def __init__(self, sites: Iterable[Site] = ()) -> None:
        super().__init__(sites)

    @property
    def fused(self) -> List[Site]:
        return [s for s in self if s.status == FUSED]

    @property
    def declined(self) -> List[Site]:
        return [s for s in self if s.status == DECLINED]

    def summary(self) -> str:
        """``"3 attention sites: 2 fused, 1 declined"``."""
        n = len(self)
        return (f"{n} attention site{'' if n == 1 else 's'}: "
                f"{len(self.fused)} fused, {len(self.declined)} declined")

    def to_dicts(self) -> List[Dict[str, Any]]:
        """One plain dict per site (JSON-serialisable)."""
        return [_plain(dataclasses.asdict(s)) for s in self]

    def __str__(self) -> str:
        if not self:
            return "attn_compiler: no attention sites recorded"
        from tabulate import tabulate

        rows = [_row(i, s) for i, s in enumerate(self)]
        table = tabulate(rows, headers=COLUMNS, tablefmt="simple", disable_numparse=True)
        tuned = [_tune_row(i, s) for i, s in enumerate(self) if s.features.get("times_ms")]
        if tuned:
            table += "\n\nautotune (median ms of each candidate; TFLOP/s of the choice)\n" + tabulate(
                tuned, headers=TUNE_COLUMNS, tablefmt="simple", disable_numparse=True)
        return f"{self.summary()}\n{table}"

    def __repr__(self) -> str:
        return f"Report({list.__repr__(self)})"


class _CallableModule(types.ModuleType):
    """``attn_compiler.report`` is this module and the function :func:`report`."""

    def __call__(self) -> Report:
        return report()


sys.modules[__name__].__class__ = _CallableModule
