"""The three forms of (decayed) linear attention shared by ``linear`` and ``retention``: parallel, chunked, recurrent.

Both variants compute, per head, sums of the form

    y_n = sum_m w_nm (q_n . k_m) v_m

over already feature-mapped queries ``q`` ``(batch, heads, seq, m)``, keys ``k`` ``(batch, kv_heads, seq, m)`` and
values ``v`` ``(batch, kv_heads, seq, e)``; ``kv_heads`` divides ``heads`` and query head ``i`` reads key/value head
``i // (heads / kv_heads)`` (grouped-query heads, Ainslie et al. 2023). Only the ``parallel_sums`` oracle repeats k
and v; the other forms carry the group of query heads as an extra einsum index, and drop it with full heads
(``heads == kv_heads``), where a unit index only costs einsum permutes (``group_index=True`` keeps it: the general
path, which ``tests/test_linear_forms.py`` checks the full-heads paths against). The weights ``w`` are 1 (linear
attention, Katharopoulos et al. 2020, arXiv:2006.16236)
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
  :func:`recurrent_step`; with full heads :func:`recurrent_sums` runs the same recurrence as one ``baddbmm`` and one
  ``bmm`` per token. Non-causal: the final state read by every query (no decay), or a forward and a backward scan
  minus the diagonal (decay). A Python loop of n steps: its time is per-op overhead (about 0.1-0.2 ms per token
  forward+backward on CPU), so it is there to check the other forms and to decode, not to be fast; its memory is
  O(n) with autograd (each step saves its state).
"""

from __future__ import annotations

import torch
from einops import rearrange, repeat
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


