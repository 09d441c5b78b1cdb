"""The torch.compile backend: fuse attention sites, then hand the graph on.

``torch.compile(m, backend="attn_compiler")`` (entry point; torch.compile's
``mode=`` and ``options=`` go to inductor as they would without us) or
``torch.compile(m, backend=attn_compiler.backend(inner="aot_eager"))``.
Every dynamo graph goes through the attention pass (passes/pipeline.py); the
rewritten graph is then compiled by the inner compiler (inductor by default).
"""
from __future__ import annotations

import copy
import itertools
import logging
import weakref
from typing import Any, Callable, List, Optional

from .report import record
from ._compat import inductor_patches, inductor_with_mode, lookup_inner_backend

log = logging.getLogger("attn_compiler")
_graph_ids = itertools.count()


def backend(inner: str = "inductor", example_inputs=None, **options: Any) -> Callable:
    """A backend ``(gm, example_inputs) -> callable`` that fuses attention and
    compiles everything else with ``inner`` ("inductor", "aot_eager", "eager"
    or any dynamo backend callable).  ``mode`` ("reduce-overhead" for CUDA
    graphs, "max-autotune", ...) and ``options`` (inductor config patches) go
    to inductor as torch.compile's would.

    ``torch.compile(m, backend=attn_compiler.backend)`` (the factory itself,
    not called) works too: called with a graph, it is the default backend."""
    import torch.fx as fx

    if isinstance(inner, fx.GraphModule):
        return attn_compiler_backend(inner, example_inputs, **options)
    if example_inputs is not None:
        raise TypeError("attn_compiler.backend(inner, **options): example inputs without a graph")
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

    def attn_compiler(gm, example_inputs, **compile_args):
        # torch.compile(m, backend=attn_compiler.backend(), mode=...) passes its mode and options here
        if set(compile_args) - {"mode", "options"}:
            raise TypeError(f"unknown arguments of the attn_compiler backend: {sorted(compile_args)}")
        if compile_args.get("mode") not in (None, "default") or compile_args.get("options"):
            return _with_compile_args(gm, example_inputs, compile_args.get("mode"), compile_args.get("options"))
        from attn_compiler.passes.choose import candidate_compiler, compile_with_inductor, cuda_graphs
        from attn_compiler.passes.pipeline import attention_pass, folded_inputs

        gid = next(_graph_ids)
        original = _snapshot(gm)
        try:
            with cuda_graphs(_runs_as_cuda_graphs(inner, mode, patches)), \
                    candidate_compiler(compile_with_inductor if inner == "inductor" else None):
                sites = attention_pass(gm, example_inputs, gid)
            guards = folded_inputs(gm) if original is not None else []
        except Exception as e:  # noqa: BLE001 - never break the user's model on our account
            log.warning("attention pass skipped for graph %d after an internal error: %r", gid, e,
                        exc_info=log.isEnabledFor(logging.DEBUG))
            sites, guards = [], []
        compiled = inner_fn(gm, example_inputs)
        # recorded once the inner compiler has taken the graph: dynamo may
        # abandon a compile there and trace the frame again (a python float
        # made a tensor under dynamic=True, then specialized: nn.Embedding's
        # norm_type), and the new attempt's graph brings its own rows
        for site in sites:
            record(site)
        return _FoldGuard(compiled, guards, original, inner_fn, gid) if guards else compiled

    def _with_compile_args(gm, example_inputs, call_mode, call_options):
        """torch.compile's own ``mode=``/``options=`` beside this backend: the
        same as giving them to ``backend()``; given both ways, they must agree."""
        if mode is not None and call_mode not in (None, "default", mode) or patches and call_options \
                and call_options != patches:
            raise ValueError(f"torch.compile(mode={call_mode!r}, options={call_options!r}) conflicts with "
                             f"attn_compiler.backend(mode={mode!r}, options={patches!r})")
        return backend(inner, mode=call_mode if call_mode not in (None, "default") else mode,
                       options=call_options or patches)(gm, example_inputs)

    return attn_compiler


# [Note: folded buffers]  A registered buffer that holds a band (nanoGPT's
# ``tril`` mask) is read once, at compile time, and becomes an index predicate:
# the kernels then skip blocks without reading it.  Dynamo does not guard on a
# tensor's values, so a model that later writes the buffer in place (or puts
# another tensor in its place) would go on with the old mask.  The compiled
# graph is therefore wrapped: before each call it checks, on the host, that
# every folded tensor is still the same object, at the same address and at the
# same version counter (every in-place write, through any view, bumps it).
# After a change the graph is compiled again without the attention pass and
# runs as written from then on (a warning says so).  Not seen: a write through
# ``buffer.data`` (``.data`` is a new tensor with its own version counter,
# over the same storage), which autograd does not see either.  The check costs well
# under a microsecond per buffer; CUDA-graph replays sit inside the wrapped
# call, so it runs before them too.


def _snapshot(gm) -> Optional[Any]:
    """A copy of ``gm`` as dynamo gave it, kept where the pass could fold a
    buffer or constant of it (a placeholder from a module's buffers, a get_attr)."""
    import torch.fx as fx

    from attn_compiler.passes.analyze.side import registered_buffer

    if not any(n.op == "get_attr" or registered_buffer(n) for n in gm.graph.nodes):
        return None

    return fx.GraphModule(gm, copy.deepcopy(gm.graph))


class _FoldGuard:
    """The compiled graph behind the check of [Note: folded buffers]; the
    calling convention (boxed or not) is the compiled function's."""

    def __init__(self, compiled, guards: List[tuple], original, inner_fn, graph_id: int) -> None:
        self._fn = compiled
        if hasattr(compiled, "_boxed_call"):
            self._boxed_call = compiled._boxed_call
        self._original, self._inner_fn, self._graph_id = original, inner_fn, graph_id
        self._guards = [(pos, weakref.ref(t), t._version, t.data_ptr()) for pos, t in guards]

    def __call__(self, *args):
        boxed = len(args) == 1 and isinstance(args[0], list)      # graph inputs are never lists
        if self._guards:
            real = args[0] if boxed else args
            if not all(_unchanged(real, *g) for g in self._guards):
                self._fall_back(list(real))
        if self._fn is self._original:          # the graph module itself takes the arguments
            return self._fn(*(args[0] if boxed else args))
        return self._fn(*args)

    def _fall_back(self, example_inputs) -> None:
        log.warning("graph %d: a buffer that an attention site read as a constant mask was changed or "
                    "replaced after compiling; the graph runs without the attention pass from now on",
                    self._graph_id)
        self._guards = []
        try:
            fn = self._inner_fn(self._original, example_inputs)
        except Exception as e:  # noqa: BLE001 - the graph as written still runs
            log.warning("graph %d: recompiling it failed (%r); it runs eagerly", self._graph_id, e)
            fn = self._original
        self._fn = fn           # the inner compiler's: called as the first was


def _unchanged(args, pos, ref, version, ptr) -> bool:
    t = ref()
    if t is None or (pos is not None and args[pos] is not t):
        return False
    return t._version == version and t.data_ptr() == ptr


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
