"""Wall-clock timing of one benchmark call, honest on CPU and CUDA.

Rules (DESIGN.md, "Measuring honestly"):

* ``torch.utils.benchmark.Timer`` with ``num_threads=torch.get_num_threads()`` (its own default is 1 thread, which
  halves the speed of a 2-core CPU), ``blocked_autorange(min_run_time=...)``, median and inter-quartile range.
* The first call (warm-up: lazy initialisation, allocator growth, and for compiling backends such as FlexAttention
  the compilation) happens outside the timed region; its time is returned on its own as ``first_call_ms``.
* CUDA work is asynchronous: every clock read is preceded by ``torch.cuda.synchronize`` (our own timer function is
  handed to the ``Timer``, so the synchronisation does not depend on ``torch.accelerator`` detection).
* Slow calls: when the warm-up call alone takes longer than ``slow_call_s`` seconds, ``blocked_autorange`` would add
  an estimation pass and then still run only one or two blocks; instead the call is repeated a small fixed number of
  times (``slow_repeats``), each timed on its own. Calls too long for ``blocked_autorange`` to repeat ``min_runs``
  times within ``min_run_time`` (but not slow) are timed one by one too, ``max(min_runs, min_run_time / first)``
  times, so the IQR is over several calls. ``runs`` always says how many calls the median is over.
* Steps that change state (a decode step appends to its cache): :func:`time_steps` times a fixed number of calls one
  by one after a fixed warm-up, so the state moves by a known amount (``blocked_autorange`` would choose the count).
"""

from __future__ import annotations

import math
import statistics
import timeit
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils import benchmark

__all__ = ["TimingResult", "synchronize", "time_call", "time_callable", "time_steps"]


@dataclass(frozen=True)
class TimingResult:
    """Outcome of :func:`time_callable`.

    Attributes:
        median_ms: median time of one call, in milliseconds.
        iqr_ms: inter-quartile range of the per-call times (for ``blocked_autorange``: of the per-block means), ms.
        runs: number of calls inside the timed window (the median is over these).
        first_call_ms: the warm-up call's time (includes compilation for compiling backends), ms.
        window_s: total seconds spent inside the timed window (the sum of the timed runs, warm-up excluded).
        method: ``"blocked_autorange"``, ``"repeats"`` (calls timed one by one) or ``"slow_repeats"`` (a slow cell:
            ``slow_repeats`` calls).
    """

    median_ms: float
    iqr_ms: float
    runs: int
    first_call_ms: float
    window_s: float
    method: str


def synchronize(device: torch.device | str) -> None:
    """Wait for queued work on ``device`` (CUDA); a no-op on CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device: torch.device | str) -> float:
    """Seconds one call of ``fn`` takes, with device synchronisation before and after."""
    synchronize(device)
    start = timeit.default_timer()
    fn()
    synchronize(device)
    return timeit.default_timer() - start


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def time_callable(
    fn: Callable[[], object],
    *,
    device: torch.device | str,
    min_run_time: float = 0.5,
    slow_call_s: float = 1.0,
    slow_repeats: int = 3,
    min_runs: int = 5,
    first_call_s: float | None = None,
) -> TimingResult:
    """Time ``fn`` (no arguments) on ``device``: a warm-up call, then the timed runs.

    Args:
        fn: the call to time; it must do the whole unit of work (e.g. forward and backward).
        device: where ``fn`` runs (CUDA is synchronised around every clock read).
        min_run_time: seconds ``blocked_autorange`` keeps measuring for.
        slow_call_s: a warm-up call longer than this switches to ``slow_repeats`` individually timed calls.
        slow_repeats: number of timed calls for slow cells (>= 1).
        min_runs: fewest calls a non-slow cell is timed over.
        first_call_s: the caller already made the warm-up call and measured it (seconds); no warm-up is made here.

    Returns:
        A :class:`TimingResult`.
    """
    if min_run_time <= 0:
        raise ValueError(f"min_run_time must be > 0 seconds, got {min_run_time!r}")
    if slow_repeats < 1:
        raise ValueError(f"slow_repeats must be >= 1, got {slow_repeats!r}")
    first = time_call(fn, device) if first_call_s is None else first_call_s
    repeats = 0
    if first > slow_call_s:
        repeats = slow_repeats
    elif first * min_runs * 2 > min_run_time:
        repeats = max(min_runs, math.ceil(min_run_time / max(first, 1e-9)))
    if repeats:
        times = [time_call(fn, device) for _ in range(repeats)]
        q1, median, q3 = _quartiles(times)
        method = "slow_repeats" if first > slow_call_s else "repeats"
        return TimingResult(median * 1e3, (q3 - q1) * 1e3, len(times), first * 1e3, sum(times), method)

    def clock() -> float:
        synchronize(device)
        return timeit.default_timer()

    timer = benchmark.Timer(
        stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads(), timer=clock
    )
    measurement = timer.blocked_autorange(min_run_time=min_run_time)
    per_call = list(measurement.times)  # seconds per call, one entry per block
    q1, median, q3 = _quartiles(per_call)
    runs = measurement.number_per_run * len(per_call)
    window = sum(measurement.raw_times)
    return TimingResult(median * 1e3, (q3 - q1) * 1e3, runs, first * 1e3, window, "blocked_autorange")


def time_steps(fn: Callable[[], object], *, device: torch.device | str, steps: int, warmup: int = 3,
               first_call_s: float | None = None) -> TimingResult:
    """Time exactly ``steps`` calls of ``fn`` one by one after ``warmup`` untimed ones (median and IQR).

    For calls that change state (each decode step appends one token to its cache): the count is fixed so the state
    moves by exactly ``warmup + steps`` calls. ``first_call_s``: the caller already made the first warm-up call
    (counted in ``warmup``) and measured it.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps!r}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup!r}")
    first = first_call_s
    for i in range(warmup - (1 if first_call_s is not None else 0)):
        elapsed = time_call(fn, device)
        first = elapsed if first is None else first
    times = [time_call(fn, device) for _ in range(steps)]
    q1, median, q3 = _quartiles(times)
    first = times[0] if first is None else first
    return TimingResult(median * 1e3, (q3 - q1) * 1e3, steps, first * 1e3, sum(times), "steps")
