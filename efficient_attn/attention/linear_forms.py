"""The three forms of (decayed) linear attention shared by ``linear`` and ``retention``: parallel, chunked, recurrent.

Both variants compute, per head, sums of the form

    y_n = sum_m w_nm (q_n . k_m) v_m

over already feature-mapped queries and keys ``q, k`` ``(batch, heads, seq, m)`` and values ``v``
``(batch, heads, seq, e)``. The weights ``w`` are 1 (linear attention, Katharopoulos et al. 2020, arXiv:2006.16236)
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


def parallel_sums(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, log_decay: Tensor | None = None) -> Tensor:
    """``y = (Q K^T * W) V`` with the explicit ``(batch, heads, n, n)`` weighted scores (the oracle).

    Args:
        q, k: ``(batch, heads, n, m)`` feature-mapped queries and keys (padded keys already zero).
        v: ``(batch, heads, n, e)``.
        causal: keep ``m <= n`` only.
        log_decay: ``(heads,)`` log gamma (<= 0), or None for no decay.
    """
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
    n = q.shape[-2]
    c = chunk_size
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
        intra = _decay_powers(lg, dist.clamp_min(0).to(q.dtype)) * (dist >= 0)  # (h, c, c)
        key_decay = _decay_powers(lg, (c - 1 - local).to(q.dtype))[:, :, None]  # (h, c, 1): to the chunk's end
        query_decay = _decay_powers(lg, (local + 1).to(q.dtype))[:, :, None]  # (h, c, 1): from the previous end
    outs = []
    carry = None  # (b, h, m, e): the state at the end of the previous group
    for start in range(0, total, group):
        stop = min(start + group, total)
        chunks = (stop - start) // c
        qc, kc, vc = (rearrange(t[:, :, start:stop], "b h (g c) x -> b h g c x", c=c) for t in (q, k, v))
        scores = torch.matmul(qc, kc.transpose(-1, -2))  # (b, h, g, c, c)
        if log_decay is None:
            scores = scores * intra
        else:
            scores = scores * intra[:, None]
        y = torch.matmul(scores, vc)  # (b, h, g, c, e)
        kv = torch.matmul((kc if key_decay is None else kc * key_decay[:, None]).transpose(-1, -2), vc)  # (b,h,g,m,e)
        g_idx = torch.arange(chunks, device=q.device)
        steps = g_idx[:, None] - 1 - g_idx[None, :]  # (g, g): chunks between g' and g
        if log_decay is None:
            between = (steps >= 0).to(q.dtype)  # (g, g)
            before = torch.einsum("gf,bhfme->bhgme", between, kv)
            if carry is not None:
                before = before + carry[:, :, None]
        else:
            between = _decay_powers(lg * c, steps.clamp_min(0).to(q.dtype)) * (steps >= 0)  # (h, g, g)
            before = torch.einsum("hgf,bhfme->bhgme", between, kv)
            if carry is not None:
                carry_decay = _decay_powers(lg * c, g_idx.to(q.dtype))  # (h, g): gamma^(c * g)
                before = before + carry_decay[None, :, :, None, None] * carry[:, :, None]
        inter = torch.matmul(qc, before)  # (b, h, g, c, e)
        y = y + (inter if query_decay is None else inter * query_decay[:, None])
        last = before[:, :, -1]
        carry = last + kv[:, :, -1] if log_decay is None else torch.exp(lg * c)[:, None, None] * last + kv[:, :, -1]
        outs.append(rearrange(y, "b h g c e -> b h (g c) e"))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)
    return out[:, :, :n]


def _diagonal(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return (q * k).sum(-1, keepdim=True) * v  # (b, h, n, e): the m = n term


def chunked_sums(
    q: Tensor, k: Tensor, v: Tensor, *, chunk_size: int, causal: bool, log_decay: Tensor | None = None
) -> Tensor:
    """The sums of :func:`parallel_sums` without any n x n tensor (see the module docstring). Shapes as there."""
    if causal:
        return _causal_chunked(q, k, v, chunk_size, log_decay)
    if log_decay is None:
        return torch.matmul(q, torch.matmul(k.transpose(-1, -2), v))  # q (k^T v): O(n * m * e)
    forward = _causal_chunked(q, k, v, chunk_size, log_decay)
    backward = _causal_chunked(*(t.flip(-2) for t in (q, k, v)), chunk_size, log_decay).flip(-2)
    return forward + backward - _diagonal(q, k, v)


def recurrent_step(
    state: Tensor, q_t: Tensor, k_t: Tensor, v_t: Tensor, log_decay: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """One step of the RNN form: ``S_t = gamma S_{t-1} + k_t v_t^T``, ``y_t = q_t S_t``. Pure: returns a new state.

    Args:
        state: ``(batch, heads, m, e)`` (zeros before the first token).
        q_t, k_t: ``(batch, heads, m)``; v_t: ``(batch, heads, e)``.
        log_decay: ``(heads,)`` log gamma, or None.

    Returns:
        ``(y_t (batch, heads, e), new state)``.
    """
    update = k_t[..., :, None] * v_t[..., None, :]  # (b, h, m, e)
    if log_decay is not None:
        state = torch.exp(log_decay.to(state.dtype))[:, None, None] * state
    state = state + update
    return torch.einsum("bhm,bhme->bhe", q_t, state), state


def recurrent_sums(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, log_decay: Tensor | None = None) -> Tensor:
    """The sums of :func:`parallel_sums` by :func:`recurrent_step`, one position at a time (O(n) Python steps)."""
    b, h, n, m = q.shape
    state = q.new_zeros(b, h, m, v.shape[-1])
    outs = []
    for t in range(n):
        y, state = recurrent_step(state, q[:, :, t], k[:, :, t], v[:, :, t], log_decay)
        outs.append(y)
    forward = torch.stack(outs, dim=-2)  # (b, h, n, e)
    if causal:
        return forward
    if log_decay is None:
        return torch.einsum("bhnm,bhme->bhne", q, state)  # every query reads the final state
    backward = recurrent_sums(*(t.flip(-2) for t in (q, k, v)), causal=True, log_decay=log_decay).flip(-2)
    return forward + backward - _diagonal(q, k, v)
