"""Cells run elsewhere (``local``, ``slurm``): submit, then collect shards into ``results.csv`` until every cell has
its row.

The submitter holds the run folder's lock (it opened the :class:`~efficient_attn.harness.runfolder.RunFolder`), so it
is the only process that writes ``results.csv``, ``meta.json`` and ``jobs.jsonl``; the tasks write only their own
shards. :func:`collect` is one look: merge the shards that arrived, ask the scheduler about the tasks of the cells
still without a row, and give a row to each task that ended without one (status ``oom`` for Slurm's
``OUT_OF_MEMORY``, else ``error``; the scheduler's state in the note, which starts with :data:`ENDED_NOTE`). Such a
row is a placeholder: a later shard of the same cell replaces it, and a rerun resubmits its cell.

:func:`run_cells` is the whole sweep: collect what an earlier submitter left (its live jobs are waited for, not
resubmitted), submit the cells that have neither a row nor a live task (plus the placeholders), record them in
``jobs.jsonl``, then collect every ``poll_s`` seconds until every cell has its row (or return at once with
``detach``). :func:`run_sweep_parallel` is :func:`efficient_attn.harness.sweep.run_sweep` with an executor: the same
config, run folder, plan and OOM skips, the cells run by :func:`run_cells`.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Collection

from efficient_attn.harness.cell import Timing, make_row
from efficient_attn.harness.executors import ExecutorOptions
from efficient_attn.harness.executors.backends import Backend, TaskState, make_backend
from efficient_attn.harness.executors.ledger import Ledger, TaskRecord
from efficient_attn.harness.executors.task import TaskRequest, run_task
from efficient_attn.harness.plan import Cell, PlannedCell
from efficient_attn.harness.runfolder import RunFolder

if TYPE_CHECKING:
    from efficient_attn.harness.suite import Suite
    from efficient_attn.harness.sweep import SweepResult

__all__ = [
    "BENCH",
    "ENDED_NOTE",
    "CellKind",
    "Collected",
    "collect",
    "is_placeholder",
    "placeholder_task",
    "run_cells",
    "run_sweep_parallel",
    "run_tasks",
]

#: how the note of a row written for a task that ended without a result begins
ENDED_NOTE = "task ended without a result:"
#: scheduler states recorded as ``oom`` (every other ended state without a result is an ``error``)
OOM_STATES = frozenset({"OUT_OF_MEMORY"})
JOBS_DIR = "jobs"


def is_placeholder(row: dict[str, str]) -> bool:
    """Whether ``row`` was written for a task that ended without a result (killed, cancelled, timed out, lost)."""
    return row.get("note", "").startswith(ENDED_NOTE)


_TASK_IN_NOTE = re.compile(r"\(task (\S+?)(?: on [^)]*)?\)$")


def placeholder_task(row: dict[str, str]) -> str | None:
    """The task id a placeholder row was written for (its note ends ``(task <id>)`` or ``(task <id> on <node>)``)."""
    match = _TASK_IN_NOTE.search(row.get("note", "")) if is_placeholder(row) else None
    return match.group(1) if match else None


def placeholder_note(record: TaskRecord, state: TaskState) -> str:
    """The note of a placeholder row: the scheduler's state and which task it was."""
    where = f" on {state.node}" if state.node else ""
    why = ""
    if state.state == "UNKNOWN":
        why = (" - the scheduler no longer knows the task (cancelled before it started, or forgotten after "
               "MinJobAge with no accounting to ask)")
    return f"{ENDED_NOTE} {record.executor} state {state.state}{why} (task {record.task_id}{where})"


@dataclass(frozen=True)
class CellKind:
    """What the driver needs to know about one kind of cell (benchmark cells, quality training cells).

    Attributes:
        task: runs one request on its allocation and writes its shard (submitit pickles it by reference).
        placeholder: the row of a task that ended without a result: ``(record, state)`` -> complete row.
    """

    task: Callable[[Any], Any]
    placeholder: Callable[[TaskRecord, TaskState], dict[str, str]]


def _bench_placeholder(record: TaskRecord, state: TaskState) -> dict[str, str]:
    status = "oom" if state.state in OOM_STATES else "error"
    return make_row(Cell(**record.cell), status=status, note=placeholder_note(record, state), host=state.node,
                    job_id=record.job_id, array_index=record.array_index)


#: benchmark cells (:class:`~efficient_attn.harness.executors.task.TaskRequest`, :func:`run_task`)
BENCH = CellKind(task=run_task, placeholder=_bench_placeholder)


@dataclass
class Collected:
    """One look at a run: counts of cells by where they are, the live tasks' ids, what this look merged."""

    done: int = 0
    running: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    not_submitted: int = 0
    new_rows: list[dict[str, str]] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)

    @property
    def live(self) -> int:
        return len(self.running) + len(self.pending)


def _resolved(row: dict[str, str] | None, record: TaskRecord) -> bool:
    """Whether the cell of ``record`` needs nothing more from that task: a real row, or its placeholder."""
    if row is None:
        return False
    return not is_placeholder(row) or placeholder_task(row) == record.task_id


