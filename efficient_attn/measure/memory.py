"""Peak memory of one call: the allocator's peak on CUDA, an exact live-storage count on CPU, and peak RSS.

* CUDA: synchronise, note ``memory_allocated`` (the baseline: parameters, inputs), ``reset_peak_memory_stats``,
  run, synchronise, ``max_memory_allocated - baseline``. Without the reset the counter would report the highest
  peak since the process started (a known mistake of other benchmarks, see PEERS.md).
* CPU: the CPU allocator keeps no peak counter and ``ru_maxrss`` is a process-wide high-water mark, so the bytes are
  counted with :class:`efficient_attn.measure.storage.StorageTracker` (exact live tensor storages created inside the
  call, forward and backward, including what autograd saves). Tensors alive before the call are not counted.
* Peak RSS (:func:`rss_probe`): the resident-set change around a call, for a cell run in its own fresh process with
  nothing heavy before the measured call (``--isolate``). It includes allocator slack and library workspaces that
  the tracker cannot see.

:func:`measure_call` runs the call once and returns the peak bytes, and (optionally) counts its FLOPs in the same
call, so a slow cell pays for one instrumented call rather than two.
"""

from __future__ import annotations

import contextlib
import resource
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from efficient_attn.measure.flops import flop_counter
from efficient_attn.measure.storage import StorageTracker

__all__ = ["CallMeasurement", "RssProbe", "current_rss_bytes", "measure_call", "rss_probe"]


@dataclass(frozen=True)
class CallMeasurement:
    """Peak bytes of one call (above what was alive before it) and, when asked, the FLOPs it dispatched."""

    peak_bytes: int
    flops: int | None


def measure_call(fn: Callable[[], object], device: torch.device | str, *, count_flops: bool = True) -> CallMeasurement:
    """Run ``fn()`` once and measure its peak memory (and FLOPs when ``count_flops``).

    CUDA: allocator peak minus the baseline (see the module docstring). CPU: :class:`StorageTracker`.
    """
    device = torch.device(device)
    flops_ctx = flop_counter() if count_flops else contextlib.nullcontext()
    if device.type == "cuda":
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with flops_ctx as counter:
            fn()
        torch.cuda.synchronize()
        peak = int(torch.cuda.max_memory_allocated()) - int(baseline)
    else:
        with flops_ctx as counter, StorageTracker() as tracker:
            fn()
        peak = tracker.peak_bytes
    flops = int(counter.get_total_flops()) if count_flops else None
    return CallMeasurement(peak_bytes=max(peak, 0), flops=flops)


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm", encoding="ascii") as handle:
        resident_pages = int(handle.read().split()[1])
    return resident_pages * resource.getpagesize()


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@dataclass
class RssProbe:
    """Result of :func:`rss_probe`.

    Attributes:
        peak_bytes: the process high-water mark after the call minus the resident size before it.
        exact: True when the call raised the high-water mark (so the peak was inside the call); when False, the
            call's own peak was lower than an earlier high-water mark and ``peak_bytes`` is only an upper bound.
    """

    peak_bytes: int = 0
    exact: bool = False


@contextlib.contextmanager
def rss_probe() -> Iterator[RssProbe]:
    """Measure the peak resident-set growth of the code inside the ``with`` block (meaningful in a fresh process)."""
    probe = RssProbe()
    rss_before = current_rss_bytes()
    max_before = _max_rss_bytes()
    yield probe
    max_after = _max_rss_bytes()
    probe.peak_bytes = max(max_after - rss_before, 0)
    probe.exact = max_after > max_before
