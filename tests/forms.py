"""Hand-written attention as models write it: one small function or module per form.

Each form is named after what it is and the model family it comes from.
Unless a docstring says otherwise, a function takes ``q, k, v`` of shape
(B, H, L, D) and returns (B, H, Lq, Dv).  Modules take the same tensors in
``forward``.  The forms are plain eager code: tests/test_forms.py compiles them
with the backend and compares against running them eagerly (and in float64).

Notation: B batch, H query heads, Hkv key/value heads, G = H // Hkv,
Lq / Lk query / key lengths, D head dim.
"""
from __future__ import annotations

import math

import torch
import torch.utils.checkpoint
import torch.nn as nn
import torch.nn.functional as F


# ---- Q·Kᵀ spellings ------------------------------------------------------------

def gpt2_matmul_div_sqrt(q, k, v):
    """GPT-2 (HF eager): torch.matmul, K by transpose(-1, -2), divide by sqrt(head_dim)."""
    s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.size(-1))   # (B, H, Lq, Lk)
    p = F.softmax(s, dim=-1)
    return torch.matmul(p, v)


def vit_at_mul_inv_sqrt(q, k, v):
    """ViT / timm: ``@`` operator, K by transpose(-2, -1), multiply by d**-0.5."""
    s = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    return s.softmax(dim=-1) @ v


def mT_torch_softmax(q, k, v):
    """Tensor.mT for Kᵀ, torch.softmax, a literal scale."""
    s = q @ k.mT * 0.25                                                 # D = 16
    return torch.softmax(s, dim=-1) @ v


def permute_kT(q, k, v):
    """K transposed with permute(0, 1, 3, 2); scale as a division by a number."""
    s = torch.matmul(q, k.permute(0, 1, 3, 2)) / 4.0
    return torch.matmul(s.softmax(-1), v)


def pretransposed_k(q, kt, v):
    """K arrives already transposed: kt (B, H, D, Lk) (as caches in some codebases)."""
    s = q @ kt * (1.0 / math.sqrt(q.shape[-1]))
    return F.softmax(s, dim=-1) @ v


def fairseq_bmm_3d(q, k, v):
    """fairseq MultiheadAttention: 3-D (B*H, L, D) inputs, torch.bmm both products."""
    s = torch.bmm(q * (q.size(-1) ** -0.5), k.transpose(1, 2))          # (B*H, Lq, Lk)
    p = F.softmax(s, dim=-1, dtype=torch.float32).type_as(s)
    return torch.bmm(p, v)                                              # (B*H, Lq, D)


def fairseq_bmm_reshaped(q, k, v):
    """4-D inputs flattened to (B*H, L, D) in the graph, bmm, reshaped back."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    q3 = q.reshape(B * H, Lq, D)
    k3 = k.reshape(B * H, Lk, D)
    v3 = v.reshape(B * H, Lk, v.shape[-1])
    s = torch.bmm(q3, k3.transpose(1, 2)) / math.sqrt(D)
    p = torch.softmax(s, dim=-1)
    return torch.bmm(p, v3).view(B, H, Lq, -1)


def matmul_scores_bmm_output(q, k, v):
    """4-D scores by torch.matmul, P·V by bmm: P and V reshaped to (B*H, L, ·)
    for the product and the output viewed back (B, H, Lq, D)."""
    B, H, Lq, D = q.shape
    s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(D)
    p = F.softmax(s, dim=-1)
    o = torch.bmm(p.reshape(B * H, Lq, -1), v.reshape(B * H, k.shape[2], v.shape[-1]))
    return o.view(B, H, Lq, -1)


def matmul_scores_bmm_output_gqa(q, k, v):
    """As ``matmul_scores_bmm_output`` with GQA (k, v repeat_interleave'd to
    the query heads first); with B = 1 the flat batch of P·V is the heads."""
    g = q.shape[1] // k.shape[1]
    return matmul_scores_bmm_output(q, k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1))


def einsum_bhqd(q, k, v):
    """einsum 'bhqd,bhkd->bhqk' then 'bhqk,bhkd->bhqd'."""
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * (q.shape[-1] ** -0.5)
    return torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v)


def einsum_bqhd(q, k, v):
    """Sequence-major layout (B, L, H, D) as many JAX ports write it:
    'bqhd,bkhd->bhqk' and P·V 'bhqk,bkhd->bqhd'.  Returns (B, Lq, H, D)."""
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    p = torch.softmax(s, dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


def guided_diffusion_split_scale(q, k, v):
    """guided-diffusion QKVAttention: channel-major (B*H, D, T), scale d**-1/4 on
    both q and k, einsum 'bct,bcs->bts', float softmax cast back.  Returns (B*H, D, T)."""
    ch = q.shape[1]
    scale = 1 / math.sqrt(math.sqrt(ch))
    w = torch.einsum("bct,bcs->bts", q * scale, k * scale)              # (B*H, Tq, Tk)
    w = torch.softmax(w.float(), dim=-1).type(w.dtype)
    return torch.einsum("bts,bcs->bct", w, v)


def whisper_prescaled_q(q, k, v):
    """Whisper / BART (HF): the query is scaled before Q·Kᵀ."""
    q = q * (q.shape[-1] ** -0.5)
    s = torch.matmul(q, k.transpose(2, 3))
    return torch.matmul(F.softmax(s, dim=-1), v)


def bloom_baddbmm_alibi(q, kt, v, alibi, causal_bool):
    """Bloom: q (B*H, Lq, D), kt (B*H, D, Lk) pre-transposed, alibi (B*H, 1, Lk);
    ``baddbmm(alibi, q, kt, beta=1, alpha=1/sqrt(D))``, viewed (B, H, Lq, Lk),
    masked with finfo.min where ``causal_bool`` (B, 1, Lq, Lk) is True, float32
    softmax cast back, bmm with v (B*H, Lk, D)."""
    BH, Lq, D = q.shape
    B = causal_bool.shape[0]
    H = BH // B
    s = alibi.baddbmm(q, kt, beta=1.0, alpha=1.0 / math.sqrt(D))       # (B*H, Lq, Lk)
    s = s.view(B, H, Lq, -1)
    s = torch.masked_fill(s, causal_bool, torch.finfo(s.dtype).min)
    p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    p = p.view(B * H, Lq, -1)
    return torch.bmm(p, v)


# ---- softmax spellings -----------------------------------------------------------

class ViTNNSoftmax(nn.Module):
    """HF ViT / CLIP style module with an ``nn.Softmax(dim=-1)`` submodule."""

    def __init__(self):
        super().__init__()
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, q, k, v):
        s = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
        return self.softmax(s) @ v


def llama_softmax_fp32_cast(q, k, v):
    """Llama (HF eager): softmax with dtype=torch.float32, ``.to(q.dtype)``."""
    s = torch.matmul(q, k.transpose(2, 3)) * (q.shape[-1] ** -0.5)
    p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p, v)


def t5_float_upcast_type_as(q, k, v):
    """``.float()`` upcast of the scores, softmax, ``.type_as(q)``."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    p = F.softmax(s.float(), dim=-1).type_as(q)
    return p @ v


def manual_softmax_amax(q, k, v):
    """Decomposed softmax: exp(s - amax(s)) / sum."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    e = torch.exp(s - torch.amax(s, dim=-1, keepdim=True))
    p = e / e.sum(dim=-1, keepdim=True)
    return p @ v


def manual_softmax_max_index0(q, k, v):
    """Decomposed softmax with ``s.max(-1, keepdim=True)[0]``."""
    s = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5)
    e = (s - s.max(-1, keepdim=True)[0]).exp()
    p = e / torch.sum(e, -1, keepdim=True)
    return p @ v


def manual_softmax_max_values(q, k, v):
    """Decomposed softmax with ``s.max(dim=-1, keepdim=True).values``."""
    s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    e = torch.exp(s - s.max(dim=-1, keepdim=True).values)
    return torch.matmul(e / e.sum(-1, keepdim=True), v)


def manual_softmax_two_exps(q, k, v):
    """Decomposed softmax with the exponential written twice:
    ``exp(s) / exp(s).sum(-1, keepdim=True)`` (two nodes of the same input)."""
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    return (torch.exp(s) / torch.exp(s).sum(-1, keepdim=True)) @ v


def manual_softmax_sum_unsqueezed(q, k, v):
    """Decomposed softmax whose sum drops the axis and puts it back:
    ``e / e.sum(dim=-1).unsqueeze(-1)``."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    e = (s - s.amax(-1, keepdim=True)).exp()
    return (e / e.sum(dim=-1).unsqueeze(-1)) @ v


def manual_softmax_sum_indexed(q, k, v):
    """``e / e.sum(-1)[..., None]`` (no shift)."""
    s = torch.einsum("bhid,bhjd->bhij", q, k) * q.shape[-1] ** -0.5
    e = s.exp()
    return torch.einsum("bhij,bhjd->bhid", e / e.sum(-1)[..., None], v)


