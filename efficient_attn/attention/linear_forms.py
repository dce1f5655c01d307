"""The three forms of (decayed) linear attention shared by ``linear`` and ``retention``: parallel, chunked, recurrent.

Both variants compute, per head, sums of the form

    y_n = sum_m w_nm (q_n . k_m) v_m

over already feature-mapped queries ``q`` ``(batch, heads, seq, m)``, keys ``k`` ``(batch, kv_heads, seq, m)`` and
values ``v`` ``(batch, kv_heads, seq, e)``; ``kv_heads`` divides ``heads`` and query head ``i`` reads key/value head
``i // (heads / kv_heads)`` (grouped-query heads, Ainslie et al. 2023). Only the ``parallel_sums`` oracle repeats k
and v; the other forms carry the group of query heads as an extra einsum index. The weights ``w`` are 1 (linear attention, Katharopoulos et al. 2020, arXiv:2006.16236)
or a per-head exponential decay ``gamma^(n - m)`` (retention, Sun et al. 2023, arXiv:2307.08621, eq. 5-6), given as
``log_decay`` ``(heads,)`` = log gamma <= 0. Causal: ``m <= n`` only. Non-causal: every ``m``, with the symmetric decay
``gamma^|n - m|``. Callers get their normalisers from the same sums (append a column of ones to ``v``); padded keys
are zeroed in ``k`` by the caller, so they contribute nothing.

Forms (all equal up to rounding; ``tests/test_families.py`` checks it in float64):

* :func:`parallel_sums`: materialises the ``(n, n)`` weighted scores. O(n^2): the oracle (``naive`` backends).
* :func:`chunked_sums`: causal by chunks of ``c`` positions: inside a chunk a ``(c, c)`` product, across chunks a
  carried ``(m, e)`` state (the "chunkwise recurrent" form of RetNet, section 2.1, and the chunked form of linear
  attention). Chunks are processed in groups of about ``GROUP_POSITIONS``; within a group the states before each
  chunk come from one small ``(G, G)`` decay matrix, and the state is carried from group to group. O(n * (c + m) * e)
  time, O(n * m * e / c + n * c) memory with autograd, never n x n. Non-causal: without decay ``q (k^T v)`` once;
  with decay the causal sums plus the anti-causal ones (the causal form on the flipped sequence) minus the diagonal.
* :func:`recurrent_step` / :func:`recurrent_sums`: the RNN form, one position at a time with an explicit
  ``(batch, heads, m, e)`` state: ``S_t = gamma S_{t-1} + k_t v_t^T``, ``y_t = q_t S_t``. The decode cache reuses
  :func:`recurrent_step`. Non-causal: the final state read by every query (no decay), or a forward and a backward
  scan minus the diagonal (decay).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

__all__ = ["GROUP_POSITIONS", "chunked_sums", "parallel_sums", "recurrent_step", "recurrent_sums", "pad_to_chunks"]

#: Positions per step of the chunked loop (whole chunks): small enough to stay in cache on CPU.
GROUP_POSITIONS = 1024


def _decay_powers(log_decay: Tensor, powers: Tensor) -> Tensor:
    """``gamma_h ^ powers`` for every head: ``(heads, *powers.shape)``; powers >= 0 (so no overflow)."""
    return torch.exp(log_decay.reshape(-1, *([1] * powers.dim())) * powers)


def _group(q: Tensor, k: Tensor) -> int:
    """Query heads per key/value head: ``q`` ``(batch, heads, ...)``, ``k`` ``(batch, kv_heads, ...)``."""
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({kv_heads})")
    return heads // kv_heads


def _per_query_head(t: Tensor, r: int) -> Tensor:
    """``(heads, ...) -> (kv_heads, r, ...)``: a per-query-head tensor split by key/value head."""
    return rearrange(t, "(h r) ... -> h r ...", r=r)


def parallel_sums(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, log_decay: Tensor | None = None) -> Tensor:
    """``y = (Q K^T * W) V`` with the explicit ``(batch, heads, n, n)`` weighted scores (the oracle).

    Args:
        q, k: ``(batch, heads, n, m)`` and ``(batch, kv_heads, n, m)`` feature-mapped queries and keys (padded keys
            already zero); ``kv_heads`` divides ``heads`` (grouped heads: this oracle repeats k and v).
        v: ``(batch, kv_heads, n, e)``.
        causal: keep ``m <= n`` only.
        log_decay: ``(heads,)`` log gamma (<= 0), or None for no decay.
    """
    r = _group(q, k)
    if r > 1:
        k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)
    n = q.shape[-2]
    scores = torch.matmul(q, k.transpose(-1, -2))  # (b, h, n, n)
    idx = torch.arange(n, device=q.device)
    dist = idx[:, None] - idx[None, :]  # (n, n): query - key
    if log_decay is not None:
        weights = _decay_powers(log_decay.to(q.dtype), dist.abs().to(q.dtype))  # (h, n, n): the matrix D
        scores = scores * weights
    if causal:
        scores = scores.masked_fill(dist < 0, 0.0)
    return torch.matmul(scores, v)


def pad_to_chunks(x: Tensor, chunk_size: int) -> Tensor:
    """Zero-pad the sequence dim (-2) of ``x`` to a multiple of ``chunk_size`` (zero keys contribute nothing)."""
    pad = -x.shape[-2] % chunk_size
    return torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x


def _causal_chunked(q: Tensor, k: Tensor, v: Tensor, chunk_size: int, log_decay: Tensor | None) -> Tensor:
    """Causal sums by chunks; q ``(b, h*r, n, m)``, k ``(b, h, n, m)``, v ``(b, h, n, e)``, log_decay ``(h*r,)``.

    The ``r`` query heads of a key/value head are an extra einsum index (``r``): k and v are never repeated. Without
    decay the chunk states ``k^T v`` are shared by the group; with decay (per query head) each query head has its
    own states, computed from the shared keys scaled by its decays.
    """
    n = q.shape[-2]
    c = chunk_size
    r = _group(q, k)
    q, k, v = (pad_to_chunks(t, c) for t in (q, k, v))
    total = q.shape[-2]
    group = max(1, GROUP_POSITIONS // c) * c
    local = torch.arange(c, device=q.device)
    dist = local[:, None] - local[None, :]  # (c, c)
    if log_decay is None:
        intra = (dist >= 0).to(q.dtype)  # (c, c)
        key_decay = query_decay = None
    else:
        lg = log_decay.to(q.dtype)
        intra = _per_query_head(_decay_powers(lg, dist.clamp_min(0).to(q.dtype)) * (dist >= 0), r)[:, None]
        # (h, 1, r, c, c); to the chunk's end (h, 1, r, c, 1) and from the previous end (h, 1, r, c, 1)
        key_decay = _per_query_head(_decay_powers(lg, (c - 1 - local).to(q.dtype)), r)[:, None, :, :, None]
        query_decay = _per_query_head(_decay_powers(lg, (local + 1).to(q.dtype)), r)[:, None, :, :, None]
        chunk_decay = _per_query_head(torch.exp(lg * c), r)  # (h, r): gamma^c
    outs = []
    carry = None  # the state at the end of the previous group: (b, h, m, e) shared, (b, h, r, m, e) with decay
    for start in range(0, total, group):
        stop = min(start + group, total)
        chunks = (stop - start) // c
        qc = rearrange(q[:, :, start:stop], "b (h r) (g c) x -> b h g r c x", r=r, c=c)
        kc, vc = (rearrange(t[:, :, start:stop], "b h (g c) x -> b h g c x", c=c) for t in (k, v))
        scores = torch.einsum("bhgrcm,bhgdm->bhgrcd", qc, kc) * intra  # (b, h, g, r, c, c)
        y = torch.einsum("bhgrcd,bhgde->bhgrce", scores, vc)  # (b, h, g, r, c, e)
        g_idx = torch.arange(chunks, device=q.device)
        steps = g_idx[:, None] - 1 - g_idx[None, :]  # (g, g): chunks between g' and g
        if log_decay is None:
            kv = torch.einsum("bhgcm,bhgce->bhgme", kc, vc)  # (b, h, g, m, e): shared by the group
            between = (steps >= 0).to(q.dtype)  # (g, g)
            before = torch.einsum("gf,bhfme->bhgme", between, kv)
            if carry is not None:
                before = before + carry[:, :, None]
            y = y + torch.einsum("bhgrcm,bhgme->bhgrce", qc, before)
            carry = before[:, :, -1] + kv[:, :, -1]
        else:
            decayed_k = kc[:, :, :, None] * key_decay  # (b, h, g, r, c, m): the shared keys, per query head
            kv = torch.einsum("bhgrcm,bhgce->bhgrme", decayed_k, vc)  # (b, h, g, r, m, e)
            between = _decay_powers(lg * c, steps.clamp_min(0).to(q.dtype)) * (steps >= 0)  # (h*r, g, g)
            before = torch.einsum("hrgf,bhfrme->bhgrme", _per_query_head(between, r), kv)
            if carry is not None:
                carry_decay = _per_query_head(_decay_powers(lg * c, g_idx.to(q.dtype)), r)  # (h, r, g): gamma^(c g)
                before = before + rearrange(carry_decay, "h r g -> h g r")[None, ..., None, None] * carry[:, :, None]
            y = y + torch.einsum("bhgrcm,bhgrme->bhgrce", qc, before) * query_decay
            carry = chunk_decay[..., None, None] * before[:, :, -1] + kv[:, :, -1]
        outs.append(rearrange(y, "b h g r c e -> b (h r) (g c) e"))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)
    return out[:, :, :n]


def _diagonal(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The ``m = n`` term ``(q_n . k_n) v_n`` ``(b, h*r, n, e)`` (grouped heads as in :func:`_causal_chunked`)."""
    r = _group(q, k)
    qg = rearrange(q, "b (h r) n m -> b h r n m", r=r)
    out = torch.einsum("bhrnm,bhnm,bhne->bhrne", qg, k, v)
    return rearrange(out, "b h r n e -> b (h r) n e")


