"""The project's vocabulary: every mode, level, status, dtype and device name, defined once.

A leaf module: it imports nothing from the package, so every layer (registry, attention, harness, report, quality)
can use it. Order matters where it is used for display: :data:`MODES` is also the order reports list modes in.
"""

from __future__ import annotations

__all__ = ["CACHE_MODES", "DEVICES", "DTYPE_NAMES", "GRAD_MODES", "LEVELS", "MODES", "STATUSES"]

#: what a benchmark cell measures: forward only, forward+backward, one optimiser step; then inference with a decode
#: cache: ``prefill`` (one call over the prompt that fills a fresh cache) and ``decode`` (one new token per sequence
#: against a cache holding ``seq_len`` tokens). In display order.
MODES: tuple[str, ...] = ("fwd", "fwd_bwd", "train_step", "prefill", "decode")
#: the modes that run with a decode cache (causal only; no gradients)
CACHE_MODES: tuple[str, ...] = ("prefill", "decode")
#: the modes that run a backward pass
GRAD_MODES: tuple[str, ...] = ("fwd_bwd", "train_step")
#: what a cell runs: ``attend`` on q, k, v; the attention module with its projections; the whole backbone; a Hugging
#: Face transformers Llama-shaped decoder with our attention or its own (:mod:`efficient_attn.harness.hf_workload`)
LEVELS: tuple[str, ...] = ("core", "layer", "model", "hf")
#: the status of a result row (benchmark and quality); numbers are empty unless ``ok``
STATUSES: tuple[str, ...] = ("ok", "oom", "skipped_budget", "skipped_after_oom", "unsupported", "error")
#: dtype names accepted by suites and the CLI
DTYPE_NAMES: tuple[str, ...] = ("float32", "bfloat16", "float16")
#: device names accepted by suites and the CLI (``auto`` = CUDA when available, else CPU)
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
