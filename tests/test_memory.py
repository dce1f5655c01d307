"""Peak memory: exact on CPU through the storage tracker, allocator peak minus baseline on (mocked) CUDA, RSS probe."""

from unittest import mock

import torch

from efficient_attn.measure.memory import measure_call, rss_probe


def test_cpu_peak_is_exact_on_a_known_allocation():
    def fn():
        a = torch.empty(1000, dtype=torch.float32)  # 4000 bytes
        b = torch.empty(250, dtype=torch.float64)  # 2000 bytes, both alive
        del a, b
        torch.empty(100, dtype=torch.int8)

    result = measure_call(fn, "cpu", count_flops=False)
    assert result.peak_bytes == 6000
    assert result.flops is None


def test_cpu_measurement_counts_flops_in_the_same_call():
    x = torch.randn(8, 16)
    w = torch.randn(16, 4)
    calls = []

    def fn():
        calls.append(1)
        return x @ w  # (8, 4) float32 output: 128 bytes

    result = measure_call(fn, "cpu")
    assert len(calls) == 1
    assert result.flops == 2 * 8 * 16 * 4
    assert result.peak_bytes == 8 * 4 * 4


def test_cuda_peak_resets_the_counter_and_subtracts_the_baseline():
    events = []
    cuda = {
        "synchronize": mock.Mock(side_effect=lambda *a: events.append("sync")),
        "memory_allocated": mock.Mock(return_value=1_000),
        "reset_peak_memory_stats": mock.Mock(side_effect=lambda *a: events.append("reset")),
        "max_memory_allocated": mock.Mock(side_effect=lambda *a: events.append("read") or 5_000),
    }
    with mock.patch.multiple(torch.cuda, **cuda):
        result = measure_call(lambda: events.append("fn"), "cuda", count_flops=False)
    assert result.peak_bytes == 4_000
    assert events == ["sync", "reset", "fn", "sync", "read"]


def test_rss_probe_sees_a_resident_allocation():
    nbytes = 64 * 2**20
    with rss_probe() as probe:
        block = torch.ones(nbytes // 4)  # touched: resident
    assert probe.peak_bytes >= 0.9 * nbytes
    del block