def collect(folder: RunFolder, backend: Backend | None, planned: Collection[tuple[str, ...]], *,
            kind: CellKind = BENCH, ended_once: set[str] | None = None) -> Collected:
    """Merge arrived shards of the ``planned`` keys, then give a row to each current task that ended without one.

    ``ended_once`` carries the tasks seen ended without a shard at the previous look: a task gets its placeholder
    only at the second look that finds it ended and shard-less (a shard written just before the end may take a
    moment to show on a shared file system). None: decide at once (a collector that looks only once).
    With ``backend`` None only the shards are merged.
    """
    ledger = Ledger(folder.path)
    result = Collected()
    latest = {k: r for k, r in ledger.latest().items() if k in planned}
    open_records = [r for k, r in latest.items() if not _resolved(folder.finished.get(k), r)]
    states = backend.states(open_records) if backend is not None and open_records else {}
    merge = folder.merge_shards(allowed=set(planned), replaceable=is_placeholder)
    result.new_rows.extend(merge.merged)
    result.rejected = {str(p): why for p, why in merge.rejected.items()}
    for record in open_records:
        row = folder.finished.get(record.key)
        if _resolved(row, record):
            continue
        state = states.get(record.task_id)
        if state is None:
            result.pending.append(record.task_id)
            continue
        if state.live:
            (result.running if state.state == "RUNNING" else result.pending).append(record.task_id)
            continue
        if ended_once is not None and record.task_id not in ended_once:
            ended_once.add(record.task_id)
            result.running.append(record.task_id)  # ended a moment ago: its shard may still be on its way
            continue
        placeholder = kind.placeholder(record, state)
        if row is None:
            folder.append(placeholder)
        else:
            folder.replace(placeholder)
        result.new_rows.append(placeholder)
    for key in planned:
        row = folder.finished.get(key)
        if row is None:
            if key not in latest:
                result.not_submitted += 1
        elif is_placeholder(row):
            result.failed.append(placeholder_task(row) or "?")
        else:
            result.done += 1
    return result


def _needs_run(row: dict[str, str] | None) -> bool:
    return row is None or is_placeholder(row)


def run_tasks(
    folder: RunFolder,
    planned: Collection[tuple[str, ...]],
    requests: Callable[[tuple[str, ...]], Any],
    options: ExecutorOptions,
    *,
    kind: CellKind = BENCH,
    device: str = "cpu",
    skip_row: Callable[[tuple[str, ...]], dict[str, str] | None] | None = None,
    progress: bool = True,
    on_row: Callable[[dict[str, str]], None] | None = None,
) -> tuple[int, Collected]:
    """Run the cells ``planned`` (their keys) through the executor of ``options`` into ``folder`` (whose lock this
    process holds): collect what an earlier submitter left, submit ``requests(key)`` for each cell with neither a row
    nor a live task (or with a placeholder), then collect until every cell has its row (or return at once with
    ``detach``).

    Args:
        requests: the task request of a cell (what ``kind.task`` runs), by key.
        device: the sweep's device (a CUDA sweep asks Slurm for a GPU per task by default).
        skip_row: a row to record for a cell without running it (e.g. ``skipped_after_oom`` after a known OOM of its
            group), or None to run it.

    Returns:
        ``(rows this call added or replaced, the last look)``.
    """
    planned = list(planned)
    backend = make_backend(options, folder.path / JOBS_DIR, device=device)
    ledger = Ledger(folder.path)
    first = collect(folder, backend, planned, kind=kind)  # what an earlier submitter left
    new_rows = len(first.new_rows)
    live = set(first.running) | set(first.pending)
    live_keys = {r.key for r in ledger.latest().values() if r.task_id in live}
    todo = []
    for key in planned:
        if key in live_keys or not _needs_run(folder.finished.get(key)):
            continue
        row = skip_row(key) if skip_row is not None else None
        if row is not None:
            (folder.append if key not in folder.finished else folder.replace)(row)
            new_rows += 1
            continue
        todo.append(requests(key))
    ledger.append(backend.submit(kind.task, todo))
    if options.detach:
        look = collect(folder, None, planned, kind=kind)
        return new_rows + len(look.new_rows), look
    from tqdm import tqdm

    done = sum(1 for k in planned if k in folder.finished and not _needs_run(folder.finished[k]))
    bar = tqdm(total=len(planned), initial=done, disable=not progress, unit="cell", dynamic_ncols=True,
               file=sys.stderr)
    ended_once: set[str] = set()
    try:
        while True:
            ledger.append(backend.poll())
            look = collect(folder, backend, planned, kind=kind, ended_once=ended_once)
            new_rows += len(look.new_rows)
            for row in look.new_rows:
                if on_row is not None:
                    on_row(row)
            bar.n = sum(1 for k in planned if k in folder.finished)
            bar.set_postfix_str(f"{len(look.running)} running, {len(look.pending) + backend.queued()} pending",
                                refresh=True)
            if look.live == 0 and backend.queued() == 0:
                return new_rows, look
            time.sleep(options.poll_s)
    finally:
        bar.close()


