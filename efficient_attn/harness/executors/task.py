"""What runs on an allocation: one cell, measured alone, its row written to a shard of the run folder.

:func:`run_task` is the function submitit pickles for each array task (or local job): it sets the thread count (the
request's, else the CPUs Slurm gave the task), runs the cell through the same
:func:`efficient_attn.harness.cell.run_cell` as the inline sweep (precheck against a budget taken on the allocation,
then the measurement), stamps the row with where it ran (:func:`where_am_i`) and writes it to a shard
(:func:`efficient_attn.harness.runfolder.write_shard`). The submitter merges the shard; the return value is only a
convenience for submitit's own result file.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["TaskRequest", "allocated_cpus", "cell_digest", "run_task", "where_am_i"]


@dataclass(frozen=True)
class TaskRequest:
    """Everything one task needs (small and picklable: plain values only).

    Attributes:
        folder: the run folder (shared with the submitter: the same path on every node).
        config_id: the run's :func:`~efficient_attn.harness.runfolder.config_id`.
        cell: the cell's fields (:meth:`efficient_attn.harness.plan.Cell.to_dict`).
        cap: the suite's ``max_len`` for the cell's mode.
        budget_gb: the memory budget (None: 80% of what is free on the allocation).
        timing: :class:`efficient_attn.harness.cell.Timing` fields.
        seed, depth, isolate: as for the inline sweep.
        threads: torch threads (None: the CPUs of the allocation).
    """

    folder: str
    config_id: str
    cell: dict[str, Any]
    cap: int | None
    budget_gb: float | None
    timing: dict[str, Any]
    seed: int = 0
    depth: int = 2
    isolate: bool = False
    threads: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, ...]:
        """The cell's key (its configuration columns as written)."""
        from efficient_attn.harness.plan import Cell

        return Cell(**self.cell).key()


def cell_digest(key: tuple[str, ...]) -> str:
    """A short stable name for a cell key (shard file names)."""
    return hashlib.sha256("\x1f".join(key).encode()).hexdigest()[:16]


def where_am_i() -> tuple[str, str, str]:
    """``(host, job_id, array_index)`` of this process: a Slurm array task's array job id and index, a plain Slurm
    job's id, a submitit local job's id, or empty for a process no scheduler started."""
    host = socket.gethostname()
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return host, env["SLURM_ARRAY_JOB_ID"], env["SLURM_ARRAY_TASK_ID"]
    if env.get("SLURM_JOB_ID"):
        return host, env["SLURM_JOB_ID"], ""
    if env.get("SUBMITIT_LOCAL_JOB_ID"):
        return host, env["SUBMITIT_LOCAL_JOB_ID"], ""
    return host, "", ""


def allocated_cpus() -> int:
    """The CPUs this process may use: Slurm's ``SLURM_CPUS_PER_TASK``, else its CPU affinity."""
    value = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if value.isdigit() and int(value) > 0:
        return int(value)
    return max(1, len(os.sched_getaffinity(0)))


def run_task(request: TaskRequest) -> dict[str, str]:
    """Run one cell and write its row to a shard of ``request.folder``; returns the row."""
    import torch

    from efficient_attn.harness.cell import Timing, run_cell
    from efficient_attn.harness.host import budget_bytes
    from efficient_attn.harness.plan import Cell, PlannedCell
    from efficient_attn.harness.runfolder import write_shard
    from efficient_attn.harness.schema import ALL_COLUMNS
    from efficient_attn.harness.worker import measure_isolated

    started = time.time()
    host, job_id, array_index = where_am_i()
    threads = request.threads or allocated_cpus()
    torch.set_num_threads(threads)
    planned = PlannedCell(Cell(**request.cell), request.cap)
    row, window_s = run_cell(
        planned, budget_bytes=budget_bytes(request.budget_gb, planned.cell.device), timing=Timing(**request.timing),
        seed=request.seed, depth=request.depth, measure=measure_isolated if request.isolate else None,
    )
    row.update(host=host, job_id=job_id, array_index=array_index)
    attempt = f"{job_id or 'nojob'}_{array_index or 0}.{os.getpid()}.{int(started * 1e3)}"
    write_shard(Path(request.folder), row, config=request.config_id, columns=ALL_COLUMNS,
                name=f"{cell_digest(planned.cell.key())}.{attempt}",
                extra={"started": started, "ended": time.time(), "threads": threads, "window_s": window_s})
    return row
