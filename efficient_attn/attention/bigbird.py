"""BigBird block-sparse attention: window, random and global blocks, per head.

Zaheer et al. 2020, "Big Bird: Transformers for Longer Sequences", arXiv:2007.14062 (ITC variant, Appendix D).
The first ``num_global_blocks`` blocks are global (attend to and are attended by everything); every other query
block sees ``num_window_blocks`` neighbouring blocks, the global blocks and ``num_random_blocks`` random blocks drawn
per head from the rest. Cost: O(n * b * (w + r + g)) time with the ``torch`` backend, O(n * d) memory.

Decoding (causal): random blocks reach any earlier block, so the cache (a
:class:`~efficient_attn.attention.caches.KVCache`) holds every key and value (memory O(n)). Each token of query block
r gathers, per head, only its row's blocks (window, global and the random blocks of row r, drawn for that row alone)
and attends to those keys up to itself: compute O((w + r + g) * block_size) per token. Tokens of the global blocks
attend to every earlier key (global rows, O(g * block_size)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from efficient_attn.attention.base import AttentionConfig
from efficient_attn.attention.caches import KVCache
from efficient_attn.attention.functional import grouped_attention
from efficient_attn.errors import require_positive_int
from efficient_attn.attention.patterns import BigBirdPattern, Pattern
from efficient_attn.attention.sparse_base import PatternAttention
from efficient_attn.registry import register_attention


@dataclass(kw_only=True)
class BigBirdConfig(AttentionConfig):
    """Attributes:
        block_size: tokens per block (>= 1); inputs are padded to a multiple of it.
        num_random_blocks: random key blocks per query block (>= 0); rows with fewer candidates take all.
        num_global_blocks: leading global blocks (>= 0).
        num_window_blocks: odd >= 1; the query block and (num_window_blocks - 1) / 2 blocks each side.
        seed: seed of the random plan; row r's random blocks are a pure function of (seed, head, r) and, non-causal
            only, of the number of blocks (see :class:`~efficient_attn.attention.patterns.BigBirdPattern`).
        redraw: if True, draw a fresh random plan at every call in training mode (eval keeps the current one).
    """

    block_size: int = 64
    num_random_blocks: int = 3
    num_global_blocks: int = 2
    num_window_blocks: int = 3
    seed: int = 0
    redraw: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive_int("block_size", self.block_size)
        for name in ("num_random_blocks", "num_global_blocks", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        nwb = self.num_window_blocks
        if isinstance(nwb, bool) or not isinstance(nwb, int) or nwb < 1 or nwb % 2 == 0:
            raise ValueError(f"num_window_blocks must be an odd int >= 1 (1, 3, 5, ...), got {nwb!r}")
        if not isinstance(self.redraw, bool):
            raise ValueError(f"redraw must be a bool, got {self.redraw!r}")


@register_attention(
    "bigbird",
    BigBirdConfig,
    description="BigBird block-sparse attention: window + random + global blocks (Zaheer et al. 2020)",
    paper="Zaheer et al. 2020, arXiv:2007.14062",
    complexity="O(n*b*(w+r+g))",
    backends=("torch", "naive", "flex"),
    length_multiple=64,
)
class BigBirdAttention(PatternAttention):
    """BigBird attention; per-head pattern, so ``dense_mask`` is ``(heads, seq, seq)``.

    The random plan is a table of ``num_random_blocks`` block ids per (head, query block), drawn per row (causal:
    independent of the blocks that follow, so prefix consistent) and reused in train and eval; with ``redraw=True`` each
    training-mode call draws the next plan (``pattern.draw`` counts draws; ``dense_mask`` shows the current one).
    """

    config: BigBirdConfig
    #: Packed documents run each document alone (its own re-blocking, global blocks and random plan); flex's document
    #: mask could not re-anchor the pattern at each document's start.
    packing_backends = ("torch", "naive")
    pattern: BigBirdPattern
    decode_unsupported_reason = None

    def _new_cache(self, common: dict) -> KVCache:
        return KVCache(**common)

    def _decode_step(self, cache: KVCache, q: Tensor, k: Tensor, v: Tensor, real: Tensor | None) -> Tensor:
        cache.append(k, v, real)
        keys, values, is_real = cache.view()
        t, bs, heads = cache.length - 1, self.block_size, self.config.num_heads
        row = t // bs
        if row < self.config.num_global_blocks:  # a global row: every earlier key
            tokens = torch.arange(t + 1, device=q.device).expand(heads, -1)
        else:
            blocks = self.pattern.row_blocks(row + 1, torch.tensor([row]), q.device)[:, 0]  # (h, slots)
            tokens = (blocks[..., None] * bs + torch.arange(bs, device=q.device)).flatten(-2)  # (h, slots * bs)
            tokens = torch.where((blocks[..., None] >= 0).expand(-1, -1, bs).flatten(-2), tokens, t + 1)
        valid = tokens <= t
        tokens = tokens.clamp_max(t)
        kv_head = torch.arange(heads, device=q.device) // (heads // keys.shape[1])
        keys_g = keys[:, kv_head[:, None], tokens]  # (b, h, s, d): only the row's keys are read
        values_g = values[:, kv_head[:, None], tokens]
        allowed = (valid[None] & is_real[:, tokens])[:, :, None, :]  # (b, h, 1, s)
        slopes = self._alibi_slopes(q)
        bias = None if slopes is None else (-slopes[:, None] * (t - tokens).to(q.dtype))[None, :, None, :]
        return grouped_attention(q, keys_g, values_g, allowed, bias)

    def _make_pattern(self) -> Pattern:
        cfg = self.config
        return BigBirdPattern(
            block_size=cfg.block_size,
            num_random_blocks=cfg.num_random_blocks,
            num_global_blocks=cfg.num_global_blocks,
            num_window_blocks=cfg.num_window_blocks,
            seed=cfg.seed,
            causal=cfg.causal,
            num_heads=cfg.num_heads,
        )

    def _before_attend(self) -> None:
        if self.config.redraw and self.training and not self._redraw_frozen:
            self.pattern.draw += 1

    def effective_random_blocks(self, seq_len: int) -> Tensor:
        """Long ``(heads, num_blocks)``: random blocks each query block really has (fewer than ``num_random_blocks``
        where a row has fewer candidates; 0 for global rows)."""
        return self.pattern.effective_random_blocks(seq_len)

    def layout(self, seq_len: int, device: torch.device | str | None = None) -> Tensor:
        """Bool ``(heads, nb, nb)`` block layout (window | global | random) before causal and length masking."""
        return self.pattern.layout(seq_len, device)