def threads_per_task(options: ExecutorOptions) -> int | None:
    """The threads of each task: ``--threads``, else for ``local`` this machine's CPUs shared among
    ``--max-parallel`` (None: slurm tasks use their allocation's CPUs)."""
    if options.threads is not None or options.name != "local":
        return options.threads
    cpus = len(os.sched_getaffinity(0))
    return max(1, cpus // (options.max_parallel or cpus))


def run_cells(
    folder: RunFolder,
    planned: list[PlannedCell],
    options: ExecutorOptions,
    *,
    budget_gb: float | None,
    timing: Timing,
    seed: int,
    depth: int,
    isolate: bool,
    skip_row: Callable[[PlannedCell], dict[str, str] | None] | None = None,
    progress: bool = True,
    on_row: Callable[[dict[str, str]], None] | None = None,
) -> tuple[int, Collected]:
    """:func:`run_tasks` for benchmark cells: one :class:`~efficient_attn.harness.executors.task.TaskRequest` each."""
    by_key = {p.cell.key(): p for p in planned}
    threads = threads_per_task(options)

    def request(key: tuple[str, ...]) -> TaskRequest:
        p = by_key[key]
        return TaskRequest(
            folder=str(folder.path.resolve()), config_id=folder.config_id, cell=p.cell.to_dict(), cap=p.cap,
            budget_gb=budget_gb, timing=vars(timing).copy(), seed=seed, depth=depth, isolate=isolate,
            threads=threads,
        )

    return run_tasks(
        folder, list(by_key), request, options, kind=BENCH, device=planned[0].cell.device if planned else "cpu",
        skip_row=(lambda key: skip_row(by_key[key])) if skip_row is not None else None, progress=progress,
        on_row=on_row,
    )


def run_sweep_parallel(
    suite: Suite,
    out_dir: Path,
    executor: ExecutorOptions,
    *,
    device: str | None = None,
    include_peers: bool = False,
    isolate: bool = False,
    budget_gb: float | None = None,
    seed: int = 0,
    progress: bool = True,
    on_row: Callable[[dict[str, str]], None] | None = None,
) -> SweepResult:
    """Run (or resume, or collect) ``suite`` into ``out_dir`` through ``executor`` (``local``, ``slurm``).

    The arguments are :func:`~efficient_attn.harness.sweep.run_sweep`'s, and so is the run folder: a run started
    inline may be finished here and the other way round. The budget is taken on each task's allocation. A cell whose
    group already ran out of memory at a shorter length (a row from an earlier session) is ``skipped_after_oom``
    without a task; cells of one submission run side by side, so a longer one is measured (or predicted over the
    budget) even when a shorter one of its group runs out of memory in the same submission.

    Raises:
        ConfigMismatchError, RunFolderBusyError: as for the inline sweep.
        ValueError: the executor cannot run here (no ``sbatch``, a parameter submitit's Slurm executor lacks).
    """
    from efficient_attn.harness.host import budget_bytes, device_memory_bytes, resolve_device
    from efficient_attn.harness.plan import plan_cells
    from efficient_attn.harness.sweep import known_ooms, open_run_folder, sweep_config, sweep_result

    if not executor.parallel:
        raise ValueError("run_sweep_parallel runs --executor local or slurm; inline is run_sweep")
    device = resolve_device(device or suite.device)
    config = sweep_config(suite, device=device, include_peers=include_peers, isolate=isolate, budget_gb=budget_gb,
                          seed=seed)
    folder = open_run_folder(out_dir, config)
    try:
        planned = plan_cells(suite, device, include_peers=include_peers)
        oom_at = known_ooms(planned, folder.finished)
        host = socket.gethostname()

        def skip_row(p: PlannedCell) -> dict[str, str] | None:
            if p.group in oom_at and p.cell.seq_len > oom_at[p.group]:
                return make_row(p.cell, status="skipped_after_oom", host=host,
                                note=f"ran out of memory at seq_len {oom_at[p.group]}")
            return None

        t0 = time.perf_counter()
        resumed = sum(1 for p in planned if p.cell.key() in folder.finished)
        with folder.session() as session:
            session.budget_bytes, session.executor = budget_bytes(budget_gb, device), executor.describe()
            session.device_memory_bytes = device_memory_bytes(device)
            session.cells_run, look = run_cells(
                folder, planned, executor, budget_gb=budget_gb,
                timing=Timing(suite.min_run_time, suite.slow_call_s, suite.slow_repeats, suite.decode_steps), seed=seed,
                depth=suite.depth, isolate=isolate, skip_row=skip_row, progress=progress, on_row=on_row,
            )
        return sweep_result(folder, session.cells_run, resumed, time.perf_counter() - t0, 0.0, len(planned),
                            look.live)
    finally:
        folder.close()
