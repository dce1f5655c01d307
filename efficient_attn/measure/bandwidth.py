"""The machine's streaming memory bandwidth, measured the way decode uses memory: a large tensor copy.

Decode with a growing key/value cache is memory-bound: each new token reads the whole cache once, so its best time
is the cache bytes read per token divided by the bandwidth the machine streams at (the bound FlashInfer and vLLM
report decode against). :func:`copy_bandwidth` measures that bandwidth with the threads the caller runs with:
``dst.copy_(src)`` of a ``nbytes`` float32 tensor (1 GiB by default, far above any cache level), median of
``repeats`` timed copies after one that touches the pages, counting the bytes read plus the bytes written.

:func:`copy_bandwidth_cached` keeps one measurement per (device, threads, size) in the process, so a sweep measures
it once and every decode row of the process records the same figure.
"""

from __future__ import annotations

import functools
import statistics

import torch

from efficient_attn.measure.timing import time_call

__all__ = ["DEFAULT_COPY_BYTES", "copy_bandwidth", "copy_bandwidth_cached"]

#: the copy's size: 1 GiB, well above the last-level cache of any CPU or GPU
DEFAULT_COPY_BYTES = 1 << 30


def copy_bandwidth(device: torch.device | str = "cpu", *, nbytes: int = DEFAULT_COPY_BYTES, repeats: int = 5) -> float:
    """Bytes read plus written per second by ``dst.copy_(src)`` of ``nbytes`` float32 bytes on ``device`` (median of
    ``repeats`` timed copies after one untimed copy; CUDA synchronised around each)."""
    if nbytes < 4 or repeats < 1:
        raise ValueError(f"nbytes must be >= 4 and repeats >= 1; got nbytes={nbytes!r}, repeats={repeats!r}")
    numel = nbytes // 4
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page of both
    times = [time_call(lambda: dst.copy_(src), device) for _ in range(repeats)]
    del src, dst
    return 2 * numel * 4 / statistics.median(times)


@functools.lru_cache(maxsize=None)
def _cached(device: str, threads: int, nbytes: int) -> float:
    return copy_bandwidth(device, nbytes=nbytes)


def copy_bandwidth_cached(device: torch.device | str = "cpu", *, nbytes: int = DEFAULT_COPY_BYTES) -> float:
    """:func:`copy_bandwidth`, measured once per (device, current torch threads, ``nbytes``) in this process."""
    return _cached(str(torch.device(device)), torch.get_num_threads(), nbytes)