def manual_softmax_reciprocal(q, k, v):
    """The sum's reciprocal as a factor: ``e * e.sum(-1, keepdim=True).reciprocal()``,
    causal."""
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    L = q.shape[-2]
    s = s.masked_fill(~torch.ones(L, L, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    e = torch.exp(s - s.max(-1, keepdim=True).values)
    return (e * e.sum(-1, keepdim=True).reciprocal()) @ v


def manual_softmax_one_over(q, k, v):
    """``(1.0 / e.sum(-1, keepdim=True)) * e``."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return ((1.0 / e.sum(-1, keepdim=True)) * e) @ v


def normalized_after_pv(q, k, v):
    """The normalization deferred past P·V (FlashAttention's order, written
    out): ``(e @ v) / e.sum(-1, keepdim=True)`` with ``e = exp(s - max)``,
    causal."""
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    L = q.shape[-2]
    s = s.masked_fill(~torch.ones(L, L, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return (e @ v) / e.sum(-1, keepdim=True)


def normalized_after_pv_einsum(q, k, v):
    """As ``normalized_after_pv`` through einsums, the sum's reciprocal a
    factor of the product (no shift)."""
    s = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(q.shape[-1])
    e = s.exp()
    return torch.einsum("bhij,bhjd->bhid", e, v) * e.sum(dim=-1).unsqueeze(-1).reciprocal()


# ---- masks -------------------------------------------------------------------------

class NanoGPTCausalBuffer(nn.Module):
    """nanoGPT CausalSelfAttention (manual path): c_attn projection, causal mask in a
    registered ``bias`` buffer sliced [:, :, :T, :T], masked_fill -inf, c_proj.
    Takes x (B, T, C)."""

    def __init__(self, n_embd=64, n_head=4, block_size=32):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size))
                             .view(1, 1, block_size, block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = att @ v                                                      # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


def causal_tril_in_graph(q, k, v):
    """Causal mask from ``tril(ones(L, L, bool))`` built in the graph, masked_fill(~m, -inf)."""
    L = q.shape[-2]
    m = torch.tril(torch.ones(L, L, dtype=torch.bool, device=q.device))
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~m, float("-inf"))
    return torch.softmax(s, -1) @ v


def causal_triu_finfo_min(q, k, v):
    """Causal mask from ``triu(ones, diagonal=1).bool()``, masked_fill with finfo.min."""
    L = q.shape[-2]
    m = torch.triu(torch.ones(L, L, device=q.device), diagonal=1).bool()
    s = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5)
    s = s.masked_fill(m, torch.finfo(s.dtype).min)
    return torch.softmax(s, -1) @ v


def padding_bool_where_neg1e9(q, k, v, keep):
    """Boolean padding mask ``keep`` (B, 1, 1, Lk) through torch.where with -1e9."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = torch.where(keep, s, torch.tensor(-1e9, dtype=s.dtype, device=s.device))
    return F.softmax(s, dim=-1) @ v


def bert_bool_masked_fill_neg10000(q, k, v, pad):
    """Old BERT style: masked_fill(pad, -10000.0), ``pad`` (B, 1, 1, Lk) True = padding."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = s.masked_fill(pad, -10000.0)
    return F.softmax(s, dim=-1) @ v


def bert_additive_padding(q, k, v, add_mask):
    """HF BERT extended attention mask: additive float (B, 1, 1, Lk) input."""
    s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s + add_mask
    return torch.matmul(F.softmax(s, dim=-1), v)


def full_additive_mask(q, k, v, add_mask):
    """Full additive float mask (B, 1, Lq, Lk) input (HF 4-D attention_mask)."""
    s = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5) + add_mask
    p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p, v)


def opt_bmm_max_clamp(q, k, v, add_mask):
    """OPT / BART / Whisper (transformers 4.2x-4.3x): bmm on (B*H, L, D), the
    additive mask added on a 4-D view, then ``torch.max(w, tensor(finfo.min))``
    (the two-tensor, elementwise form) so that the sum cannot reach -inf."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    q3, k3, v3 = (t.reshape(B * H, t.shape[2], t.shape[3]) for t in (q * D ** -0.5, k, v))
    w = torch.bmm(q3, k3.transpose(1, 2)).view(B, H, Lq, Lk) + add_mask
    w = torch.max(w, torch.tensor(torch.finfo(w.dtype).min, device=w.device))
    w = w.view(B * H, Lq, Lk)
    return torch.bmm(F.softmax(w, dim=-1), v3).view(B, H, Lq, -1)


def swin_shifted_window_mask(q, k, v, rel_bias, mask):
    """Swin (timm / transformers WindowAttention) in a shifted stage: q, k, v
    (B*nW, H, N, D) per window, the relative position bias (H, N, N) added,
    then the (nW, N, N) shift mask (0 / -100) on a (B, nW, H, N, N) view of
    the scores, viewed back: window w of image b is op batch b * nW + w, so
    the mask is read at (op batch) mod nW."""
    B_, H, N, D = q.shape
    nW = mask.shape[0]
    attn = (q * D ** -0.5) @ k.transpose(-2, -1)
    attn = attn + rel_bias.unsqueeze(0)
    attn = attn.view(B_ // nW, nW, H, N, N) + mask.unsqueeze(1).unsqueeze(0)
    attn = attn.view(-1, H, N, N)
    return attn.softmax(dim=-1) @ v


def exp2_softmax_log2e_scale(q, k, v):
    """A softmax in base 2 with log2(e) folded into the scale, as Triton code
    writes it: ``exp2(s·log2e - max) / sum`` is softmax(s)."""
    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 * 1.4426950408889634)
    e = torch.exp2(s - s.amax(-1, keepdim=True))
    return (e / e.sum(-1, keepdim=True)) @ v


def exp2_softmax_causal_base_two(q, k, v):
    """A softmax in base 2 without log2(e) (temperature ln 2), causal by a
    mask in the graph, normalized by a reciprocal: the softmax of s·ln 2."""
    L = q.shape[-2]
    s = (q @ k.transpose(-1, -2)) * 0.125
    s = s.masked_fill(torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    e = torch.exp2(s - s.amax(-1, keepdim=True))
    return (e * (1.0 / e.sum(-1, keepdim=True))) @ v


def torchvision_swin_mask_in_graph(q, k, v, rel_bias, grid=(6, 6), ws=3, shift=1):
    """torchvision's shifted_window_attention: the shift mask built in the
    forward from the image size: an (H, W) grid of region ids filled by slice
    assignments, viewed as windows (nW, ws*ws), ids compared pairwise into
    0 / -100, added on a (B, nW, H, N, N) view of the scores.  The grid is read
    at window-split indices no op axis runs along; the (1, nW, 1, N, N) mask
    that joins the scores is read along the window-folded heads."""
    B_, Hh, N, D = q.shape
    gh, gw = grid
    nW = (gh // ws) * (gw // ws)
    attn = (q * D ** -0.5).matmul(k.transpose(-2, -1)) + rel_bias.unsqueeze(0)
    ids = q.new_zeros((gh, gw))
    cnt = 0
    for h in ((0, -ws), (-ws, -shift), (-shift, None)):
        for w in ((0, -ws), (-ws, -shift), (-shift, None)):
            ids[h[0]:h[1], w[0]:w[1]] = cnt
            cnt += 1
    ids = ids.view(gh // ws, ws, gw // ws, ws).permute(0, 2, 1, 3).reshape(nW, ws * ws)
    mask = ids.unsqueeze(1) - ids.unsqueeze(2)
    mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
    attn = attn.view(B_ // nW, nW, Hh, N, N) + mask.unsqueeze(1).unsqueeze(0)
    attn = F.softmax(attn.view(-1, Hh, N, N), dim=-1)
    return attn.matmul(v)


def shaw_relative_logits_first(q, k, v, rel_k):
    """Shaw et al. relative position logits (an einsum of q with a (Lq, Lk, D)
    table of relative keys) written before Q·Kᵀ: ``rel + q @ kᵀ``; the nearest
    score-shaped contraction is the relative one, not Q·Kᵀ."""
    rel = torch.einsum("bhid,ijd->bhij", q, rel_k)
    s = (rel + torch.matmul(q, k.transpose(-1, -2))) / math.sqrt(q.shape[-1])
    return torch.matmul(torch.softmax(s, dim=-1), v)


def log_softmax_exp(q, k, v):
    """Probabilities as ``log_softmax(s, -1).exp()`` (code that also keeps
    log-probabilities for a loss)."""
    s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.matmul(F.log_softmax(s, dim=-1).exp(), v)


def prefix_lm_slice_assignment(q, k, v, prefix: int = 5):
    """Prefix LM (GLM, UniLM): a causal additive mask built in the graph, the
    prefix columns opened by slice assignment (``mask[:, :p] = 0``)."""
    L = q.shape[-2]
    mask = torch.full((L, L), float("-inf"), device=q.device).triu(1)
    mask[:, :prefix] = 0.0
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + mask
    return s.softmax(-1) @ v


def layoutlmv3_bias_written_through_a_view(q, k, v, rel):
    """LayoutLMv3's position bias: a fresh tensor, a transposed view of it
    written in place (``add_``, ``div_``); the op reads the tensor with both
    writes in it."""
    base = rel * 1.0
    bias = base.transpose(-1, -2)
    bias = bias.add_(rel).div_(4.0)
    s = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5 + bias
    return F.softmax(s, dim=-1) @ v


def clone_partial_rotary_setitem(q, k, v):
    """Partial rotary written into clones of q and k by slice assignment:
    the product reads the written clones, not their sources."""
    q, k = q.clone(), k.clone()
    q[..., :8] = q[..., :8] * 0.5 + torch.cat((-q[..., 4:8], q[..., :4]), -1) * 0.8
    k[..., :8] = k[..., :8] * 0.5 + torch.cat((-k[..., 4:8], k[..., :4]), -1) * 0.8
    return (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1) @ v


def gqa_widened_k_scaled_in_place(q, k, v):
    """GQA whose widened K is scaled in place: the narrow K is not what the
    product read, so the op takes the wide one."""
    k = k.repeat_interleave(2, dim=1)
    v = v.repeat_interleave(2, dim=1)
    k.mul_(0.25)
    return (q @ k.transpose(-1, -2)).softmax(-1) @ v


def where_full_like_scores(q, k, v, keep):
    """The fill made from the scores' shape: ``where(keep, s, full_like(s, -inf))``."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = torch.where(keep[:, None, None, :], s, torch.full_like(s, float("-inf")))
    return s.softmax(-1) @ v


def ones_like_scores_tril(q, k, v):
    """A causal mask made from the scores' shape: ``ones_like(s).tril() == 0``."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = s.masked_fill(torch.ones_like(s).tril() == 0, float("-inf"))
    return s.softmax(-1) @ v


def new_full_triu(q, k, v):
    """``s + s.new_full((L, L), -inf).triu(1)``."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    L = s.shape[-1]
    return (s + s.new_full((L, L), float("-inf")).triu(1)).softmax(-1) @ v


def sagan_value_times_probs_t(q, k, v):
    """SAGAN / DANet self-attention over feature maps: energy = bmm(q, k) with
    q (B, N, C') and k (B, C', N), softmax, then the values (B, C, N) times
    Pᵀ: ``bmm(v, attention.permute(0, 2, 1))``, out (B, C, N)."""
    B, H, L, D = q.shape
    qf = q.reshape(B * H, L, D)
    kf = k.reshape(B * H, L, D).permute(0, 2, 1)
    vf = v.reshape(B * H, L, D).permute(0, 2, 1)                    # (B*H, C, N)
    attention = F.softmax(torch.bmm(qf, kf), dim=-1)
    return torch.bmm(vf, attention.permute(0, 2, 1))


def mistral_sliding_window(q, k, v, window: int = 4):
    """Sliding-window causal mask from arange comparisons: keep i - w < j <= i."""
    Lq, Lk = q.shape[-2], k.shape[-2]
    i = torch.arange(Lq, device=q.device)[:, None]
    j = torch.arange(Lk, device=q.device)[None, :]
    keep = (j <= i) & (j > i - window)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def hf5_causal_where_finfo(q, k, v):
    """transformers-5 style: causal additive mask built in the graph,
    ``where(kv_idx[None, :] <= q_idx[:, None] + (Lk - Lq), 0, finfo.min)``,
    added to the scaled scores (bottom-right aligned, as with a cache)."""
    Lq, Lk = q.shape[-2], k.shape[-2]
    offset = Lk - Lq
    q_idx = torch.arange(Lq, device=q.device)
    kv_idx = torch.arange(Lk, device=q.device)
    allowed = kv_idx[None, :] <= q_idx[:, None] + offset                # (Lq, Lk)
    zero = torch.zeros((), dtype=q.dtype, device=q.device)
    mask = torch.where(allowed, zero, torch.finfo(q.dtype).min)
    s = torch.matmul(q, k.transpose(2, 3)) * (q.shape[-1] ** -0.5)
    s = s + mask[None, None]
    p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p, v)


def hf5_causal_and_padding(q, k, v, pad_keep):
    """transformers-5 style causal mask and-ed with a padding bool mask
    ``pad_keep`` (B, Lk) (True = real token), turned additive with finfo.min."""
    Lq, Lk = q.shape[-2], k.shape[-2]
    q_idx = torch.arange(Lq, device=q.device)
    kv_idx = torch.arange(Lk, device=q.device)
    causal = kv_idx[None, :] <= q_idx[:, None] + (Lk - Lq)              # (Lq, Lk)
    allowed = causal[None, None, :, :] & pad_keep[:, None, None, :]     # (B, 1, Lq, Lk)
    zero = torch.zeros((), dtype=q.dtype, device=q.device)
    mask = torch.where(allowed, zero, torch.finfo(q.dtype).min)
    s = torch.matmul(q, k.transpose(2, 3)) * (q.shape[-1] ** -0.5) + mask
    p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p, v)


class GPT2HFWhereBuffer(nn.Module):
    """GPT-2 (HF, pre-4.40): bool causal buffer sliced
    ``bias[:, :, Lk - Lq : Lk, :Lk]``, ``torch.where(mask, w, full([], finfo.min))``."""

    def __init__(self, max_positions=32):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones((max_positions, max_positions), dtype=torch.bool))
                             .view(1, 1, max_positions, max_positions), persistent=False)

    def forward(self, q, k, v):
        w = torch.matmul(q, k.transpose(-1, -2))
        w = w / torch.full([], v.size(-1) ** 0.5, dtype=w.dtype, device=w.device)
        Lq, Lk = q.size(-2), k.size(-2)
        causal = self.bias[:, :, Lk - Lq: Lk, :Lk]
        mask_value = torch.full([], torch.finfo(w.dtype).min, dtype=w.dtype, device=w.device)
        w = torch.where(causal, w.to(w.dtype), mask_value)
        w = nn.functional.softmax(w, dim=-1)
        w = w.type(v.dtype)
        return torch.matmul(w, v)


def llama_sliced_additive_mask(q, k, v, attention_mask):
    """Llama (HF 4.4x eager): a 4-D additive mask input (B, 1, Lq, Lmax) sliced
    to the key length, ``[:, :, :, : k.shape[-2]]``."""
    s = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(q.shape[-1])
    causal_mask = attention_mask[:, :, :, : k.shape[-2]]
    s = s + causal_mask
    p = nn.functional.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p, v)


def inplace_masked_fill_(q, k, v, pad):
    """In-place ``masked_fill_`` of the scores with a (B, 1, 1, Lk) bool mask."""
    s = q.matmul(k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s.masked_fill_(pad, float("-inf"))
    return s.softmax(-1).matmul(v)


def inplace_iadd_bias(q, k, v, bias):
    """In-place ``scores += bias`` (T5 / many HF ports), bias (1, H, Lq, Lk)."""
    s = torch.matmul(q, k.transpose(-1, -2))
    s += bias
    return torch.matmul(F.softmax(s, dim=-1), v)


def inplace_div_scale_(q, k, v):
    """In-place scaling of the scores: ``s.div_(sqrt(D))`` (GPT-NeoX-style ports)."""
    s = torch.matmul(q, k.transpose(-1, -2))
    s.div_(math.sqrt(q.shape[-1]))
    return torch.matmul(s.softmax(-1), v)


class Seq2SeqTensorScale(nn.Module):
    """bentrevett seq2seq tutorial Transformer: the scale is a tensor buffer
    ``sqrt(FloatTensor([head_dim]))``, K by permute, ``masked_fill(mask == 0, -1e10)``
    with an integer mask (B, 1, 1, Lk)."""

    def __init__(self, head_dim=16):
        super().__init__()
        self.register_buffer("scale", torch.sqrt(torch.FloatTensor([head_dim])))

    def forward(self, q, k, v, mask):
        energy = torch.matmul(q, k.permute(0, 1, 3, 2)) / self.scale
        energy = energy.masked_fill(mask == 0, -1e10)
        attention = torch.softmax(energy, dim=-1)
        return torch.matmul(attention, v)


def gqa_grouped_einsum(q, k, v):
    """GQA without widening K/V (JAX ports): q viewed (B, Hkv, G, Lq, D),
    einsum 'bhgqd,bhkd->bhgqk' and 'bhgqk,bhkd->bhgqd'.  Returns (B, H, Lq, D)."""
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    qg = q.view(B, Hkv, Hq // Hkv, Lq, D)
    s = torch.einsum("bhgqd,bhkd->bhgqk", qg, k) / math.sqrt(D)
    p = torch.softmax(s, dim=-1)
    return torch.einsum("bhgqk,bhkd->bhgqd", p, v).reshape(B, Hq, Lq, D)


# ---- score modifications -------------------------------------------------------

def mpt_alibi_in_graph(q, k, v):
    """ALiBi built in the graph from per-head slopes and arange (MPT-style,
    ``slope * (j - i)``), plus a causal mask."""
    H, Lq, Lk = q.shape[1], q.shape[-2], k.shape[-2]
    slopes = torch.pow(2.0, -8.0 * torch.arange(1, H + 1, device=q.device, dtype=torch.float32) / H)
    i = torch.arange(Lq, device=q.device)[:, None]
    j = torch.arange(Lk, device=q.device)[None, :]
    alibi = slopes[:, None, None] * (j - i).to(torch.float32)            # (H, Lq, Lk)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = s + alibi.to(s.dtype)
    s = s.masked_fill(j > i, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


class T5UnscaledBias(nn.Module):
    """T5: no scale; learned relative position bias, an nn.Parameter (1, H, Lq, Lk),
    added to the scores; float softmax ``.type_as(scores)``."""

    def __init__(self, H=4, Lq=13, Lk=13):
        super().__init__()
        self.position_bias = nn.Parameter(0.5 * torch.randn(1, H, Lq, Lk))

    def forward(self, q, k, v):
        scores = torch.matmul(q, k.transpose(3, 2))
        scores += self.position_bias
        p = F.softmax(scores.float(), dim=-1).type_as(scores)
        return torch.matmul(p, v)


def t5_relative_position_bucket(relative_position, bidirectional=True, num_buckets=32, max_distance=128):
    """T5's ``_relative_position_bucket`` (Hugging Face), as written there:
    exact buckets for near positions, logarithmic ones up to ``max_distance``."""
    relative_buckets = 0
    if bidirectional:
        num_buckets //= 2
        relative_buckets += (relative_position > 0).to(torch.long) * num_buckets
        relative_position = torch.abs(relative_position)
    else:
        relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    relative_position_if_large = max_exact + (
        torch.log(relative_position.float() / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).to(torch.long)
    relative_position_if_large = torch.min(
        relative_position_if_large, torch.full_like(relative_position_if_large, num_buckets - 1))
    relative_buckets += torch.where(is_small, relative_position, relative_position_if_large)
    return relative_buckets


class T5BucketedBias(nn.Module):
    """T5 (Hugging Face) as it makes its position bias: relative positions
    (the queries at the end of the keys, as with a cache) bucketed, looked up
    in a learned ``nn.Embedding(num_buckets, H)``, permuted to (1, H, Lq, Lk)
    and added to the unscaled scores; the table's gradient flows through the
    lookup.  Any length (dynamic=True).  The softmax is not upcast by hand:
    ``.float()`` would round the float64 golden's softmax to float32."""

    def __init__(self, H=4, num_buckets=16, max_distance=32, bidirectional=True):
        super().__init__()
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional
        self.relative_attention_bias = nn.Embedding(num_buckets, H)
        with torch.no_grad():
            self.relative_attention_bias.weight.mul_(0.5)

    def forward(self, q, k, v):
        Lq, Lk = q.shape[-2], k.shape[-2]
        context_position = torch.arange(Lq, dtype=torch.long, device=q.device)[:, None] + (Lk - Lq)
        memory_position = torch.arange(Lk, dtype=torch.long, device=q.device)[None, :]
        buckets = t5_relative_position_bucket(memory_position - context_position, self.bidirectional,
                                              self.num_buckets, self.max_distance)
        position_bias = self.relative_attention_bias(buckets).permute([2, 0, 1]).unsqueeze(0)
        scores = torch.matmul(q, k.transpose(3, 2)) + position_bias
        return torch.matmul(F.softmax(scores, dim=-1), v)


class SwinRelativeBiasTable(nn.Module):
    """Swin: relative position bias gathered from a learned table
    ((2W-1)^2, H) with a registered index buffer, permuted to (H, N, N)."""

    def __init__(self, H=4, window=(3, 4)):
        super().__init__()
        wh, ww = window
        self.table = nn.Parameter(0.5 * torch.randn((2 * wh - 1) * (2 * ww - 1), H))
        coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij"))
        flat = torch.flatten(coords, 1)                                  # (2, N)
        rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
        rel[:, :, 0] += wh - 1
        rel[:, :, 1] += ww - 1
        rel[:, :, 0] *= 2 * ww - 1
        self.register_buffer("index", rel.sum(-1))                      # (N, N)

    def forward(self, q, k, v):
        N = q.shape[-2]
        q = q * (q.shape[-1] ** -0.5)
        attn = q @ k.transpose(-2, -1)
        bias = self.table[self.index.view(-1)].view(N, N, -1).permute(2, 0, 1).contiguous()
        attn = attn + bias.unsqueeze(0)
        return attn.softmax(dim=-1) @ v


class SwinV2CosineLogitScale(nn.Module):
    """Swin-v2 cosine attention: normalised q and k, a learned per-head
    logit scale (H, 1, 1) clamped and exponentiated, multiplying the scores."""

    def __init__(self, H=4):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones(H, 1, 1)) + 0.1 * torch.randn(H, 1, 1))

    def forward(self, q, k, v):
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        logit_scale = torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()
        attn = attn * logit_scale
        return attn.softmax(dim=-1) @ v


def gemma2_tanh_softcap(q, k, v, cap: float = 5.0):
    """Gemma-2: scores soft-capped as s / cap, tanh, * cap, then causal."""
    L = q.shape[-2]
    s = torch.matmul(q, k.transpose(2, 3)) * (q.shape[-1] ** -0.5)
    s = s / cap
    s = torch.tanh(s)
    s = s * cap
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    s = s.masked_fill(~causal, torch.finfo(s.dtype).min)
    p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p, v)


def grok_softcap_expr(q, k, v, cap: float = 30.0):
    """Grok-1: ``cap * torch.tanh(s / cap)`` in one expression."""
    s = q @ k.transpose(-1, -2) * 0.08
    s = cap * torch.tanh(s / cap)
    return torch.softmax(s, dim=-1) @ v


def elementwise_chain(q, k, v, bias):
    """Other elementwise chain: scale, add a (1, H, 1, Lk) bias, multiply by a
    temperature, subtract a constant (softmax-invariant)."""
    s = q @ k.transpose(-1, -2)
    s = (s * 0.25 + bias) * 1.5 - 3.0
    return torch.softmax(s, dim=-1) @ v


# ---- GQA / MQA ------------------------------------------------------------------------

def gqa_repeat_interleave(q, k, v):
    """GQA with K/V widened by ``repeat_interleave(G, dim=1)``; k, v (B, Hkv, L, D)."""
    G = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(G, dim=1)
    v = v.repeat_interleave(G, dim=1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(s, dim=-1) @ v


def hf_repeat_kv(x, n_rep: int):
    """HF ``repeat_kv``: (B, Hkv, L, D) -> (B, Hkv * n_rep, L, D)."""
    B, Hkv, L, D = x.shape
    if n_rep == 1:
        return x
    x = x[:, :, None, :, :].expand(B, Hkv, n_rep, L, D)
    return x.reshape(B, Hkv * n_rep, L, D)


def hf_repeat_kv_gqa(q, k, v):
    """Llama/Mistral (HF eager) GQA with ``repeat_kv``, fp32 softmax, causal additive mask."""
    G = q.shape[1] // k.shape[1]
    k = hf_repeat_kv(k, G)
    v = hf_repeat_kv(v, G)
    L = q.shape[-2]
    mask = torch.full((L, L), torch.finfo(q.dtype).min, device=q.device, dtype=q.dtype).triu(1)
    s = torch.matmul(q, k.transpose(2, 3)) * (q.shape[-1] ** -0.5) + mask
    p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p, v)


def mqa_broadcast(q, k, v):
    """MQA (Falcon-7B / PaLM style): k, v (B, 1, L, D) broadcast over the heads by matmul."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return F.softmax(s, dim=-1) @ v


# ---- dropout -----------------------------------------------------------------------------

def functional_dropout(q, k, v, p: float = 0.1, training: bool = True):
    """Attention dropout by ``F.dropout(probs, p, training=...)`` (HF eager)."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    probs = F.softmax(s, dim=-1)
    probs = F.dropout(probs, p=p, training=training)
    return probs @ v


class BertDropoutModule(nn.Module):
    """BERT self-attention core with an ``nn.Dropout`` on the probabilities."""

    def __init__(self, p=0.1):
        super().__init__()
        self.dropout = nn.Dropout(p)

    def forward(self, q, k, v):
        s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        probs = self.dropout(nn.functional.softmax(s, dim=-1))
        return torch.matmul(probs, v)


# ---- cross-attention, decode, several sites ---------------------------------------------

def t5_cross_attention_padding(q, k, v, add_mask):
    """Encoder–decoder cross-attention: Lq != Lk, additive padding mask (B, 1, 1, Lk)."""
    s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1]) + add_mask
    return torch.matmul(F.softmax(s.float(), dim=-1).type_as(s), v)


def kv_cache_decode(q, past_k, past_v, k_new, v_new):
    """One-token decode: q (B, H, 1, D); the cache grows by torch.cat along L."""
    k = torch.cat([past_k, k_new], dim=2)                               # (B, H, Lk, D)
    v = torch.cat([past_v, v_new], dim=2)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(s, dim=-1) @ v


def decoder_self_and_cross(q, k, v, enc_k, enc_v):
    """A decoder block's two sites: causal self-attention, then cross-attention
    whose query is the self-attention output."""
    x = causal_tril_in_graph(q, k, v)
    return gpt2_matmul_div_sqrt(x, enc_k, enc_v)


# ---- research-code forms -------------------------------------------------------------

def lucidrains_amax_detach(q, k, v):
    """lucidrains-style: einsum scores, then the row max subtracted with
    ``sim - sim.amax(dim=-1, keepdim=True).detach()`` before the softmax."""
    sim = torch.einsum("b h i d, b h j d -> b h i j", q, k) * (q.shape[-1] ** -0.5)
    sim = sim - sim.amax(dim=-1, keepdim=True).detach()
    attn = sim.softmax(dim=-1)
    return torch.einsum("b h i j, b h j d -> b h i d", attn, v)


def lucidrains_masked_amax_detach(q, k, v, keep):
    """As lucidrains_amax_detach, with ``masked_fill(~mask, -finfo.max)`` first;
    ``keep`` (B, Lk) bool, True = real token."""
    sim = torch.einsum("b h i d, b h j d -> b h i j", q, k) * (q.shape[-1] ** -0.5)
    mask = keep[:, None, None, :]
    sim = sim.masked_fill(~mask, -torch.finfo(sim.dtype).max)
    sim = sim - sim.amax(dim=-1, keepdim=True).detach()
    attn = sim.softmax(dim=-1)
    return torch.einsum("b h i j, b h j d -> b h i d", attn, v)


class GPTNeoXUpcastWhereBuffer(nn.Module):
    """GPT-NeoX / GPT-J (HF eager): q and k upcast with ``.float()`` before the
    matmul, a bool causal buffer sliced to the lengths,
    ``mask_value = torch.tensor(finfo.min, dtype=w.dtype)``,
    ``torch.where(causal, w, mask_value)``, divided by a norm factor, softmax,
    cast to v's dtype."""

    def __init__(self, max_positions=32, head_dim=16):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones((max_positions, max_positions), dtype=torch.bool))
                             .view(1, 1, max_positions, max_positions), persistent=False)
        self.norm_factor = math.sqrt(head_dim)

    def forward(self, q, k, v):
        Lq, Lk = q.size(-2), k.size(-2)
        causal = self.bias[:, :, Lk - Lq: Lk, :Lk]
        q = q.float()
        k = k.float()
        w = torch.matmul(q, k.transpose(-1, -2))
        mask_value = torch.finfo(w.dtype).min
        mask_value = torch.tensor(mask_value, dtype=w.dtype).to(w.device)
        w = torch.where(causal, w, mask_value)
        w = w / self.norm_factor
        w = nn.functional.softmax(w, dim=-1)
        w = w.to(v.dtype)
        return torch.matmul(w, v)


