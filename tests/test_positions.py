"""Positions inside attention: ALiBi (Press et al. 2022, arXiv:2108.12409) and RoPE (Su et al. 2021, arXiv:2104.09864).

ALiBi: every exact backend that supports it equals a float64 dense reference with the same bias (the bias written
here from the paper's formula, independent of the library), causal and not, with key padding; the backends and
variants that cannot add it refuse, saying why and naming those that can. RoPE: the score of a query-key pair
depends only on their distance; ``forward`` applies it to q and k and stays causal.
"""

from __future__ import annotations

import math

import pytest
import torch

import efficient_attn as ea
from efficient_attn.attention.positions import alibi_slopes, apply_rope, default_positions
from helpers import pattern_with_padding, random_padding, reference_attention
from variant_cases import build_small

CPU = torch.device("cpu")
EXACT = [k for k in ea.list_attentions() if ea.get_spec(k).exact]
APPROX = [k for k in ea.list_attentions() if not ea.get_spec(k).exact]


def paper_slopes(heads: int) -> torch.Tensor:
    # Press et al. 2022, section 3: 8 heads -> 1/2, 1/4, ..., 1/256 (geometric, ratio and start 2^(-8/n))
    return torch.tensor([2.0 ** (-8.0 * (i + 1) / heads) for i in range(heads)], dtype=torch.float64)


def alibi_reference(q, k, v, allowed):
    """float64 softmax(QK^T / sqrt(d) - m_h |i - j|) V over ``allowed``; k, v repeated to q's heads if grouped."""
    q, k, v = (t.double() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    n = q.shape[-2]
    idx = torch.arange(n, dtype=torch.float64)
    bias = -paper_slopes(q.shape[1])[:, None, None] * (idx[:, None] - idx[None, :]).abs()  # (h, n, n)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
    allowed = allowed.expand_as(scores)
    probs = torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1)
    probs = torch.where(allowed.any(-1, keepdim=True), probs, torch.zeros_like(probs))
    return probs @ v


def test_slopes_follow_the_paper():
    assert alibi_slopes(8) == [2.0 ** -i for i in range(1, 9)]
    assert alibi_slopes(4) == [2.0 ** -(2 * i) for i in range(1, 5)]
    # not a power of two: the 4-head slopes, then every other slope of 8 heads
    assert alibi_slopes(6) == alibi_slopes(4) + [2.0 ** -1, 2.0 ** -3]


def alibi_cases():
    for key in EXACT:
        for backend in ea.get_spec(key).module_cls.alibi_backends:
            yield pytest.param(key, backend, id=f"{key}-{backend}")


@pytest.mark.parametrize("key, backend", [c for c in alibi_cases() if c.values[1] != "flex"])
@pytest.mark.parametrize("causal", [False, True])
def test_alibi_equals_dense_reference(key, backend, causal):
    attn = build_small(key, causal=causal, backend=backend, alibi=True, num_kv_heads=2)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 37, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, 37, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    kpm = random_padding(2, 37, seed=2)
    out = attn.attend(q, k, v, key_padding_mask=kpm)
    assert attn.last_backend == backend
    ref = alibi_reference(q, k, v, pattern_with_padding(attn.dense_mask(37), kpm))
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-8)
    grad = torch.randn_like(ref)
    for name, g, r in zip("qkv", torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-8, msg=f"gradient of {name}")


# flex's ALiBi score_mod (with grouped heads and padding, one compile) is checked against alibi_reference in
# tests/test_gqa.py::test_flex_grouped_heads_alibi_and_padding


def test_alibi_changes_the_output_so_the_checks_can_fail():
    plain = build_small("window", backend="torch")
    biased = build_small("window", backend="torch", alibi=True)
    q, k, v = (torch.randn(1, 4, 20, 8, dtype=torch.float64) for _ in range(3))
    assert not torch.allclose(plain.attend(q, k, v), biased.attend(q, k, v))


def test_blocked_alibi_has_no_dense_bias(monkeypatch):
    from efficient_attn.attention import blocked
    from efficient_attn.measure.storage import StorageTracker

    monkeypatch.setattr(blocked, "BIAS_ELEMENTS_PER_CALL", 1 << 16)  # so a short input shows the chunking
    attn = build_small("full", backend="torch", alibi=True, causal=True).float()
    n = 1024
    q, k, v = (torch.randn(1, 4, n, 8) for _ in range(3))
    with StorageTracker() as tracker, torch.no_grad():
        attn.attend(q, k, v)
    assert tracker.largest_output.numel < n * n // 4, tracker.largest_output


