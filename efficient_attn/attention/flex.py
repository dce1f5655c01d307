"""The ``flex`` backend: compiled FlexAttention over a pattern's ``mask_mod``, with cached block masks.

FlexAttention (Dong et al. 2024, "Flex Attention: A Programming Model for Generating Optimized Attention Kernels",
arXiv:2412.05496) takes the pattern as a predicate ``mask_mod(b, h, q_idx, kv_idx) -> bool`` and a ``BlockMask`` that
lists, per query block of 128 rows, the key blocks that hold any allowed pair ("partial" blocks evaluate the
predicate, "full" blocks skip it). Blocks with no allowed pair are never touched, so the cost is
O(allowed blocks * 128^2 * head_dim) time and O(n * head_dim) memory: no ``n x n`` tensor exists at any point.

Rules this module keeps (measured on torch 2.13 CPU, see the tests):

* ``flex_attention`` runs only compiled (eager FlexAttention materialises the scores). Both compiled functions are
  module-level singletons created on first use, never at import.
* Block masks come from ``torch.compile(create_block_mask)``: the plain call builds a dense ``n x n`` mask first.
* A block mask is built once per (pattern, sequence length, device) and cached in its :class:`FlexRunner`.
* Key padding: the pattern's ``mask_mod`` is ANDed with ``key_is_real(b, kv_idx)``. That predicate depends on the
  batch, so the block mask gets a batch dimension: it is derived per call from the cached block matrices of the
  pattern at block level only, O(batch * heads * (n / 128)^2) booleans (16K tokens: 16K per batch row), no
  recompilation of ``create_block_mask``: key blocks that are all padding are dropped, "full" blocks that hold some
  padding become "partial". The compiled kernel is specialised once more for the batch-shaped block mask.
* A query with no allowed key yields zeros (FlexAttention's own behaviour for an empty row; tested).
* Grouped key/value heads run with ``enable_gqa=True`` (k and v keep their ``kv_heads``); ALiBi is a ``score_mod``
  (the caller keeps one closure per device so the compiled kernel is reused).
* Packed documents (:meth:`FlexRunner.packed`): the pattern's ``mask_mod`` AND "same document" (AND the key padding),
  built per call by the compiled ``create_block_mask`` with a batch dimension (the document layout is data); only
  for patterns that are translation invariant (full, window), where that equals each document alone.
* On CPU (torch 2.13) FlexAttention is forward-only (its backward raises ``NotImplementedError``) and supports
  float32, float16 and bfloat16 only; :func:`unavailable_reason` says so before anything runs.
* Compilation costs 5-15 s per new shape on a 2-core CPU; :meth:`FlexRunner.warmup` lets a harness pay it outside
  the timed region and returns how long it took.
* Dynamo's recompile limit (8 per function by default) would silently fall back to eager FlexAttention after eight
  shapes; every call here raises that limit and turns hitting it into an error instead.

Shapes: q, k, v are ``(batch, heads, seq, head_dim)``; ``key_padding_mask`` is bool ``(batch, seq)``, True = real.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Hashable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

#: ``mask_mod(b, h, q_idx, kv_idx) -> bool Tensor``.
MaskMod = Callable[[Tensor | int, Tensor | int, Tensor, Tensor], Tensor]
#: ``factory(seq_len, device) -> mask_mod`` (a pattern's ``mask_mod`` method).
MaskModFactory = Callable[[int, torch.device], MaskMod]

#: FlexAttention's block size (rows and columns) used for every block mask here.
FLEX_BLOCK = 128
#: Dtypes FlexAttention's CPU kernel accepts (torch 2.13).
CPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Why backward cannot run on CPU (the harness records it as the ``unsupported`` note).
CPU_BACKWARD_REASON = (
    "FlexAttention on CPU is forward-only in torch 2.13 (its backward raises NotImplementedError); "
    "use backend 'torch' (pattern variants) or 'sdpa' (full) when gradients are needed"
)
#: Dynamo recompile limit used for the compiled singletons (one compile per shape and pattern).
RECOMPILE_LIMIT = 512


def unavailable_reason(device: torch.device | str, needs_grad: bool, dtype: torch.dtype | None = None) -> str | None:
    """Why the ``flex`` backend cannot run on ``device`` (None when it can).

    Args:
        device: where q, k, v live.
        needs_grad: whether a backward pass is needed.
        dtype: dtype of q, k, v when known (CPU accepts float32, float16, bfloat16 only).
    """
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        return f"FlexAttention runs on cpu and cuda only, not on {device.type!r}"
    if device.type == "cpu":
        if needs_grad:
            return CPU_BACKWARD_REASON
        if dtype is not None and dtype not in CPU_DTYPES:
            return (
                f"FlexAttention on CPU supports float32, float16 and bfloat16 only, got {dtype} "
                "(use backend 'naive' or 'torch' for float64)"
            )
    return None


def _dynamo_limits() -> contextlib.AbstractContextManager:
    # A fresh patch object per call: raise the recompile limit, and fail loudly rather than run eager flex.
    import torch._dynamo

    return torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True)


@functools.cache
def compiled_flex_attention() -> Callable[..., Tensor]:
    """``torch.compile(flex_attention)``, created on first use (static shapes: one kernel per shape)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.cache
