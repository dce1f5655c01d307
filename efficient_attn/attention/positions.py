"""Position information inside attention: rotary embeddings (RoPE) and ALiBi's linear distance bias.

* RoPE (Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding", arXiv:2104.09864): the pairs
  of dimensions ``(2i, 2i + 1)`` of a query or key at position ``p`` are rotated by the angle ``p * base^(-2i/d)``.
  Because rotations compose, ``rot(q, p) . rot(k, p')`` depends on ``p - p'`` only. Applied to q and k after the
  projection (``Attention.forward``), so every variant and backend gets it and ``attend`` stays the plain core.
* ALiBi (Press, Smith, Lewis 2022, "Train Short, Test Long: Attention with Linear Biases Enables Input Length
  Extrapolation", arXiv:2108.12409): the score of query i and key j gets ``-m_h * |i - j|`` with a head-specific
  slope ``m_h`` from a geometric sequence (:func:`alibi_slopes`). The paper defines the causal case (``j <= i``,
  where ``|i - j| = i - j``); for bidirectional attention the same penalty on the absolute distance is used.
  The bias is computed from positions wherever scores are formed (per chunk in the blocked backend, in FlexAttention's
  ``score_mod``); only the ``naive`` backend builds it as a dense ``(n, n)`` tensor.

Positions are int ``(batch, seq)`` tensors: ``0, 1, ...`` per row by default, restarting at 0 at every packed document,
and continuing at ``t`` for a cache that already holds ``t`` tokens.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from einops import rearrange
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake, unset_fake_temporarily

__all__ = [
    "alibi_bias", "alibi_slopes", "apply_rope", "check_positions", "default_positions", "has_values", "reading_values",
    "rope_angles",
]


def has_values(t: Tensor) -> bool:
    """False for tensors that carry only metadata: fake tensors (``FakeTensorMode``, the memory predictor of
    :mod:`efficient_attn.harness.predict`) and ``meta`` tensors. Checks that read values skip those."""
    return t.device.type != "meta" and not is_fake(t)


@contextmanager
def reading_values() -> Iterator[None]:
    """Read a real tensor's values even inside an active ``FakeTensorMode`` (which would otherwise turn the reads
    into fake tensors without values); a no-op outside one."""
    with unset_fake_temporarily():
        yield


def default_positions(batch: int, seq_len: int, document_ids: Tensor | None, device: torch.device | str) -> Tensor:
    """Long ``(batch, seq)``: ``0..seq-1`` per row, or the position inside each document when ``document_ids`` is given
    (it restarts at 0 where the document id changes)."""
    idx = torch.arange(seq_len, device=device).expand(batch, seq_len)
    if document_ids is None:
        return idx
    starts = torch.ones(batch, seq_len, dtype=torch.bool, device=device)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=-1).values  # start of each token's document
    return idx - first


def check_positions(positions: Tensor, batch: int, seq_len: int) -> None:
    """``ValueError`` unless ``positions`` is an int ``(batch, seq)`` tensor of non-negative positions.

    The sign check reads values, so it is skipped for fake and meta tensors (:func:`has_values`); type and shape are
    always checked."""
    if not isinstance(positions, Tensor) or positions.dtype.is_floating_point or positions.dtype == torch.bool:
        raise ValueError(
            f"positions must be an int tensor of shape (batch, seq) = ({batch}, {seq_len}), got "
            f"{getattr(positions, 'dtype', type(positions).__name__)}"
        )
    if tuple(positions.shape) != (batch, seq_len):
        raise ValueError(f"positions must have shape (batch, seq) = ({batch}, {seq_len}), got {tuple(positions.shape)}")
    if not positions.numel() or not has_values(positions):
        return
    with reading_values():
        if int(positions.min()) < 0:
            raise ValueError("positions must be >= 0")


def rope_angles(positions: Tensor, head_dim: int, base: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(cos, sin)``, each ``(batch, 1, seq, head_dim / 2)``: the rotation of every dimension pair at every position.

    Computed in float64 (float64 inputs) or float32 and cast to ``dtype``: positions up to millions keep their angles.
    """
    work = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=work) / head_dim)  # (d/2,)
    angles = positions.to(work)[:, None, :, None] * inv_freq  # (b, 1, n, d/2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, positions: Tensor, base: float = 10000.0) -> Tensor:
    """Rotate ``x`` ``(batch, heads, seq, head_dim)`` by RoPE at ``positions`` ``(batch, seq)``; same shape out.

    Pair ``(x[2i], x[2i+1])`` at position p becomes ``(x[2i] cos a - x[2i+1] sin a, x[2i] sin a + x[2i+1] cos a)``
    with ``a = p * base^(-2i / head_dim)`` (Su et al. 2021, eq. 34).
    """
    cos, sin = rope_angles(positions, x.shape[-1], base, x.dtype)
    pairs = rearrange(x, "b h n (d two) -> b h n d two", two=2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rearrange(rotated, "b h n d two -> b h n (d two)")


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi's head slopes (Press et al. 2022, section 3): for ``n`` a power of two, ``2^(-8/n), 2^(-16/n), ...,
    2^(-8)``; otherwise the slopes of the largest power of two ``c < n`` followed by every other slope of ``2c``."""

    def geometric(n: int) -> list[float]:
        ratio = 2.0 ** (-8.0 / n)
        return [ratio ** (i + 1) for i in range(n)]

    if num_heads & (num_heads - 1) == 0:
        return geometric(num_heads)
    closest = 2 ** int(math.floor(math.log2(num_heads)))
    return geometric(closest) + geometric(2 * closest)[0::2][: num_heads - closest]


def slopes_tensor(num_heads: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """:func:`alibi_slopes` as a ``(num_heads,)`` tensor."""
    return torch.tensor(alibi_slopes(num_heads), device=device, dtype=dtype)


def alibi_bias(slopes: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """``-slope * |q_idx - kv_idx|``: ``slopes`` ``(heads,)`` broadcast against the index tensors as
    ``(heads, *broadcast(q_idx, kv_idx))``."""
    distance = (q_idx - kv_idx).abs().to(slopes.dtype)
    return -slopes.view(-1, *([1] * distance.dim())) * distance
