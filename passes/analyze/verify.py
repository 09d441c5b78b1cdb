"""Verify: check folded masks and biases against the graph at compile time.

Entry point: ``SideChecker(gm, example_inputs).check(node, val, sizes)``.

The analyzer turns index arithmetic (``arange`` comparisons, ``tril`` of
ones, a registered tril buffer, an ALiBi slope table) into sympy.  Before a
site is rewritten, every such folded tensor is computed once for real from
the example inputs (the same nodes the user's graph runs) and compared with
the expression evaluated on the index grid.  A mismatch declines the site:
the spec must be the user's function, not our reading of it.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.fx as fx

from .torch_eval import evaluate
from ..operands import mutating_users, view_written
from .values import AX, Val, _has_leaf

_MAX_ELEMENTS = 1 << 24   # folded tensors larger than this are not re-computed


class SideChecker:
    def __init__(self, gm: fx.GraphModule, example_inputs):
        self.gm = gm
        self.interp = torch.fx.Interpreter(gm)
        self.env: Dict[fx.Node, object] = {}
        self.seen: Dict[tuple, object] = {}   # (node, last write before a reader) -> value then
        self.order: Optional[Dict[fx.Node, int]] = None
        phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for n, v in zip(phs, example_inputs):
            if isinstance(v, (torch.SymInt, torch.SymFloat)) and v.node.hint is not None:
                v = type(v.node.hint)(v.node.hint)  # a dynamic size: its value this time
            self.env[n] = v

    def real(self, node: fx.Node, reader: Optional[fx.Node] = None):
        """``node``'s value on the example inputs (computing only its inputs),
        as ``reader`` sees it: with the in-place writes made to it before
        ``reader`` (``glob = zeros(L); glob[0] = True`` read by a later node)."""
        base = self._real(node)
        if reader is None or not isinstance(base, torch.Tensor):
            return base
        order = self._order()
        writes = sorted((m for m in mutating_users(node) if m is not reader and order[m] < order[reader]),
                        key=order.get)
        if not writes:
            return base
        key = (node, writes[-1])
        if key not in self.seen:
            v = base.clone()        # never write the user's tensors
            for m in writes:
                args = fx.node.map_arg(m.args, lambda a: v if a is node else self.real(a, m))
                kwargs = fx.node.map_arg(m.kwargs, lambda a: v if a is node else self.real(a, m))
                getattr(self.interp, m.op)(m.target, args, kwargs)
            self.seen[key] = v
        return self.seen[key]

    def _order(self) -> Dict[fx.Node, int]:
        if self.order is None:
            self.order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        return self.order

    def _real(self, node: fx.Node):
        if node in self.env:
            return self.env[node]
        if node.op == "placeholder":
            raise LookupError(f"no example value for {node.name}")
        args = fx.node.map_arg(node.args, lambda a: self.real(a, node))
        kwargs = fx.node.map_arg(node.kwargs, lambda a: self.real(a, node))
        writes = _writes_in_place(node)
        if writes and isinstance(args[0], torch.Tensor):
            # never write the user's tensors (example inputs are the real ones):
            # the in-place op runs on a copy, which is this node's value
            args = (args[0].clone(),) + tuple(args[1:])
        out = getattr(self.interp, node.op)(node.target, args, kwargs)
        if writes:
            out = args[0]
        self.env[node] = out
        return out

    def check(self, node: fx.Node, val: Val, sizes: Dict) -> Optional[str]:
        """None if ``val`` (a folded side value) equals ``node`` computed for
        real, else the reason it does not."""
        if _has_leaf(val.expr) or not isinstance(node, fx.Node) or view_written(node):
            return None
        if _numel_hint(node) > _MAX_ELEMENTS:
            return None
        try:
            real = self.real(node)
        except Exception as e:  # noqa: BLE001 - cannot recompute: keep the site, say why
            return f"a folded mask could not be checked ({type(e).__name__})"
        if not isinstance(real, torch.Tensor) or real.numel() > _MAX_ELEMENTS:
            return None
        shape = tuple(real.shape)
        env = {str(k): v for k, v in sizes.items()}
        env["score"] = torch.zeros((), dtype=torch.float64)
        for i in range(1, len(shape) + 1):
            view = [1] * len(shape)
            view[len(shape) - i] = shape[len(shape) - i]
            env[AX[i - 1].name] = torch.arange(shape[len(shape) - i]).view(view)
        try:
            ours = evaluate(val.expr, env)
        except Exception as e:  # noqa: BLE001
            return f"a folded mask could not be evaluated ({type(e).__name__}: {e})"
        ours = torch.broadcast_to(ours, shape).cpu()
        real = real.detach().cpu()
        if real.dtype == torch.bool or ours.dtype == torch.bool:
            same = torch.equal(real.bool(), ours.bool())
        else:
            r, o = real.double(), ours.double()
            same = bool(((r == o) | torch.isclose(r, o, rtol=1e-5, atol=1e-6)).all())
        return None if same else f"the folded form of '{node.name}' does not match the graph"


def _numel_hint(node: fx.Node) -> int:
    ev = node.meta.get("example_value")
    if not isinstance(ev, torch.Tensor):
        return 0
    n = 1
    for s in ev.shape:
        n *= s if isinstance(s, int) else (s.node.hint or 1)
    return n


def _writes_in_place(node: fx.Node) -> bool:
    from ..operands import mutating_users
    return bool(node.args) and isinstance(node.args[0], fx.Node) and \
        node in mutating_users(node.args[0])
