"""Performer (FAVOR+): softmax attention estimated with positive orthogonal random features.

Choromanski et al. 2021, "Rethinking Attention with Performers", arXiv:2009.14794.

The softmax kernel ``exp(q . k / sqrt(d))`` is written as ``E_w[phi(q) . phi(k)]`` with the positive feature map
``phi(x) = exp(W x - |x|^2 / 2) / sqrt(m)`` on ``x = x / d^(1/4)``, where the ``m`` rows of ``W`` are Gaussian
directions made orthogonal in blocks of ``d`` (QR of Gaussian matrices) with chi-distributed norms. Then
``out = phi(Q) (phi(K)^T V) / (phi(Q) phi(K)^T 1)``: O(n * m * d) time, never n x n; keys and queries are processed
in blocks of ``BLOCK`` positions, so the forward pass holds O(n * d + BLOCK * m + m * d) (with autograd, the O(n * m)
feature maps backward needs).

Causal attention replaces ``phi(K)^T V`` by prefix sums over positions. Holding one ``(m, d)`` sum per position
costs O(n * m * d) memory; here the sequence is cut into chunks of ``chunk_size`` c: the sum is carried across chunks
(exclusive cumulative sums over per-chunk ``(m, d)`` states) and within a chunk a lower-triangular ``(c, c)``
product finishes the job. Chunks are processed in groups of about ``BLOCK`` positions, the running ``(m, d)`` state
carried from group to group. Memory: with autograd O(n * m + n * m * d / c + n * c) (what backward needs); forward
alone O(n * d) plus one group's O(BLOCK * (m + m * d / c + c)).

Decoding (causal): the prefix sums are the recurrent state (section 3.4 of Katharopoulos et al. 2020, arXiv:2006.16236,
applied to FAVOR+): per key/value head ``phi(K)^T V`` ``(m, d)``, the normaliser ``phi(K)^T 1`` ``(m,)`` and the
running key maximum of the stabiliser, constant in the context; each token folds its key in (rescaling by
``exp(old - new)`` when the maximum rises) and reads the state with its query features: O(m * d) per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from efficient_attn.attention.base import Attention, AttentionConfig
from efficient_attn.attention.caches import StateCache
from efficient_attn.attention.functional import grouped_matmul
from efficient_attn.errors import require_positive_int
from efficient_attn.registry import register_attention

#: Keys and queries per block in the non-causal computation: small blocks stay in cache and below glibc's mmap
#: threshold (a fresh larger tensor is page-faulted on every call on CPU).
BLOCK = 1024


def orthogonal_gaussian_features(num_features: int, dim: int, seed: int) -> Tensor:
    """``(num_features, dim)`` float64 random directions for FAVOR+ (Choromanski et al. 2021, section 2.4).

    Rows come in blocks of ``dim`` mutually orthogonal directions (Q of a QR decomposition of a Gaussian matrix,
    signs fixed by R's diagonal so the block is Haar distributed); each row is then scaled by the norm of an
    independent ``dim``-dimensional Gaussian vector, so row norms are chi-distributed as for i.i.d. Gaussian rows.
    Drawn with a CPU ``torch.Generator`` seeded with ``seed``: the same numbers on every device.
    """
    require_positive_int("num_features", num_features)
    require_positive_int("dim", dim)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    blocks = []
    for _ in range(math.ceil(num_features / dim)):
        gaussian = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
        q, r = torch.linalg.qr(gaussian)
        q = q * torch.sign(torch.diagonal(r))[None, :]  # (d, d), columns orthonormal
        blocks.append(q.T)  # rows orthonormal
    directions = torch.cat(blocks)[:num_features]  # (m, d)
    norms = torch.linalg.vector_norm(torch.randn(num_features, dim, generator=gen, dtype=torch.float64), dim=-1)
    return directions * norms[:, None]


def _nonzero(den: Tensor) -> Tensor:
    # den = 0 only when every feature product is 0, and then the numerator is 0 too (no real key): the output is 0,
    # and dividing by 1 instead keeps the backward pass finite (clamping to a tiny value would give 0/0 there)
    return torch.where(den > 0, den, torch.ones_like(den))


def _finite_or_zero(x: Tensor) -> Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _draw_seed(seed: int, draw: int) -> int:
    # one independent stream per (seed, draw); draw 0 uses the seed itself
    return (seed + draw * 0x9E3779B97F4A7C15) % (2**63)


@dataclass(kw_only=True)
class PerformerConfig(AttentionConfig):
    """Performer parameters.

    Attributes:
        num_features: number of random features ``m``.
        seed: seed of the feature draw (a CPU generator: the same features on every device).
        redraw: ``False`` keeps one draw forever; an int ``N`` draws fresh features every ``N`` forward calls in
            training mode (the paper's feature redrawing); evaluation never redraws.
        chunk_size: causal only: positions per chunk of the prefix-sum computation (memory/time trade-off).
    """

    num_features: int = 256
    seed: int = 0
    redraw: bool | int = False
    chunk_size: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive_int("num_features", self.num_features)
        require_positive_int("chunk_size", self.chunk_size)
        if self.dropout != 0.0:
            raise ValueError(
                f"dropout must be 0 for performer, got {self.dropout!r}: FAVOR+ never forms the attention weights, "
                "so there is nothing to drop (use the model's residual dropout instead)"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        if self.redraw is not False and (
            isinstance(self.redraw, bool) or not isinstance(self.redraw, int) or self.redraw <= 0
        ):
            raise ValueError(
                f"redraw must be False or a positive int interval (redraw every N training calls), got {self.redraw!r}"
            )


@register_attention(
    "performer",
    PerformerConfig,
    description="Performer (Choromanski et al. 2021): FAVOR+ positive orthogonal random features, linear attention",
    paper="Choromanski et al. 2021, arXiv:2009.14794",
    complexity="O(n*m*d)",
    backends=("torch",),
    exact=False,
)
class PerformerAttention(Attention):
    """FAVOR+ attention on ``(batch, heads, seq, head_dim)`` q, k, v; one feature draw shared by all heads.

    Grouped key/value heads: key features, ``phi(K)^T V`` and the causal prefix states are per key/value head, and
    each group's query features are folded into the rows of one product with them (no repeat). Cross-attention
    (non-causal): queries and keys of different lengths.

    Numerical stability (the paper's implementation): query features subtract their own row maximum of the
    exponent, key features one maximum over the real keys of each (batch, head). Keys are streamed in blocks, so
    that maximum is a running one: the partial sums are rescaled by ``exp(old - new)`` when it rises, which gives
    exactly the sums under the global maximum (non-causal); causal groups use the maximum over keys so far. All these
    factors cancel between numerator and denominator, so the result is unchanged but ``exp`` never overflows. (In
    float32 a key whose exponent lies ~87 below that maximum underflows to a zero feature.)

    Key padding: padded keys get zero features, so they contribute nothing; a query with no real key (in its causal
    prefix) gets zeros. Attention dropout is refused (``dropout`` must be 0): the weights are never formed.

    Buffers: ``features`` ``(num_features, head_dim)`` and ``draw`` (how many redraws happened) are saved in the
    state dict, so a loaded model uses the same features.
    """

    supports_gqa = True
    supports_cross_attention = True
    decode_unsupported_reason = None

    # ------------------------------------------------------------------------------------------------ decoding
    def _new_cache(self, common: dict) -> StateCache:
        """State ``(kv (b, kv_heads, m, d), k_sum (b, kv_heads, 1, m), running max (b, kv_heads, 1, 1))``."""
        b, kvh, d, m = common["batch"], common["kv_heads"], common["head_dim"], self.config.num_features
        like = dict(dtype=common["dtype"], device=common["device"])
        state = (torch.zeros(b, kvh, m, d, **like), torch.zeros(b, kvh, 1, m, **like),
                 torch.full((b, kvh, 1, 1), -math.inf, **like))
        return StateCache(**common, state=state)

    def _cache_fill(self, cache: StateCache, q: Tensor, k: Tensor, v: Tensor, real: Tensor | None) -> None:
        kv, k_sum, running = cache.state  # type: ignore[misc]
        phi_k, alpha, running = self._key_features(k, None if real is None else real[:, None, :, None], running)
        kv = kv * alpha + torch.matmul(phi_k.transpose(-1, -2), v)
        k_sum = k_sum * alpha + phi_k.sum(dim=-2, keepdim=True)
        cache.state = (kv, k_sum, running)
        cache.length += k.shape[-2]

    def _decode_step(self, cache: StateCache, q: Tensor, k: Tensor, v: Tensor, real: Tensor | None) -> Tensor:
        self._cache_fill(cache, q, k, v, real)
        kv, k_sum, _ = cache.state  # type: ignore[misc]
        phi_q = self._query_features(q)  # (b, h, 1, m)
        return grouped_matmul(phi_q, kv) / _nonzero(grouped_matmul(phi_q, k_sum.transpose(-1, -2)))

    def __init__(self, config: PerformerConfig) -> None:
        super().__init__(config)
        self.register_buffer("draw", torch.zeros((), dtype=torch.long))
        self.register_buffer(
            "features", orthogonal_gaussian_features(config.num_features, config.head_dim, config.seed).float()
        )
        self._calls_since_draw = 0

    # ------------------------------------------------------------------------------------------------ features
    def redraw_features(self) -> None:
        """Draw the next set of features (draw number ``self.draw + 1`` of this seed), in place."""
        self.draw += 1
        fresh = orthogonal_gaussian_features(
            self.config.num_features, self.config.head_dim, _draw_seed(self.config.seed, int(self.draw))
        )
        self.features.copy_(fresh)
        self._calls_since_draw = 0

    def _maybe_redraw(self) -> None:
        interval = self.config.redraw
        if interval is False or not self.training or self._redraw_frozen:
            return
        if self._calls_since_draw >= interval:
            self.redraw_features()
        self._calls_since_draw += 1

    def _key_exponents(self, k: Tensor, real: Tensor | None) -> Tensor:
        """``w_f . k' - |k'|^2 / 2`` ``(batch, heads, n, m)`` with ``k' = k / d^(1/4)``; ``-inf`` at non-real keys."""
        d = k.shape[-1]
        w = self.features.to(dtype=k.dtype, device=k.device) * d**-0.25  # (m, d), folds k / d^(1/4) into W
        exponent = torch.matmul(k, w.T)  # (b, h, n, m); fresh, so updated in place below
        half_sq_norm = torch.linalg.vector_norm(k, dim=-1, keepdim=True).square() * (0.5 / math.sqrt(d))  # (b,h,n,1)
        exponent = exponent.sub_(half_sq_norm)
        if real is not None:
            exponent = exponent.masked_fill_(~real, -math.inf)
        return exponent

    def _query_features(self, q: Tensor) -> Tensor:
        """Positive random features of queries ``(batch, heads, n, d)`` -> ``(batch, heads, n, m)``.

        ``phi(q)_f = exp(w_f . q' - |q'|^2 / 2 - c)`` with ``q' = q / d^(1/4)`` and ``c`` the row maximum of
        ``w_f . q'``; the ``|q'|^2 / 2`` term and ``c`` are per-query constants that cancel in the attention
        normalisation, so both are left out, as is ``1/sqrt(m)``: ``exp(w_f . q' - max_f w_f . q')``, all <= 1.
        """
        d = q.shape[-1]
        w = self.features.to(dtype=q.dtype, device=q.device) * d**-0.25  # (m, d), folds q / d^(1/4) into W
        exponent = torch.matmul(q, w.T)  # (b, h, n, m); fresh, so updated in place below
        with torch.no_grad():  # a constant for autograd: it cancels
            stab = exponent.amax(dim=-1, keepdim=True)  # (b, h, n, 1)
        return exponent.sub_(stab).exp_()

    def _key_features(
        self, k: Tensor, real: Tensor | None, running: Tensor | None
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        """Features of one block of keys under a running maximum.

        Returns ``(phi_k, alpha, new_running)``: ``phi_k`` ``(batch, heads, block, m)`` = ``exp(exponent - max)``
        with the maximum over real keys so far, ``alpha`` ``(batch, heads, 1, 1)`` = ``exp(old max - new max)`` (<= 1;
        0 while no real key was seen; None for the first block) to rescale sums taken under the old maximum.
        """
        exponent = self._key_exponents(k, real)
        with torch.no_grad():  # constants for autograd: they cancel between numerator and denominator
            block_max = exponent.amax(dim=(-2, -1), keepdim=True)  # (b, h, 1, 1)
            new = block_max if running is None else torch.maximum(running, block_max)
            stab = _finite_or_zero(new)
            alpha = None if running is None else torch.exp(running - stab)
        return exponent.sub_(stab).exp_(), alpha, new

    # ------------------------------------------------------------------------------------------------- compute
    def useful_flops(self, batch: int, seq_len: int) -> int:
        """Forward FLOPs of the core's matrix products (what ``FlopCounterMode`` counts; ``exp`` and sums excluded),
        with n = seq_len, m = num_features, d = head_dim, per head:

        non-causal: feature projections of Q and K, ``phi(K)^T V`` and ``phi(Q) (.)`` at 2*n*m*d each, the
        normaliser ``phi(Q) z`` at 2*n*m: ``8*n*m*d + 2*n*m``.
        causal, with c = chunk_size and N = ceil(n/c)*c padded positions: the same ``8*N*m*d + 2*N*m`` (per-chunk
        states, and every chunk's queries against the state before it) plus the in-chunk products
        ``phi(Q) phi(K)^T`` (2*N*c*m) and ``A V`` (2*N*c*d).
        """
        n, m, d, heads = seq_len, self.config.num_features, self.config.head_dim, self.config.num_heads
        per_head = 8 * n * m * d + 2 * n * m
        if self.config.causal:
            c = self.config.chunk_size
            big_n = math.ceil(n / c) * c
            per_head = 8 * big_n * m * d + 2 * big_n * m + 2 * big_n * c * (m + d)
        return batch * heads * per_head

    def _attend_torch(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        self._maybe_redraw()
        real = None if key_padding_mask is None else key_padding_mask[:, None, :, None]  # (b, 1, n, 1)
        if self.config.causal:
            return self._causal(q, k, v, real)
        # Keys in blocks with a running maximum: the sums phi(K)^T V and phi(K)^T 1 are rescaled by exp(old - new)
        # whenever a block raises the maximum, which gives exactly the sums under the global key maximum without
        # ever holding the (n, m) feature map of all keys.
        kv = k_sum = running = None
        for start in range(0, k.shape[-2], BLOCK):
            stop = start + BLOCK
            block_real = None if real is None else real[:, :, start:stop]
            phi_k, alpha, running = self._key_features(k[:, :, start:stop], block_real, running)  # (b, h, block, m)
            block_kv = torch.matmul(phi_k.transpose(-1, -2), v[:, :, start:stop])  # (b, h, m, d)
            block_sum = phi_k.sum(dim=-2, keepdim=True)  # (b, h, 1, m)
            if alpha is None:
                kv, k_sum = block_kv, block_sum
            else:
                kv = kv * alpha + block_kv
                k_sum = k_sum * alpha + block_sum
        outs = []
        # query blocks: each query's features only need its own row maximum, so blocks are independent
        for start in range(0, q.shape[-2], BLOCK):
            phi_q = self._query_features(q[:, :, start : start + BLOCK])  # (b, h, block, m)
            num = grouped_matmul(phi_q, kv)  # (b, h, block, d); kv per key/value head
            den = grouped_matmul(phi_q, k_sum.transpose(-1, -2))  # (b, h, block, 1)
            outs.append(num / _nonzero(den))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)  # (b, h, n, d)

    def _causal(self, q: Tensor, k: Tensor, v: Tensor, real: Tensor | None) -> Tensor:
        n = q.shape[-2]
        c = self.config.chunk_size
        kv_heads = k.shape[1]
        group_heads = q.shape[1] // kv_heads
        # row r of a group-folded chunk is query i = r % c of head r // c: causal inside a chunk means i >= j
        in_chunk = (torch.arange(group_heads * c, device=q.device) % c)[:, None] >= torch.arange(c, device=q.device)
        pad = -n % c
        if pad:
            # pad to whole chunks; the pad keys are masked (zero features), the pad queries' outputs dropped
            q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
            inside = torch.arange(n + pad, device=q.device) < n
            real = inside[None, None, :, None] if real is None else F.pad(real, (0, 0, 0, pad)) & inside[:, None]
        self.last_padded_len = n + pad
        group = max(c, BLOCK // c * c)  # positions per step of the loop: whole chunks
        outs = []
        state = k_sum = running = None  # sums over all earlier groups, in the scale of the running key maximum
        for start in range(0, n + pad, group):
            stop = start + group
            block_real = None if real is None else real[:, :, start:stop]
            phi_k, alpha, running = self._key_features(k[:, :, start:stop], block_real, running)
            phi_k = rearrange(phi_k, "b h (c j) m -> b h c j m", j=c)
            phi_q = self._query_features(q[:, :, start:stop])
            # the query heads of a group folded into each chunk's rows: (b, kv_heads, chunks, G * c, m)
            phi_q = rearrange(phi_q, "b (kv g) (c i) m -> b kv c (g i) m", kv=kv_heads, i=c)
            v_chunks = rearrange(v[:, :, start:stop], "b h (c j) d -> b h c j d", j=c)
            # per-chunk sums, then exclusive prefix sums over the chunks of this group, plus the carried state
            chunk_kv = torch.matmul(phi_k.transpose(-1, -2), v_chunks)  # (b, h, chunks, m, d)
            chunk_sum = phi_k.sum(dim=-2, keepdim=True)  # (b, h, chunks, 1, m)
            before_kv = torch.cumsum(chunk_kv, dim=2) - chunk_kv  # (b, h, chunks, m, d)
            before_sum = torch.cumsum(chunk_sum, dim=2) - chunk_sum  # (b, h, chunks, 1, m)
            if alpha is not None:
                before_kv = before_kv + (state * alpha)[:, :, None]
                before_sum = before_sum + (k_sum * alpha)[:, :, None]
            state = before_kv[:, :, -1] + chunk_kv[:, :, -1]  # (b, h, m, d): everything up to this group's end
            k_sum = before_sum[:, :, -1] + chunk_sum[:, :, -1]  # (b, h, 1, m)
            # within a chunk: lower-triangular (i >= j) products
            scores = torch.matmul(phi_q, phi_k.transpose(-1, -2)) * in_chunk  # (b, kv, chunks, G * c, c)
            num = torch.matmul(scores, v_chunks) + torch.matmul(phi_q, before_kv)  # (b, h, chunks, c, d)
            den = scores.sum(dim=-1, keepdim=True) + torch.matmul(phi_q, before_sum.transpose(-1, -2))  # (.., c, 1)
            outs.append(rearrange(num / _nonzero(den), "b kv c (g i) d -> b (kv g) (c i) d", i=c))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)
        return out[:, :, :n]
