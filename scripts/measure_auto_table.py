"""Re-measure the evidence of every CPU row of ``AUTO_TABLE`` (``efficient_attn/attention/auto.py``), issue 18.

For ``window`` (256), ``bigbird`` (64 / 3 random / 2 global / 3 window) and ``longformer`` (256 + 1 global): the
blocked ``torch`` backend against compiled ``flex``; for causal ``full``: ``sdpa`` against ``flex``. Forward only
(flex has no backward on CPU), batch 1, 4 heads of 64, float32, at 4K and 16K, the table's default parameters.
Each cell: one call that compiles (flex) or warms up, then timed calls with
:func:`efficient_attn.measure.timing.time_callable` (median ms and the interquartile range in brackets). The output
is the evidence strings in the table's own format, ready to paste, plus the wall time; run it on a quiet machine
(nothing else running): about 5-8 minutes on 2 cores.

Usage: ``PYTHONPATH=$PWD python scripts/measure_auto_table.py [--lengths 4096,16384] [--min-run-time 0.5]``.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from efficient_attn.measure.timing import time_call, time_callable
from efficient_attn.registry import build_attention

HEADS, HEAD_DIM = 4, 64
#: (AUTO_TABLE family, registry key, causal, params, the two backends compared): the table's CPU forward rows
ROWS = (
    ("full-causal", "full", True, {}, ("sdpa", "flex")),
    ("window", "window", False, {"window_size": 256}, ("torch", "flex")),
    ("bigbird", "bigbird", False,
     {"block_size": 64, "num_random_blocks": 3, "num_global_blocks": 2, "num_window_blocks": 3}, ("torch", "flex")),
    ("longformer", "longformer", False, {"window_size": 256, "global_tokens": 1}, ("torch", "flex")),
)


def _label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _ms(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def measure_row(key: str, causal: bool, params: dict, backends: tuple[str, str], n: int,
                min_run_time: float) -> dict[str, tuple[float, float, float]]:
    """``backend -> (median ms, IQR ms, first call s)`` of one length, one backend after the other."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, generator=gen) for _ in range(3))
    result = {}
    for backend in backends:
        module = build_attention(key, dim=HEADS * HEAD_DIM, num_heads=HEADS, causal=causal, backend=backend,
                                 **params)

        def run(module=module):
            with torch.no_grad():
                return module.attend(q, k, v)

        first = time_call(run, "cpu")  # compiles flex for this shape; the blocked backend builds its plan
        timed = time_callable(run, device="cpu", min_run_time=min_run_time, slow_call_s=1.0, slow_repeats=3)
        result[backend] = (timed.median_ms, timed.iqr_ms, first)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="4096,16384", help="comma-separated lengths (the table uses 4K and 16K)")
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds of timed runs per fast cell")
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    started = time.perf_counter()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f} at start; batch 1, {HEADS} heads x {HEAD_DIM}, float32, forward ms")
    for family, key, causal, params, backends in ROWS:
        parts = []
        for n in lengths:
            r = measure_row(key, causal, params, backends, n, args.min_run_time)
            a, b = backends
            if family.startswith("full"):
                parts.append(f"{_label(n)}: {a} {_ms(r[a][0])} [{_ms(r[a][1])}] vs {b} {_ms(r[b][0])} [{_ms(r[b][1])}]")
            else:
                text = f"{_label(n)}: {a} {_ms(r[a][0])} vs {b} {_ms(r[b][0])}"
                if n == lengths[0]:
                    text += f" (flex compile {r[b][2]:.1f} s)"
                parts.append(text)
        print(f'{family:12s} "{"; ".join(parts)}"', flush=True)
    print(f"# wall {time.perf_counter() - started:.0f} s, load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
