"""MoBA: Mixture of Block Attention, softmax attention over content-selected key blocks.

Lu et al. 2025, "MoBA: Mixture of Block Attention for Long-Context LLMs", arXiv:2502.13189.
Keys are split into blocks of ``block_size`` tokens. Each key block is represented by the mean of its (real) keys;
a query scores every key block by the dot product with that mean, keeps its ``top_k`` best blocks, and attends with
exact softmax over the selected blocks' keys only. Its own block is always selected (``top_k`` counts it) and is
causally masked; causal rows never select a block after their own (section 2.2).

Our deviations from the paper (both documented in ``selected_blocks``):

* **Selection per query block, not per token.** The paper gates every query token separately; here all queries of
  a query block share one selection, made from one representative query of the block, so the blocked kernel
  gathers the selected key blocks once per query block and runs one fused attention call over them.
* **The causal representative looks back, not ahead.** Non-causal, the representative is the mean query of the
  block. Causal, a block's mean query would let the output at position t depend on the queries after t in its
  block (not causal, not prefix-consistent, and impossible to reproduce while decoding), so it is the mean of the
  ``block_size`` queries ending at the block's first token (positions ``r*B - B + 1 .. r*B``, fewer for block 0):
  everything every query of the block has already seen. Block r's selection then depends only on tokens up to
  ``r*B`` and on complete earlier key blocks, so the output at t depends on tokens ``0..t`` only.

Clamping: a query block with fewer candidate blocks than ``top_k - 1`` (early causal rows, short inputs, key blocks
that are all padding) takes all of them; unused slots of ``selected_blocks`` are ``-1``. A key block with no real key
is never a candidate.

Gradients: the selection is a constant for autograd (computed under ``no_grad``, as in the paper); gradients flow
through the attention over the selected keys only.

Defaults ``block_size=64, top_k=3``: the paper's main setting (8K context, block 512, top-3: 16 blocks, 3/16 of the
keys) scaled by 1/8 to our 1K lengths; at 16K the benchmark suite sets the paper's block 512, top-3.

Backends (shapes: q ``(batch, heads, seq, head_dim)``, k, v ``(batch, kv_heads, seq, head_dim)``; inputs are padded internally to a multiple of ``block_size``):

* ``torch``: the selection ``(batch, heads, query blocks, key blocks)`` scores (never n x n), then, per group of
  query blocks, one flattened gather of the selected key blocks and the fused CPU flash kernel, with a recomputing
  backward (the recipe and chunk kernels of :mod:`efficient_attn.attention.blocked`). O(n * top_k * block_size * d)
  time, O(n * d + n^2 / block_size^2) memory.
* ``naive``: the same selection expanded to a dense ``(batch, heads, n, n)`` mask (:meth:`dense_mask_for`) and the
  dense oracle.
* ``flex``: the same selection turned into a FlexAttention ``BlockMask`` per call (:func:`moba_block_mask`: block
  lists built from ``selected``, 128-row tiles for blocks that are multiples of 128, a token-level ``mask_mod`` over
  the selection for smaller blocks grouped into one flex block; no n x n tensor, O(batch * heads * (n / 128)^2)
  int32 index tables that FlexAttention itself needs) and compiled FlexAttention (Dong et al. 2024, arXiv:2412.05496)
  over it, on the unpadded length. Forward-only and float32/16/bf16-only on CPU (torch 2.13), refused with
  :mod:`efficient_attn.attention.flex`'s reasons; each new input shape compiles once (5-15 s on a 2-core CPU).

Grouped-query heads (``num_kv_heads < num_heads``): every query head makes its own selection, scoring the block means
of its key/value head ``i // (heads / kv_heads)``, and its kernel gathers the selected blocks from that shared head
(the gathered blocks are per query head, as with ``num_kv_heads = num_heads``: the selections differ per head; k and
v themselves are never repeated, and their gradients are accumulated back into the shared head).

Decoding (causal): a :class:`~efficient_attn.attention.caches.KVCache` of every key and value (selection may pick any
earlier block: memory O(n)), plus the last ``block_size`` queries (a ring) and the current block's selection. When a
token starts block r, the representative (the mean of that ring) scores the means of the cached complete key blocks
(O(n * d / block_size) per block start, amortised O(n * d / block_size^2) per token) and the top ``top_k - 1`` are
kept; every token of block r then attends to its own block so far and the selected blocks: O(top_k * block_size * d).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from torch.autograd.function import once_differentiable

from efficient_attn.attention import flex as flex_backend
from efficient_attn.attention.base import Attention, AttentionConfig
from efficient_attn.attention.caches import KVCache
from efficient_attn.attention.blocked import (
    KEY_ROWS_PER_CALL,
    _Call,
    _chunk_backward,
    _chunk_forward,
    _use_cpu_flash,
)
from efficient_attn.attention.functional import combine_masks, default_scale, dense_attention, grouped_attention
from efficient_attn.attention.patterns import EMPTY
from efficient_attn.errors import require_positive_int
from efficient_attn.registry import register_attention

__all__ = [
    "MobaAttention", "MobaConfig", "flex_block_size", "moba_attention", "moba_block_mask", "select_blocks",
    "selection_mask",
]

#: Query rows per fused call (several query blocks are folded into the batch dimension of one call).
ROWS_PER_CALL = 1024


def _real_positions(batch: int, seq_len: int, padded: int, key_padding_mask: Tensor | None, device) -> Tensor:
    """Bool ``(batch, padded)``: inside the sequence and (if given) not padding."""
    inside = (torch.arange(padded, device=device) < seq_len)[None].expand(batch, padded)
    if key_padding_mask is None:
        return inside
    return inside & F.pad(key_padding_mask, (0, padded - seq_len), value=False)


def _representatives(q: Tensor, seq_len: int, block_size: int, causal: bool) -> Tensor:
    """``(batch, heads, blocks, d)``: the query that scores the key blocks for each query block (see the module
    docstring). ``q`` is padded to whole blocks."""
    bs = block_size
    blocks = rearrange(q, "b h (r c) d -> b h r c d", c=bs)
    if not causal:
        counts = (seq_len - torch.arange(blocks.shape[2], device=q.device) * bs).clamp(1, bs)  # real queries/block
        return blocks.sum(-2) / counts[:, None].to(q.dtype)
    # mean of q[r*B - B + 1 .. r*B] = (sum of block r-1 - its first query + the first query of block r) / B
    first = blocks[:, :, :, 0]  # (b, h, r, d)
    window = blocks.sum(-2)[:, :, :-1] - first[:, :, :-1] + first[:, :, 1:]
    return torch.cat([first[:, :, :1], window / bs], dim=2)


def select_blocks(
    q: Tensor,
    k: Tensor,
    *,
    block_size: int,
    top_k: int,
    causal: bool,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """The key blocks each query block attends to: long ``(batch, heads, query_blocks, top_k)``.

    Slot 0 is the query block's own block; then its best ``top_k - 1`` other candidate blocks by
    ``representative . mean key``, in increasing block order; ``-1`` marks unused slots (fewer candidates). The
    representative is the block's mean query (non-causal) or the mean of the ``block_size`` queries ending at the
    block's first token (causal); see the module docstring. Computed under ``no_grad``: a constant for autograd.

    Args:
        q: ``(batch, heads, seq, head_dim)``; k: ``(batch, kv_heads, seq, head_dim)`` (query head i scores the key
            blocks of key/value head ``i // (heads / kv_heads)``).
        key_padding_mask: bool ``(batch, seq)``, True = real; key blocks without a real key are never candidates.
    """
    with torch.no_grad():
        b, h, n, d = q.shape
        bs = block_size
        nb = math.ceil(n / bs)
        padded = nb * bs
        # each pass over q or k costs as much as the rest of the selection: no copy unless the length needs padding,
        # and the keys are weighted only when some are padding (the zero padding beyond n adds nothing to a sum)
        q, k = q.detach(), k.detach()
        if padded != n:
            q, k = (F.pad(t, (0, 0, 0, padded - n)) for t in (q, k))
        real = _real_positions(b, n, padded, key_padding_mask, q.device)
        weights = rearrange(real, "b (r c) -> b 1 r c 1", c=bs).to(k.dtype)
        counts = weights.sum(-2)  # (b, 1, nb, 1)
        key_blocks = rearrange(k, "b h (r c) d -> b h r c d", c=bs)
        key_sums = (key_blocks * weights if key_padding_mask is not None else key_blocks).sum(-2)
        key_means = key_sums / counts.clamp_min(1)
        reps = _representatives(q, n, bs, causal)  # (b, h, nb, d)
        r = h // k.shape[1]  # query heads per key/value head
        scores = torch.einsum("bgrqd,bgkd->bgrqk", rearrange(reps, "b (g r) q d -> b g r q d", r=r), key_means)
        scores = rearrange(scores, "b g r q k -> b (g r) q k")  # (b, h, query blocks, key blocks)
        blk = torch.arange(nb, device=q.device)
        candidate = (blk[None, :] < blk[:, None]) if causal else (blk[None, :] != blk[:, None])  # (nb, nb)
        candidate = candidate & (counts[:, :, None, :, 0] > 0)  # (b, 1, nb, nb)
        scores = scores.masked_fill(~candidate, -math.inf)
        own = blk[None, None, :, None].expand(b, h, nb, 1)
        others = min(top_k - 1, nb - 1)
        parts = [own]
        if others > 0:
            best, index = scores.topk(others, dim=-1)  # (b, h, nb, others)
            index = torch.where(torch.isfinite(best), index, nb)  # no candidate -> sorts last
            index = index.sort(dim=-1).values
            parts.append(torch.where(index < nb, index, EMPTY))
        if top_k > 1 + max(others, 0):
            parts.append(torch.full((b, h, nb, top_k - 1 - max(others, 0)), EMPTY, device=q.device))
        return torch.cat(parts, dim=-1)


def selection_mask(selected: Tensor, seq_len: int, block_size: int, causal: bool) -> Tensor:
    """Bool ``(batch, heads, seq, seq)``: the token pairs a selection allows (key padding not included). O(n^2)."""
    b, h, nb, _ = selected.shape
    blocks = torch.zeros(b, h, nb, nb + 1, dtype=torch.bool, device=selected.device)
    blocks.scatter_(-1, torch.where(selected >= 0, selected, nb), True)  # (b, h, query block, key block)
    idx = torch.arange(seq_len, device=selected.device)
    blk = idx // block_size
    mask = blocks[:, :, blk][:, :, :, blk]  # (b, h, n, n)
    return mask & (idx[None, :] <= idx[:, None]) if causal else mask


# --------------------------------------------------------------------------------------------- blocked kernel
def _groups(num_blocks: int, block_size: int, heads: int, slots: int) -> list[tuple[int, int]]:
    g = max(1, min(ROWS_PER_CALL // block_size, KEY_ROWS_PER_CALL // max(1, heads * slots * block_size)))
    return [(s, min(s + g, num_blocks)) for s in range(0, num_blocks, g)]


class _Chunk:
    """Index arithmetic of one group of query blocks ``start:stop`` (shared by forward and backward)."""

    def __init__(self, selected: Tensor, real: Tensor | None, start: int, stop: int, block_size: int,
                 causal: bool, triangle: Tensor | None, biases: dict, kv_heads: int) -> None:
        b, h, nb, s = selected.shape
        self.start, self.stop, self.heads = start, stop, h
        sel = selected[:, :, start:stop]  # (b, h, g, s)
        kv_head = torch.arange(h, device=sel.device) // (h // kv_heads)  # query head -> its key/value head
        offsets = (torch.arange(b, device=sel.device)[:, None] * kv_heads + kv_head) * nb
        flat = sel.clamp_min(0) + offsets[:, :, None, None]  # into (b * kv_heads * nb) key blocks
        self.index = rearrange(flat, "b h g s -> (b g h s)")
        #: Causal rows with every slot used and every key real run as two mask-free calls merged by their
        #: log-sum-exp: the own block with the kernel's causal flag, the earlier blocks with no mask at all.
        self.split = causal and real is None and start >= s - 1
        self.history_index = rearrange(flat[..., 1:], "b h g s -> (b g h s)") if self.split and s > 1 else None
        #: grouped heads: the own block is gathered per query head from the shared head (the fused CPU kernel
        #: takes equal head counts); None = the own block's rows are a view of k, v
        self.own_index = rearrange(flat[..., :1], "b h g s -> (b g h s)") if self.split and kv_heads != h else None
        # every slot used and every key real: the mask is the constant causal triangle of the own slot (or none)
        if real is None and (not causal or start >= s - 1):
            allowed, call_biases = triangle, biases
        else:
            slot_used = rearrange(sel >= 0, "b h g s -> (b g) h 1 s 1")
            keys_real = slot_used.expand(*slot_used.shape[:-1], block_size) if real is None else rearrange(
                rearrange(real, "b (r c) -> b r c", c=block_size)[
                    torch.arange(b, device=sel.device)[:, None, None, None], sel.clamp_min(0)
                ],
                "b h g s c -> (b g) h 1 s c",
            )
            allowed = (slot_used & keys_real).flatten(-2)  # (b * g, h, 1, s * c)
            if triangle is not None:
                allowed = allowed & triangle
            call_biases = None
        self.call = _Call("blocks", start, stop, None, allowed, call_biases)

    def rows(self, x: Tensor, block_size: int) -> Tensor:
        """Query-side rows ``(batch * g, heads, g_rows, d)`` of ``x`` ``(batch, heads, padded, d)``."""
        part = x[:, :, self.start * block_size:self.stop * block_size]
        return rearrange(part, "b h (g c) d -> (b g) h c d", c=block_size)  # a view when b or g is 1

    def put_rows(self, dest: Tensor, value: Tensor, block_size: int) -> None:
        g = self.stop - self.start
        target = dest[:, :, self.start * block_size:self.stop * block_size]
        target.copy_(rearrange(value, "(b g) h c d -> b h (g c) d", g=g))

    def row_view(self, dest: Tensor, block_size: int) -> Tensor | None:
        """``dest``'s rows as a ``(batch * g, heads, c, d)`` view to write into, or None when no view exists."""
        if dest.shape[0] != 1 and self.stop - self.start != 1:
            return None
        return self.rows(dest, block_size)

    def add_rows(self, dest: Tensor, value: Tensor, block_size: int) -> None:
        g = self.stop - self.start
        target = dest[:, :, self.start * block_size:self.stop * block_size]
        target += rearrange(value, "(b g) h c d -> b h (g c) d", g=g).to(dest.dtype)

    def keys(self, x: Tensor, block_size: int, history: bool = False) -> Tensor:
        """Gathered key blocks ``(batch * g, heads, slots * block_size, d)`` of ``x`` ``(batch, kv_heads, padded,
        d)``, each query head's from its key/value head (``history``: slots 1.. only)."""
        return self._gather(x, self.history_index if history else self.index, block_size)

    def _gather(self, x: Tensor, index: Tensor, block_size: int) -> Tensor:
        b, _, _, d = x.shape
        g = self.stop - self.start
        rows = x.reshape(-1, block_size, d).index_select(0, index)  # (b * g * h * s, c, d)
        return rows.view(b * g, self.heads, -1, d)

    def add_keys(self, dest: Tensor, value: Tensor, block_size: int, history: bool = False) -> None:
        self._scatter(dest, value, self.history_index if history else self.index, block_size)

    @staticmethod
    def _scatter(dest: Tensor, value: Tensor, index: Tensor, block_size: int) -> None:
        d = dest.shape[-1]
        dest.view(-1, block_size, d).index_add_(0, index, value.reshape(-1, block_size, d).to(dest.dtype))

    def own_keys(self, x: Tensor, block_size: int) -> Tensor:
        """The own block's keys (or values) ``(batch * g, heads, c, d)``: a view of the rows, or (grouped heads) the
        block gathered per query head from its key/value head."""
        return self.rows(x, block_size) if self.own_index is None else self._gather(x, self.own_index, block_size)

    def add_own(self, dest: Tensor, value: Tensor, block_size: int) -> None:
        """Accumulate the own block's key (or value) gradient into ``dest`` ``(batch, kv_heads, padded, d)``."""
        if self.own_index is None:
            self.add_rows(dest, value, block_size)
        else:
            self._scatter(dest, value, self.own_index, block_size)


def _own_call(q: Tensor) -> _Call:
    """The own block's causal mask as a call (for the matmul path off CPU)."""
    c = q.shape[-2]
    return _Call("blocks", 0, 0, None, torch.ones(c, c, dtype=torch.bool, device=q.device).tril_()[None, None])


def _part_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """Mask-free exact attention of one part (``causal``: the own block, queries and keys aligned)."""
    if _use_cpu_flash(q):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)[:2]
        return out, lse
    return _chunk_forward(q, k, v, _own_call(q) if causal else _Call("blocks", 0, 0, None, None), scale)


