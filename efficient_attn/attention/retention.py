"""Retention (RetNet): linear attention with a per-head exponential decay.

Sun et al. 2023, "Retentive Network: A Successor to Transformer for Large Language Models", arXiv:2307.08621.
Per head h with decay ``gamma_h`` in (0, 1] (section 2.1, eq. 5-8):

    y_n = sum_{m <= n} gamma^(n - m) (q_n . k_m) v_m

computed three equal ways (:mod:`efficient_attn.attention.linear_forms`): the parallel form ``(Q K^T * D) V`` with
the decay matrix ``D_nm = gamma^(n - m)`` (``naive``, the oracle), the chunkwise recurrent form (``torch``: chunks of
``chunk_size``) and the recurrent form ``S_n = gamma S_{n-1} + k_n v_n^T``, ``y_n = q_n S_n`` (``recurrent``;
:meth:`RetentionAttention.recurrent_step` is the pure step the decode cache reuses).

Default decays (section 3.1, multi-scale retention): ``gamma_h = 1 - 2^(-5 - h)`` for head h = 0 .. heads - 1;
``gammas`` sets them per head.

Normalisation (section 3.1, "retention score normalization"), on by default (``normalize=True``):

1. ``q / sqrt(d)``;
2. ``D~_nm = D_nm / sqrt(sum_m D_nm)``, the sum over the real keys visible to n;
3. ``R~_nm = R_nm / max(|sum_m R_nm|, 1)`` with ``R = Q K^T * D~``.

All three scale row n by one number, so every form computes them exactly from the same sums: (2) is the decayed
count of real keys, (3) the sums with ``v = 1``. The paper follows retention with a per-head GroupNorm that
cancels these factors; the core here has no GroupNorm, so the normalisation is part of its output. Unlike the
reference implementation, (3) is not detached from autograd. ``normalize=False`` computes the raw ``y`` above (with
``gamma = 1`` that is causal linear attention with the identity feature map).

Not included: the paper's ``e^(i n theta)`` rotation of q and k (a relative position encoding applied before
retention, the xPos/RoPE family; positions are the backbone's job here), and the swish gate and GroupNorm of the
multi-scale retention layer (part of the block, not of the core).

Non-causal (our extension; RetNet is decoder-only): the symmetric decay ``gamma^|n - m|`` over every key, computed
as the causal sums plus the anti-causal ones minus the diagonal; normalisation as above over all real keys.

Key padding: padded keys contribute nothing (to the sums and to the normalisers); a query with no real key gets 0.
Attention dropout is refused: the weights are only formed by ``naive``.
Grouped-query heads (``num_kv_heads < num_heads``): query head i reads key/value head ``i // (heads / kv_heads)``.
The decays belong to the query heads, so each query head keeps its own state ``S_n = gamma_h S_{n-1} + k_n v_n^T``,
fed by the shared key/value head's ``k_n v_n^T`` (the recurrent state and the decode cache are per query head:
``(batch, heads, head_dim, head_dim + 1)``, a state's size does not shrink with ``num_kv_heads``); the chunked form
scales the shared keys by each query head's decays inside each chunk. k and v are never repeated (only the
``naive`` oracle repeats them).
Shapes: q ``(batch, heads, seq, head_dim)``, k, v ``(batch, kv_heads, seq, head_dim)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from einops import rearrange
from torch import Tensor

from efficient_attn.attention.base import Attention, AttentionConfig
from efficient_attn.attention.caches import StateCache
from efficient_attn.attention.linear_forms import chunked_sums, parallel_sums, recurrent_step, recurrent_sums
from efficient_attn.errors import require_positive_int
from efficient_attn.registry import register_attention

__all__ = ["RetentionAttention", "RetentionConfig", "RetentionState", "default_gammas", "retention_recurrent_step"]


def default_gammas(num_heads: int) -> tuple[float, ...]:
    """RetNet's multi-scale decays ``1 - 2^(-5 - h)``, h = 0 .. num_heads - 1 (Sun et al. 2023, section 3.1)."""
    return tuple(1.0 - 2.0 ** (-5 - h) for h in range(num_heads))