def gptj_upcast_where_tril(q, k, v):
    """GPT-J style with the causal mask from ``tril`` in the graph: q/k ``.float()``,
    ``torch.where(causal, w, torch.tensor(finfo.min, dtype=w.dtype))``."""
    L = q.shape[-2]
    causal = torch.tril(torch.ones(L, L, dtype=torch.bool, device=q.device))[None, None]
    w = torch.matmul(q.float(), k.float().transpose(-1, -2))
    mask_value = torch.tensor(torch.finfo(w.dtype).min, dtype=w.dtype, device=w.device)
    w = torch.where(causal, w, mask_value)
    w = w / math.sqrt(q.shape[-1])
    w = F.softmax(w, dim=-1).to(v.dtype)
    return torch.matmul(w, v)


class TimmAttention(nn.Module):
    """timm ``Attention`` (manual path): qkv linear, reshape, permute(2, 0, 3, 1, 4),
    unbind(0), ``q * scale``, ``q @ k.transpose(-2, -1)``, softmax, attn_drop,
    ``@ v``, proj.  Takes x (B, N, C)."""

    def __init__(self, dim=64, num_heads=4, attn_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


def fairseq_bmm_key_padding(q, k, v, key_padding_mask):
    """fairseq MultiheadAttention: q (B*H, tgt, D), k/v (B*H, src, D), bmm; the
    (B, src) padding mask (True = pad) applied through a 4-D view,
    ``.masked_fill(kpm.unsqueeze(1).unsqueeze(2).to(torch.bool), -inf)``,
    viewed back to (B*H, tgt, src).  Returns (B*H, tgt, D)."""
    bsz = key_padding_mask.shape[0]
    BH, tgt_len, D = q.shape
    src_len = k.shape[1]
    num_heads = BH // bsz
    q = q * (D ** -0.5)
    attn_weights = torch.bmm(q, k.transpose(1, 2))
    attn_weights = attn_weights.view(bsz, num_heads, tgt_len, src_len)
    attn_weights = attn_weights.masked_fill(
        key_padding_mask.unsqueeze(1).unsqueeze(2).to(torch.bool), float("-inf"))
    attn_weights = attn_weights.view(bsz * num_heads, tgt_len, src_len)
    attn_probs = F.softmax(attn_weights, dim=-1, dtype=torch.float32).type_as(attn_weights)
    return torch.bmm(attn_probs, v)


class SwinV2TimmCosine(nn.Module):
    """Swin-v2 (timm WindowAttention): qkv from x (B, N, C), cosine scores
    ``F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)``, learned
    logit scale clamped with ``max=torch.log(torch.tensor(1. / 0.01))`` and
    exponentiated, softmax, ``@ v``, proj."""

    def __init__(self, dim=64, num_heads=4):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones((num_heads, 1, 1)))
                                        + 0.2 * torch.randn(num_heads, 1, 1))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        logit_scale = torch.clamp(self.logit_scale,
                                  max=torch.log(torch.tensor(1.0 / 0.01, device=x.device))).exp()
        attn = attn * logit_scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, -1)
        return self.proj(x)