def _part_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool,
                   scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of one part given the *merged* output and log-sum-exp: the part's probabilities are
    ``exp(scores - lse)`` of the whole row, so the part's share of every gradient comes out exactly."""
    if _use_cpu_flash(q):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out.contiguous(), q, k, v, out, lse, 0.0, causal, scale=scale
        )
    call = _own_call(q) if causal else _Call("blocks", 0, 0, None, None)
    return _chunk_backward(grad_out, q, k, v, out, lse, call, scale)


def _merge(own: tuple[Tensor, Tensor], history: tuple[Tensor, Tensor], out: Tensor | None) -> tuple[Tensor, Tensor]:
    """Combine two partial softmax attentions over disjoint keys by their log-sum-exps (rows never empty here);
    written into ``out`` when given."""
    (o1, l1), (o2, l2) = own, history
    share = torch.sigmoid(l1 - l2)[..., None]  # exp(l1) / (exp(l1) + exp(l2))
    merged = torch.lerp(o2, o1, share) if out is None else torch.lerp(o2, o1, share, out=out)
    return merged, torch.logaddexp(l1, l2)


def _triangle(slots: int, block_size: int, causal: bool, device) -> Tensor | None:
    if not causal:
        return None
    own = torch.ones(block_size, block_size, dtype=torch.bool, device=device).tril_()
    rest = torch.ones(block_size, (slots - 1) * block_size, dtype=torch.bool, device=device)
    return torch.cat([own, rest], dim=-1)[None, None]  # (1, 1, c, s * c)


