"""The machine a run happens on: which device, how much memory, the budget, and what to record about it.

* :func:`resolve_device`: ``auto`` -> ``cuda`` when available, else ``cpu``.
* :func:`budget_bytes`: the memory budget of a run, ``--budget-gb`` or 80% of free RAM (``MemAvailable``) or of free
  GPU memory. On CPU the kernel's OOM killer kills the process instead of raising, so a cell predicted not to fit
  must not be tried.
* :func:`environment_info`: versions, hardware, threads and git commit, for ``meta.json``.
* :func:`free_memory`: what a finished or failed cell leaves behind, collected.
"""

from __future__ import annotations

import gc
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from efficient_attn.vocab import DEVICES

__all__ = [
    "BUDGET_FRACTION",
    "budget_bytes",
    "default_budget_bytes",
    "device_memory_bytes",
    "environment_info",
    "free_memory",
    "mem_available_bytes",
    "mem_total_bytes",
    "resolve_device",
]

BUDGET_FRACTION = 0.8


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` if available else ``cpu``; ``cuda`` without CUDA is a ``ValueError``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch.cuda.is_available() is False; use --device cpu")
    if device not in DEVICES:
        raise ValueError(f"device must be {', '.join(DEVICES[:-1])} or {DEVICES[-1]}; got {device!r}")
    return device


def _meminfo_bytes(field_name: str) -> int:
    with open("/proc/meminfo", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(f"{field_name}:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/meminfo has no {field_name} line")


def mem_available_bytes() -> int:
    """``MemAvailable`` from ``/proc/meminfo``: RAM the kernel can give without swapping."""
    return _meminfo_bytes("MemAvailable")


def mem_total_bytes() -> int:
    """``MemTotal`` from ``/proc/meminfo``."""
    return _meminfo_bytes("MemTotal")


def device_memory_bytes(device: str) -> int:
    """Total GPU memory (CUDA) or ``MemTotal`` (CPU)."""
    if device == "cuda":
        _free, total = torch.cuda.mem_get_info()
        return int(total)
    return mem_total_bytes()


def default_budget_bytes(device: str) -> int:
    """80% of free GPU memory (CUDA) or of ``MemAvailable`` (CPU)."""
    if device == "cuda":
        free, _total = torch.cuda.mem_get_info()
        return int(BUDGET_FRACTION * free)
    return int(BUDGET_FRACTION * mem_available_bytes())


def budget_bytes(budget_gb: float | None, device: str) -> int:
    """The memory budget in bytes: ``budget_gb`` GiB when given, else :func:`default_budget_bytes` taken now.

    Raises:
        ValueError: ``budget_gb`` is not a positive finite number (0 would skip every cell, nan never compares).
    """
    if budget_gb is None:
        return default_budget_bytes(device)
    if isinstance(budget_gb, bool) or not isinstance(budget_gb, (int, float)) or not math.isfinite(budget_gb) \
            or budget_gb <= 0:
        raise ValueError(f"budget_gb must be a positive finite number of GiB, got {budget_gb!r}")
    return int(budget_gb * 2**30)


def free_memory(device: str, *, collect: bool = True) -> None:
    """Free what a finished or failed cell left: a full ``gc.collect`` (a traceback's frames keep tensors alive in
    cycles; it costs ~0.1-1 s, so only after failures) and the CUDA cache."""
    if collect:
        gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _git_commit() -> str | None:
    repo = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment_info(device: str) -> dict[str, Any]:
    """Versions, hardware and threads, for ``meta.json``."""
    import efficient_attn

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "efficient_attn": efficient_attn.__version__,
        "libraries": {n: _package_version(n) for n in ("numpy", "einops", "xformers", "transformers", "triton")},
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "git_commit": _git_commit(),
    }
    if device == "cuda" and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    else:
        info["device_name"] = info["cpu_model"]
    return info
