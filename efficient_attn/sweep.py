"""Sweeps: a suite expanded into cells, each cell run and recorded as one row, resumable, never lying.

Cells are ``variants x backends x modes x causal x dtypes x batch sizes x lengths`` (lengths innermost, ascending),
plus ``peers x ...`` at the suite's level when peers are included. For each cell, in this order:

1. **Static checks**: a variant that cannot be causal, a backend that cannot run on the device or cannot do backward
   (the module's ``unavailable_reason``), a peer at a level it cannot run at (``peer_info(name)["levels"]``) or causal
   without a causal mode -> ``unsupported`` with the reason;
   a length above the suite's per-mode ``max_len`` -> ``skipped_budget``; a longer length of a variant/backend/mode
   that already ran out of memory -> ``skipped_after_oom``.
2. **Prediction** (:func:`efficient_attn.measure.predict.predict_cell`, CPU fake tensors, nothing allocated): a cell
   whose predicted total (setup + peak) exceeds the memory budget -> ``skipped_budget``, predicted bytes in the note.
   The budget defaults to 80% of free RAM (``MemAvailable``) or of free GPU memory: on CPU the kernel's OOM killer
   kills the process instead of raising, so a cell must not be tried when it will not fit.
3. **Measurement**, in this process or (``isolate=True``) in a fresh subprocess per cell: build, then one
   instrumented call that is also the warm-up, measuring the first call's peak memory and FLOPs together
   (:mod:`efficient_attn.measure.memory`; with isolation the peak RSS change around it is ``peak_rss_bytes``), then
   the timed runs (:mod:`efficient_attn.measure.timing`). One instrumented call per cell keeps slow cells cheap (a
   16K SDPA forward+backward is 6.5 s per call on 2 cores). Compiled backends (flex) refuse dispatch modes: their
   first call compiles (``compile_ms``), a second warms up (and gives the allocator peak on CUDA). Nothing heavy
   precedes the measured calls. ``predicted_mem_bytes`` is the prediction of that same first call.

``torch.OutOfMemoryError`` -> ``oom`` (and the longer lengths of that group -> ``skipped_after_oom``); a
``BackendUnavailableError`` (``auto`` on a device with nothing usable) or a missing peer package -> ``unsupported``;
any other exception -> ``error`` with its message, and the sweep goes on. Rows are appended and flushed as each cell
ends (:class:`efficient_attn.results.RunFolder`), and rerunning with the same folder skips finished cells.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from efficient_attn.errors import BackendUnavailableError
from efficient_attn.measure.memory import measure_call, rss_probe
from efficient_attn.measure.predict import Prediction, predict_cell
from efficient_attn.measure.timing import time_call, time_callable
from efficient_attn.registry import get_spec
from efficient_attn.results import CONFIG_COLUMNS, Cell, RunFolder, make_row, params_to_json
from efficient_attn.suites import Suite
from efficient_attn.workloads import build_workload, parse_dtype

__all__ = [
    "COMPILING_BACKENDS",
    "PlannedCell",
    "SweepResult",
    "default_budget_bytes",
    "expand_cells",
    "measure_cell",
    "plan_cells",
    "resolve_device",
    "run_cell",
    "run_sweep",
    "summary_table",
]

#: backends whose first call compiles (its time is reported as ``compile_ms``)
COMPILING_BACKENDS = frozenset({"flex"})
#: compiled backends that refuse to run under a dispatch mode (StorageTracker, FlopCounterMode, fake tensors):
#: ``flops_computed`` falls back to the analytic useful count, ``peak_mem_bytes`` is measured on CUDA only
UNCOUNTABLE_BACKENDS = frozenset({"flex"})
BUDGET_FRACTION = 0.8
_RESULT_MARK = "EFFATTN_CELL_RESULT "


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` if available else ``cpu``; ``cuda`` without CUDA is a ``ValueError``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch.cuda.is_available() is False; use --device cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda; got {device!r}")
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


@dataclass(frozen=True)
class PlannedCell:
    """A cell plus what the suite says about it that is not part of its key."""

    cell: Cell
    cap: int | None = None  # the suite's max_len for this cell's mode

    @property
    def group(self) -> tuple[str, ...]:
        """The cell key without ``seq_len``: an OOM skips the longer lengths of the same group."""
        return tuple(v for c, v in zip(CONFIG_COLUMNS, self.cell.key()) if c != "seq_len")


def expand_cells(suite: Suite, device: str, *, include_peers: bool = False) -> list[PlannedCell]:
    """All cells of ``suite`` on ``device`` (resolved: ``cpu`` or ``cuda``), lengths ascending within each group."""
    planned = []
    for entry in suite.variants:
        params_json = params_to_json(entry.params)
        for backend in entry.backends:
            for mode in suite.modes:
                for causal in suite.causal:
                    for dtype in suite.dtypes:
                        for batch in suite.batch_sizes:
                            for length in suite.lengths:
                                cell = Cell(entry.key, params_json, backend, suite.level, mode, causal, device, dtype,
                                            batch, length, suite.heads, suite.head_dim, False)
                                planned.append(PlannedCell(cell, entry.max_len.get(mode)))
    if include_peers:
        for peer in suite.peers:
            params_json = params_to_json(peer.params)
            for mode in suite.modes:
                for causal in suite.causal:
                    for dtype in suite.dtypes:
                        for batch in suite.batch_sizes:
                            for length in suite.lengths:
                                cell = Cell(peer.name, params_json, "peer", suite.level, mode, causal, device,
                                            dtype, batch, length, suite.heads, suite.head_dim, True)
                                planned.append(PlannedCell(cell))
    return planned


def static_status(planned: PlannedCell) -> tuple[str, str] | None:
    """``(status, note)`` when the cell must not run, decided without building anything; None when it may run."""
    cell = planned.cell
    if cell.is_peer:
        try:
            from efficient_attn.peers import peer_info
        except ImportError as error:
            return "unsupported", f"efficient_attn.peers is not importable: {error}"
        info = peer_info(cell.variant)
        if cell.level not in info["levels"]:
            return "unsupported", f"peer {cell.variant!r} runs at level {' or '.join(info['levels'])}, not {cell.level!r}"
        if cell.causal and "causal" not in info["params"]:
            return "unsupported", f"peer {cell.variant!r} has no causal mode"
    else:
        spec = get_spec(cell.variant)
        if cell.causal and not spec.supports_causal:
            return "unsupported", f"{cell.variant} cannot be causal: {spec.module_cls.causal_unsupported_reason}"
        if cell.backend_requested != "auto":
            reason = spec.module_cls.unavailable_reason(
                cell.backend_requested, torch.device(cell.device), cell.mode != "fwd", parse_dtype(cell.dtype)
            )
            if reason is not None:
                return "unsupported", f"backend {cell.backend_requested!r}: {reason}"
        if spec.max_len_field is not None:
            bound = cell.params.get(spec.max_len_field)
            if bound is not None and cell.seq_len > bound:
                return "unsupported", f"seq_len {cell.seq_len} exceeds {spec.max_len_field}={bound} of the params"
    if planned.cap is not None and cell.seq_len > planned.cap:
        return "skipped_budget", f"above this suite's max_len for {cell.mode} ({planned.cap})"
    return None


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def _is_peer_unavailable(error: BaseException) -> bool:
    return type(error).__name__ == "PeerUnavailableError"


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:500]


def _cleanup(device: str, *, collect: bool = True) -> None:
    """Free what a finished or failed cell left: a full ``gc.collect`` (a traceback's frames keep tensors alive in
    cycles; it costs ~0.1-1 s, so only after failures) and the CUDA cache."""
    if collect:
        gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


@dataclass
class Timing:
    """Timing options of a sweep (see :func:`efficient_attn.measure.timing.time_callable`)."""

    min_run_time: float = 0.5
    slow_call_s: float = 1.0
    slow_repeats: int = 3


def measure_cell(cell: Cell, *, timing: Timing, seed: int = 0, depth: int = 2, rss: bool = False) -> dict[str, Any]:
    """Build and measure one cell in this process; returns the measured columns plus ``_window_s``.

    Raises whatever the cell raises (the caller turns it into a status).
    """
    work = build_workload(cell, seed=seed, depth=depth)
    if work.attentions:
        backend = work.attentions[0].resolve_backend(
            torch.device(cell.device), cell.mode != "fwd", seq_len=cell.seq_len, dtype=parse_dtype(cell.dtype)
        )
    else:
        backend = "peer"
    notes: list[str] = []
    probe = contextlib.nullcontext() if not rss else rss_probe()
    compile_s = None
    if backend in UNCOUNTABLE_BACKENDS:
        # compiled kernels refuse to run under a dispatch mode (tracker, FLOP counter): the first call compiles,
        # the second is the warm-up (and, on CUDA, the allocator's peak)
        with probe as rss_result:
            compile_s = time_call(work.run, cell.device)
        start = time.perf_counter()
        peak_bytes = measure_call(work.run, cell.device, count_flops=False).peak_bytes if cell.device == "cuda" else None
        if peak_bytes is None:
            time_call(work.run, cell.device)
        first_s = time.perf_counter() - start
        flops_computed = work.useful_flops
        notes.append(f"flops_computed is the pattern's count: FlopCounterMode cannot see {backend}")
        if peak_bytes is None:
            notes.append(f"peak_mem_bytes not measured: {backend} cannot run under the storage tracker "
                         "(--isolate gives peak_rss_bytes)")
    else:
        # one instrumented call is the warm-up: peak memory and FLOPs of the first call, outside the timed runs
        with probe as rss_result:
            start = time.perf_counter()
            instrumented = measure_call(work.run, cell.device, count_flops=True)
            first_s = time.perf_counter() - start
        peak_bytes, flops_computed = instrumented.peak_bytes, instrumented.flops
    timed = time_callable(
        work.run, device=cell.device, min_run_time=timing.min_run_time, slow_call_s=timing.slow_call_s,
        slow_repeats=timing.slow_repeats, first_call_s=first_s,
    )
    if work.attentions and work.last_backend != backend:
        raise RuntimeError(f"backend resolved to {backend!r} before the run but {work.last_backend!r} ran")
    if cell.is_peer and getattr(work.module, "last_note", None):
        notes.append(work.module.last_note)  # e.g. HF BigBird's fallback to full attention, padding it added
    if timed.method == "slow_repeats":
        notes.append(f"slow cell ({timed.first_call_ms / 1e3:.1f} s first call): {timed.runs} timed calls")
    if rss and not rss_result.exact:
        notes.append("peak_rss_bytes is an upper bound (the call did not raise the process high-water mark)")
    seconds = timed.median_ms / 1e3
    measured: dict[str, Any] = {
        "backend": backend,
        "padded_len": work.last_padded_len if work.last_padded_len is not None else cell.seq_len,
        "time_ms": timed.median_ms,
        "time_iqr_ms": timed.iqr_ms,
        "compile_ms": compile_s * 1e3 if compile_s is not None else None,
        "tokens_per_s": work.tokens / seconds,
        "peak_mem_bytes": peak_bytes,
        "peak_rss_bytes": rss_result.peak_bytes if rss else None,
        "flops_useful": work.useful_flops,
        "flops_computed": flops_computed,
        "flops_per_s": flops_computed / seconds if flops_computed else None,
        "timed_runs": timed.runs,
        "note": "; ".join(notes),
        "_window_s": timed.window_s,
    }
    del work  # tensors are freed by reference counting; no full collection on the success path
    _cleanup(cell.device, collect=False)
    return measured


def _classify(error: BaseException) -> tuple[str, str]:
    if isinstance(error, torch.OutOfMemoryError):
        return "oom", _first_line(error)
    if isinstance(error, BackendUnavailableError) or _is_peer_unavailable(error):
        return "unsupported", str(error)
    return "error", _first_line(error)


def _measure_isolated(cell: Cell, *, timing: Timing, seed: int, depth: int) -> dict[str, Any]:
    """:func:`measure_cell` in a fresh ``python`` process (peak RSS measured there); returns its measured columns
    or ``{"_status": ..., "note": ...}`` when it failed."""
    request = {
        "cell": cell.to_dict(), "timing": dataclasses.asdict(timing), "seed": seed, "depth": depth,
        "threads": torch.get_num_threads(),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "efficient_attn.sweep", "--worker"], input=json.dumps(request),
        capture_output=True, text=True, check=False,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_MARK):
            return json.loads(line[len(_RESULT_MARK):])
    if proc.returncode == -signal.SIGKILL:
        return {"_status": "oom", "note": "the cell's process was killed by SIGKILL (the kernel's OOM killer?)"}
    tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
    return {"_status": "error", "note": f"isolated cell process exited with {proc.returncode}: {tail}"[:500]}


def _worker_main() -> int:
    request = json.loads(sys.stdin.read())
    torch.set_num_threads(request["threads"])
    cell = Cell(**request["cell"])
    try:
        result = measure_cell(cell, timing=Timing(**request["timing"]), seed=request["seed"], depth=request["depth"],
                              rss=True)
    except Exception as error:  # noqa: BLE001 - every failure becomes a recorded status
        status, note = _classify(error)
        result = {"_status": status, "note": note}
    print(_RESULT_MARK + json.dumps(result), flush=True)
    return 0


def run_cell(
    planned: PlannedCell,
    *,
    budget_bytes: int | None,
    timing: Timing,
    seed: int = 0,
    depth: int = 2,
    isolate: bool = False,
) -> tuple[dict[str, str], float]:
    """Run one cell through checks, prediction and measurement; returns its row and its timed window (s)."""
    cell = planned.cell
    static = static_status(planned)
    if static is not None:
        return make_row(cell, status=static[0], note=static[1]), 0.0
    prediction: Prediction | None = None
    notes = []
    try:
        prediction = predict_cell(cell, seed=seed, depth=depth)
    except Exception as error:  # noqa: BLE001 - the real run below decides the status
        notes.append(f"memory not predicted ({_first_line(error)[:120]})")
    predicted = prediction.first_call_bytes if prediction is not None else None
    if prediction is not None and budget_bytes is not None and prediction.total_bytes > budget_bytes:
        note = (f"predicted {_gib(prediction.total_bytes)} (peak {_gib(prediction.peak_bytes)} + setup "
                f"{_gib(prediction.setup_bytes)}) > budget {_gib(budget_bytes)}")
        return make_row(cell, status="skipped_budget", note=note, predicted_mem_bytes=predicted), 0.0
    try:
        if isolate:
            measured = _measure_isolated(cell, timing=timing, seed=seed, depth=depth)
        else:
            measured = measure_cell(cell, timing=timing, seed=seed, depth=depth)
    except Exception as error:  # noqa: BLE001 - every failure becomes a recorded status, the sweep goes on
        _cleanup(cell.device)
        status, note = _classify(error)
        return make_row(cell, status=status, note="; ".join([note, *notes]), predicted_mem_bytes=predicted), 0.0
    if "_status" in measured:
        return make_row(cell, status=measured["_status"], note="; ".join([measured["note"], *notes]),
                        predicted_mem_bytes=predicted), 0.0
    window = float(measured.pop("_window_s"))
    note = "; ".join(n for n in [measured.pop("note"), *notes] if n)
    return make_row(cell, status="ok", note=note, predicted_mem_bytes=predicted, **measured), window


@dataclass
class SweepResult:
    """What a sweep did: the folder, every row of it (old and new), and this session's counts and times."""

    folder: Path
    rows: list[dict[str, str]]
    cells_run: int
    cells_skipped_resumed: int
    wall_s: float
    timed_window_s: float
    statuses: dict[str, int] = field(default_factory=dict)


