"""The torch.compile backend: fuse attention sites, then hand the graph on.

``torch.compile(m, backend="attn_compiler")`` (entry point; torch.compile's
``mode=`` and ``options=`` go to inductor as they would without us) or
``torch.compile(m, backend=attn_compiler.backend(inner="aot_eager"))``.
Every dynamo graph goes through the attention pass (passes/pipeline.py); the
rewritten graph is then compiled by the inner compiler (inductor by default).
"""
from __future__ import annotations

import itertools
import logging
from typing import Any, Callable

from .report import record
from ._compat import inductor_patches, inductor_with_mode, lookup_inner_backend

log = logging.getLogger("attn_compiler")
_graph_ids = itertools.count()


def backend(inner: str = "inductor", **options: Any) -> Callable:
    """A backend ``(gm, example_inputs) -> callable`` that fuses attention and
    compiles everything else with ``inner`` ("inductor", "aot_eager", "eager"
    or any dynamo backend callable).  ``mode`` ("reduce-overhead" for CUDA
    graphs, "max-autotune", ...) and ``options`` (inductor config patches) go
    to inductor as torch.compile's would."""
    mode = options.pop("mode", None)
    patches = options.pop("options", None)
    if options:
        raise TypeError(f"unknown attn_compiler backend options: {sorted(options)}")
    if mode == "default":
        mode = None
    if (mode is not None or patches) and inner != "inductor":
        raise ValueError(f"mode={mode!r} / options need inner='inductor' (got {inner!r})")
    if mode is not None or patches:
        inner_fn = inductor_with_mode(mode, patches)
    else:
        inner_fn = lookup_inner_backend(inner)

    def attn_compiler(gm, example_inputs):
        from attn_compiler.passes.choose import cuda_graphs
        from attn_compiler.passes.pipeline import attention_pass

        gid = next(_graph_ids)
        try:
            with cuda_graphs(_runs_as_cuda_graphs(inner, mode, patches)):
                sites = attention_pass(gm, example_inputs, gid)
        except Exception as e:  # noqa: BLE001 - never break the user's model on our account
            log.warning("attention pass skipped for graph %d after an internal error: %r", gid, e,
                        exc_info=log.isEnabledFor(logging.DEBUG))
            sites = []
        for site in sites:
            record(site)
        return inner_fn(gm, example_inputs)

    return attn_compiler


def _runs_as_cuda_graphs(inner, mode=None, patches=None) -> bool:
    """Whether the inner compiler will run the graph as CUDA-graph replays
    (the never-slower choice then ignores host cost: [Note: host cost without
    CUDA graphs] in passes/choose.py)."""
    if inner == "inductor":
        import torch._inductor.config as config

        return bool(inductor_patches(mode, patches).get("triton.cudagraphs", config.triton.cudagraphs))
    return inner == "cudagraphs"


def attn_compiler_backend(gm, example_inputs, mode=None, options=None):
    """The backend of ``torch.compile(m, backend="attn_compiler")``; torch.compile
    passes its ``mode`` and ``options`` (inductor's, as without us)."""
    return backend(mode=mode, options=options)(gm, example_inputs)
