"""Never slower: time a rewritten site against what it replaced, keep the fastest.

Entry point: ``choose(gm, m, analysis, final, checker) -> Decision``, called by
the pipeline right after ``rewrite`` put the op into the graph.

Candidates, each run on the site's real inputs (the example inputs of the
graph, computed up to the site's operands; in-place ops run on copies, so the
user's tensors are never written):

* ``attn_compiler`` — the rewritten nodes (the op runs the tuned Triton kernels);
* ``sdpa`` — the same nodes with the op replaced by
  ``F.scaled_dot_product_attention``, where it computes the spec exactly;
* ``original`` — the graph's own nodes from the operands to the site output
  (what the site costs when nothing fuses it).

Each runs as the inner compiler builds it where that is inductor
([Note: candidates as inductor compiles them]), else eagerly.

With training inputs (an operand requires grad) a candidate is timed forward +
backward.  Times are CUDA-graph replays where the candidate can be captured
(the kernels' cost, not the Python cost of running a subgraph node by node),
else plain launches.  The candidates are timed round-robin, twice each, and keep
their best time (``_interleaved``), so a stretch of contention on the GPU
does not decide against whichever one it fell on.  Each candidate's output is compared with ours first: a
candidate that disagrees is dropped; if the original disagrees, the site is
kept as it was (we cannot show we compute the user's function).  The decision
is cached per (kernel source, shape bucket, training, CUDA graphs or not) in
the autotune cache.  Timing needs CUDA; on CPU the rewrite stands untimed.

[Note: host cost without CUDA graphs]  Replays hide what a call costs the
host.  Unless the compiled graph itself runs as CUDA-graph replays
(``mode="reduce-overhead"``: the backend says so through :func:`cuda_graphs`),
each call of our op pays its Python launch path (tens of µs), and a small
site whose kernels take less than that is bound by it.  So without graphs,
``attn_compiler`` is also timed as the compiled graph calls it: the op (and,
training, its backward op) called back to back with gradients off, µs per
call: the larger of its host time (the thread's CPU time, [Note: host time
as CPU time]) and its GPU time.  Where
that exceeds the replay time by more than ``HOST_BOUND`` it is the candidate's
time.  The others keep their replay times: the original as inductor compiles
it and SDPA launch from C++ or inductor's own launchers at a few µs per
kernel, so charging them nothing errs towards keeping what the user wrote.
A site this small in a model whose other layers keep the GPU busy would hide
our host time; the choice then gives up a little kernel time, mostly to SDPA.
A graph compiled for dynamic lengths keeps the replay comparison: its one
decision serves every length, and the host's share at the example length (a
decode graph's first, shortest cache) says nothing about the long ones.

[Note: candidates as inductor compiles them]  Nothing in a compiled model
runs eagerly: inductor, the default inner compiler, fuses a site we leave
alone (its scale, bias, mask and softmax into a few kernels; for SAM's
14×14 windows 2–4× faster than eager, level with our kernels), and it
fuses the ops around our op too (the relative-position terms that feed it,
their backward).  Timed eagerly, the original loses sites it should win and
our op carries the unfused cost of its inputs.  So with inductor inside,
each candidate is its subgraph cut out as a graph of its own (sources and
outside values become inputs) and compiled by inductor with its default
options (no CUDA graphs of its own: the timing replays it in one), forward
and, training, backward.  The compiles happen only when the decision is not
cached, cost seconds per distinct site, and run outside the enclosing dynamo
frame's tracing context and compile metrics (the inputs are real tensors).
Where a cut graph writes one of its inputs in place, or inductor fails on
it, that candidate is timed eagerly and the decision's note says so.  Inside
a whole model inductor may fuse a site with more of its neighbours; the cut
graphs do not see that.

[Note: dropout is not compared]  A site with dropout in training draws its
mask from our counter-based generator, the original from torch's: their
outputs differ by the masks, at any size, so the comparison kept every such
site as written on the GPU ("the original's numbers differ"). There the
candidates are timed without comparing numbers: the analysis showed the site
computes the user's function up to the random mask, and the kernels' mask
statistics and gradients are tested against the reference's
(tests/test_attention_fwd.py, test_attention_bwd.py).

[Note: an original too large to run]  The original materialises the
Lq x Lk scores, and the site may be one the user compiles precisely because
the code as written does not fit (a 32k context: 64 GiB of bf16 scores per
layer call, twice that as float32 softmax).  Timing it anyway takes the GPU's
memory up to its limit at compile time (136 GiB of 141 in run 131, ending in
an out-of-memory error that the tuner catches) beside the user's own
tensors.  So the original is not run when its probabilities alone, one
B x H x Lq x Lk tensor in the softmax's dtype (two while training: the
probabilities kept for the backward and their gradient), would take more than
``ORIGINAL_MEMORY_SHARE`` of the memory free on the device: the report
names the size; ours or SDPA is chosen, as the original could not run there
anyway, or only with nothing else on the GPU.  Its numbers are then not
compared with ours (the analysis proved the site's function).

[Note: gradients checked]  Training, each candidate's gradients with respect
to the site's inputs (from the same random output gradient) are compared
with ours too, not only its output: a backward that goes wrong where the
forward is right (a library kernel's bug for some layout or size) would
otherwise be chosen on its forward alone and give the user wrong gradients.
Gradients of two correct backward passes differ more than their outputs
(dQ and dK sum over a whole row of the probabilities' rounding), so they
agree within ``GRAD_SLACK`` times the outputs' tolerance; a wrong backward
is off by orders of magnitude more.  An SDPA that disagrees is dropped; an
original that disagrees keeps the site as written, as for the forward.

[Note: an original its compiler gets wrong]  Where the original is timed as
inductor compiles it, a disagreement may be the compiled original's fault:
"softmax plus one" written out (a clamped row max, exp(-m) in the
denominator) under a -inf causal mask gave non-finite dQ and dK as inductor
compiled it on the H200 (bf16), finite as eager runs it. Then the site was
kept as written and the user got the compiler's nan. So when the compiled
original disagrees with ours, the original subgraph also runs eagerly, once,
on the same inputs and output gradient: if eager's numbers agree with ours
(outputs and, training, gradients, by the same tolerances), the compiled
original is rejected ("as compiled, not eager's numbers") and the choice is
among the rest; if eager disagrees with ours too, the site stays as written.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import time
from typing import Callable, Dict, Iterator, List, Optional

import torch
import torch.fx as fx
from torch.fx.node import map_arg

from attn_compiler import autotune, sdpa
from attn_compiler.dispatch import graph_bench
from attn_compiler.testing import disagreement

from . import canonicalize as C
from .operands import mutating_users, storage_writers, view_writers

log = logging.getLogger("attn_compiler")

OURS, SDPA, ORIGINAL = "attn_compiler", "sdpa", "original"

# Tests time on CPU with these (timing is otherwise CUDA only): a bench function
# ``bench(fn) -> ms``, the switch that allows CPU tensors, and ``launch_cost(step)
# -> ms`` for the calls of our op ([Note: host cost without CUDA graphs]).
TIME_ON_CPU = False
BENCH: Optional[Callable[[Callable[[], object]], float]] = None
LAUNCH_COST: Optional[Callable[[Callable[[], object]], float]] = None
# our op's back-to-back call time counts once it is this much above its replays
HOST_BOUND = 1.15
# gradients agree within this many times the outputs' tolerance ([Note: gradients checked])
GRAD_SLACK = 4.0
# the original is not run when its probabilities need more than this share of
# the free device memory ([Note: an original too large to run])
ORIGINAL_MEMORY_SHARE = 0.5

_CUDA_GRAPHS: contextvars.ContextVar[bool] = contextvars.ContextVar("attn_compiler_cuda_graphs", default=False)
# compiles the candidates for their timing: ``(gm, example_inputs) -> callable``, or None (eager)
_CANDIDATE_COMPILER: contextvars.ContextVar[Optional[Callable]] = contextvars.ContextVar(
    "attn_compiler_candidate_compiler", default=None)


@contextlib.contextmanager
def cuda_graphs(on: bool) -> Iterator[None]:
    """Inside: the graphs being compiled will run as CUDA-graph replays (or not)."""
    token = _CUDA_GRAPHS.set(bool(on))
    try:
        yield
    finally:
        _CUDA_GRAPHS.reset(token)


@contextlib.contextmanager
def candidate_compiler(compile_fn: Optional[Callable]) -> Iterator[None]:
    """Inside: the candidates are timed as ``compile_fn`` builds them
    ([Note: candidates as inductor compiles them]); None times them eagerly."""
    token = _CANDIDATE_COMPILER.set(compile_fn)
    try:
        yield
    finally:
        _CANDIDATE_COMPILER.reset(token)


def compile_with_inductor(gm: fx.GraphModule, example_inputs) -> Callable:
    """Inductor with its default options on a cut-out subgraph of real inputs
    that returns a tuple, compiled inside the enclosing frame's compile
    (``_compat.compile_nested``); the result is called with the inputs as arguments."""
    from attn_compiler._compat import compile_nested

    return compile_nested(gm, example_inputs)


@dataclasses.dataclass
class Decision:
    choice: str                                   # OURS | SDPA | ORIGINAL
    times_ms: Dict[str, Optional[float]] = dataclasses.field(default_factory=dict)
    errors: Dict[str, str] = dataclasses.field(default_factory=dict)
    training: bool = False
    timed: bool = False
    note: str = ""
    kernels: Dict[str, str] = dataclasses.field(default_factory=dict)


def _subgraph(sources: List[fx.Node], sink: fx.Node) -> List[fx.Node]:
    """Nodes on a path from a source to ``sink`` (sink included), in graph
    order, with the in-place writes made before ``sink`` to any of them
    (``s.masked_fill_(m, -inf)``, whose result nothing reads) and the views
    they write through."""
    order = {n: i for i, n in enumerate(sink.graph.nodes)}
    desc, stack = set(), list(sources)
    while stack:
        n = stack.pop()
        for u in n.users:
            if u not in desc:
                desc.add(u)
                stack.append(u)

    def ancestors(roots):
        anc, stack = set(), list(roots)
        while stack:
            n = stack.pop()
            if n in anc:
                continue
            anc.add(n)
            stack.extend(n.all_input_nodes)
        return anc

    keep = ancestors([sink]) & desc
    while True:
        writers = {w for n in keep for w in storage_writers(n) + view_writers(n)
                   if w not in keep and order[w] < order[sink]}
        if not writers:
            break
        keep |= ancestors(writers) & desc
    return sorted(keep, key=order.__getitem__)


def _writes(n: fx.Node) -> bool:
    return bool(n.args) and isinstance(n.args[0], fx.Node) and n in mutating_users(n.args[0])


class _Runner:
    """Runs a subgraph on fixed inputs (sources fresh per run, leaves constant)."""

    def __init__(self, gm, nodes, sources, checker, training: bool, override=None, name: str = ""):
        self.nodes, self.sources, self.training, self.name = nodes, sources, training, name
        self.interp = torch.fx.Interpreter(gm)
        self.override = override or {}
        inside = set(nodes)
        self.leaves = {}
        for n in nodes:
            for a in n.all_input_nodes:
                if a not in inside and a not in sources and a not in self.leaves:
                    self.leaves[a] = _detach(checker.real(a, n))     # with writes made before n
        self.writes = {n for n in nodes if _writes(n)}   # in-place ops (graph facts, once)
        self.src_vals = [_detach(checker.real(s)) for s in sources]
        for v in self.src_vals:
            if training and isinstance(v, torch.Tensor) and v.is_floating_point():
                v.requires_grad_(True)
        self.grad = None
        self.keep_grads, self.grads = True, None    # the first run's input gradients, for the check

    def __call__(self):
        env = dict(self.leaves)
        env.update(zip(self.sources, self.src_vals))
        fresh = set()
        for n in self.nodes:
            args = map_arg(n.args, env.__getitem__)
            kwargs = map_arg(n.kwargs, env.__getitem__)
            if n in self.writes and n.args[0] not in fresh:
                args = (args[0].clone(),) + tuple(args[1:])   # never write an input
            target = self.override.get(n, n.target)
            out = getattr(self.interp, n.op)(target, args, kwargs)
            env[n] = args[0] if n in self.writes else out
            fresh.add(n)
        return self._finish(env[self.nodes[-1]])

    def _finish(self, out: torch.Tensor) -> torch.Tensor:
        """Training: the backward of ``out`` (gradients dropped); the output, detached."""
        if self.training and out.requires_grad:
            if self.grad is None:       # the same for every candidate: their gradients are compared
                gen = torch.Generator(device=out.device).manual_seed(0)
                self.grad = torch.randn(out.shape, generator=gen, device=out.device, dtype=out.dtype)
            out.backward(self.grad)
            if self.keep_grads:
                self.grads = [v.grad for v in self.src_vals if isinstance(v, torch.Tensor) and v.requires_grad]
            for v in self.src_vals:
                if isinstance(v, torch.Tensor):
                    v.grad = None
        return out.detach()

    def take_grads(self) -> Optional[List[Optional[torch.Tensor]]]:
        """The input gradients of the checked run (training), once; later runs keep none."""
        grads, self.grads, self.keep_grads = self.grads, None, False
        return grads


class _CompiledRunner(_Runner):
    """A candidate's subgraph as a compiler builds it, called on the runner's
    inputs; eager (``_Runner``) where it cannot be compiled
    ([Note: candidates as inductor compiles them])."""

    def __init__(self, gm, nodes, sources, checker, training: bool, compile_fn: Callable, override=None,
                 name: str = ""):
        super().__init__(gm, nodes, sources, checker, training, override=override, name=name)
        self.gm, self.compile_fn = gm, compile_fn
        self.fn: Optional[Callable] = None
        self.eager_why: Optional[str] = None

    def _build(self) -> Callable:
        outside = [n for n in self.writes if n.args[0] not in self.nodes]
        if outside:
            raise ValueError(f"'{outside[0].name}' writes an input of the subgraph in place")
        g = fx.Graph()
        env: Dict[fx.Node, fx.Node] = {}
        for i, n in enumerate([*self.sources, *self.leaves]):
            env[n] = g.placeholder(f"in{i}")
        for n in self.nodes:
            env[n] = g.node_copy(n, env.__getitem__)
            env[n].meta = {}
            if n in self.override:
                env[n].target = self.override[n]
        g.output((env[self.nodes[-1]],))
        return self.compile_fn(fx.GraphModule(self.gm, g), [*self.src_vals, *self.leaves.values()])

    def __call__(self):
        if self.fn is None and self.eager_why is None:
            try:
                self.fn = self._build()
            except Exception as exc:  # noqa: BLE001 - time it eagerly instead
                self.eager_why = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                log.info("%s timed eagerly: %s", self.name, self.eager_why)
        if self.fn is None:
            return super().__call__()
        args = [*self.src_vals, *self.leaves.values()]
        return self._finish(self.fn(*args)[0])


class OriginalTooLarge(RuntimeError):
    """The original is not run ([Note: an original too large to run])."""


class _NotRun:
    """A candidate that is not run: the tuner records why, it is never chosen."""

    def __init__(self, name: str, why: str):
        self.name, self.why = name, why

    def __call__(self):
        raise OriginalTooLarge(self.why)


def _free_bytes(device: torch.device) -> Optional[int]:
    """Device memory free for new tensors: the driver's free memory and the
    caching allocator's reserved-but-unused blocks; None off CUDA."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _original_too_large(spec, op_node: fx.Node, training: bool, vals) -> Optional[str]:
    """Why the original is not run ([Note: an original too large to run]), or None."""
    dev = next((v.device for v in vals if isinstance(v, torch.Tensor)), None)
    free = _free_bytes(dev) if dev is not None else None
    if free is None:
        return None
    q, k = (C.example_value(a) for a in op_node.args[:2])
    B, Hq, Lq = (_hint(x) for x in q.shape[:3])
    Lk = _hint(k.shape[2])
    itemsize = max(getattr(torch, spec.softmax_dtype).itemsize, q.dtype.itemsize)
    need = B * Hq * Lq * Lk * itemsize * (2 if training else 1)
    if need <= ORIGINAL_MEMORY_SHARE * free:
        return None
    gib = 2.0 ** 30
    return (f"not run: its {B}x{Hq}x{Lq}x{Lk} probabilities need {need / gib:.1f} GiB"
            f"{' (with their gradient)' if training else ''}, more than {ORIGINAL_MEMORY_SHARE:.0%} "
            f"of the {free / gib:.1f} GiB free")