def test_full_auto_with_alibi_skips_sdpa():
    attn = ea.build_attention("full", dim=32, num_heads=4, alibi=True)
    q = torch.randn(1, 4, 16, 8)
    attn.attend(q, q, q)
    assert attn.last_backend == "torch"


@pytest.mark.parametrize("backend", ["sdpa", "xformers"])
def test_backends_without_alibi_refuse_saying_why(backend):
    with pytest.raises(ValueError, match=rf"backend '{backend}' of attention 'full' cannot add ALiBi: .*naive, torch"):
        ea.build_attention("full", dim=32, num_heads=4, alibi=True, backend=backend)
    with pytest.raises(ValueError, match="dense"):
        ea.build_attention("full", dim=32, num_heads=4, alibi=True, backend="sdpa")


@pytest.mark.parametrize("key", APPROX)
def test_low_rank_and_kernel_variants_refuse_alibi_naming_those_that_support_it(key):
    supporting = ", ".join(k for k in ea.list_attentions() if ea.get_spec(k).module_cls.alibi_backends)
    assert "full" in supporting and "window" in supporting
    with pytest.raises(ValueError, match=rf"alibi is not supported by attention '{key}': .*support it: {supporting}"):
        build_small(key, alibi=True)


# ------------------------------------------------------------------------------------------------------- RoPE
def test_rope_score_depends_only_on_distance():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 1, 16, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 3, 1, 16, generator=gen, dtype=torch.float64)
    scores = []
    for offset in (0, 7, 1000, 123457):
        qp = torch.tensor([[5 + offset], [40 + offset]])
        kp = torch.tensor([[2 + offset], [41 + offset]])
        scores.append((apply_rope(q, qp) * apply_rope(k, kp)).sum(-1))
    for other in scores[1:]:
        torch.testing.assert_close(other, scores[0], atol=1e-10, rtol=0)
    # the distance does matter (so the check can fail)
    far = (apply_rope(q, torch.tensor([[9], [40]])) * apply_rope(k, torch.tensor([[2], [41]]))).sum(-1)
    assert not torch.allclose(far, scores[0])


def test_rope_rotates_pairs_and_keeps_norms():
    x = torch.randn(1, 1, 5, 8, dtype=torch.float64)
    pos = torch.arange(5)[None]
    y = apply_rope(x, pos)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])  # position 0: no rotation
    angle = 3 * 10000.0 ** (-2 / 8)  # position 3, pair 1
    a, b = x[0, 0, 3, 2], x[0, 0, 3, 3]
    expected = torch.stack([a * math.cos(angle) - b * math.sin(angle), a * math.sin(angle) + b * math.cos(angle)])
    torch.testing.assert_close(y[0, 0, 3, 2:4], expected)


def test_default_positions_restart_at_each_document():
    ids = torch.tensor([[0, 0, 0, 1, 1, 2], [3, 3, 3, 3, 3, 3]])
    assert default_positions(2, 6, ids, "cpu").tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]
    assert default_positions(1, 3, None, "cpu").tolist() == [[0, 1, 2]]


def test_forward_applies_rope_at_the_given_positions():
    attn = build_small("full", rope=True, backend="naive")
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    default = attn(x)
    torch.testing.assert_close(attn(x, positions=torch.arange(10).expand(2, 10)), default)
    # RoPE scores depend on distances only: shifting every position changes nothing
    torch.testing.assert_close(attn(x, positions=torch.arange(10).expand(2, 10) + 50), default, atol=1e-10, rtol=0)
    plain = build_small("full", backend="naive")
    plain.load_state_dict(attn.state_dict())
    assert not torch.allclose(plain(x), default)
    with pytest.raises(ValueError, match=r"positions must have shape \(batch, seq\) = \(2, 10\)"):
        attn(x, positions=torch.arange(10))
    with pytest.raises(ValueError, match="only used by rope"):
        plain(x, positions=torch.arange(10).expand(2, 10))


@pytest.mark.parametrize("key", [k for k in ea.list_attentions() if ea.get_spec(k).supports_causal])
def test_rope_forward_stays_causal(key):
    attn = build_small(key, rope=True, causal=True).eval()
    x = torch.randn(1, 30, 32, dtype=torch.float64)
    y = x.clone()
    y[:, 21:] += 5.0
    with torch.no_grad():
        torch.testing.assert_close(attn(x)[:, :21], attn(y)[:, :21], atol=1e-10, rtol=0)


def test_rope_needs_an_even_head_dim():
    with pytest.raises(ValueError, match="head_dim=3 must be even"):
        ea.build_attention("full", dim=12, num_heads=4, rope=True)
