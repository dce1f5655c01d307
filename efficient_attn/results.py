"""The results table of a benchmark run: schema, one row per cell, appended and flushed as each cell ends; resume.

A run folder holds:

* ``results.csv``: one tidy row per cell. The configuration columns (:data:`CONFIG_COLUMNS`) together are the cell's
  key; the measured columns (:data:`MEASURED_COLUMNS`) follow. Each row is written, flushed and fsync'ed when its cell
  ends, so a Ctrl-C or a kill loses at most the cell that was running (a half-written last line is cut off when the
  run is resumed).
* ``meta.json``: the whole configuration of the run, the environment (torch, python and library versions, device,
  CPU model, threads, git commit), the seeds, and per session the wall time and the sum of the cells' timed windows.

``status`` is one of :data:`STATUSES`. Numbers are empty (read back as NaN), never ``-1``, unless the status is
``ok``; the one exception is ``predicted_mem_bytes``, a prediction rather than a measurement, which is also kept for
``skipped_budget`` rows (it is why the cell was skipped; the note repeats it).

Units: ``time_ms``, ``time_iqr_ms``, ``compile_ms`` milliseconds per call; ``*_bytes`` bytes; ``flops_*`` FLOPs per
call (forward+backward for ``fwd_bwd``; see :mod:`efficient_attn.measure.flops`); ``flops_per_s`` =
``flops_computed / time``; ``tokens_per_s`` = ``batch_size * seq_len / time``; ``timed_runs`` = calls in the timed
window.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from efficient_attn.harness.schema import (
    ALL_COLUMNS,
    CONFIG_COLUMNS,
    META_FILE,
    MEASURED_COLUMNS,
    NUMERIC_COLUMNS,
    RESULTS_FILE,
    SCHEMA_VERSION,
)
from efficient_attn.vocab import STATUSES

__all__ = [
    "ALL_COLUMNS",
    "CONFIG_COLUMNS",
    "MEASURED_COLUMNS",
    "STATUSES",
    "Cell",
    "ConfigMismatchError",
    "RunFolder",
    "environment_info",
    "format_value",
    "make_row",
    "params_to_json",
    "read_rows",
]



def params_to_json(params: dict[str, Any]) -> str:
    """Canonical JSON of a parameter dict (sorted keys, no spaces): the ``params_json`` column."""
    return json.dumps(params, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Cell:
    """One benchmark measurement's configuration: exactly the configuration columns of its row.

    Shapes: the core runs on q, k, v ``(batch_size, num_heads, seq_len, head_dim)``; layer and model levels on
    ``(batch_size, seq_len, num_heads * head_dim)`` activations or ``(batch_size, seq_len)`` tokens.
    """

    variant: str
    params_json: str
    backend_requested: str
    level: str
    mode: str
    causal: bool
    device: str
    dtype: str
    batch_size: int
    seq_len: int
    num_heads: int
    head_dim: int
    is_peer: bool = False

    @property
    def params(self) -> dict[str, Any]:
        return json.loads(self.params_json)

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim

    def key(self) -> tuple[str, ...]:
        """The cell key as its configuration columns are written in the CSV."""
        return tuple(format_value(getattr(self, c)) for c in CONFIG_COLUMNS)

    def label(self) -> str:
        """Short human description, for progress bars and messages."""
        causal = " causal" if self.causal else ""
        return (
            f"{self.variant}/{self.backend_requested} {self.level} {self.mode}{causal} n={self.seq_len} "
            f"b={self.batch_size} {self.dtype}"
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def format_value(value: Any) -> str:
    """How one value is written in the CSV: bools ``true``/``false``, None and NaN empty, floats with 6 digits."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return ""
        return f"{value:.6g}"
    return str(value)


def make_row(cell: Cell, *, status: str, note: str = "", **measured: Any) -> dict[str, str]:
    """A complete CSV row for ``cell``: configuration columns, then measured ones (missing ones empty).

    Numbers are blanked unless ``status == "ok"`` (except ``predicted_mem_bytes``, see the module docstring).

    Raises:
        ValueError: unknown status or unknown column.
    """
    if status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}; got {status!r}")
    unknown = [name for name in measured if name not in MEASURED_COLUMNS]
    if unknown:
        raise ValueError(f"unknown measured column(s) {unknown}; allowed: {', '.join(MEASURED_COLUMNS)}")
    values: dict[str, Any] = {c: getattr(cell, c) for c in CONFIG_COLUMNS}
    for column in MEASURED_COLUMNS:
        values[column] = measured.get(column)
    values["status"] = status
    values["note"] = " ".join(str(note).split())  # one line
    if status != "ok":
        for column in NUMERIC_COLUMNS:
            if column != "predicted_mem_bytes":
                values[column] = None
    return {c: format_value(values[c]) for c in ALL_COLUMNS}


class ConfigMismatchError(ValueError):
    """The run folder holds a run with a different configuration."""


def _git_commit() -> str | None:
    repo = Path(__file__).resolve().parents[1]
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


def _diff_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [k for k in keys if old.get(k) != new.get(k)]


