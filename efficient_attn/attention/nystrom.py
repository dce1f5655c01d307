"""Nyströmformer: softmax attention approximated with the Nyström method on segment-mean landmarks.

Xiong, Zeng, Chakraborty, Tan, Fung, Li, Singh 2021, "Nyströmformer: A Nyström-Based Algorithm for Approximating
Self-Attention", arXiv:2102.03902.

The sequence is cut into ``m = num_landmarks`` equal segments; the landmarks ``Q~, K~`` are the segment means of the
queries and keys. With ``S(A, B) = softmax(A B^T / sqrt(d))``:

    out = S(Q, K~)  pinv(S(Q~, K~))  (S(Q~, K) V)      # (n, m) (m, m) (m, d)

where ``pinv`` is the paper's iterative Moore-Penrose pseudo-inverse (Razavi et al. 2014 iteration,
``Z <- Z (13 I - A Z (15 I - A Z (7 I - A Z))) / 4`` from ``Z_0 = A^T / (||A||_1 ||A||_inf)``).
Cost: O(n * m * d + m^3) time, O(n * m) memory. The optional depthwise-convolution skip of the paper's code is not
part of this variant (it is not attention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from efficient_attn.attention.base import Attention, AttentionConfig
from efficient_attn.errors import require_positive_int
from efficient_attn.attention.functional import default_scale, grouped_matmul, masked_softmax
from efficient_attn.registry import register_attention

#: Queries per block of the ``S(Q, K~)`` computation.
QUERY_BLOCK = 1024


def iterative_pinv(a: Tensor, iterations: int) -> Tensor:
    """Approximate Moore-Penrose pseudo-inverse of ``a`` ``(..., m, m)`` (Xiong et al. 2021, eq. 13).

    Starts from ``Z_0 = A^T / (max column sum * max row sum)`` (of ``|A|``), which makes ``||I - A Z_0|| < 1`` for a
    nonsingular ``A``, and applies ``iterations`` steps of ``Z <- Z (13 I - A Z (15 I - A Z (7 I - A Z))) / 4``.
    All-zero rows and columns stay zero, so they act as absent landmarks.
    """
    require_positive_int("iterations", iterations)
    magnitude = a.abs()
    col = magnitude.sum(dim=-2).amax(dim=-1)  # (...,)
    row = magnitude.sum(dim=-1).amax(dim=-1)  # (...,)
    z = a.transpose(-1, -2) / (col * row).clamp_min(torch.finfo(a.dtype).tiny)[..., None, None]
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    for _ in range(iterations):
        az = torch.matmul(a, z)  # (..., m, m)
        inner = torch.matmul(az, 7 * eye - az)
        inner = torch.matmul(az, 15 * eye - inner)
        z = 0.25 * torch.matmul(z, 13 * eye - inner)
    return z


@dataclass(kw_only=True)
class NystromConfig(AttentionConfig):
    """Nyströmformer parameters.

    Attributes:
        num_landmarks: number of landmarks ``m`` (segments of the padded sequence).
        pinv_iterations: iterations of the pseudo-inverse (the paper uses 6).
    """

    num_landmarks: int = 64
    pinv_iterations: int = 6

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive_int("num_landmarks", self.num_landmarks)
        require_positive_int("pinv_iterations", self.pinv_iterations)
        if self.dropout != 0.0:
            raise ValueError(
                f"dropout must be 0 for nystrom, got {self.dropout!r}: the Nystrom product never forms the (n, n) "
                "attention weights, so there is nothing to drop (use the model's residual dropout instead)"
            )


@register_attention(
    "nystrom",
    NystromConfig,
    description="Nyströmformer (Xiong et al. 2021): Nyström approximation with segment-mean landmarks",
    paper="Xiong et al. 2021, arXiv:2102.03902",
    complexity="O(n*m)",
    backends=("torch",),
    supports_causal=False,
    exact=False,
)
class NystromAttention(Attention):
    """Nyström attention on ``(batch, heads, seq, head_dim)`` q, k, v.

    Padding to the landmark grid: a sequence of ``n`` tokens is padded to ``ceil(n / m) * m`` (``last_padded_len``)
    so that the ``m`` segments have equal length ``ceil(n / m)``; the pad positions, like padded keys, are excluded
    from the landmark means (a mean over a segment's real tokens only). A segment with no real token gives no
    landmark (its row and column of the ``(m, m)`` kernel are zero and stay zero in the pseudo-inverse). When
    ``n < m`` every token is its own landmark. The ``(n, m)`` and ``(m, n)`` kernels are computed on the ``n`` real
    positions only.

    Key padding: the mask marks padded tokens, which are excluded from both landmark means (in self-attention they
    are the same tokens) and from the keys of ``S(Q~, K)``; so their contents never reach the real outputs.
    A batch element with no real token gets zeros.

    Causal masking is not supported (see ``causal_unsupported_reason``). Attention dropout is refused (``dropout``
    must be 0): the weights are never formed.

    Grouped key/value heads: key landmarks per key/value head, query landmarks per query head; every product with a
    key-side tensor folds a group's query heads into its rows (no repeat). Cross-attention (``attend(..., cross=True)``
    or different lengths): query landmarks are segment means over the ``q_len`` queries, key landmarks over the real
    keys of ``kv_len``; the key padding mask is then the encoder's and never masks queries.
    """

    supports_gqa = True
    supports_cross_attention = True
    queries_independent = False  # query landmarks are means over segments of the queries

    causal_unsupported_reason = (
        "Nystrom landmarks are means over segments of the sequence, so every landmark mixes the positions of its "
        "segment, later ones included, and every query attends through all landmarks"
    )

    def useful_flops(self, batch: int, seq_len: int) -> int:
        """Forward FLOPs of the core per head, n = seq_len, m = num_landmarks, d = head_dim, T = pinv_iterations:
        ``S(Q, K~)``, ``S(Q~, K)``, ``S(Q~, K) V`` and ``S(Q, K~) (.)`` at 2*n*m*d each; ``S(Q~, K~)`` and
        ``pinv (.)`` at 2*m^2*d each; the pseudo-inverse at 4 (m, m) products per iteration:
        ``8*n*m*d + 4*m^2*d + 8*T*m^3``."""
        n, m, d = seq_len, self.config.num_landmarks, self.config.head_dim
        per_head = 8 * n * m * d + 4 * m * m * d + 8 * self.config.pinv_iterations * m**3
        return batch * self.config.num_heads * per_head

    def padded_len(self, seq_len: int) -> int:
        """The landmark grid length: ``ceil(seq_len / num_landmarks) * num_landmarks``."""
        m = self.config.num_landmarks
        return math.ceil(seq_len / m) * m

    def landmarks(self, x: Tensor, weights: Tensor | None) -> Tensor:
        """Segment means ``(batch, heads, m, d)`` of ``x`` ``(batch, heads, n, d)``.

        ``weights``: None (n divides into equal segments, no padding) or float ``(batch, 1, n_pad)`` with 1 for real
        tokens and 0 for padding; the mean of a segment is over its real tokens (0 when it has none).
        """
        m = self.config.num_landmarks
        if weights is None:
            return rearrange(x, "b h (m l) d -> b h m l d", m=m).mean(dim=-2)
        n_pad = weights.shape[-1]
        x = F.pad(x, (0, 0, 0, n_pad - x.shape[-2]))
        segments = rearrange(x, "b h (m l) d -> b h m l d", m=m)
        w = rearrange(weights, "b one (m l) -> b one m l", m=m)  # (b, 1, m, l)
        sums = torch.einsum("bhmld,bhml->bhmd", segments, w)  # (b, h, m, d)
        counts = w.sum(dim=-1, keepdim=True)  # (b, 1, m, 1)
        return sums / counts.clamp_min(1.0)

    def _weights(self, real: Tensor | None, n: int, like: Tensor) -> Tensor | None:
        """Landmark weights ``(batch, 1, n_pad)`` (1 = real token), or None when every segment is full and real."""
        n_pad = self.padded_len(n)
        if real is None and n_pad == n:
            return None
        if real is None:
            real = torch.ones(like.shape[0], n, dtype=torch.bool, device=like.device)
        return F.pad(real, (0, n_pad - n)).to(like.dtype)[:, None, :]

    def _has_landmark(self, weights: Tensor) -> Tensor:
        """Bool ``(batch, 1, m)``: segments holding a real token."""
        m = self.config.num_landmarks
        return rearrange(weights, "b one (m l) -> b one m l", m=m).sum(dim=-1) > 0

    def _attend_torch(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        n, n_keys = q.shape[-2], k.shape[-2]
        scale = default_scale(q.shape[-1])
        self.last_padded_len = self.padded_len(n_keys)
        # self-attention: padded tokens are excluded from both landmark means (they are the same tokens);
        # cross-attention: the mask is the encoder's, queries are all real
        query_real = None if self._call_is_cross else key_padding_mask
        q_weights = self._weights(query_real, n, q)
        k_weights = self._weights(key_padding_mask, n_keys, k)
        q_land, k_land = self.landmarks(q, q_weights), self.landmarks(k, k_weights)  # (b, h | kv_heads, m, d)
        has_q = None if q_weights is None else self._has_landmark(q_weights)  # (b, 1, m)
        has_k = None if k_weights is None else self._has_landmark(k_weights)
        key_land_allowed = None if has_k is None else has_k[:, :, None, :]  # (b, 1, 1, m)
        kernel_2_allowed = _and(None if has_q is None else has_q[:, :, :, None], key_land_allowed)  # (b, 1, m, m)
        real_keys = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        kernel_3_allowed = _and(None if has_q is None else has_q[:, :, :, None], real_keys)  # (b, 1, m, n_keys)
        q_land = q_land * scale
        k_land_t = k_land.transpose(-1, -2)  # (b, kv_heads, d, m)
        kernel_2 = _softmax(grouped_matmul(q_land, k_land_t), kernel_2_allowed)  # (b, h, m, m)
        kernel_3 = _softmax(grouped_matmul(q_land, k.transpose(-1, -2)), kernel_3_allowed)  # (b, h, m, n_keys)
        context = grouped_matmul(kernel_3, v)  # (b, h, m, d)
        del kernel_3
        context = torch.matmul(iterative_pinv(kernel_2, self.config.pinv_iterations), context)  # (b, h, m, d)
        k_land_t = k_land_t * scale
        outs = []
        # query blocks: rows of S(Q, K~) are independent; small blocks stay in cache on CPU
        for start in range(0, n, QUERY_BLOCK):
            kernel_1 = _softmax(
                grouped_matmul(q[:, :, start : start + QUERY_BLOCK], k_land_t), key_land_allowed
            )  # (b, h, block, m)
            outs.append(torch.matmul(kernel_1, context))  # (b, h, block, d)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)  # (b, h, n, d)

    def _nonfinite_reach(self, backend, q, k, bad_q, bad_kv, key_padding_mask, document_ids) -> Tensor:
        """The landmarks mix every real token: a bad key or value reaches all rows of its heads, and a bad real
        query (through the query landmarks) all rows of its own head."""
        return self._structural_reach(backend, bad_q, bad_kv, key_padding_mask, document_ids, causal=False,
                                      queries_mix=True)


def _and(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a & b


def _softmax(scores: Tensor, allowed: Tensor | None) -> Tensor:
    # the plain softmax when nothing is masked (faster); masked rows with no allowed entry give zeros
    return torch.softmax(scores, dim=-1) if allowed is None else masked_softmax(scores, allowed)
