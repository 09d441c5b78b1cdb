"""Replacements for attention that PyTorch modules compute in one call.

``mha_forward`` computes what ``F.multi_head_attention_forward`` returns as
its first output (``need_weights=True`` path, weights dropped), with the
attention itself done by the ``attn_compiler::attention`` op.  The rewrite
(passes/modules.py) builds the spec; this function only moves layouts.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import layout
from . import ops as _ops


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[L, B, E] -> [B, H, L, E/H] (a view: torch splits E as H x D)."""
    L, B, E = x.shape
    return x.view(L, B, heads, E // heads).permute(1, 2, 0, 3)


def mha_forward(query, key, value, num_heads: int, in_proj_weight, in_proj_bias,
                out_proj_weight, out_proj_bias, q_proj_weight, k_proj_weight, v_proj_weight,
                masks: List[torch.Tensor], mask_axes: Sequence[Tuple[int, ...]], spec: str,
                seed: Optional[torch.Tensor]) -> torch.Tensor:
    E = query.shape[-1]
    if q_proj_weight is None:
        wq, wk, wv = in_proj_weight.chunk(3)
    else:
        wq, wk, wv = q_proj_weight, k_proj_weight, v_proj_weight
    bq, bk, bv = in_proj_bias.chunk(3) if in_proj_bias is not None else (None, None, None)
    q = _heads(F.linear(query, wq, bq), num_heads)       # (B, H, Lq, D)
    k = _heads(F.linear(key, wk, bk), num_heads)         # (B, H, Lk, D)
    v = _heads(F.linear(value, wv, bv), num_heads)       # (B, H, Lk, D)
    caps = [layout.captured_view(m, tuple(ax), num_heads) for m, ax in zip(masks, mask_axes)]
    out = _ops.fused_attention(q, k, v, caps, spec, seed)[0]   # (B, H, Lq, D)
    L, B = query.shape[0], query.shape[1]
    out = out.permute(2, 0, 1, 3).reshape(L * B, E)
    return F.linear(out, out_proj_weight, out_proj_bias).view(L, B, -1)