def inplace_div_then_masked_fill_causal(q, k, v):
    """In-place statements on the scores: ``attn.div_(math.sqrt(d))`` then
    ``attn.masked_fill_(causal_is_future, float('-inf'))``."""
    L = q.shape[-2]
    future = torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1)
    attn = torch.matmul(q, k.transpose(-2, -1))
    attn.div_(math.sqrt(q.shape[-1]))
    attn.masked_fill_(future, float("-inf"))
    return torch.matmul(torch.softmax(attn, dim=-1), v)


def inplace_masked_fill_then_div(q, k, v, pad):
    """The same two in-place statements in the other order (masked_fill_ first,
    then div_), with a (B, 1, 1, Lk) padding mask, True = pad."""
    attn = torch.matmul(q, k.transpose(-2, -1))
    attn.masked_fill_(pad, float("-inf"))
    attn.div_(math.sqrt(q.shape[-1]))
    return torch.matmul(attn.softmax(dim=-1), v)


# ---------------------------------------------------------------- the math reference of SDPA

def sdpa_math_reference(query, key, value, attn_mask=None, is_causal=False, enable_gqa=False):
    """The reference implementation printed in PyTorch's SDPA documentation,
    copied into much research code: an ``attn_bias`` of zeros written in
    place with ``masked_fill_``, ``+=`` onto the scores, ``torch.dropout``
    with ``train=``, GQA by ``repeat_interleave`` on dim -3."""
    L, S = query.size(-2), key.size(-2)
    scale_factor = 1 / math.sqrt(query.size(-1))
    attn_bias = torch.zeros(L, S, dtype=query.dtype, device=query.device)
    if is_causal:
        temp_mask = torch.ones(L, S, dtype=torch.bool).tril(diagonal=0)
        attn_bias.masked_fill_(temp_mask.logical_not(), float("-inf"))
        attn_bias.to(query.dtype)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_bias.masked_fill_(attn_mask.logical_not(), float("-inf"))
        else:
            attn_bias = attn_mask + attn_bias
    if enable_gqa:
        key = key.repeat_interleave(query.size(-3) // key.size(-3), -3)
        value = value.repeat_interleave(query.size(-3) // value.size(-3), -3)
    attn_weight = query @ key.transpose(-2, -1) * scale_factor
    attn_weight += attn_bias
    attn_weight = torch.softmax(attn_weight, dim=-1)
    attn_weight = torch.dropout(attn_weight, 0.0, train=True)
    return attn_weight @ value


class PerceiverLatents(torch.nn.Module):
    """Perceiver-style cross-attention: learned latent queries of batch 1
    broadcast by the matmul over the batch of the inputs' keys/values."""

    def __init__(self, heads=4, latents=6, dim=16):
        super().__init__()
        self.latents = torch.nn.Parameter(torch.randn(1, heads, latents, dim))

    def forward(self, k, v):
        s = self.latents @ k.transpose(-1, -2) * k.shape[-1] ** -0.5   # (B, H, Nl, Lk)
        return s.softmax(-1) @ v


def einsum_ellipsis(q, k, v):
    """``einsum('... i d, ... j d -> ... i j')``: batch and head axes behind an
    ellipsis (lucidrains-style helpers that work for any number of them)."""
    s = torch.einsum("... i d, ... j d -> ... i j", q, k) * q.shape[-1] ** -0.5
    return torch.einsum("... i j, ... j d -> ... i d", s.softmax(dim=-1), v)


def diffusers_attn_processor(q, k, v, mask=None):
    """diffusers' classic AttnProcessor on [B*H, L, D]: ``baddbmm`` on an
    uninitialised ``torch.empty`` with ``beta=0`` (or on the mask with
    ``beta=1``), ``alpha=scale``, softmax, cast, ``bmm``."""
    if mask is None:
        base, beta = torch.empty(q.shape[0], q.shape[1], k.shape[1], dtype=q.dtype), 0
    else:
        base, beta = mask, 1
    scores = torch.baddbmm(base, q, k.transpose(-1, -2), beta=beta, alpha=q.shape[-1] ** -0.5)
    return torch.bmm(scores.softmax(dim=-1).to(q.dtype), v)


def left_padding_additive_neg1e4(q, k, v, keep):
    """Older research code: causal and key padding folded into one additive
    ``(1 - allowed) * -10000.0`` mask in the scores' dtype; under left padding
    the padded query rows keep no key (rows of fills only: eager's are uniform
    in float16/bfloat16, where -1e4 absorbs the scores)."""
    Lq, Lk = q.shape[-2], k.shape[-2]
    causal = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril()
    allowed = (keep[:, None, None, :] & causal).to(q.dtype)
    s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s + (1.0 - allowed) * -10000.0
    return torch.matmul(s.softmax(dim=-1), v)


def left_padding_additive_neg1e4_upcast(q, k, v, keep):
    """The same mask with the softmax upcast by hand (``s.float().softmax(-1)
    .to(v.dtype)``): the scores were still rounded to the 16-bit dtype, where
    -1e4 absorbed them, before the upcast."""
    Lq, Lk = q.shape[-2], k.shape[-2]
    causal = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril()
    allowed = (keep[:, None, None, :] & causal).to(q.dtype)
    s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s + (1.0 - allowed) * -10000.0
    return torch.matmul(s.float().softmax(dim=-1).to(v.dtype), v)


def hf_extended_mask_in_graph(q, k, v, keep):
    """Hugging Face's ``get_extended_attention_mask`` computed in the graph
    (LayoutLM, CANINE, ESM): a 0/1 float padding row turned into
    ``(1.0 - mask) * finfo.min`` and added to the scores.  Written out, the
    bias is ``c - c * mask``, and ``score + c`` rounds to ``c``: the product
    must be computed before it meets the score ([Note: grouped side values])."""
    ext = keep[:, None, None, :].to(q.dtype)
    ext = (1.0 - ext) * torch.finfo(q.dtype).min
    s = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))
    return torch.matmul(F.softmax(s + ext, dim=-1), v)


def alibi_plus_extended_mask(q, k, v, keep):
    """An ALiBi-like bias and ``(keep - 1) * 1e9`` summed into one side value
    before the scores: the bias of kept keys must survive the fill's product.
    In float16 the sum is cast after the product (1e9 itself overflows, the
    product is 0 or -inf): the bias is read as a tensor, not folded."""
    slopes = 2.0 ** (-8.0 * torch.arange(1, q.shape[1] + 1, device=q.device) / q.shape[1])
    pos = torch.arange(k.shape[-2], device=q.device)
    bias = slopes[:, None, None] * pos[None, None, :] + (keep[:, None, None, :].to(q.dtype) - 1) * 1e9
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(s + bias.to(q.dtype), dim=-1) @ v


def bert_head_mask(q, k, v, head_mask):
    """HF BERT/GPT-2 ``head_mask`` after the softmax (and its dropout): a
    (1, H, 1, 1) factor of the probabilities, one value per row, so
    (P ⊙ m)·V = m ⊙ (P·V)."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    p = F.dropout(F.softmax(s, dim=-1), 0.0, training=False)
    p = p * head_mask
    return p @ v


def bart_layer_head_mask(q, k, v, layer_head_mask):
    """BART/mBART/Pegasus (older transformers): 3-D (B*H, L, L) probabilities
    viewed as 4-D for ``layer_head_mask.view(1, -1, 1, 1) * w`` and back."""
    H = layer_head_mask.shape[0]
    BH, Lq = q.shape[0], q.shape[1]
    w = F.softmax(torch.bmm(q * q.shape[-1] ** -0.5, k.transpose(1, 2)), dim=-1)
    w = layer_head_mask.view(1, -1, 1, 1) * w.view(BH // H, H, Lq, -1)
    w = w.view(BH, Lq, -1)
    return torch.bmm(w, v)


def per_row_weight_then_halved(q, k, v, w):
    """A learned (B, H, Lq, 1) weight per query row and a division by 2 after
    the softmax: both move onto the output, with the weight's gradient."""
    p = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
    return (w * p / 2) @ v


def cogview_pb_relax(q, k, v):
    """CogView's PB-relax: Q scaled down by alpha before Q·Kᵀ, the row max
    subtracted, the scores scaled back up by alpha (softmax is blind to the
    shift, whatever positive factor follows it)."""
    alpha = 32.0
    s = (q / (alpha * math.sqrt(q.shape[-1]))) @ k.transpose(-1, -2)
    s = (s - s.amax(dim=-1, keepdim=True).detach()) * alpha
    return s.softmax(dim=-1) @ v


def scores_as_k_qT_transposed(q, k, v):
    """Q·Kᵀ computed as K·Qᵀ and transposed back (``.mT``)."""
    s = (k @ q.mT).mT / math.sqrt(q.shape[-1])
    return torch.softmax(s, dim=-1) @ v


def scores_einsum_permuted(q, k, v):
    """An einsum that writes the scores [b, h, key, query], permuted back."""
    s = torch.einsum("bhjd,bhid->bhji", k, q).permute(0, 1, 3, 2) * q.shape[-1] ** -0.5
    return s.softmax(-1) @ v


