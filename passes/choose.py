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
else plain launches.  Each candidate's output is compared with ours first: a candidate
that disagrees is dropped; if the original disagrees, the site is kept as it
was (we cannot show we compute the user's function).  The decision is cached
per (kernel source, shape bucket, training) in the autotune cache.  Timing
needs CUDA; on CPU the rewrite stands untimed.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Dict, List, Optional

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
# ``bench(fn) -> ms`` and the switch that allows CPU tensors.
TIME_ON_CPU = False
BENCH: Optional[Callable[[Callable[[], object]], float]] = None


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
                    self.leaves[a] = _detach(checker.real(a))
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
    key = _key(analysis.spec, op_node, training)
    ours.name = OURS
    candidates: Dict[str, Callable[[], object]] = {OURS: ours}
    if sdpa.sdpa_form(analysis.spec) is not None:
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

    try:
        choice = autotune.tune(key, candidates, check=check, bench=BENCH or graph_bench)
    except (autotune.TuningUnavailable, RuntimeError) as exc:
        return Decision(OURS, training=training, note=f"not timed ({exc})")
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if ORIGINAL in disagree or ORIGINAL in choice.errors and "differs" in choice.errors[ORIGINAL]:
        return Decision(ORIGINAL, choice.times_ms, dict(choice.errors), training, True,
                        "the original's numbers differ from the fused kernel's: kept as written")
    d = Decision(choice.name, choice.times_ms, dict(choice.errors), training, True,
                 "from the autotune cache" if choice.from_cache else "")
    d.kernels = _kernel_choices(analysis.spec, key)
    return d


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


def _key(spec, op_node: fx.Node, training: bool) -> str:
    from attn_compiler.dispatch import source_digest

    q, k, v = (C.example_value(a) for a in op_node.args[:3])
    B, Hq, Lq, D = (_hint(x) for x in q.shape)
    bucket = autotune.shape_bucket(B, Hq, _hint(k.shape[1]), Lq, _hint(k.shape[2]), D, _hint(v.shape[-1]), q.dtype)
    digest = source_digest(spec, ("fwd", "decode", "bwd"), (__file__, sdpa.__file__)) + ("t" if training else "i")
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
