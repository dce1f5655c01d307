"""Sliding-window (local) attention: each query sees the keys within ``window_size`` positions.

Beltagy et al. 2020, "Longformer: The Long-Document Transformer", arXiv:2004.05150 (sliding window, section 3.1);
Child et al. 2019, arXiv:1904.10509 (local patterns). Query i attends to key j iff ``|i - j| <= window_size``
(causal: ``0 <= i - j <= window_size``). Cost: O(n * w) time, O(n * d) memory with the ``torch`` backend.

Attention sinks (``sink_tokens = s``; StreamingLLM, Xiao et al. 2023, arXiv:2309.17453): the first s tokens are
also visible to every query (causal: to every later one), as keys only. Cost O(n * (w + s)).

Decoding (causal): a rolling buffer of the last ``window_size + 1`` keys and values (Mistral's rolling cache, Jiang
et al. 2023, arXiv:2310.06825); each token writes its slot and attends to the whole buffer: bytes and compute per
token constant in the context. With sinks, the sinks' keys and values are kept beside the buffer
(:class:`~efficient_attn.attention.caches.GlobalRollingCache`), O((s + w) * d) per token.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from efficient_attn.attention.base import AttentionConfig
import torch

from efficient_attn.attention.caches import GlobalRollingCache, RollingKVCache
from efficient_attn.attention.functional import grouped_attention
from efficient_attn.errors import require_positive_int
from efficient_attn.attention.patterns import Pattern, WindowPattern, default_window_block
from efficient_attn.attention.sparse_base import PatternAttention
from efficient_attn.registry import register_attention


@dataclass(kw_only=True)
class WindowConfig(AttentionConfig):
    """Attributes:
        window_size: w >= 1; query i sees keys j with ``|i - j| <= w`` (one-sided reach).
        block_size: query/key block of the ``torch`` backend (None = ``min(window_size, 64)``: see
            :data:`~efficient_attn.attention.patterns.WINDOW_BLOCK`), capped at the sequence
            length; inputs are padded to a multiple of it. It changes cost, never the result.
        sink_tokens: s >= 0 leading tokens every query also sees, as keys only (StreamingLLM's attention sinks);
            0 = a plain window. A sequence shorter than s has every token as a sink.
    """

    window_size: int = 256
    block_size: int | None = None
    sink_tokens: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive_int("window_size", self.window_size)
        if self.block_size is not None:
            require_positive_int("block_size", self.block_size)
        sinks = self.sink_tokens
        if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
            raise ValueError(f"sink_tokens must be an int >= 0 (0 = no attention sinks), got {sinks!r}")


@register_attention(
    "window",
    WindowConfig,
    description="Sliding-window local attention (Beltagy et al. 2020), |i - j| <= window_size",
    paper="Beltagy et al. 2020, arXiv:2004.05150",
    complexity="O(n*w)",
    backends=("torch", "naive", "flex", "xformers"),
    length_multiple=64,
)
class WindowAttention(PatternAttention):
    """Sliding-window attention. ``length_multiple`` in the registry is the default block (64); the module's
    :attr:`block_size` is the one in effect. Shapes: ``(batch, heads, seq, head_dim)``."""

    config: WindowConfig
    decode_unsupported_reason = None

    @property
    def pattern_is_translation_invariant(self) -> bool:  # type: ignore[override]
        """A plain window depends on ``i - j`` only; sinks anchor it at the row's start (packed flex refuses)."""
        return self.config.sink_tokens == 0

    def _new_cache(self, common: dict) -> RollingKVCache | GlobalRollingCache:
        if self.config.sink_tokens:
            return GlobalRollingCache(**common, global_positions=tuple(range(self.config.sink_tokens)),
                                      capacity=self.config.window_size + 1)
        return RollingKVCache(**common, capacity=self.config.window_size + 1)

    def _decode_step(self, cache, q: Tensor, k: Tensor, v: Tensor, real: Tensor | None) -> Tensor:
        if isinstance(cache, GlobalRollingCache):
            return self._decode_with_sinks(cache, q, k, v, real)
        cache.append(k, v, real)
        allowed = (cache.positions >= 0)[None, None, None, :] & cache.real[:, None, None, :]
        bias = self._decode_bias(q, cache.length - 1, cache.positions)
        return grouped_attention(q, cache.keys, cache.values, allowed, bias)

    def _decode_with_sinks(
        self, cache: GlobalRollingCache, q: Tensor, k: Tensor, v: Tensor, real: Tensor | None
    ) -> Tensor:
        """One token against the sinks so far and the rolling buffer (a sink inside the buffer is read once)."""
        cache.append(k, v, real)
        ring, sinks = cache.ring, cache.globals
        sink_pos = torch.tensor(cache.global_positions, dtype=torch.long, device=q.device)
        in_ring = (ring.positions >= 0) & ~torch.isin(ring.positions, sink_pos)
        keys_s, values_s, real_s = sinks.view()
        keys = torch.cat([keys_s, ring.keys], dim=2)
        values = torch.cat([values_s, ring.values], dim=2)
        allowed = torch.cat([real_s, ring.real & in_ring[None]], dim=1)[:, None, None, :]
        positions = torch.cat([torch.tensor(cache.global_held, dtype=torch.long, device=q.device), ring.positions])
        return grouped_attention(q, keys, values, allowed, self._decode_bias(q, cache.length - 1, positions))

    def _make_pattern(self) -> Pattern:
        cfg = self.config
        return WindowPattern(
            window_size=cfg.window_size,
            block_size=cfg.block_size if cfg.block_size is not None else default_window_block(cfg.window_size),
            causal=cfg.causal,
            num_heads=cfg.num_heads,
            sink_tokens=cfg.sink_tokens,
        )
