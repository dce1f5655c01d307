"""Small tensor helpers shared by every variant: masked softmax, the dense oracle, mask combination.

Shapes follow the library convention: q, k, v are ``(batch, heads, seq, head_dim)``; boolean masks are True where a
query may attend to a key; a key padding mask is bool ``(batch, seq)``, True = real token.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor


def default_scale(head_dim: int) -> float:
    """The softmax temperature of scaled dot-product attention, ``1 / sqrt(head_dim)`` (Vaswani et al. 2017)."""
    return 1.0 / math.sqrt(head_dim)


def fold_query_groups(x: Tensor, kv_heads: int) -> Tensor:
    """``(batch, heads, m, e) -> (batch, kv_heads, (heads / kv_heads) * m, e)``: the query heads that share a key/value
    head stacked along the rows (a view when ``x`` is contiguous), so one product with the shared head ``(batch,
    kv_heads, ., .)`` serves the whole group and k, v are never repeated. Undo with ``.view(batch, heads, m, -1)``."""
    return x.reshape(x.shape[0], kv_heads, -1, x.shape[-1])


def grouped_matmul(x: Tensor, shared: Tensor) -> Tensor:
    """``x (batch, heads, m, e) @ shared (batch, kv_heads, e, f) -> (batch, heads, m, f)``, each query head against
    its group's key/value head (query head i uses kv head ``i // (heads / kv_heads)``), without repeating ``shared``."""
    out = torch.matmul(fold_query_groups(x, shared.shape[1]), shared)
    return out.view(*x.shape[:-1], shared.shape[-1])


def masked_softmax(scores: Tensor, allowed: Tensor | None) -> Tensor:
    """Softmax over the last dim restricted to ``allowed`` entries; rows with no allowed entry give all zeros.

    Never produces NaN, in the forward or the backward pass: the row maximum of an empty row is replaced by 0
    before exponentiating, and the denominator is clamped.

    Args:
        scores: ``(..., n_q, n_k)`` float tensor.
        allowed: bool tensor broadcastable to ``scores``, or None for no mask.
    """
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    return weights / denom.clamp_min(torch.finfo(weights.dtype).tiny)


def key_padding_to_mask(key_padding_mask: Tensor) -> Tensor:
    """``(batch, seq)`` bool (True = real) -> ``(batch, 1, 1, seq)``, broadcastable over heads and queries."""
    return rearrange(key_padding_mask, "b n -> b 1 1 n")


def combine_masks(pattern: Tensor | None, key_padding_mask: Tensor | None) -> Tensor | None:
    """AND a pattern mask ``(n, n)`` or ``(heads, n, n)`` with a key padding mask ``(batch, n)``.

    Returns a mask broadcastable to ``(batch, heads, n, n)``, or None when both are None.
    """
    if key_padding_mask is None:
        return pattern
    padding = key_padding_to_mask(key_padding_mask)
    return padding if pattern is None else pattern & padding


def dense_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    allowed: Tensor | None = None,
    *,
    dropout_p: float = 0.0,
    scale: float | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """Explicit ``softmax(Q K^T * scale + bias) V`` that materialises the full score matrix: O(n^2) time and memory.

    This is the correctness oracle of every exact variant and the quadratic baseline of every benchmark (the
    ``naive`` backends). Grouped key/value heads are repeated to the query heads here, and only here.

    Args:
        q: ``(batch, heads, q_len, head_dim)``; k, v: ``(batch, kv_heads, kv_len, head_dim)``, kv_heads dividing heads.
        allowed: bool mask broadcastable to ``(batch, heads, q_len, kv_len)``; True = may attend. Rows with no
            allowed key produce zeros.
        dropout_p: dropout on the attention probabilities.
        scale: score scale; default ``1 / sqrt(head_dim)``.
        bias: additive float bias broadcastable to the scores (ALiBi), added after scaling.
    """
    scale = default_scale(q.shape[-1]) if scale is None else scale
    if k.shape[1] != q.shape[1]:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("bhid,bhjd->bhij", q, k) * scale  # (b, h, n, n)
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    probs = masked_softmax(scores, allowed)
    if dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p)
    return torch.einsum("bhij,bhjd->bhid", probs, v)  # (b, h, n, d)


def grouped_attention(
    q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None = None, bias: Tensor | None = None
) -> Tensor:
    """Exact softmax attention of a few queries over given keys, grouped heads without repeating k, v (decode steps).

    Args:
        q: ``(batch, heads, m, head_dim)``; k, v: ``(batch, kv_heads, kv_len, head_dim)``, kv_heads dividing heads.
        allowed: bool broadcastable to ``(batch, heads, m, kv_len)``; rows with no allowed key give zeros.
        bias: additive float bias broadcastable like ``allowed`` (ALiBi), added after scaling.

    Memory ``batch * heads * m * kv_len`` scores: callers keep ``m`` small (one token, or a short chunk).
    """
    b, h, m, d = q.shape
    kv_heads = k.shape[1]
    scores = torch.matmul(fold_query_groups(q, kv_heads), k.transpose(-1, -2)) * default_scale(d)
    scores = scores.view(b, h, m, -1)
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    probs = masked_softmax(scores, allowed)
    out = torch.matmul(probs.reshape(b, kv_heads, -1, probs.shape[-1]), v)
    return out.view(b, h, m, d)