def _hint(x) -> int:
    """A size as an int; a symbolic (dynamic) size by its value this time, no guard."""
    node = getattr(x, "node", None)
    return int(node.hint) if node is not None and getattr(node, "hint", None) is not None else int(x)


def _detach(v):
    return v.detach() if isinstance(v, torch.Tensor) else v


def choose(gm: fx.GraphModule, m, analysis, final: fx.Node, op_node: fx.Node, checker,
           sources: List[fx.Node]) -> Decision:
    """Decide between our op, SDPA and the original for one rewritten site.
    ``sources``: the site's q, k, v operand nodes (after earlier rewrites)."""
    sources = list(dict.fromkeys(sources))
    vals = [C.example_value(s) for s in sources]
    dev = next((v.device for v in vals if isinstance(v, torch.Tensor) and v.device.type == "cuda"), None)
    if dev is not None and dev.index is not None and dev.index != torch.cuda.current_device():
        with torch.cuda.device(dev):        # timed (CUDA graphs, streams) on the site's GPU
            return _choose(gm, m, analysis, final, op_node, checker, sources, vals)
    return _choose(gm, m, analysis, final, op_node, checker, sources, vals)


def _choose(gm, m, analysis, final, op_node, checker, sources, vals) -> Decision:
    training = any(isinstance(v, torch.Tensor) and v.requires_grad for v in vals) and torch.is_grad_enabled()
    cuda = all(isinstance(v, torch.Tensor) and v.device.type == "cuda" for v in vals) or TIME_ON_CPU
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    if not cuda or not autotune.tuning_enabled() or capturing:
        return Decision(OURS, training=training, note="not timed (needs CUDA and autotuning on)")
    compile_fn = _CANDIDATE_COMPILER.get()

    def runner(sink, name, override=None) -> _Runner:
        if compile_fn is None:
            return _Runner(gm, _subgraph(sources, sink), sources, checker, training, override=override, name=name)
        return _CompiledRunner(gm, _subgraph(sources, sink), sources, checker, training, compile_fn,
                               override=override, name=name)

    try:
        ours = runner(final, OURS)
    except Exception as exc:  # noqa: BLE001 - cannot compute the inputs: keep the rewrite untimed
        return Decision(OURS, training=training, note=f"not timed ({type(exc).__name__})")
    graphs = _CUDA_GRAPHS.get()
    # lengths the graph runs at whatever they are: host cost measured at the hint misleads
    dynamic = any(not isinstance(x, int) for a in op_node.args[:3] for x in C.example_value(a).shape)
    host_cost = not graphs and not dynamic
    reads_lse = m.reads_lse         # SDPA gives no lse: then not a candidate
    too_large = _original_too_large(analysis.spec, op_node, training, vals)
    # a decision made without the original is cached apart: a choice of it cached
    # where it fit must not answer where it does not ("m")
    key = _key(analysis.spec, op_node, training, ("g" if graphs else "d" if dynamic else "c") + ("s" if reads_lse else "")
               + ("" if compile_fn is None else "i") + ("m" if too_large else ""))
    candidates: Dict[str, Callable[[], object]] = {OURS: ours}
    if sdpa.sdpa_form(analysis.spec) is not None and not reads_lse:
        candidates[SDPA] = runner(final, SDPA, override={op_node: sdpa.sdpa_attention})
    candidates[ORIGINAL] = runner(m.pv.node, ORIGINAL) if too_large is None else _NotRun(ORIGINAL, too_large)
    first: List[torch.Tensor] = []
    first_grads: List[Optional[torch.Tensor]] = []
    disagree: Dict[str, str] = {}

    draws_mask = analysis.spec.dropout_p > 0     # [Note: dropout is not compared]

    def check(name, out):
        grads = candidates[name].take_grads() or []
        if name == OURS:
            first.append(out)
            first_grads.extend(grads)
            return None
        if draws_mask:
            return None
        why = disagreement(out, first[0]) if first else None
        if why is None:             # training: the backward too ([Note: gradients checked])
            why = next((f"the gradient of input {i}: {w}" for i, (g, g0) in enumerate(zip(grads, first_grads))
                        if g is not None and g0 is not None and (w := disagreement(g, g0, GRAD_SLACK))), None)
        if why:
            if name == ORIGINAL and compile_fn is not None and eager_agrees():
                # [Note: an original its compiler gets wrong] (no "differs": a
                # cached decision reads that word as the site kept as written)
                return f"as compiled, not eager's numbers ({why}); the fused kernel gives eager's"
            disagree[name] = f"differs from attn_compiler: {why}"
        return disagree.get(name)

    def eager_agrees() -> bool:
        """The original subgraph run eagerly agrees with ours ([Note: an
        original its compiler gets wrong])."""
        try:
            referee = _Runner(gm, _subgraph(sources, m.pv.node), sources, checker, training, name="eager")
            out = referee()
            grads = referee.take_grads() or []
        except Exception:  # noqa: BLE001 - no referee: the site stays as written
            return False
        if not first or disagreement(out, first[0]):
            return False
        return not any(g is not None and g0 is not None and disagreement(g, g0, GRAD_SLACK)
                       for g, g0 in zip(grads, first_grads))

    bench = _interleaved(BENCH or graph_bench, list(candidates.values()))
    host: Dict[str, float] = {}
    if host_cost:
        bench = _with_host_cost(bench, ours, gm, sources, final, op_node, checker, training, host)
    try:
        choice = autotune.tune(key, candidates, check=check, bench=bench)
    except (autotune.TuningUnavailable, RuntimeError) as exc:
        return Decision(OURS, training=training, note=f"not timed ({exc})")
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if ORIGINAL in disagree or ORIGINAL in choice.errors and "differs" in choice.errors[ORIGINAL]:
        return Decision(ORIGINAL, choice.times_ms, dict(choice.errors), training, True,
                        "the original's numbers differ from the fused kernel's: kept as written")
    notes = []
    if choice.from_cache:
        notes.append("from the autotune cache")
    elif compile_fn is not None:
        eager = [f"{r.name} timed eagerly: {r.eager_why}" for r in candidates.values()
                 if isinstance(r, _CompiledRunner) and r.eager_why]
        notes.append("; ".join(eager) if eager else "timed as inductor compiles each")
    if draws_mask:
        notes.append("outputs not compared (dropout: each candidate draws its own mask)")
    note = "; ".join(notes)
    if "calls" in host:
        note = (f"attn_compiler timed by its calls without CUDA graphs: {host['calls']:.3f} ms per call, "
                f"kernels {host['replays']:.3f} ms" + (f"; {note}" if note else ""))
    d = Decision(choice.name, choice.times_ms, dict(choice.errors), training, True, note)
    d.kernels = _kernel_choices(analysis.spec, key)
    return d


