"""Test helpers: an independent float64 reference and small builders.

The reference here is written separately from the library's own dense backend on purpose: a bug in the library's
masking cannot hide in the oracle it is checked against.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

import efficient_attn as ea


def reference_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor) -> Tensor:
    """float64 ``softmax(QK^T/sqrt(d)) V`` over ``allowed`` (bool, broadcastable to (b, h, n, n)); empty rows -> 0."""
    q, k, v = (t.double() for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    allowed = allowed.expand_as(scores)
    scores = scores.masked_fill(~allowed, -math.inf)
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(allowed.any(-1, keepdim=True), probs, torch.zeros_like(probs))
    return probs @ v


def pattern_with_padding(pattern: Tensor, key_padding_mask: Tensor | None) -> Tensor:
    """Combine a ``(n, n)`` / ``(h, n, n)`` pattern with a ``(b, n)`` key padding mask into ``(b, h|1, n, n)``."""
    if pattern.dim() == 2:
        pattern = pattern[None]
    allowed = pattern[None]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    return allowed


def random_qkv(batch: int, heads: int, seq: int, head_dim: int, *, seed: int = 0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(batch, heads, seq, head_dim, generator=gen, dtype=dtype).requires_grad_(True) for _ in range(3)
    )


def random_padding(batch: int, seq: int, *, seed: int = 0, empty_row: bool = False) -> Tensor:
    """Right-padding mask with random real lengths in [1, seq]; ``empty_row`` makes batch 0 fully padded."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, seq + 1, (batch,), generator=gen)
    mask = torch.arange(seq)[None, :] < lengths[:, None]
    if empty_row:
        mask[0] = False
    return mask


def needs_max_len(key: str) -> bool:
    return "max_len" in {f.name for f in dataclasses.fields(ea.get_spec(key).config_cls)}


def build_for_test(key: str, *, dim: int = 32, num_heads: int = 4, max_len: int = 256, **params):
    """``build_attention`` with ``max_len`` filled in for variants whose config needs it."""
    if needs_max_len(key) and "max_len" not in params:
        params["max_len"] = max_len
    return ea.build_attention(key, dim=dim, num_heads=num_heads, **params)
