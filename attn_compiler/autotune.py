"""Autotuning: kernel configs, their pruned search spaces, a persistent cache of
choices, and :func:`tune`, which times candidates and keeps the fastest correct one.

Entry points: :func:`config_space` (what to try), :func:`default_config` (what
to run when tuning is off or a CUDA graph is being captured), :func:`tune`
(time once per shape bucket, then answer from :class:`TuneCache`).

Notation::

    M       block_m: query rows one program owns (decode: rows of the packed
            query group, the kernel pads them to M)
    N       block_n: key/value rows per step of the inner loop
    D       head_dim rounded up to a power of two (the tile width Triton needs)
    w, s    num_warps, num_stages (software-pipelining depth of the K/V loads)
    ptr     K/V loaded through pointer arithmetic (every GPU)
    tma     tiles loaded through tensor descriptors (Hopper's TMA unit): K/V,
            learned-bias planes and key-padding rows in fwd; in bwd the bias
            planes, or without a query-by-key term Q, dO, K and V
    fused   dK/dV and dQ programs in one launch (bwd; ptr: two launches)
    paired  one launch, program j doing dK/dV of KV block j and dQ of query block j
            (bwd; equal work per program under a causal mask)
    +dQ     bwd with two launches: the dQ launch's own tile, ``64x64 w4 s2 ptr
            +dQ 128x64 w8 s3`` (dQ: 128 query rows, 64 keys per step)
    k/SM    decode: the split count aims at k programs per multiprocessor
            (``16x128 w4 s3 ptr 1/SM``); without it, ``DECODE_PROGRAMS_PER_SM``
    family  "fwd" (attention forward), "bwd" (dQ, dK, dV), "decode" (few query
            rows against a long KV cache)

A config reads ``128x64 w8 s3 ptr`` (M x N, warps, stages, variant). Each
family's space is a cross product pruned by named rules (``FWD_RULES`` ...);
:func:`pruned_configs` says which rule dropped each config.

Not a variant: Triton's automatic warp specialization (``tl.range(...,
warp_specialize=True)``).  With Triton 3.6 on the H200 it made a minimal
forward 4 % faster without a mask, but our forward's loop came out wrong on
every case, a probe faulted and another hung (bench/RESULTS.md runs 32-34).

Cache keys (:func:`make_key`) hold the family, the caller's spec hash (which
must cover everything that changes the generated kernel: the attention spec,
the template source, generator options), the shape bucket, the GPU name and
the Triton version. Lengths are bucketed to powers of two, so dynamic sequence
lengths reuse one tuning. ``ATTN_COMPILER_AUTOTUNE=0`` turns tuning off.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import functools
import itertools
import json
import logging
import math
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

import torch

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent writers may lose an entry
    fcntl = None

log = logging.getLogger("attn_compiler")

FAMILIES = ("fwd", "bwd", "decode")
# cache keys also hold whole-site choices (ours vs SDPA vs the original subgraph)
KEY_FAMILIES = FAMILIES + ("site",)
VARIANTS = ("ptr", "tma", "fused", "paired")
# the variants each family's space holds (tma: Hopper only)
FAMILY_VARIANTS = {"fwd": ("ptr", "tma"), "bwd": ("ptr", "fused", "paired", "tma"), "decode": ("ptr",)}
SMEM_BYTES = 227 * 1024  # largest shared memory one block may use on sm_90 (H100/H200)
CACHE_VERSION = 1  # bump when the layout of autotune.json changes


def next_pow2(n: int) -> int:
    """Smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def _pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


# ---------------------------------------------------------------------------
# configs


