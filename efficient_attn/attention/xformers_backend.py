"""The ``xformers`` backend (CUDA only): ``xformers.ops.memory_efficient_attention`` with a structured bias.

Memory-efficient attention (Rabe & Staats 2021, "Self-attention Does Not Need O(n^2) Memory", arXiv:2112.05682)
as implemented by xFormers (Lefaudeux et al. 2022, https://github.com/facebookresearch/xformers). Its attention
biases are *descriptions* (never materialised on the device), so the kernels skip masked key blocks:

* ``full``: no bias; causal = ``LowerTriangularMask``.
* ``window`` (``|i - j| <= w``): ``LocalAttentionFromBottomRightMask(window_left=w, window_right=w)``; causal
  (``0 <= i - j <= w``): ``LowerTriangularFromBottomRightLocalAttentionMask(w + 1)`` (xFormers counts the query
  itself in its window). With equal query and key lengths "bottom right" is the ordinary diagonal. The tests check
  both mappings against our pattern's ``dense_mask`` after ``materialize()``.

Key padding without an ``n x n`` bias: one extra head-dim column is appended, ``+c`` on every query and ``-c`` on
padded keys (``0`` on real ones), so a padded key's score drops by ``c^2 = 10^4 / scale`` before the kernel's scaling,
i.e. by ``10^4`` after it: ``exp`` underflows to exactly 0 in float32/16. The head dim is then padded with zeros to a
multiple of 8 (64 -> 72: about 12% more work, only when a mask is given). A query with no real allowed key would
spread its weight over padded keys instead of yielding zeros, so those rows (found in O(n) with prefix sums) are set
to zero.

Grouped key/value heads: xFormers' grouped layout ``(batch, seq, groups, heads_per_group, head_dim)``; k and v are
*expanded* (stride 0) over the heads of a group, never copied. Cross-attention (query length != key length, full,
non-causal): no bias, and a query row is empty only when its batch element has no real key.

Shapes: q ``(batch, heads, q_len, head_dim)``, k, v ``(batch, kv_heads, kv_len, head_dim)``; xFormers wants
``(batch, seq, heads, head_dim)`` or the grouped 5-D layout (einops below).
"""

from __future__ import annotations

import importlib.util
import math
from types import ModuleType

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

#: Why the backend cannot run on CPU (recorded as the ``unsupported`` note).
CPU_REASON = (
    "xformers' memory_efficient_attention kernels are CUDA-only; on CPU pick another of this variant's backends "
    "(see effattn list)"
)
#: Score drop of a padded key after scaling (exp(-1e4) == 0 in every float dtype).
PADDING_PENALTY = 1.0e4


def unavailable_reason(device: torch.device | str, needs_grad: bool) -> str | None:
    """Why ``xformers`` cannot run on ``device`` (None when it can). Its kernels have forward and backward."""
    device = torch.device(device)
    if device.type != "cuda":
        return CPU_REASON if device.type == "cpu" else f"xformers runs on cuda only, not on {device.type!r}"
    if importlib.util.find_spec("xformers") is None:
        return "xformers is not installed: pip install xformers (a build matching your torch and CUDA)"
    return None


def _fmha() -> ModuleType:
    """``xformers.ops.fmha``, imported on first use (the import prints build warnings on CPU-only machines)."""
    from xformers.ops import fmha

    return fmha


def attention_bias(causal: bool, window: int | None) -> object | None:
    """The xFormers bias for full (``window=None``) or sliding-window attention (``|i - j| <= window``)."""
    bias = _fmha().attn_bias
    if window is None:
        return bias.LowerTriangularMask() if causal else None
    if causal:
        return bias.LowerTriangularFromBottomRightLocalAttentionMask(window + 1)
    return bias.LocalAttentionFromBottomRightMask(window_left=window, window_right=window)


def rows_without_keys(key_padding_mask: Tensor, left: int, right: int) -> Tensor:
    """Bool ``(batch, seq)``: queries i with no real key in ``[i - left, i + right]`` (O(n) prefix sums)."""
    batch, n = key_padding_mask.shape
    counts = F.pad(key_padding_mask.long().cumsum(-1), (1, 0))  # (b, n + 1): real keys before position t
    idx = torch.arange(n, device=key_padding_mask.device)
    hi = (idx + right + 1).clamp(max=n)
    lo = (idx - left).clamp(min=0)
    return (counts[:, hi] - counts[:, lo]) == 0


def xformers_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    window: int | None = None,
    key_padding_mask: Tensor | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Full or sliding-window attention through ``memory_efficient_attention``.

    Args:
        q: ``(batch, heads, q_len, head_dim)``; k, v: ``(batch, kv_heads, kv_len, head_dim)``, kv_heads dividing heads;
            ``q_len != kv_len`` only for full, non-causal attention.
        causal: keys ``j <= i`` only.
        window: one-sided window ``w`` (``|i - j| <= w``), or None for full attention.
        key_padding_mask: bool ``(batch, seq)``, True = real token.
        dropout_p: attention dropout (xFormers applies it inside the kernel).

    Returns:
        ``(batch, heads, seq, head_dim)``.
    """
    head_dim = q.shape[-1]
    scale = 1.0 / math.sqrt(head_dim)
    heads, kv_heads = q.shape[1], k.shape[1]
    if q.shape[2] != k.shape[2] and (causal or window is not None):
        raise ValueError("xformers backend: query length != key length is supported for full non-causal attention only")
    if key_padding_mask is not None:
        c = math.sqrt(PADDING_PENALTY / scale)
        extra = -(-(head_dim + 1) // 8) * 8 - head_dim  # pad head_dim + 1 up to a multiple of 8
        q_col = torch.zeros(*q.shape[:-1], extra, dtype=q.dtype, device=q.device)
        q_col[..., 0] = c
        k_col = torch.zeros(*k.shape[:-1], extra, dtype=k.dtype, device=k.device)
        k_col[..., 0] = torch.where(key_padding_mask, 0.0, -c).to(k.dtype)[:, None, :]  # (b, 1, n) over heads
        q = torch.cat([q, q_col], dim=-1)
        k = torch.cat([k, k_col], dim=-1)
        v = F.pad(v, (0, extra))
    if kv_heads == heads:
        q, k, v = (rearrange(t, "b h n d -> b n h d") for t in (q, k, v))
    else:
        # grouped layout (b, n, groups, heads per group, d); k, v expanded over a group's heads (stride 0, no copy)
        q = rearrange(q, "b (g h) n d -> b n g h d", g=kv_heads)
        k, v = (rearrange(t, "b g n d -> b n g 1 d").expand(-1, -1, -1, heads // kv_heads, -1) for t in (k, v))
    out = _fmha().memory_efficient_attention(
        q, k, v, attn_bias=attention_bias(causal, window), p=dropout_p, scale=scale
    )  # (b, n, h, d') or (b, n, g, h, d')
    if out.dim() == 5:
        out = rearrange(out, "b n g h d -> b n (g h) d")
    out = rearrange(out[..., :head_dim], "b n h d -> b h n d")
    if key_padding_mask is None:
        return out
    n = key_padding_mask.shape[-1]
    if out.shape[2] != n:  # cross-attention: a row is empty only when its batch element has no real key
        empty = ~key_padding_mask.any(dim=-1)
        return out.masked_fill(rearrange(empty, "b -> b 1 1 1"), 0.0)
    reach = n if window is None else window
    empty = rows_without_keys(key_padding_mask, reach, 0 if causal else reach)  # (b, n)
    return out.masked_fill(rearrange(empty, "b n -> b 1 n 1"), 0.0)
