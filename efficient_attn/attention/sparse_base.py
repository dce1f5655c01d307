"""The shared base of the pattern (sparse) variants: ``window``, ``bigbird``, ``longformer``.

A :class:`PatternAttention` owns one :class:`~efficient_attn.attention.patterns.Pattern` (``self.pattern``) and runs it
with every backend:

* ``naive``: the dense ``(seq, seq)`` mask from ``pattern.dense_mask`` through
  :func:`~efficient_attn.attention.functional.dense_attention`: O(n^2), the correctness oracle.
* ``torch``: the blocked kernels of :mod:`efficient_attn.attention.blocked`: O(n * keys per block) time, O(n * d)
  memory, forward and backward on any device.
* ``flex``: compiled FlexAttention over ``pattern.mask_mod`` (:mod:`efficient_attn.attention.flex`); forward-only and
  float32/16/bf16-only on CPU.
* ``xformers``: ``memory_efficient_attention`` with a local-attention bias
  (:mod:`efficient_attn.attention.xformers_backend`); CUDA only, and only for a plain sliding window (``window`` lists
  it in its registration; the others do not).

``auto`` reads :data:`efficient_attn.attention.auto.AUTO_TABLE` (per device, mode, dtype and length).

Grouped key/value heads (``num_kv_heads < num_heads``): ``naive`` repeats them (the oracle may), ``torch`` gathers
from the shared head, ``flex`` passes ``enable_gqa``, ``xformers`` its grouped 5-D layout. ALiBi (``alibi=True``):
``naive`` (dense bias), ``torch`` (per-chunk bias from positions), ``flex`` (a ``score_mod``). Packed documents
(``document_ids``): each document alone (:mod:`efficient_attn.attention.packing`); ``window``'s ``flex`` composes its
``mask_mod`` with a document mask instead (a window never crosses a document boundary, and the window rule is
translation invariant, so this equals each document alone).

A new backend for all pattern variants is one ``_attend_<name>`` method here (plus its name in each registration).

Lengths that are not a multiple of ``block_size`` are padded internally (padded keys are masked, padded query rows
cropped) and ``last_padded_len`` records the padded length; the pattern is always the one of the true length.
Shapes: q, k, v ``(batch, heads, seq, head_dim)``.
"""

from __future__ import annotations

import math
from abc import abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor

from efficient_attn.attention import flex as flex_backend
from efficient_attn.attention.auto import FusedBackendsMixin
from efficient_attn.attention.base import Attention, AttentionConfig
from efficient_attn.attention.blocked import BlockedPlan, sparse_attention, sparse_attention_autograd
from efficient_attn.attention.functional import combine_masks, default_scale, dense_attention
from efficient_attn.attention.patterns import BlockStructure, MaskMod, Pattern, WindowPattern
from efficient_attn.attention.xformers_backend import xformers_attention

__all__ = ["PatternAttention"]