def compiled_create_block_mask() -> Callable[..., "BlockMask"]:  # noqa: F821
    """``torch.compile(create_block_mask)``, created on first use; never the plain call (it builds n x n).

    Compiled without SIMD (``cpp.simdlen=1``): torch 2.13's vectorised CPU code for some mask_mods does not compile
    (BigBird with a single block: "operands to ?: have different types VecMask<int> and VecMask<float>"), and the
    mask is built once per length, so the scalar loop costs little (16K tokens: about 1 s on this machine).
    """
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask, dynamic=False, options={"cpp.simdlen": 1})


# ------------------------------------------------------------------------------------------- block-level helpers
def ordered_to_dense(num_blocks: Tensor, indices: Tensor, num_kv_blocks: int) -> Tensor:
    """Block lists -> bool ``(..., q_blocks, num_kv_blocks)``.

    ``num_blocks`` is ``(..., q_blocks)``, ``indices`` ``(..., q_blocks, slots)`` (the first ``num_blocks`` are used).
    """
    slots = torch.arange(indices.shape[-1], device=indices.device)
    used = slots < num_blocks[..., None]  # (..., q_blocks, s)
    target = torch.where(used, indices.long(), num_kv_blocks)  # unused slots go to a spare column
    dense = torch.zeros(*indices.shape[:-1], num_kv_blocks + 1, dtype=torch.bool, device=indices.device)
    dense.scatter_(-1, target, True)
    return dense[..., :num_kv_blocks]


def dense_to_ordered(dense: Tensor) -> tuple[Tensor, Tensor]:
    """Bool ``(..., q_blocks, kv_blocks)`` -> (int32 counts ``(..., q_blocks)``, int32 ascending indices first)."""
    num = dense.sum(-1, dtype=torch.int32)
    order = torch.argsort((~dense).to(torch.uint8), dim=-1, stable=True).to(torch.int32)
    return num, order


@dataclass
class _Entry:
    """Cached per (length, device): the pattern's block mask, its mask_mod, and its block matrices (lazy)."""

    mask_mod: MaskMod
    block_mask: "BlockMask"  # noqa: F821
    partial: Tensor | None = None  # bool (heads or 1, q_blocks, kv_blocks)
    full: Tensor | None = None


