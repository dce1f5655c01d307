"""Forward time and peak memory of a transformers LlamaModel with our ``window`` attention vs transformers' ``sdpa``.

Issue 16's performance check: LlamaModel (no LM head), 2 layers, hidden 256, 4 heads, intermediate 1024, vocab 256,
float32, one sequence of 16K tokens, ``use_cache=False`` (no key/value cache on either side). Each implementation runs in its own fresh process (so peak RSS means something):
one cold forward under ``rss_probe`` (peak resident-set growth), then timed forwards (median), then one forward under
``StorageTracker`` (exact live tensor bytes created by the forward; kernel-internal workspaces are invisible to it).

    PYTHONPATH=$PWD python scripts/hf_llama_16k.py [--seq 16384] [--reps 3] [--window 256]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def one(impl: str, seq: int, reps: int, window: int) -> dict:
    import torch

    from efficient_attn.integrations.hf import attention_modules, register_hf
    from efficient_attn.integrations.hf_models import build_hf_llama
    from efficient_attn.measure.memory import rss_probe
    from efficient_attn.measure.storage import StorageTracker

    name = impl if impl != "window" else register_hf("window", window_size=window)
    model = build_hf_llama(2, 256, 4, None, 1024, 256, name)
    ids = torch.randint(0, 256, (1, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with rss_probe() as probe:
            t0 = time.perf_counter()
            model(ids, use_cache=False)
            cold = time.perf_counter() - t0
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            model(ids, use_cache=False)
            times.append(time.perf_counter() - t0)
        with StorageTracker() as tracker:
            model(ids, use_cache=False)
    backends = sorted({m.last_backend for m in attention_modules(name)}) if impl == "window" else ["sdpa"]
    return {
        "impl": name,
        "backends": backends,
        "cold_s": cold,
        "median_s": statistics.median(times),
        "times_s": times,
        "rss_peak_bytes": probe.peak_bytes,
        "rss_exact": probe.exact,
        "tracked_peak_bytes": tracker.peak_bytes,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one(args.child, args.seq, args.reps, args.window)))
        return
    rows = []
    for impl in ("sdpa", "window"):
        cmd = [sys.executable, __file__, "--child", impl, "--seq", str(args.seq), "--reps", str(args.reps)]
        out = subprocess.run(cmd + ["--window", str(args.window)], check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]))
    sdpa, window = rows
    print(
        f"seq={args.seq}: speedup {sdpa['median_s'] / window['median_s']:.2f}x "
        f"(sdpa {sdpa['median_s']:.2f}s, window {window['median_s']:.2f}s); "
        f"peak RSS sdpa {sdpa['rss_peak_bytes'] / 2**20:.0f} MiB vs window {window['rss_peak_bytes'] / 2**20:.0f} MiB; "
        f"tracked tensors sdpa {sdpa['tracked_peak_bytes'] / 2**20:.0f} MiB vs "
        f"window {window['tracked_peak_bytes'] / 2**20:.0f} MiB"
    )


if __name__ == "__main__":
    main()