def softmax_by_logsumexp(q, k, v):
    """softmax written as exp(s - logsumexp(s)), under a causal mask."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    Lq, Lk = s.shape[-2:]
    s = s.masked_fill(torch.ones(Lq, Lk, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return torch.exp(s - torch.logsumexp(s, dim=-1, keepdim=True)) @ v


def local_band_with_global_tokens(q, k, v):
    """Longformer-like research code: a band of width 2 plus global tokens
    opened by ``glob[0] = True`` on a fresh tensor (the compile-time check of
    the folded mask must see that write)."""
    n = q.shape[-2]
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    glob = torch.zeros(n, dtype=torch.bool)
    glob[0] = True
    allowed = ((i - j).abs() <= 2) | glob[None, :] | glob[:, None]
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v)


def qwen2_sliding_window_in_place(q, k, v):
    """Older Qwen2/Mistral: a causal finfo.min mask, the sliding window
    filled in place with ``masked_fill_`` before the scores read it."""
    n = q.shape[-2]
    mask = torch.full((n, n), torch.finfo(q.dtype).min, dtype=q.dtype).triu(1)
    mask.masked_fill_(torch.tril(torch.ones_like(mask, dtype=torch.bool), diagonal=-4), torch.finfo(q.dtype).min)
    w = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(q.size(-1))
    w = F.softmax(w + mask[None, None, :, :k.shape[-2]], dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(w, v)


def dense_gat_ones_like_fill(q, k, v, adj):
    """Dense graph attention: ``-9e15 * ones_like(e)`` where the adjacency is
    0; in bfloat16 the fill tensor holds -9e15 rounded to bfloat16."""
    e = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    att = torch.where(adj > 0, e, -9e15 * torch.ones_like(e))
    return torch.matmul(F.softmax(att, dim=-1), v)


def distilbert_expand_as_mask(q, k, v, mask):
    """DistilBERT (transformers 4.x): the padding mask broadcast with
    ``expand_as(scores)``, filled with a finfo.min tensor."""
    bs, _, _, dph = q.shape
    kl = k.shape[-2]
    scores = torch.matmul(q / math.sqrt(dph), k.transpose(2, 3))
    mask = (mask == 0).view(bs, 1, 1, kl).expand_as(scores)
    scores = scores.masked_fill(mask, torch.tensor(torch.finfo(scores.dtype).min))
    return torch.matmul(F.softmax(scores, dim=-1), v)


def xlm_expand_as_in_place(q, k, v, mask):
    """XLM/FlauBERT: the mask made with ``expand_as(scores)`` before an in-place
    ``masked_fill_`` of the scores, the softmax upcast by hand."""
    bs, _, _, dph = q.shape
    kl = k.shape[-2]
    scores = torch.matmul(q / math.sqrt(dph), k.transpose(2, 3))
    m = (mask == 0).view((bs, 1, 1, kl)).expand_as(scores)
    scores.masked_fill_(m, torch.finfo(scores.dtype).min)
    weights = F.softmax(scores.float(), dim=-1).type_as(scores)
    return torch.matmul(F.dropout(weights, p=0.0, training=False), v)


class GptOssSinks(nn.Module):
    """GPT-OSS (transformers' eager path): a learned sink logit per head
    concatenated to the scores, the row max of both subtracted, the softmax
    over both in the scores' dtype, the sink's column dropped; GQA through
    repeat_kv and an additive causal mask.  The sink takes its share of the
    denominator: out = softmax(s)·V ⊙ sigmoid(lse - sink)."""

    def __init__(self, heads=4):
        super().__init__()
        self.sinks = nn.Parameter(torch.linspace(-1.0, 2.0, heads))

    def forward(self, q, k, v):
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        Lq, Lk = q.shape[-2], k.shape[-2]
        causal = torch.full((Lq, Lk), torch.finfo(q.dtype).min, dtype=q.dtype, device=q.device).triu(1)
        w = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5 + causal
        sinks = self.sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, Lq, -1)
        c = torch.cat([w, sinks.to(w.dtype)], dim=-1)
        c = c - c.max(dim=-1, keepdim=True).values
        p = F.softmax(c, dim=-1, dtype=c.dtype)[..., :-1]
        return torch.matmul(F.dropout(p, p=0.0, training=False).to(v.dtype), v)


class SinkFirstBehindCast(nn.Module):
    """x-transformers' learned sink: the sink's column goes first
    (``cat((sink, sim), -1)``), the softmax in float32, a cast back to the
    input dtype, then ``attn[..., 1:]`` drops the sink; a key padding mask
    by masked_fill with -finfo.max."""

    def __init__(self, heads=4):
        super().__init__()
        self.head_attn_sink = nn.Parameter(torch.linspace(-0.5, 1.5, heads))

    def forward(self, q, k, v, keep):
        sim = torch.einsum("bhid,bhjd->bhij", q, k) * q.shape[-1] ** -0.5
        sim = sim.masked_fill(~keep[:, None, None, :], -torch.finfo(sim.dtype).max)
        sink = self.head_attn_sink[None, :, None, None].expand(sim.shape[0], -1, sim.shape[2], 1)
        sim = torch.cat((sink.to(sim.dtype), sim), dim=-1)
        attn = F.softmax(sim, dim=-1, dtype=torch.float32).type(q.dtype)
        return torch.einsum("bhij,bhjd->bhid", attn[..., 1:], v)


def scores_copied_for_nobody(q, k, v):
    """x-transformers keeps ``qk_similarities = sim.clone()`` (and casts of it)
    for intermediates a caller may ask for; unasked, nothing reads them, and
    they are no second use of the scores."""
    sim = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    kept = sim.clone()
    kept.detach().float()
    return sim.softmax(-1) @ v


class MViTv2RelPos(nn.Module):
    """timm's MViTv2: decomposed relative positions (height and width tables
    indexed by scaled distances, K pooled to a coarser grid than Q) written
    back into the scores by a slice assignment of a 6-D view of them,
    ``attn[:, :, sp:, sp:] = (attn[:, :, sp:, sp:].view(B, H, qh, qw, kh, kw)
    + rel_h + rel_w).view(...)``.  Without a cls token (sp = 0) the slice is
    all of the scores; with one (sp = 1) only part of them (declined).
    q (B, H, sp + qh*qw, D), k and v (B, H, sp + kh*kw, D)."""

    def __init__(self, q_size=(4, 3), k_size=(2, 3), dim=16, cls_token=False):
        super().__init__()
        self.q_size, self.k_size, self.sp = q_size, k_size, int(cls_token)
        self.rel_pos_h = nn.Parameter(torch.randn(2 * max(q_size[0], k_size[0]) - 1, dim) * 0.2)
        self.rel_pos_w = nn.Parameter(torch.randn(2 * max(q_size[1], k_size[1]) - 1, dim) * 0.2)

    @staticmethod
    def _dist(qn, kn):
        q_ratio, k_ratio = max(kn / qn, 1.0), max(qn / kn, 1.0)
        dist = torch.arange(qn).unsqueeze(-1) * q_ratio - torch.arange(kn).unsqueeze(0) * k_ratio
        dist += (kn - 1) * k_ratio
        return dist.long()

    def forward(self, q, k, v):
        attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        (q_h, q_w), (k_h, k_w), sp = self.q_size, self.k_size, self.sp
        rel_h = self.rel_pos_h[self._dist(q_h, k_h)]
        rel_w = self.rel_pos_w[self._dist(q_w, k_w)]
        B, n_head, _, dim = q.shape
        r_q = q[:, :, sp:].reshape(B, n_head, q_h, q_w, dim)
        rel_h = torch.einsum("byhwc,hkc->byhwk", r_q, rel_h)
        rel_w = torch.einsum("byhwc,wkc->byhwk", r_q, rel_w)
        attn[:, :, sp:, sp:] = (attn[:, :, sp:, sp:].view(B, -1, q_h, q_w, k_h, k_w)
                                + rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2)).view(B, -1, q_h * q_w, k_h * k_w)
        return attn.softmax(dim=-1) @ v


class MViTv2VideoRelPos(nn.Module):
    """torchvision's MViTv2 (video): decomposed relative positions along time,
    height and width, summed into one (B, H, Nq - 1, Nk - 1) term from an
    8-D broadcast (the time term by a matmul over the frames, viewed and
    permuted back) and added to all but the cls row and column in place,
    ``attn[:, :, 1:, 1:] += rel_pos``.  q (B, H, 1 + qt*qh*qw, D), k and v
    (B, H, 1 + kt*kh*kw, D)."""

    def __init__(self, q_size=(2, 4, 3), k_size=(2, 2, 3), dim=16):
        super().__init__()
        self.q_size, self.k_size = q_size, k_size
        self.rel_pos_t = nn.Parameter(torch.randn(2 * max(q_size[0], k_size[0]) - 1, dim) * 0.2)
        self.rel_pos_h = nn.Parameter(torch.randn(2 * max(q_size[1], k_size[1]) - 1, dim) * 0.2)
        self.rel_pos_w = nn.Parameter(torch.randn(2 * max(q_size[2], k_size[2]) - 1, dim) * 0.2)

    def forward(self, q, k, v):
        attn = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(2, 3))
        (q_t, q_h, q_w), (k_t, k_h, k_w) = self.q_size, self.k_size
        dist = MViTv2RelPos._dist
        Rt = self.rel_pos_t[dist(q_t, k_t)]
        Rh = self.rel_pos_h[dist(q_h, k_h)]
        Rw = self.rel_pos_w[dist(q_w, k_w)]
        B, n_head, _, dim = q.shape
        r_q = q[:, :, 1:].reshape(B, n_head, q_t, q_h, q_w, dim)
        rel_h_q = torch.einsum("bythwc,hkc->bythwk", r_q, Rh)
        rel_w_q = torch.einsum("bythwc,wkc->bythwk", r_q, Rw)
        r_q = r_q.permute(2, 0, 1, 3, 4, 5).reshape(q_t, B * n_head * q_h * q_w, dim)
        rel_q_t = torch.matmul(r_q, Rt.transpose(1, 2)).transpose(0, 1)
        rel_q_t = rel_q_t.view(B, n_head, q_h, q_w, q_t, k_t).permute(0, 1, 4, 2, 3, 5)
        rel_pos = (rel_h_q[:, :, :, :, :, None, :, None] + rel_w_q[:, :, :, :, :, None, None, :]
                   + rel_q_t[:, :, :, :, :, :, None, None]).reshape(B, n_head, q_t * q_h * q_w, k_t * k_h * k_w)
        attn[:, :, 1:, 1:] += rel_pos
        return attn.softmax(dim=-1) @ v


class MViTv2SlowFastRelPos(MViTv2VideoRelPos):
    """MViTv2 as SlowFast writes it for video: the spatial terms added to a
    (B, H, qt, qh, qw, kt, kh, kw) view of the scores without the cls row and
    column and written back, then the temporal term the same way (two slice
    assignments of 8-D views).  q (B, H, 1 + qt*qh*qw, D), k and v
    (B, H, 1 + kt*kh*kw, D); the tables as MViTv2VideoRelPos's."""

    def forward(self, q, k, v):
        attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        (q_t, q_h, q_w), (k_t, k_h, k_w) = self.q_size, self.k_size
        dist = MViTv2RelPos._dist
        B, n_head, _, dim = q.shape
        r_q = q[:, :, 1:].reshape(B, n_head, q_t, q_h, q_w, dim)
        rel_h = torch.einsum("bythwc,hkc->bythwk", r_q, self.rel_pos_h[dist(q_h, k_h)])
        rel_w = torch.einsum("bythwc,wkc->bythwk", r_q, self.rel_pos_w[dist(q_w, k_w)])
        attn[:, :, 1:, 1:] = (
            attn[:, :, 1:, 1:].view(B, -1, q_t, q_h, q_w, k_t, k_h, k_w)
            + rel_h[:, :, :, :, :, None, :, None] + rel_w[:, :, :, :, :, None, None, :]
        ).view(B, -1, q_t * q_h * q_w, k_t * k_h * k_w)
        r_q = r_q.permute(2, 0, 1, 3, 4, 5).reshape(q_t, B * n_head * q_h * q_w, dim)
        rel = torch.matmul(r_q, self.rel_pos_t[dist(q_t, k_t)].transpose(1, 2)).transpose(0, 1)
        rel = rel.view(B, n_head, q_h, q_w, q_t, k_t).permute(0, 1, 4, 2, 3, 5)
        attn[:, :, 1:, 1:] = (
            attn[:, :, 1:, 1:].view(B, -1, q_t, q_h, q_w, k_t, k_h, k_w) + rel[:, :, :, :, :, :, None, None]
        ).view(B, -1, q_t * q_h * q_w, k_t * k_h * k_w)
        return attn.softmax(dim=-1) @ v


def causal_by_boolean_index_assignment(q, k, v):
    """The causal mask written by boolean indexing, ``s[..., m] = -inf``
    (a masked_fill spelled as an index_put)."""
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    Lq, Lk = s.shape[-2:]
    s[..., torch.ones(Lq, Lk, dtype=torch.bool, device=s.device).triu(1)] = float("-inf")
    return s.softmax(-1) @ v


def slices_written_in_place(q, k, v, bias):
    """Slices of the scores written by in-place methods: a bias added to all
    but the first query and key (``s[:, :, 1:, 1:].add_(bias)``), the first
    keys masked (``s[..., :3].masked_fill_(m, -inf)``); and a bias whose
    slice is scaled in place before it joins (``b[:, :, :2].mul_(0.5)``)."""
    s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    s[:, :, 1:, 1:].add_(bias)
    lq = s.shape[-2]
    s[..., :3].masked_fill_(torch.ones(lq, 3, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    b = bias * 2
    b[:, :, :2].mul_(0.5)
    s[:, :, 1:, 1:] += b
    return s.softmax(-1) @ v


def masks_by_slice_assignment(q, k, v):
    """Masks written by slice assignment of numbers: a block of rows and the
    last keys, a head's first keys, a batch's last row, one head's key
    (``s[:, :, 2:5, -3:] = -inf``, ``s[:, 1:2, :, :2] = -1e4``, ...)."""
    s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    s[:, :, 2:5, -3:] = float("-inf")
    s[:, 1:2, :, :2] = -1e4
    s[1:, :, -1:, 4:6] = 3.0
    s[0, 2, :, 1] = -1e4          # ints index one position
    return s.softmax(-1) @ v


def padding_by_boolean_index_assignment(q, k, v, drop):
    """A runtime (B, H, Lq, Lk) boolean mask written into the scores by
    ``s[drop] = finfo.min`` (every row keeps a key)."""
    s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    s[drop] = torch.finfo(s.dtype).min
    return F.softmax(s, dim=-1) @ v


def sinks_with_empty_rows(q, k, v, sink):
    """Sinks with a -inf mask that leaves the first query rows no key: eager's
    softmax puts all their mass on the sink (output 0), ours too."""
    Lq, Lk = q.shape[-2], k.shape[-2]
    i, j = torch.arange(Lq)[:, None], torch.arange(Lk)[None, :]
    s = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill((j > i - 3) & (j > 0) | (i < 2), float("-inf"))
    c = torch.cat([s, sink.expand(q.shape[0], -1, Lq, 1)], dim=-1)
    return F.softmax(c, dim=-1)[:, :, :, :Lk] @ v


class GraniteSinkScale(nn.Module):
    """Granite SWA: the sink applied after the attention as
    ``sigmoid(logsumexp(scores) - sink)``; the logsumexp of the scores is the
    op's own lse (rewired), so the scores are not kept for it."""

    def __init__(self, heads=4):
        super().__init__()
        self.sinks = nn.Parameter(torch.linspace(-1.0, 1.5, heads))

    def forward(self, q, k, v, mask):
        w = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5 + mask
        lse = torch.logsumexp(w, dim=-1)
        sink_scale = (lse - self.sinks.view(1, -1, 1)).to(torch.float32).sigmoid()
        p = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        o = torch.matmul(F.dropout(p, p=0.0, training=False), v)
        return o * sink_scale.unsqueeze(-1).to(o.dtype)


def nan_to_num_probabilities(q, k, v, keep):
    """``torch.nan_to_num(softmax(s))`` after a -inf mask that leaves some
    query rows no key: those rows give 0 (and finite gradients), not nan."""
    s = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~keep, float("-inf"))
    return torch.nan_to_num(F.softmax(s, dim=-1), nan=0.0) @ v


def espnet_zeroed_probabilities(q, k, v, keep):
    """ESPnet/WeNet (and FastSpeech2-Conformer): ``mask = keep.eq(0)``, the
    scores filled with finfo.min there, then ``softmax(...).masked_fill(mask,
    0.0)``: rows that keep no key give 0, not eager's uniform average."""
    mask = keep.eq(0)
    s = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(mask, float(torch.finfo(s.dtype).min))
    p = torch.softmax(s, dim=-1).masked_fill(mask, 0.0)
    return torch.matmul(F.dropout(p, p=0.0, training=False), v)


def deberta_xsoftmax(q, k, v):
    """DeBERTa's XSoftmax written out: a mask built in the graph filled into
    the scores with finfo.min and, with 0, into the probabilities again (query
    row 3 keeps no key and gives 0)."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    rmask = torch.zeros(s.shape[-2], s.shape[-1], dtype=torch.bool)
    rmask[:, 5:] = True
    rmask[3] = True
    s = s.masked_fill(rmask, torch.finfo(s.dtype).min)
    return torch.softmax(s, -1).masked_fill(rmask, 0) @ v


def sewd_xsoftmax_in_place(q, k, v, keep):
    """XSoftmax as Hugging Face's SEW-D writes it: ``rmask = ~mask``, the
    scores filled with finfo.min there, then ``output.masked_fill_(rmask, 0)``
    on the softmax's own output, which P·V then reads (rows that keep no key
    give 0)."""
    rmask = ~keep.to(torch.bool)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = s.masked_fill(rmask, torch.finfo(s.dtype).min)
    p = torch.softmax(s, -1)
    p.masked_fill_(rmask, 0)
    return torch.matmul(F.dropout(p, p=0.0, training=False), v)


def sewd_heads_view_zeroed(q, k, v, keep):
    """SEW-D's / DeBERTa's layout around XSoftmax: (B*H, L, D) operands,
    ``bmm`` scores viewed as (B, H, Lq, Lk), the (B, 1, Lq, Lk) mask filled
    in and zeroed out of the probabilities, P viewed back for ``bmm``; q, k,
    v enter as (B, H, L, D).  ``in_place``: the zeroing is ``masked_fill_``
    on the softmax's output, as SEW-D writes it."""
    return _sewd_heads_view(q, k, v, keep, in_place=False)


