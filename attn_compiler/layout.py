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


def to_op_layout(x: torch.Tensor, labels: str, target: str) -> torch.Tensor:
    """Permute ``x`` (axes named by ``labels``) into ``target`` order, adding
    size-1 axes for labels it lacks, then pad the batch to two axes."""
    present = [lab for lab in target if lab in labels]
    y = x.permute([labels.index(lab) for lab in present])
    for i, lab in enumerate(target):
        if lab not in labels:
            y = y.unsqueeze(i)
    for _ in range(4 - len(target)):  # [BH, L, D] -> [1, BH, L, D]
        y = y.unsqueeze(0)
    return y


def captured_view(x: torch.Tensor, axes: Tuple[Optional[int], ...]) -> torch.Tensor:
    """``x`` as a 4-D tensor broadcastable to ``[B, H, Lq, Lk]``; ``axes[i]``
    is the op axis of x's axis ``i`` (None: read at index 0)."""
    if any(a is None for a in axes):
        x = x[tuple(0 if a is None else slice(None) for a in axes)]
    kept = [a for a in axes if a is not None]
    x = x.permute(sorted(range(len(kept)), key=lambda i: kept[i]))
    for j in range(4):
        if j not in kept:
            x = x.unsqueeze(j)
    return x


def from_op_layout(o: torch.Tensor, op_labels: str, out_labels: str) -> torch.Tensor:
    """The op's ``[B, H, Lq, Dv]`` output back in the user's layout; a copy
    only when the user's contraction wrote another axis order."""
    for _ in range(4 - len(op_labels)):
        o = o.squeeze(0)
    if out_labels == op_labels:
        return o
    return o.permute([op_labels.index(lab) for lab in out_labels]).contiguous()


def dropout_seed(like: torch.Tensor) -> torch.Tensor:
    """A fresh 0-d int64 seed for the op's counter-based dropout RNG, drawn
    from torch's default generator (so ``torch.manual_seed`` reproduces)."""
    return torch.randint(0, 2**62, (), dtype=torch.int64)
