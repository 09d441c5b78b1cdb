"""Layout helpers called from rewritten graphs (views only, no data copies
except where noted).

The attention op works in one layout: q ``[B, Hq, Lq, D]``, k/v ``[B|1, Hkv,
Lk, D]``, captured tensors ``[B|1, H|1, Lq|1, Lk|1]`` and output ``[B, Hq, Lq,
Dv]``.  The rewrite inserts calls of these functions to move the user's
tensors into that layout and the op's output back into the user's.
Labels are single characters naming axes (see passes/canonicalize.py).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def to_op_layout(x: torch.Tensor, labels: str, target: str,
                 heads: Optional[int] = None) -> torch.Tensor:
    """Permute ``x`` (axes named by ``labels``) into ``target`` order, adding
    size-1 axes for labels it lacks, then bring the batch to two axes:
    ``[B*H, L, D]`` becomes ``[B, H, L, D]`` when ``heads`` is given (else
    ``[1, B*H, L, D]``) and ``[B, Hkv, G, L, D]`` becomes ``[B, Hkv*G, L, D]``
    (a copy only if the two head axes cannot be merged in place)."""
    present = [lab for lab in target if lab in labels]
    y = x.permute([labels.index(lab) for lab in present])
    for i, lab in enumerate(target):
        if lab not in labels:
            y = y.unsqueeze(i)
    if len(target) == 3:
        y = y.unflatten(0, (-1, heads)) if heads else y.unsqueeze(0)
    elif len(target) == 5:
        y = y.flatten(1, 2)
    return y


def expand_batch(q: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A query of batch 1 as a stride-0 view over ``like``'s batch."""
    return q.expand(like.shape[0], -1, -1, -1)


FLAT = -1  # an axis of length B*H read at b * H + h
CYCLIC_B = -2  # an axis of length n read at b mod n (B a multiple of n): Swin's window masks
MERGE_NEXT = -3  # this axis and the next are one (q // W, q % W): merged into the next's op axis
MERGE_NEXT_SWAPPED = -4  # this axis and the next are one (q % W, q // W): swapped, then merged
# the three factors of a query split in three (time, height, width), outermost
# first, on any axes in any order: ordered, then merged into one query axis
QFACTORS = (-5, -6, -7)


def captured_view(x: torch.Tensor, axes: Tuple[Optional[int], ...],
                  heads: Optional[int] = None, like: Optional[torch.Tensor] = None,
                  pad: Tuple[int, int] = (0, 0)) -> torch.Tensor:
    """``x`` as a 4-D tensor broadcastable to ``[B, H, Lq, Lk]``; ``axes[i]``
    is the op axis of x's axis ``i`` (None: read at index 0; FLAT: the
    merged batch-and-head axis, split with ``heads``; CYCLIC_B: the batch
    axis read at b mod n, repeated to ``like``'s batch: a copy of x, B/n times;
    MERGE_NEXT: flattened with the next axis, the query split in two;
    MERGE_NEXT_SWAPPED: the same split written (q % W, q // W), swapped first:
    a copy of x, which has one query axis less than the scores; QFACTORS: a
    query split in three, the factors' axes ordered and merged: a copy).  ``pad``:
    zeros put in front of the query and key axes (a tensor read at
    ``q - pad[0]``, ``kv - pad[1]``: a term of a slice of the scores; the
    kernels read the zeros where the slice does not lie and do not use them)."""
    if any(a is None for a in axes):     # first: the halves of a split query are then neighbours
        x = x[tuple(0 if a is None else slice(None) for a in axes)]
        axes = tuple(a for a in axes if a is not None)
    if any(a in QFACTORS for a in axes):     # a copy: the factors moved together, outermost first
        at = sorted((i for i, a in enumerate(axes) if a in QFACTORS), key=lambda i: QFACTORS.index(axes[i]))
        first = min(at)
        perm = list(range(first)) + at + [i for i in range(first, len(axes)) if i not in at]
        x = x.permute(perm).flatten(first, first + len(at) - 1)
        axes = axes[:first] + (2,) + tuple(axes[i] for i in range(first, len(axes)) if i not in at)
    while MERGE_NEXT in axes or MERGE_NEXT_SWAPPED in axes:
        i = next(j for j, a in enumerate(axes) if a in (MERGE_NEXT, MERGE_NEXT_SWAPPED))
        if axes[i] == MERGE_NEXT_SWAPPED:
            x = x.transpose(i, i + 1)
        x = x.flatten(i, i + 1)
        axes = axes[:i] + axes[i + 1:]
    if CYCLIC_B in axes:
        i = axes.index(CYCLIC_B)
        reps = like.shape[0] // x.shape[i]
        x = x.unsqueeze(i).expand(*x.shape[:i], reps, *x.shape[i:]).flatten(i, i + 1)
        axes = axes[:i] + (0,) + axes[i + 1:]
    if FLAT in axes:
        i = axes.index(FLAT)
        x = x.unflatten(i, (-1, heads))
        axes = axes[:i] + (0, 1) + axes[i + 1:]
    kept = list(axes)
    x = x.permute(sorted(range(len(kept)), key=lambda i: kept[i]))
    for j in range(4):
        if j not in kept:
            x = x.unsqueeze(j)
    if any(pad):
        x = torch.nn.functional.pad(x, (pad[1] if x.shape[3] > 1 else 0, 0, pad[0] if x.shape[2] > 1 else 0, 0))
    return _rows_along_keys(x)


