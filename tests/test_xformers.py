"""The ``xformers`` backend, checked on a CPU-only machine.

Its kernels are CUDA-only, so: (1) the bias mapping is proved by comparing our patterns' ``dense_mask`` with the
xFormers bias after ``materialize()``; (2) the CUDA call path runs with ``memory_efficient_attention`` replaced by
a float64 stand-in that applies the very bias object it receives (layout ``(batch, seq, heads, head_dim)``), so the
argument plumbing, the key padding column and the empty-row fix-up are checked against the reference.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

import efficient_attn as ea
from efficient_attn.attention import xformers_backend
from efficient_attn.errors import BackendUnavailableError
from efficient_attn.attention.xformers_backend import attention_bias, rows_without_keys, xformers_attention
from helpers import pattern_with_padding, random_padding, random_qkv, reference_attention

CPU = torch.device("cpu")


def allowed_by_bias(bias, n: int) -> torch.Tensor:
    """Bool ``(n, n)`` of the pairs an xFormers bias lets through (``materialize`` gives 0 or -inf)."""
    if bias is None:
        return torch.ones(n, n, dtype=torch.bool)
    return bias.materialize((n, n), dtype=torch.float32) == 0


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [1, 3, 16, 40])
@pytest.mark.parametrize("n", [1, 5, 37, 64, 130])
def test_window_pattern_equals_xformers_local_bias(causal, window, n):
    attn = ea.build_attention("window", dim=16, num_heads=2, causal=causal, window_size=window, backend="naive")
    bias = attention_bias(causal, window)
    expected = "LowerTriangularFromBottomRightLocalAttentionMask" if causal else "LocalAttentionFromBottomRightMask"
    assert type(bias).__name__ == expected
    assert torch.equal(allowed_by_bias(bias, n), attn.dense_mask(n))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [1, 7, 130])
def test_full_pattern_equals_xformers_bias(causal, n):
    attn = ea.build_attention("full", dim=16, num_heads=2, causal=causal, backend="naive")
    assert torch.equal(allowed_by_bias(attention_bias(causal, None), n), attn.dense_mask(n))


def test_off_by_one_window_would_be_caught():
    # xFormers counts the query itself in a causal window: w (not w + 1) drops the farthest key
    attn = ea.build_attention("window", dim=16, num_heads=2, causal=True, window_size=3, backend="naive")
    bias = xformers_backend._fmha().attn_bias.LowerTriangularFromBottomRightLocalAttentionMask(3)
    assert not torch.equal(allowed_by_bias(bias, 10), attn.dense_mask(10))


def test_rows_without_keys_by_prefix_sums():
    kpm = torch.tensor([[False, False, True, False, False, False, False]])
    got = rows_without_keys(kpm, left=1, right=0)  # causal window 1: keys i-1, i
    assert got.tolist() == [[True, True, False, False, True, True, True]]
    got = rows_without_keys(kpm, left=1, right=1)
    assert got.tolist() == [[True, False, False, False, True, True, True]]


# ------------------------------------------------------------------------------------- the CUDA path, mocked
class FakeMemoryEfficientAttention:
    """Stands in for ``memory_efficient_attention``: float64 math over ``attn_bias.materialize``; records calls."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, query, key, value, attn_bias=None, p=0.0, scale=None):
        self.calls.append(dict(shape=tuple(query.shape), bias=attn_bias, p=p, scale=scale,
                               key_strides=tuple(key.stride())))
        if query.dim() == 5:  # grouped layout (b, n, groups, heads per group, d): k, v must be expanded, not copied
            assert key.stride(3) == 0 and value.stride(3) == 0, "grouped k, v must be stride-0 over a group's heads"
            query, key, value = (t.flatten(2, 3) for t in (query, key, value))
        batch, n, heads, dim = query.shape
        m = key.shape[1]
        assert key.shape[2:] == query.shape[2:] and value.shape[:3] == key.shape[:3]
        scores = torch.einsum("bnhd,bmhd->bhnm", query.double(), key.double()) * scale  # (b, h, n, m)
        if attn_bias is not None:
            scores = scores + attn_bias.materialize((n, m), dtype=torch.float64)
        probs = torch.softmax(scores, dim=-1)
        return torch.einsum("bhnm,bmhd->bnhd", probs, value.double()).to(query.dtype)  # (b, n, h, d)


@pytest.fixture
def fake_op():
    fake = FakeMemoryEfficientAttention()
    fmha = SimpleNamespace(attn_bias=xformers_backend._fmha().attn_bias, memory_efficient_attention=fake)
    with mock.patch.object(xformers_backend, "_fmha", return_value=fmha):
        yield fake


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_full_module_plumbing_matches_reference(fake_op, causal, padded):
    attn = ea.build_attention("full", dim=32, num_heads=4, causal=causal, backend="xformers").double()
    q, k, v = random_qkv(3, 4, 21, 8, seed=6)
    kpm = random_padding(3, 21, seed=7, empty_row=True) if padded else None
    out = attn._attend_xformers(q, k, v, kpm)  # the method attend() dispatches to on CUDA
    ref = reference_attention(q, k, v, pattern_with_padding(attn.dense_mask(21), kpm))
    torch.testing.assert_close(out, ref, atol=1e-9, rtol=1e-7)
    (call,) = fake_op.calls
    head_dim = 16 if padded else 8  # padding adds one column, rounded up to a multiple of 8
    assert call["shape"] == (3, 21, 4, head_dim)  # (batch, seq, heads, head_dim)
    assert call["scale"] == pytest.approx(1 / math.sqrt(8))
    assert type(call["bias"]).__name__ == ("LowerTriangularMask" if causal else "NoneType")
    if padded:
        assert (out[0] == 0).all()