def sweep_config(suite: Suite, *, device: str, include_peers: bool, isolate: bool, budget_gb: float | None,
                 seed: int) -> dict[str, Any]:
    """The configuration stored in ``meta.json`` (a resume must match it exactly)."""
    config = suite.to_dict()
    config.update(
        device=device, device_requested=suite.device, include_peers=include_peers, isolate=isolate,
        budget_gb=budget_gb, seed=seed,
    )
    if not include_peers:
        config["peers"] = []
    return config


def plan_cells(suite: Suite, device: str, *, include_peers: bool) -> list[PlannedCell]:
    """:func:`expand_cells` (kept as the single place that orders cells)."""
    return expand_cells(suite, device, include_peers=include_peers)


def run_sweep(
    suite: Suite,
    out_dir: Path,
    *,
    device: str | None = None,
    include_peers: bool = False,
    isolate: bool = False,
    budget_gb: float | None = None,
    seed: int = 0,
    progress: bool = True,
    on_row: Callable[[dict[str, str]], None] | None = None,
) -> SweepResult:
    """Run (or resume) ``suite`` into ``out_dir``.

    Args:
        suite: the suite (after command-line overrides).
        out_dir: run folder; an existing one with the same config is resumed, with another config is an error.
        device: ``cpu``/``cuda`` (default: the suite's, ``auto`` resolved).
        include_peers: also run the suite's ``[[peers]]``.
        isolate: measure each cell in its own process (adds ``peak_rss_bytes``).
        budget_gb: memory budget in GiB (default 80% of free RAM / GPU memory, taken now).
        seed: seeds parameters and inputs of every cell.
        progress: show a tqdm bar with the current cell and an ETA.
        on_row: called with each new row.

    Raises:
        ConfigMismatchError: ``out_dir`` holds a run with another config.
    """
    device = resolve_device(device or suite.device)
    config = sweep_config(suite, device=device, include_peers=include_peers, isolate=isolate, budget_gb=budget_gb,
                          seed=seed)
    folder = RunFolder(out_dir, config)
    budget = int(budget_gb * 2**30) if budget_gb is not None else default_budget_bytes(device)
    timing = Timing(suite.min_run_time, suite.slow_call_s, suite.slow_repeats)
    planned = plan_cells(suite, device, include_peers=include_peers)
    oom_at: dict[tuple[str, ...], int] = {}
    for p in planned:
        row = folder.finished.get(p.cell.key())
        if row is not None and row["status"] == "oom":
            oom_at[p.group] = min(oom_at.get(p.group, p.cell.seq_len), p.cell.seq_len)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    t0 = time.perf_counter()
    window_total, cells_run, resumed = 0.0, 0, 0
    from tqdm import tqdm

    bar = tqdm(planned, disable=not progress, unit="cell", dynamic_ncols=True, file=sys.stderr)
    interrupted = False
    try:
        for p in bar:
            if p.cell.key() in folder.finished:
                resumed += 1
                continue
            bar.set_postfix_str(p.cell.label(), refresh=True)
            if p.group in oom_at and p.cell.seq_len > oom_at[p.group]:
                row = make_row(p.cell, status="skipped_after_oom",
                               note=f"ran out of memory at seq_len {oom_at[p.group]}")
                window = 0.0
            else:
                row, window = run_cell(p, budget_bytes=budget, timing=timing, seed=seed, depth=suite.depth,
                                       isolate=isolate)
                if row["status"] == "oom":
                    oom_at[p.group] = p.cell.seq_len
            folder.append(row)
            window_total += window
            cells_run += 1
            if on_row is not None:
                on_row(row)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        bar.close()
        folder.end_session(started=started, wall_s=time.perf_counter() - t0, timed_window_s=window_total,
                           cells_run=cells_run, interrupted=interrupted, budget_bytes=budget,
                           device_memory_bytes=device_memory_bytes(device))
    rows = folder.rows()
    statuses: dict[str, int] = {}
    for row in rows:
        statuses[row["status"]] = statuses.get(row["status"], 0) + 1
    return SweepResult(folder.path, rows, cells_run, resumed, time.perf_counter() - t0, window_total, statuses)


