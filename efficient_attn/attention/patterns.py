"""Sparse attention patterns as data: one definition per pattern, every executor derived from it.

A pattern says which (query, key) pairs are scored. Each pattern object defines two things:

* ``mask_mod(seq_len, device)``: the token-level rule, a FlexAttention / attention-gym style predicate
  ``mask_mod(b, h, q_idx, kv_idx) -> bool Tensor``, vectorised over broadcastable index tensors and built only from
  O(n) or O(blocks^2) lookup tensors (never an n x n one). It is the single source of truth.
* ``structure(seq_len, device)``: a :class:`BlockStructure` that says which key blocks each query block must look at,
  which extra key tokens every query block also sees, and which query rows attend densely to everything. It is a
  *cover*: the blocked backend evaluates ``mask_mod`` inside it, so it decides cost, never the result.

From these come ``dense_mask`` (``mask_mod`` on the full index grid: the reference), ``num_pairs`` (the cover's masks
summed, chunk by chunk, without any n x n tensor; the tests check it equals ``dense_mask(n).sum()``), and the chunk
masks of the blocked backend (:func:`chunk_mask`, :func:`global_rows_mask`). A later fused backend uses ``mask_mod``.

Patterns (n = true sequence length, b = block size, indices i = query, j = key):

* :class:`WindowPattern`: ``|i - j| <= w``; causal ``0 <= i - j <= w`` (local attention; Beltagy et al. 2020,
  arXiv:2004.05150, section 3.1; Child et al. 2019, arXiv:1904.10509).
* :class:`BigBirdPattern`: block-level window + random + global blocks (Zaheer et al. 2020, "Big Bird: Transformers
  for Longer Sequences", arXiv:2007.14062, Appendix D), per head.
* :class:`LongformerPattern`: window ``|i - j| <= w`` plus global tokens that attend to and from every position
  (Beltagy et al. 2020, arXiv:2004.05150).

Causal patterns additionally require ``j <= i`` everywhere (global rows and columns included).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "EMPTY",
    "BigBirdPattern",
    "BlockStructure",
    "LongformerPattern",
    "MaskMod",
    "Pattern",
    "WindowPattern",
    "chunk_mask",
    "global_query_lookup",
    "global_rows_mask",
]

#: ``mask_mod(b, h, q_idx, kv_idx) -> bool Tensor`` (arguments broadcast against each other).
MaskMod = Callable[[Tensor | int, Tensor | int, Tensor, Tensor], Tensor]

#: Token index marking an empty slot in a block structure; every ``mask_mod`` rejects it.
EMPTY = -1


def _in_range(q_idx: Tensor, kv_idx: Tensor, seq_len: int) -> Tensor:
    return (q_idx >= 0) & (q_idx < seq_len) & (kv_idx >= 0) & (kv_idx < seq_len)


@dataclass(frozen=True)
class BlockStructure:
    """Which keys the blocked backend gathers for each query block (a cover of the pattern, not the pattern).

    Query blocks ``first_query_block .. num_blocks - 1`` are computed block-wise: query block ``first_query_block + r``
    sees the key blocks ``key_blocks[h, r]`` (``EMPTY`` = unused slot) plus the tokens ``extra_keys`` (those inside
    one of its key blocks are dropped, so no key is counted twice). The query rows ``global_queries`` are computed as
    dense rows over every key (O(g * n)); inside the block-wise part they are masked out.

    Attributes:
        seq_len: true sequence length n (the pattern is defined on it).
        block_size: b; the blocked backend pads the sequence to a multiple of it.
        first_query_block: query blocks before it are all global rows.
        key_blocks: long ``(heads or 1, num_query_blocks, slots)``.
        extra_keys: long ``(e,)`` key token indices.
        global_queries: long ``(g,)`` query token indices, sorted, all < seq_len.
    """

    seq_len: int
    block_size: int
    first_query_block: int
    key_blocks: Tensor
    extra_keys: Tensor
    global_queries: Tensor

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.seq_len / self.block_size)

    @property
    def padded_len(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_query_blocks(self) -> int:
        return self.num_blocks - self.first_query_block

    @property
    def keys_per_block(self) -> int:
        """Key tokens gathered per query block: slots * block_size + extra keys."""
        return self.key_blocks.shape[-1] * self.block_size + self.extra_keys.numel()

    def key_tokens(self, start: int, stop: int) -> Tensor:
        """Key token indices of query-block rows ``start:stop`` (relative to ``first_query_block``).

        Returns long ``(heads or 1, stop - start, keys_per_block)``; ``EMPTY`` marks unused slots and extra keys that a
        key block of the row already covers.
        """
        blocks = self.key_blocks[:, start:stop]  # (hp, g, slots)
        offs = torch.arange(self.block_size, device=blocks.device)
        tokens = blocks[..., None] * self.block_size + offs  # (hp, g, slots, b)
        tokens = torch.where(blocks[..., None] >= 0, tokens, EMPTY).flatten(-2)  # (hp, g, slots * b)
        if self.extra_keys.numel() == 0:
            return tokens
        extra_blocks = self.extra_keys // self.block_size  # (e,)
        covered = (blocks[..., None, :] == extra_blocks[:, None]).any(-1)  # (hp, g, e)
        extra = torch.where(covered, EMPTY, self.extra_keys.expand_as(covered))
        return torch.cat([tokens, extra], dim=-1)


class Pattern(ABC):
    """A sparse attention pattern (see the module docstring). Subclasses define ``mask_mod`` and ``structure``."""

    #: True when heads have different patterns (``dense_mask`` is then ``(heads, n, n)``).
    per_head: bool = False

    def __init__(self, *, block_size: int, causal: bool, num_heads: int) -> None:
        self.block_size = block_size
        self.causal = causal
        self.num_heads = num_heads

    @property
    def mask_heads(self) -> int:
        """Number of distinct head patterns: ``num_heads`` if per-head, else 1."""
        return self.num_heads if self.per_head else 1

    @abstractmethod
    def mask_mod(self, seq_len: int, device: torch.device | str | None = None) -> MaskMod:
        """The token-level rule for length ``seq_len`` (see the module docstring)."""

    @abstractmethod
    def structure(self, seq_len: int, device: torch.device | str | None = None) -> BlockStructure:
        """The block cover the ``torch`` backend iterates over for length ``seq_len``."""

    def chunk_mask(
        self, structure: BlockStructure, mod: MaskMod, is_global: Tensor, start: int, stop: int
    ) -> tuple[Tensor, Tensor]:
        """Key tokens and allowed mask of query-block rows ``start:stop``; see :func:`chunk_mask`.

        This generic version evaluates ``mask_mod`` on the chunk's index grid. Subclasses override it with a faster
        equivalent built from the same index arithmetic; ``tests/test_patterns.py`` checks every override equals
        this generic version, so the fast path cannot drift from ``mask_mod``.
        """
        return chunk_mask(structure, mod, is_global, start, stop)

    def block_size_for(self, seq_len: int) -> int:
        """The block size the blocked backend uses at ``seq_len`` (inputs are padded to a multiple of it); the
        pattern's ``block_size`` unless a subclass caps it (it changes cost only, never the pairs)."""
        return self.block_size

    def with_block_size(self, block_size: int) -> "Pattern | None":
        """The same pattern with another block cover (``block_size``), or None when the block is part of the pattern
        itself (BigBird). The blocked backend's backward may use a larger block than its forward."""
        return None

    def contiguous_rows(self, structure: BlockStructure) -> tuple[int, int]:
        """Query-block rows ``(lo, hi)`` (relative to ``first_query_block``) in which every row ``r`` reads one run
        of consecutive keys that starts one block after row ``r - 1``'s: the blocked backend reads those as one
        strided view of k, copying nothing. It checks the key tokens before relying on it; ``(0, 0)`` is always
        safe."""
        return 0, 0

    def dense_mask(self, seq_len: int, device: torch.device | str | None = None) -> Tensor:
        """Bool ``(seq, seq)``, or ``(heads, seq, seq)`` when per-head; True = query i may attend to key j.

        O(n^2): for tests and the ``naive`` backend only.
        """
        mod = self.mask_mod(seq_len, device)
        idx = torch.arange(seq_len, device=device)
        heads = torch.arange(self.mask_heads, device=device)[:, None, None]
        mask = mod(0, heads, idx[None, :, None], idx[None, None, :])  # (hp, n, n)
        mask = mask.expand(self.mask_heads, seq_len, seq_len)
        return mask if self.per_head else mask[0]

    def num_pairs(self, seq_len: int) -> int:
        """Allowed (query, key) pairs: per head, or summed over heads when per-head. Computed without n x n tensors."""
        structure = self.structure(seq_len)
        mod = self.mask_mod(seq_len)
        is_global = global_query_lookup(structure, None)
        total = 0
        step = max(1, 4096 // structure.block_size)
        for start in range(0, structure.num_query_blocks, step):
            stop = min(start + step, structure.num_query_blocks)
            tokens, allowed = self.chunk_mask(structure, mod, is_global, start, stop)
            full_shape = (self.mask_heads, stop - start, structure.block_size, tokens.shape[-1])
            total += int(allowed.expand(full_shape).sum())
        keys = torch.arange(structure.padded_len)
        for rows in structure.global_queries.split(256):
            allowed = global_rows_mask(self, mod, rows, keys)
            total += int(allowed.expand(self.mask_heads, *allowed.shape[1:]).sum())
        return total

    def num_pairs_total(self, seq_len: int) -> int:
        """Allowed pairs summed over all heads."""
        pairs = self.num_pairs(seq_len)
        return pairs if self.per_head else pairs * self.num_heads


def global_query_lookup(structure: BlockStructure, device: torch.device | str | None) -> Tensor:
    """Bool ``(padded_len,)``: True for the rows computed densely (masked out of the block-wise part)."""
    lookup = torch.zeros(structure.padded_len, dtype=torch.bool, device=device)
    lookup[structure.global_queries.to(device)] = True
    return lookup


def chunk_mask(
    structure: BlockStructure, mod: MaskMod, is_global: Tensor, start: int, stop: int
) -> tuple[Tensor, Tensor]:

    """Key tokens and allowed mask of the query-block rows ``start:stop`` of ``structure``.

    Returns:
        tokens: long ``(hp, g, kt)`` key indices (``EMPTY`` = none), ``g = stop - start``, ``kt = keys_per_block``.
        allowed: bool ``(hp, g, block_size, kt)``: ``mask_mod`` at (query, key), False for empty slots and for global
            query rows (those are computed densely).
    """
    bs = structure.block_size
    device = structure.key_blocks.device
    first = (structure.first_query_block + start) * bs
    q_idx = torch.arange(first, first + (stop - start) * bs, device=device).view(stop - start, bs)  # (g, b)
    tokens = structure.key_tokens(start, stop)  # (hp, g, kt)
    heads = torch.arange(tokens.shape[0], device=device)[:, None, None, None]
    allowed = mod(0, heads, q_idx[None, :, :, None], tokens[:, :, None, :])  # (hp, g, b, kt)
    if structure.global_queries.numel():
        allowed = allowed & ~is_global[q_idx][None, :, :, None]
    return tokens, allowed


def _chunk_queries(structure: BlockStructure, start: int, stop: int) -> Tensor:
    """Long ``(g, block_size)`` query token indices of query-block rows ``start:stop``."""
    bs = structure.block_size
    first = (structure.first_query_block + start) * bs
    return torch.arange(first, first + (stop - start) * bs, device=structure.key_blocks.device).view(-1, bs)


def _valid(structure: BlockStructure, q_idx: Tensor, tokens: Tensor) -> Tensor:
    """Bool ``(hp, g, b or 1, kt)``: key slot used and in range, and (only where needed) query in range."""
    valid = ((tokens >= 0) & (tokens < structure.seq_len))[:, :, None, :]
    if int(q_idx[-1, -1]) >= structure.seq_len:
        valid = valid & (q_idx < structure.seq_len)[None, :, :, None]
    return valid


def global_rows_mask(pattern: Pattern, mod: MaskMod, rows: Tensor, keys: Tensor) -> Tensor:
    """Bool ``(hp, len(rows), len(keys))``: ``mask_mod`` for dense rows ``rows`` against every key in ``keys``."""
    heads = torch.arange(pattern.mask_heads, device=rows.device)[:, None, None]
    mask = mod(0, heads, rows[None, :, None], keys[None, None, :])
    return mask.expand(pattern.mask_heads, rows.numel(), keys.numel())


#: The largest default block of a window's blocked cover. A query block of b rows with one-sided reach w scores
#: ``2 * ceil(w / b) * b + b`` keys for ``2w + 1`` useful ones: 64-key blocks score 576 per 513 for a 256 window
#: (89% useful) where b = w = 256 scored 768 (67%); measured on 2 AVX2 cores, the fused CPU kernel runs 64-row
#: blocks at 0.8x its full-length rate, so smaller blocks lose more to the kernel than they save (issue 18).
WINDOW_BLOCK = 64


def default_window_block(window_size: int) -> int:
    """The blocked backend's default block for a window of reach ``window_size``: ``min(window_size, 64)``."""
    return min(window_size, WINDOW_BLOCK)


# ------------------------------------------------------------------------------------------------------- window
class WindowPattern(Pattern):
    """Sliding window: query i sees key j iff ``|i - j| <= window_size`` (causal: ``0 <= i - j <= window_size``).

    With ``sink_tokens = s > 0`` (attention sinks, StreamingLLM: Xiao et al. 2023, arXiv:2309.17453) query i also
    sees keys ``j < s`` (causal: and ``j <= i``): the sinks are keys only, they do not attend to everything (unlike
    Longformer's global tokens). A sequence shorter than s simply has all its tokens as sinks (clamped per row).

    Block cover: query block ``r`` gathers key blocks ``r - R .. r + R`` (causal: ``r - R .. r``) with
    ``R = ceil(window_size / block_size)``, the fewest blocks that contain every allowed key of the block.
    Capped at the sequence (issue 19): the block is at most ``seq_len`` tokens (so a sequence shorter than the
    block is one unpadded block) and ``R`` at most ``num_blocks - 1`` (no slot that could only ever be empty):
    a window far larger than the sequence costs what full attention costs, and the pattern is unchanged.
    """

    def __init__(
        self, *, window_size: int, block_size: int, causal: bool, num_heads: int, sink_tokens: int = 0
    ) -> None:
        super().__init__(block_size=block_size, causal=causal, num_heads=num_heads)
        self.window_size = window_size
        self.sink_tokens = sink_tokens
        self._bands: dict[tuple[int, str], Tensor] = {}

    def _local(self, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        diff = q_idx - kv_idx
        if self.causal:
            return (diff >= 0) & (diff <= self.window_size)
        return diff.abs() <= self.window_size

    def with_block_size(self, block_size: int) -> "WindowPattern":
        return WindowPattern(window_size=self.window_size, block_size=block_size, causal=self.causal,
                             num_heads=self.num_heads, sink_tokens=self.sink_tokens)

    def mask_mod(self, seq_len: int, device: torch.device | str | None = None) -> MaskMod:
        sinks = self.sink_tokens

        def window_mask(b: Tensor | int, h: Tensor | int, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return self._local(q_idx, kv_idx) & _in_range(q_idx, kv_idx, seq_len)

        def window_sink_mask(b: Tensor | int, h: Tensor | int, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            sink = (kv_idx < sinks) & (kv_idx <= q_idx) if self.causal else kv_idx < sinks
            return (self._local(q_idx, kv_idx) | sink) & _in_range(q_idx, kv_idx, seq_len)

        return window_sink_mask if sinks else window_mask

    def block_size_for(self, seq_len: int) -> int:
        if self.window_size + 1 >= seq_len:
            return max(1, seq_len)  # the window holds the whole sequence: one block, one call, no padding
        return max(1, min(self.block_size, seq_len))

    def _reach(self, block_size: int, num_blocks: int) -> int:
        """Key blocks gathered on each side of a query block: ``ceil(w / b)``, at most ``num_blocks - 1``."""
        return max(0, min(math.ceil(self.window_size / block_size), num_blocks - 1))

    def _window_blocks(self, num_blocks: int, block_size: int, device: torch.device | str | None) -> Tensor:
        reach = self._reach(block_size, num_blocks)
        offsets = torch.arange(-reach, 1 if self.causal else reach + 1, device=device)
        blocks = torch.arange(num_blocks, device=device)[:, None] + offsets  # (nb, slots)
        blocks = torch.where((blocks >= 0) & (blocks < num_blocks), blocks, EMPTY)
        return blocks[None]  # (1, nb, slots)

    def _band(self, structure: BlockStructure) -> Tensor:
        """Bool ``(1, 1, b, slots * b)``: the window rule between a query block and its slot tokens. Because query
        block r gathers blocks ``r + offset``, ``i - j`` inside a chunk does not depend on r: one table serves every
        block (cached, and returned as the same tensor so the backend can cache what it derives from it)."""
        bs = structure.block_size
        slots = structure.key_blocks.shape[-1]
        device = structure.key_blocks.device
        key = (bs, slots, str(device))
        if key not in self._bands:
            reach = self._reach(bs, structure.num_blocks)
            q_rel = torch.arange(bs, device=device)[:, None]
            kv_rel = (torch.arange(slots, device=device) - reach)[:, None] * bs + torch.arange(bs, device=device)
            self._bands[key] = self._local(q_rel, kv_rel.flatten()[None, :])[None, None]
        return self._bands[key]

    def _interior(self, structure: BlockStructure, start: int, stop: int) -> bool:
        """Whether every slot of query-block rows ``start:stop`` is used and every query and key is < seq_len."""
        bs = structure.block_size
        reach = self._reach(bs, structure.num_blocks)
        first_key_block = structure.first_query_block + start - reach
        last_key_block = structure.first_query_block + stop - 1 + (0 if self.causal else reach)
        return first_key_block >= 0 and (last_key_block + 1) * bs <= structure.seq_len

    def contiguous_rows(self, structure: BlockStructure) -> tuple[int, int]:
        # query block r reads key blocks r - R .. r (+ R): one run of keys starting at (r - R) * b for every row
        # (the edge rows' runs pass the sequence's ends: the backend reads those slots as masked zero keys)
        if structure.extra_keys.numel():
            return 0, 0
        return 0, structure.num_query_blocks

    def chunk_mask(
        self, structure: BlockStructure, mod: MaskMod, is_global: Tensor, start: int, stop: int
    ) -> tuple[Tensor, Tensor]:
        tokens = structure.key_tokens(start, stop)  # (1, g, kt)
        if self.sink_tokens and (structure.extra_keys.numel() or bool(
                ((tokens >= 0) & (tokens < self.sink_tokens)).any())):
            # the band over the window's slots, or a sink key anywhere (inside a gathered block or appended)
            q_idx = _chunk_queries(structure, start, stop)
            band = F.pad(self._band(structure), (0, structure.extra_keys.numel()))  # (1, 1, b, kt)
            sink = ((tokens >= 0) & (tokens < self.sink_tokens))[:, :, None, :]
            if self.causal:
                sink = sink & (tokens[:, :, None, :] <= q_idx[None, :, :, None])
            return tokens, (band | sink) & _valid(structure, q_idx, tokens)
        if self._interior(structure, start, stop):
            return tokens, self._band(structure)
        q_idx = _chunk_queries(structure, start, stop)
        return tokens, self._band(structure) & _valid(structure, q_idx, tokens)

    def structure(self, seq_len: int, device: torch.device | str | None = None) -> BlockStructure:
        bs = self.block_size_for(seq_len)
        nb = math.ceil(seq_len / bs)
        empty = torch.zeros(0, dtype=torch.long, device=device)
        sinks = torch.arange(min(self.sink_tokens, seq_len), device=device)  # appended to every block's keys
        return BlockStructure(seq_len, bs, 0, self._window_blocks(nb, bs, device), sinks, empty)


# --------------------------------------------------------------------------------------------------- longformer
class LongformerPattern(WindowPattern):
    """Sliding window plus global tokens (Beltagy et al. 2020): ``|i - j| <= w`` or i global or j global.

    ``global_tokens`` is a count of leading tokens or a tuple of explicit indices. The window reach is one-sided,
    exactly as in :class:`WindowPattern` (HF's ``attention_window=2w`` corresponds to ``window_size=w``). Global rows
    are computed densely (O(g * n)); global columns are the structure's extra keys (a second call per group in the
    blocked backend, merged by log-sum-exp). ``block_size`` None = :func:`default_window_block`.
    """

    def __init__(
        self, *, window_size: int, global_tokens: int | tuple[int, ...], causal: bool, num_heads: int,
        block_size: int | None = None,
    ) -> None:
        block = default_window_block(window_size) if block_size is None else block_size
        super().__init__(window_size=window_size, block_size=block, causal=causal, num_heads=num_heads)
        self.global_tokens = global_tokens

    def with_block_size(self, block_size: int) -> "LongformerPattern":
        return LongformerPattern(window_size=self.window_size, global_tokens=self.global_tokens, causal=self.causal,
                                 num_heads=self.num_heads, block_size=block_size)

    def global_indices(self, seq_len: int, device: torch.device | str | None = None) -> Tensor:
        """Sorted long ``(g,)`` global token indices for length ``seq_len``.

        A count ``g`` makes the first ``min(g, seq_len)`` tokens global (a sequence shorter than the count, such as a
        short packed document, is all global tokens).

        Raises:
            ValueError: an explicit index that does not fit ``seq_len``.
        """
        if isinstance(self.global_tokens, int):
            return torch.arange(min(self.global_tokens, seq_len), device=device)
        bad = [i for i in self.global_tokens if i >= seq_len]
        if bad:
            raise ValueError(
                f"global_tokens index {bad[0]} is out of range for seq_len={seq_len}; allowed: 0 <= index < seq_len"
            )
        return torch.tensor(sorted(self.global_tokens), dtype=torch.long, device=device)

    def mask_mod(self, seq_len: int, device: torch.device | str | None = None) -> MaskMod:
        is_global = torch.zeros(seq_len + 1, dtype=torch.bool, device=device)  # last entry: out-of-range indices
        is_global[self.global_indices(seq_len, device)] = True

        def longformer_mask(b: Tensor | int, h: Tensor | int, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            inside = _in_range(q_idx, kv_idx, seq_len)
            q_glob = is_global[torch.where(inside, q_idx, seq_len)]
            kv_glob = is_global[torch.where(inside, kv_idx, seq_len)]
            visible = (q_idx - kv_idx >= 0) if self.causal else True
            return inside & (self._local(q_idx, kv_idx) | ((q_glob | kv_glob) & visible))

        return longformer_mask

    def chunk_mask(
        self, structure: BlockStructure, mod: MaskMod, is_global: Tensor, start: int, stop: int
    ) -> tuple[Tensor, Tensor]:
        tokens = structure.key_tokens(start, stop)  # (1, g, slots * b + e)
        q_idx = _chunk_queries(structure, start, stop)  # (g, b)
        if not structure.extra_keys.numel() and not bool(is_global[tokens.clamp_min(0)].any()) and not bool(
                is_global[q_idx.clamp_max(structure.padded_len - 1)].any()):
            # no global key among the slots and no global row (the slots-only cover of the blocked backend away from
            # the global tokens): the plain window's rule, so interior groups share one band
            return WindowPattern.chunk_mask(self, structure, mod, is_global, start, stop)
        window_keys = structure.key_blocks.shape[-1] * structure.block_size
        # window part: the band, or a global key inside the gathered blocks; extra part: uncovered global keys
        key_global = torch.ones_like(tokens, dtype=torch.bool)
        key_global[..., :window_keys] = is_global[tokens[..., :window_keys].clamp_min(0)]
        band = F.pad(self._band(structure), (0, tokens.shape[-1] - window_keys))  # (1, 1, b, kt)
        allowed = band | key_global[:, :, None, :]
        if self.causal:
            allowed = allowed & (tokens[:, :, None, :] <= q_idx[None, :, :, None])
        allowed = allowed & _valid(structure, q_idx, tokens)
        if structure.global_queries.numel():
            allowed = allowed & ~is_global[q_idx][None, :, :, None]
        return tokens, allowed

    def structure(self, seq_len: int, device: torch.device | str | None = None) -> BlockStructure:
        bs = self.block_size_for(seq_len)
        nb = math.ceil(seq_len / bs)
        glob = self.global_indices(seq_len, device)
        return BlockStructure(seq_len, bs, 0, self._window_blocks(nb, bs, device), glob, glob)


# ------------------------------------------------------------------------------------------------------ bigbird
_MASK32 = 0xFFFFFFFF


def _hash32(x: Tensor) -> Tensor:
    """A 32-bit integer mixer (xorshift-multiply rounds) on int64 tensors holding values in ``[0, 2^32)``; the
    multiplier is below 2^31, so no product overflows int64."""
    for _ in range(2):
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    return x ^ (x >> 16)


def _mix_seed(seed: int, head: int, draw: int) -> int:
    """A 32-bit stream key that is a pure function of ``(seed, head, draw)`` (splitmix-style mixing)."""
    value = 0
    for part in (seed, head, draw):
        value = (value ^ (part & 0xFFFFFFFFFFFFFFFF)) * 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 31
    return value & _MASK32


def _draw_random_blocks(
    stream: int, rows: Tensor, first_candidate: Tensor, num_candidates: Tensor, gap_start: Tensor, gap_len: Tensor,
    count: int,
) -> Tensor:
    """``count`` distinct candidate blocks per row (fewer rows with fewer candidates take all; ``EMPTY`` pads).

    Row ``r``'s candidates are ``first_candidate[r] + u`` for ``u`` in ``[0, num_candidates[r])``, skipping the
    ``gap_len[r]`` blocks from ``gap_start[r]`` on (the non-causal window). The draw is Floyd's algorithm for a
    uniform subset, fed by :func:`_hash32` of ``(stream, row, step)``: a pure function of the row, so row r's
    blocks do not depend on how many rows follow. O(rows * count^2) time, O(rows * count) memory.
    """
    picks: list[Tensor] = []
    c = num_candidates
    for step in range(count):
        top = c - count + step  # Floyd: draw t in [0, top], take top itself if t was drawn before
        key = _hash32((_hash32((rows * 0x9E37 + step) & _MASK32) ^ stream) & _MASK32)
        t = key % (top.clamp_min(0) + 1)
        if picks:
            seen = torch.stack(picks, dim=-1)
            t = torch.where((seen == t[:, None]).any(-1), top, t)
        picks.append(t)
    if not picks:
        return torch.zeros(rows.numel(), 0, dtype=torch.long, device=rows.device)
    u = torch.stack(picks, dim=-1)  # (rows, count)
    # rows with at most `count` candidates take all of them (0 .. c - 1), the rest of the slots are empty
    all_of_them = torch.arange(count, device=rows.device)[None, :].expand_as(u)
    u = torch.where((c <= count)[:, None], all_of_them, u)
    used = u < c[:, None]
    blocks = first_candidate[:, None] + u
    blocks = torch.where(blocks >= gap_start[:, None], blocks + gap_len[:, None], blocks)
    blocks = torch.where(used, blocks, EMPTY)
    return blocks.sort(dim=-1).values  # EMPTY (-1) first; callers only test membership


class BigBirdPattern(Pattern):
    """BigBird block-sparse pattern (Zaheer et al. 2020, arXiv:2007.14062), per head.

    Blocks of ``block_size`` tokens; ``nb = ceil(n / block_size)``. The first ``num_global_blocks`` blocks are global:
    they attend to every block and every block attends to them. Every other query block ``r`` sees its window blocks
    ``r - num_window_blocks // 2 .. r + num_window_blocks // 2`` (causal: only ``<= r``), the global blocks, and
    ``num_random_blocks`` random blocks drawn (per head) from the blocks that are neither window nor global (causal:
    only earlier blocks). A row with fewer candidates takes all of them (:meth:`effective_random_blocks`).

    The plan is held as a table ``(heads, nb, num_random_blocks)`` of random block ids (:meth:`random_blocks`), never
    as a dense ``(nb, nb)`` layout: the plan, the block cover and ``mask_mod`` cost O(nb * (w + r + g)) memory and
    time. Row r's random blocks are drawn by :func:`_draw_random_blocks`, a pure function of
    ``(seed, head, draw, r)`` and of the row's candidate range. Causal, the candidates of row r are blocks
    ``num_global_blocks .. r - num_window_blocks // 2 - 1``, so the plan of row r does not depend on how many blocks
    follow: a causal output at t depends on tokens ``0..t`` only (prefix consistent; incremental decoding can draw
    row r when it starts). Non-causal, the candidates run to the last block, so the plan of a row depends on the
    total number of blocks (as in the paper). ``draw`` stays 0 unless the module is asked to redraw. Causal:
    ``j <= i`` on top of the block layout.
    """

    per_head = True

    def __init__(
        self,
        *,
        block_size: int,
        num_random_blocks: int,
        num_global_blocks: int,
        num_window_blocks: int,
        seed: int,
        causal: bool,
        num_heads: int,
    ) -> None:
        super().__init__(block_size=block_size, causal=causal, num_heads=num_heads)
        self.num_random_blocks = num_random_blocks
        self.num_global_blocks = num_global_blocks
        self.num_window_blocks = num_window_blocks
        self.seed = seed
        #: Which draw of the random plan is in effect (0 unless the owning module redraws).
        self.draw = 0
        self._cache: dict[tuple, Tensor] = {}

    def random_blocks(self, num_blocks: int, device: torch.device | str | None = None, rows: Tensor | None = None) -> Tensor:
        """Long ``(heads, rows, num_random_blocks)``: the random key blocks of query blocks ``rows`` (default all
        ``num_blocks``), ascending, ``EMPTY`` for unused slots (global rows, rows with fewer candidates)."""
        if rows is None:
            key = (num_blocks, self.draw, str(device))
            if key not in self._cache:
                if len(self._cache) >= 8:  # redraws would otherwise grow it without bound
                    self._cache.clear()
                self._cache[key] = self._draw(num_blocks, torch.arange(num_blocks, device=device))
            return self._cache[key]
        return self._draw(num_blocks, rows.to(device))

    def _draw(self, nb: int, rows: Tensor) -> Tensor:
        g, half = self.num_global_blocks, self.num_window_blocks // 2
        zeros = torch.zeros_like(rows)
        if self.causal:
            first, count = torch.full_like(rows, g), (rows - half - g).clamp_min(0)
            gap_start, gap_len = torch.full_like(rows, nb + 1), zeros
        else:
            lo, hi = (rows - half).clamp(g, nb), (rows + half + 1).clamp(g, nb)  # the window inside [g, nb)
            first, gap_start, gap_len = torch.full_like(rows, g), lo, (hi - lo).clamp_min(0)
            count = (nb - g) - gap_len
        count = torch.where(rows < g, zeros, count.clamp_min(0))
        return torch.stack([
            _draw_random_blocks(_mix_seed(self.seed, head, self.draw), rows, first, count, gap_start, gap_len,
                                self.num_random_blocks)
            for head in range(self.num_heads)
        ])

    def layout(self, seq_len: int, device: torch.device | str | None = None) -> Tensor:
        """Bool ``(heads, nb, nb)``: which key blocks each query block sees (before causal/length masking).

        Dense in blocks (O(nb^2)): for tests and inspection only; the backends use :meth:`random_blocks`.
        """
        nb = math.ceil(seq_len / self.block_size)
        blk = torch.arange(nb, device=device)
        diff = blk[None, :] - blk[:, None]
        half = self.num_window_blocks // 2
        window = (diff >= -half) & (diff <= 0 if self.causal else diff <= half)
        glob = blk < self.num_global_blocks
        table = self.random_blocks(nb, device)  # (h, nb, r)
        random = torch.zeros(self.num_heads, nb, nb + 1, dtype=torch.bool, device=device)
        random.scatter_(-1, torch.where(table >= 0, table, nb), True)
        return window | glob[None, :] | glob[:, None] | random[..., :nb]

    def effective_random_blocks(self, seq_len: int) -> Tensor:
        """Long ``(heads, nb)``: random blocks each query block really got (0 for global rows)."""
        return (self.random_blocks(math.ceil(seq_len / self.block_size)) >= 0).sum(-1)

    def _block_rule(self, table: Tensor, h: Tensor | int, q_blk: Tensor, kv_blk: Tensor) -> Tensor:
        """Whether key block ``kv_blk`` is in query block ``q_blk``'s row (window, global or random; block level)."""
        half, g = self.num_window_blocks // 2, self.num_global_blocks
        diff = kv_blk - q_blk
        allowed = (diff >= -half) & ((diff <= 0) if self.causal else (diff <= half))
        allowed = allowed | (kv_blk < g) | (q_blk < g)
        nb, slots = table.shape[-2], table.shape[-1]
        flat = table.reshape(-1)
        row = (h * nb + q_blk) * slots
        for slot in range(slots):  # unrolled, one 1-D lookup each: scalar-friendly for FlexAttention's vmap
            allowed = allowed | (flat[row + slot] == kv_blk)
        return allowed

    def mask_mod(self, seq_len: int, device: torch.device | str | None = None) -> MaskMod:
        nb, bs = math.ceil(seq_len / self.block_size), self.block_size
        table = self.random_blocks(nb, device)

        def bigbird_mask(b: Tensor | int, h: Tensor | int, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            inside = _in_range(q_idx, kv_idx, seq_len)
            q_blk = (q_idx // bs).clamp(0, nb - 1)
            kv_blk = (kv_idx // bs).clamp(0, nb - 1)
            allowed = inside & self._block_rule(table, h, q_blk, kv_blk)
            return allowed & (kv_idx <= q_idx) if self.causal else allowed

        return bigbird_mask

    def row_blocks(self, num_blocks: int, rows: Tensor, device: torch.device | str | None = None) -> Tensor:
        """Long ``(heads, len(rows), slots)``: every key block of non-global query blocks ``rows`` (window, global
        and random, causal: none after the row), ascending then ``EMPTY``; slots = window + global + random."""
        g, half = self.num_global_blocks, self.num_window_blocks // 2
        rows = rows.to(device)
        offsets = torch.arange(-half, 1 if self.causal else half + 1, device=device)
        window = rows[:, None] + offsets  # (q, w)
        window = torch.where((window >= g) & (window < num_blocks), window, EMPTY)  # global ones come below
        glob = torch.arange(min(g, num_blocks), device=device).expand(rows.numel(), -1)
        random = self.random_blocks(num_blocks, device, rows=rows)  # (h, q, r)
        h = self.num_heads
        blocks = torch.cat([window.expand(h, -1, -1), glob.expand(h, -1, -1), random], dim=-1)
        big = num_blocks + 1  # empty slots sort last
        ordered = torch.where(blocks >= 0, blocks, big).sort(dim=-1).values
        return ordered.masked_fill_(ordered >= big, EMPTY)

    def chunk_mask(
        self, structure: BlockStructure, mod: MaskMod, is_global: Tensor, start: int, stop: int
    ) -> tuple[Tensor, Tensor]:
        # every gathered block is in the row's layout, so only slots, length and causality remain
        tokens = structure.key_tokens(start, stop)  # (h, g, kt)
        q_idx = _chunk_queries(structure, start, stop)  # (g, b)
        allowed = _valid(structure, q_idx, tokens)
        if self.causal:
            allowed = allowed & (tokens[:, :, None, :] <= q_idx[None, :, :, None])
        return tokens, allowed

    def structure(self, seq_len: int, device: torch.device | str | None = None) -> BlockStructure:
        nb = math.ceil(seq_len / self.block_size)
        first = min(self.num_global_blocks, nb)
        rows = torch.arange(first, nb, device=device)
        blocks = self.row_blocks(nb, rows, device)  # (h, q, slots), rows = first .. nb - 1
        slots = int((blocks >= 0).sum(-1).max()) if blocks.numel() else 0
        key_blocks = blocks[..., :slots].contiguous()
        glob = torch.arange(min(first * self.block_size, seq_len), device=device)
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return BlockStructure(seq_len, self.block_size, first, key_blocks, empty, glob)
