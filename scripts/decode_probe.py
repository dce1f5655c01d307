"""Per-token decode latency of full vs window vs performer at growing contexts (core level), against the machine's
streaming bandwidth (issue 13's performance targets).

Batch 1, 4 heads of 64, float32, causal. For each context n the cache is filled with random keys and values (the
recurrent state from random keys), then single-token steps are timed (median of ``--steps`` after a warm-up). The
bandwidth is measured in the same run: a 1 GiB tensor copy, bytes read plus written over its median time. Full
attention's bound at n is its cache bytes read per token (keys and values) over that bandwidth.

Usage: ``PYTHONPATH=. python scripts/decode_probe.py [--max-context 65536] [--steps 30] [--threads N] [--json out.json]``.
Prints one table and the three checks (window vs full at the longest context, fitted exponents, full vs bound).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from efficient_attn.registry import build_attention

HEADS, HEAD_DIM, DTYPE = 4, 64, torch.float32
VARIANTS = {"full": {}, "window": {"window_size": 256}, "performer": {}}


def copy_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes read plus written per second by ``dst.copy_(src)`` of a ``gib`` GiB float32 tensor (median)."""
    n = int(gib * (1 << 30)) // 4
    src, dst = torch.randn(n), torch.empty(n)
    dst.copy_(src)  # touch the pages
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * n * 4 / statistics.median(times)


def filled_cache(attn, key: str, n: int, steps: int):
    """A cache of ``attn`` holding ``n`` tokens of random keys and values."""
    cache = attn.new_cache(1, dtype=DTYPE, max_len=n + steps + 8 if key == "full" else None)
    gen = torch.Generator().manual_seed(n)
    chunk = 8192 if key != "performer" else n  # the recurrent state is filled once
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        k, v = (torch.randn(1, HEADS, size, HEAD_DIM, generator=gen, dtype=DTYPE) for _ in range(2))
        if key == "window" and start + size < n - 300:
            cache.length += size  # tokens that leave the ring anyway
        elif start == 0:
            attn.fill_cache(cache, k, k, v)  # q only matters to MoBA's selection
        else:
            cache.append(k, v, None)  # full: more of the same KV cache
    return cache


def step_ms(attn, cache, steps: int) -> float:
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, HEADS, 1, HEAD_DIM, generator=gen, dtype=DTYPE) for _ in range(3))
    times = []
    with torch.no_grad():
        for i in range(steps + 3):
            start = time.perf_counter()
            attn.attend(q, k, v, cache=cache)
            if i >= 3:
                times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def exponent(xs: list[int], ys: list[float]) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.mean(lx), statistics.mean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-context", type=int, default=1024)
    parser.add_argument("--max-context", type=int, default=65536)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for the steps and the copy (default: torch's); on a shared machine 1 "
                        "avoids thread hand-off stalls that dwarf a single-token step")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    contexts = []
    n = args.min_context
    while n <= args.max_context:
        contexts.append(n)
        n *= 2
    bandwidth = copy_bandwidth()
    rows = []
    for key, params in VARIANTS.items():
        attn = build_attention(key, dim=HEADS * HEAD_DIM, num_heads=HEADS, causal=True, **params).eval()
        for n in contexts:
            cache = filled_cache(attn, key, n, args.steps)
            ms = step_ms(attn, cache, args.steps)
            rows.append({"variant": key, "context": n, "ms_per_token": ms, "cache_bytes": cache.nbytes})
    print(f"threads={torch.get_num_threads()}  copy bandwidth={bandwidth / 1e9:.2f} GB/s (1 GiB copy, read+write)")
    print(f"{'variant':>10} {'context':>8} {'ms/token':>10} {'cache bytes':>14} {'bound ms':>9}")
    for row in rows:
        bound = ""
        if row["variant"] == "full":
            kv_bytes = 2 * HEADS * row["context"] * HEAD_DIM * 4
            row["bound_ms"] = 1e3 * kv_bytes / bandwidth
            bound = f"{row['bound_ms']:.3f}"
        print(f"{row['variant']:>10} {row['context']:>8} {row['ms_per_token']:>10.3f} {row['cache_bytes']:>14} {bound:>9}")
    by = {(r["variant"], r["context"]): r for r in rows}
    top = contexts[-1]
    checks = {
        "window_speedup_at_max": by[("full", top)]["ms_per_token"] / by[("window", top)]["ms_per_token"],
        "window_cache_ratio_at_max": by[("full", top)]["cache_bytes"] / by[("window", top)]["cache_bytes"],
        "exponent": {key: exponent(contexts, [by[(key, n)]["ms_per_token"] for n in contexts]) for key in VARIANTS},
        "full_over_bound": {n: by[("full", n)]["ms_per_token"] / by[("full", n)]["bound_ms"]
                            for n in contexts if n >= 16384},
    }
    print(f"at {top}: window {checks['window_speedup_at_max']:.1f}x faster than full (target >= 50), cache "
          f"{checks['window_cache_ratio_at_max']:.0f}x smaller (target >= 100)")
    print("fitted exponents (target window, performer <= 0.1; full ~1): "
          + ", ".join(f"{k} {v:.2f}" for k, v in checks["exponent"].items()))
    print("full / bandwidth bound (target <= 2 at >= 16K): "
          + ", ".join(f"{n}: {r:.2f}" for n, r in checks["full_over_bound"].items()))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"bandwidth_bytes_per_s": bandwidth, "rows": rows, "checks": checks}, fh, indent=1)


if __name__ == "__main__":
    main()
