"""What the benchmarks run besides library baselines: the attention a model
writes by hand (run eagerly, and handed to torch.compile), and our op called
directly with an AttentionSpec.

Score variants (``variant``), all after the 1/sqrt(D) scale:

    none     z = score
    softcap  z = 50·tanh(score / 50)                     (Gemma-2)
    alibi    z = score + slope_h·(kv_idx − q_idx)        slope_h = 2^(−8(h+1)/H)
    bias     z = score + bias[0, h, q_idx, kv_idx]       learned, (1, H, Lq, Lk), gets dBias
    padding  z = score + mask[b, 0, 0, kv_idx]           Hugging Face's additive key padding:
                                                         0 or finfo(dtype).min, (B, 1, 1, Lk)
    keypad   z = score where keep[b, 0, 0, kv_idx]       boolean key padding (masked_fill with
             else −inf                                   -inf), (B, 1, 1, Lk); FlexAttention
                                                         gets it as a block mask

``causal`` masks kv_idx > q_idx with −inf on top of any variant.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

VARIANTS = ("none", "softcap", "alibi", "bias", "padding", "keypad")
SOFTCAP = 50             # Gemma-2's attention logit cap


def padding_mask(B: int, N: int, dtype: torch.dtype, device) -> torch.Tensor:
    """(B, 1, 1, N) additive mask as Hugging Face builds it: 0 where a key is
    kept, finfo(dtype).min where it is padding; batch b pads its last
    b·N/(2B) keys (batch 0 none)."""
    pad = torch.arange(B, device=device)[:, None] * N // (2 * B)            # (B, 1)
    padded = torch.arange(N, device=device)[None, :] >= N - pad              # (B, N)
    mask = torch.zeros(B, 1, 1, N, dtype=dtype, device=device)
    return mask.masked_fill_(padded[:, None, None, :], torch.finfo(dtype).min)


def keypad_keep(B: int, N: int, device) -> torch.Tensor:
    """(B, 1, 1, N) bool, True where a key is kept: the padding of ``padding_mask``."""
    pad = torch.arange(B, device=device)[:, None] * N // (2 * B)            # (B, 1)
    return (torch.arange(N, device=device)[None, :] < N - pad)[:, None, None, :]


def alibi_slopes(H: int, device) -> torch.Tensor:
    """(1, H, 1, 1) float32: slope_h = 2^(−8(h+1)/H), the ALiBi paper's geometric series."""
    h = torch.arange(H, dtype=torch.float64, device=device)
    return torch.pow(2.0, -8.0 * (h + 1) / H).to(torch.float32).view(1, H, 1, 1)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, L, D) -> (B, Hkv·n_rep, L, D), as Llama's modeling code writes it."""
    if n_rep == 1:
        return x
    B, Hkv, L, D = x.shape
    return x[:, :, None].expand(B, Hkv, n_rep, L, D).reshape(B, Hkv * n_rep, L, D)


class HandWrittenAttention(nn.Module):
    """softmax(mod(q kᵀ · scale)) v written out the way model code does it.

    ``extra``: the ALiBi slopes (1, H, 1, 1) for ``alibi``, the bias (1, H, Lq, Lk)
    for ``bias``, else None.  K/V with fewer heads than q are repeated (GQA).
    """

    def __init__(self, causal: bool = False, variant: str = "none") -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, not {variant!r}")
        self.causal, self.variant = causal, variant

    def forward(self, q, k, v, extra: torch.Tensor | None = None):
        n_rep = q.size(1) // k.size(1)
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)              # (B, H, Lk, D)
        s = q @ k.transpose(-2, -1) * (1.0 / math.sqrt(q.size(-1)))  # (B, H, Lq, Lk)
        Lq, Lk = s.shape[-2:]
        if self.variant == "softcap":
            s = SOFTCAP * torch.tanh(s / SOFTCAP)
        elif self.variant == "alibi":
            rel = torch.arange(Lk, device=s.device)[None, :] - torch.arange(Lq, device=s.device)[:, None]
            s = s + extra * rel                                      # (1, H, 1, 1) * (Lq, Lk)
        elif self.variant in ("bias", "padding"):
            s = s + extra
        elif self.variant == "keypad":
            s = s.masked_fill(~extra, float("-inf"))
        if self.causal:
            keep = torch.ones(Lq, Lk, dtype=torch.bool, device=s.device).tril()
            s = s.masked_fill(~keep, float("-inf"))
        p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        return p @ v                                                 # (B, H, Lq, D)