def sewd_heads_view_zeroed_in_place(q, k, v, keep):
    return _sewd_heads_view(q, k, v, keep, in_place=True)


def _sewd_heads_view(q, k, v, keep, in_place):
    b, h, n, d = q.shape
    q, k, v = (t.reshape(b * h, t.shape[2], d) for t in (q, k, v))
    s = torch.bmm(q, k.transpose(-1, -2)) / math.sqrt(d)
    s = s.view(-1, h, s.size(-2), s.size(-1))
    rmask = ~(keep.to(torch.bool))
    p = torch.softmax(s.masked_fill(rmask, torch.tensor(torch.finfo(s.dtype).min)), -1)
    if in_place:
        p.masked_fill_(rmask, 0)
    else:
        p = p.masked_fill(rmask, 0)
    return torch.bmm(p.view(-1, p.size(-2), p.size(-1)), v).view(b, h, n, d)


def funnel_relative_shift_scaled_in_place(q, k, v, r, cls_mask):
    """Funnel Transformer's relative attention: a positional term from an
    einsum against a (2L, H, D) table, shifted by reshape-slice-reshape-slice
    (``_relative_shift_gather``), then ``positional_attn *= cls_mask`` in place
    on that view, added to the content scores; (B, L, H, D) operands."""
    b, n, h, d = q.shape
    content = torch.einsum("bind,bjnd->bnij", q, k)
    pos = torch.einsum("binh,tnh->bnit", q, r)                  # (B, H, L, 2L)
    max_rel = pos.shape[-1]
    pos = torch.reshape(pos, [b, h, max_rel, n])[:, :, n:, :]
    pos = torch.reshape(pos, [b, h, n, max_rel - n])[..., :k.shape[1]]
    pos *= cls_mask
    s = (content + pos) * d ** -0.5
    p = torch.softmax(s.float(), dim=-1, dtype=q.dtype)
    return torch.einsum("bnij,bjnd->bind", p, v)


def input_term_scaled_in_place(q, k, v, pos, keep):
    """A float term that is a view of an input, scaled in place before the
    scores read it (``p = pos.view(...)[..., :Lk]; p *= keep``): the write is the
    user's (it changes ``pos``), and the op reads ``pos`` after it."""
    p = pos.view(q.shape[0], q.shape[1], q.shape[2], k.shape[2])[..., :k.shape[2]]
    p *= keep
    return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + p, dim=-1) @ v


def scores_viewed_then_masked_in_place(q, k, v):
    """A view of the scores taken before an in-place mask on them, read after
    it: the view sees the mask (``t = s.view(s.shape); s.masked_fill_(m,
    -inf); softmax(t)``)."""
    s = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    t = s.view(s.shape)
    s.masked_fill_(torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool, device=s.device).triu(1),
                   float("-inf"))
    return torch.softmax(t.float(), -1).type_as(q) @ v


def probabilities_copy_rows_zeroed_in_place(q, k, v):
    """A copy of the probabilities with every third query row zeroed in place
    (``p = softmax(s).clone(); p.mul_(rows)``): a per-row factor once the
    write is out of place."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    p = torch.softmax(s, dim=-1).clone()
    p.mul_((torch.arange(p.shape[-2], device=p.device) % 3 != 0).to(p.dtype)[:, None])
    return p @ v


def probabilities_scaled_in_place_twice(q, k, v, keep, head_w):
    """Two in-place writes to the probabilities: ``p *= head_w`` (a per-head
    factor, as a head mask) and ``p.masked_fill_(~keep, 0)``."""
    s = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).masked_fill(~keep, float("-inf"))
    p = s.softmax(-1)
    p *= head_w
    p.masked_fill_(~keep, 0.0)
    return p @ v


def where_zeroed_probabilities(q, k, v, keep):
    """``torch.where(keep, s, -inf)`` and ``torch.where(keep, softmax, 0)``:
    rows without a key give 0 instead of nan."""
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = torch.where(keep, s, float("-inf"))
    return torch.where(keep, s.softmax(-1), 0.0) @ v


class SamDecomposedRelPos(nn.Module):
    """SAM's (ViTDet's) image-encoder attention with decomposed relative
    positions: the (B*H, N, N) scores are viewed as (B*H, qh, qw, kh, kw), a
    query-dependent height term and width term are added along the split key
    axis, and the scores are viewed back; q, k, v enter as (B, H, qh*qw, D)."""

    def __init__(self, size=(3, 5), dim=16):
        super().__init__()
        self.size = size
        self.rel_pos_h = nn.Parameter(0.5 * torch.randn(2 * size[0] - 1, dim))
        self.rel_pos_w = nn.Parameter(0.5 * torch.randn(2 * size[1] - 1, dim))

    @staticmethod
    def get_rel_pos(q_size, k_size, rel_pos):
        q_coords = torch.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
        k_coords = torch.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
        relative_coords = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
        return rel_pos[relative_coords.long()]

    def forward(self, q, k, v):
        b, heads, n, c = q.shape
        h, w = self.size
        query = q.reshape(b * heads, n, c)
        attn = (query * c ** -0.5) @ k.reshape(b * heads, n, c).transpose(-2, -1)
        rel_h = torch.einsum("bhwc,hkc->bhwk", query.reshape(b * heads, h, w, c),
                             self.get_rel_pos(h, h, self.rel_pos_h))
        rel_w = torch.einsum("bhwc,wkc->bhwk", query.reshape(b * heads, h, w, c),
                             self.get_rel_pos(w, w, self.rel_pos_w))
        attn = attn.reshape(b * heads, h, w, h, w)
        attn = attn + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]
        attn = attn.reshape(b * heads, h * w, h * w)
        attn = torch.softmax(attn, dtype=torch.float32, dim=-1).to(q.dtype)
        return (attn @ v.reshape(b * heads, n, c)).reshape(b, heads, n, c)


def output_added_in_place(q, k, v, g):
    """The attention output written in place (``o += g``, a residual): the op
    keeps its output for the backward, so the rewrite hands the user a copy."""
    o = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1) @ v
    o += g
    return o


def output_view_scaled_in_place(q, k, v, g):
    """The attention output scaled in place through a view of it."""
    o = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1) @ v
    o.transpose(1, 2).mul_(2.0)
    return o * g


def _plain_attention(q, k, v):
    return (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1) @ v


def checkpointed_attention(q, k, v):
    """The attention inside ``torch.utils.checkpoint`` (a subgraph of a
    higher-order op in dynamo's graph): recomputed in the backward."""
    return torch.utils.checkpoint.checkpoint(_plain_attention, q, k, v, use_reentrant=False)


@torch.compiler.nested_compile_region
def _region_attention(q, k, v):
    return _plain_attention(q, k, v)


def nested_region_attention(q, k, v):
    """``torch.compiler.nested_compile_region``: one subgraph for both calls."""
    return _region_attention(q, k, v) + 0.5 * _region_attention(k, q, v)


def diff_transformer_scores(q, k, v):
    """The Differential Transformer's score chain (one of its two maps):
    ``nan_to_num`` of the scores, a causal mask made from zeros filled with
    -inf and ``type_as(scores)``, added in place, the softmax in float32."""
    n = q.shape[-2]
    w = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))
    mask = torch.triu(torch.zeros([n, n]).float().fill_(float("-inf")).type_as(w), 1)
    w = torch.nan_to_num(w)
    w += mask
    w = F.softmax(w, dim=-1, dtype=torch.float32).type_as(w)
    return torch.matmul(w, v)


def inkling_float_cast_sinks(q, k, v, sinks):
    """Inkling2's sinks: a per-token sink logit (B, H, L, 1) concatenated to
    the scores, the concatenation cast to float32 before the softmax, the
    sink's column dropped and P cast back."""
    w = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
    w = w + torch.triu(torch.full((w.shape[-2], w.shape[-1]), float("-inf"), dtype=w.dtype), 1)
    combined = torch.cat([w, sinks], dim=-1).float()
    p = F.softmax(combined, dim=-1)[..., :-1].to(q.dtype)
    return torch.matmul(p, v)


def cpmant_scalar_tensor_fills(q, k, v, keep):
    """CPM-Ant: the fills are 0-d tensors (``torch.scalar_tensor(-inf)`` into
    the scores, ``torch.scalar_tensor(0)`` into the probabilities) under the
    same ``mask == torch.tensor(False)``."""
    score = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    drop = keep == torch.tensor(False)
    score = torch.masked_fill(score, drop, torch.scalar_tensor(float("-inf"), dtype=score.dtype))
    score = torch.softmax(score, -1)
    score = torch.masked_fill(score, drop, torch.scalar_tensor(0, dtype=score.dtype))
    return torch.matmul(score, v)


def zeroed_probabilities_inf_with_bias(q, k, v, keep, bias):
    """A -inf mask zeroed again after the softmax, beside an additive float
    bias (CPM-Ant's learned position bias; here also finfo.min over whole
    rows): with -inf the masked keys add nothing to eager's denominator, so
    the site is the softmax over the kept keys whatever the bias holds."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
    s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s, dim=-1).masked_fill(~keep, 0.0) @ v


def conformer_relpos_zeroed_probabilities(q, k, v, keep, bias):
    """ESPnet/WeNet's relative-position attention (FastSpeech2-Conformer):
    the content scores plus a float position term, filled with finfo.min
    where the mask drops, and the probabilities zeroed there again.  The
    float term may hold finfo.min itself (here over a whole query row), so the
    masked keys stay in the denominator: the spec's ``zero_masked``."""
    mask = keep.eq(0)
    s = (torch.matmul(q, k.transpose(-2, -1)) + bias) / math.sqrt(q.shape[-1])
    s = s.masked_fill(mask, float(torch.finfo(s.dtype).min))
    p = torch.softmax(s, dim=-1).masked_fill(mask, 0.0)
    return torch.matmul(F.dropout(p, p=0.0, training=False), v)


def conformer_relpos_zeroed_where(q, k, v, keep, bias):
    """The same written with ``torch.where`` and a -1e9 fill, the bias added
    after the scaling."""
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + bias
    s = torch.where(keep, s, -1e9)
    return torch.where(keep, s.softmax(-1), 0.0) @ v


