"""Synthetic benchmark runs for the report tests: known cost laws, realistic statuses, the harness's schema.

Costs are exact functions of the length (optionally with multiplicative noise), so the tests can compute what
every fit and crossover must give from the same coefficients.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from efficient_attn.harness.schema import ALL_COLUMNS, META_FILE, RESULTS_FILE, SCHEMA_VERSION

COLUMNS = list(ALL_COLUMNS)  # the harness's schema
HEADS, HEAD_DIM, BATCH = 4, 64, 1


@dataclass
class Series:
    """One synthetic series: cost laws per mode and the statuses of cells that did not run."""

    variant: str
    backend: str
    time_ms: Callable[[int], float]
    mem_bytes: Callable[[int], float]
    params: dict = field(default_factory=dict)
    is_peer: bool = False
    level: str = "core"
    bwd_factor: float = 2.5
    bwd_mem_factor: float = 3.0
    # (mode, seq_len) -> (status, note)
    failures: dict[tuple[str, int], tuple[str, str]] = field(default_factory=dict)
    flops: Callable[[int], float] | None = None
    computed_factor: float = 1.0  # flops_computed / flops_useful (a blocked or masked backend computes extra)


def quadratic(a: float, c: float = 0.0) -> Callable[[int], float]:
    return lambda n: a * n * n + c


def linear(b: float, c: float = 0.0) -> Callable[[int], float]:
    return lambda n: b * n + c


def realistic_series() -> list[Series]:
    """full naive (quadratic time and memory, oom at 16K fwd_bwd), full sdpa (quadratic time, linear memory),
    the sparse and low-rank variants (linear-ish), and two peers."""
    qkv = lambda n: 3 * BATCH * HEADS * n * HEAD_DIM * 4.0  # noqa: E731  (inputs + output bytes, fp32)
    dense_flops = lambda n: 4.0 * BATCH * HEADS * n * n * HEAD_DIM  # noqa: E731
    return [
        Series(
            "full",
            "naive",
            quadratic(4.0e-5, 0.3),
            lambda n: qkv(n) + BATCH * HEADS * n * n * 4.0,
            failures={("fwd_bwd", 16384): ("oom", "predicted 19.3 GB > budget 8.0 GB")},
            flops=dense_flops,
        ),
        Series("full", "sdpa", quadratic(1.5e-5, 0.2), lambda n: qkv(n) * 1.4, flops=dense_flops),
        Series(
            "window",
            "torch",
            linear(2.2e-3, 0.4),
            lambda n: qkv(n) * 2 + BATCH * HEADS * n * 256 * 4.0,
            params={"window_size": 256},
            flops=lambda n: 4.0 * BATCH * HEADS * n * 512 * HEAD_DIM,
            computed_factor=1.5,
        ),
        Series(
            "bigbird",
            "torch",
            linear(6.5e-3, 1.5),
            lambda n: qkv(n) * 2 + BATCH * HEADS * n * 448 * 4.0 * 2,
            params={"block_size": 64, "num_random_blocks": 3},
            flops=lambda n: 4.0 * BATCH * HEADS * n * 448 * HEAD_DIM,
        ),
        Series(
            "longformer",
            "torch",
            linear(3.1e-3, 0.6),
            lambda n: qkv(n) * 2 + BATCH * HEADS * n * 320 * 4.0,
            params={"window_size": 256, "num_global": 16},
            flops=lambda n: 4.0 * BATCH * HEADS * n * 528 * HEAD_DIM,
        ),
        Series(
            "linformer",
            "torch",
            linear(1.1e-3, 0.3),
            lambda n: qkv(n) * 1.3 + BATCH * HEADS * n * 256 * 4.0,
            params={"k": 256},
            flops=lambda n: 4.0 * BATCH * HEADS * n * 256 * HEAD_DIM,
        ),
        Series(
            "performer",
            "torch",
            linear(1.6e-3, 0.5),
            lambda n: qkv(n) * 1.6 + BATCH * HEADS * n * 266 * 4.0,
            params={"nb_features": 266},
            failures={("fwd_bwd", 16384): ("error", "RuntimeError: synthetic failure for the test")},
            flops=lambda n: 4.0 * BATCH * HEADS * n * 266 * HEAD_DIM,
        ),
        Series(
            "nystrom",
            "torch",
            linear(1.9e-3, 0.8),
            lambda n: qkv(n) * 1.5 + BATCH * HEADS * n * 64 * 4.0 * 3,
            params={"num_landmarks": 64},
            flops=lambda n: 4.0 * BATCH * HEADS * n * 192 * HEAD_DIM,
        ),
        Series(
            "hf-bigbird",
            "peer",
            linear(9.0e-3, 3.0),
            lambda n: qkv(n) * 3 + BATCH * HEADS * n * 448 * 4.0 * 3,
            params={"block_size": 64, "num_random_blocks": 3},
            is_peer=True,
            level="layer",
            failures={("fwd_bwd", 16384): ("skipped_budget", "predicted memory above the budget")},
        ),
        Series(
            "local-attention",
            "peer",
            linear(3.0e-3, 1.0),
            lambda n: qkv(n) * 2.5 + BATCH * HEADS * n * 512 * 4.0,
            params={"window_size": 256},
            is_peer=True,
            level="layer",
            failures={
                ("fwd_bwd", n): ("unsupported", "synthetic: this peer is measured forward only")
                for n in (1024, 2048, 4096, 8192, 16384)
            },
        ),
    ]


def make_rows(
    series: list[Series],
    lengths: list[int],
    modes: tuple[str, ...] = ("fwd", "fwd_bwd"),
    *,
    noise: float = 0.0,
    seed: int = 0,
    device: str = "cpu",
    causal: bool = False,
) -> pd.DataFrame:
    """One row per (series, mode, length) in the harness's schema; failures take their status and note."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in series:
        for mode in modes:
            after_oom = False
            for n in lengths:
                t = s.time_ms(n) * (s.bwd_factor if mode == "fwd_bwd" else 1.0)
                m = s.mem_bytes(n) * (s.bwd_mem_factor if mode == "fwd_bwd" else 1.0)
                if noise:
                    t *= float(np.exp(rng.normal(0.0, noise)))
                row = {
                    "variant": s.variant,
                    "params_json": json.dumps(s.params, sort_keys=True),
                    "backend_requested": s.backend,
                    "level": s.level,
                    "mode": mode,
                    "causal": causal,
                    "device": device,
                    "dtype": "float32",
                    "batch_size": BATCH,
                    "seq_len": n,
                    "num_heads": HEADS,
                    "head_dim": HEAD_DIM,
                    "is_peer": s.is_peer,
                    "backend": s.backend,
                    "status": "ok",
                    "note": "",
                    "padded_len": n,
                    "time_ms": t,
                    "time_iqr_ms": t * (0.3 if n <= 1024 else 0.04),
                    "compile_ms": "",
                    "tokens_per_s": BATCH * n / (t / 1e3),
                    "peak_mem_bytes": m,
                    "peak_rss_bytes": "",
                    "predicted_mem_bytes": m,
                    "flops_useful": s.flops(n) * (3.0 if mode == "fwd_bwd" else 1.0) if s.flops else "",
                    "flops_computed": s.flops(n) * s.computed_factor * (3.0 if mode == "fwd_bwd" else 1.0)
                    if s.flops
                    else "",
                }
                failure = s.failures.get((mode, n))
                if after_oom:
                    failure = ("skipped_after_oom", "a shorter length ran out of memory")
                if failure is not None:
                    status, note = failure
                    after_oom = after_oom or status == "oom"
                    row.update(status=status, note=note, backend=s.backend if status != "unsupported" else "")
                    measured = ("time_ms", "time_iqr_ms", "tokens_per_s", "peak_mem_bytes", "padded_len", "flops_computed")
                    for col in measured:
                        row[col] = ""
                    if status not in ("oom", "skipped_budget", "skipped_after_oom"):
                        row["predicted_mem_bytes"] = ""
                rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def harness_meta(lengths: list[int], *, budget: float | None = 8e9, wall_s: float = 321.5) -> dict:
    """A ``meta.json`` with the keys and layout the harness writes (``RunFolder`` + ``environment_info``)."""
    session = {
        "started": "2026-01-01T00:00:00+0000",
        "wall_s": wall_s,
        "timed_window_s": wall_s / 2,
        "cells_run": 1,
        "interrupted": False,
        "budget_bytes": budget,
        "device_memory_bytes": 24 * 2**30,
    }
    meta = {
        "schema_version": SCHEMA_VERSION,
        "config": {"name": "default", "device": "cpu", "budget_gb": None, "lengths": lengths, "seed": 0},
        "environment": {
            "python": "3.12.0",
            "platform": "Linux-synthetic",
            "torch": "2.13.0",
            "efficient_attn": "0.1.0",
            "libraries": {"numpy": "2.0.0", "einops": "0.8.0", "xformers": None, "transformers": None, "triton": None},
            "cpu_model": "Synthetic CPU @ 2.0GHz",
            "cpu_count": 2,
            "torch_threads": 2,
            "cuda_available": False,
            "git_commit": "0123456789abcdef",
            "device_name": "Synthetic CPU @ 2.0GHz",
        },
        "sessions": [session],
        "wall_s": wall_s,
        "timed_window_s": wall_s / 2,
        "device_memory_bytes": 24 * 2**30,
    }
    if budget is not None:
        meta["budget_bytes"] = budget
    return meta


def write_run(path: Path, frame: pd.DataFrame, *, budget: float | None = 8e9, extra: dict | None = None) -> Path:
    """Write ``results.csv`` and ``meta.json`` like the harness does (the run's label is the folder name)."""
    path.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path / RESULTS_FILE, index=False)
    meta = harness_meta(sorted(set(int(n) for n in frame["seq_len"])), budget=budget)
    meta.update(extra or {})
    (path / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return path


def realistic_run(path: Path, *, noise: float = 0.03, seed: int = 0) -> Path:
    lengths = [1024, 2048, 4096, 8192, 16384]
    return write_run(path, make_rows(realistic_series(), lengths, noise=noise, seed=seed))