def _check_tile(block_m, block_n, num_warps, num_stages) -> None:
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if not (isinstance(value, int) and value >= 16 and _pow2(value)):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot's smallest tile), got {value!r}")
    if not (isinstance(num_warps, int) and _pow2(num_warps) and num_warps <= 32):
        raise ValueError(f"num_warps must be a power of two <= 32, got {num_warps!r}")
    if not (isinstance(num_stages, int) and num_stages >= 1):
        raise ValueError(f"num_stages must be an int >= 1, got {num_stages!r}")


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """One launch configuration of an attention kernel (see the notation above)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    variant: str = "ptr"
    # bwd with two launches (ptr, tma): the dQ launch's own (query rows, key
    # step, warps, stages); () runs dQ on the mirror of this tile (block_n query
    # rows, block_m keys per step) with the same warps and stages
    dq: tuple[int, ...] = ()
    # decode: program slots per multiprocessor the split-KV count fills (fewer
    # slots, fewer and longer splits); 0: the launcher's default
    per_sm: int = 0

    def __post_init__(self) -> None:
        _check_tile(self.block_m, self.block_n, self.num_warps, self.num_stages)
        if not isinstance(self.per_sm, int) or not 0 <= self.per_sm <= 32:
            raise ValueError(f"per_sm must be an int in 0..32, got {self.per_sm!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if not isinstance(self.dq, tuple):
            object.__setattr__(self, "dq", tuple(self.dq))   # a JSON list from the cache
        if self.dq:
            if len(self.dq) != 4:
                raise ValueError(f"dq must be (block_m, block_n, num_warps, num_stages), got {self.dq!r}")
            _check_tile(*self.dq)
            if self.variant in ("fused", "paired"):
                raise ValueError(f"the {self.variant} variant runs dQ on the mirrored tile: no dq tile")

    def __str__(self) -> str:
        text = f"{self.block_m}x{self.block_n} w{self.num_warps} s{self.num_stages} {self.variant}"
        if self.dq:
            m, n, w, s = self.dq
            text += f" +dQ {m}x{n} w{w} s{s}"
        if self.per_sm:
            text += f" {self.per_sm}/SM"
        return text

    def dq_launch(self) -> tuple[int, int, int, int]:
        """(query rows, key step, warps, stages) of the backward's dQ launch."""
        return self.dq or (self.block_n, self.block_m, self.num_warps, self.num_stages)

    def dq_as_tile(self) -> KernelConfig:
        """The config whose mirror is the dQ launch (for the prune rules)."""
        m, n, w, s = self.dq_launch()
        return KernelConfig(n, m, w, s)

    def as_dict(self) -> dict[str, object]:
        """JSON-ready fields; ``dq`` (a list) and ``per_sm`` only when set."""
        data = dataclasses.asdict(self)
        if self.dq:
            data["dq"] = list(self.dq)
        else:
            del data["dq"]
        if not self.per_sm:
            del data["per_sm"]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> KernelConfig:
        """Inverse of :meth:`as_dict`; unknown keys are an error (a stale cache entry)."""
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown KernelConfig fields: {sorted(unknown)}")
        return cls(**data)  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class Problem:
    """What the prune rules look at: the attention problem, not the tile."""

    head_dim: int
    dtype: torch.dtype
    lq: int
    lk: int
    causal: bool
    hopper: bool
    # bytes per element of the learned-bias planes the forward streams beside
    # K and V (one (M, N) tile per plane and stage); 0 without such planes
    plane_bytes: int = 0

    @property
    def d(self) -> int:
        """Tile width along the head dim (D in the notation)."""
        return next_pow2(self.head_dim)

    @property
    def elem_bytes(self) -> int:
        return self.dtype.itemsize


Rule = tuple[str, Callable[[KernelConfig, Problem], bool]]  # predicate True: drop the config


def _fwd_smem(c: KernelConfig, p: Problem) -> int:
    """Q tile resident, K and V tiles in ``num_stages`` buffers each, and the
    bias planes' (M, N) tiles as deep (128x128 w8 s3 with a bf16 plane: 288 KiB).
    Float32 holds a second Q tile (the split operands of its 3xTF32 products):
    compiled for sm_90, 64x32 w4 s2 at D=256 asked for 256 KiB where the sum
    without it is 192 (the H200 refused it, and every float32 site with a head
    dim over 128 ran the reference)."""
    return ((c.block_m * p.d * (2 if p.elem_bytes == 4 else 1) + 2 * c.num_stages * c.block_n * p.d) * p.elem_bytes
            + p.plane_bytes * c.block_m * c.block_n * c.num_stages)


def _bwd_smem(c: KernelConfig, p: Problem) -> int:
    """The dK/dV loop: K, V of block_n keys resident, Q and dO of block_m rows
    streamed ``num_stages`` deep.  (The dQ loop, Q and dO resident and K, V
    streamed, is the same sum on its mirrored tile; a separate dQ tile is
    checked as its own config, see :func:`first_failing_rule`.)"""
    return (2 * c.block_n * p.d + 2 * c.num_stages * c.block_m * p.d) * p.elem_bytes