class PatternAttention(FusedBackendsMixin, Attention):
    """An attention variant defined by a sparse pattern (see the module docstring)."""

    supports_gqa = True
    alibi_backends = ("naive", "torch", "flex")

    def __init__(self, config: AttentionConfig) -> None:
        super().__init__(config)
        #: The pattern this module computes; ``dense_mask``, ``mask_mod`` and the block cover all come from it.
        self.pattern: Pattern = self._make_pattern()
        self._plans: dict[tuple, BlockedPlan] = {}
        self._flex = flex_backend.FlexRunner(self.pattern.mask_mod, mask_heads=self.pattern.mask_heads)

    @abstractmethod
    def _make_pattern(self) -> Pattern:
        """Build the pattern from ``self.config``."""

    # ------------------------------------------------------------------------------------------------ pattern API
    @property
    def block_size(self) -> int:
        """Internal block size; the ``torch`` backend pads inputs to a multiple of it (of
        ``pattern.block_size_for(seq_len)``, which window and longformer cap at the sequence length)."""
        return self.pattern.block_size

    def dense_mask(self, seq_len: int, device: torch.device | str | None = None) -> Tensor:
        """Bool ``(seq, seq)`` (or ``(heads, seq, seq)`` if per-head): exactly the pairs ``attend`` computes."""
        return self.pattern.dense_mask(seq_len, device)

    def mask_mod(self, seq_len: int, device: torch.device | str | None = None) -> MaskMod:
        """FlexAttention-style ``mask_mod(b, h, q_idx, kv_idx)`` of the pattern at ``seq_len``."""
        return self.pattern.mask_mod(seq_len, device)

    def structure(self, seq_len: int, device: torch.device | str | None = None) -> BlockStructure:
        """The block cover the ``torch`` backend iterates over."""
        return self.pattern.structure(seq_len, device)

    def num_pairs(self, seq_len: int) -> int:
        """Allowed (query, key) pairs per head (summed over heads for per-head patterns such as BigBird)."""
        return self.pattern.num_pairs(seq_len)

    def num_pairs_total(self, seq_len: int) -> int:
        """Allowed pairs summed over all heads."""
        return self.pattern.num_pairs_total(seq_len)

    def useful_flops(self, batch: int, seq_len: int) -> int:
        """Forward FLOPs of the pattern's pairs: ``QK^T`` and ``PV`` cost 2 * head_dim each per pair and head."""
        return 4 * batch * self.num_pairs_total(seq_len) * self.config.head_dim

    def computed_pairs_total(self, seq_len: int) -> int:
        """Pairs the ``torch`` backend really scores (the block cover, padding included), summed over heads."""
        st = self.structure(seq_len)
        blocked = st.num_query_blocks * st.block_size * st.keys_per_block * self.config.num_heads
        dense = st.global_queries.numel() * st.padded_len * self.config.num_heads
        return blocked + dense

    # -------------------------------------------------------------------------------------------------- backends
    def _before_attend(self) -> None:
        """Hook run at the start of every backend call (BigBird uses it to redraw its random plan)."""

    def _attend_naive(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        self._before_attend()
        allowed = combine_masks(self.dense_mask(q.shape[-2], q.device), key_padding_mask)
        return dense_attention(q, k, v, allowed, dropout_p=self.dropout_p, bias=self._alibi_dense(q))

    def _plan(self, seq_len: int, device: torch.device) -> BlockedPlan:
        key = (seq_len, str(device), getattr(self.pattern, "draw", 0))
        if key not in self._plans:
            if len(self._plans) > 16:
                self._plans.clear()
            self._plans[key] = BlockedPlan.build(self.pattern, seq_len, device)
        return self._plans[key]

    def _attend_torch(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        self._before_attend()
        seq_len = q.shape[-2]
        block = self.pattern.block_size_for(seq_len)  # window/longformer: capped at the sequence
        padded = math.ceil(seq_len / block) * block
        self.last_padded_len = padded
        if padded != seq_len:
            q, k, v = (F.pad(t, (0, 0, 0, padded - seq_len)) for t in (q, k, v))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, padded - seq_len), value=False)
        plan = self._plan(seq_len, q.device)
        scale = default_scale(q.shape[-1])
        slopes = self._alibi_slopes(q)
        if self.dropout_p > 0.0:
            out = sparse_attention_autograd(q, k, v, plan, key_padding_mask, scale, dropout_p=self.dropout_p,
                                            slopes=slopes)
        else:
            out = sparse_attention(q, k, v, plan, key_padding_mask, scale, slopes)
        return out[:, :, :seq_len]

    def _attend_flex(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        self._before_attend()
        flex_backend.check_supported(q, self.dropout_p)
        return self._flex(q, k, v, key_padding_mask, tag=getattr(self.pattern, "draw", 0),
                          score_mod=self._alibi_score_mod(q))

    def _attend_flex_packed(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, document_ids: Tensor
    ) -> Tensor:
        """Packed documents on ``flex``: the pattern AND "same document" (translation-invariant patterns only)."""
        if not self.pattern_is_translation_invariant:
            raise ValueError(
                f"backend 'flex' of attention {self.spec_key!r} cannot pack documents: composing a document mask "
                "keeps the pattern anchored at the packed row's start, not at each document's; use backend 'torch'"
            )
        self._before_attend()
        flex_backend.check_supported(q, self.dropout_p)
        return self._flex.packed(q, k, v, key_padding_mask, document_ids, score_mod=self._alibi_score_mod(q))

    #: Whether the pattern only depends on ``i - j`` (so a document mask on the packed row equals each document
    #: alone): True for a plain window.
    pattern_is_translation_invariant: bool = False

    def _attend_xformers(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        if type(self.pattern) is not WindowPattern or self.pattern.sink_tokens:
            raise ValueError(
                "backend 'xformers' has a bias for a plain sliding window only, not for "
                f"{type(self.pattern).__name__}{' with sink tokens' if type(self.pattern) is WindowPattern else ''}"
            )
        self._before_attend()
        return xformers_attention(
            q, k, v, causal=self.config.causal, window=self.pattern.window_size,
            key_padding_mask=key_padding_mask, dropout_p=self.dropout_p,
        )