class _MobaFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, selected: Tensor, real: Tensor | None, block_size: int,
                causal: bool, scale: float) -> Tensor:
        b, h, padded, d = q.shape
        nb, slots = selected.shape[2], selected.shape[3]
        triangle = _triangle(slots, block_size, causal, q.device)
        biases: dict = {}
        out = torch.empty_like(q)
        lses = []
        for start, stop in _groups(nb, block_size, h, slots):
            chunk = _Chunk(selected, real, start, stop, block_size, causal, triangle, biases, k.shape[1])
            qc = chunk.rows(q, block_size)
            if chunk.split:
                o, lse = _part_forward(qc, chunk.own_keys(k, block_size), chunk.own_keys(v, block_size), True, scale)
                if chunk.history_index is not None:
                    history = _part_forward(qc, chunk.keys(k, block_size, history=True),
                                            chunk.keys(v, block_size, history=True), False, scale)
                    target = chunk.row_view(out, block_size)
                    o, lse = _merge((o, lse), history, target)
                    if target is not None:
                        lses.append(lse)
                        continue  # merged straight into the output
            else:
                o, lse = _chunk_forward(qc, chunk.keys(k, block_size), chunk.keys(v, block_size), chunk.call, scale)
            chunk.put_rows(out, o, block_size)
            lses.append(lse)
        ctx.block_size, ctx.causal, ctx.scale = block_size, causal, scale
        ctx.save_for_backward(q, k, v, out, selected, real, *lses)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, selected, real, *lses = ctx.saved_tensors
        bs = ctx.block_size
        h, (nb, slots) = q.shape[1], selected.shape[2:]
        acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        grad_q = torch.empty_like(q, dtype=acc)
        grad_k = torch.zeros_like(k, dtype=acc)
        grad_v = torch.zeros_like(v, dtype=acc)
        triangle = _triangle(slots, bs, ctx.causal, q.device)
        biases: dict = {}
        for (start, stop), lse in zip(_groups(nb, bs, h, slots), lses):
            chunk = _Chunk(selected, real, start, stop, bs, ctx.causal, triangle, biases, k.shape[1])
            if chunk.split:
                go, qc, oc = chunk.rows(grad_out, bs), chunk.rows(q, bs), chunk.rows(out, bs)
                gq, gk, gv = _part_backward(go, qc, chunk.own_keys(k, bs), chunk.own_keys(v, bs), oc, lse, True,
                                            ctx.scale)
                chunk.add_own(grad_k, gk, bs)
                chunk.add_own(grad_v, gv, bs)
                if chunk.history_index is not None:
                    hq, hk, hv = _part_backward(go, qc, chunk.keys(k, bs, history=True),
                                                chunk.keys(v, bs, history=True), oc, lse, False, ctx.scale)
                    gq = gq + hq
                    chunk.add_keys(grad_k, hk, bs, history=True)
                    chunk.add_keys(grad_v, hv, bs, history=True)
                chunk.put_rows(grad_q, gq, bs)
                continue
            gq, gk, gv = _chunk_backward(
                chunk.rows(grad_out, bs), chunk.rows(q, bs), chunk.keys(k, bs), chunk.keys(v, bs),
                chunk.rows(out, bs), lse, chunk.call, ctx.scale,
            )
            chunk.put_rows(grad_q, gq, bs)
            chunk.add_keys(grad_k, gk, bs)
            chunk.add_keys(grad_v, gv, bs)
        return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), None, None, None, None, None