def _rows_along_keys(x: torch.Tensor) -> torch.Tensor:
    """A (query, key) plane whose keys are not adjacent in memory, copied so
    that they are.

    [Note: planes read along the keys]  The kernels load a captured plane in
    (BLOCK_M, BLOCK_N) tiles, row by row along the keys.  Transformer-XL's
    position term is laid out [query, key, batch, head]: relaid out
    ([Note: scores in another layout]), its keys are B*H elements apart and
    every element of a tile is a sector of its own (run 119: 8.8 ms for a
    forward at 2x16x4096x64, 1.7 ms with the plane copied first).  The copy
    is of a tensor the model already holds at that size, made once per call
    (the backward reads the same copy); a broadcast plane (a stride 0) is
    left as it is."""
    if x.dim() != 4 or x.shape[2] == 1 or x.shape[3] == 1 or x.stride(3) == 1 \
            or any(st == 0 and n > 1 for n, st in zip(x.shape, x.stride())):
        return x
    return x.contiguous()


def from_op_layout(o: torch.Tensor, op_labels: str, out_labels: str,
                   group: Optional[int] = None) -> torch.Tensor:
    """The op's ``[B, H, Lq, Dv]`` output back in the user's layout (the
    inverse of ``to_op_layout``'s batch change; ``group`` is G of a 5-D
    layout); a copy only when the user's contraction wrote another axis order."""
    if len(op_labels) == 3:
        o = o.flatten(0, 1)
    elif len(op_labels) == 5:
        o = o.unflatten(1, (-1, group))
    if out_labels == op_labels:
        return o
    return o.permute([op_labels.index(lab) for lab in out_labels]).contiguous()


def scale_rows(y: torch.Tensor, factor, div: bool, shapes, axes, kind: str = "scale") -> torch.Tensor:
    """``y``, a site's output, times (``div``: over) a factor the user applied
    to the probabilities that is one value per row: (P ⊙ m)·V = m ⊙ (P·V)
    when m is broadcast along the key axis (a head mask).  ``factor`` is
    aligned with P where it was applied; ``shapes`` (where applied, P at P·V)
    when views between changed P's leading axes; ``axes[i]``: the axis of
    P's row index that output axis i reads, None for the value axis.

    [Note: rows of P set to 0]  ``kind`` "zero" / "keep": the factor is a
    boolean per row and P's rows where it is True / False were set to 0
    (``masked_fill`` / ``where``), so those rows of P·V are 0: a ``where`` on
    the output, not a product (a nan row of P zeroed is 0, not nan·0).  The
    backward of such a row is 0 too, since the op's backward reads it with
    dO = 0, unless the row is nan (no key kept under a -inf mask): the
    analysis declines that case unless such rows read P = 0 anyway."""
    if isinstance(factor, torch.Tensor):
        rank = len(shapes[0]) if shapes is not None else sum(a is not None for a in axes) + 1
        f = factor.reshape((1,) * (rank - factor.dim()) + tuple(factor.shape))
        if shapes is not None:
            f = f.expand(*shapes[0][:-1], 1).reshape(*shapes[1][:-1], 1)
        f = f.squeeze(-1).permute([a for a in axes if a is not None])
        for i, a in enumerate(axes):
            if a is None:
                f = f.unsqueeze(i)
        factor = f
    if kind != "scale":
        zero = torch.zeros((), dtype=y.dtype, device=y.device)
        return torch.where(factor, zero, y) if kind == "zero" else torch.where(factor, y, zero)
    return (y / factor if div else y * factor).to(y.dtype)


def lse_as(lse: torch.Tensor, keepdim: bool, dtype: torch.dtype) -> torch.Tensor:
    """The op's log-sum-exp of the modified scores in place of the user's
    ``torch.logsumexp(scores, -1, keepdim)`` (in that call's dtype)."""
    return (lse.unsqueeze(-1) if keepdim else lse).to(dtype)


def zero_empty_rows(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """``nan_to_num(P)`` before P·V: a row that keeps no key (a -inf mask
    over all of it: lse = -inf, the softmax nan) gives 0; every other row of
    P holds no nan, so it is unchanged.  The lse also enters with weight 0, so
    the backward receives a (zero) lse gradient: with one, the op's backward
    reads such rows as P = 0 (eager's nan_to_num(P)), so dV stays finite."""
    empty = torch.isneginf(lse).unsqueeze(-1)
    read = torch.where(empty, 0.0, lse.unsqueeze(-1)) * 0.0
    return torch.where(empty, torch.zeros((), dtype=out.dtype, device=out.device), out + read.to(out.dtype))


def with_sink(out: torch.Tensor, lse: torch.Tensor, sink) -> torch.Tensor:
    """Attention with a sink logit per row (GPT-OSS): the softmax over the keys
    and the sink, without the sink's column, is softmax(s) · e^lse / (e^lse +
    e^sink), so the output is ``out * sigmoid(lse - sink)`` (``sink`` a
    tensor or a number: softmax plus one is a sink of 0); a row that keeps
    no key (lse = -inf, out nan) gives 0, as eager's softmax puts all the mass
    on the sink.  Differentiable through lse (the op's lse has a gradient)."""
    if isinstance(sink, torch.Tensor):
        w = torch.sigmoid(lse - sink.squeeze(-1).to(lse.dtype)).unsqueeze(-1)
    else:                      # a constant logit (softmax plus one: 0)
        w = torch.sigmoid(lse - float(sink)).unsqueeze(-1)
    out = torch.where(w == 0, torch.zeros((), dtype=out.dtype, device=out.device), out)
    return (out * w).to(out.dtype)


def dropout_seed() -> torch.Tensor:
    """A fresh 0-d int64 seed for the op's counter-based dropout RNG, drawn
    from torch's default CPU generator (so ``torch.manual_seed`` reproduces)."""
    return torch.randint(0, 2**62, (), dtype=torch.int64)
