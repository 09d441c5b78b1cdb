"""The one place for private torch imports and version checks.

Every ``torch._dynamo`` / ``torch._inductor`` access of the package goes
through here, so a torch upgrade touches one file. Supported: torch 2.11 (the
GPU machine) through 2.13 (CPU and CI). The private modules are imported
inside the functions, so importing this module costs only ``import torch``.
"""
from __future__ import annotations

import re
from typing import Callable, Optional, Tuple, Union

import torch

MIN_TORCH = (2, 11)


def _parse_version(text: str) -> Tuple[int, int, int]:
    """``"2.13.0+cpu"`` / ``"2.11.0a0+git1234"`` -> ``(2, 13, 0)``."""
    parts = [int(m) for m in re.findall(r"\d+", text.split("+")[0])[:3]]
    return tuple(parts + [0] * (3 - len(parts)))  # type: ignore[return-value]


TORCH_VERSION: Tuple[int, int, int] = _parse_version(torch.__version__)

# Inner compilers the backend hands the rewritten graph to.
INNER_BACKENDS = ("inductor", "aot_eager", "eager")


def torch_at_least(major: int, minor: int) -> bool:
    """Whether the running torch is ``major.minor`` or newer."""
    return TORCH_VERSION[:2] >= (major, minor)


def lookup_inner_backend(name: Union[str, Callable]) -> Callable:
    """The dynamo backend called ``name`` (``"inductor"``, ``"aot_eager"``,
    ``"eager"``, or any registered name); a callable is returned as is."""
    if callable(name):
        return name
    from torch._dynamo import lookup_backend

    try:
        return lookup_backend(name)
    except Exception as exc:  # dynamo raises InvalidBackend; keep the name in the message
        raise ValueError(
            f"unknown inner backend {name!r}; use one of {', '.join(INNER_BACKENDS)} "
            "or a callable backend(gm, example_inputs)"
        ) from exc


def inductor_patches(mode: Optional[str], options: Optional[dict] = None) -> dict:
    """Inductor config patches of a ``torch.compile`` mode ("default",
    "reduce-overhead" (CUDA graphs), "max-autotune"...) and ``options`` (which
    win), as ``torch.compile(..., mode=, options=)`` gives inductor."""
    from torch._inductor import list_mode_options

    return {**(list_mode_options(mode) if mode else {}), **(options or {})}


def inductor_with_mode(mode: Optional[str], options: Optional[dict] = None) -> Callable:
    """Inductor as the inner compiler with a ``torch.compile`` mode and options."""
    from torch._inductor.compile_fx import compile_fx

    patches = inductor_patches(mode, options)

    def inner(gm, example_inputs):
        return compile_fx(gm, example_inputs, config_patches=patches)
    return inner


def compile_nested(gm, example_inputs) -> Callable:
    """Inductor (default options) on ``gm`` and real ``example_inputs`` while
    dynamo is compiling an enclosing frame: outside that frame's tracing
    context (its fake mode) and with compile metrics of its own (dynamo raises
    at the end of the frame's compile when a metric is set twice); the
    backward is compiled now, not at its first call (which would land in
    whatever compile is running then).  Raises RuntimeError where this torch
    keeps its metrics elsewhere."""
    from torch._dynamo import utils as dynamo_utils
    from torch._dynamo.metrics_context import MetricsContext
    from torch._functorch import config as functorch_config
    from torch._guards import tracing
    from torch._inductor.compile_fx import compile_fx

    tls = getattr(dynamo_utils, "_metrics_context_tls", None)
    if tls is None:
        raise RuntimeError("cannot keep a nested compile's metrics apart on this torch")
    saved = tls.__dict__.get("metrics_context")
    tls.metrics_context = MetricsContext(on_exit=lambda *args: None)
    try:
        with tracing(None), functorch_config.patch(force_non_lazy_backward_lowering=True):
            return compile_fx(gm, list(example_inputs))
    finally:
        if saved is None:
            del tls.metrics_context
        else:
            tls.metrics_context = saved


def is_fake_tensor(x) -> bool:
    """Whether ``x`` is a fake tensor (shapes only, no data)."""
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(x, FakeTensor)


def reset_dynamo() -> None:
    """Drop dynamo's compiled-code caches (so the next call compiles again)."""
    import torch._dynamo

    torch._dynamo.reset()


def cuda_available() -> bool:
    """Whether a CUDA device can run kernels here."""
    return torch.cuda.is_available()