class RetentionState(NamedTuple):
    """The recurrent state of one retention layer.

    Attributes:
        kv: ``(batch, heads, head_dim, head_dim + 1)``: ``S = sum gamma^(t-m) k_m v_m^T`` and, in the last column,
            ``sum gamma^(t-m) k_m`` (normalisation step 3; unused with ``normalize=False``).
        weight: ``(batch, heads)``: ``sum gamma^(t-m)`` over the real tokens so far (normalisation step 2).
    """

    kv: Tensor
    weight: Tensor


def _nonzero(x: Tensor) -> Tensor:
    return torch.where(x > 0, x, torch.ones_like(x))


def _finish(sums: Tensor, weight: Tensor | None) -> Tensor:
    """Normalisation steps 2 and 3 from the sums ``[y | sum with v = 1]`` and the decayed key count ``weight``
    ``(..., 1)``; without normalisation (``weight`` None) the sums are the output."""
    if weight is None:
        return sums
    scale = torch.sqrt(_nonzero(weight))  # sqrt(sum_m D_nm); no real key -> 1 (the sums are 0 then)
    num, den = sums[..., :-1] / scale, sums[..., -1:] / scale
    return num / torch.clamp(den.abs(), min=1.0)


def retention_recurrent_step(
    state: RetentionState,
    q_t: Tensor,
    k_t: Tensor,
    v_t: Tensor,
    gammas: Tensor,
    *,
    normalize: bool = True,
    real_t: Tensor | None = None,
) -> tuple[Tensor, RetentionState]:
    """One causal step: ``(state, q_t, k_t, v_t) -> (out_t, new state)``; pure (the input state is not modified).

    Args:
        state: the state after the tokens so far (:meth:`RetentionAttention.initial_state` before the first).
        q_t: ``(batch, heads, head_dim)``; k_t, v_t: ``(batch, kv_heads, head_dim)``.
        gammas: ``(heads,)`` decays in (0, 1].
        normalize: the module's ``normalize``.
        real_t: bool ``(batch,)``, False = the new token is padding (not added to the state).
    """
    log_decay = torch.log(gammas.to(q_t.dtype))
    if normalize:
        q_t = q_t / math.sqrt(q_t.shape[-1])
    if real_t is not None:
        k_t = k_t * real_t[:, None, None]
    values = torch.cat([v_t, torch.ones_like(v_t[..., :1])], dim=-1)
    sums, kv = recurrent_step(state.kv, q_t, k_t, values, log_decay)
    real = torch.ones_like(state.weight) if real_t is None else real_t[:, None].to(state.weight.dtype)
    weight = gammas.to(state.weight.dtype) * state.weight + real
    out = _finish(sums, weight[..., None] if normalize else None)
    return (out if normalize else out[..., :-1]), RetentionState(kv, weight)


@dataclass(kw_only=True)
class RetentionConfig(AttentionConfig):
    """Retention parameters.

    Attributes:
        gammas: per-head decays, each in (0, 1]; None = RetNet's ``1 - 2^(-5 - h)`` (:func:`default_gammas`).
        normalize: RetNet's score normalisation (see the module docstring); False = the raw decayed sums.
        chunk_size: ``torch`` backend: positions per chunk of the chunkwise form.
    """

    gammas: tuple[float, ...] | None = None
    normalize: bool = True
    chunk_size: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive_int("chunk_size", self.chunk_size)
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be a bool, got {self.normalize!r}")
        if self.dropout != 0.0:
            raise ValueError(
                f"dropout must be 0 for retention, got {self.dropout!r}: the chunked and recurrent forms never form "
                "the attention weights, so there is nothing to drop"
            )
        if self.gammas is not None:
            if not isinstance(self.gammas, (tuple, list)) or len(self.gammas) != self.num_heads:
                raise ValueError(
                    f"gammas must be a sequence of num_heads={self.num_heads} decays in (0, 1], got {self.gammas!r}"
                )
            for h, g in enumerate(self.gammas):
                if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0.0 < g <= 1.0:
                    raise ValueError(f"gammas[{h}] must be a decay in (0, 1], got {g!r}")
            self.gammas = tuple(float(g) for g in self.gammas)

    @property
    def decays(self) -> tuple[float, ...]:
        """The decays in effect: ``gammas`` or the default."""
        return self.gammas if self.gammas is not None else default_gammas(self.num_heads)


