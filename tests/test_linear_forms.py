"""The full-heads paths of :mod:`efficient_attn.attention.linear_forms` (``heads == kv_heads``: no group index, and
the recurrent form's one-``baddbmm``-per-token scan) equal the general grouped-heads path run with a group of one
(``group_index=True``), in float64, outputs and gradients: chunked causal and not, recurrent causal and not, with
and without decay, over several chunk sizes (and across chunk groups)."""

import pytest
import torch

from efficient_attn.attention import linear_forms
from efficient_attn.attention.linear_forms import chunked_sums, recurrent_sums

TOL = dict(atol=1e-12, rtol=1e-12)


def inputs(seed: int, heads: int = 3, kv_heads: int = 3, n: int = 29):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, n, 5, generator=g, dtype=torch.float64)
    k = torch.randn(2, kv_heads, n, 5, generator=g, dtype=torch.float64)
    v = torch.randn(2, kv_heads, n, 4, generator=g, dtype=torch.float64)
    log_decay = torch.log(torch.tensor([0.97, 0.6, 0.2][:heads] + [0.9] * max(0, heads - 3), dtype=torch.float64))
    return [t.requires_grad_() for t in (q, k, v)], log_decay


def outputs_and_grads(fn, q, k, v):
    out = fn(q, k, v)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    return (out, *torch.autograd.grad((out * weight).sum(), (q, k, v)))


def assert_same(fast, general):
    for name, a, b in zip(("out", "dq", "dk", "dv"), fast, general):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("decay", [False, True], ids=["no-decay", "decay"])
@pytest.mark.parametrize("causal", [False, True], ids=["non-causal", "causal"])
@pytest.mark.parametrize("chunk_size", [1, 4, 16])
def test_chunked_full_heads_path_equals_the_general_path(decay, causal, chunk_size):
    (q, k, v), log_decay = inputs(chunk_size)
    lg = log_decay if decay else None
    fast, general = (outputs_and_grads(lambda a, b, c: chunked_sums(a, b, c, chunk_size=chunk_size, causal=causal,
                                                                    log_decay=lg, group_index=gi), q, k, v)
                     for gi in (None, True))
    assert_same(fast, general)


def test_chunked_full_heads_path_carries_its_state_across_groups(monkeypatch):
    monkeypatch.setattr(linear_forms, "GROUP_POSITIONS", 8)
    (q, k, v), log_decay = inputs(3, n=45)
    for lg in (None, log_decay):
        for causal in (False, True):
            fast, general = (outputs_and_grads(lambda a, b, c: chunked_sums(a, b, c, chunk_size=4, causal=causal,
                                                                            log_decay=lg, group_index=gi), q, k, v)
                             for gi in (None, True))
            assert_same(fast, general)


@pytest.mark.parametrize("decay", [False, True], ids=["no-decay", "decay"])
@pytest.mark.parametrize("causal", [False, True], ids=["non-causal", "causal"])
def test_recurrent_full_heads_scan_equals_the_general_step(decay, causal):
    (q, k, v), log_decay = inputs(11)
    lg = log_decay if decay else None
    fast, general = (outputs_and_grads(lambda a, b, c: recurrent_sums(a, b, c, causal=causal, log_decay=lg,
                                                                      group_index=gi), q, k, v)
                     for gi in (None, True))
    assert_same(fast, general)


def test_the_full_heads_paths_are_taken_and_grouped_heads_refuse_them(monkeypatch):
    """The default drops the group index exactly when heads == kv_heads (the fast path is what runs), and asking
    for it with grouped heads is a clear error."""
    (q, k, v), _ = inputs(0)
    (qg, kg, vg), _ = inputs(0, heads=4, kv_heads=2)
    calls = []
    real = linear_forms._scan_full_heads
    monkeypatch.setattr(linear_forms, "_scan_full_heads", lambda *a: calls.append(1) or real(*a))
    recurrent_sums(q, k, v, causal=True)
    assert calls == [1]
    recurrent_sums(qg, kg, vg, causal=True)
    assert calls == [1]  # grouped heads: the general step
    for fn in (lambda: chunked_sums(qg, kg, vg, chunk_size=4, causal=True, group_index=False),
               lambda: recurrent_sums(qg, kg, vg, causal=True, group_index=False)):
        with pytest.raises(ValueError, match="group_index=False needs heads == kv_heads"):
            fn()
