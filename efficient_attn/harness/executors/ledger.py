"""The run folder's record of submitted tasks (``jobs.jsonl``): which job and array index runs which cell.

The submitter appends one line per task as it submits (fsync'ed), so a rerun after the submitter was killed finds
the running or finished jobs and collects them instead of submitting the cells again. The latest line for a cell
is its current attempt. A torn last line (the submitter died while writing it) is ignored: that task's shard is
still merged when it comes (shards name their cell), and its cell counts as not submitted.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["LEDGER_FILE", "Ledger", "TaskRecord"]

LEDGER_FILE = "jobs.jsonl"


@dataclass(frozen=True)
class TaskRecord:
    """One submitted task.

    Attributes:
        task_id: the scheduler's id of the task (``<array job>_<index>`` on Slurm, the job id elsewhere).
        job_id, array_index: the two parts (``array_index`` empty outside an array).
        executor: ``slurm``, ``local`` or ``debug``.
        key: the cell's key (its configuration columns as written).
        cell, cap: the cell (:meth:`~efficient_attn.harness.plan.Cell.to_dict`) and its ``max_len``, so a collector
            can write the row of a task that never wrote one.
        submitted: wall-clock time of the submission (s since the epoch).
    """

    task_id: str
    job_id: str
    array_index: str
    executor: str
    key: tuple[str, ...]
    cell: dict[str, Any]
    cap: int | None
    submitted: float


class Ledger:
    """``jobs.jsonl`` of one run folder (written only by the holder of the folder's lock)."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LEDGER_FILE

    def append(self, records: list[TaskRecord]) -> None:
        """Record submitted tasks (one line each, flushed and fsync'ed before returning)."""
        if not records:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(asdict(record), sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def records(self) -> list[TaskRecord]:
        """Every whole line, in submission order."""
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                data = json.loads(line)
                data["key"] = tuple(data["key"])
                records.append(TaskRecord(**data))
            except (ValueError, TypeError, KeyError):
                continue  # torn or foreign line
        return records

    def latest(self) -> dict[tuple[str, ...], TaskRecord]:
        """The current attempt of each submitted cell."""
        return {record.key: record for record in self.records()}
