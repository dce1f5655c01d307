"""Inference cells: ``prefill`` and ``decode`` with a decode cache (issue 13; vocabulary in DESIGN.md).

* ``prefill``: one call over the ``seq_len`` prompt tokens that fills a fresh cache. Timed like any cell
  (:func:`efficient_attn.measure.timing.time_callable`; every call makes a new cache), with the first call's peak
  memory; ``cache_bytes`` is the cache's exact ``nbytes`` after the call. Built by :func:`build_prefill_run`.
* ``decode``: one new token per sequence against a cache that holds ``seq_len`` tokens. :func:`build_decode_run`
  makes the cache (preallocated for ``seq_len + warm-up + steps`` tokens where it grows, so no step reallocates) and
  fills it with random keys and values to ``seq_len`` (:func:`fill_random`); the cache is part of the cell's setup,
  as its parameters are. :func:`measure_decode` then makes ``DECODE_WARMUP`` single-token steps (the
  first under the storage tracker and FLOP counter: the step's peak memory above the cache, and its FLOPs) and
  times ``steps`` more one by one (:func:`efficient_attn.measure.timing.time_steps`): ``time_ms`` is their median,
  so the context of the median step is ``seq_len + DECODE_WARMUP + steps / 2`` (3 + 16 tokens past 1K: 2%).
  ``cache_bytes`` is the cache's ``nbytes`` after the steps, ``bandwidth_bytes_per_s`` the copy bandwidth measured
  with the same threads in this process (:func:`efficient_attn.measure.bandwidth.copy_bandwidth_cached`).

Levels: ``core`` steps ``attn.attend(q, k, v, cache=cache)`` on ``(batch, heads, 1, head_dim)`` q and
``(batch, kv_heads, 1, head_dim)`` k, v; ``layer`` steps ``attn(x, cache=cache)`` on ``(batch, 1, dim)`` x (the
projections and, with ``rope``, the rotation included). A decode peer (:mod:`efficient_attn.peers`, one whose
``peer_info(name)["modes"]`` lists ``decode``) has the same three methods as ours: ``new_cache``, ``fill_cache``
and ``forward(x, cache=cache)``, plus ``cache_nbytes(cache)``.

Filling with random keys and values (allowed by the issue: a step's cost depends on the cache's size, not its
contents): the first chunk of :data:`FILL_CHUNK` tokens goes through the module's ``fill_cache``; a key/value
cache (growing, static, rolling, Longformer's globals plus ring) then takes the same chunk appended again until it
holds ``seq_len`` tokens (every slot written, as a real prefill would); a recurrent state (Performer) folds the first
chunk only and its length is set to ``seq_len``: its size and step cost are those of any context, and a state of
random tokens is as random either way. A cache with variant-specific extra state (MoBA's recent queries) is filled
in one ``fill_cache`` call of ``seq_len`` random tokens.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import Tensor, nn

from efficient_attn.attention.caches import Cache, StateCache
from efficient_attn.harness.plan import Cell
from efficient_attn.measure.bandwidth import copy_bandwidth_cached
from efficient_attn.measure.memory import measure_call
from efficient_attn.measure.timing import TimingResult, synchronize, time_steps

__all__ = [
    "DECODE_WARMUP",
    "FILL_CHUNK",
    "build_decode_run",
    "build_prefill_run",
    "cache_nbytes",
    "decode_step_inputs",
    "fill_random",
    "measure_decode",
]

#: tokens of random keys and values generated at once when a cache is filled
FILL_CHUNK = 4096
#: untimed single-token steps before the timed ones (the first is the instrumented one)
DECODE_WARMUP = 3


def cache_nbytes(module: nn.Module, cache: Any) -> int:
    """Exact bytes ``cache`` holds: ours report ``cache.nbytes``; a peer counts its own (``module.cache_nbytes``)."""
    if isinstance(cache, Cache):
        return int(cache.nbytes)
    return int(module.cache_nbytes(cache))


def _qkv(cell: Cell, n: int, generator: torch.Generator, device: torch.device, dtype: torch.dtype) -> list[Tensor]:
    b, h, d = cell.batch_size, cell.num_heads, cell.head_dim
    return [torch.randn(b, heads, n, d, generator=generator, dtype=dtype).to(device) for heads in (h, cell.kv_heads,
                                                                                              cell.kv_heads)]


def fill_random(module: nn.Module, cache: Any, cell: Cell, n: int, *, seed: int, device: torch.device,
                dtype: torch.dtype) -> None:
    """Fill the empty ``cache`` of ``module`` to ``n`` tokens of random keys and values (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    if not isinstance(cache, Cache):  # a peer's cache: its own fill, all n tokens at once
        module.fill_cache(cache, *_qkv(cell, n, generator, device, dtype))
        return
    extra = bool(cache.extra)
    chunk = n if extra else min(n, FILL_CHUNK)
    q, k, v = _qkv(cell, chunk, generator, device, dtype)
    module.fill_cache(cache, q, k, v)
    if isinstance(cache, StateCache):
        cache.length = n  # the state's size does not depend on the context; see the module docstring
        return
    while cache.length < n:
        size = min(chunk, n - cache.length)
        cache.append(k[:, :, :size], v[:, :, :size], None)  # type: ignore[attr-defined]


def decode_step_inputs(cell: Cell, *, seed: int, device: torch.device, dtype: torch.dtype) -> list[Tensor]:
    """One new token per sequence: ``[q, k, v]`` ``(batch, heads or kv_heads, 1, head_dim)`` at core level, ``[x]``
    ``(batch, 1, dim)`` at layer level."""
    generator = torch.Generator().manual_seed(seed + 1)
    if cell.level == "core":
        return _qkv(cell, 1, generator, device, dtype)
    return [torch.randn(cell.batch_size, 1, cell.dim, generator=generator, dtype=dtype).to(device)]


def _new_cache(module: nn.Module, cell: Cell, device: torch.device, dtype: torch.dtype, max_len: int | None) -> Any:
    return module.new_cache(cell.batch_size, device=device, dtype=dtype, max_len=max_len)


def _step(module: nn.Module, cell: Cell, cache: Any, inputs: list[Tensor]) -> Tensor:
    if cell.level == "core":
        return module.attend(*inputs, cache=cache)
    return module(inputs[0], cache=cache)


def build_prefill_run(cell: Cell, module: nn.Module, inputs: list[Tensor], *, device: torch.device,
                      dtype: torch.dtype) -> tuple[Callable[[], None], Callable[[], int | None]]:
    """``(run, cache_bytes)`` of a prefill cell: ``run()`` makes a fresh cache and fills it with one call over the
    prompt (``inputs``: q, k, v at core level, x at layer level) under ``no_grad``; ``cache_bytes()`` is the last
    call's cache size (None before the first call)."""
    last: dict[str, Any] = {}

    def run() -> None:
        with torch.no_grad():
            cache = _new_cache(module, cell, device, dtype, None)
            _step(module, cell, cache, inputs)
        last["bytes"] = cache_nbytes(module, cache)

    return run, lambda: last.get("bytes")


def build_decode_run(cell: Cell, module: nn.Module, *, steps: int, seed: int, device: torch.device,
                     dtype: torch.dtype) -> tuple[Callable[[], None], Callable[[], int | None]]:
    """``(run, cache_bytes)`` of a decode cell: the cache is made (room for ``seq_len`` plus the warm-up, the timed
    ``steps`` and two more) and filled to ``seq_len`` now; ``run()`` is one single-token step under ``no_grad``;
    ``cache_bytes()`` the cache's size now."""
    max_len = cell.seq_len + DECODE_WARMUP + steps + 2
    with torch.no_grad():
        cache = _new_cache(module, cell, device, dtype, max_len)
        fill_random(module, cache, cell, cell.seq_len, seed=seed, device=device, dtype=dtype)
    inputs = decode_step_inputs(cell, seed=seed, device=device, dtype=dtype)

    def run() -> None:
        with torch.no_grad():
            _step(module, cell, cache, inputs)

    return run, lambda: cache_nbytes(module, cache)


def measure_decode(run: Callable[[], None], cell: Cell, *, steps: int) -> tuple[dict[str, Any], TimingResult]:
    """Time a decode cell's ``run`` (one step): the first step instrumented (peak bytes above the filled cache,
    FLOPs), ``DECODE_WARMUP - 1`` more untimed, then ``steps`` timed one by one. Returns the measured columns it
    knows (time, peak, FLOPs, tokens/s, new tokens, bandwidth) and the timing."""
    device = torch.device(cell.device)
    synchronize(device)
    start = time.perf_counter()
    instrumented = measure_call(run, device, count_flops=True)
    first_s = time.perf_counter() - start
    timed = time_steps(run, device=device, steps=steps, warmup=DECODE_WARMUP, first_call_s=first_s)
    seconds = timed.median_ms / 1e3
    flops = instrumented.flops
    measured = {
        "time_ms": timed.median_ms,
        "time_iqr_ms": timed.iqr_ms,
        "tokens_per_s": cell.batch_size / seconds,
        "peak_mem_bytes": instrumented.peak_bytes,
        "flops_computed": flops,
        "flops_per_s": flops / seconds if flops else None,
        "timed_runs": timed.runs,
        "new_tokens": cell.batch_size,
        "bandwidth_bytes_per_s": copy_bandwidth_cached(device),
    }
    return measured, timed