TIMING_ROUNDS = 2


def _interleaved(bench, fns: List[Callable[[], object]]):
    """``bench`` asked for one candidate times them all, round-robin over
    ``TIMING_ROUNDS`` rounds, and keeps each one's best: a stretch of
    contention on the GPU (another process, a clock change) then weighs on
    every candidate instead of deciding against the one timed in it.  A
    candidate that raises is asked again, alone, when its time is wanted."""
    best: Dict[int, float] = {}

    def timed(fn):
        if not best:
            for _ in range(TIMING_ROUNDS):
                for f in fns:
                    try:
                        best[id(f)] = min(best.get(id(f), float("inf")), float(bench(f)))
                    except Exception:  # noqa: BLE001 - raised again below, when it is this one's turn
                        best.setdefault(id(f), float("inf"))
        t = best.get(id(fn), float("inf"))
        return t if t != float("inf") else bench(fn)
    return timed


def _with_host_cost(bench, ours: "_Runner", gm, sources, final, op_node, checker, training: bool,
                    host: Dict[str, float]):
    """``bench`` with our candidate also timed by the calls of the op
    ([Note: host cost without CUDA graphs]); ``host`` gets both times when the
    calls' time is the one that counts."""
    def timed(fn):
        t = bench(fn)
        if fn is not ours:
            return t
        try:
            step = _op_step(gm, sources, final, op_node, checker, training)
            calls = (LAUNCH_COST or _calls_ms)(step, t)
        except Exception as exc:  # noqa: BLE001 - the replay time stands
            log.debug("host cost of the op not measured: %r", exc)
            return t
        if calls > HOST_BOUND * t:
            host.update(calls=calls, replays=t)
            return calls
        return t
    return timed