@register_attention(
    "retention",
    RetentionConfig,
    description="Retention (RetNet, Sun et al. 2023): per-head exponential decay; parallel, chunkwise and RNN forms",
    paper="Sun et al. 2023, arXiv:2307.08621",
    complexity="O(n*d^2)",
    backends=("torch", "naive", "recurrent"),
    exact=False,
)
class RetentionAttention(Attention):
    """Retention on ``(batch, heads, seq, head_dim)`` q, k, v (see the module docstring).

    Backends:
        ``torch``: the chunkwise form (``chunk_size``), causal or not.
        ``naive``: the parallel form with the ``(n, n)`` decay matrix D (the oracle).
        ``recurrent``: the RNN form, one position at a time (:func:`~efficient_attn.attention.linear_forms.
            recurrent_sums`: per-token Python, to check the other forms and as the decode step's form, not a fast
            backend; listed in ``sequential_backends``).

    Buffer ``gammas`` ``(heads,)`` holds the decays of the config (not persistent: the config is the source).
    """

    config: RetentionConfig
    decode_unsupported_reason = None
    supports_gqa = True
    #: backends that take one Python step per token (see :func:`efficient_attn.harness.predict.is_sequential`)
    sequential_backends = ("recurrent",)

    # ------------------------------------------------------------------------------------------------ decoding
    def _new_cache(self, common: dict) -> StateCache:
        """A :class:`RetentionState` (``kv`` and ``weight``): constant in the context."""
        state = self.initial_state(common["batch"], dtype=common["dtype"], device=common["device"])
        return StateCache(**common, state=state)

    def _cache_fill(self, cache: StateCache, q: Tensor, k: Tensor, v: Tensor, real: Tensor | None) -> None:
        n = k.shape[-2]
        gammas = self.gammas.to(k.dtype)
        decay = gammas[:, None] ** torch.arange(n - 1, -1, -1, device=k.device, dtype=k.dtype)  # (h, n): to the end
        weights = torch.ones(k.shape[0], n, dtype=k.dtype, device=k.device) if real is None else real.to(k.dtype)
        values = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
        r = self.config.num_heads // self.config.num_kv_heads
        scale = rearrange(decay, "(g r) n -> g r n", r=r)[None] * weights[:, None, None, :]  # (b, kv_heads, r, n)
        # per query head: sum_m gamma_h^(n-1-m) k_m [v_m | 1]^T from its key/value head (k and v not repeated)
        fresh = torch.einsum("bgrn,bgnd,bgne->bgrde", scale, k, values)
        old: RetentionState = cache.state  # type: ignore[assignment]
        carry = gammas ** n
        kv = carry[:, None, None] * old.kv + rearrange(fresh, "b g r d e -> b (g r) d e")
        weight = carry * old.weight + weights @ decay.T
        cache.state = RetentionState(kv, weight)
        cache.length += n

    def _decode_step(self, cache: StateCache, q: Tensor, k: Tensor, v: Tensor, real: Tensor | None) -> Tensor:
        out, cache.state = self.recurrent_step(cache.state, q[:, :, 0], k[:, :, 0], v[:, :, 0],  # type: ignore
                                               None if real is None else real[:, 0])
        cache.length += 1
        return out[:, :, None]

    def __init__(self, config: RetentionConfig) -> None:
        super().__init__(config)
        # derived from the config (not saved in the state dict); a buffer so that ``.to(device)`` moves it
        self.register_buffer("gammas", torch.tensor(config.decays, dtype=torch.float64), persistent=False)

    def _sums(self, backend: str, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None):
        cfg = self.config
        log_decay = torch.log(self.gammas).to(q.dtype)
        if all(g == 1.0 for g in cfg.decays):
            log_decay = None  # plain sums: skip the decay products
        real = None if key_padding_mask is None else key_padding_mask[:, None, :, None].to(q.dtype)
        if cfg.normalize:
            q = q / math.sqrt(q.shape[-1])
            v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
        if real is not None:
            k = k * real

        def run(qq: Tensor, kk: Tensor, vv: Tensor) -> Tensor:
            if backend == "naive":
                return parallel_sums(qq, kk, vv, causal=cfg.causal, log_decay=log_decay)
            if backend == "recurrent":
                return recurrent_sums(qq, kk, vv, causal=cfg.causal, log_decay=log_decay)
            return chunked_sums(qq, kk, vv, chunk_size=cfg.chunk_size, causal=cfg.causal, log_decay=log_decay)

        sums = run(q, k, v)
        weight = None
        if cfg.normalize:
            # the decayed count of real keys: the same sums with one-dimensional q = 1, k = real, v = 1
            ones = torch.ones_like(q[..., :1])
            ones_kv = ones[:, : k.shape[1]]  # (b, kv_heads, n, 1)
            weight = run(ones, ones_kv if real is None else real.expand_as(ones_kv), ones_kv)
        if backend == "torch" and cfg.causal:
            self.last_padded_len = -(-q.shape[-2] // cfg.chunk_size) * cfg.chunk_size
        return _finish(sums, weight)

    def _attend_torch(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        return self._sums("torch", q, k, v, key_padding_mask)

    def _attend_naive(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        return self._sums("naive", q, k, v, key_padding_mask)

    def _attend_recurrent(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        return self._sums("recurrent", q, k, v, key_padding_mask)

    def _nonfinite_reach(self, backend, q, k, bad_q, bad_kv, key_padding_mask, document_ids) -> Tensor:
        """A bad key or value reaches every later row (every row when not causal): the decayed weights of far
        tokens underflow to 0, so the rerun of the base class would miss them; the pattern itself has no gaps."""
        return self._structural_reach(backend, bad_q, bad_kv, key_padding_mask, document_ids,
                                      causal=self.config.causal)

    # ----------------------------------------------------------------------------------------- recurrent API
    def initial_state(self, batch: int, *, dtype: torch.dtype, device=None) -> RetentionState:
        """The empty state: zeros ``kv`` ``(batch, heads, head_dim, head_dim + 1)`` and ``weight``
        ``(batch, heads)``, per query head (each decays at its own rate, also with grouped key/value heads)."""
        h, d = self.config.num_heads, self.config.head_dim
        return RetentionState(
            torch.zeros(batch, h, d, d + 1, dtype=dtype, device=device),
            torch.zeros(batch, h, dtype=dtype, device=device),
        )

    def recurrent_step(
        self, state: RetentionState, q_t: Tensor, k_t: Tensor, v_t: Tensor, real_t: Tensor | None = None
    ) -> tuple[Tensor, RetentionState]:
        """:func:`retention_recurrent_step` with this module's decays and ``normalize`` (causal)."""
        return retention_recurrent_step(
            state, q_t, k_t, v_t, self.gammas, normalize=self.config.normalize, real_t=real_t
        )

    def useful_flops(self, batch: int, seq_len: int) -> int:
        """Forward FLOPs of the ``torch`` backend's products (as ``linear``'s causal count, e = d + 1 values with
        normalisation, d without; the non-causal form runs the causal one twice)."""
        n, d, heads, c = seq_len, self.config.head_dim, self.config.num_heads, self.config.chunk_size
        e = d + 1 if self.config.normalize else d
        big_n = -(-n // c) * c
        causal = 2 * big_n * c * (d + e) + 4 * big_n * d * e
        return batch * heads * causal * (1 if self.config.causal else 2)
