"""The storage tracker is exact on known allocations."""

import torch

from efficient_attn.measure.storage import StorageTracker


def test_exact_on_a_known_allocation():
    with StorageTracker() as tracker:
        a = torch.empty(1000, dtype=torch.float32)  # 4000 bytes
        b = torch.empty(250, dtype=torch.float64)  # 2000 bytes
        assert tracker.current_bytes == 6000
        del a
        assert tracker.current_bytes == 2000
        c = torch.empty(100, dtype=torch.int8)  # 100 bytes
        del b, c
    assert tracker.peak_bytes == 6000
    assert tracker.current_bytes == 0
    assert tracker.allocated_bytes == 6100


def test_views_and_inplace_are_not_double_counted():
    with StorageTracker() as tracker:
        a = torch.zeros(64, 64)
        view = a.view(-1)[:10]
        a.add_(1.0)
        assert tracker.current_bytes == 64 * 64 * 4
        del a
        assert tracker.current_bytes == 64 * 64 * 4  # the view keeps the storage alive
        del view
        assert tracker.current_bytes == 0


def test_preexisting_tensors_are_not_counted_and_largest_output_is_recorded():
    big = torch.ones(1000, 1000)
    with StorageTracker() as tracker:
        row = big[0].clone()  # 4000 bytes
        outer = torch.outer(row[:50], row[:30])  # 1500 elements, 6000 bytes
    assert tracker.peak_bytes == 4000 + 6000
    assert tracker.largest_output.numel == 1500
    assert tracker.largest_output.shape == (50, 30)
    assert tracker.largest_output.op == "aten.mul.Tensor"  # torch.outer decomposes to a broadcast mul
    del outer


def test_counts_autograd_saved_tensors_and_gradients():
    x = torch.randn(1000, requires_grad=True)
    with StorageTracker() as tracker:
        y = x.exp()  # saved for backward: 4000 bytes
        loss = (y * 2).sum()
        loss.backward()
    assert tracker.peak_bytes >= 2 * 4000
    assert x.grad is not None