def _causal_chunked(
    q: Tensor, k: Tensor, v: Tensor, chunk_size: int, log_decay: Tensor | None, group_index: bool | None = None
) -> Tensor:
    """Causal sums by chunks; q ``(b, h*r, n, m)``, k ``(b, h, n, m)``, v ``(b, h, n, e)``, log_decay ``(h*r,)``.

    The ``r`` query heads of a key/value head are an extra einsum index (``r``): k and v are never repeated. Without
    decay the chunk states ``k^T v`` are shared by the group; with decay (per query head) each query head has its
    own states, computed from the shared keys scaled by its decays. ``group_index``: carry the ``r`` index (the
    general path); None = only when ``r > 1``: with full heads (``r == 1``) the same products run without it, which
    spares einsum the permutes a unit index costs (``tests/test_linear_forms.py`` checks the two paths agree).
    """
    n = q.shape[-2]
    c = chunk_size
    r = _group(q, k)
    grouped = r > 1 if group_index is None else group_index
    if r > 1 and not grouped:
        raise ValueError(f"group_index=False needs heads == kv_heads, got {r} query heads per key/value head")
    R = " r" if grouped else ""  # the group index in einops patterns
    G = "r" if grouped else ""  # and in einsum subscripts
    axes = {"r": r} if grouped else {}
    q, k, v = (pad_to_chunks(t, c) for t in (q, k, v))
    total = q.shape[-2]
    group = max(1, GROUP_POSITIONS // c) * c
    local = torch.arange(c, device=q.device)
    dist = local[:, None] - local[None, :]  # (c, c)
    if log_decay is None:
        intra = (dist >= 0).to(q.dtype)  # (c, c)
    else:
        lg = log_decay.to(q.dtype)
        # (h, 1, [r,] c, c): broadcast over the chunks of a group
        intra = rearrange(_decay_powers(lg, dist.clamp_min(0).to(q.dtype)) * (dist >= 0),
                          f"(h{R}) c d -> h 1{R} c d", **axes)
        # to the chunk's end and from the previous end: (h, 1, [r,] c, 1)
        key_decay = rearrange(_decay_powers(lg, (c - 1 - local).to(q.dtype)), f"(h{R}) c -> h 1{R} c 1", **axes)
        query_decay = rearrange(_decay_powers(lg, (local + 1).to(q.dtype)), f"(h{R}) c -> h 1{R} c 1", **axes)
        chunk_decay = rearrange(torch.exp(lg * c), f"(h{R}) -> h{R} 1 1", **axes)  # gamma^c
    outs = []
    carry = None  # the state at the end of the previous group: (b, h, m, e) shared, (b, h, [r,] m, e) with decay
    for start in range(0, total, group):
        stop = min(start + group, total)
        chunks = (stop - start) // c
        qc = rearrange(q[:, :, start:stop], f"b (h{R}) (g c) x -> b h g{R} c x", c=c, **axes)
        kc, vc = (rearrange(t[:, :, start:stop], "b h (g c) x -> b h g c x", c=c) for t in (k, v))
        scores = torch.einsum(f"bhg{G}cm,bhgdm->bhg{G}cd", qc, kc) * intra  # (b, h, g, [r,] c, c)
        y = torch.einsum(f"bhg{G}cd,bhgde->bhg{G}ce", scores, vc)  # (b, h, g, [r,] c, e)
        g_idx = torch.arange(chunks, device=q.device)
        steps = g_idx[:, None] - 1 - g_idx[None, :]  # (g, g): chunks between g' and g
        if log_decay is None:
            kv = torch.einsum("bhgcm,bhgce->bhgme", kc, vc)  # (b, h, g, m, e): shared by the group
            between = (steps >= 0).to(q.dtype)  # (g, g)
            before = torch.einsum("gf,bhfme->bhgme", between, kv)
            if carry is not None:
                before = before + carry[:, :, None]
            y = y + torch.einsum(f"bhg{G}cm,bhgme->bhg{G}ce", qc, before)
            carry = before[:, :, -1] + kv[:, :, -1]
        else:
            decayed_k = (kc[:, :, :, None] if grouped else kc) * key_decay  # (b, h, g, [r,] c, m): per query head
            kv = torch.einsum(f"bhg{G}cm,bhgce->bhg{G}me", decayed_k, vc)  # (b, h, g, [r,] m, e)
            between = _decay_powers(lg * c, steps.clamp_min(0).to(q.dtype)) * (steps >= 0)  # (h*r, g, g)
            before = torch.einsum(f"h{G}gf,bhf{G}me->bhg{G}me",
                                  rearrange(between, f"(h{R}) g f -> h{R} g f", **axes), kv)
            if carry is not None:
                carry_decay = _decay_powers(lg * c, g_idx.to(q.dtype))  # (h*r, g): gamma^(c g)
                before = before + rearrange(carry_decay, f"(h{R}) g -> h g{R} 1 1", **axes) * carry[:, :, None]
            y = y + torch.einsum(f"bhg{G}cm,bhg{G}me->bhg{G}ce", qc, before) * query_decay
            carry = chunk_decay * before[:, :, -1] + kv[:, :, -1]
        outs.append(rearrange(y, f"b h g{R} c e -> b (h{R}) (g c) e"))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)
    return out[:, :, :n]


def _diagonal(q: Tensor, k: Tensor, v: Tensor, group_index: bool | None = None) -> Tensor:
    """The ``m = n`` term ``(q_n . k_n) v_n`` ``(b, h*r, n, e)`` (grouped heads as in :func:`_causal_chunked`)."""
    r = _group(q, k)
    if not (r > 1 if group_index is None else group_index):
        return (q * k).sum(-1, keepdim=True) * v
    qg = rearrange(q, "b (h r) n m -> b h r n m", r=r)
    out = torch.einsum("bhrnm,bhnm,bhne->bhrne", qg, k, v)
    return rearrange(out, "b h r n e -> b (h r) n e")


def _read_shared(q: Tensor, state: Tensor, group_index: bool | None = None) -> Tensor:
    """Every query of ``q`` ``(b, h*r, n, m)`` reads its key/value head's ``state`` ``(b, h, m, e)``."""
    r = _group(q, state)
    if not (r > 1 if group_index is None else group_index):
        return torch.matmul(q, state)
    out = torch.einsum("bhrnm,bhme->bhrne", rearrange(q, "b (h r) n m -> b h r n m", r=r), state)
    return rearrange(out, "b h r n e -> b (h r) n e")