def _read_shared(q: Tensor, state: Tensor) -> Tensor:
    """Every query of ``q`` ``(b, h*r, n, m)`` reads its key/value head's ``state`` ``(b, h, m, e)``."""
    r = _group(q, state)
    out = torch.einsum("bhrnm,bhme->bhrne", rearrange(q, "b (h r) n m -> b h r n m", r=r), state)
    return rearrange(out, "b h r n e -> b (h r) n e")


def chunked_sums(
    q: Tensor, k: Tensor, v: Tensor, *, chunk_size: int, causal: bool, log_decay: Tensor | None = None
) -> Tensor:
    """The sums of :func:`parallel_sums` without any n x n tensor (see the module docstring). Shapes as there."""
    if causal:
        return _causal_chunked(q, k, v, chunk_size, log_decay)
    if log_decay is None:
        return _read_shared(q, torch.matmul(k.transpose(-1, -2), v))  # q (k^T v): O(n * m * e)
    forward = _causal_chunked(q, k, v, chunk_size, log_decay)
    backward = _causal_chunked(*(t.flip(-2) for t in (q, k, v)), chunk_size, log_decay).flip(-2)
    return forward + backward - _diagonal(q, k, v)


def recurrent_step(
    state: Tensor, q_t: Tensor, k_t: Tensor, v_t: Tensor, log_decay: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """One step of the RNN form: ``S_t = gamma S_{t-1} + k_t v_t^T``, ``y_t = q_t S_t``. Pure: returns a new state.

    Args:
        state: ``(batch, kv_heads, m, e)`` (one state per key/value head, read by its group of query heads; only
            without decay or with ``heads == kv_heads``) or ``(batch, heads, m, e)`` (one per query head: each
            decays at its own rate, fed by the shared ``k_t v_t^T``); zeros before the first token.
        q_t: ``(batch, heads, m)``; k_t: ``(batch, kv_heads, m)``; v_t: ``(batch, kv_heads, e)``.
        log_decay: ``(heads,)`` log gamma, or None.

    Returns:
        ``(y_t (batch, heads, e), new state)``.
    """
    r = _group(q_t, k_t)
    kv_heads = k_t.shape[1]
    update = k_t[..., :, None] * v_t[..., None, :]  # (b, kv_heads, m, e)
    qg = rearrange(q_t, "b (h r) m -> b h r m", r=r)
    if state.shape[1] == kv_heads:
        if log_decay is not None:
            if r > 1:
                raise ValueError("decayed grouped heads need one state per query head: (batch, heads, m, e)")
            state = torch.exp(log_decay.to(state.dtype))[:, None, None] * state
        state = state + update
        y = torch.einsum("bhrm,bhme->bhre", qg, state)
    else:
        per_head = rearrange(state, "b (h r) m e -> b h r m e", r=r)
        if log_decay is not None:
            per_head = _per_query_head(torch.exp(log_decay.to(state.dtype)), r)[..., None, None] * per_head
        per_head = per_head + update[:, :, None]
        y = torch.einsum("bhrm,bhrme->bhre", qg, per_head)
        state = rearrange(per_head, "b h r m e -> b (h r) m e")
    return rearrange(y, "b h r e -> b (h r) e"), state


def recurrent_sums(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, log_decay: Tensor | None = None) -> Tensor:
    """The sums of :func:`parallel_sums` by :func:`recurrent_step`, one position at a time (O(n) Python steps).
    The state is per key/value head without decay, per query head with decay."""
    b, h, n, m = q.shape
    state = q.new_zeros(b, h if log_decay is not None else k.shape[1], m, v.shape[-1])
    outs = []
    for t in range(n):
        y, state = recurrent_step(state, q[:, :, t], k[:, :, t], v[:, :, t], log_decay)
        outs.append(y)
    forward = torch.stack(outs, dim=-2)  # (b, h, n, e)
    if causal:
        return forward
    if log_decay is None:
        return _read_shared(q, state)  # every query reads the final state
    backward = recurrent_sums(*(t.flip(-2) for t in (q, k, v)), causal=True, log_decay=log_decay).flip(-2)
    return forward + backward - _diagonal(q, k, v)