class RunFolder:
    """A run folder: ``results.csv`` + ``meta.json``, created or resumed.

    Example::

        folder = RunFolder(Path("runs/x"), config)   # ConfigMismatchError if runs/x holds another config
        if cell.key() not in folder.finished: folder.append(make_row(cell, status="ok", ...))
        folder.end_session(wall_s=..., timed_window_s=..., cells_run=...)
    """

    def __init__(self, path: Path, config: dict[str, Any], *, environment: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.csv_path = self.path / RESULTS_FILE
        self.meta_path = self.path / META_FILE
        self.config = json.loads(json.dumps(config))  # normalise (tuples -> lists) like a reload would
        self.path.mkdir(parents=True, exist_ok=True)
        if self.meta_path.exists():
            self.meta = json.loads(self.meta_path.read_text())
            old = self.meta.get("config", {})
            if old != self.config:
                diff = _diff_keys(old, self.config)
                details = "; ".join(f"{k}: {old.get(k)!r} there, {self.config.get(k)!r} now" for k in diff[:5])
                raise ConfigMismatchError(
                    f"{self.path} already holds a run with a different config ({details}); "
                    "resume it with the same suite and options, or choose another --out"
                )
        else:
            self.meta = {
                "schema_version": SCHEMA_VERSION,
                "config": self.config,
                "environment": environment if environment is not None else environment_info(config.get("device", "cpu")),
                "sessions": [],
                "wall_s": 0.0,
                "timed_window_s": 0.0,
            }
            self._write_meta()
        #: rows already in results.csv, by cell key
        self.finished: dict[tuple[str, ...], dict[str, str]] = {}
        self._load_csv()

    # ------------------------------------------------------------------------------------------------ csv
    def _load_csv(self) -> None:
        if not self.csv_path.exists() or self.csv_path.stat().st_size == 0:
            with open(self.csv_path, "w", newline="", encoding="utf-8") as handle:
                csv.writer(handle).writerow(ALL_COLUMNS)
            return
        raw = self.csv_path.read_bytes()
        if not raw.endswith(b"\n"):
            # the process died while writing the last row: cut the partial line so it is rerun
            cut = raw.rfind(b"\n") + 1
            with open(self.csv_path, "r+b") as handle:
                handle.truncate(cut)
            raw = raw[:cut]
        reader = csv.reader(io.StringIO(raw.decode("utf-8"), newline=""))
        header = next(reader, None)
        if header is None:
            with open(self.csv_path, "w", newline="", encoding="utf-8") as handle:
                csv.writer(handle).writerow(ALL_COLUMNS)
            return
        if tuple(header) != ALL_COLUMNS:
            raise ConfigMismatchError(
                f"{self.csv_path} has columns {header}, not this version's schema; choose another --out"
            )
        for values in reader:
            if len(values) != len(ALL_COLUMNS):
                continue  # a damaged row (never written whole): its cell runs again
            row = dict(zip(ALL_COLUMNS, values))
            self.finished[tuple(row[c] for c in CONFIG_COLUMNS)] = row

    def append(self, row: dict[str, str]) -> None:
        """Append one row (from :func:`make_row`) and flush it to disk."""
        key = tuple(row[c] for c in CONFIG_COLUMNS)
        if key in self.finished:
            raise ValueError(f"cell {key} is already in {self.csv_path}; it must not be written twice")
        with open(self.csv_path, "a", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerow([row[c] for c in ALL_COLUMNS])
            handle.flush()
            os.fsync(handle.fileno())
        self.finished[key] = row

    def rows(self) -> list[dict[str, str]]:
        return list(self.finished.values())

    # ----------------------------------------------------------------------------------------------- meta
    def _write_meta(self) -> None:
        tmp = self.meta_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.meta, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.meta_path)

    def end_session(self, *, started: str, wall_s: float, timed_window_s: float, cells_run: int,
                    interrupted: bool = False, budget_bytes: int | None = None,
                    device_memory_bytes: int | None = None) -> None:
        """Record one session (a run or a resume) and update the totals in ``meta.json``.

        ``budget_bytes`` (the memory budget in force) and ``device_memory_bytes`` (total RAM or GPU memory) are
        stored per session and, from the latest session, at the top level, where the report reads them.
        """
        self.meta["sessions"].append(
            {
                "started": started,
                "wall_s": round(wall_s, 3),
                "timed_window_s": round(timed_window_s, 3),
                "cells_run": cells_run,
                "interrupted": interrupted,
                "budget_bytes": budget_bytes,
                "device_memory_bytes": device_memory_bytes,
            }
        )
        if budget_bytes is not None:
            self.meta["budget_bytes"] = budget_bytes
        if device_memory_bytes is not None:
            self.meta["device_memory_bytes"] = device_memory_bytes
        self.meta["wall_s"] = round(sum(s["wall_s"] for s in self.meta["sessions"]), 3)
        self.meta["timed_window_s"] = round(sum(s["timed_window_s"] for s in self.meta["sessions"]), 3)
        self._write_meta()


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a ``results.csv`` (complete rows only)."""
    with open(path, newline="", encoding="utf-8") as handle:
        return [row for row in csv.DictReader(handle) if None not in row.values()]