# Head dims above 128 (D = 256): the fp32 accumulators alone fill most of the
# register file, so only small tiles and shallow pipelines avoid spilling.
FWD_RULES: tuple[Rule, ...] = (
    # a query tile much taller than the queries: idle rows (64 is the smallest M)
    ("block_m_over_lq", lambda c, p: c.block_m > next_pow2(p.lq) and c.block_m > 64),
    ("block_n_over_lk", lambda c, p: c.block_n > next_pow2(p.lk) and c.block_n > 32),
    # causal: an N wider than M makes every diagonal block mostly masked
    ("causal_wide_n", lambda c, p: p.causal and c.block_n > c.block_m),
    # Hopper: two warpgroups only pay off on a 128x128 tile (Triton's 06 tutorial)
    ("hopper_8warps_small_tile",
     lambda c, p: p.hopper and c.num_warps == 8 and c.block_m * c.block_n < 128 * 128),
    ("smem", lambda c, p: _fwd_smem(c, p) > SMEM_BYTES),
    ("big_head_dim",
     lambda c, p: p.head_dim > 128 and (c.block_m * c.block_n > 64 * 64 * 2 or c.num_stages > 2)),
    # one stage (no loads ahead) only where two do not fit (float32 over 128
    # wide, whose Q tile is held twice: ``_fwd_smem``)
    ("one_stage", lambda c, p: c.num_stages == 1
     and _fwd_smem(dataclasses.replace(c, num_stages=2), p) <= SMEM_BYTES),
)

BWD_RULES: tuple[Rule, ...] = (
    ("block_m_over_lq", lambda c, p: c.block_m > next_pow2(p.lq) and c.block_m > 32),
    ("block_n_over_lk", lambda c, p: c.block_n > next_pow2(p.lk) and c.block_n > 32),
    ("smem", lambda c, p: _bwd_smem(c, p) > SMEM_BYTES),
    ("big_head_dim",
     lambda c, p: p.head_dim > 128 and (c.block_m * c.block_n > 64 * 64 or c.num_stages > 2)),
)

DECODE_RULES: tuple[Rule, ...] = (
    ("block_n_over_lk", lambda c, p: c.block_n > next_pow2(p.lk) and c.block_n > 32),
    # fewer than 4 scores per thread: the extra warps only add reduction traffic
    ("warps_over_tile", lambda c, p: c.num_warps * 32 * 4 > c.block_m * c.block_n),
    ("smem", lambda c, p: _fwd_smem(c, p) > SMEM_BYTES),
    ("big_head_dim", lambda c, p: p.head_dim > 128 and c.block_n > 128),
)

PRUNE_RULES: dict[str, tuple[Rule, ...]] = {"fwd": FWD_RULES, "bwd": BWD_RULES, "decode": DECODE_RULES}

# The cross products the rules prune: (block_m, block_n, num_warps, num_stages).
_AXES = {
    "fwd": ((64, 128), (32, 64, 128), (4, 8), (1, 2, 3, 4)),
    "bwd": ((32, 64, 128), (32, 64, 128), (4, 8), (1, 2, 3)),
    "decode": ((16,), (32, 64, 128, 256), (2, 4, 8), (2, 3, 4)),
}

def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown kernel family {family!r}; use one of {', '.join(FAMILIES)}")


def first_failing_rule(family: str, config: KernelConfig, problem: Problem) -> str | None:
    """Name of the first rule of ``family`` that drops ``config``, or None if it is kept."""
    _check_family(family)
    rule = next((name for name, drops in PRUNE_RULES[family] if drops(config, problem)), None)
    if rule is None and family == "bwd" and config.dq:
        dq = config.dq_as_tile()
        rule = next((f"dq_{name}" for name, drops in PRUNE_RULES[family] if drops(dq, problem)), None)
    return rule


def _full_space(family: str, hopper: bool) -> list[KernelConfig]:
    variants = tuple(v for v in FAMILY_VARIANTS[family] if hopper or v != "tma")
    return [KernelConfig(m, n, w, s, v)
            for v in variants for m, n, w, s in itertools.product(*_AXES[family])]


