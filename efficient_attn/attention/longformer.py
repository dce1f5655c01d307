"""Longformer attention: a sliding window plus global tokens that attend to and from every position.

Beltagy et al. 2020, "Longformer: The Long-Document Transformer", arXiv:2004.05150. Query i attends to key j iff
``|i - j| <= window_size`` or i is global or j is global (causal: also ``j <= i``). Cost: O(n * (w + g)) time with the
``torch`` backend (global rows are dense rows, O(g * n)), O(n * d) memory.

Decoding (causal): the global tokens' keys and values plus a rolling buffer of the last ``window_size + 1``
(:class:`~efficient_attn.attention.caches.GlobalRollingCache`): each token attends to the buffer and the global keys
so far, O((g + w) * d) bytes and compute per token, constant in the context. A global query sees every earlier key,
so decoding needs each global token's earlier keys to be global or inside its window (always true for a leading
count; an explicit index further out is refused by ``new_cache``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from efficient_attn.attention.base import AttentionConfig
from efficient_attn.attention.caches import GlobalRollingCache
from efficient_attn.attention.functional import grouped_attention
from efficient_attn.errors import require_positive_int
from efficient_attn.attention.patterns import LongformerPattern, Pattern, default_window_block
from efficient_attn.attention.sparse_base import PatternAttention
from efficient_attn.registry import register_attention


@dataclass(kw_only=True)
class LongformerConfig(AttentionConfig):
    """Attributes:
        window_size: w >= 1; one-sided reach of the window, as in ``window`` (HF ``attention_window`` = 2w).
        block_size: query/key block of the ``torch`` backend (None = ``min(window_size, 64)``, as ``window``), capped at the sequence
            length; it changes cost, never the result.
        global_tokens: an int count of leading global tokens (>= 0; a shorter sequence is all global), or a tuple of
            distinct indices >= 0. Indices are checked against the sequence length at call time. Packed documents
            (``document_ids``) each have their own leading global tokens.
    """

    window_size: int = 256
    global_tokens: int | tuple[int, ...] = 1
    block_size: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive_int("window_size", self.window_size)
        if self.block_size is not None:
            require_positive_int("block_size", self.block_size)
        glob = self.global_tokens
        if isinstance(glob, list):
            glob = self.global_tokens = tuple(glob)
        if isinstance(glob, bool) or not isinstance(glob, (int, tuple)):
            raise ValueError(
                f"global_tokens must be an int count or a tuple of token indices, got {self.global_tokens!r}"
            )
        if isinstance(glob, int):
            if glob < 0:
                raise ValueError(f"global_tokens must be a count >= 0, got {glob}")
            return
        for index in glob:
            if isinstance(index, bool) or not isinstance(index, int) or index < 0:
                raise ValueError(f"global_tokens indices must be ints >= 0, got {index!r} in {glob!r}")
        if len(set(glob)) != len(glob):
            raise ValueError(f"global_tokens indices must be distinct, got {glob!r}")


@register_attention(
    "longformer",
    LongformerConfig,
    description="Longformer: sliding window plus global tokens (Beltagy et al. 2020)",
    paper="Beltagy et al. 2020, arXiv:2004.05150",
    complexity="O(n*(w+g))",
    backends=("torch", "naive", "flex"),
    length_multiple=64,
)
class LongformerAttention(PatternAttention):
    """Window + global attention. Shapes: ``(batch, heads, seq, head_dim)``; block size = ``block_size`` (default
    ``min(window_size, 64)``), capped at the sequence length."""

    config: LongformerConfig
    #: Packed documents run each document alone (its own leading global tokens); flex's document
    #: mask could not re-anchor the pattern at each document's start.
    packing_backends = ("torch", "naive")
    decode_unsupported_reason = None

    def _new_cache(self, common: dict) -> GlobalRollingCache:
        glob, w = self.config.global_tokens, self.config.window_size
        positions = tuple(range(glob)) if isinstance(glob, int) else tuple(sorted(glob))
        for i in positions:
            far = [j for j in range(max(0, i - w)) if j not in positions]
            if far:
                raise ValueError(
                    f"longformer cannot decode with global token {i}: as a global query it attends to every earlier "
                    f"key, and key {far[0]} is neither global nor within window_size={w}, so a bounded cache would "
                    "not hold it; use a leading count of global tokens (global_tokens=int)"
                )
        return GlobalRollingCache(**common, global_positions=positions, capacity=w + 1)

    def _decode_step(self, cache: GlobalRollingCache, q: Tensor, k: Tensor, v: Tensor, real: Tensor | None) -> Tensor:
        cache.append(k, v, real)
        ring, glob = cache.ring, cache.globals
        global_pos = torch.tensor(cache.global_positions, dtype=torch.long, device=q.device)
        in_ring = (ring.positions >= 0) & ~torch.isin(ring.positions, global_pos)  # global keys come from `glob`
        keys_g, values_g, real_g = glob.view()
        keys = torch.cat([keys_g, ring.keys], dim=2)
        values = torch.cat([values_g, ring.values], dim=2)
        allowed = torch.cat([real_g, ring.real & in_ring[None]], dim=1)[:, None, None, :]
        positions = torch.cat([torch.tensor(cache.global_held, dtype=torch.long, device=q.device), ring.positions])
        return grouped_attention(q, keys, values, allowed, self._decode_bias(q, cache.length - 1, positions))

    def _make_pattern(self) -> Pattern:
        cfg = self.config
        return LongformerPattern(
            window_size=cfg.window_size, global_tokens=cfg.global_tokens, causal=cfg.causal, num_heads=cfg.num_heads,
            block_size=cfg.block_size if cfg.block_size is not None else default_window_block(cfg.window_size),
        )