def moba_attention(
    q: Tensor, k: Tensor, v: Tensor, selected: Tensor, real: Tensor | None, *, block_size: int, causal: bool,
    scale: float,
) -> Tensor:
    """Exact softmax attention of each query block over its selected key blocks (the ``torch`` backend).

    Args:
        q: ``(batch, heads, padded, head_dim)``, padded a multiple of ``block_size``; k, v: ``(batch, kv_heads,
            padded, head_dim)`` (query head i gathers from key/value head ``i // (heads / kv_heads)``).
        selected: long ``(batch, heads, padded / block_size, slots)`` from :func:`select_blocks` (own block first,
            ``-1`` = unused); ``slots`` key blocks are gathered per query block.
        real: bool ``(batch, padded)`` (False = padding or beyond the sequence), or None when every key is real.
        causal: mask the own block's later keys.

    Returns:
        ``(batch, heads, padded, head_dim)``; a query with no allowed key gets zeros.
    """
    return _MobaFunction.apply(q.contiguous(), k.contiguous(), v.contiguous(), selected.contiguous(), real,
                               block_size, causal, scale)


# ------------------------------------------------------------------------------------------------ flex backend
def flex_block_size(block_size: int) -> int:
    """FlexAttention's block (rows and columns) for MoBA blocks of ``block_size`` tokens.

    * a multiple of :data:`~efficient_attn.attention.flex.FLEX_BLOCK` (128): 128, each MoBA block split into
      ``block_size / 128`` tiles per side, so the causal own block skips the tiles above its diagonal (block 512:
      10 of 16 tiles computed) and only the diagonal tiles run the ``mask_mod``;
    * below 128: the smallest multiple of ``block_size`` from 128 up, several MoBA blocks per flex block, and the
      ``mask_mod`` reads the selection at token level;
    * otherwise (above 128, not a multiple of it): ``block_size`` itself, one MoBA block per flex block.

    Measured on torch 2.13's CPU kernel: it runs any block size (16, 64, 96, 128, 512 checked, lengths not a multiple
    of it too) but loops over the listed tiles one at a time, so tiles much below 128 rows pay their per-tile cost on
    few pairs, and at 16K tokens (block 512, top-3, causal, 4 heads of 64) 128-row tiles ran 400 ms against 467 ms
    for 512-row tiles (shared machine, medians of 7). CUDA's Triton kernel needs a multiple of its own tile (64 or
    128), which the first two rules give for power-of-two blocks.
    """
    tile = flex_backend.FLEX_BLOCK
    if block_size % tile == 0:
        return tile
    if block_size < tile:
        return block_size * math.ceil(tile / block_size)
    return block_size


