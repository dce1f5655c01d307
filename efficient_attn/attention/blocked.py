"""Blocked sparse attention in pure PyTorch: forward and backward without any n x n tensor.

The pattern's :class:`~efficient_attn.attention.patterns.BlockStructure` says which keys each query block needs.
Query blocks are processed in groups; for a group we gather its key blocks with one flattened ``index_select`` (whole
blocks of ``block_size * head_dim``), build the small ``(group, block, keys)`` mask from the pattern's ``mask_mod``
and the key padding mask, and run one fused attention call with the groups folded into the batch dimension. Where
every query block of a group reads consecutive keys one block after the previous block's (a sliding window, batch 1:
``Pattern.contiguous_rows``), the keys are instead one overlapping strided view of k and v: nothing is copied in the
sequence's interior, the rows at either edge read a zero-padded copy of just their span (their mask excludes the
padding), and such calls take more rows. Gathered calls are bounded in key rows (:data:`GATHERED_ROWS_PER_CALL`),
which bounds the forward's peak beyond its output; a short input is one call (the fewest calls where per-call
overhead matters most). The structure's extra keys (attention sinks, Longformer's global columns) are a second call
per group over just those keys, merged with the slots' result by log-sum-exp (:func:`merge_by_lse`), so the window
part keeps its strided view. Dense global rows (BigBird's global blocks, Longformer's global tokens) are further
calls over all keys, O(g * n).

Outputs and gradients are held token-major (:func:`_token_major`: ``(batch, seq, heads, d)`` storage behind the
``(batch, heads, seq, d)`` view), the layout the fused CPU kernel writes, so a block's rows copy as one run, and the
overlapping windows' key gradients are added with one strided add per slot.

Two executions share those calls:

* :func:`sparse_attention` (no dropout): a custom ``torch.autograd.Function`` that keeps only q, k, v, the output and
  the per-row log-sum-exp, and recomputes each chunk in backward (the FlashAttention recipe, Dao et al. 2022,
  arXiv:2205.14135, applied per chunk). On CPU each chunk runs the fused CPU flash kernels
  (``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward); elsewhere an exact matmul version.
  Memory: O(n * d) plus one chunk's scores.
* :func:`sparse_attention_autograd`: the same chunks through ``F.scaled_dot_product_attention`` and plain autograd;
  used when attention dropout is on (dropout cannot be replayed in a recomputing backward).

Grouped key/value heads (k, v with ``kv_heads < heads``) are never repeated: a pattern shared by all heads gathers
each key block once per key/value head (so once for the whole group of query heads that share it), and the fused
kernel runs the group's query heads against it; a per-head pattern (BigBird) gathers each query head's own blocks
from its shared key/value head. The exact matmul version folds a group's query heads into the rows of one product.

ALiBi (``slopes`` given): the bias ``-slope_h * |i - j|`` is computed per chunk from the chunk's query positions and
gathered key indices and added to the chunk's mask bias; nothing of size n x n exists.

:func:`dense_chunked_attention` is the same machinery for full attention (every key, or the causal prefix, of a
chunk of query rows, sliced rather than gathered): the ``torch`` backend of ``full``.

Shapes: q ``(batch, heads, padded_len, head_dim)``, k and v ``(batch, kv_heads, padded_len, head_dim)``; the key
padding mask bool ``(batch, padded_len)``. A query with no allowed key yields zeros and zero gradients.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.autograd.function import once_differentiable

from efficient_attn.attention.functional import fold_query_groups, grouped_matmul
from efficient_attn.attention.positions import alibi_bias
from efficient_attn.attention.patterns import (
    BlockStructure,
    MaskMod,
    Pattern,
    global_query_lookup,
    global_rows_mask,
)

__all__ = ["BlockedPlan", "dense_chunked_attention", "sparse_attention", "sparse_attention_autograd"]

#: Query rows per fused call in the block-wise part (several query blocks are folded into one call).
DEFAULT_ROWS_PER_CALL = 1024
#: Gathered key rows (groups * heads * keys per block) per call of the MoBA kernel (:mod:`.moba` imports it), and
#: of a short input's single blocked call.
KEY_ROWS_PER_CALL = 16384
#: The same bound for the blocked calls that really copy their keys (those whose keys are not one strided view of
#: k, see :class:`_Call`): at 16K tokens, 4 heads of 64, float32, 4096 rows are 1 MiB each for k and v, which keeps
#: the forward peak within 1.5x of full SDPA's (its output plus row statistics).
GATHERED_ROWS_PER_CALL = 4096
#: Query rows per block-wise call whose keys are a strided view of k (nothing gathered): only the call's output
#: chunk and row statistics are held, so it takes more rows than a gathered call (fewer, larger fused calls).
STRIDED_ROWS_PER_CALL = 2048
#: Query rows per extra-keys call (sinks, global columns; see :func:`_calls`): its output chunk is the peak it adds
#: (16K, 4 x 64, float32: 4096 rows put the forward peak at 1.61x SDPA's, 1024 rows at 1.23x, for the same speed).
EXTRA_ROWS_PER_CALL = 1024
#: Block of a window's backward cover (when the input's padded length allows it): the fused CPU backward kernel
#: runs 128-row blocks about 1.3x faster per pair than 64-row ones (8K, 256 window, 1 thread: 523 vs 702 ms per
#: 8K rows; 256-row blocks 558), and the overlapping windows' key gradients it returns are 5x rather than 9x the keys.
#: The forward keeps 64-key blocks (its kernel is fastest there: 185 vs 196 ms).
BACKWARD_BLOCK = 128
#: Dense global query rows per call (bounds the ``(rows, n)`` mask).
GLOBAL_ROWS_PER_CALL = 64
#: Keys per backward call of the dense global rows: their key gradients are computed in slices of this many keys.
GLOBAL_KEYS_PER_BACKWARD = 4096
#: Masks of a query-block group up to this many elements are kept with the plan (with their bias) even when they
#: differ per query block (a window's edge blocks, a short input's single call): built once per length.
CACHED_MASK_ELEMENTS = 1 << 20
#: Elements of one call's ALiBi bias (batch * heads * rows * keys): with ALiBi, calls take fewer query blocks.
BIAS_ELEMENTS_PER_CALL = 1 << 22


@dataclass
class BlockedPlan:
    """Everything index-related for one (pattern, length, device): built once per length and cached by the module."""

    pattern: Pattern
    structure: BlockStructure
    mask_mod: MaskMod
    is_global: Tensor  # bool (padded_len,)
    rows_per_call: int = DEFAULT_ROWS_PER_CALL
    #: the structure without its extra keys: the block-wise calls of :func:`sparse_attention` read only the slots
    #: (so a window with sinks or Longformer's global columns keeps its strided views); the extra keys are a second
    #: call per group, merged by log-sum-exp
    slots: BlockStructure | None = None
    #: the plan :func:`sparse_attention`'s backward runs (the same pattern and padded length, a larger block), or
    #: None to reuse this one: see :data:`BACKWARD_BLOCK`
    backward: "BlockedPlan | None" = None
    #: per query-block group: (tokens, flat key index, allowed, {dtype: bias}) when ``allowed`` is small enough to
    #: keep (broadcast over the group or the query rows); filled lazily by the first call.
    group_cache: dict = field(default_factory=dict)
    #: id(mask from ``chunk_mask``) -> (that mask, {dtype: bias}): groups given the same mask tensor (a window's
    #: interior band) share one bias instead of holding a copy each (at 1M tokens, ~800 copies of 0.8 MB)
    shared_biases: dict = field(default_factory=dict)

    @classmethod
    def build(
        cls, pattern: Pattern, seq_len: int, device: torch.device, rows_per_call: int = DEFAULT_ROWS_PER_CALL,
        backward_block: int | None = None,
    ) -> "BlockedPlan":
        """The plan of ``pattern`` at ``seq_len``. ``backward_block`` (default :data:`BACKWARD_BLOCK`; 0 = none): a
        second plan for the backward with that block, when the pattern allows another cover
        (``Pattern.with_block_size``) and it pads to the same length (then each pass covers exactly the pattern's
        pairs and the backward, which reads the rows' output and log-sum-exp, is exact whatever the forward's cover)."""
        # The plan is index arithmetic on lengths only: build it for real even under FakeTensorMode (memory
        # prediction), where data-dependent steps such as BigBird's random draw could not run.
        with unset_fake_temporarily():
            structure = pattern.structure(seq_len, device)
            slots = dataclasses.replace(structure, extra_keys=structure.extra_keys[:0])
            plan = cls(pattern, structure, pattern.mask_mod(seq_len, device),
                       global_query_lookup(structure, device), rows_per_call, slots=slots)
        block = BACKWARD_BLOCK if backward_block is None else backward_block
        other = pattern.with_block_size(block) if block > structure.block_size else None
        if other is not None:
            backward = cls.build(other, seq_len, device, rows_per_call, backward_block=0)
            if (backward.structure.padded_len == structure.padded_len
                    and backward.structure.block_size > structure.block_size):
                plan.backward = backward
        return plan


@dataclass
class _Call:
    """One fused attention call: which query rows, which keys, and the mask."""

    kind: str  # "blocks" or "global"
    start: int  # blocks: first query-block row (relative); global: first global row
    stop: int
    key_index: Tensor | None  # blocks: flat (g * kh * kt,) index into (kv_heads * padded_len) rows; global: None
    allowed: Tensor | None  # bool, broadcastable to (calls_batch, heads, rows, keys); None = everything allowed
    biases: dict | None = None  # dtype -> additive bias of ``allowed``, shared across calls when cached
    additive: Tensor | None = None  # float ALiBi bias broadcastable like ``allowed``; None = no bias
    key_heads: int = 1  # heads of the gathered keys: kv_heads (shared pattern) or heads (per-head pattern)
    #: blocks only: when query block i of the call reads the consecutive keys ``key_start + i * block_size + (0 ..
    #: kt - 1)`` (a sliding window away from the edges), its keys are one overlapping strided view of k: no copy
    key_start: int | None = None
    key_step: int = 0  # with key_start: tokens between consecutive query blocks' first keys (the block size)
    #: blocks only, when every slot is one whole key block (no appended extra keys): the flat ``(g * kh * slots,)``
    #: index of those blocks into ``(kv_heads * num_blocks)`` blocks, so a gather copies whole blocks
    block_index: Tensor | None = None

    def bias(self, dtype: torch.dtype) -> Tensor | None:
        if self.additive is not None:
            additive = self.additive.to(dtype)
            if self.allowed is None:
                return additive
            return torch.where(self.allowed, additive, torch.full((), float("-inf"), dtype=dtype,
                                                                  device=additive.device))
        if self.allowed is None:
            return None
        if self.biases is None:
            return _bias(self.allowed, dtype)
        if dtype not in self.biases:
            self.biases[dtype] = _bias(self.allowed, dtype)
        return self.biases[dtype]

    def keys(self, k0: int, k1: int) -> "_Call":
        """This global call restricted to keys ``k0:k1`` (the backward's key slices)."""
        allowed = None if self.allowed is None else self.allowed[..., k0:k1]
        additive = None if self.additive is None else self.additive[..., k0:k1]
        return _Call(self.kind, self.start, self.stop, None, allowed, None, additive, self.key_heads)  # global only


def _calls(
    plan: BlockedPlan,
    batch: int,
    heads: int,
    key_padding_mask: Tensor | None,
    kv_heads: int | None = None,
    slopes: Tensor | None = None,
    split_extras: bool = True,
) -> Iterator[_Call]:
    """The calls of one pass: block calls, then (``split_extras``) ``"extra"`` calls, then dense global rows.

    ``split_extras``: block calls read the slots only, and the structure's extra keys are ``"extra"`` calls over up
    to :data:`EXTRA_ROWS_PER_CALL` block-wise rows each, merged into those rows by log-sum-exp
    (:func:`sparse_attention`); otherwise the extra keys are appended to every block's gathered keys (one call per
    group: :func:`sparse_attention_autograd`)."""
    st = plan.structure
    split = split_extras and st.extra_keys.numel() > 0 and plan.slots is not None
    blocks_st = plan.slots if split else st
    n_pad = st.padded_len
    kv_heads = heads if kv_heads is None else kv_heads
    group_size = heads // kv_heads
    # a shared pattern gathers per key/value head; a per-head one per query head (from its shared kv head)
    key_heads = kv_heads if plan.pattern.mask_heads == 1 else heads
    for start, stop in _block_groups(plan, blocks_st, batch, heads, key_heads, slopes):
        g = stop - start
        cache_key = (start, stop, heads, kv_heads, split)
        cached = plan.group_cache.get(cache_key)
        if cached is None:
            cached = _group_indices(plan, blocks_st, start, stop, heads, key_heads, group_size)
            if cached[3] is not None:  # small masks (and their biases) are kept with the plan
                plan.group_cache[cache_key] = cached
        safe, flat, allowed, biases, key_start = cached
        if batch > 1:
            key_start = None  # the (batch, group) rows of a strided view would not fold into one dimension
        additive = None
        if slopes is not None:
            additive = _alibi_rows(st, start, stop, safe, slopes, batch)
            biases = None
        if key_padding_mask is not None:
            real = key_padding_mask[:, safe.transpose(0, 1)]  # (batch, g, hp, kt)
            allowed = (allowed[None] & real[:, :, :, None, :]).flatten(0, 1)  # (batch * g, hp, b, kt)
            biases = None
        elif batch > 1:
            allowed = allowed[None].expand(batch, g, *allowed.shape[1:]).flatten(0, 1)
            biases = None
        block_index = None
        if key_start is None and blocks_st.extra_keys.numel() == 0:
            block_index = torch.div(flat.view(-1, blocks_st.block_size)[:, 0], blocks_st.block_size,
                                    rounding_mode="floor")  # an empty slot reads (masked) block 0
        yield _Call("blocks", start, stop, flat, allowed, biases, additive, key_heads, key_start,
                    blocks_st.block_size, block_index=block_index)
    if split:  # the extra keys: a few large calls over every block-wise row, after all block calls
        step = max(1, EXTRA_ROWS_PER_CALL // st.block_size)
        for start in range(0, st.num_query_blocks, step):
            yield _extra_call(plan, start, min(start + step, st.num_query_blocks), batch, kv_heads,
                              key_padding_mask, slopes)
    num_global = st.global_queries.numel()
    for start in range(0, num_global, GLOBAL_ROWS_PER_CALL):
        stop = min(start + GLOBAL_ROWS_PER_CALL, num_global)
        cache_key = ("global", start, stop)
        if cache_key not in plan.group_cache:
            with unset_fake_temporarily():  # index arithmetic only; the simplifications below read its values
                keys = torch.arange(n_pad, device=st.key_blocks.device)
                allowed = global_rows_mask(plan.pattern, plan.mask_mod, st.global_queries[start:stop], keys)[None]
                if bool(allowed.all()):
                    allowed = None
                elif allowed.shape[1] > 1 and bool((allowed == allowed[:, :1]).all()):
                    allowed = allowed[:, :1]
            plan.group_cache[cache_key] = allowed  # (1, 1 or hp, rows, n): O(g * n), kept with the plan
        allowed = plan.group_cache[cache_key]
        if key_padding_mask is not None:
            padding = key_padding_mask[:, None, None, :]
            allowed = padding if allowed is None else allowed & padding
        additive = None
        if slopes is not None:
            rows = st.global_queries[start:stop]
            keys = torch.arange(n_pad, device=rows.device)
            additive = alibi_bias(slopes, rows[:, None], keys[None, :])[None]  # (1, h, rows, n)
        yield _Call("global", start, stop, None, allowed, None, additive, kv_heads)


def _alibi_rows(st: BlockStructure, start: int, stop: int, keys: Tensor, slopes: Tensor, batch: int) -> Tensor:
    """ALiBi bias ``(batch * g, h, b, kt)`` of query-block rows ``start:stop`` against key tokens ``keys``
    ``(hp, g, kt)``."""
    q_idx = _block_queries(st, start, stop, keys.device)  # (g, b)
    distance = (q_idx[None, :, :, None] - keys[:, :, None, :]).abs().transpose(0, 1)  # (g, hp, b, kt)
    additive = -slopes.view(1, -1, 1, 1) * distance.to(slopes.dtype)  # (g, h, b, kt)
    if batch > 1:
        additive = additive[None].expand(batch, *additive.shape).flatten(0, 1)
    return additive


def _extra_call(
    plan: BlockedPlan, start: int, stop: int, batch: int, kv_heads: int, key_padding_mask: Tensor | None,
    slopes: Tensor | None,
) -> _Call:
    """The extra keys of the rows of query blocks ``start:stop`` as one call: those rows (``(batch, h, rows, d)``)
    against the structure's e ``extra_keys``; a key already in a row's block slots is masked for it (as
    ``BlockStructure.key_tokens`` drops it), mask ``(batch or 1, hp, rows, e)`` from ``mask_mod``."""
    st = plan.structure
    cache_key = ("extra", start, stop)
    if cache_key not in plan.group_cache:
        with unset_fake_temporarily():  # index arithmetic only
            slot_keys = plan.slots.keys_per_block
            tokens = st.key_tokens(start, stop)[..., slot_keys:]  # (hp, g, e); EMPTY where a slot covers it
            q_idx = _block_queries(st, start, stop, tokens.device)  # (g, b)
            heads = torch.arange(tokens.shape[0], device=tokens.device)[:, None, None, None]
            allowed = plan.mask_mod(0, heads, q_idx[None, :, :, None], tokens[:, :, None, :])
            allowed = allowed & (tokens >= 0)[:, :, None, :]
            if st.global_queries.numel():
                allowed = allowed & ~plan.is_global[q_idx][None, :, :, None]  # dense rows are computed apart
            allowed = allowed.flatten(1, 2)[None]  # (1, hp, rows, e)
        plan.group_cache[cache_key] = (allowed, {})  # O(rows * e), kept with the plan
    allowed, biases = plan.group_cache[cache_key]
    additive = None
    if slopes is not None:
        rows = _block_queries(st, start, stop, allowed.device).flatten()
        additive = alibi_bias(slopes, rows[:, None], st.extra_keys[None, :])[None]  # (1, h, rows, e)
        biases = None
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, st.extra_keys][:, None, None, :]  # (batch, hp, rows, e)
        biases = None
    return _Call("extra", start, stop, st.extra_keys, allowed, biases, additive, kv_heads)


def _contiguous_start(tokens: Tensor, block_size: int) -> int | None:
    """The first key of row 0 when every row ``r`` of ``tokens`` ``(hp, g, kt)`` reads the consecutive keys
    ``start + r * block_size + (0 .. kt - 1)`` (a window's rows), else None. ``start`` may be negative and the run
    may pass the sequence's end: ``EMPTY`` slots stand for positions of the run outside the sequence (read as zero
    keys from a padded copy, and masked)."""
    if tokens.shape[0] != 1:
        return None
    g, kt = tokens.shape[1:]
    used = tokens[0] >= 0
    if not bool(used.any()):
        return None
    relative = block_size * torch.arange(g, device=tokens.device)[:, None] + torch.arange(kt, device=tokens.device)
    starts = (tokens[0] - relative)[used]
    first = int(starts[0])
    return first if bool((starts == first).all()) else None


def _group_indices(
    plan: BlockedPlan, st: BlockStructure, start: int, stop: int, heads: int, key_heads: int, group_size: int
) -> tuple[Tensor, Tensor, Tensor, dict | None, int | None]:
    """``(safe tokens (hp, g, kt), flat key index, allowed (g or 1, hp, b or 1, kt), biases or None, key_start)`` of
    the query-block rows ``start:stop``; ``biases`` is a dict (to fill) only when ``allowed`` is small enough to keep.
    """
    with unset_fake_temporarily():  # index arithmetic only: real even when predicting with fake tensors
        tokens, allowed = plan.pattern.chunk_mask(st, plan.mask_mod, plan.is_global, start, stop)
        # tokens (hp, g, kt); allowed (hp, g or 1, b or 1, kt): size-1 dims broadcast in the fused kernel
        raw = allowed
        safe = tokens.clamp_min(0)
        kv_of_head = torch.arange(key_heads, device=safe.device)
        if key_heads == heads:
            kv_of_head = kv_of_head // group_size  # query head i reads key/value head i // group_size
        head_offsets = kv_of_head[None, :, None] * st.padded_len  # (1, kh, 1)
        flat = (safe.transpose(0, 1) + head_offsets).reshape(-1)  # (g * kh * kt,) hp broadcast to kh
        allowed = allowed.transpose(0, 1)  # (g or 1, hp, b or 1, kt)
        key_start = _contiguous_start(tokens, st.block_size) if plan.pattern.mask_heads == 1 else None
    small = allowed.shape[0] == 1 or allowed.shape[2] == 1 or allowed.numel() <= CACHED_MASK_ELEMENTS
    if not small:
        return safe, flat, allowed, None, key_start
    shared = plan.shared_biases.get(id(raw))
    if shared is None or shared[0] is not raw:  # the entry keeps ``raw`` alive, so its id is not reused
        shared = plan.shared_biases[id(raw)] = (raw, {})
    return safe, flat, allowed, shared[1], key_start


def _block_groups(
    plan: BlockedPlan, st: BlockStructure, batch: int, heads: int, key_heads: int, slopes: Tensor | None
) -> Iterator[tuple[int, int]]:
    """Query-block ranges ``(start, stop)`` of the block-wise calls.

    Where the pattern's rows read consecutive keys (a sliding window, batch 1: ``Pattern.contiguous_rows``), a call's
    keys are one strided view of k: nothing is copied in the sequence's interior, and the rows at either edge, whose
    run of keys passes the sequence's start or end, read a zero-padded copy of just the keys they span (one call per
    edge). Such calls take up to :data:`STRIDED_ROWS_PER_CALL` query rows and :data:`KEY_ROWS_PER_CALL` key rows
    (which bounds the backward's per-call key gradients); a short input whose padded keys fit
    :data:`KEY_ROWS_PER_CALL` rows is one call (the fewest calls where per-call overhead matters most, near the
    crossover with SDPA). Other rows gather their keys: a short input whose gathered keys fit
    :data:`KEY_ROWS_PER_CALL` rows is one call, otherwise up to ``rows_per_call`` query rows and at most
    :data:`GATHERED_ROWS_PER_CALL` key rows per call (the forward's peak beyond its output). With ALiBi the call's
    bias (``batch * heads * rows * keys``) is bounded by :data:`BIAS_ELEMENTS_PER_CALL`.
    """
    nq = st.num_query_blocks
    per_block = max(1, key_heads * st.keys_per_block)
    if nq == 0:
        return
    lo = hi = 0  # query blocks lo .. hi - 1 read strided views (when the pattern has such a range)
    if batch == 1 and plan.pattern.mask_heads == 1 and st.extra_keys.numel() == 0:
        lo, hi = plan.pattern.contiguous_rows(st)
    if slopes is None:
        strided_copy = key_heads * (st.padded_len + st.keys_per_block)  # rows of the padded copy of every key
        if (lo, hi) == (0, nq) and strided_copy <= KEY_ROWS_PER_CALL and nq * st.block_size <= STRIDED_ROWS_PER_CALL:
            yield 0, nq
            return
        if nq * per_block <= KEY_ROWS_PER_CALL and nq * st.block_size <= plan.rows_per_call:
            yield 0, nq  # few calls matter most at short lengths (the crossover with SDPA)
            return
    # a strided call copies nothing forward, but its backward returns key and value gradients of the gathered size
    group = max(1, min(STRIDED_ROWS_PER_CALL // st.block_size, KEY_ROWS_PER_CALL // per_block))
    gathered = max(1, min(plan.rows_per_call // st.block_size, GATHERED_ROWS_PER_CALL // per_block))
    if slopes is not None:
        group = gathered = max(1, min(gathered, BIAS_ELEMENTS_PER_CALL // max(
            1, batch * heads * st.block_size * st.keys_per_block)))
    inner_lo, inner_hi = lo, hi  # strided rows whose keys all lie inside k (the rest read a padded copy)
    if hi > lo:
        with unset_fake_temporarily():  # index arithmetic on the plan's real tensors (also when predicting)
            first = _contiguous_start(st.key_tokens(lo, lo + 1), st.block_size)
        if first is None:  # the pattern's claim did not hold: gather everything
            lo = hi = inner_lo = inner_hi = 0
        else:
            bs = st.block_size
            inner_lo = min(hi, lo + max(0, -(first // bs)) if first < 0 else lo)
            last_ok = (st.padded_len - st.keys_per_block - first) // bs  # last row r - lo whose run ends inside
            inner_hi = max(inner_lo, min(hi, lo + last_ok + 1))
    ranges = ((0, lo, gathered), (lo, inner_lo, group), (inner_lo, inner_hi, group), (inner_hi, hi, group),
              (hi, nq, gathered))
    for first_row, last_row, step in ranges:
        for start in range(first_row, last_row, step):
            yield start, min(start + step, last_row)


def _block_queries(st: BlockStructure, start: int, stop: int, device: torch.device) -> Tensor:
    """Long ``(g, block_size)`` query positions of the block-wise rows ``start:stop``."""
    first = (st.first_query_block + start) * st.block_size
    return torch.arange(first, first + (stop - start) * st.block_size, device=device).view(stop - start, -1)


# ------------------------------------------------------------------------------------------- gather / scatter
def _query_rows(x: Tensor, plan: BlockedPlan, call: _Call) -> Tensor:
    """q (or grad_out / out) rows of ``call``: blocks -> ``(batch * g, h, b, d)``, global -> ``(batch, h, r, d)``."""
    st = plan.structure
    if call.kind == "global":
        return x.index_select(2, st.global_queries[call.start:call.stop])
    bs = st.block_size
    first = (st.first_query_block + call.start) * bs
    rows = x[:, :, first:first + (call.stop - call.start) * bs]  # (batch, h, g * b, d)
    rows = rows.unflatten(2, (call.stop - call.start, bs)).transpose(1, 2)  # (batch, g, h, b, d)
    return rows.reshape(-1, *rows.shape[2:])


def _put_query_rows(dest: Tensor, value: Tensor, plan: BlockedPlan, call: _Call, accumulate: bool) -> None:
    st = plan.structure
    if call.kind == "global":
        index = st.global_queries[call.start:call.stop]
        if accumulate:
            dest.index_add_(2, index, value.to(dest.dtype))
        else:
            dest.index_copy_(2, index, value.to(dest.dtype))
        return
    bs = st.block_size
    g = call.stop - call.start
    first = (st.first_query_block + call.start) * bs
    target = dest[:, :, first:first + g * bs].unflatten(2, (g, bs)).transpose(1, 2)  # (batch, g, h, b, d)
    value = value.reshape(dest.shape[0], g, *value.shape[1:])
    if accumulate:
        target += value
    else:
        target.copy_(value)


def _strided(call: _Call, batch: int, x: Tensor) -> bool:
    """Whether ``call`` reads its keys as one strided run of ``x`` (see :func:`_contiguous_start`)."""
    return call.key_start is not None and batch == 1 and x.shape[1] == call.key_heads


def _key_span(call: _Call, keys_per_block: int) -> tuple[int, int]:
    """Token range ``[lo, hi)`` of a strided call's keys (may pass either end of the sequence)."""
    lo = call.key_start
    return lo, lo + (call.stop - call.start - 1) * call.key_step + keys_per_block


def _key_rows(x: Tensor, call: _Call) -> Tensor:
    """Gathered keys (or values): blocks -> ``(batch * g, key_heads, kt, d)``; global -> x itself."""
    if call.kind == "global":
        return x
    batch, _, n, d = x.shape
    g = call.stop - call.start
    keys_per_block = call.key_index.numel() // (call.key_heads * g)
    if _strided(call, batch, x):
        # block i reads keys key_start + i * b ..: overlapping rows of one view, (g, kh, kt, d); rows whose run
        # passes an end of the sequence read a zero-padded copy of the span (their mask excludes those keys)
        lo, hi = _key_span(call, keys_per_block)
        if lo >= 0 and hi <= n and x.is_contiguous():
            base, offset = x, lo * d
        else:
            base, offset = x.new_zeros(1, x.shape[1], hi - lo, d), 0
            a, b = max(lo, 0), min(hi, n)
            base[:, :, a - lo:b - lo] = x[:, :, a:b]
        return base.as_strided((g, call.key_heads, keys_per_block, d),
                               (call.key_step * d, base.stride(1), d, 1), base.storage_offset() + offset)
    if call.block_index is not None and x.is_contiguous():
        # whole key blocks: one copy of block_size * d elements per slot
        rows = x.view(batch, -1, call.key_step * d).index_select(1, call.block_index)  # (batch, g*kh*slots, b*d)
        return rows.view(-1, call.key_heads, keys_per_block, d)
    rows = x.reshape(batch, -1, d).index_select(1, call.key_index)  # (batch, g * kh * kt, d)
    return rows.view(-1, call.key_heads, keys_per_block, d)


def _add_key_rows(dest: Tensor, value: Tensor, call: _Call) -> None:
    """Add a call's key (or value) gradients ``value`` ``(batch * g, kh, kt, d)`` into ``dest``
    ``(batch, kh, n, d)``."""
    if call.kind == "global":
        dest += value
        return
    batch, _, n, d = dest.shape
    if _strided(call, batch, dest):
        # the overlapping windows' gradients: slot o of block i is key key_start + (i + o) * b ..; one strided add
        # per slot instead of an index_add over every gathered row
        g, kh, kt, _ = value.shape
        step = call.key_step
        lo, hi = _key_span(call, kt)
        inside = lo >= 0 and hi <= n
        target = dest[0, :, lo:hi] if inside else torch.zeros(
            hi - lo, kh, d, dtype=dest.dtype, device=dest.device).transpose(0, 1)  # (kh, span, d), dest's layout
        value = value.to(dest.dtype)
        head_stride, token_stride = target.stride(0), target.stride(1)
        for o in range(0, kt, step):
            part = value[:, :, o:o + step]  # (g, kh, w, d), w = step except maybe the last slot
            view = target.as_strided((kh, g, part.shape[2], d), (head_stride, step * token_stride, token_stride, 1),
                                     target.storage_offset() + o * token_stride)  # keys lo + o + i * step + (0..w-1)
            view.add_(part.transpose(0, 1))
        if not inside:
            a, b = max(lo, 0), min(hi, n)
            dest[0, :, a:b] += target[:, a - lo:b - lo]
        return
    if call.block_index is not None and dest.is_contiguous():
        blocks = value.reshape(batch, -1, call.key_step * d).to(dest.dtype)  # (batch, g * kh * slots, b * d)
        dest.view(batch, -1, call.key_step * d).index_add_(1, call.block_index, blocks)
        return
    rows = value.reshape(batch, -1, d).to(dest.dtype)
    if dest.is_contiguous():
        dest.view(batch, -1, d).index_add_(1, call.key_index, rows)
        return
    # a token-major buffer (:func:`_token_major`): flat row head * n + token becomes token * heads + head
    heads = dest.shape[1]
    index = (call.key_index % n) * heads + torch.div(call.key_index, n, rounding_mode="floor")
    dest.transpose(1, 2).view(batch, -1, d).index_add_(1, index, rows)


def _extra_keys(x: Tensor, call: _Call) -> Tensor:
    """An extra call's keys (or values) ``(batch, kh, e, d)``: the structure's e extra tokens."""
    return x.index_select(2, call.key_index)


def _extra_rows(plan: BlockedPlan, call: _Call) -> tuple[int, int]:
    """Token rows ``[r0, r1)`` of an extra call (query blocks ``start:stop`` of the block-wise part)."""
    st = plan.structure
    return (st.first_query_block + call.start) * st.block_size, (st.first_query_block + call.stop) * st.block_size


def _empty_rows_to_minus_inf(lse: Tensor, call: _Call) -> Tensor:
    """The call's log-sum-exp with rows that had no allowed key at -inf (the fused CPU kernel reports 0 for them),
    so a merge gives such a part no weight."""
    if call.allowed is None:
        return lse
    has_key = call.allowed.any(-1)  # broadcastable to lse (N, h, m)
    return torch.where(has_key, lse, torch.full((), float("-inf"), dtype=lse.dtype, device=lse.device))


def merge_by_lse(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Attention over the union of two disjoint key sets from each set's result: ``(out, lse)``.

    ``out_*`` ``(..., rows, d)``, ``lse_*`` ``(..., rows)`` (-inf for a row with no key in that set). The weights are
    ``exp(lse_* - lse)``. A row empty in both gets output 0 and log-sum-exp 0 (the fused kernel's convention for an
    empty row, which its backward reads safely). Works in place: ``out_a`` becomes the result and ``out_b`` is
    overwritten (both are fresh kernel outputs here), so a merge holds no output-sized temporary."""
    top = torch.maximum(lse_a, lse_b)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    wa, wb = torch.exp(lse_a - top), torch.exp(lse_b - top)
    total = wa + wb
    out_a.mul_((wa / total.clamp_min(torch.finfo(total.dtype).tiny))[..., None].to(out_a.dtype))
    out_a.add_(out_b.mul_((wb / total.clamp_min(torch.finfo(total.dtype).tiny))[..., None].to(out_b.dtype)))
    lse = torch.where(total > 0, top + torch.log(total), torch.zeros_like(total))
    return out_a, lse


def _put_lse(dest: Tensor, lse: Tensor, plan: BlockedPlan, call: _Call) -> None:
    """Write a call's log-sum-exp (blocks ``(batch * g, h, b)``, global ``(batch, h, r)``) into ``dest``
    ``(batch, h, padded_len)``."""
    st = plan.structure
    if call.kind == "global":
        dest.index_copy_(2, st.global_queries[call.start:call.stop], lse.to(dest.dtype))
        return
    bs = st.block_size
    g = call.stop - call.start
    first = (st.first_query_block + call.start) * bs
    target = dest[:, :, first:first + g * bs].unflatten(2, (g, bs)).transpose(1, 2)  # (batch, g, h, b)
    target.copy_(lse.reshape(dest.shape[0], g, *lse.shape[1:]))


def _call_lse(lses: Tensor, plan: BlockedPlan, call: _Call) -> Tensor:
    """A call's rows of the saved log-sum-exp, in the layout :func:`_chunk_backward` reads (contiguous)."""
    st = plan.structure
    if call.kind == "global":
        return lses.index_select(2, st.global_queries[call.start:call.stop])
    bs = st.block_size
    g = call.stop - call.start
    first = (st.first_query_block + call.start) * bs
    rows = lses[:, :, first:first + g * bs].unflatten(2, (g, bs)).transpose(1, 2)  # (batch, g, h, b)
    return rows.reshape(-1, *rows.shape[2:]).contiguous()


# ---------------------------------------------------------------------------------------------- chunk kernels
def _bias(allowed: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    if allowed is None:
        return None
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.full((), float("-inf"), dtype=dtype, device=allowed.device))


def _use_cpu_flash(q: Tensor) -> bool:
    return q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _scores(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """``(N, h, m, kt)`` scaled scores of q ``(N, h, m, d)`` against k ``(N, kh, kt, d)`` (kh dividing h)."""
    return grouped_matmul(q, k.transpose(-1, -2)) * scale


def _chunk_forward(q: Tensor, k: Tensor, v: Tensor, call: _Call, scale: float) -> tuple[Tensor, Tensor]:
    """Exact attention of one chunk: ``(out (N, h, m, d), lse (N, h, m))``; rows with no allowed key -> 0.

    q is ``(N, h, m, d)``, k and v ``(N, kh, kt, d)`` with kh dividing h (grouped heads, never repeated)."""
    allowed = call.allowed
    if _use_cpu_flash(q):
        # the CPU flash kernel returns 0 output (and lse 0) for a row whose bias is all -inf; it reads grouped
        # key/value heads directly
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=call.bias(q.dtype), scale=scale
        )
        return out, lse
    scores = _scores(q, k, scale)  # (N, h, m, kt)
    if call.additive is not None:
        scores = scores + call.additive.to(scores.dtype)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    row_max = scores.amax(-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    probs = torch.exp(scores - row_max)
    denom = probs.sum(-1, keepdim=True)
    out = grouped_matmul(probs, v) / denom.clamp_min(torch.finfo(probs.dtype).tiny)
    lse = (row_max + torch.log(denom)).squeeze(-1)  # -inf for empty rows
    return out, lse


def _chunk_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, call: _Call, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of one chunk, recomputing its probabilities from ``lse``; dk, dv have k's (grouped) heads."""
    allowed = call.allowed
    if _use_cpu_flash(q):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse, 0.0, False, attn_mask=call.bias(q.dtype), scale=scale
        )
    kh = k.shape[1]
    scores = _scores(q, k, scale)
    if call.additive is not None:
        scores = scores + call.additive.to(scores.dtype)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("inf")))
    probs = torch.exp(scores - lse[..., None])  # (N, h, m, kt); empty rows -> 0
    grad_out = grad_out.contiguous()
    grad_v = torch.matmul(fold_query_groups(probs, kh).transpose(-1, -2), fold_query_groups(grad_out, kh))
    grad_probs = grouped_matmul(grad_out, v.transpose(-1, -2))  # (N, h, m, kt)
    delta = (grad_out * out).sum(-1, keepdim=True)
    grad_scores = probs * (grad_probs - delta) * scale
    grad_k = torch.matmul(fold_query_groups(grad_scores, kh).transpose(-1, -2), fold_query_groups(q, kh))
    return grouped_matmul(grad_scores, k), grad_k, grad_v  # dk, dv: (N, kh, kt, d)


# -------------------------------------------------------------------------------------------- autograd function
def _token_major(shape: torch.Size, dtype: torch.dtype, device: torch.device, zero: bool) -> Tensor:
    """A ``(batch, heads, seq, d)`` tensor stored as ``(batch, seq, heads, d)``: the layout the fused CPU kernel
    writes each call's ``(rows, heads, block, d)`` output and gradients in, so a block's rows (all heads) copy or add
    as one contiguous run. Returned as the ``(batch, heads, seq, d)`` view (not contiguous)."""
    batch, heads, seq, d = shape
    make = torch.zeros if zero else torch.empty
    return make(batch, seq, heads, d, dtype=dtype, device=device).transpose(1, 2)


def _rows_buffer(like: Tensor, plan: BlockedPlan, dtype: torch.dtype) -> Tensor:
    """A ``like``-shaped token-major buffer (:func:`_token_major`): rows of the block-wise part left uninitialised
    (each is written exactly once, by copy; global rows inside it are written as zeros there), rows before it zeroed
    (global calls add into them)."""
    buffer = _token_major(like.shape, dtype, like.device, zero=False)
    buffer[:, :, : plan.structure.first_query_block * plan.structure.block_size].zero_()
    return buffer


class _SparseAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, q: Tensor, k: Tensor, v: Tensor, kpm: Tensor | None, plan: BlockedPlan, scale: float,
        slopes: Tensor | None,
    ) -> Tensor:
        batch, heads = q.shape[:2]
        out = _rows_buffer(q, plan, q.dtype)
        lses = None  # (batch, heads, padded_len) log-sum-exp of every row (0 for rows no call writes)
        for call in _calls(plan, batch, heads, kpm, k.shape[1], slopes):
            if call.kind == "extra":  # after every block call: merge the extra keys into those rows
                r0, r1 = _extra_rows(plan, call)
                oe, le = _chunk_forward(q[:, :, r0:r1], _extra_keys(k, call), _extra_keys(v, call), call, scale)
                # merges into out's rows in place
                _, lse = merge_by_lse(out[:, :, r0:r1], lses[:, :, r0:r1], oe, _empty_rows_to_minus_inf(le, call))
                lses[:, :, r0:r1] = lse
                continue
            qc, kc, vc = _query_rows(q, plan, call), _key_rows(k, call), _key_rows(v, call)
            o, lse = _chunk_forward(qc, kc, vc, call, scale)
            if call.kind == "blocks" and plan.structure.extra_keys.numel():
                lse = _empty_rows_to_minus_inf(lse, call)  # the extra keys' merge gives an empty part no weight
            _put_query_rows(out, o, plan, call, accumulate=call.kind == "global")
            if lses is None:
                lses = torch.zeros(batch, heads, q.shape[2], dtype=lse.dtype, device=q.device)
            _put_lse(lses, lse, plan, call)
        ctx.plan, ctx.scale = plan, scale
        ctx.save_for_backward(q, k, v, out, kpm, slopes, lses)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, kpm, slopes, lses = ctx.saved_tensors
        plan, scale = ctx.plan.backward or ctx.plan, ctx.scale
        acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        grad_q = _rows_buffer(q, plan, acc)
        # token-major where strided calls add their overlapping windows (a shared pattern, batch 1), else (b, kh, n,
        # d) so that gathered calls add whole key blocks
        strided = q.shape[0] == 1 and plan.pattern.mask_heads == 1
        grad_k = _token_major(k.shape, acc, k.device, zero=True) if strided else torch.zeros_like(k, dtype=acc)
        grad_v = _token_major(v.shape, acc, v.device, zero=True) if strided else torch.zeros_like(v, dtype=acc)
        for call in _calls(plan, q.shape[0], q.shape[1], kpm, k.shape[1], slopes):
            if call.kind == "extra":
                # exact for a subset of the keys: given the rows' final output and log-sum-exp (both parts
                # merged), each part's probabilities and delta are the true ones (see _global_backward)
                r0, r1 = _extra_rows(plan, call)
                gq, gk, gv = _chunk_backward(
                    grad_out[:, :, r0:r1], q[:, :, r0:r1], _extra_keys(k, call), _extra_keys(v, call),
                    out[:, :, r0:r1], lses[:, :, r0:r1].contiguous(), call, scale,
                )
                grad_q[:, :, r0:r1] += gq
                grad_k.index_add_(2, call.key_index, gk.to(grad_k.dtype))
                grad_v.index_add_(2, call.key_index, gv.to(grad_v.dtype))
                continue
            lse = _call_lse(lses, plan, call)
            if call.kind == "global":
                _global_backward(grad_out, q, k, v, out, lse, plan, call, scale, grad_q, grad_k, grad_v)
                continue
            gq, gk, gv = _chunk_backward(
                _query_rows(grad_out, plan, call), _query_rows(q, plan, call), _key_rows(k, call),
                _key_rows(v, call), _query_rows(out, plan, call), lse, call, scale,
            )
            _put_query_rows(grad_q, gq, plan, call, accumulate=call.kind == "global")
            _add_key_rows(grad_k, gk, call)
            _add_key_rows(grad_v, gv, call)
        return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), None, None, None, None


def _global_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, plan: BlockedPlan, call: _Call,
    scale: float, grad_q: Tensor, grad_k: Tensor, grad_v: Tensor,
) -> None:
    """Backward of dense global rows in key slices, so no full-length key gradient is held per call.

    Exact: given the rows' final output and log-sum-exp, ``P = exp(S - lse)`` and ``delta = rowsum(dO * O)`` are the
    true ones for any subset of the keys, so each slice yields its keys' gradients and its share of ``dq``.
    """
    rows = (_query_rows(grad_out, plan, call), _query_rows(q, plan, call), _query_rows(out, plan, call))
    n_pad = k.shape[2]
    for k0 in range(0, n_pad, GLOBAL_KEYS_PER_BACKWARD):
        k1 = min(k0 + GLOBAL_KEYS_PER_BACKWARD, n_pad)
        part = call.keys(k0, k1)
        gq, gk, gv = _chunk_backward(rows[0], rows[1], k[:, :, k0:k1], v[:, :, k0:k1], rows[2], lse, part, scale)
        _put_query_rows(grad_q, gq, plan, call, accumulate=True)
        grad_k[:, :, k0:k1] += gk
        grad_v[:, :, k0:k1] += gv


def sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, plan: BlockedPlan, key_padding_mask: Tensor | None, scale: float,
    slopes: Tensor | None = None,
) -> Tensor:
    """Exact blocked attention over ``plan``'s pattern with a recomputing backward (see the module docstring).

    Args:
        q: ``(batch, heads, padded_len, head_dim)``, padded_len a multiple of the block size.
        k, v: ``(batch, kv_heads, padded_len, head_dim)``, kv_heads dividing heads (grouped-query attention).
        plan: from :meth:`BlockedPlan.build` for the true length.
        key_padding_mask: bool ``(batch, padded_len)``, True = real token, or None.
        scale: score scale.
        slopes: ``(heads,)`` ALiBi slopes, or None for no bias.

    Returns:
        ``(batch, heads, padded_len, head_dim)``; padded query rows are zero.
    """
    return _SparseAttentionFunction.apply(q.contiguous(), k.contiguous(), v.contiguous(), key_padding_mask, plan,
                                          scale, slopes)


def _sdpa_mask(call: _Call, dtype: torch.dtype) -> tuple[Tensor | None, Tensor | None]:
    """(mask for ``F.scaled_dot_product_attention``, has_key) of one call: an empty row sees everything (then is
    zeroed) so no kernel returns NaN."""
    if call.additive is not None:
        bias = call.bias(dtype)
        has_key = torch.isfinite(bias).any(-1, keepdim=True)
        return torch.where(has_key, bias, torch.zeros((), dtype=dtype, device=bias.device)), has_key
    if call.allowed is None:
        return None, None
    has_key = call.allowed.any(-1, keepdim=True)
    return call.allowed | ~has_key, has_key


def sparse_attention_autograd(
    q: Tensor, k: Tensor, v: Tensor, plan: BlockedPlan, key_padding_mask: Tensor | None, scale: float,
    dropout_p: float = 0.0, slopes: Tensor | None = None,
) -> Tensor:

    """The same chunks as :func:`sparse_attention` through ``F.scaled_dot_product_attention`` and plain autograd.

    Supports attention dropout; autograd keeps every chunk's gathered keys and values for backward (O(n * keys)).
    """
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    batch, heads, n_pad, d = q.shape
    st = plan.structure
    blocks, glob_rows, glob_out = [], [], []
    for call in _calls(plan, batch, heads, key_padding_mask, k.shape[1], slopes, split_extras=False):
        qc = _query_rows(q, plan, call)
        mask, has_key = _sdpa_mask(call, q.dtype)
        kc, vc = _key_rows(k, call), _key_rows(v, call)
        o = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, dropout_p=dropout_p, scale=scale,
                                           enable_gqa=kc.shape[1] != qc.shape[1])
        if has_key is not None:
            o = o * has_key
        if call.kind == "blocks":
            blocks.append(o.view(batch, call.stop - call.start, heads, st.block_size, d))
        else:
            glob_out.append(o)
    first = st.first_query_block * st.block_size
    parts = []
    if first:
        parts.append(q.new_zeros(batch, heads, first, d))
    if blocks:
        parts.append(torch.cat(blocks, dim=1).transpose(1, 2).flatten(2, 3))  # (batch, h, rows, d)
    out = torch.cat(parts, dim=2)
    if glob_out:
        glob_rows = st.global_queries
        out = out.index_copy(2, glob_rows, torch.cat(glob_out, dim=2))
    return out


# ------------------------------------------------------------------------------------------ dense (full) chunks
#: Query rows per call of :func:`dense_chunked_attention` (fewer when a mask or bias must be held per call).
DENSE_ROWS_PER_CALL = 512


def _dense_calls(
    q_len: int, kv_len: int, batch: int, heads: int, kv_heads: int, causal: bool, key_padding_mask: Tensor | None,
    slopes: Tensor | None, device: torch.device, rows_per_call: int,
) -> Iterator[tuple[int, int, int, _Call]]:
    """``(q0, q1, keys, call)``: query rows ``q0:q1`` against keys ``0:keys`` (every key, or the causal prefix)."""
    per_row = kv_len * (heads if slopes is not None else 1) * (batch if key_padding_mask is not None else 1)
    step = rows_per_call
    if causal or slopes is not None or key_padding_mask is not None:
        step = max(1, min(rows_per_call, BIAS_ELEMENTS_PER_CALL // max(1, per_row)))
    for q0 in range(0, q_len, step):
        q1 = min(q0 + step, q_len)
        keys = q1 if causal else kv_len
        allowed = additive = None
        q_idx = torch.arange(q0, q1, device=device)[:, None]
        k_idx = torch.arange(keys, device=device)[None, :]
        if causal:
            allowed = (k_idx <= q_idx)[None, None]  # (1, 1, rows, keys)
        if key_padding_mask is not None:
            padding = key_padding_mask[:, None, None, :keys]
            allowed = padding if allowed is None else allowed & padding
        if slopes is not None:
            additive = alibi_bias(slopes, q_idx, k_idx)[None]  # (1, h, rows, keys)
        yield q0, q1, keys, _Call("global", q0, q1, None, allowed, None, additive, kv_heads)


class _DenseChunksFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, q: Tensor, k: Tensor, v: Tensor, kpm: Tensor | None, scale: float, causal: bool,
        slopes: Tensor | None, rows_per_call: int,
    ) -> Tensor:
        batch, heads, q_len, _ = q.shape
        out = torch.empty_like(q)
        lses = []
        for q0, q1, keys, call in _dense_calls(
            q_len, k.shape[2], batch, heads, k.shape[1], causal, kpm, slopes, q.device, rows_per_call
        ):
            o, lse = _chunk_forward(q[:, :, q0:q1], k[:, :, :keys], v[:, :, :keys], call, scale)
            out[:, :, q0:q1] = o
            lses.append(lse)
        ctx.args = (scale, causal, rows_per_call)
        ctx.save_for_backward(q, k, v, out, kpm, slopes, *lses)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, kpm, slopes, *lses = ctx.saved_tensors
        scale, causal, rows_per_call = ctx.args
        acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        grad_q = torch.empty_like(q, dtype=acc)
        grad_k = torch.zeros_like(k, dtype=acc)
        grad_v = torch.zeros_like(v, dtype=acc)
        calls = _dense_calls(q.shape[2], k.shape[2], q.shape[0], q.shape[1], k.shape[1], causal, kpm, slopes,
                             q.device, rows_per_call)
        for (q0, q1, keys, call), lse in zip(calls, lses):
            gq, gk, gv = _chunk_backward(
                grad_out[:, :, q0:q1], q[:, :, q0:q1], k[:, :, :keys], v[:, :, :keys], out[:, :, q0:q1], lse, call,
                scale,
            )
            grad_q[:, :, q0:q1] = gq
            grad_k[:, :, :keys] += gk
            grad_v[:, :, :keys] += gv
        return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), None, None, None, None, None


def dense_chunked_attention(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, scale: float, *, causal: bool,
    slopes: Tensor | None = None, dropout_p: float = 0.0, rows_per_call: int = DENSE_ROWS_PER_CALL,
) -> Tensor:
    """Exact full attention in chunks of query rows, each against a slice of the keys: never an n x n tensor.

    Args:
        q: ``(batch, heads, q_len, head_dim)``; k, v: ``(batch, kv_heads, kv_len, head_dim)`` (grouped heads).
        key_padding_mask: bool ``(batch, kv_len)``, True = real key, or None.
        scale: score scale.
        causal: key j <= query i (needs ``q_len == kv_len``); a chunk reads only its causal prefix of the keys.
        slopes: ``(heads,)`` ALiBi slopes, or None.
        dropout_p: attention dropout; when > 0 the chunks run through ``F.scaled_dot_product_attention`` and plain
            autograd (which keeps each chunk's weights for backward), otherwise a recomputing backward keeps
            O(n * d) plus one chunk.

    Memory per call: ``rows * keys`` (times heads with ALiBi, times batch with padding) mask elements, bounded by
    :data:`BIAS_ELEMENTS_PER_CALL`.
    """
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"causal dense attention needs q_len == kv_len, got {q.shape[2]} and {k.shape[2]}")
    if dropout_p == 0.0:
        return _DenseChunksFunction.apply(q, k, v, key_padding_mask, scale, causal, slopes, rows_per_call)
    outs = []
    for q0, q1, keys, call in _dense_calls(q.shape[2], k.shape[2], q.shape[0], q.shape[1], k.shape[1], causal,
                                           key_padding_mask, slopes, q.device, rows_per_call):
        mask, has_key = _sdpa_mask(call, q.dtype)
        o = F.scaled_dot_product_attention(q[:, :, q0:q1], k[:, :, :keys], v[:, :, :keys], attn_mask=mask,
                                           dropout_p=dropout_p, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
        outs.append(o if has_key is None else o * has_key)
    return torch.cat(outs, dim=2)
