"""Linear attention: transformers as RNNs.

Katharopoulos et al. 2020, "Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention",
arXiv:2006.16236. The softmax similarity is replaced by a kernel ``phi(q) . phi(k)`` with the feature map
``phi(x) = elu(x) + 1`` (section 3.2, positive, so the normaliser never vanishes for a real key):

    out_i = phi(q_i) . S_i / phi(q_i) . z_i,   S_i = sum_j phi(k_j) v_j^T,   z_i = sum_j phi(k_j)

with ``j`` over every key (non-causal) or ``j <= i`` (causal). Non-causal: ``phi(K)^T V`` once, O(n * d^2).
Causal (section 3.4) has three equal forms (:mod:`efficient_attn.attention.linear_forms`): the parallel form with the
``(n, n)`` masked kernel matrix (``naive``, the oracle), a chunked form (``torch``: chunks of ``chunk_size``, a
``(c, c)`` product inside each chunk and a carried ``(d, d + 1)`` state across them) and the recurrent form
(``recurrent``: one position at a time, the constant-size state ``[S | z]``; :func:`linear_recurrent_step` is the
pure step the decode cache reuses).

Key padding: padded keys get zero features, so they add nothing to ``S`` or ``z``; a query with no real key (in its
causal prefix) gets zeros. Attention dropout is refused: the weights are never formed.
Grouped-query heads (``num_kv_heads < num_heads``): query head i reads key/value head ``i // (heads / kv_heads)``.
``S`` and ``z`` depend on k and v only, so there is one state per key/value head, read by its group of query heads:
non-causal ``phi(Q_group) (phi(K)^T [V | 1])``, chunked causal with the group's queries as an extra index of each
chunk's products, recurrent (and the decode cache) with a ``(batch, kv_heads, d, d + 1)`` state; k and v are never
repeated (only the ``naive`` oracle repeats them).
Shapes: q ``(batch, heads, seq, head_dim)``, k, v ``(batch, kv_heads, seq, head_dim)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from efficient_attn.attention.base import Attention, AttentionConfig
from efficient_attn.attention.caches import StateCache
from efficient_attn.attention.linear_forms import chunked_sums, parallel_sums, recurrent_step, recurrent_sums
from efficient_attn.errors import require_positive_int
from efficient_attn.registry import register_attention

__all__ = ["LinearAttention", "LinearConfig", "elu_feature_map", "linear_initial_state", "linear_recurrent_step"]


def elu_feature_map(x: Tensor) -> Tensor:
    """``elu(x) + 1`` (Katharopoulos et al. 2020, eq. 7): positive, ``(..., d) -> (..., d)``."""
    return F.elu(x) + 1.0


def _nonzero(den: Tensor) -> Tensor:
    # den = 0 only when no real key was seen, and then the numerator is 0 too: the output is 0, and dividing by 1
    # keeps the backward pass finite
    return torch.where(den > 0, den, torch.ones_like(den))


def _features(q: Tensor, k: Tensor, v: Tensor, real: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """``phi(q)``, ``phi(k)`` (zero at padded keys) and ``[v | 1]`` ``(batch, heads, n, d + 1)``."""
    phi_q, phi_k = elu_feature_map(q), elu_feature_map(k)
    if real is not None:
        phi_k = phi_k * real
    return phi_q, phi_k, torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def _normalise(sums: Tensor) -> Tensor:
    return sums[..., :-1] / _nonzero(sums[..., -1:])


def linear_initial_state(batch: int, heads: int, head_dim: int, *, dtype: torch.dtype, device=None) -> Tensor:
    """The empty recurrent state ``[S | z]``: zeros ``(batch, heads, head_dim, head_dim + 1)`` (``heads`` = the
    key/value heads: the state depends on k and v only)."""
    return torch.zeros(batch, heads, head_dim, head_dim + 1, dtype=dtype, device=device)


def linear_recurrent_step(
    state: Tensor, q_t: Tensor, k_t: Tensor, v_t: Tensor, real_t: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """One causal step: ``(state, q_t, k_t, v_t) -> (out_t, new state)``; pure (the input state is not modified).

    Args:
        state: ``(batch, kv_heads, head_dim, head_dim + 1)``: ``S = sum phi(k_j) v_j^T`` and, in the last column,
            ``z = sum phi(k_j)`` over the tokens so far (:func:`linear_initial_state` before the first).
        q_t: ``(batch, heads, head_dim)``; k_t, v_t: ``(batch, kv_heads, head_dim)``: the new token's query, key
            and value.
        real_t: bool ``(batch,)``, False = the new token is padding (it is then not added to the state).

    Returns:
        ``out_t`` ``(batch, heads, head_dim)`` (the new token attends to itself and every earlier real token) and
        the new state.
    """
    phi_q, phi_k = elu_feature_map(q_t), elu_feature_map(k_t)
    if real_t is not None:
        phi_k = phi_k * real_t[:, None, None]
    sums, state = recurrent_step(state, phi_q, phi_k, torch.cat([v_t, torch.ones_like(v_t[..., :1])], dim=-1))
    return _normalise(sums), state


@dataclass(kw_only=True)
class LinearConfig(AttentionConfig):
    """Linear attention parameters.

    Attributes:
        chunk_size: ``torch`` backend, causal only: positions per chunk (a ``(c, c)`` product per chunk and one
            ``(d, d + 1)`` state per chunk: small chunks cost state memory, large ones quadratic work inside).
    """

    chunk_size: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive_int("chunk_size", self.chunk_size)
        if self.dropout != 0.0:
            raise ValueError(
                f"dropout must be 0 for linear, got {self.dropout!r}: linear attention never forms the attention "
                "weights, so there is nothing to drop (use the model's residual dropout instead)"
            )


@register_attention(
    "linear",
    LinearConfig,
    description="Linear attention (Katharopoulos et al. 2020): elu+1 feature map, parallel, chunked and RNN forms",
    paper="Katharopoulos et al. 2020, arXiv:2006.16236",
    complexity="O(n*d^2)",
    backends=("torch", "naive", "recurrent"),
    exact=False,
)
class LinearAttention(Attention):
    """Linear attention on ``(batch, heads, seq, head_dim)`` q, k, v (see the module docstring).

    Backends:
        ``torch``: non-causal ``phi(Q) (phi(K)^T [V | 1])``; causal the chunked form (``chunk_size``).
        ``naive``: the parallel form with the ``(n, n)`` kernel matrix (the oracle).
        ``recurrent``: the RNN form, one position at a time (:func:`~efficient_attn.attention.linear_forms.
            recurrent_sums`: per-token Python, to check the other forms and as the decode step's form, not a fast
            backend; listed in ``sequential_backends``).
    """

    config: LinearConfig
    decode_unsupported_reason = None
    supports_gqa = True
    #: backends that take one Python step per token (see :func:`efficient_attn.harness.predict.is_sequential`)
    sequential_backends = ("recurrent",)

    # ------------------------------------------------------------------------------------------------ decoding
    def _new_cache(self, common: dict) -> StateCache:
        """The recurrent state ``[S | z]`` ``(batch, kv_heads, head_dim, head_dim + 1)``: constant in the context."""
        state = self.initial_state(common["batch"], dtype=common["dtype"], device=common["device"])
        return StateCache(**common, state=state)

    def _cache_fill(self, cache: StateCache, q: Tensor, k: Tensor, v: Tensor, real: Tensor | None) -> None:
        _, phi_k, values = _features(q, k, v, None if real is None else real[:, None, :, None])
        cache.state = cache.state + torch.matmul(phi_k.transpose(-1, -2), values)
        cache.length += k.shape[-2]

    def _decode_step(self, cache: StateCache, q: Tensor, k: Tensor, v: Tensor, real: Tensor | None) -> Tensor:
        out, cache.state = linear_recurrent_step(cache.state, q[:, :, 0], k[:, :, 0], v[:, :, 0],
                                                 None if real is None else real[:, 0])
        cache.length += 1
        return out[:, :, None]

    def _sums(self, backend: str, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        real = None if key_padding_mask is None else key_padding_mask[:, None, :, None]
        phi_q, phi_k, values = _features(q, k, v, real)
        causal = self.config.causal
        if backend == "naive":
            return parallel_sums(phi_q, phi_k, values, causal=causal)
        if backend == "recurrent":
            return recurrent_sums(phi_q, phi_k, values, causal=causal)
        if causal:
            c = self.config.chunk_size
            self.last_padded_len = -(-q.shape[-2] // c) * c
        return chunked_sums(phi_q, phi_k, values, chunk_size=self.config.chunk_size, causal=causal)

    def _attend_torch(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        return _normalise(self._sums("torch", q, k, v, key_padding_mask))

    def _attend_naive(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        return _normalise(self._sums("naive", q, k, v, key_padding_mask))

    def _attend_recurrent(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        return _normalise(self._sums("recurrent", q, k, v, key_padding_mask))

    # ----------------------------------------------------------------------------------------- recurrent API
    def initial_state(self, batch: int, *, dtype: torch.dtype, device=None) -> Tensor:
        """Zeros ``(batch, kv_heads, head_dim, head_dim + 1)``: the state before the first token."""
        return linear_initial_state(batch, self.config.num_kv_heads, self.config.head_dim, dtype=dtype, device=device)

    def recurrent_step(
        self, state: Tensor, q_t: Tensor, k_t: Tensor, v_t: Tensor, real_t: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """:func:`linear_recurrent_step` (causal; the module holds no state)."""
        return linear_recurrent_step(state, q_t, k_t, v_t, real_t)

    def useful_flops(self, batch: int, seq_len: int) -> int:
        """Forward FLOPs of the ``torch`` backend's products, with n = seq_len, d = head_dim, e = d + 1, H query
        heads and G key/value heads: non-causal ``phi(K)^T [V|1]`` per key/value head and ``phi(Q) (.)`` per query
        head, 2*n*d*e each; causal, with c = chunk_size and N the padded length, per query head the in-chunk
        ``(c, c)`` scores and their product (2*N*c*(d + e)) and the queries against the chunk states (2*N*d*e), per
        key/value head the chunk states (2*N*d*e)."""
        n, d, heads, kv_heads = seq_len, self.config.head_dim, self.config.num_heads, self.config.num_kv_heads
        e = d + 1
        if not self.config.causal:
            return batch * (heads + kv_heads) * 2 * n * d * e
        c = self.config.chunk_size
        big_n = -(-n // c) * c
        return batch * (heads * (2 * big_n * c * (d + e) + 2 * big_n * d * e) + kv_heads * 2 * big_n * d * e)