class FlexRunner:
    """Compiled FlexAttention for one pattern; block masks cached per (sequence length, device).

    Args:
        mask_mod: ``factory(seq_len, device) -> mask_mod``; the pattern's single definition.
        mask_heads: heads of the pattern: 1 when every head shares it, ``num_heads`` for per-head patterns.
        max_cached: lengths kept per runner (least recently used dropped first).

    Attributes:
        hits, misses: block-mask cache statistics (a miss runs the compiled ``create_block_mask``).

    Every method takes an optional ``tag``: a hashable that versions the pattern (BigBird's random draw), part of
    the cache key so a redrawn pattern never reuses a stale block mask.
    """

    def __init__(self, mask_mod: MaskModFactory, *, mask_heads: int = 1, max_cached: int = 8) -> None:
        if mask_heads <= 0 or max_cached <= 0:
            raise ValueError(f"mask_heads and max_cached must be positive, got {mask_heads} and {max_cached}")
        self.mask_mod_factory = mask_mod
        self.mask_heads = mask_heads
        self.max_cached = max_cached
        self.hits = 0
        self.misses = 0
        self._cache: OrderedDict[tuple[int, str, Hashable], _Entry] = OrderedDict()

    # ------------------------------------------------------------------------------------------------ masks
    def _entry(self, seq_len: int, device: torch.device, tag: Hashable) -> _Entry:
        key = (seq_len, str(device), tag)
        entry = self._cache.get(key)
        if entry is not None:
            self.hits += 1
            self._cache.move_to_end(key)
            return entry
        self.misses += 1
        mod = self.mask_mod_factory(seq_len, device)
        heads = None if self.mask_heads == 1 else self.mask_heads
        with _dynamo_limits():
            block_mask = compiled_create_block_mask()(mod, None, heads, seq_len, seq_len, device=device)
        entry = _Entry(mod, block_mask)
        self._cache[key] = entry
        while len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)
        return entry

    def block_mask(self, seq_len: int, device: torch.device | str, tag: Hashable = None) -> "BlockMask":  # noqa: F821
        """The pattern's ``BlockMask`` for ``seq_len`` on ``device`` (no batch dimension; cached)."""
        return self._entry(seq_len, torch.device(device), tag).block_mask

    def padded_block_mask(self, key_padding_mask: Tensor, tag: Hashable = None) -> "BlockMask":  # noqa: F821
        """The pattern AND ``key_is_real`` as a batch-shaped ``BlockMask`` (see the module docstring for the cost)."""
        from torch.nn.attention.flex_attention import BlockMask, and_masks

        batch, seq_len = key_padding_mask.shape
        entry = self._entry(seq_len, key_padding_mask.device, tag)
        nbk = math.ceil(seq_len / FLEX_BLOCK)
        if entry.partial is None:
            bm = entry.block_mask
            entry.partial = ordered_to_dense(bm.kv_num_blocks[0], bm.kv_indices[0], nbk)
            entry.full = (
                ordered_to_dense(bm.full_kv_num_blocks[0], bm.full_kv_indices[0], nbk)
                if bm.full_kv_num_blocks is not None
                else torch.zeros_like(entry.partial)
            )
        real = F.pad(key_padding_mask, (0, nbk * FLEX_BLOCK - seq_len), value=False)  # (b, nbk * 128)
        real_per_block = rearrange(real, "b (k t) -> b k t", t=FLEX_BLOCK).sum(-1)  # (b, nbk)
        in_range = (seq_len - torch.arange(nbk, device=real.device) * FLEX_BLOCK).clamp(max=FLEX_BLOCK)  # (nbk,)
        some_real = rearrange(real_per_block > 0, "b k -> b 1 1 k")
        all_real = rearrange(real_per_block == in_range, "b k -> b 1 1 k")
        full = entry.full[None] & all_real  # (b, hp, q_blocks, kv_blocks)
        partial = (entry.partial[None] | entry.full[None]) & some_real & ~full
        padding_mod = key_is_real_mod(real)
        return BlockMask.from_kv_blocks(
            *dense_to_ordered(partial),
            *dense_to_ordered(full),
            BLOCK_SIZE=FLEX_BLOCK,
            mask_mod=and_masks(entry.mask_mod, padding_mod),
            seq_lengths=(seq_len, seq_len),
        )

    # ------------------------------------------------------------------------------------------------- run
    def __call__(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None, tag: Hashable = None,
        score_mod: Callable | None = None,
    ) -> Tensor:
        """Attention over the pattern: q ``(batch, heads, seq, head_dim)``, k, v ``(batch, kv_heads, seq, head_dim)``
        -> q's shape. ``score_mod`` (FlexAttention's, e.g. ALiBi) is applied to the scaled scores.

        Raises:
            BackendUnavailableError: a ``TorchDispatchMode`` (``StorageTracker``, ``FlopCounterMode``,
                ``FakeTensorMode``) is active: dynamo does not compile under one, and eager FlexAttention would build
                the ``n x n`` scores. Measure flex's memory from the allocator (``torch.profiler`` with
                ``profile_memory=True``) or the process RSS instead.
        """
        _refuse_dispatch_modes()
        if key_padding_mask is None:
            block_mask = self.block_mask(q.shape[-2], q.device, tag)
        else:
            block_mask = self.padded_block_mask(key_padding_mask, tag)
        return self._run(q, k, v, block_mask, score_mod)

    def _run(self, q: Tensor, k: Tensor, v: Tensor, block_mask: "BlockMask", score_mod: Callable | None) -> Tensor:  # noqa: F821
        return run(q, k, v, block_mask, score_mod)

    def packed(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, document_ids: Tensor,
        score_mod: Callable | None = None,
    ) -> Tensor:
        """Attention over the pattern restricted to each packed document (see the module docstring); shapes as in
        :meth:`__call__`, ``document_ids`` int ``(batch, seq)``. The block mask is built for this call (O(batch *
        heads * (n / 128)^2) booleans plus the compiled predicate pass), never cached."""
        from efficient_attn.attention.packing import same_document
        from torch.nn.attention.flex_attention import and_masks

        _refuse_dispatch_modes()
        batch, seq_len = document_ids.shape
        mods = [self.mask_mod_factory(seq_len, q.device), same_document(document_ids)]
        if key_padding_mask is not None:
            mods.append(key_is_real_mod(key_padding_mask))
        heads = None if self.mask_heads == 1 else self.mask_heads
        with _dynamo_limits():
            block_mask = compiled_create_block_mask()(
                and_masks(*mods), batch, heads, seq_len, seq_len, device=q.device
            )
        return self._run(q, k, v, block_mask, score_mod)

    def warmup(
        self,
        *,
        batch: int,
        heads: int,
        seq_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        padded: bool = False,
        tag: Hashable = None,
    ) -> float:
        """Compile (and cache the block mask) for one input shape; returns the seconds it took.

        Call it before timing: the first call at a new shape compiles ``create_block_mask`` and the kernel.
        """
        device = torch.device(device)
        q = torch.zeros(batch, heads, seq_len, head_dim, dtype=dtype, device=device)
        kpm = torch.ones(batch, seq_len, dtype=torch.bool, device=device) if padded else None
        start = time.perf_counter()
        with torch.no_grad():
            self(q, q, q, kpm, tag)
        return time.perf_counter() - start