@pytest.mark.parametrize("causal", [False, True])
def test_window_plumbing_with_padding_matches_reference(fake_op, causal):
    attn = ea.build_attention("window", dim=32, num_heads=4, causal=causal, window_size=5, backend="naive").double()
    q, k, v = random_qkv(2, 4, 30, 8, seed=8)
    kpm = torch.arange(30)[None, :] < torch.tensor([[30], [9]])
    kpm[1, 0] = False  # a hole at the start too
    out = xformers_attention(q, k, v, causal=causal, window=5, key_padding_mask=kpm)
    ref = reference_attention(q, k, v, pattern_with_padding(attn.dense_mask(30), kpm))
    torch.testing.assert_close(out, ref, atol=1e-9, rtol=1e-7)
    assert (out[1, :, 15:] == 0).all()  # rows whose window holds only padding


@pytest.mark.parametrize("causal", [False, True])
def test_window_module_plumbing(fake_op, causal):
    attn = ea.build_attention("window", dim=32, num_heads=4, causal=causal, window_size=4, backend="xformers").double()
    q, k, v = random_qkv(2, 4, 19, 8, seed=11)
    kpm = random_padding(2, 19, seed=12)
    out = attn._attend_xformers(q, k, v, kpm)  # the method attend() dispatches to on CUDA
    ref = reference_attention(q, k, v, pattern_with_padding(attn.dense_mask(19), kpm))
    torch.testing.assert_close(out, ref, atol=1e-9, rtol=1e-7)
    (call,) = fake_op.calls
    assert call["bias"].__class__ is type(attention_bias(causal, 4))


@pytest.mark.parametrize("key, causal", [("full", False), ("full", True), ("window", True)])
def test_grouped_heads_use_the_grouped_layout(fake_op, key, causal):
    params = {"window_size": 4} if key == "window" else {}
    attn = ea.build_attention(key, dim=32, num_heads=4, num_kv_heads=2, causal=causal, backend="xformers",
                              **params).double()
    q, _, _ = random_qkv(2, 4, 19, 8, seed=13)
    _, k, v = random_qkv(2, 2, 19, 8, seed=14)
    kpm = random_padding(2, 19, seed=15)
    out = attn._attend_xformers(q, k, v, kpm)
    (call,) = fake_op.calls
    assert call["shape"] == (2, 19, 2, 2, 16)  # (batch, seq, kv heads, heads per group, head_dim + padding column)
    assert call["key_strides"][3] == 0
    allowed = pattern_with_padding(attn.dense_mask(19), kpm)
    ref = reference_attention(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), allowed)
    torch.testing.assert_close(out, ref, atol=1e-9, rtol=1e-7)
    grad = torch.randn_like(ref)
    for g, r in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(g, r, atol=1e-9, rtol=1e-7)


def test_cross_attention_with_encoder_padding(fake_op):
    attn = ea.build_attention("full", dim=32, num_heads=4, num_kv_heads=2, backend="xformers").double()
    q, _, _ = random_qkv(3, 4, 11, 8, seed=16)
    _, k, v = random_qkv(3, 2, 23, 8, seed=17)
    kpm = random_padding(3, 23, seed=18, empty_row=True)
    out = attn._attend_xformers(q, k, v, kpm)
    allowed = kpm[:, None, None, :].expand(3, 1, 11, 23)
    ref = reference_attention(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), allowed)
    torch.testing.assert_close(out, ref, atol=1e-9, rtol=1e-7)
    assert (out[0] == 0).all()


def test_only_a_plain_window_may_use_xformers():
    assert "xformers" in ea.get_spec("window").backends
    for key in ("bigbird", "longformer"):
        assert "xformers" not in ea.get_spec(key).backends
        attn = ea.build_attention(key, dim=32, num_heads=4)
        q, k, v = random_qkv(1, 4, 16, 8)
        with pytest.raises(ValueError, match="plain sliding window only"):
            attn._attend_xformers(q, k, v, None)


def test_gradients_flow_through_the_padding_column(fake_op):
    q, k, v = random_qkv(2, 2, 12, 8, seed=9)
    kpm = random_padding(2, 12, seed=10)
    out = xformers_attention(q, k, v, causal=True, key_padding_mask=kpm)
    ref = reference_attention(q, k, v, pattern_with_padding(torch.ones(12, 12).tril().bool(), kpm))
    grad = torch.randn_like(ref)
    for g, r in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(g, r, atol=1e-9, rtol=1e-7)


# ------------------------------------------------------------------------------------------------ availability
def test_cpu_reports_cuda_only():
    attn = ea.build_attention("full", dim=32, num_heads=4, backend="xformers")
    reason = attn.unavailable_reason("xformers", CPU, False)
    assert reason is not None and "CUDA-only" in reason
    q, k, v = random_qkv(1, 4, 8, 8, dtype=torch.float32)
    with torch.no_grad(), pytest.raises(BackendUnavailableError, match="CUDA-only"):
        attn.attend(q, k, v)


def test_cuda_device_resolves_to_xformers_when_installed():
    attn = ea.build_attention("full", dim=32, num_heads=4, backend="xformers")
    assert attn.resolve_backend(torch.device("cuda"), True) == "xformers"
    with mock.patch("importlib.util.find_spec", return_value=None):
        with pytest.raises(BackendUnavailableError, match="pip install xformers"):
            attn.resolve_backend(torch.device("cuda"), False)
