"""Side values: masks, biases and index arithmetic that meet the score chain.

``SideValues`` is a mixin of ``ScoreInterpreter`` (symbolic.py).  A side
value is written over per-axis symbols ``A1`` (last axis), ``A2``, ...
aligned from the right.  Index-derived tensors (``arange``, ``tril`` of
ones, comparisons, a registered tril buffer) become expressions; anything
else becomes a captured tensor (``leaf``), read at run time.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from typing import Optional

import sympy
import torch
import torch.fx as fx

from .. import canonicalize as C
from ..operands import mutating_users, storage_root, storage_writers, view_written
from .values import (AX, factors, round_constants, Decline, Leaf, Val, _CASTS, _has_leaf, _size_eq, _subs, as_bool,
                     as_num, from_shape_env, is_bool, is_one)


class SideValues:
    """Side-value methods of the interpreter (see module doc)."""

    def side_value(self, node: fx.Node) -> Val:
        if node in self.opaque:
            return self.leaf(node)
        if node.op == "call_function" and node.target is operator.setitem:
            return self.slice_assignment(node)
        ev = C.example_value(node)
        if not isinstance(ev, torch.Tensor):
            scalar = self.scalar_tensor(node, ev)
            return scalar if scalar is not None else Val(self.const(node), ())
        if self.writes_run_time_read(node):
            # the op reads that storage after this write: replaying it would count it twice
            return self.value(node.args[0])
        op = C.canonical(node)

        try:
            # direct in-place writes are followed by ``resolve``; a tensor
            # written through a view of it is read at run time, never folded
            v = self.side_op(node, op) if op is not None and not view_written(node) else None
            if v is not None and not is_bool(v.expr):
                # a 16-bit tensor holds its constants rounded (-9e15 * ones_like(s) in bfloat16)
                v = dataclasses.replace(v, expr=round_constants(v.expr, ev.dtype))
        except Decline:
            v = None
        if v is None:
            v = self.constant_tensor(node)
        return v if v is not None else self.leaf(node)

    def scalar_tensor(self, node: fx.Node, ev) -> Optional[Val]:
        """``t.item()`` of a one-element tensor ``t`` whose value no size names:
        the value of ``t`` itself (a captured tensor broadcast everywhere).
        Under ``dynamic=True`` dynamo passes a module's float attribute (HF's
        ``self.scaling``, timm's ``self.scale``) as a 0-d tensor and reads it
        with ``.item()``."""
        op = C.canonical(node)
        if not isinstance(ev, (torch.SymFloat, torch.SymInt)) or op is None or op.name != "item":
            return None
        t = op.kw.get("input")
        tv = C.example_value(t) if isinstance(t, fx.Node) else None
        if not isinstance(tv, torch.Tensor) or not all(isinstance(n, int) and n == 1 for n in tv.shape):
            return None
        if not (from_shape_env(ev.node.expr).free_symbols - set(self.size_map)):
            return None                  # a size after all: named as one
        v = self.value(t)
        return Val(v.expr, ())

    def slice_assignment(self, node: fx.Node) -> Val:
        """``x[index] = value`` (a prefix-LM mask opened with ``mask[:, :p] = 0``):
        x after the write, for basic indices (slices of step 1, integers,
        Ellipsis) and a number; x read at run time, after the write, when the
        value is a tensor (``b[:, 1:].add_(t)`` written back as ``b[:, 1:] =
        b[:, 1:] + t``, [Note: in-place writes made out of place] in
        pipeline.py); anything else is declined."""
        x, index, fill = node.args[:3]
        if not isinstance(x, fx.Node) or self.writes_run_time_read(node):
            raise Decline("a slice assignment on a tensor read at run time")
        if isinstance(fill, fx.Node) and isinstance(C.example_value(fill), torch.Tensor):
            return self.leaf(x)
        if isinstance(fill, fx.Node) or not isinstance(fill, (int, float, bool)):
            raise Decline("a slice assignment of a tensor")
        old = self.value(x)
        shape = C.shape_of(x)
        cond = _index_condition(index, shape)
        if cond is None:
            raise Decline("a slice assignment with an advanced or strided index")
        new = self.const(fill)
        if is_bool(old.expr):
            return Val(sympy.Or(sympy.And(cond, as_bool(new)), sympy.And(sympy.Not(cond), old.expr)), shape)
        return Val(sympy.Piecewise((new, cond), (old.expr, True)), shape)

    def writes_run_time_read(self, node: fx.Node) -> bool:
        """Whether ``node`` is an in-place op on (a view of) a tensor that is
        read at run time: LayoutLMv3's ``bias = base.view(...).transpose(0, 1);
        bias.add_(rel).div_(c)`` makes ``base`` a leaf written through a view,
        and the op reads ``base`` with both writes in it."""
        src = node.args[0] if node.args else None
        if not isinstance(src, fx.Node) or node not in mutating_users(src):
            return False
        root = storage_root(src)
        try:
            self.value(root)
        except Decline:         # the root cannot be read here: the caller reads this node instead
            return False
        return any(lf.node is root for lf in self.leaves)

    def leaf(self, node: fx.Node) -> Val:
        shape = C.shape_of(node)
        if node.op == "call_method" and node.target == "item":
            node = node.args[0]
            shape = C.shape_of(node)
        # a captured tensor is read when the op runs; it must not be written
        # between where the site reads it and there (the reader's own write included)
        reader = self.order.get(self._readers[-2]) if len(self._readers) > 1 else None
        if reader is not None and any(self.order[m] >= reader and m is not node
                                      for m in storage_writers(node)):
            raise Decline(f"'{node.name}' is modified in place after the scores read it")
        for lf in self.leaves:
            if lf.node is node:
                break
        else:
            lf = Leaf(node, sympy.Function(f"_leaf{len(self.leaves)}"), len(shape))
            self.leaves.append(lf)
        r = len(shape)
        args = [sympy.Integer(0) if is_one(shape[i]) else AX[r - 1 - i] for i in range(r)]
        return Val(lf.func(*(args or [sympy.Integer(0)])), shape)

    def constant_tensor(self, node) -> Optional[Val]:
        """A constant two-valued band (a registered ``tril`` buffer, or a mask
        dynamo folded into a constant) is an index predicate."""
        real = self.real_values.get(node)
        if real is None or real.requires_grad or real.dim() < 2 or real.numel() > (1 << 24):
            return None
        if real.is_inference():
            return None     # no version counter: a later in-place write could not be seen
        if node.op == "placeholder" and not registered_buffer(node):
            return None
        found = band_of(real)
        if found is None:
            return None
        self.folded.append(node)        # guarded at run time: [Note: folded buffers] in backend.py
        cond, inside, outside = found
        if real.dtype == torch.bool:
            e = cond if inside else sympy.Not(cond)
        else:
            e = sympy.Piecewise((self.const(inside), cond), (self.const(outside), True))
        return Val(e, C.shape_of(node))

    def side_op(self, node, op) -> Optional[Val]:
        name, k = op.name, op.kw
        shape = C.shape_of(node)
        if name in C.FILLS:
            e = self.const(C.fill_value(op))
            if C.example_value(node).dtype == torch.bool:
                e = as_bool(e)
            return Val(e, shape)
        if name in ("tensor", "scalar_tensor", "as_tensor") and node.args \
                and isinstance(node.args[0], (int, float, bool)):
            e = self.const(node.args[0])
            return Val(as_bool(e) if C.example_value(node).dtype == torch.bool else e, shape)
        if name == "arange":
            a = list(node.args)
            start, end, step = (0, a[0], 1) if len(a) == 1 else (a + [1])[:3]
            start, step = node.kwargs.get("start", start), node.kwargs.get("step", step)
            return Val(self.const(start) + self.const(step) * AX[0], shape)
        if name in ("tril", "triu"):
            x = self.value(k["input"])
            d = self.const(k.get("diagonal", 0) or 0)
            cond = (AX[0] - AX[1] <= d) if name == "tril" else (AX[0] - AX[1] >= d)
            zero = sympy.false if is_bool(x.expr) else 0
            return Val(sympy.Piecewise((x.expr, cond), (zero, True)) if zero == 0
                       else sympy.And(x.expr, cond), shape)
        if name in _CASTS:
            x = self.value(k["input"])
            dt = C.example_value(node).dtype
            e = as_bool(x.expr) if dt == torch.bool else as_num(x.expr)
            if not dt.is_floating_point and dt != torch.bool and not is_bool(x.expr):
                return None  # integer truncation of an index expression: keep as tensor
            return Val(e, shape)        # rounded to dt by side_value, as every side value
        if name in ("detach",):
            x = self.value(k["input"])
            return Val(x.expr, shape) if not _has_leaf(x.expr) else None
        if name in ("expand", "expand_as"):
            x = self.value(k["input"])
            return Val(self.broadcast(x, shape), shape)
        if name in ("unsqueeze", "view", "reshape", "squeeze", "flatten", "view_as", "reshape_as"):
            return self.side_reshape(node, k)
        if name in ("transpose", "permute"):
            return self.side_permute(node, op)
        if name == "getitem":
            return self.side_getitem(node, k)
        operands, extra = self.operands(op)
        if operands is None:
            return None
        return self.elementwise(node, name, operands, extra)

    def side_reshape(self, node, k) -> Optional[Val]:
        """Reshapes that only add or drop size-1 axes keep the expression."""
        x = self.value(k["input"])
        old, new = x.shape, C.shape_of(node)
        merged = _merged_split_axes(x, old, new)
        if merged is not None:
            return merged
        old_keep = [i for i, s in enumerate(old) if not is_one(s)]
        new_keep = [i for i, s in enumerate(new) if not is_one(s)]
        if len(old_keep) != len(new_keep) or not all(
                _size_eq(old[i], new[j]) for i, j in zip(old_keep, new_keep)):
            return None
        sub = {AX[len(old) - 1 - i]: sympy.Integer(0) for i, s in enumerate(old) if is_one(s)}
        for i, j in zip(old_keep, new_keep):
            sub[AX[len(old) - 1 - i]] = AX[len(new) - 1 - j]
        return Val(_subs(x.expr, sub), new)

    def side_permute(self, node, op) -> Optional[Val]:
        x = self.value(op.kw["input"])
        r = len(x.shape)
        perm = C.permutation(op, r)
        if perm is None:
            return None
        # out axis j reads in axis perm[j]
        sub = {AX[r - 1 - perm[j]]: AX[r - 1 - j] for j in range(r)}
        return Val(_subs(x.expr, sub), C.shape_of(node))

    def side_getitem(self, node, k) -> Optional[Val]:
        x = self.value(k["input"])
        idx = k["index"]
        idx = list(idx) if isinstance(idx, tuple) else [idx]
        r = len(x.shape)
        if sum(1 for i in idx if i is Ellipsis) > 1:
            return None
        if Ellipsis in idx:
            e = idx.index(Ellipsis)
            used = sum(1 for i in idx if i is not None and i is not Ellipsis)
            idx = idx[:e] + [slice(None)] * (r - used) + idx[e + 1:]
        idx += [slice(None)] * (r - sum(1 for i in idx if i is not None))
        new = C.shape_of(node)
        out_axis, in_axis, sub = 0, 0, {}
        for it in idx:
            if it is None:
                out_axis += 1
                continue
            sym = AX[r - 1 - in_axis]
            if isinstance(it, slice):
                start = 0 if it.start is None else it.start
                step = 1 if it.step is None else it.step
                if not isinstance(start, int) or not isinstance(step, int) or start < 0:
                    return None
                if (start, step) != (0, 1) and _has_leaf(x.expr):
                    return None
                sub[sym] = AX[len(new) - 1 - out_axis] * step + start
                out_axis += 1
            elif isinstance(it, int) and it >= 0:
                if _has_leaf(x.expr):
                    return None
                sub[sym] = sympy.Integer(it)
            else:
                return None
            in_axis += 1
        if _has_leaf(x.expr):
            old_sizes = [s for s in x.shape if not is_one(s)]
            new_sizes = [s for s in new if not is_one(s)]
            if len(old_sizes) != len(new_sizes) or not all(
                    _size_eq(a, b) for a, b in zip(old_sizes, new_sizes)):
                return None  # a real slice of a captured tensor: capture the slice
        return Val(_subs(x.expr, sub), new)


def _merged_split_axes(x: Val, old, new) -> Optional[Val]:
    """A (..., qh, qw, kh, kw) side value viewed as (..., qh*qw, kh*kw): SAM's
    decomposed relative positions built beside the scores and reshaped to
    them ([Note: split key axes]); the value keeps reading its own tensors,
    at (q // qw, q % qw, kv // kw, kv % kw).  Three factors a side (video:
    (qt, qh, qw, kt, kh, kw), torchvision's MViTv2) read at
    (q // (qh*qw), (q // qw) % qh, q % qw, ...)."""
    if new is None or len(new) < 2 or len(old) < len(new) + 2:
        return None
    extra = len(old) - len(new)          # factors beyond one a side
    trail = tuple(old[len(old) - extra - 2:])
    if not all(isinstance(d, int) for d in trail + tuple(new[-2:])) \
            or not all(_size_eq(a, b) for a, b in zip(old[:len(old) - extra - 2], new[:-2])):
        return None
    for nq in range(2, len(trail) - 1):      # the query's factors, then the key's
        qf, kf = trail[:nq], trail[nq:]
        if math.prod(qf) == new[-2] and math.prod(kf) == new[-1] and len(qf) <= 3 and len(kf) <= 3:
            break
    else:
        return None
    sub = {}
    for merged, sizes, first in ((AX[1], qf, len(kf)), (AX[0], kf, 0)):
        for j, at in enumerate(factors(merged, sizes)):     # outermost first
            sub[AX[first + len(sizes) - 1 - j]] = at
    for i in range(len(new) - 2):
        sub[AX[len(trail) + i]] = AX[2 + i]
    return Val(_subs(x.expr, sub), new)


def registered_buffer(node: fx.Node) -> bool:
    """Whether placeholder ``node`` is a module's registered buffer (dynamo's
    source for it names ``_buffers``): the inputs ``constant_tensor`` may fold."""
    src = node.meta.get("grapharg")
    return node.op == "placeholder" and src is not None and "_buffers" in str(getattr(src, "source", ""))


def _index_condition(index, shape):
    """Where a basic index of a tensor of ``shape`` selects, as a predicate over
    its axes (``AX[0]`` the last), or None for what it cannot say."""
    items = list(index) if isinstance(index, tuple) else [index]
    if sum(i is Ellipsis for i in items) > 1 or any(i is None for i in items):
        return None
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items[at:at + 1] = [slice(None)] * (len(shape) - len(items) + 1)
    if len(items) > len(shape):
        return None
    r, cond = len(shape), sympy.true
    for d, it in enumerate(items):
        a, size = AX[r - 1 - d], shape[d]
        if isinstance(it, bool) or isinstance(it, fx.Node):
            return None
        ends = [it] if isinstance(it, int) else [it.start, it.stop] if isinstance(it, slice) else []
        if not isinstance(size, int) and any(isinstance(e, int) and e < 0 for e in ends):
            return None         # from the end of a symbolic length
        if isinstance(it, int):
            cond = sympy.And(cond, sympy.Eq(a, it if it >= 0 else size + it))
        elif isinstance(it, slice):
            if it.step not in (None, 1) or any(isinstance(e, fx.Node) for e in (it.start, it.stop)):
                return None
            if it.start is not None:
                cond = sympy.And(cond, a >= (it.start if it.start >= 0 else size + it.start))
            if it.stop is not None:
                cond = sympy.And(cond, a < (it.stop if it.stop >= 0 else size + it.stop))
        else:
            return None
    return cond


def band_of(real: torch.Tensor):
    """``(cond, inside, outside)`` when every [.., L, S] slice of ``real`` is
    ``inside`` where ``cond`` (``A1 <= A2 + d`` or ``A1 >= A2 + d``) holds and
    ``outside`` elsewhere; None otherwise."""
    m = real.reshape(-1, *real.shape[-2:])
    values = torch.unique(m)
    if values.numel() != 2:
        return None
    lo, hi = values.tolist()
    rows, cols = m.shape[-2:]
    col = torch.arange(cols, device=m.device)[None, :]
    row = torch.arange(rows, device=m.device)[:, None]
    for inside, outside in ((hi, lo), (lo, hi)):
        first = (m[0, 0] == inside).nonzero()
        if first.numel() == 0:
            continue
        n_in, start = int((m[0, 0] == inside).sum()), int(first[0, 0])
        for cond, band in ((AX[0] <= AX[1] + (n_in - 1), col <= row + (n_in - 1)),
                           (AX[0] >= AX[1] + start, col >= row + start)):
            if bool(((m == inside) == band).all()):
                return cond, _py(inside), _py(outside)
    return None


def _py(x):
    return bool(x) if isinstance(x, bool) else x