def dry_run(
    suite: Suite, *, device: str | None = None, include_peers: bool = False, budget_gb: float | None = None,
    out_dir: Path | None = None, seed: int = 0,
) -> list[tuple[PlannedCell, int | None, str, str]]:
    """What a sweep would do, running nothing: per cell the predicted peak bytes, the status it would get before
    measuring (``run``, ``done`` when ``out_dir`` already has it, or a skip status) and a note. Creates no files."""
    from efficient_attn.results import read_rows

    device = resolve_device(device or suite.device)
    budget = int(budget_gb * 2**30) if budget_gb is not None else default_budget_bytes(device)
    done: set[tuple[str, ...]] = set()
    if out_dir is not None and (Path(out_dir) / "results.csv").exists():
        done = {tuple(r[c] for c in CONFIG_COLUMNS) for r in read_rows(Path(out_dir) / "results.csv")}
    plan = []
    for p in plan_cells(suite, device, include_peers=include_peers):
        if p.cell.key() in done:
            plan.append((p, None, "done", "already in the run folder"))
            continue
        static = static_status(p)
        if static is not None:
            plan.append((p, None, static[0], static[1]))
            continue
        try:
            prediction = predict_cell(p.cell, seed=seed, depth=suite.depth)
        except Exception as error:  # noqa: BLE001 - reported, nothing runs
            plan.append((p, None, "run", f"memory not predicted: {_classify(error)[1]}"))
            continue
        if prediction.total_bytes > budget:
            plan.append((p, prediction.first_call_bytes, "skipped_budget",
                         f"predicted {_gib(prediction.total_bytes)} > budget {_gib(budget)}"))
        else:
            plan.append((p, prediction.first_call_bytes, "run", ""))
    return plan