def chunked_sums(
    q: Tensor, k: Tensor, v: Tensor, *, chunk_size: int, causal: bool, log_decay: Tensor | None = None,
    group_index: bool | None = None,
) -> Tensor:
    """The sums of :func:`parallel_sums` without any n x n tensor (see the module docstring). Shapes as there.

    ``group_index``: True runs the grouped-heads products also when ``heads == kv_heads`` (the general path, for
    tests); None (default) drops the unit group index then."""
    if causal:
        return _causal_chunked(q, k, v, chunk_size, log_decay, group_index)
    if log_decay is None:
        return _read_shared(q, torch.matmul(k.transpose(-1, -2), v), group_index)  # q (k^T v): O(n * m * e)
    forward = _causal_chunked(q, k, v, chunk_size, log_decay, group_index)
    backward = _causal_chunked(*(t.flip(-2) for t in (q, k, v)), chunk_size, log_decay, group_index).flip(-2)
    return forward + backward - _diagonal(q, k, v, group_index)


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


def _scan_full_heads(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor | None) -> tuple[Tensor, Tensor]:
    """The causal recurrent form when ``heads == kv_heads``: the state ``(b*h, m, e)`` takes one ``baddbmm`` per
    token (``S_t = gamma S_{t-1} + k_t v_t^T``) and each output one ``bmm`` (``y_t = q_t S_t``): the fewest ops a
    step can cost, since a Python loop's time is per-op overhead. Returns ``(y (b, h, n, e), final state
    (b, h, m, e))``; the same sums as :func:`recurrent_step`'s loop."""
    b, h, _, m = q.shape
    e = v.shape[-1]
    qs, ks, vs = (rearrange(t, "b h n x -> n (b h) x") for t in (q, k, v))
    state = q.new_zeros(b * h, m, e)
    decay = None if log_decay is None else repeat(torch.exp(log_decay.to(q.dtype)), "h -> (b h) 1 1", b=b)
    outs = []
    # unbind, not indexing: its backward stacks the n gradients once, where n selects would each scatter into a
    # zero tensor of the whole input (O(n^2) time and traffic in the backward pass)
    for q_t, k_t, v_t in zip(qs.unbind(0), ks.unbind(0), vs.unbind(0)):
        if decay is not None:
            state = state * decay
        state = torch.baddbmm(state, k_t[:, :, None], v_t[:, None, :])
        outs.append(torch.bmm(q_t[:, None, :], state))  # (b*h, 1, e)
    y = rearrange(torch.cat(outs, dim=1), "(b h) n e -> b h n e", b=b)
    return y, rearrange(state, "(b h) m e -> b h m e", b=b)


def recurrent_sums(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool, log_decay: Tensor | None = None,
    group_index: bool | None = None,
) -> Tensor:
    """The sums of :func:`parallel_sums` one position at a time (O(n) Python steps): by :func:`recurrent_step`
    with grouped heads (or ``group_index=True``, the general path), by :func:`_scan_full_heads` with full heads.
    The state is per key/value head without decay, per query head with decay.

    Cost: a Python loop of n steps, each a few small ops on the constant-size state (a few dozen with grouped heads),
    so its time is per-op overhead, not arithmetic (full heads: about 0.1 ms per token forward, 0.16 ms
    forward+backward on a 2-core CPU; on a GPU each step is several kernel launches). The ``recurrent`` backends of
    ``linear`` and ``retention`` run it; their ``sequential_backends`` tells the harness, which predicts their memory
    from short fake runs and notes it on their rows."""
    r = _group(q, k)
    if r > 1 and group_index is False:
        raise ValueError(f"group_index=False needs heads == kv_heads, got {r} query heads per key/value head")
    if r > 1 or group_index:
        b, h, _, m = q.shape
        state = q.new_zeros(b, h if log_decay is not None else k.shape[1], m, v.shape[-1])
        outs = []
        # unbind: see _scan_full_heads
        for q_t, k_t, v_t in zip(q.unbind(-2), k.unbind(-2), v.unbind(-2)):
            y, state = recurrent_step(state, q_t, k_t, v_t, log_decay)
            outs.append(y)
        forward = torch.stack(outs, dim=-2)  # (b, h, n, e)
    else:
        forward, state = _scan_full_heads(q, k, v, log_decay)
    if causal:
        return forward
    if log_decay is None:
        return _read_shared(q, state, group_index)  # every query reads the final state
    backward = recurrent_sums(*(t.flip(-2) for t in (q, k, v)), causal=True, log_decay=log_decay,
                              group_index=group_index).flip(-2)
    return forward + backward - _diagonal(q, k, v, group_index)