def pruned_configs(family: str, *, head_dim: int, dtype: torch.dtype, lq: int, lk: int,
                   causal: bool, hopper: bool) -> dict[KernelConfig, str]:
    """``{config: rule name}`` for each config of the full space that a rule drops."""
    _check_family(family)
    problem = Problem(head_dim, dtype, lq, lk, causal, hopper)
    dropped = {c: first_failing_rule(family, c, problem) for c in _full_space(family, hopper)}
    return {c: rule for c, rule in dropped.items() if rule is not None}


def config_space(family: str, *, head_dim: int, dtype: torch.dtype, lq: int, lk: int,
                 causal: bool, hopper: bool) -> list[KernelConfig]:
    """The configs worth timing for one problem: the family's cross product
    (``tma`` only on Hopper) less what the family's rules drop."""
    _check_family(family)
    problem = Problem(head_dim, dtype, lq, lk, causal, hopper)
    return [c for c in _full_space(family, hopper) if first_failing_rule(family, c, problem) is None]


@functools.lru_cache(maxsize=1024)       # launches without a config ask per call
def default_config(family: str, head_dim: int, dtype: torch.dtype, causal: bool = False,
                   hopper: bool = False) -> KernelConfig:
    """One good config without timing (tuning off, or under CUDA-graph capture).

    The table's pick is made to fit shared memory for ``dtype`` (fp32 tiles take
    twice the bytes) by lowering ``num_stages``, then halving ``block_n``, then ``block_m``. It is
    not always inside :func:`config_space`: Hopper's fwd pick for D <= 128 uses
    8 warps on a 128x64 tile, which the rule ``hopper_8warps_small_tile`` drops,
    and fitting fp32 with a large D can go below the space's fewest stages.
    """
    _check_family(family)
    if dtype == torch.float32:
        # 3xTF32 products keep split copies of the operands, which the shared-
        # memory estimate does not count (a 128x64 tile at D=128 asked the H200
        # for 320 KiB): small tiles
        cfg = {"fwd": KernelConfig(64, 32, 4, 2), "bwd": KernelConfig(32, 32, 4, 1),
               "decode": KernelConfig(16, 32, 4, 2)}[family]
    elif family == "fwd":
        if head_dim <= 64:
            cfg = KernelConfig(128, 64, 4, 3)
        elif head_dim <= 128:
            cfg = KernelConfig(128, 64, 8, 3) if hopper else KernelConfig(128, 64, 4, 2)
        else:
            cfg = KernelConfig(64, 32, 4, 2)
    elif family == "bwd":
        cfg = KernelConfig(64, 64, 4, 2) if head_dim <= 128 else KernelConfig(32, 32, 4, 1)
    elif head_dim <= 128:
        # 16x128 w4 s3, splits for one program per SM: B=1 / B=8 at KV 32k with
        # 32 over 8 heads ran 37.0 / 246.7 µs where 16x64 w4 s3 with the
        # launcher's 4 per SM ran 46.7 / 282.5 (bench/RESULTS.md run 12)
        cfg = KernelConfig(16, 128, 4, 3, per_sm=1)
    else:
        cfg = KernelConfig(16, 64, 4, 3)
    problem = Problem(head_dim, dtype, cfg.block_m, cfg.block_n, causal, hopper)
    smem = dict(PRUNE_RULES[family])["smem"]
    while smem(cfg, problem):
        if cfg.num_stages > 1:
            cfg = dataclasses.replace(cfg, num_stages=cfg.num_stages - 1)
        elif cfg.block_n > 16:
            cfg = dataclasses.replace(cfg, block_n=cfg.block_n // 2)
        elif cfg.block_m > 16:
            cfg = dataclasses.replace(cfg, block_m=cfg.block_m // 2)
        else:  # D so large that nothing fits; let the compiler report it
            break
    return cfg


# ---------------------------------------------------------------------------
# keys


class ShapeBucket(NamedTuple):
    """Shapes that share one tuning: ``bh`` = B*Hq and the lengths rounded up to
    powers of two (lengths at least 16); group (Hq/Hkv), head dims, dtype exact."""

    bh: int
    group: int
    lq: int
    lk: int
    d: int
    dv: int
    dtype: str

    def __str__(self) -> str:
        return (f"bh{self.bh} g{self.group} lq{self.lq} lk{self.lk} "
                f"d{self.d} dv{self.dv} {self.dtype}")


def tf32_allowed() -> bool:
    """Whether PyTorch lets float32 matmuls run in TF32
    (``torch.get_float32_matmul_precision()`` below "highest", as
    ``allow_tf32 = True`` sets it): the kernels' float32 tiles then multiply in
    one tf32 product (``kernels._dot_precision``), and their tuning, launch
    plans and agreement (``testing.disagreement``) follow."""
    return torch.get_float32_matmul_precision() != "highest"


def shape_bucket(B: int, Hq: int, Hkv: int, Lq: int, Lk: int, D: int, Dv: int,
                 dtype: torch.dtype) -> ShapeBucket:
    """The bucket of one attention call (Q ``(B, Hq, Lq, D)``, K ``(B, Hkv, Lk, D)``,
    V ``(B, Hkv, Lk, Dv)``)."""
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"Hq={Hq} must be a multiple of Hkv={Hkv}")
    name = str(dtype).removeprefix("torch.")
    if dtype == torch.float32 and tf32_allowed():
        name += "-tf32"       # the kernels' products follow PyTorch's float32 matmul precision
    return ShapeBucket(next_pow2(B * Hq), Hq // Hkv, max(16, next_pow2(Lq)), max(16, next_pow2(Lk)),
                       int(D), int(Dv), name)


def gpu_name(device: int | None = None) -> str:
    """``torch.cuda.get_device_name(device)``, or ``"cpu"`` without a CUDA GPU."""
    return torch.cuda.get_device_name(device) if torch.cuda.is_available() else "cpu"


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "none"
    return triton.__version__


_SEP = "|"


class TuneKey(NamedTuple):
    """The parts of a cache key; ``str(key)`` is the key, :meth:`parse` reads it back."""

    family: str
    spec_hash: str
    bucket: str
    gpu: str
    triton: str

    def __str__(self) -> str:
        return _SEP.join(self)

    @classmethod
    def parse(cls, text: str) -> TuneKey | None:
        parts = text.split(_SEP)
        return cls(*parts) if len(parts) == len(cls._fields) else None


def make_key(family: str, spec_hash: str, bucket: ShapeBucket, *, gpu: str | None = None,
             triton: str | None = None) -> str:
    """The cache key of one tuning; ``gpu`` and ``triton`` default to this machine's."""
    if family not in KEY_FAMILIES:
        raise ValueError(f"unknown key family {family!r}; use one of {', '.join(KEY_FAMILIES)}")
    if _SEP in spec_hash:
        raise ValueError(f"spec_hash must not contain {_SEP!r}: {spec_hash!r}")
    gpu = (gpu_name() if gpu is None else gpu).replace(_SEP, "/")
    return str(TuneKey(family, spec_hash, str(bucket), gpu, triton or triton_version()))


# ---------------------------------------------------------------------------
# persistent cache


def tuning_enabled() -> bool:
    """False when ``ATTN_COMPILER_AUTOTUNE`` is ``0``/``false``/``no``/``off``."""
    value = os.environ.get("ATTN_COMPILER_AUTOTUNE", "1").strip().lower()
    return value not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    """``$ATTN_COMPILER_CACHE_DIR``, else ``$XDG_CACHE_HOME/attn_compiler``,
    else ``~/.cache/attn_compiler``."""
    if os.environ.get("ATTN_COMPILER_CACHE_DIR"):
        return Path(os.environ["ATTN_COMPILER_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "attn_compiler"


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    """Changes whenever the file is replaced or rewritten; None if it is missing."""
    try:
        st = os.stat(path)
    except OSError:  # missing, or its folder is not one: nothing to read
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class TuneCache:
    """Tuning results in a JSON file, ``{"version": 1, "entries": {key: entry}}``.

    An entry is ``{"choice", "config", "times_ms", "errors", "created"}`` (see
    :func:`tune`). Reads are served from memory until the file changes. A put
    takes an exclusive lock on ``<file>.lock``, re-reads, merges and replaces
    the file atomically, so processes tuning at once keep each other's entries.
    An unreadable file is logged once and treated as empty; the next put
    rewrites it. A file that cannot be written keeps results for this process.
    """

    def __init__(self, path: os.PathLike | None = None):
        self.path = Path(path) if path is not None else cache_dir() / "autotune.json"
        self._mutex = threading.RLock()
        self._entries: dict[str, dict] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._unsaved: dict[str, dict] = {}  # puts that could not be written
        self._warned: set = set()

    def __repr__(self) -> str:
        return f"TuneCache({str(self.path)!r})"

    def get(self, key: str) -> dict | None:
        with self._mutex:
            self._refresh()
            entry = self._unsaved.get(key, self._entries.get(key))
            return copy.deepcopy(entry)

    def entries(self) -> dict[str, dict]:
        with self._mutex:
            self._refresh()
            return copy.deepcopy({**self._entries, **self._unsaved})

    def put(self, key: str, entry: Mapping[str, object]) -> None:
        entry = json.loads(json.dumps(entry))  # a JSON-clean copy; TypeError for non-JSON values
        with self._mutex:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self._file_lock():
                    entries = self._load()
                    entries[key] = entry
                    self._write(entries)
                    self._entries, self._stamp = entries, _file_stamp(self.path)
            except OSError as exc:
                self._warn_once("write", "cannot write autotune cache %s (%s); results are kept "
                                "for this process only", self.path, exc)
                self._unsaved[key] = entry
            else:
                self._unsaved.pop(key, None)

    def clear(self) -> None:
        """Remove every entry (the file is deleted)."""
        with self._mutex:
            self._unsaved.clear()
            self._entries, self._stamp = {}, None
            if not self.path.parent.is_dir():
                return
            with self._file_lock():
                self.path.unlink(missing_ok=True)

    # -- internals

    def _warn_once(self, kind: str, message: str, *args: object) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning(message, *args)

    def _refresh(self) -> None:
        stamp = _file_stamp(self.path)  # before reading: a newer file only causes a re-read
        if stamp != self._stamp:
            self._entries, self._stamp = self._load(), stamp

    def _load(self) -> dict[str, dict]:
        """The file's entries; ``{}`` (and a warning, once) if it is missing or unusable."""
        try:
            data = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:  # ValueError: bad JSON or bad UTF-8
            problem = f"{type(exc).__name__}: {exc}"
        else:
            if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
                problem = "not an object with an 'entries' object"
            elif data.get("version") != CACHE_VERSION:
                problem = f"version {data.get('version')!r}, expected {CACHE_VERSION}"
            else:
                return {str(k): v for k, v in data["entries"].items() if isinstance(v, dict)}
        self._warn_once("read", "ignoring autotune cache %s (%s); it is rewritten on the next "
                        "tuning result", self.path, problem)
        return {}

    def _write(self, entries: Mapping[str, dict]) -> None:
        """Write to a temporary file in the same folder, then rename it over the cache."""
        try:  # keep the old file's mode; mkstemp's own is private (0600)
            mode = os.stat(self.path).st_mode & 0o777
        except OSError:
            mode = 0o644
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".autotune-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"version": CACHE_VERSION, "entries": entries}, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        if fcntl is None:
            yield
            return
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


_DEFAULT_CACHES: dict[Path, TuneCache] = {}
_DEFAULT_CACHES_LOCK = threading.Lock()


def default_cache() -> TuneCache:
    """The shared cache at the default path (read from the environment on each call)."""
    path = cache_dir() / "autotune.json"
    with _DEFAULT_CACHES_LOCK:
        if path not in _DEFAULT_CACHES:
            _DEFAULT_CACHES[path] = TuneCache(path)
        return _DEFAULT_CACHES[path]


# ---------------------------------------------------------------------------
# tuning


class TuningUnavailable(RuntimeError):
    """Tuning cannot run now (it is off, or a CUDA graph is being captured) and
    nothing is cached: use :func:`default_config`."""


@dataclasses.dataclass(frozen=True)
class Choice:
    """The outcome of :func:`tune`. ``times_ms[name]`` is None for a failed candidate,
    whose message is in ``errors[name]``."""

    name: str
    config: KernelConfig | None
    times_ms: dict[str, float | None]
    errors: dict[str, str]
    from_cache: bool

    def speedup_over(self, name: str) -> float | None:
        """How many times faster the choice is than candidate ``name`` (None if unknown)."""
        other, best = self.times_ms.get(name), self.times_ms.get(self.name)
        if other is None or not best:
            return None
        return other / best


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _do_bench(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` on the current CUDA stream."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def _choice_from_entry(entry: dict | None, candidates: Mapping[str, object]) -> Choice | None:
    """The cached choice, or None when there is none or it no longer applies."""
    if entry is None or entry.get("choice") not in candidates:
        return None
    try:
        raw = entry.get("config")
        config = KernelConfig.from_dict(raw) if raw is not None else None
        times = {str(n): (None if t is None else float(t)) for n, t in entry.get("times_ms", {}).items()}
        errors = {str(n): str(m) for n, m in entry.get("errors", {}).items()}
    except (TypeError, ValueError, AttributeError) as exc:
        log.debug("stale autotune entry %r (%s); tuning again", entry, exc)
        return None
    return Choice(entry["choice"], config, times, errors, from_cache=True)


def _time_candidates(candidates: Mapping[str, Callable[[], object]],
                     check: Callable[[str, object], str | None] | None,
                     bench: Callable[[Callable[[], object]], float],
                     ) -> tuple[dict[str, float | None], dict[str, str]]:
    """Run each candidate once (checked), then time it; failures get a message."""
    times: dict[str, float | None] = {}
    errors: dict[str, str] = {}
    for name, fn in candidates.items():
        times[name] = None
        try:
            result = fn()
            problem = check(name, result) if check is not None else None
            del result  # free it before timing
            if problem:
                errors[name] = f"rejected: {problem}"
                continue
            ms = float(bench(fn))
            if not math.isfinite(ms) or ms < 0:
                errors[name] = f"timing is not a duration: {ms!r}"
                continue
            times[name] = ms
        except Exception as exc:  # a candidate that cannot run is skipped, never chosen
            log.debug("autotune candidate %s failed", name, exc_info=True)
            errors[name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    return times, errors


def tune(key: str, candidates: Mapping[str, Callable[[], object]], *,
         cache: TuneCache | None = None,
         check: Callable[[str, object], str | None] | None = None,
         bench: Callable[[Callable[[], object]], float] | None = None,
         configs: Mapping[str, KernelConfig | None] | None = None,
         prepare: Callable[[], object] | None = None) -> Choice:
    """The fastest correct candidate for ``key`` (see :func:`make_key`).

    ``candidates``: name -> zero-argument callable that runs the computation once.
    ``check(name, result)``: an error string if the result is wrong (the caller
    compares it to a reference), else None. ``bench(fn)``: milliseconds of one
    run; default Triton's ``do_bench`` (median). ``configs``: name -> the
    :class:`KernelConfig` the candidate runs, stored with the choice.
    ``prepare()``: called once before the candidates are timed, not when a
    cached choice answers (the kernels' parallel compile); what it raises is
    logged and ignored.

    A cached choice that is still among ``candidates`` is returned without
    running anything. A candidate that raises or fails ``check`` is never chosen.
    Raises :class:`TuningUnavailable` when tuning is off
    (``ATTN_COMPILER_AUTOTUNE=0``; the cache is not consulted either) or a CUDA
    graph is being captured and nothing is cached; RuntimeError when every
    candidate fails.
    """
    if not candidates:
        raise ValueError(f"tune({key!r}): no candidates")
    if not tuning_enabled():
        raise TuningUnavailable("autotuning is off (ATTN_COMPILER_AUTOTUNE=0)")
    cache = default_cache() if cache is None else cache
    cached = _choice_from_entry(cache.get(key), candidates)
    if cached is not None:
        return cached
    if _capturing():
        raise TuningUnavailable(f"{key}: nothing cached, and timing during CUDA-graph capture "
                                "would break the capture")

    if prepare is not None:
        try:
            prepare()
        except Exception:  # noqa: BLE001 - the timing runs compile what is missing
            log.debug("autotune %s: prepare failed", key, exc_info=True)
    times, errors = _time_candidates(candidates, check, _do_bench if bench is None else bench)
    timed = {name: ms for name, ms in times.items() if ms is not None}
    if not timed:
        listed = "\n".join(f"  {name}: {message}" for name, message in errors.items())
        raise RuntimeError(f"autotune {key}: every candidate failed:\n{listed}")
    best = min(timed, key=timed.__getitem__)  # ties: the first in candidate order
    config = (configs or {}).get(best)
    cache.put(key, {
        "choice": best,
        "config": None if config is None else config.as_dict(),
        "times_ms": times,
        "errors": errors,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })
    log.debug("autotune %s: %s (%.4f ms) of %d candidates", key, best, timed[best], len(times))
    return Choice(best, config, times, errors, from_cache=False)
