"""Sparse in memory, not only in time: exact tensor bytes from the storage tracker (deterministic, no wall time).

At n = 16*w and n = 64*w (w = window / block): the torch backend's peak grows under 5x for the 4x longer input and
no single op output reaches n^2/8 elements at the longer length; the naive backend does both (so the test can fail).
"""

import pytest
import torch

from efficient_attn.measure.storage import StorageTracker
from helpers import build_for_test

W = 64
CASES = {
    "window": {"window_size": W},
    "bigbird": {"block_size": W},
    "longformer": {"window_size": W, "global_tokens": 2},
}


def measure(key, backend, seq, mode, causal=False):
    attn = build_for_test(key, dim=32, num_heads=2, backend=backend, causal=causal, **CASES[key])
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, seq, 16, generator=gen, requires_grad=mode == "fwd_bwd") for _ in range(3))
    kpm = torch.ones(1, seq, dtype=torch.bool)
    kpm[0, -5:] = False
    attn.attend(q, k, v, key_padding_mask=kpm)  # build and cache the plan outside the measurement
    with StorageTracker() as tracker:
        if mode == "fwd":
            with torch.no_grad():
                attn.attend(q, k, v, key_padding_mask=kpm)
        else:
            attn.attend(q, k, v, key_padding_mask=kpm).sum().backward()
    return tracker.peak_bytes, tracker.largest_output.numel


@pytest.mark.parametrize("key", sorted(CASES))
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("causal", [False, True])
def test_torch_backend_memory_is_linear(key, mode, causal):
    short, long = 16 * W, 64 * W
    peak_short, _ = measure(key, "torch", short, mode, causal)
    peak_long, largest_long = measure(key, "torch", long, mode, causal)
    assert peak_long < 5 * peak_short, f"peak grew {peak_long / peak_short:.1f}x for a 4x longer input"
    assert largest_long < long * long // 8, f"an op output of {largest_long} elements (n^2/8 = {long * long // 8})"


@pytest.mark.slow
@pytest.mark.parametrize("key", sorted(CASES))
def test_naive_backend_is_quadratic_so_the_check_can_fail(key):
    short, long = 16 * W, 64 * W
    peak_short, _ = measure(key, "naive", short, "fwd")
    peak_long, largest_long = measure(key, "naive", long, "fwd")
    assert peak_long >= 5 * peak_short
    assert largest_long >= long * long // 8


@pytest.mark.parametrize("key", sorted(CASES))
@pytest.mark.parametrize("padded", [False, True])
def test_runs_under_fake_tensors_for_memory_prediction(key, padded):
    """The harness predicts memory with FakeTensorMode: the pattern's index plan must still be built (for real)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    seq = 16 * W - 3
    with FakeTensorMode(allow_non_fake_inputs=True):
        attn = build_for_test(key, dim=32, num_heads=2, causal=True, **CASES[key])
        q, k, v = (torch.randn(1, 2, seq, 16, requires_grad=True) for _ in range(3))
        kpm = torch.ones(1, seq, dtype=torch.bool) if padded else None
        with StorageTracker() as tracker:
            attn.attend(q, k, v, key_padding_mask=kpm).sum().backward()
    assert tracker.peak_bytes > 0 and attn.last_padded_len == 16 * W
    real_peak, _ = measure(key, "torch", 16 * W, "fwd_bwd", causal=True)
    assert tracker.peak_bytes < 3 * real_peak
