"""Interleaved timing and peak memory of sparse variants against full SDPA at one length (issue 18).

Usage: ``PYTHONPATH=$PWD python scripts/sparse_vs_sdpa.py --len 16384 --reps 3 window:window_size=256 ...``.
Each round times every variant once (forward, then forward+backward) in turn, so a shared machine's load falls on
all of them alike; the medians and the ratio to SDPA are printed, with peak bytes from the exact storage tracker.
Shapes: batch 1, ``--heads`` x ``--head-dim``, float32, non-causal unless ``--causal``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from efficient_attn.measure.storage import StorageTracker
from efficient_attn.registry import build_attention


def _parse(spec: str) -> tuple[str, str, dict]:
    name, _, rest = spec.partition(":")
    key, _, backend = name.partition("@")
    params = {}
    for item in filter(None, rest.split(",")):
        field, _, value = item.partition("=")
        params[field] = json.loads(value)
    return key, backend or ("sdpa" if key == "full" else "torch"), params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("specs", nargs="+", help="key[@backend][:field=value,...]; full@sdpa is always added")
    parser.add_argument("--len", type=int, default=16384)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--modes", default="fwd,fwd_bwd")
    args = parser.parse_args()
    n, h, d = args.len, args.heads, args.head_dim
    specs = ["full@sdpa"] + [s for s in args.specs if s != "full@sdpa"]
    modules = {}
    for spec in specs:
        key, backend, params = _parse(spec)
        modules[spec] = build_attention(key, dim=h * d, num_heads=h, causal=args.causal, backend=backend, **params)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, n, d, generator=gen) for _ in range(3))
    modes = args.modes.split(",")

    def run(module, mode):
        if mode == "fwd":
            with torch.no_grad():
                return module.attend(q, k, v)
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        module.attend(qq, kk, vv).sum().backward()

    times = {(s, m): [] for s in specs for m in modes}
    peaks = {}
    for spec in specs:  # warm-up + peak
        for mode in modes:
            run(modules[spec], mode)
            with StorageTracker() as tracker:
                run(modules[spec], mode)
            peaks[spec, mode] = tracker.peak_bytes
    for _ in range(args.reps):
        for spec in specs:
            for mode in modes:
                t0 = time.perf_counter()
                run(modules[spec], mode)
                times[spec, mode].append(time.perf_counter() - t0)
    pairs_full = n * n * h
    if not args.reps:  # peaks only (exact and load-independent)
        for mode in modes:
            for spec in specs:
                print(f"{mode:8s} {spec:60s} peak {peaks[spec, mode] / 2**20:7.1f} MiB "
                      f"({peaks[spec, mode] / peaks['full@sdpa', mode]:.2f}x)")
        return
    for mode in modes:
        base = statistics.median(times["full@sdpa", mode])
        for spec in specs:
            t = statistics.median(times[spec, mode])
            module = modules[spec]
            pairs = module.num_pairs_total(n) if hasattr(module, "num_pairs_total") else pairs_full
            useful = (pairs / t) / (pairs_full / base)
            print(f"{mode:8s} {spec:60s} {t * 1e3:9.1f} ms  x{base / t:6.2f} vs sdpa  useful {useful * 100:5.1f}%  "
                  f"peak {peaks[spec, mode] / 2**20:7.1f} MiB ({peaks[spec, mode] / peaks['full@sdpa', mode]:.2f}x)")


if __name__ == "__main__":
    main()