_SHORT = {"oom": "OOM", "skipped_budget": "budget", "skipped_after_oom": "after-oom", "unsupported": "n/a",
          "error": "ERROR"}


def summary_table(rows: list[dict[str, str]]) -> str:
    """Median time (ms) per group and length, or the status where a cell did not run."""
    lengths = sorted({int(r["seq_len"]) for r in rows})
    params_seen: dict[str, set[str]] = {}
    for r in rows:
        params_seen.setdefault(r["variant"], set()).add(r["params_json"])
    groups: dict[tuple[str, ...], dict[int, str]] = {}
    for r in rows:
        causal = " causal" if r["causal"] == "true" else ""
        # params only where one variant ran with several (the CSV has them all)
        name = r["variant"] + (r["params_json"] if len(params_seen[r["variant"]]) > 1 else "")
        group = (name, r["backend_requested"], f"{r['level']} {r['mode']}{causal}", f"{r['dtype']} b{r['batch_size']}")
        cell = f"{float(r['time_ms']):.1f}" if r["status"] == "ok" else _SHORT.get(r["status"], r["status"])
        groups.setdefault(group, {})[int(r["seq_len"])] = cell
    header = ["variant", "backend", "what", "dtype", *[str(n) for n in lengths]]
    table = [[*g, *[groups[g].get(n, "") for n in lengths]] for g in groups]
    widths = [max(len(str(x[i])) for x in [header, *table]) for i in range(len(header))]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in table]
    return "median time per call (ms) by sequence length\n" + "\n".join(lines)


if __name__ == "__main__":  # the --isolate worker: one cell, request on stdin, result line on stdout
    if sys.argv[1:] != ["--worker"]:
        print("usage: python -m efficient_attn.sweep --worker  (internal: runs one cell for --isolate)", file=sys.stderr)
        sys.exit(2)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(_worker_main())