def compile_attn_compiler(module: nn.Module) -> nn.Module:
    """The product path: ``torch.compile(module, backend="attn_compiler")``.

    The backend object is passed rather than its registered name, so this also
    works from a source checkout that was never installed (no entry point).
    """
    import attn_compiler

    attn_compiler.reset()
    return torch.compile(module, backend=attn_compiler.backend(), dynamic=False)


def site_note() -> str:
    """What the backend did with the sites it saw: 'fused 1/1, runs attn_compiler'
    (the never-slower choice: attn_compiler, sdpa or original), or why it declined."""
    import attn_compiler

    sites = list(attn_compiler.report())
    if not sites:
        return "no attention site seen"
    fused = sum(s.fused for s in sites)
    ran = ", ".join(dict.fromkeys(str(s.features["choice"]) for s in sites if s.features.get("choice")))
    reasons = "; ".join(dict.fromkeys(s.reason for s in sites if not s.fused))
    return (f"fused {fused}/{len(sites)}" + (f", runs {ran}" if ran else "")
            + (f", declined: {reasons}" if reasons else ""))


def ours_spec(causal: bool, variant: str, dtype: torch.dtype, gqa_group: int = 1) -> str:
    """The AttentionSpec (as its string) of one case, for ``ops.attention``.

    Written the way the analyzer writes the spec of ``HandWrittenAttention``
    (mask branch first as ``kv_idx - q_idx > 0``, the softcap's 1/50 as the
    float the graph multiplies by), so that ``ours_triton`` and ``attn_compiler``
    run the same generated kernels and share their tuning: an equivalent spec
    spelled differently (``Piecewise((z, kv_idx <= q_idx), (-oo, True))``)
    generates other source, compiled and tuned again.
    """
    import sympy
    from attn_compiler.passes.analyze.spec import (
        AttentionSpec,
        CapturedTensor,
        D,
        captured_call,
        kv_idx,
        q_idx,
        score,
    )

    name = str(dtype).removeprefix("torch.")
    z, captured = score, ()
    if variant == "softcap":
        z = SOFTCAP * sympy.tanh(sympy.Float(1.0 / SOFTCAP) * score)       # 50·tanh(score/50)
    elif variant == "alibi":
        z = score + captured_call(0) * (kv_idx - q_idx)
        captured = (CapturedTensor((False, True, False, False), "float32"),)
    elif variant == "bias":
        z = score + captured_call(0)
        captured = (CapturedTensor((False, True, True, True), name, requires_grad=True),)
    elif variant == "padding":
        z = score + captured_call(0)
        captured = (CapturedTensor((True, False, False, True), name),)
    elif variant == "keypad":
        z = sympy.Piecewise((score, sympy.Ne(captured_call(0), 0)), (-sympy.oo, True))
        captured = (CapturedTensor((True, False, False, True), "bool"),)
    if causal:
        z = sympy.Piecewise((-sympy.oo, kv_idx - q_idx > 0), (z, True))
    spec = AttentionSpec(score_mod=z, scale=1 / sympy.sqrt(D), captured=captured, gqa_group=gqa_group,
                         out_dtype=name, prob_dtype=name, score_dtype=name)
    return spec.dumps()


def triton_context() -> contextlib.AbstractContextManager:
    """``ops.implementation("triton")``: our generated kernels, no fallback."""
    from attn_compiler import ops

    implementation = getattr(ops, "implementation", None)
    if implementation is None:
        raise RuntimeError("attn_compiler.ops.implementation(name) is missing: the op cannot be "
                           "forced onto the Triton kernels yet")
    return implementation("triton")


def ours_forward(q, k, v, captured, spec: str) -> torch.Tensor:
    """``out`` of ``attn_compiler::attention`` (the lse is dropped)."""
    from attn_compiler import ops

    return ops.attention(q, k, v, captured, spec)[0]