def _op_step(gm, sources, final, op_node, checker, training: bool) -> Callable[[], object]:
    """One call of the op on the site's real operands as the compiled graph
    makes it (gradients off), and with training its backward op after it."""
    seen = {}

    def record(*args):
        seen["args"] = args
        return op_node.target(*args)

    with torch.no_grad():
        _Runner(gm, _subgraph(sources, final), sources, checker, False, override={op_node: record})()
    q, k, v, caps, spec, seed = seen["args"]
    fwd = torch.ops.attn_compiler.attention_forward.default
    bwd = torch.ops.attn_compiler.attention_backward.default
    with torch.no_grad():
        out, lse = fwd(q, k, v, caps, spec, seed)
    dout = torch.randn_like(out)

    @torch.no_grad()
    def step():
        fwd(q, k, v, caps, spec, seed)
        if training:
            bwd(dout, q, k, v, caps, out, lse, spec, seed)
    return step


def _calls_ms(step: Callable[[], object], replay_ms: float) -> float:
    """ms per call of ``step`` called back to back (best of three rounds of
    ~25 ms), synchronised at the end: the larger of host and GPU time, the
    host's counted in this thread's CPU time ([Note: host time as CPU time])."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    n = max(5, min(200, int(25.0 / max(replay_ms, 1e-3))))
    wall = cpu = float("inf")
    with torch.no_grad():
        for _ in range(3):
            step()
        for _ in range(3):
            sync()
            t0, c0 = time.perf_counter(), time.thread_time()
            for _ in range(n):
                step()
            sync()
            wall = min(wall, (time.perf_counter() - t0) / n * 1e3)
            cpu = min(cpu, (time.thread_time() - c0) / n * 1e3)
    return min(wall, max(cpu, replay_ms))


# [Note: host time as CPU time]  The wall clock of back-to-back calls counts
# the time the process waits for a CPU: with other processes busy (tests run
# side by side, a data loader's workers starting with the first step) it
# took our op at 1.965 ms per call against 0.841 ms of kernels (run 133), and
# the site stayed as written, a decision then cached for good.  So the host's
# share is this thread's CPU time per call (the launch path's Python, the
# driver's launches, and the final synchronise where it spins); the GPU's is
# the replay time; the wall clock caps both.  Time spent descheduled is
# neither, which is what the host costs when nothing else runs.


def _kernel_choices(spec, site_key: str) -> Dict[str, str]:
    """The kernel configs the op's autotuner picked for this spec and bucket."""
    from attn_compiler import dispatch

    bucket = autotune.TuneKey.parse(site_key).bucket
    out = {}
    for key, ch in dispatch.tunings().items():
        k = autotune.TuneKey.parse(key)
        if k is not None and k.bucket == bucket and k.family in ("fwd", "bwd"):
            out[k.family] = ch.name.split(" ", 1)[-1] if ch.name.startswith(k.family) else ch.name
    return out