def differential_two_maps(q, k, v):
    """Two maps per head pair of one softmax over all heads, subtracted with
    a number before P·V ([Note: maps combined before P·V])."""
    b, h, n, _ = q.shape
    w = F.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1, dtype=torch.float32).type_as(q)
    w = w.view(b, h // 2, 2, n, n)
    w = w[:, :, 0] - 0.3 * w[:, :, 1]
    return torch.matmul(w, v[:, : h // 2])


class DifferentialAttention(nn.Module):
    """The Differential Transformer's attention as its reference code writes
    it: q and k with 2H heads, v with H heads of twice the head dim, a causal
    -inf mask added after ``nan_to_num``, the softmax in float32, then each
    pair of maps subtracted with a learned lambda (a 0-d tensor) before P·V."""

    def __init__(self, dim=8, lambda_init=0.8):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
            setattr(self, name, nn.Parameter(0.1 * torch.randn(dim, generator=g)))
        self.lambda_init = lambda_init

    def forward(self, q, k, v):
        bsz, h2, n, d = q.shape
        q = q * d ** -0.5
        w = torch.matmul(q, k.transpose(-1, -2))
        mask = torch.triu(torch.zeros([n, n], device=q.device).float().fill_(float("-inf")).type_as(w), 1)
        w = torch.nan_to_num(w)
        w += mask
        w = F.softmax(w, dim=-1, dtype=torch.float32).type_as(w)
        lambda_1 = torch.exp(torch.sum(self.lambda_q1 * self.lambda_k1, dim=-1).float()).type_as(q)
        lambda_2 = torch.exp(torch.sum(self.lambda_q2 * self.lambda_k2, dim=-1).float()).type_as(q)
        lambda_full = lambda_1 - lambda_2 + self.lambda_init
        w = w.view(bsz, h2 // 2, 2, n, n)
        w = w[:, :, 0] - lambda_full * w[:, :, 1]
        return torch.matmul(w, v)


class ConViTGatedPositional(nn.Module):
    """ConViT's gated positional self-attention (timm's ``GPSA``): the
    content softmax and a softmax of positional scores (a learned projection
    of fixed relative offsets, (B, H, N, N)) mixed per head by a sigmoid
    gate, the mixture divided in place by its own row sums, then P·V."""

    def __init__(self, heads=2, n=25):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.heads = heads
        self.pos_proj = nn.Linear(3, heads)
        with torch.no_grad():
            self.pos_proj.weight.copy_(torch.randn(heads, 3, generator=g))
            self.pos_proj.bias.copy_(torch.randn(heads, generator=g))
        self.gating_param = nn.Parameter(torch.randn(heads, generator=g))
        side = int(n ** 0.5)
        ind = torch.arange(side).view(1, -1) - torch.arange(side).view(-1, 1)
        indx = ind.repeat(side, side)
        indy = ind.repeat_interleave(side, dim=0).repeat_interleave(side, dim=1)
        self.register_buffer("rel_indices", torch.stack([indx, indy, indx ** 2 + indy ** 2], -1)[None].float(),
                             persistent=False)
        self.attn_drop = nn.Dropout(0.0)

    def forward(self, q, k, v):
        B = q.shape[0]
        pos_score = self.pos_proj(self.rel_indices.expand(B, -1, -1, -1)).permute(0, 3, 1, 2)
        patch_score = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        patch_score = patch_score.softmax(dim=-1)
        pos_score = pos_score.softmax(dim=-1)
        gating = self.gating_param.view(1, -1, 1, 1)
        attn = (1. - torch.sigmoid(gating)) * patch_score + torch.sigmoid(gating) * pos_score
        attn /= attn.sum(dim=-1).unsqueeze(-1)
        attn = self.attn_drop(attn)
        return attn @ v


def differential_two_softmaxes(q, k, v):
    """The Differential Transformer as its paper's pseudo-code writes it: q
    and k split in two along the head dim, two softmaxes, ``(softmax(a1) -
    lam * softmax(a2)) @ v`` on (B*H, L, D) tensors ([Note: maps combined
    before P·V]: two sites)."""
    b, h, n, d = q.shape
    qf, kf, vf = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)
    q1, q2 = qf[..., : d // 2], qf[..., d // 2:]
    k1, k2 = kf[..., : d // 2], kf[..., d // 2:]
    s = (d // 2) ** -0.5
    a1 = torch.softmax(q1 @ k1.transpose(-1, -2) * s, dim=-1)
    a2 = torch.softmax(q2 @ k2.transpose(-1, -2) * s, dim=-1)
    lam = torch.full((1, 1, 1), 0.6, dtype=q.dtype)
    return ((a1 - lam * a2) @ vf).unflatten(0, (b, h))


def _rel_logits_1d(q, rel_k, permute_mask):
    """timm's ``rel_logits_1d``: relative logits along one axis, shifted to
    absolute keys by padding and reshaping, tiled over the other axis."""
    b, h, w, _ = q.shape
    x = (q @ rel_k.transpose(-1, -2)).reshape(-1, w, 2 * w - 1)
    x_pad = F.pad(F.pad(x, [0, 1]).flatten(1), [0, w - 1]).reshape(-1, w + 1, 2 * w - 1)
    x = x_pad[:, :w, w - 1:]
    return x.reshape(b, h, 1, w, w).expand(-1, -1, h, -1, -1).permute(permute_mask)


class BoTNetRelPos(nn.Module):
    """timm's BottleneckAttn (BoTNet, HaloNet's sibling): relative position
    logits from ``rel_logits_1d`` along the width and, on the transposed grid,
    the height; the height term reads the query split as (q % W, q // W)
    (``layout.MERGE_NEXT_SWAPPED``).  q, k, v (B*H, h*w, D)."""

    def __init__(self, h=3, w=4, dim=16):
        super().__init__()
        self.h, self.w = h, w
        g = torch.Generator().manual_seed(4)
        self.height_rel = nn.Parameter(0.2 * torch.randn(2 * h - 1, dim, generator=g))
        self.width_rel = nn.Parameter(0.2 * torch.randn(2 * w - 1, dim, generator=g))

    def forward(self, q, k, v):
        b, hw, _ = q.shape
        grid = q.reshape(b, self.h, self.w, -1)
        rel_w = _rel_logits_1d(grid, self.width_rel, permute_mask=(0, 1, 3, 2, 4))
        rel_h = _rel_logits_1d(grid.transpose(1, 2), self.height_rel, permute_mask=(0, 3, 1, 4, 2))
        attn = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5 + (rel_h + rel_w).reshape(b, hw, hw)
        return attn.softmax(dim=-1) @ v


# ---- whole rows of the probabilities set to 0 ([Note: rows of P set to 0]) ------------

class FlamingoMaskedCrossAttention(nn.Module):
    """Flamingo's gated cross-attention core (flamingo-pytorch / OpenFlamingo),
    einops written out: text tokens attend only to the media (image) tokens of
    the image that precedes them, through a time mask built from a cumsum of
    the media locations (masked with -finfo.max); the row max subtracted
    (detached); then the rows of text that no image precedes are zeroed with
    ``attn.masked_fill(text_without_media, 0.)``: one boolean per query row.
    ``x`` (B, Lq, H*D) text, ``media`` (B, T, M, H*D) image tokens,
    ``media_locations`` (B, Lq) bool."""

    def __init__(self, heads=4, dim_head=16):
        super().__init__()
        self.heads, self.scale = heads, dim_head ** -0.5
        inner = heads * dim_head
        self.to_q = nn.Linear(inner, inner, bias=False)
        self.to_kv = nn.Linear(inner, 2 * inner, bias=False)

    def forward(self, x, media, media_locations):
        b, t, m = media.shape[:3]
        h = self.heads
        q = self.to_q(x)
        k, v = self.to_kv(media.reshape(b, t * m, -1)).chunk(2, dim=-1)
        q, k, v = (z.reshape(b, z.shape[1], h, -1).transpose(1, 2) for z in (q, k, v))
        q = q * self.scale
        sim = torch.einsum("...id,...jd->...ij", q, k)
        text_time = media_locations.cumsum(dim=-1)
        media_time = torch.arange(t, device=x.device) + 1
        text_to_media = torch.eq(text_time[:, None, :, None], media_time.repeat_interleave(m)[None, None, None, :])
        sim = sim.masked_fill(~text_to_media, -torch.finfo(sim.dtype).max)
        sim = sim - sim.amax(dim=-1, keepdim=True).detach()
        attn = sim.softmax(dim=-1)
        text_without_media = (text_time == 0)[:, None, :, None]
        attn = attn.masked_fill(text_without_media, 0.0)
        out = torch.einsum("...ij,...jd->...id", attn, v)
        return out.transpose(1, 2).reshape(b, -1, h * v.shape[-1])


def query_padding_rows_multiplied(q, k, v, keep):
    """Padded keys masked with -inf, then the padded query rows zeroed by a
    product with the boolean padding mask (``p * keep[:, None, :, None]``, set
    and graph-transformer code): the mask is one value per row, so it scales
    rows of P·V (a bool factor: nan rows stay nan, as in eager)."""
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
    p = s.softmax(-1) * keep[:, None, :, None]
    return p @ v


def rows_kept_by_where(q, k, v, keep_rows):
    """``torch.where(keep_rows, P, 0)`` with one boolean per query row, under
    a causal mask filled with finfo.min: the dropped rows of P·V are 0."""
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    causal = torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool, device=s.device).tril()
    s = s.masked_fill(~causal, torch.finfo(s.dtype).min)
    return torch.where(keep_rows, s.softmax(-1), 0.0) @ v


def rows_zeroed_where_zeros_like(q, k, v, keep_rows):
    """``torch.where(keep_rows, attn, torch.zeros_like(attn))``: P read a second
    time only for its shape; the zeros become a constant and P is never made."""
    attn = ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1)
    return torch.where(keep_rows, attn, torch.zeros_like(attn)) @ v


def mistral_reference_log_mask(q, k, v, window: int = 4):
    """Mistral's reference model: the sliding-window causal mask as the log of
    a 0/1 matrix (log 0 = -inf), added to the scores; softmax in float32."""
    L = q.shape[-2]
    mask = torch.tril(torch.full((L, L), 1.0, device=q.device), diagonal=0)
    mask = torch.triu(mask, diagonal=-window)
    mask = torch.log(mask)
    s = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
    s = s + mask[None, None]
    return torch.matmul(F.softmax(s.float(), dim=-1).type_as(q), v)


def grok_grouped_einsum_batch_mask(q, k, v, keep):
    """Grok-1 style: q (B, T, Hkv, G, D) against k, v (B, T, Hkv, D) by a
    grouped einsum into 5-D scores, 30·tanh(s / 30), a per-batch boolean mask
    (B, 1, 1, T, T) by where, einsum back."""
    s = torch.einsum("...thHd,...Thd->...hHtT", q, k) * q.shape[-1] ** -0.5
    s = 30.0 * torch.tanh(s / 30.0)
    s = torch.where(keep, s, -1e30)
    return torch.einsum("...hHtT,...Thd->...thHd", s.softmax(-1), v)


def openfold_5d_batch_mask(q, k, v, keep):
    """OpenFold-style row attention: (B, S, H, T, D) operands (S: MSA rows),
    q scaled first, a per-batch boolean mask (B, 1, 1, T, T)."""
    q = q / math.sqrt(q.shape[-1])
    s = torch.matmul(q, k.transpose(-1, -2))
    s = s.masked_fill(~keep, -1e9)
    return torch.matmul(torch.softmax(s, dim=-1), v)


def openfold_msa_row_pair_bias(q, k, v, msa_mask, pair_bias):
    """OpenFold's MSA row attention with pair bias: (B, S, H, T, D) operands
    (S: MSA rows), q scaled first; the row mask as a bias
    ``inf * (mask - 1)`` of shape (B, S, 1, 1, T) and the pair
    representation's bias (B, 1, H, T, T), with its gradient, added in
    place.  Flattened, the heads are (S, H): the mask is read at h // H,
    the pair bias at h % H."""
    q = q / math.sqrt(q.shape[-1])
    a = torch.matmul(q, k.transpose(-1, -2))
    mask_bias = (1e9 * (msa_mask - 1))[..., :, None, None, :]
    for bias in (mask_bias, pair_bias):
        a += bias
    a = torch.softmax(a, dim=-1)
    return torch.matmul(a, v)


def longt5_local_blocks(q, k, v, position_bias, local_keep):
    """LongT5's local attention as its code writes it: (B, NB, M, H, D) query
    blocks against (B, NB, 3M, H, D) key blocks by einsum, unscaled; a
    relative position bias (1, 1, H, M, 3M) with its gradient plus the
    blocks' key mask (B, NB, 1, M, 3M) as 0 / -1e10, added in place;
    softmax in float32."""
    s = torch.einsum("...qhd,...khd->...hqk", q, k)
    bias = position_bias + torch.where(local_keep, 0.0, -1e10)
    s += bias
    p = F.softmax(s.float(), dim=-1).type_as(s)
    return torch.einsum("...hqk,...khd->...qhd", p, v)


def meta_llama_repeat_kv_seq_major(q, k, v):
    """Meta's reference Llama: q, k, v (B, L, H, D); K/V heads repeated on
    that layout (``x[:, :, :, None, :].expand(...).reshape(...)``), then
    transposed to (B, H, L, D); scores / sqrt(D), softmax in float32."""
    n_rep = q.shape[2] // k.shape[2]

    def repeat_kv(x):
        b, s, hkv, d = x.shape
        return x[:, :, :, None, :].expand(b, s, hkv, n_rep, d).reshape(b, s, hkv * n_rep, d)
    xq, keys, values = q.transpose(1, 2), repeat_kv(k).transpose(1, 2), repeat_kv(v).transpose(1, 2)
    scores = torch.matmul(xq, keys.transpose(2, 3)) / math.sqrt(q.shape[-1])
    scores = F.softmax(scores.float(), dim=-1).type_as(xq)
    return torch.matmul(scores, values).transpose(1, 2)


def mistral_repeat_interleave_seq_major(q, k, v):
    """Mistral's reference: K/V (B, L, Hkv, D) widened by repeat_interleave on
    dim 2, then transposed."""
    n_rep = q.shape[2] // k.shape[2]
    k = torch.repeat_interleave(k, repeats=n_rep, dim=2)
    v = torch.repeat_interleave(v, repeats=n_rep, dim=2)
    xq, keys, values = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    scores = torch.matmul(xq, keys.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.matmul(F.softmax(scores.float(), dim=-1).type_as(xq), values).transpose(1, 2)


# ---- scores in another layout ([Note: scores in another layout]) ---------------------------

def _transfo_xl_rel_shift(x):
    """Transformer-XL's relative shift of a [query, key, batch, head] term:
    a zero column on the left, viewed as (key + 1, query), first row dropped."""
    zero_pad = torch.zeros((x.size(0), 1) + x.size()[2:], device=x.device, dtype=x.dtype)
    x_padded = torch.cat([zero_pad, x], dim=1)
    x_padded = x_padded.view((x.size(1) + 1, x.size(0)) + x.size()[2:])
    return x_padded[1:].view_as(x)


class TransformerXLRelAttention(nn.Module):
    """Transformer-XL's ``RelPartialLearnableMultiHeadAttn`` core (the Hugging
    Face port): inputs (L, B, H, D), positional keys (L, H, D); scores
    [query, key, batch, head] = content + shifted position terms, scaled in
    place, a causal mask (Lq, Lk, 1) filled in float32 (given, or built as
    the model builds it), the softmax over dim 1
    (the keys), dropout, P·V by einsum."""

    def __init__(self, n_head=4, d_head=16, dropatt=0.0):
        super().__init__()
        self.r_w_bias = nn.Parameter(0.5 * torch.randn(n_head, d_head))
        self.r_r_bias = nn.Parameter(0.5 * torch.randn(n_head, d_head))
        self.scale = d_head ** -0.5
        self.dropatt = nn.Dropout(dropatt)

    def forward(self, w_head_q, w_head_k, w_head_v, r_head_k, attn_mask=None):
        if attn_mask is None:       # the decoder's own mask, over the memory too
            qlen, klen = w_head_q.size(0), w_head_k.size(0)
            attn_mask = torch.triu(w_head_q.new_ones(qlen, klen), diagonal=1 + klen - qlen).bool()[:, :, None]
        ac = torch.einsum("ibnd,jbnd->ijbn", (w_head_q + self.r_w_bias, w_head_k))
        bd = torch.einsum("ibnd,jnd->ijbn", (w_head_q + self.r_r_bias, r_head_k))
        attn_score = ac + _transfo_xl_rel_shift(bd)
        attn_score.mul_(self.scale)
        attn_score = attn_score.float().masked_fill(attn_mask[:, :, :, None], -float("inf")).type_as(attn_score)
        attn_prob = self.dropatt(F.softmax(attn_score, dim=1))
        return torch.einsum("ijbn,jbnd->ibnd", (attn_prob, w_head_v))


def scores_query_key_batch_head(q, k, v):
    """[query, key, batch, head] scores of (L, B, H, D) inputs, softmax over dim 1."""
    s = torch.einsum("ibnd,jbnd->ijbn", q, k) * q.shape[-1] ** -0.5
    return torch.einsum("ijbn,jbnd->ibnd", F.softmax(s, dim=1), v)


def scores_heads_between(q, k, v):
    """[batch, query, head, key] scores of (B, L, H, D) inputs: the keys last,
    the heads between them and the queries."""
    s = torch.einsum("bqhd,bkhd->bqhk", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bqhk,bkhd->bqhd", s.softmax(-1), v)


def scores_keys_second_last(q, k, v):
    """``k @ qᵀ``: (B, H, Lk, Lq) scores, the softmax over dim -2, P
    transposed back for P·V."""
    s = k @ q.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return s.softmax(dim=-2).transpose(-1, -2) @ v


def scores_keys_second_last_permuted(q, k, v):
    """(B, H, Lk, Lq) scores, the softmax over dim 2, P brought back by
    ``permute(0, 1, 3, 2)`` (varargs) for P·V."""
    s = torch.einsum("bhkd,bhqd->bhkq", k, q) * q.shape[-1] ** -0.5
    return torch.matmul(F.softmax(s, dim=2).permute(0, 1, 3, 2), v)


def scores_keys_second_last_vT(q, k, v, keep):
    """(B, H, Lk, Lq) scores with a key padding mask (B, 1, Lk, 1), the
    output as ``(Vᵀ · P)ᵀ``."""
    s = torch.matmul(k, q.transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(~keep[:, None, :, None], torch.finfo(s.dtype).min)
    return (v.transpose(-1, -2) @ torch.softmax(s, -2)).transpose(-1, -2)


# ---- masks on the scores' values ------------------------------------------------------------

def score_threshold_mask(q, k, v):
    """Scores below a threshold dropped (-inf): a mask on the scores' values,
    no position masked as such."""
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    return torch.softmax(s.masked_fill(s < -0.5, float("-inf")), dim=-1) @ v


def score_piecewise_mod(q, k, v):
    """A score modification with a condition on the score: ELU of the scores."""
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    return torch.softmax(torch.where(s > 0, s, s.exp() - 1), dim=-1) @ v


class XLNetRelAttnCore(nn.Module):
    """XLNet's original relative attention core (ported from the reference
    code): [query, key, batch, head] scores = content + rel-shifted position
    term + segment term (an einsum of a one-hot segment matrix (Lq, Lk, B, 2)
    with q, shaped like the scores), scaled, ``- 1e30 * mask`` (a float mask
    (Lq, Lk, B, 1)), the softmax over dim 1.  Inputs: q (Lq, B, H, D), k and
    v (Lk, B, H, D), position keys (Lq + Lk, B, H, D)."""

    def __init__(self, n_head=4, d_head=16):
        super().__init__()
        self.r_w_bias, self.r_r_bias, self.r_s_bias = (nn.Parameter(0.5 * torch.randn(n_head, d_head))
                                                       for _ in range(3))
        self.seg_embed = nn.Parameter(0.5 * torch.randn(2, n_head, d_head))
        self.scale = d_head ** -0.5

    @staticmethod
    def rel_shift(x, klen):
        x_size = x.shape
        x = x.reshape(x_size[1], x_size[0], x_size[2], x_size[3])[1:]
        return x.reshape(x_size[0], x_size[1] - 1, x_size[2], x_size[3])[:, :klen]

    def forward(self, q_head, k_head_h, v_head_h, k_head_r, seg_mat, attn_mask):
        ac = torch.einsum("ibnd,jbnd->ijbn", q_head + self.r_w_bias, k_head_h)
        bd = torch.einsum("ibnd,jbnd->ijbn", q_head + self.r_r_bias, k_head_r)
        bd = self.rel_shift(bd, klen=ac.shape[1])
        ef = torch.einsum("ibnd,snd->ibns", q_head + self.r_s_bias, self.seg_embed)
        ef = torch.einsum("ijbs,ibns->ijbn", seg_mat, ef)
        attn_score = (ac + bd + ef) * self.scale
        attn_score = attn_score - 1e30 * attn_mask
        attn_prob = F.softmax(attn_score, dim=1)
        return torch.einsum("ijbn,jbnd->ibnd", attn_prob, v_head_h)


class CausalScaledByAttribute(nn.Module):
    """Causal attention scaled by a float attribute (Hugging Face's
    ``self.scaling``): under dynamic=True dynamo passes it as a 0-d CPU tensor
    read with ``.item()`` (a captured scalar, beside CUDA operands on the GPU),
    with the head dim symbolic; softmax in float32, cast back."""

    def __init__(self, head_dim=16):
        super().__init__()
        self.scaling = head_dim ** -0.5

    def forward(self, q, k, v):
        s = (q @ k.transpose(-2, -1)) * self.scaling
        L = q.shape[-2]
        s = s.masked_fill(~torch.ones(L, L, dtype=torch.bool, device=q.device).tril(), float("-inf"))
        return torch.softmax(s.float(), dim=-1).to(q.dtype) @ v


def per_query_temperature_divisor(q, k, v, tau):
    """Scores divided by a learned per-query, per-head temperature (B, H, Lq)
    with its gradient: a factor of the score that is 1 / tau, infinite where a
    tile past the queries' end reads tau as 0."""
    s = (q @ k.transpose(-1, -2)) / tau[..., None]
    return s.softmax(-1) @ v


def per_key_weight_divisor(q, k, v, w):
    """Scores divided by a positive per-key weight (B, 1, 1, Lk) with its
    gradient (1 / w infinite past the keys' end)."""
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5 / w
    return s.softmax(-1) @ v


def tome_proportional_attention(q, k, v, size):
    """timm's Token Merging (ToMe): the log of each key's merged token count
    (B, Lk, 1) is added to the scores, so a merged token weighs as many."""
    attn = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    attn = attn + size.log()[:, None, None, :, 0]
    return attn.softmax(dim=-1) @ v


class ForgettingAttention(nn.Module):
    """Forgetting Transformer (FoX): scores plus the cumulative log forget
    gates, per query minus per key (each a (B, H, L) vector with its
    gradient), causal."""

    def __init__(self, dim=16):
        super().__init__()
        self.fgate = nn.Linear(dim, 1)

    def forward(self, q, k, v, x):
        c = torch.cumsum(F.logsigmoid(self.fgate(x)).squeeze(-1), dim=-1)
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        s = s + c[..., :, None] - c[..., None, :]
        L = q.shape[-2]
        s = s.masked_fill(~torch.ones(L, L, dtype=torch.bool, device=q.device).tril(), float("-inf"))
        return torch.softmax(s, -1) @ v


class KerpleLogAttention(nn.Module):
    """KERPLE's logarithmic relative bias, -r1 * log(1 + r2 * |i - j|) with
    learned per-head r1, r2 (their gradients through the log), causal by
    finfo.max."""

    def __init__(self, heads=4):
        super().__init__()
        self.r1 = nn.Parameter(torch.rand(heads, 1, 1) + 0.5)
        self.r2 = nn.Parameter(torch.rand(heads, 1, 1) + 0.5)

    def forward(self, q, k, v):
        i = torch.arange(q.shape[-2], device=q.device)
        bias = -self.r1 * torch.log1p(self.r2 * (i[:, None] - i[None, :]).abs().to(q.dtype))
        s = torch.einsum("bhid,bhjd->bhij", q, k) * q.shape[-1] ** -0.5 + bias
        s = s.masked_fill(i[None, :] > i[:, None], -torch.finfo(s.dtype).max)
        return torch.einsum("bhij,bhjd->bhid", s.softmax(-1), v)


def packed_document_mask(q, k, v, doc):
    """Packed sequences: a query keeps the earlier keys of its own document
    (``doc`` (B, L) ids), causal within it."""
    s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    same = doc[:, None, :, None] == doc[:, None, None, :]
    L = q.shape[-2]
    s = s.masked_fill(~(same & torch.tril(torch.ones(L, L, dtype=torch.bool, device=q.device))), float("-inf"))
    return F.softmax(s, dim=-1) @ v


# ---- softmax plus one: a sink logit of 0 (or learned) written out ----------


def softmax_one_clamped(q, k, v, keep):
    """"Softmax plus one" (quiet attention) as research code writes it: the
    shift is the row max clamped at 0, the denominator gains exp(-m), a sink
    logit of 0 written out; rows the mask leaves no key give 0."""
    s = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(~keep, float("-inf"))
    m = s.max(dim=-1, keepdim=True).values.clamp(min=0)
    e = torch.exp(s - m)
    return (e / (torch.exp(-m) + e.sum(dim=-1, keepdim=True))) @ v


def softmax_one_unshifted(q, k, v):
    """Softmax plus one without a shift: ``e / (1 + e.sum(-1))``, causal."""
    s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    L = q.shape[-2]
    s = s.masked_fill(~torch.ones(L, L, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    e = s.exp()
    return torch.matmul(e / (1 + e.sum(-1, keepdim=True)), v)


def zero_sink_column(q, k, v):
    """A sink of logit 0 as a column of zeros concatenated to the scores
    (``zeros_like(s[..., :1])``), its probability dropped after the softmax."""
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    s = torch.cat([s, torch.zeros_like(s[..., :1])], dim=-1)
    return s.softmax(-1)[..., :-1] @ v


def zero_sink_padded(q, k, v):
    """A sink of logit 0 as ``F.pad(scores, (1, 0))`` (the column first),
    causal, softmax in float32; ``p[..., 1:]`` drops it."""
    s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    L = q.shape[-2]
    s = s + torch.full((L, L), float("-inf"), device=q.device, dtype=s.dtype).triu(1)
    p = F.pad(s, (1, 0)).float().softmax(-1)[..., 1:].to(q.dtype)
    return p @ v


class LearnedSinkWrittenOut(nn.Module):
    """A learned per-head sink logit (H, 1, 1) in a written-out softmax:
    ``e / (e.sum(-1) + exp(sink - m))`` with ``m`` the detached row max."""

    def __init__(self, heads=4):
        super().__init__()
        self.sink = nn.Parameter(torch.linspace(-1.0, 1.5, heads).reshape(heads, 1, 1))

    def forward(self, q, k, v):
        s = torch.einsum("bhqd,bhkd->bhqk", q, k) * q.shape[-1] ** -0.5
        m = s.amax(dim=-1, keepdim=True).detach()
        e = torch.exp(s - m)
        p = e / (e.sum(dim=-1, keepdim=True) + torch.exp(self.sink - m))
        return torch.einsum("bhqk,bhkd->bhqd", p, v)


# ---- scores summed from two products ([Note: scores summed from two products]) ----

def deepseek_mla_absorbed(q_nope, q_pe, kv, pe, mask):
    """DeepSeek-V3's reference inference code, multi-head latent attention on
    its "absorb" path: the queries (B, S, H, C) and (B, S, H, R) scored against
    the compressed cache (B, T, C) and the rotary keys (B, T, R) apart, the
    two products summed in [batch, query, head, key] layout, the causal mask
    added in place, the softmax in float32, and the cache read again as the
    values."""
    scale = q_nope.shape[-1] ** -0.5
    scores = (torch.einsum("bshc,btc->bsht", q_nope, kv) + torch.einsum("bshr,btr->bsht", q_pe, pe)) * scale
    scores += mask.unsqueeze(1)
    scores = scores.softmax(dim=-1, dtype=torch.float32).type_as(q_nope)
    return torch.einsum("bsht,btc->bshc", scores, kv)


def lilt_text_and_layout(q, k, v, ql, kl, vl, add_mask):
    """LiLT's two streams: text and layout scores, each over the square root
    of its own head dim, summed (in both orders) into two softmaxes that read
    the same logits, one for the text values and one for the layout values."""
    a = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    b = torch.matmul(ql, kl.transpose(-1, -2)) / math.sqrt(ql.shape[-1])
    text, layout = a + b, b + a
    layout_ctx = torch.matmul(nn.Softmax(dim=-1)(layout + add_mask), vl)
    text_ctx = torch.matmul(nn.Softmax(dim=-1)(text + add_mask), v)
    return torch.cat([text_ctx, layout_ctx], dim=-1)


def two_products_subtracted(q, k, v, q2, k2):
    """A second score product subtracted, each term with its own factor, a
    causal mask, and the keys of the second product shared by every head
    (size 1 along the heads: broadcast)."""
    s = torch.matmul(q, k.transpose(-1, -2)) * 0.25 - torch.matmul(q2, k2.transpose(-1, -2)) / 3
    n = q.shape[-2]
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return s.softmax(-1) @ v


def three_products(q, k, v, q2, k2, q3, k3):
    """Three score products summed (a join of a join), the middle one scaled."""
    s = q @ k.transpose(-1, -2) + q2 @ k2.transpose(-1, -2) * 0.5 + q3 @ k3.transpose(-1, -2)
    return s.softmax(-1) @ v


class TupeUntiedPositions(nn.Module):
    """TUPE's untied positional attention: a positional term of its own
    projections of the absolute positions, (H, N, N) shared by the batch,
    added to the content scores (B, H, N, N); both over sqrt(2d)."""

    def __init__(self, n=50, heads=4, d=16, pd=8):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(n, 2 * pd))
        self.wq = nn.Linear(2 * pd, heads * pd, bias=False)
        self.wk = nn.Linear(2 * pd, heads * pd, bias=False)
        self.heads, self.scale = heads, (2 * d) ** -0.5

    def forward(self, q, k, v):
        n = q.shape[-2]
        pq = self.wq(self.pos[:n]).view(n, self.heads, -1).transpose(0, 1)
        pk = self.wk(self.pos[:n]).view(n, self.heads, -1).transpose(0, 1)
        s = (q @ k.transpose(-1, -2) + pq @ pk.transpose(-1, -2)) * self.scale
        return s.softmax(-1) @ v
