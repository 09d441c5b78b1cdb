"""Never slower: time a rewritten site against what it replaced, keep the fastest.

Entry point: ``choose(gm, m, analysis, final, checker) -> Decision``, called by
the pipeline right after ``rewrite`` put the op into the graph.

Candidates, each run on the site's real inputs (the example inputs of the
graph, computed up to the site's operands; in-place ops run on copies, so the
user's tensors are never written):

* ``attn_compiler`` — the rewritten nodes (the op runs the tuned Triton kernels);
* ``sdpa`` — the same nodes with the op replaced by
  ``F.scaled_dot_product_attention``, where it computes the spec exactly;
* ``original`` — the graph's own nodes from the operands to the site output,
  eagerly (what the site costs when nothing fuses it).

With training inputs (an operand requires grad) a candidate is timed forward +
backward.  Times are CUDA-graph replays where the candidate can be captured
(the kernels' cost, not the Python cost of running a subgraph node by node),
else plain launches.  Each candidate's output is compared with ours first: a
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
call from the wall clock, that is the larger of its host and GPU time.  Where
that exceeds the replay time by more than ``HOST_BOUND`` it is the candidate's
time.  The others keep their replay times: the original as inductor compiles
it and SDPA launch from C++ or inductor's own launchers at a few µs per
kernel, so charging them nothing errs towards keeping what the user wrote.
A site this small in a model whose other layers keep the GPU busy would hide
our host time; the choice then gives up a little kernel time, mostly to SDPA.
A graph compiled for dynamic lengths keeps the replay comparison: its one
decision serves every length, and the host's share at the example length (a
decode graph's first, shortest cache) says nothing about the long ones.
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
from .operands import mutating_users

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

_CUDA_GRAPHS: contextvars.ContextVar[bool] = contextvars.ContextVar("attn_compiler_cuda_graphs", default=False)


@contextlib.contextmanager
def cuda_graphs(on: bool) -> Iterator[None]:
    """Inside: the graphs being compiled will run as CUDA-graph replays (or not)."""
    token = _CUDA_GRAPHS.set(bool(on))
    try:
        yield
    finally:
        _CUDA_GRAPHS.reset(token)


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
    """Nodes on a path from a source to ``sink`` (sink included), in graph order."""
    anc, stack = set(), [sink]
    while stack:
        n = stack.pop()
        if n in anc:
            continue
        anc.add(n)
        stack.extend(n.all_input_nodes)
    desc, stack = set(), list(sources)
    while stack:
        n = stack.pop()
        for u in n.users:
            if u not in desc:
                desc.add(u)
                stack.append(u)
    keep = anc & desc
    return [n for n in sink.graph.nodes if n in keep]


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
        out = env[self.nodes[-1]]
        if self.training and out.requires_grad:
            if self.grad is None:
                self.grad = torch.randn_like(out)
            out.backward(self.grad)
            for v in self.src_vals:
                if isinstance(v, torch.Tensor):
                    v.grad = None
        return out.detach()


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
    training = any(isinstance(v, torch.Tensor) and v.requires_grad for v in vals) and torch.is_grad_enabled()
    cuda = all(isinstance(v, torch.Tensor) and v.device.type == "cuda" for v in vals) or TIME_ON_CPU
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    if not cuda or not autotune.tuning_enabled() or capturing:
        return Decision(OURS, training=training, note="not timed (needs CUDA and autotuning on)")
    try:
        ours = _Runner(gm, _subgraph(sources, final), sources, checker, training)
    except Exception as exc:  # noqa: BLE001 - cannot compute the inputs: keep the rewrite untimed
        return Decision(OURS, training=training, note=f"not timed ({type(exc).__name__})")
    graphs = _CUDA_GRAPHS.get()
    # lengths the graph runs at whatever they are: host cost measured at the hint misleads
    dynamic = any(not isinstance(x, int) for a in op_node.args[:3] for x in C.example_value(a).shape)
    host_cost = not graphs and not dynamic
    reads_lse = m.reads_lse         # SDPA gives no lse: then not a candidate
    key = _key(analysis.spec, op_node, training, ("g" if graphs else "d" if dynamic else "c") + ("s" if reads_lse else ""))
    ours.name = OURS
    candidates: Dict[str, Callable[[], object]] = {OURS: ours}
    if sdpa.sdpa_form(analysis.spec) is not None and not reads_lse:
        candidates[SDPA] = _Runner(gm, _subgraph(sources, final), sources, checker, training,
                                   override={op_node: sdpa.sdpa_attention}, name=SDPA)
    candidates[ORIGINAL] = _Runner(gm, _subgraph(sources, m.pv.node), sources, checker, training, name=ORIGINAL)
    first: List[torch.Tensor] = []
    disagree: Dict[str, str] = {}

    def check(name, out):
        if name == OURS:
            first.append(out)
            return None
        why = disagreement(out, first[0]) if first else None
        if why:
            disagree[name] = f"differs from attn_compiler: {why}"
        return disagree.get(name)

    bench = BENCH or graph_bench
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
    note = "from the autotune cache" if choice.from_cache else ""
    if "calls" in host:
        note = (f"attn_compiler timed by its calls without CUDA graphs: {host['calls']:.3f} ms per call, "
                f"kernels {host['replays']:.3f} ms" + (f"; {note}" if note else ""))
    d = Decision(choice.name, choice.times_ms, dict(choice.errors), training, True, note)
    d.kernels = _kernel_choices(analysis.spec, key)
    return d


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
    fwd = torch.ops.attn_compiler.attention.default
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
    ~25 ms), synchronised at the end: the larger of host and GPU time."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    n = max(5, min(200, int(25.0 / max(replay_ms, 1e-3))))
    best = float("inf")
    with torch.no_grad():
        for _ in range(3):
            step()
        for _ in range(3):
            sync()
            t0 = time.perf_counter()
            for _ in range(n):
                step()
            sync()
            best = min(best, (time.perf_counter() - t0) / n * 1e3)
    return best


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
    "c" neither (host cost counted), then "s" for a site whose lse is read."""
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
    if d.kernels:
        out["kernels"] = dict(d.kernels)
    return out