def _key(spec, op_node: fx.Node, training: bool, regime: str) -> str:
    """The decision's cache key; ``regime``: "g" CUDA graphs, "d" dynamic lengths,
    "c" neither (host cost counted), then "s" for a site whose lse is read,
    "i" where the candidates are timed as inductor compiles them, "m" where
    the original is too large to run ([Note: an original too large to run])."""
    from attn_compiler.dispatch import source_digest

    q, k, v = (C.example_value(a) for a in op_node.args[:3])
    B, Hq, Lq, D = (_hint(x) for x in q.shape)
    bucket = autotune.shape_bucket(B, Hq, _hint(k.shape[1]), Lq, _hint(k.shape[2]), D, _hint(v.shape[-1]), q.dtype)
    digest = (source_digest(spec, ("fwd", "decode", "bwd"), (__file__, sdpa.__file__)) + ("t" if training else "i")
              + regime)
    return autotune.make_key("site", digest, bucket)


def decision_features(d: Decision) -> dict:
    """Report columns of a decision (see report.py)."""
    out = {"choice": d.choice, "training": d.training}
    if d.timed:
        out["times_ms"] = {k: v for k, v in d.times_ms.items()}
    if d.note:
        out["choice_note"] = d.note
    if d.errors:            # why a candidate has no time: it failed, or disagreed with ours
        out["errors"] = dict(d.errors)
    if d.kernels:
        out["kernels"] = dict(d.kernels)
    return out
