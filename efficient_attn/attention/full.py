"""Full (quadratic) softmax attention: the baseline every efficient variant is measured against.

Vaswani et al. 2017, "Attention Is All You Need", arXiv:1706.03762.
Cost: O(n^2 d) time; the ``naive`` backend also holds the O(n^2) score matrix, the ``sdpa`` backend
(``torch.nn.functional.scaled_dot_product_attention``) uses fused kernels that avoid it where the device allows, and so
do ``flex`` (compiled FlexAttention over :meth:`FullAttention.mask_mod`; forward-only on CPU) and ``xformers``
(``memory_efficient_attention``, CUDA only). ``torch`` runs chunks of query rows against all keys (the causal prefix)
with the blocked backend's kernels (:func:`~efficient_attn.attention.blocked.dense_chunked_attention`): no n x n
tensor, and the backend that adds ALiBi outside ``naive`` and ``flex`` (``sdpa`` would need a dense bias).
``auto`` reads :data:`efficient_attn.attention.auto.AUTO_TABLE` (with ALiBi it skips ``sdpa``).

Grouped key/value heads: ``naive`` repeats them, ``sdpa`` and ``flex`` pass ``enable_gqa``, ``xformers`` uses its
grouped layout, ``torch`` runs the group's query heads against the shared head. Cross-attention (query length !=
key length, non-causal, optional key padding on the encoder side): every backend except ``flex``. Packed documents:
``flex`` composes its mask with a document mask; the others run each document alone.

Decoding (causal): a :class:`~efficient_attn.attention.caches.KVCache` of every key and value (growing, or static
with ``max_len``); the prefill chunk runs the configured backend, each later token one
``scaled_dot_product_attention`` call over the cached keys (no mask while every cached key is real and no ALiBi;
otherwise exact grouped attention with the key mask and the ALiBi row). FlexAttention and xFormers are not used for
single-token steps: one query row against n keys is a memory-bound read that SDPA's kernels already stream.
Memory O(n * kv_heads * head_dim), compute O(n) per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from efficient_attn.attention import flex as flex_backend
from efficient_attn.attention.auto import FusedBackendsMixin
from efficient_attn.attention.base import Attention, AttentionConfig
from efficient_attn.attention.blocked import dense_chunked_attention
from efficient_attn.attention.caches import KVCache
from efficient_attn.attention.functional import combine_masks, default_scale, dense_attention, grouped_attention
from efficient_attn.attention.xformers_backend import xformers_attention
from efficient_attn.registry import register_attention


@dataclass(kw_only=True)
class FullConfig(AttentionConfig):
    """Full attention has no parameters beyond the shared ones."""


@register_attention(
    "full",
    FullConfig,
    description="Full softmax attention (Vaswani et al. 2017), the quadratic baseline",
    paper="Vaswani et al. 2017, arXiv:1706.03762",
    complexity="O(n^2)",
    backends=("naive", "sdpa", "flex", "xformers", "torch"),
)
class FullAttention(FusedBackendsMixin, Attention):
    """Exact softmax attention over every (query, key) pair (lower triangle when causal).

    Backends:
        ``naive``: explicit ``softmax(Q K^T / sqrt(d)) V``; materialises the ``(batch, heads, n, n)`` scores.
        ``sdpa``: ``F.scaled_dot_product_attention``; ``auto`` picks it (see ``AUTO_TABLE``).
        ``flex``: compiled FlexAttention with :meth:`mask_mod`; forward-only and float32/16/bf16-only on CPU.
        ``xformers``: ``xformers.ops.memory_efficient_attention`` (causal: ``LowerTriangularMask``); CUDA only.
        ``torch``: chunks of query rows against sliced keys with a recomputing backward; adds ALiBi.
    """

    supports_gqa = True
    alibi_backends = ("naive", "torch", "flex")
    supports_cross_attention = True

    def __init__(self, config: FullConfig) -> None:
        super().__init__(config)
        self._flex = flex_backend.FlexRunner(self.mask_mod)

    def mask_mod(self, seq_len: int, device: torch.device | str | None = None) -> flex_backend.MaskMod:
        """FlexAttention ``mask_mod(b, h, q_idx, kv_idx)``: every pair inside the sequence (causal: ``kv <= q``)."""

        def causal_mask(b: Tensor | int, h: Tensor | int, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return (kv_idx <= q_idx) & (q_idx < seq_len)

        def all_pairs(b: Tensor | int, h: Tensor | int, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return (q_idx < seq_len) & (kv_idx < seq_len)

        return causal_mask if self.config.causal else all_pairs

    def dense_mask(self, seq_len: int, device: torch.device | str | None = None) -> Tensor:
        """Bool ``(seq, seq)``: all True, or the lower triangle (diagonal included) when causal."""
        mask = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device)
        return torch.tril(mask) if self.config.causal else mask

    def num_pairs(self, seq_len: int) -> int:
        """Number of (query, key) pairs scored per head."""
        return seq_len * (seq_len + 1) // 2 if self.config.causal else seq_len * seq_len

    def useful_flops(self, batch: int, seq_len: int) -> int:
        """Forward FLOPs of the pairs in the pattern: ``QK^T`` and ``PV`` cost 2 * head_dim each per pair and head."""
        return 4 * batch * self.config.num_heads * self.num_pairs(seq_len) * self.config.head_dim

    decode_unsupported_reason = None
    decode_reaches_all_earlier = True  # causal decoding: every earlier token

    def _new_cache(self, common: dict) -> KVCache:
        return KVCache(**common)

    def _decode_step(self, cache: KVCache, q: Tensor, k: Tensor, v: Tensor, real: Tensor | None) -> Tensor:
        cache.append(k, v, real)
        keys, values, is_real = cache.view()
        bias = self._decode_bias(q, cache.length - 1, torch.arange(cache.length, device=q.device))
        if bias is None and cache.all_real:
            return F.scaled_dot_product_attention(q, keys, values, enable_gqa=keys.shape[1] != q.shape[1])
        return grouped_attention(q, keys, values, is_real[:, None, None, :], bias)

    def _attend_naive(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        pattern = self.dense_mask(q.shape[-2], q.device) if self.config.causal else None
        allowed = combine_masks(pattern, key_padding_mask)
        return dense_attention(q, k, v, allowed, dropout_p=self.dropout_p, bias=self._alibi_dense(q))

    def _attend_sdpa(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        gqa = k.shape[1] != q.shape[1]
        if key_padding_mask is None:
            return F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout_p, is_causal=self.config.causal, enable_gqa=gqa
            )
        pattern = self.dense_mask(q.shape[-2], q.device) if self.config.causal else None
        allowed = combine_masks(pattern, key_padding_mask)  # (b, 1, 1 or n, n)
        has_key = allowed.any(dim=-1, keepdim=True)
        # A query with no real key would be NaN in some SDPA kernels: let it see every key, then zero it.
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed | ~has_key, dropout_p=self.dropout_p, enable_gqa=gqa
        )
        return out.masked_fill(~has_key, 0.0)

    def _attend_torch(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        return dense_chunked_attention(
            q, k, v, key_padding_mask, default_scale(q.shape[-1]), causal=self.config.causal,
            slopes=self._alibi_slopes(q), dropout_p=self.dropout_p,
        )

    def _attend_flex(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        flex_backend.check_supported(q, self.dropout_p)
        self._refuse_flex_cross(q, k)
        return self._flex(q, k, v, key_padding_mask, score_mod=self._alibi_score_mod(q))

    def _attend_flex_packed(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, document_ids: Tensor
    ) -> Tensor:
        flex_backend.check_supported(q, self.dropout_p)
        return self._flex.packed(q, k, v, key_padding_mask, document_ids, score_mod=self._alibi_score_mod(q))

    def _refuse_flex_cross(self, q: Tensor, k: Tensor) -> None:
        if q.shape[-2] != k.shape[-2]:
            raise ValueError(
                "backend 'flex' of attention 'full' runs self-attention only (its block masks are built for one "
                "length); use 'sdpa', 'torch' or 'xformers' for cross-attention"
            )

    def _attend_xformers(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        return xformers_attention(
            q, k, v, causal=self.config.causal, key_padding_mask=key_padding_mask, dropout_p=self.dropout_p
        )
