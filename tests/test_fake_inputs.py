"""Fake-tensor runs (the memory predictor, :mod:`efficient_attn.harness.predict`) of RoPE layers and packed attends.

Under ``FakeTensorMode`` tensors have metadata but no values, so the value checks of ``positions`` (non-negative) and
``document_ids`` (non-decreasing) are skipped for them while type and shape are still checked; a packed attend needs
the document boundaries, so it runs on fake q, k, v with real ``document_ids`` and refuses fake ones with a clear error.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode, is_fake

import efficient_attn as ea
from efficient_attn.attention import packing
from efficient_attn.attention import positions as positional

DOCS = (5, 11, 1, 7)


def packed_ids() -> torch.Tensor:
    return torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(DOCS)])[None]


@pytest.mark.parametrize("key", ["full", "window"])
def test_fake_rope_layer_builds_and_runs(key):
    with FakeTensorMode(allow_non_fake_inputs=True):
        attn = ea.build_attention(key, dim=32, num_heads=4, rope=True, causal=True)
        x = torch.randn(2, 24, 32)
        y = attn(x)
        assert is_fake(y) and y.shape == x.shape
        explicit = attn(x, positions=torch.arange(24).expand(2, 24))  # fake positions: no value read
        assert explicit.shape == x.shape
        with pytest.raises(ValueError, match=r"positions must have shape \(batch, seq\) = \(2, 24\)"):
            attn(x, positions=torch.arange(23).expand(2, 23))
        with pytest.raises(ValueError, match="positions must be an int tensor"):
            attn(x, positions=torch.zeros(2, 24))


def test_fake_packed_attend_runs_per_document_and_matches_the_real_shapes():
    ids = packed_ids()
    reversed_ids = ids.flip(-1)  # real, built outside the mode: 3 (x7), then 2 at position 7
    n = sum(DOCS)
    with FakeTensorMode(allow_non_fake_inputs=True):
        attn = ea.build_attention("full", dim=32, num_heads=4, num_kv_heads=2, rope=True)
        q = torch.randn(1, 4, n, 8, requires_grad=True)
        k, v = (torch.randn(1, 2, n, 8, requires_grad=True) for _ in range(2))
        out = attn.attend(q, k, v, document_ids=ids)
        assert is_fake(out) and out.shape == q.shape
        out.sum().backward()
        assert q.grad.shape == q.shape
        layer = attn(torch.randn(1, n, 32), document_ids=ids)  # RoPE positions restart per document (fake)
        assert layer.shape == (1, n, 32)
        with pytest.raises(ValueError, match=r"non-decreasing along seq; got a decrease in row 0 at position 7 \(3 -> 2\)"):
            attn.attend(q, k, v, document_ids=reversed_ids)  # a real tensor's order is still checked
        with pytest.raises(ValueError, match="got shape"):
            attn.attend(q, k, v, document_ids=ids[:, 1:])


def test_fake_document_ids_skip_the_order_check_but_cannot_be_split():
    with FakeTensorMode():
        fake = torch.zeros(1, 24, dtype=torch.long)
        packing.check_document_ids(fake, (1, 24))  # no value read
        with pytest.raises(ValueError, match="got dtype torch.float32"):
            packing.check_document_ids(torch.zeros(1, 24), (1, 24))
        with pytest.raises(ValueError, match="document_ids is a fake or meta tensor.*pass a real tensor"):
            packing.document_segments(fake)


def test_meta_tensors_skip_value_checks_and_real_ones_keep_them():
    positional.check_positions(torch.empty(2, 5, dtype=torch.long, device="meta"), 2, 5)
    packing.check_document_ids(torch.empty(2, 5, dtype=torch.long, device="meta"), (2, 5))
    with pytest.raises(ValueError, match="positions must be >= 0"):
        positional.check_positions(torch.tensor([[0, -1]]), 1, 2)
    assert packing.document_segments(packed_ids()) == [(0, 0, 5), (0, 5, 11), (0, 16, 1), (0, 17, 7)]