def _block_lists(blocks: Tensor, keep: Tensor, num_kv_blocks: int) -> tuple[Tensor, Tensor]:
    """FlexAttention's lists from per-slot candidates: int32 counts ``(..., rows)`` and indices ``(..., rows,
    num_kv_blocks)`` (the kept ``blocks`` first, in slot order; the rest of each row is 0, never read)."""
    order = torch.argsort((~keep).to(torch.uint8), dim=-1, stable=True)
    indices = blocks.gather(-1, order).clamp(0, num_kv_blocks - 1)[..., :num_kv_blocks]
    indices = F.pad(indices, (0, num_kv_blocks - indices.shape[-1]))
    return keep.sum(-1, dtype=torch.int32), indices.to(torch.int32).contiguous()


def moba_block_mask(
    selected: Tensor,
    seq_len: int,
    *,
    block_size: int,
    causal: bool,
    key_padding_mask: Tensor | None = None,
    with_q_blocks: bool = False,
) -> "BlockMask":  # noqa: F821
    """The ``BlockMask`` of a selection: FlexAttention computes exactly the pairs of :func:`selection_mask` (AND the
    key padding), built at block level from ``selected``, never from a dense mask.

    Args:
        selected: long ``(batch, heads, query_blocks, slots)`` from :func:`select_blocks` (own block first, ``-1`` =
            unused), ``query_blocks = ceil(seq_len / block_size)``; heads are query heads (grouped heads too).
        key_padding_mask: bool ``(batch, seq_len)``, True = real.
        with_q_blocks: also build the transposed (per key block) lists, which only a backward pass reads.

    Construction, with ``T = flex_block_size(block_size)``:

    * ``block_size = s * T`` (s >= 1, one or several flex tiles per MoBA block): flex row i of query block r lists
      the ``s`` tiles of each block ``r`` selected. A tile is "partial" (the ``mask_mod`` runs on it) when it is a
      diagonal tile of a causal own block (the triangle ``q_idx >= kv_idx``) or holds a padded key
      (``key_padding_mask[b, kv_idx]``); the own block's tiles after the diagonal are left out, every other listed
      tile is "full" (no ``mask_mod``). Tiles past the sequence end or without a real key are dropped.
    * ``T = m * block_size`` (m > 1, several MoBA blocks per flex block): flex block R lists, as partial, the flex
      blocks holding any block selected by one of its ``m`` MoBA query blocks (sorted; duplicates and blocks
      without a real key dropped); the ``mask_mod`` checks per token that MoBA block ``kv_idx // block_size`` is
      one of the ``slots`` entries of ``selected[b, h, q_idx // block_size]`` (an unrolled comparison, no table
      beyond the selection), and the causal triangle and padding as above. FlexAttention then scores up to
      ``m^2`` times the selection's pairs (masked away); the output is exact.

    Cost: the per-row candidate lists, O(batch * heads * blocks * slots * s^2) (or ``* m`` grouped); the
    ``mask_mod`` reads the selection (O(batch * heads * blocks * slots)) and the real-key flags (O(batch * n)).
    FlexAttention itself needs ``kv_indices`` and ``full_kv_indices`` as int32 ``(batch, heads, n / T, n / T)``
    tables (its kernel bounds the key length by their last dimension; only the first ``kv_num_blocks`` entries of a
    row are read): 16K tokens at T = 128 are 128 x 128 entries per head and table, 64 KiB. With ``with_q_blocks``
    its transposition adds a bool and an int32 table of that size. No ``n x n`` tensor.
    """
    from torch.nn.attention.flex_attention import BlockMask

    b, h, nb, slots = selected.shape
    tile = flex_block_size(block_size)
    nf = math.ceil(seq_len / tile)
    device = selected.device
    real = None
    # per flex block: no padded key (clean), some real key (a block without one is never listed)
    clean = some_real = torch.ones(b, nf + 1, dtype=torch.bool, device=device)  # column nf: "no block", unread
    if key_padding_mask is not None:
        real = F.pad(key_padding_mask, (0, nf * tile - seq_len), value=False)  # (b, nf * T): beyond n is never read
        in_range = (seq_len - torch.arange(nf, device=device) * tile).clamp(max=tile)
        count = rearrange(real, "b (k t) -> b k t", t=tile).sum(-1)
        clean, some_real = (F.pad(flag, (0, 1), value=True) for flag in (count == in_range, count > 0))
    batch = torch.arange(b, device=device)[:, None, None, None]
    table = None
    if block_size % tile == 0:
        s = block_size // tile
        sub = torch.arange(s, device=device)
        tiles = rearrange(selected[..., None] * s + sub, "b h r k j -> b h r (k j)")  # (b, h, nb, slots * s)
        tiles = torch.where((selected >= 0).repeat_interleave(s, dim=-1) & (tiles < nf), tiles, nf)  # nf: unused
        # flex row (r, i) of query block r: the same candidates; i decides the own block's triangle
        tiles = rearrange(tiles[:, :, :, None].expand(-1, -1, -1, s, -1), "b h r i c -> b h (r i) c")[:, :, :nf]
        used = (tiles < nf) & some_real[batch, tiles]
        row_tile = torch.arange(nb * s, device=device)[:nf] % s  # i
        column = torch.arange(slots * s, device=device)
        own_tile = torch.where(column < s, column, -1)  # j for the own block's tiles, -1 for the others
        partial = used & ~clean[batch, tiles]
        if causal:
            keep = used & (own_tile[None, :] <= row_tile[:, None])  # the own block's tiles up to the diagonal
            partial = (partial | (own_tile[None, :] == row_tile[:, None])) & keep
        else:
            keep = used
        lists = (*_block_lists(tiles, partial, nf), *_block_lists(tiles, keep & ~partial, nf))
    else:
        m = tile // block_size
        table = F.pad(selected, (0, 0, 0, nf * m - nb), value=EMPTY)  # (b, h, nf * m, slots)
        groups = rearrange(table, "b h (r m) s -> b h r (m s)", m=m)
        candidates = torch.where(groups >= 0, groups // m, nf).sort(dim=-1).values  # nf = no block, sorts last
        repeated = F.pad(candidates[..., 1:] == candidates[..., :-1], (1, 0), value=False)
        keep = (candidates < nf) & ~repeated & some_real[batch, candidates]
        lists = (*_block_lists(candidates, keep, nf), None, None)
    return BlockMask.from_kv_blocks(
        *lists,
        BLOCK_SIZE=tile,
        mask_mod=_selection_mod(table, block_size, causal, real),
        seq_lengths=(seq_len, seq_len),
        compute_q_blocks=with_q_blocks,
    )


def _selection_mod(
    table: Tensor | None, block_size: int, causal: bool, real: Tensor | None
) -> flex_backend.MaskMod | None:
    """``mask_mod`` of :func:`moba_block_mask`: (``table``, grouped blocks) the selection per token, the causal
    triangle, the real keys; None when nothing is masked inside a listed block (FlexAttention's no-op)."""
    if table is None and not causal and real is None:
        return None
    slots = 0 if table is None else table.shape[-1]

    def moba_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        terms = []
        if table is not None:
            row, key_block = q_idx // block_size, kv_idx // block_size
            hit = table[b, h, row, 0] == key_block
            for slot in range(1, slots):
                hit = hit | (table[b, h, row, slot] == key_block)
            terms.append(hit)
        if causal:
            terms.append(q_idx >= kv_idx)
        if real is not None:
            terms.append(real[b, kv_idx])
        allowed = terms[0]
        for term in terms[1:]:
            allowed = allowed & term
        return allowed

    return moba_mask


# ----------------------------------------------------------------------------------------------------- module
@dataclass(kw_only=True)
class MobaConfig(AttentionConfig):
    """MoBA parameters.

    Attributes:
        block_size: tokens per key (and query) block; inputs are padded to a multiple of it.
        top_k: key blocks per query block, the own block included (>= 1); rows with fewer blocks take all.
    """

    block_size: int = 64
    top_k: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive_int("block_size", self.block_size)
        require_positive_int("top_k", self.top_k)
        if self.dropout != 0.0:
            raise ValueError(
                f"dropout must be 0 for moba, got {self.dropout!r}: its recomputing backward cannot replay dropout"
            )


@register_attention(
    "moba",
    MobaConfig,
    description="MoBA (Lu et al. 2025): exact attention over the top-k key blocks chosen by mean-key scores",
    paper="Lu et al. 2025, arXiv:2502.13189",
    complexity="O(n*k*b + n^2/b)",
    backends=("torch", "naive", "flex"),
    # exact softmax over its selection, but the pattern depends on q and k: the contract's dense_mask(seq_len)
    # cannot describe it (dense_mask_for(q, k) does), so it is registered as not exact
    exact=False,
    length_multiple=64,
)
class MobaAttention(Attention):
    """MoBA on ``(batch, heads, seq, head_dim)`` q, k, v (see the module docstring for the selection rule)."""

    config: MobaConfig
    decode_unsupported_reason = None
    supports_gqa = True
    decode_reaches_all_earlier = False  # the selection decides (see _decode_reach)

    # ------------------------------------------------------------------------------------------------ decoding
    def _new_cache(self, common: dict) -> KVCache:
        cache = KVCache(**common)
        b, h, d, bs = common["batch"], self.config.num_heads, common["head_dim"], self.config.block_size
        cache.extra["queries"] = torch.zeros(b, h, bs, d, dtype=common["dtype"], device=common["device"])
        cache.extra["selected"] = torch.full((b, h, max(0, self.config.top_k - 1)), EMPTY, dtype=torch.long,
                                             device=common["device"])
        return cache

    def _remember_queries(self, cache: KVCache, q: Tensor, start: int) -> None:
        bs = self.config.block_size
        keep = min(q.shape[-2], bs)
        slots = torch.arange(start + q.shape[-2] - keep, start + q.shape[-2], device=q.device) % bs
        cache.extra["queries"][:, :, slots] = q[:, :, q.shape[-2] - keep:]

    def _cache_fill(self, cache: KVCache, q: Tensor, k: Tensor, v: Tensor, real: Tensor | None) -> None:
        cache.append(k, v, real)
        self._remember_queries(cache, q, 0)
        last = (q.shape[-2] - 1) // self.config.block_size
        selected = self.selected_blocks(q, k, real)[:, :, last, 1:]  # slot 0 is the own block
        cache.extra["selected"] = selected

    def _decode_step(self, cache: KVCache, q: Tensor, k: Tensor, v: Tensor, real: Tensor | None) -> Tensor:
        cfg = self.config
        bs = cfg.block_size
        t = cache.length
        cache.append(k, v, real)
        self._remember_queries(cache, q, t)
        keys, values, is_real = cache.view()
        row = t // bs
        if t % bs == 0:  # a new block: its selection from the queries ending here and the complete key blocks
            cache.extra["selected"] = self._select_for_row(cache, row, keys[:, :, : row * bs], is_real[:, : row * bs])
        selected = cache.extra["selected"]  # (b, h, top_k - 1)
        offs = torch.arange(bs, device=q.device)
        history = torch.where(selected[..., None] >= 0, selected[..., None] * bs + offs, t + 1).flatten(-2)
        own = (row * bs + offs).expand(*history.shape[:2], bs)
        tokens = torch.cat([own, history], dim=-1)  # (b, h, s)
        valid = tokens <= t
        tokens = tokens.clamp_max(t)
        # each query head's tokens, gathered from its key/value head: (b, kv_heads, r * s) -> (b, heads, s, d)
        per_kv = rearrange(tokens, "b (g r) s -> b g (r s)", g=keys.shape[1])
        index = per_kv[..., None].expand(-1, -1, -1, keys.shape[-1])
        keys_g, values_g = (rearrange(t.gather(2, index), "b g (r s) d -> b (g r) s d", s=tokens.shape[-1])
                            for t in (keys, values))
        allowed = valid & is_real.gather(1, tokens.flatten(1)).view_as(tokens)
        return grouped_attention(q, keys_g, values_g, allowed[:, :, None, :])

    def _select_for_row(self, cache: KVCache, row: int, keys: Tensor, real: Tensor) -> Tensor:
        """Long ``(b, h, top_k - 1)``: the best earlier key blocks of query block ``row`` (as :func:`select_blocks`)."""
        bs, others = self.config.block_size, max(0, self.config.top_k - 1)
        b, h = keys.shape[0], self.config.num_heads  # query heads (keys has the key/value heads)
        if row == 0 or others == 0:
            return torch.full((b, h, others), EMPTY, dtype=torch.long, device=keys.device)
        with torch.no_grad():
            rep = cache.extra["queries"].sum(-2) / bs  # (b, h, d): the ring holds queries row*bs - bs + 1 .. row*bs
            weights = rearrange(real, "b (r c) -> b 1 r c 1", c=bs).to(keys.dtype)
            counts = weights.sum(-2)  # (b, 1, r, 1)
            means = (rearrange(keys, "b h (r c) d -> b h r c d", c=bs) * weights).sum(-2) / counts.clamp_min(1)
            rep = rearrange(rep, "b (g r) d -> b g r d", g=keys.shape[1])  # query heads by key/value head
            scores = rearrange(torch.einsum("bgrd,bgkd->bgrk", rep, means), "b g r k -> b (g r) k")
            scores = scores.masked_fill(counts[..., 0] <= 0, -math.inf)
            best, index = scores.topk(min(others, row), dim=-1)
            index = torch.where(torch.isfinite(best), index, row).sort(dim=-1).values
            index = torch.where(index < row, index, EMPTY)
        if index.shape[-1] < others:
            index = F.pad(index, (0, others - index.shape[-1]), value=EMPTY)
        return index

    # ------------------------------------------------------------------------------------------- selection API
    def selected_blocks(self, q: Tensor, k: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """Long ``(batch, heads, query_blocks, top_k)``: what ``attend`` selects (see :func:`select_blocks`)."""
        cfg = self.config
        return select_blocks(q, k, block_size=cfg.block_size, top_k=cfg.top_k, causal=cfg.causal,
                             key_padding_mask=key_padding_mask)

    def dense_mask_for(self, q: Tensor, k: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """Bool ``(batch, heads, seq, seq)``: the pairs ``attend`` computes for these q, k (the selection, causal
        masking and length; ``attend`` also drops padded keys). O(n^2): for tests and the ``naive`` backend."""
        selected = self.selected_blocks(q, k, key_padding_mask)
        return selection_mask(selected, q.shape[-2], self.config.block_size, self.config.causal)

    # -------------------------------------------------------------------------------------------------- backends
    def _attend_naive(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        allowed = combine_masks(self.dense_mask_for(q, k, key_padding_mask), key_padding_mask)
        return dense_attention(q, k, v, allowed)

    def _attend_torch(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        return self._attend_selected(q, k, v, key_padding_mask, self.selected_blocks(q, k, key_padding_mask))

    def _attend_flex(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        flex_backend.check_supported(q, self.dropout_p)
        return self._attend_flex_selected(q, k, v, key_padding_mask, self.selected_blocks(q, k, key_padding_mask))

    def _attend_flex_selected(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
                              selected: Tensor) -> Tensor:
        """The ``flex`` backend over a given ``selected``: compiled FlexAttention with :func:`moba_block_mask`,
        built for this call (the selection is data), on the unpadded length."""
        cfg = self.config
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        block_mask = moba_block_mask(selected, q.shape[-2], block_size=cfg.block_size, causal=cfg.causal,
                                     key_padding_mask=key_padding_mask, with_q_blocks=needs_grad)
        return flex_backend.run(q, k, v, block_mask)

    @classmethod
    def unavailable_reason(
        cls, backend: str, device: torch.device | str, needs_grad: bool, dtype: torch.dtype | None = None
    ) -> str | None:
        """``flex``: FlexAttention's limits (forward-only on CPU, no float64 there); the other backends run anywhere."""
        if backend == "flex":
            return flex_backend.unavailable_reason(device, needs_grad, dtype)
        return None

    def _nonfinite_reach(self, backend, q, k, bad_q, bad_kv, key_padding_mask, document_ids) -> Tensor:
        """The selection depends on the data, so the rerun keeps the real one (made from the cleaned q, k, as the
        output was) and attends with q = k = 0 over it: a bad key or value reaches the rows of the query blocks
        that selected its block (its own block causally)."""
        def reach(qq: Tensor, kk: Tensor, indicator: Tensor, mask: Tensor | None) -> Tensor:
            selected = self.selected_blocks(qq, kk, mask)
            return self._attend_selected(torch.zeros_like(qq), torch.zeros_like(kk), indicator, mask, selected)

        indicator = bad_kv[..., None].to(q.dtype).expand(k.shape).contiguous()
        seen = self._dispatch(backend, q, k, indicator, key_padding_mask, document_ids, fn=reach)
        return bad_q | (seen[..., 0] > 0)

    def _decode_reach(self, cache: KVCache, t: int, positions: Tensor) -> Tensor:
        """Token ``t`` sees its own block so far and the blocks of the current selection."""
        bs = self.config.block_size
        own = (positions >= (t // bs) * bs) & (positions <= t)
        picked = (cache.extra["selected"][..., None] == (positions // bs)).any(-2)  # (b, h, m)
        return own | picked

    def _attend_selected(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
                         selected: Tensor) -> Tensor:
        """The ``torch`` backend over a given ``selected`` ``(batch, heads, query blocks, top_k)``."""
        cfg = self.config
        n = q.shape[-2]
        bs = cfg.block_size
        padded = math.ceil(n / bs) * bs
        self.last_padded_len = padded
        selected = selected[..., : min(cfg.top_k, padded // bs)]  # slots beyond the number of blocks are unused
        real = None
        if key_padding_mask is not None or padded != n:
            real = _real_positions(q.shape[0], n, padded, key_padding_mask, q.device)
        if padded != n:
            q, k, v = (F.pad(t, (0, 0, 0, padded - n)) for t in (q, k, v))
        out = moba_attention(q, k, v, selected, real, block_size=bs, causal=cfg.causal,
                             scale=default_scale(q.shape[-1]))
        return out[:, :, :n]

    def useful_flops(self, batch: int, seq_len: int) -> int:
        """Forward FLOPs of the pairs when every selection slot holds a full block (an upper bound: clamped rows and
        padding score fewer): 4 * head_dim per pair and head, plus the selection scores (2 * blocks^2 * d)."""
        cfg = self.config
        bs, nb = cfg.block_size, math.ceil(seq_len / cfg.block_size)
        pairs = 0
        for r in range(nb):
            rows = min(bs, seq_len - r * bs)
            history = min(cfg.top_k - 1, r if cfg.causal else nb - 1)
            own = rows * (rows + 1) // 2 if cfg.causal else rows * min(bs, seq_len - r * bs)
            pairs += own + rows * history * bs
        d = cfg.head_dim
        return batch * cfg.num_heads * (4 * pairs * d + 2 * nb * nb * d)
