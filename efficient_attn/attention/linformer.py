"""Linformer: softmax attention over keys and values projected along the sequence to ``k`` rows.

Wang, Li, Khabsa, Fang, Ma 2020, "Linformer: Self-Attention with Linear Complexity", arXiv:2006.04768.

Keys and values ``(batch, heads, n, head_dim)`` are projected along the sequence by learned matrices ``E, F`` of shape
``(max_len, k)``: ``K' = E[:n]^T K`` and ``V' = F[:n]^T V`` are ``(batch, heads, k, head_dim)``, and every query
attends to the ``k`` projected keys: ``softmax(Q K'^T / sqrt(head_dim)) V'``.
Cost: O(n * k * head_dim) time, O(n * k) memory (the ``(n, k)`` score matrix per head) instead of O(n^2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from efficient_attn.attention.base import Attention, AttentionConfig
from efficient_attn.errors import require_positive_int
from efficient_attn.attention.functional import default_scale, grouped_matmul
from efficient_attn.registry import register_attention

#: Queries per block of the score computation.
QUERY_BLOCK = 1024


@dataclass(kw_only=True)
class LinformerConfig(AttentionConfig):
    """Linformer parameters.

    Attributes:
        max_len: the longest sequence the projections cover (rows of ``E`` and ``F``); required.
            ``build_model`` fills it in from its own ``max_len``.
        k: projected length (columns of ``E`` and ``F``). ``k`` larger than the sequence is allowed (the rank of the
            approximation is then bounded by the sequence length, not by ``k``).
        share_kv: use one projection for keys and values (``F = E``), as in the paper's "key-value sharing".
        headwise: one projection per key/value head (``E`` is ``(num_kv_heads, max_len, k)``) instead of one shared
            by all heads.
    """

    max_len: int
    k: int = 256
    share_kv: bool = False
    headwise: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive_int("max_len", self.max_len)
        require_positive_int("k", self.k)
        for name in ("share_kv", "headwise"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")


@register_attention(
    "linformer",
    LinformerConfig,
    description="Linformer (Wang et al. 2020): keys and values projected along the sequence to k rows",
    paper="Wang et al. 2020, arXiv:2006.04768",
    complexity="O(n*k)",
    backends=("torch",),
    supports_causal=False,
    exact=False,
    max_len_field="max_len",
)
class LinformerAttention(Attention):
    """Low-rank attention: ``softmax(Q (E^T K)^T / sqrt(d)) (F^T V)``, shapes ``(batch, heads, seq, head_dim)``.

    Variable length: a sequence of ``n <= max_len`` tokens uses the first ``n`` rows of ``E`` and ``F`` (as if the
    sequence were padded to ``max_len`` with zero keys and values); ``n > max_len`` is a ``ValueError``. Key padding:
    padded keys and values are zeroed before the projection, so their contents never reach any output; a query
    whose keys are all padding gets zeros. (A zeroed position still enters the projected rows with a zero key and
    value: with identity projections this is full attention over zero keys/values at the padded positions, not over
    the real keys only; no projected row can be masked when E mixes all positions.)

    Parameters: ``proj_k`` = ``E`` (and ``proj_v`` = ``F`` unless ``share_kv``; then ``proj_v`` is None), shape ``(max_len, k)`` or ``(heads, max_len, k)`` when
    ``headwise`` (one per key/value head), initialised from N(0, 1/k) so a projected row has the scale of a
    Johnson-Lindenstrauss sketch.

    Grouped key/value heads: keys and values are projected per key/value head, and each group's query heads attend to
    their shared projected keys (no repeat). Cross-attention: queries of any length attend to keys of ``kv_len <=
    max_len`` tokens projected with ``E[:kv_len]`` (the paper's projection over the key length).

    Causal masking is not supported (see ``causal_unsupported_reason``). Attention dropout applies to the
    ``(n, k)`` weights.
    """

    supports_gqa = True
    supports_cross_attention = True
    causal_unsupported_reason = (
        "Linformer projects keys and values along the sequence (K' = E^T K), so every projected key mixes all "
        "positions, future ones included; no mask over the k projected rows can hide the future"
    )

    def __init__(self, config: LinformerConfig) -> None:
        super().__init__(config)
        shape = (config.num_kv_heads, config.max_len, config.k) if config.headwise else (config.max_len, config.k)
        std = 1.0 / math.sqrt(config.k)
        self.proj_k = nn.Parameter(torch.randn(shape) * std)
        self.proj_v = None if config.share_kv else nn.Parameter(torch.randn(shape) * std)

    def useful_flops(self, batch: int, seq_len: int) -> int:
        """Forward FLOPs of the core: ``E^T K`` and ``F^T V`` (2*n*k*d each, per key/value head), ``Q K'^T`` and
        ``P V'`` (2*n*k*d each, per query head); with MHA ``8 * n * k * head_dim`` per head, times batch."""
        cfg = self.config
        projections = 4 * cfg.num_kv_heads * seq_len * cfg.k * cfg.head_dim  # E^T K and F^T V per kv head
        return batch * (projections + 4 * cfg.num_heads * seq_len * cfg.k * cfg.head_dim)

    def projections(self, seq_len: int) -> tuple[Tensor, Tensor]:
        """``(E[:n], F[:n])``, each ``(n, k)`` or ``(heads, n, k)``; ``ValueError`` when ``n > max_len``."""
        if seq_len > self.config.max_len:
            raise ValueError(
                f"sequence length {seq_len} exceeds max_len={self.config.max_len} of linformer's projections; "
                "build it with a larger max_len"
            )
        e = self.proj_k[..., :seq_len, :]
        f = e if self.proj_v is None else self.proj_v[..., :seq_len, :]
        return e, f

    def _nonfinite_reach(self, backend, q, k, bad_q, bad_kv, key_padding_mask, document_ids) -> Tensor:
        """The projections ``E``, ``F`` mix every real key and value into every row: a bad one reaches all rows."""
        return self._structural_reach(backend, bad_q, bad_kv, key_padding_mask, document_ids, causal=False)

    def _attend_torch(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        n = q.shape[-2]
        e, f = self.projections(k.shape[-2])
        e, f = e.to(q.dtype), f.to(q.dtype)
        if key_padding_mask is not None:
            real = key_padding_mask[:, None, :, None]  # (b, 1, n, 1)
            k = k.masked_fill(~real, 0.0)
            v = v.masked_fill(~real, 0.0)
        if self.config.headwise:
            k_proj = torch.einsum("hnr,bhnd->bhrd", e, k)  # (b, kv_heads, k, d)
            v_proj = torch.einsum("hnr,bhnd->bhrd", f, v)  # (b, kv_heads, k, d)
        else:
            k_proj = torch.einsum("nr,bhnd->bhrd", e, k)  # (b, kv_heads, k, d)
            v_proj = torch.einsum("nr,bhnd->bhrd", f, v)  # (b, kv_heads, k, d)
        # fold the softmax scale into the (k, d) projected keys, the smallest operand
        k_proj_t = k_proj.transpose(-1, -2) * default_scale(q.shape[-1])  # (b, h, d, k)
        outs = []
        # query blocks keep each (block, k) score tensor small (cache- and allocator-friendly on CPU); rows are
        # independent, so this is the same computation as one (n, k) product
        for start in range(0, n, QUERY_BLOCK):
            scores = grouped_matmul(q[:, :, start : start + QUERY_BLOCK], k_proj_t)  # (b, h, block, k)
            probs = torch.softmax(scores, dim=-1)
            del scores
            if self.dropout_p > 0.0:
                probs = nn.functional.dropout(probs, p=self.dropout_p)
            outs.append(grouped_matmul(probs, v_proj))  # (b, h, block, d)
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)  # (b, h, n, d)
        if key_padding_mask is not None:
            # all-padding rows: V' = 0 already gives 0; make it explicit so it never depends on that identity
            has_key = key_padding_mask.any(dim=-1)[:, None, None, None]  # (b, 1, 1, 1)
            out = out.masked_fill(~has_key, 0.0)
        return out
