"""Sweeps: a suite's cells run one after the other, each recorded as one row, resumable, never lying.

:func:`run_sweep` plans the cells (:func:`efficient_attn.harness.plan.plan_cells`), opens the run folder
(:class:`efficient_attn.harness.runfolder.RunFolder`: an existing folder with the same config is resumed, finished
cells are skipped), and runs every other cell through :func:`efficient_attn.harness.cell.run_cell` (precheck, then
measurement in this process or, with ``isolate=True``, in a fresh one: :mod:`efficient_attn.harness.worker`). A cell
that ran out of memory skips the longer lengths of its group (``skipped_after_oom``), also across resumes; every
other failure is recorded and the sweep goes on. Rows are appended and fsync'ed as each cell ends. A progress bar
shows the current cell and an ETA. This is the ``inline`` executor; the parallel ones (``local``, ``slurm``) are
:mod:`efficient_attn.harness.executors`, on the same plan, run folder and rows. Each session records its executor
in ``meta.json`` (outside the config), so a run started inline can be finished on a cluster.

:func:`dry_run` shows what a sweep would do, with the same plan and the same precheck, running nothing.
"""

from __future__ import annotations

import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from efficient_attn.harness.cell import Timing, make_row, precheck, run_cell
from efficient_attn.harness.host import budget_bytes, device_memory_bytes, resolve_device
from efficient_attn.harness.plan import PlannedCell, plan_cells
from efficient_attn.harness.predict import Predictor
from efficient_attn.harness.runfolder import RunFolder, read_rows
from efficient_attn.harness.schema import (
    ALL_COLUMNS,
    CONFIG_COLUMNS,
    OLDER_COLUMNS,
    RESULTS_FILE,
    SCHEMA_VERSION,
)
from efficient_attn.harness.suite import Suite
from efficient_attn.harness.worker import measure_isolated

__all__ = ["SweepResult", "dry_run", "known_ooms", "open_run_folder", "run_sweep", "sweep_config", "sweep_result"]


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
    #: cells without a row yet, and tasks still pending or running (a detached parallel run)
    unfinished: int = 0
    live_tasks: int = 0


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
    # keys added after runs were stored: left out at their defaults, so a folder of an older suite still resumes
    if "decode" not in suite.modes and config.get("decode_steps") == 32:
        del config["decode_steps"]
    if config.get("threads") is None:
        del config["threads"]
    return config


def open_run_folder(path: Path, config: dict[str, Any]) -> RunFolder:
    """A benchmark run folder: the results schema's columns, keyed by the configuration columns, the sessions'
    wall time and timed windows totalled; a folder of an earlier schema version is upgraded."""
    return RunFolder(path, config, columns=ALL_COLUMNS, key_columns=CONFIG_COLUMNS, schema_version=SCHEMA_VERSION,
                     totals=("wall_s", "timed_window_s"), older_columns=OLDER_COLUMNS)


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
    threads: int | None = None,
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
        threads: torch threads for the cells (default: leave this process's count); restored at the end.

    Raises:
        ConfigMismatchError: ``out_dir`` holds a run with another config.
        RunFolderBusyError: another process is writing ``out_dir``.
    """
    device = resolve_device(device or suite.device)
    threads = threads if threads is not None else suite.threads
    config = sweep_config(suite, device=device, include_peers=include_peers, isolate=isolate, budget_gb=budget_gb,
                          seed=seed)
    folder = open_run_folder(out_dir, config)
    try:
        return _run_in_folder(folder, suite, device, threads, budget_gb=budget_gb, isolate=isolate, seed=seed,
                              progress=progress, on_row=on_row, include_peers=include_peers)
    finally:
        folder.close()


def known_ooms(planned: list[PlannedCell], finished: dict[tuple[str, ...], dict[str, str]]) -> dict[tuple[str, ...], int]:
    """The shortest length of each group that already ran out of memory (its longer lengths are skipped)."""
    oom_at: dict[tuple[str, ...], int] = {}
    for p in planned:
        row = finished.get(p.cell.key())
        if row is not None and row["status"] == "oom":
            oom_at[p.group] = min(oom_at.get(p.group, p.cell.seq_len), p.cell.seq_len)
    return oom_at


def _run_in_folder(folder: RunFolder, suite: Suite, device: str, threads: int | None, *,
                   budget_gb: float | None, isolate: bool, seed: int, progress: bool,
                   on_row: Callable[[dict[str, str]], None] | None, include_peers: bool) -> SweepResult:
    budget = budget_bytes(budget_gb, device)
    timing = Timing(suite.min_run_time, suite.slow_call_s, suite.slow_repeats, suite.decode_steps)
    measure = measure_isolated if isolate else None
    planned = plan_cells(suite, device, include_peers=include_peers)
    oom_at = known_ooms(planned, folder.finished)
    predictor = Predictor(seed=seed, depth=suite.depth)  # one per session: fits reuse the shorter cells' fake runs
    t0 = time.perf_counter()
    host = socket.gethostname()
    from tqdm import tqdm

    threads_before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    resumed = 0
    try:
        with folder.session() as session, \
                tqdm(planned, disable=not progress, unit="cell", dynamic_ncols=True, file=sys.stderr) as bar:
            session.timed_window_s, session.budget_bytes = 0.0, budget
            session.device_memory_bytes = device_memory_bytes(device)
            session.executor = {"name": "inline", "threads": torch.get_num_threads()}
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
                                           measure=measure, predictor=predictor)
                    if row["status"] == "oom":
                        oom_at[p.group] = p.cell.seq_len
                row["host"] = host
                folder.append(row)
                session.timed_window_s += window
                session.cells_run += 1
                if on_row is not None:
                    on_row(row)
    finally:
        torch.set_num_threads(threads_before)
    return sweep_result(folder, session.cells_run, resumed, time.perf_counter() - t0, session.timed_window_s,
                        len(planned), 0)


def sweep_result(folder: RunFolder, cells_run: int, resumed: int, wall_s: float, window_s: float, planned: int,
                 live_tasks: int) -> SweepResult:
    """What a session did, with every row of ``folder`` (old and new)."""
    rows = folder.rows()
    statuses: dict[str, int] = {}
    for row in rows:
        statuses[row["status"]] = statuses.get(row["status"], 0) + 1
    return SweepResult(folder.path, rows, cells_run, resumed, wall_s, window_s, statuses,
                       unfinished=max(0, planned - len(rows)), live_tasks=live_tasks)


def dry_run(
    suite: Suite, *, device: str | None = None, include_peers: bool = False, budget_gb: float | None = None,
    out_dir: Path | None = None, seed: int = 0,
) -> list[tuple[PlannedCell, int | None, str, str]]:
    """What a sweep would do, running nothing: per cell the predicted peak bytes, the status it would get before
    measuring (``run``, ``done`` when ``out_dir`` already has it, or a skip status) and a note. Creates no files."""
    device = resolve_device(device or suite.device)
    budget = budget_bytes(budget_gb, device)
    done: set[tuple[str, ...]] = set()
    if out_dir is not None:
        done = {tuple(r[c] for c in CONFIG_COLUMNS) for r in read_rows(Path(out_dir) / RESULTS_FILE)}
    plan = []
    predictor = Predictor(seed=seed, depth=suite.depth)
    for p in plan_cells(suite, device, include_peers=include_peers):
        if p.cell.key() in done:
            plan.append((p, None, "done", "already in the run folder"))
            continue
        check = precheck(p, budget_bytes=budget, seed=seed, depth=suite.depth, predictor=predictor)
        plan.append((p, check.predicted_bytes, check.status or "run", check.note))
    return plan
