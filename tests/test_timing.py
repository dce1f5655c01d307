"""Timing: warm-up outside the timed window, the thread count, repeats for slow calls, CUDA synchronisation."""

import time
from unittest import mock

import pytest
import torch
from torch.utils import benchmark

from efficient_attn.measure import timing
from efficient_attn.measure.timing import time_call, time_callable


class Counter:
    def __init__(self, sleep_s: float = 0.0) -> None:
        self.calls = 0
        self.sleep_s = sleep_s

    def __call__(self) -> None:
        self.calls += 1
        if self.sleep_s:
            time.sleep(self.sleep_s)


def test_fast_calls_use_blocked_autorange_with_all_threads():
    fn = Counter()
    with mock.patch.object(timing.benchmark, "Timer", wraps=benchmark.Timer) as timer_cls:
        result = time_callable(fn, device="cpu", min_run_time=0.05)
    assert timer_cls.call_args.kwargs["num_threads"] == torch.get_num_threads()
    assert result.method == "blocked_autorange"
    assert result.runs >= 100  # a no-op is repeated many times in 50 ms
    assert fn.calls >= result.runs + 1  # the warm-up (and the block-size estimate) are outside the timed runs
    assert result.window_s >= 0.05 * 0.9
    assert result.median_ms >= 0.0 and result.iqr_ms >= 0.0


def test_calls_too_long_to_repeat_are_timed_one_by_one():
    fn = Counter(sleep_s=0.02)
    result = time_callable(fn, device="cpu", min_run_time=0.05, slow_call_s=10.0, min_runs=5)
    assert result.method == "repeats"
    assert result.runs == 5
    assert fn.calls == 1 + 5  # warm-up + timed
    assert 15.0 <= result.median_ms < 500.0
    assert result.window_s >= 5 * 0.02


def test_slow_calls_fall_back_to_a_fixed_number_of_repeats():
    fn = Counter(sleep_s=0.03)
    result = time_callable(fn, device="cpu", slow_call_s=0.01, slow_repeats=2)
    assert result.method == "slow_repeats"
    assert result.runs == 2
    assert fn.calls == 3
    assert result.first_call_ms >= 30.0


def test_a_first_call_measured_by_the_caller_is_not_repeated():
    fn = Counter(sleep_s=0.03)
    result = time_callable(fn, device="cpu", slow_call_s=0.01, slow_repeats=2, first_call_s=0.5)
    assert fn.calls == 2
    assert result.first_call_ms == pytest.approx(500.0)


def test_bad_options_are_errors():
    with pytest.raises(ValueError, match="min_run_time"):
        time_callable(Counter(), device="cpu", min_run_time=0)
    with pytest.raises(ValueError, match="slow_repeats"):
        time_callable(Counter(), device="cpu", slow_repeats=0)


def test_cuda_clock_reads_are_synchronised():
    events = []
    with mock.patch.object(torch.cuda, "synchronize", side_effect=lambda *a: events.append("sync")):
        time_call(lambda: events.append("fn"), "cuda")
        assert events == ["sync", "fn", "sync"]
        events.clear()
        time_call(lambda: events.append("fn"), "cpu")
        assert events == ["fn"]
        events.clear()
        # slow path: every timed call is bracketed by synchronisations
        result = time_callable(lambda: (events.append("fn"), time.sleep(0.02)), device="cuda", slow_call_s=0.001,
                               slow_repeats=2)
        assert result.runs == 2
        assert events == ["sync", "fn", "sync"] * 3
        events.clear()
        # blocked_autorange path: our clock synchronises before each read
        time_callable(lambda: events.append("fn"), device="cuda", min_run_time=0.01)
        assert events.count("sync") >= 2 and events.count("fn") >= 2
        first_fn = events.index("fn")
        assert events[first_fn - 1] == "sync" and events[first_fn + 1] == "sync"