def run(
    q: Tensor, k: Tensor, v: Tensor, block_mask: "BlockMask", score_mod: Callable | None = None  # noqa: F821
) -> Tensor:
    """The compiled FlexAttention over a ready ``block_mask`` (its ``mask_mod`` included), under this module's rules.

    q ``(batch, heads, seq, head_dim)``, k, v ``(batch, kv_heads, seq, head_dim)`` (``enable_gqa`` when the head
    counts differ) -> q's shape. For callers whose block mask is data built per call (MoBA's selection); patterns use
    :class:`FlexRunner`. Raises as :meth:`FlexRunner.__call__` under a dispatch mode.
    """
    _refuse_dispatch_modes()
    # FlexAttention's CPU check looks at requires_grad even under no_grad
    if q.device.type == "cpu" and not torch.is_grad_enabled():
        q, k, v = q.detach(), k.detach(), v.detach()
    with _dynamo_limits():
        return compiled_flex_attention()(
            q, k, v, block_mask=block_mask, score_mod=score_mod, enable_gqa=k.shape[1] != q.shape[1]
        )


def _refuse_dispatch_modes() -> None:
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    from efficient_attn.errors import BackendUnavailableError

    mode = _get_current_dispatch_mode()
    if mode is not None:
        raise BackendUnavailableError(
            f"backend 'flex' cannot run under the dispatch mode {type(mode).__name__}: torch.compile is skipped there "
            "and eager FlexAttention materialises the n x n scores; measure it outside the mode (allocator profiler "
            "or RSS for memory, the pattern's analytic count for FLOPs)"
        )


def key_is_real_mod(real: Tensor) -> MaskMod:
    """``mask_mod`` that is True where the key is a real token; ``real`` is bool ``(batch, padded_len)``."""

    def key_is_real(b: Tensor | int, h: Tensor | int, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return real[b, kv_idx]

    return key_is_real


def check_supported(q: Tensor, dropout_p: float) -> None:
    """Raise the reason when q cannot run on ``flex`` at all (dtype on CPU, dropout).

    Raises:
        BackendUnavailableError: q's dtype has no FlexAttention kernel on its device.
        ValueError: attention dropout is active (FlexAttention has none).
    """
    from efficient_attn.errors import BackendUnavailableError

    reason = unavailable_reason(q.device, False, q.dtype)
    if reason is not None:
        raise BackendUnavailableError(f"backend 'flex': {reason}")
    if dropout_p > 0.0:
        raise ValueError(
            f"backend 'flex' has no attention dropout (dropout={dropout_p} in training mode); "
            "use eval(), dropout=0.0, or backend 'torch' / 'sdpa'"
        )
