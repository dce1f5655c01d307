"""Interleaved forward timing of MoBA's ``torch`` and ``flex`` backends against causal full SDPA (issue 17).

Usage: ``PYTHONPATH=$PWD python scripts/moba_vs_sdpa.py [--len 16384] [--reps 5] [--block-size 512] [--top-k 3]``.

MoBA (Lu et al. 2025, arXiv:2502.13189) with the paper's block 512 and top-3, causal, batch 1, ``--heads`` x
``--head-dim`` (4 x 64), float32, forward under ``no_grad``. Each round times, in turn: ``full`` on ``sdpa`` (causal),
both MoBA backends end to end (``attend``: selection + attention), and the parts apart: the selection
(:func:`~efficient_attn.attention.moba.select_blocks`), the ``torch`` kernel over that selection
(:func:`~efficient_attn.attention.moba.moba_attention`), the flex block mask
(:func:`~efficient_attn.attention.moba.moba_block_mask`) and the compiled FlexAttention over it. Interleaving makes a
shared machine's load fall on all of them alike; medians and the speed-up over SDPA are printed (compile time of flex
is paid in a warm-up round and reported apart).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from efficient_attn.attention import flex as flex_backend
from efficient_attn.attention.functional import default_scale
from efficient_attn.attention.moba import moba_attention, moba_block_mask, select_blocks
from efficient_attn.registry import build_attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--len", type=int, default=16384)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    n, h, d, bs, top_k = args.len, args.heads, args.head_dim, args.block_size, args.top_k
    if n % bs:
        parser.error(f"--len must be a multiple of --block-size here (the torch kernel's parts run unpadded), got {n}")
    common = dict(dim=h * d, num_heads=h, causal=True)
    full = build_attention("full", backend="sdpa", **common)
    moba = {backend: build_attention("moba", backend=backend, block_size=bs, top_k=top_k, **common)
            for backend in ("torch", "flex")}
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, n, d, generator=gen) for _ in range(3))
    scale = default_scale(d)
    state: dict = {}

    def select() -> None:
        state["selected"] = select_blocks(q, k, block_size=bs, top_k=top_k, causal=True)

    def block_mask() -> None:
        state["block_mask"] = moba_block_mask(state["selected"], n, block_size=bs, causal=True)

    cases: dict[str, Callable[[], object]] = {
        "full:sdpa (causal)": lambda: full.attend(q, k, v),
        "moba:torch attend": lambda: moba["torch"].attend(q, k, v),
        "moba:flex attend": lambda: moba["flex"].attend(q, k, v),
        "  selection": select,
        "  torch kernel": lambda: moba_attention(q, k, v, state["selected"], None, block_size=bs, causal=True,
                                                 scale=scale),
        "  flex block mask": block_mask,
        "  flex kernel": lambda: flex_backend.run(q, k, v, state["block_mask"]),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    with torch.no_grad():
        for rnd in range(args.reps + 1):  # round 0 warms up (flex compiles there)
            for name, fn in cases.items():
                t0 = time.perf_counter()
                fn()
                elapsed = time.perf_counter() - t0
                if rnd == 0:
                    if name == "moba:flex attend":
                        print(f"warm-up {name.strip():20s} {elapsed:7.2f} s (compile included)")
                else:
                    times[name].append(elapsed)
        same = torch.allclose(moba["torch"].attend(q, k, v), moba["flex"].attend(q, k, v), atol=1e-4, rtol=1e-4)
    base = statistics.median(times["full:sdpa (causal)"])
    print(f"n={n} batch=1 heads={h} head_dim={d} float32 causal forward; moba block {bs} top-{top_k}; "
          f"{args.reps} interleaved rounds (medians); torch == flex output: {same}")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"{name:22s} {t * 1e3:9.1f} ms  (min {min(ts) * 1e3:8.1f})  x{base / t:7.2f} vs sdpa")


if __name__ == "__main__":
    main()
