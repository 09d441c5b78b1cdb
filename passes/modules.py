"""Attention that dynamo keeps as one call: ``F.multi_head_attention_forward``.

Entry point: ``find_module_sites(gm) -> list[ModuleSite | Declined]`` and
``rewrite_module_site(gm, site) -> fx.Node``.

``nn.MultiheadAttention`` reaches the graph as a single call of
``F.multi_head_attention_forward``.  With ``need_weights=True`` (its
default) that function computes the probabilities by hand (``baddbmm``,
softmax, dropout, ``bmm``: an Lq×Lk matrix per head) even when the caller
drops them.  When the weights are unused we replace the call by
``mha_forward`` below: the same projections around one attention op.  With
``need_weights=False`` PyTorch already calls SDPA and the call is left alone.
"""
from __future__ import annotations

import dataclasses
import inspect
import operator
from typing import Any, List, Optional

import sympy
import torch
import torch.fx as fx
import torch.nn.functional as F

from . import canonicalize as C
from .analyze import spec as S
from .analyze.values import Decline
from .match import Declined

_SIG = inspect.signature(F.multi_head_attention_forward)


@dataclasses.dataclass
class ModuleSite:
    node: fx.Node
    args: dict               # bound arguments of the call
    spec: S.AttentionSpec
    masks: List[tuple]       # (node, axes) per captured tensor


def find_module_sites(gm: fx.GraphModule) -> List[Any]:
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is F.multi_head_attention_forward:
            try:
                site = _module_site(node)
            except Decline as e:
                site = Declined(node, str(e))
            if site is not None:
                out.append(site)
    return out


def _module_site(node: fx.Node) -> Optional[ModuleSite]:
    a = _SIG.bind(*node.args, **node.kwargs)
    a.apply_defaults()
    a = dict(a.arguments)
    if not a["need_weights"]:
        return None  # PyTorch runs SDPA itself
    # the pass's ``drop_unread`` has erased what only fed ops nothing reads
    if not all(_output(u) for u in node.users):
        raise Decline("the attention weights are used")
    for name in ("bias_k", "bias_v", "static_k", "static_v"):
        if a[name] is not None:
            raise Decline(f"nn.MultiheadAttention with {name}")
    if a["add_zero_attn"]:
        raise Decline("nn.MultiheadAttention with add_zero_attn")
    if len(C.shape_of(a["query"]) or ()) != 3:
        raise Decline("unbatched nn.MultiheadAttention input")
    for flag in ("training", "dropout_p", "num_heads", "use_separate_proj_weight"):
        if isinstance(a[flag], fx.Node):
            raise Decline(f"nn.MultiheadAttention with a runtime {flag}")
    p = float(a["dropout_p"]) if a["training"] else 0.0
    mod, captured, masks = S.score, [], []
    for name, axes_by_rank in (("attn_mask", {2: (2, 3), 3: (-1, 2, 3)}),
                               ("key_padding_mask", {2: (0, 3)})):
        m = a[name]
        if m is None:
            continue
        ev = C.example_value(m)
        if ev.dim() not in axes_by_rank or (ev.dim() == 3 and ev.shape[0] == 1):
            raise Decline(f"{name} of shape {tuple(ev.shape)}")
        i = len(captured)
        t = S.captured_call(i)
        axes = axes_by_rank[ev.dim()]
        used = {j for x in axes for j in ((0, 1) if x == -1 else (x,))}
        captured.append(S.CapturedTensor(tuple(j in used for j in range(4)),
                                         str(ev.dtype).replace("torch.", ""),
                                         bool(ev.requires_grad and ev.dtype.is_floating_point)))
        masks.append((m, axes))
        # bool masks become -inf where True (F._canonical_mask), floats are added
        mod = sympy.Piecewise((-sympy.oo, sympy.Ne(t, 0)), (mod, True)) \
            if ev.dtype == torch.bool else mod + t
    qdt = C.example_value(a["query"]).dtype
    spec = S.AttentionSpec(
        score_mod=sympy.piecewise_fold(mod), scale=1 / sympy.sqrt(S.D), captured=tuple(captured),
        dropout_p=p, gqa_group=1,
        softmax_dtype="float64" if qdt == torch.float64 else "float32",
        out_dtype=str(qdt).replace("torch.", ""), prob_dtype=str(qdt).replace("torch.", ""),
        score_dtype=str(qdt).replace("torch.", ""))
    return ModuleSite(node, a, spec, masks)


def rewrite_module_site(gm: fx.GraphModule, site: ModuleSite) -> fx.Node:
    from attn_compiler import layout
    from attn_compiler.nn_modules import mha_forward

    from .rewrite import _fake_run

    g, a = gm.graph, site.args
    with g.inserting_before(site.node):
        seed = g.call_function(layout.dropout_seed, ()) if site.spec.dropout_p else None
        new = g.call_function(mha_forward, (  # no failure point after this: the swap is atomic
            a["query"], a["key"], a["value"], a["num_heads"], a["in_proj_weight"],
            a["in_proj_bias"], a["out_proj_weight"], a["out_proj_bias"],
            a["q_proj_weight"] if a["use_separate_proj_weight"] else None,
            a["k_proj_weight"] if a["use_separate_proj_weight"] else None,
            a["v_proj_weight"] if a["use_separate_proj_weight"] else None,
            [m for m, _ in site.masks], tuple(ax for _, ax in site.masks),
            site.spec.dumps(), seed))
    new.meta["stack_trace"] = site.node.meta.get("stack_trace")
    created = [n for n in (seed, new) if n is not None]
    try:
        users = list(site.node.users)
        _fake_run(created, lambda n: n, users[0]) if users else None
    except Exception:
        for n in reversed(created):
            g.erase_node(n)
        raise
    for u in list(site.node.users):
        u.replace_all_uses_with(new)
        g.erase_node(u)
    g.erase_node(site.node)
    return new


def _output(u: fx.Node) -> bool:
    """``u`` takes the attention output (item 0) of the call's tuple."""
    return u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0
