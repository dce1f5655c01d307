"""``effattn status RUN``: where a run's cells are, from the run folder and the scheduler; collects when it may.

The cells are the run's plan (rebuilt from the configuration in ``meta.json``); each is **done** (a row from a
measurement), **failed** (a row for a task that ended without a result: killed, cancelled, timed out), **running**
or **pending** (its latest task in ``jobs.jsonl`` is live on the scheduler), or **not submitted**. When no other
process holds the folder's lock, status also collects (:func:`~efficient_attn.harness.executors.driver.collect`):
the shards that arrived are merged and the tasks that ended without one get their row, as a waiting submitter would.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from efficient_attn.harness.executors.backends import Backend, LocalBackend, SlurmBackend
from efficient_attn.harness.executors.driver import JOBS_DIR, Collected, collect, is_placeholder, placeholder_task
from efficient_attn.harness.executors.ledger import Ledger
from efficient_attn.harness.plan import PlannedCell, plan_cells
from efficient_attn.harness.runfolder import RunFolderBusyError, lock_holder, read_rows
from efficient_attn.harness.schema import CONFIG_COLUMNS, META_FILE, RESULTS_FILE

__all__ = ["RunStatus", "planned_from_config", "run_status"]


@dataclass
class RunStatus:
    """Where every planned cell of a run is (see the module docstring)."""

    folder: Path
    planned: int
    done: int
    failed: list[str]
    running: list[str]
    pending: list[str]
    not_submitted: int
    statuses: dict[str, int] = field(default_factory=dict)
    merged_now: int = 0
    busy: str | None = None  # who holds the lock when status could not collect

    def lines(self) -> list[str]:
        """The human summary."""
        def ids(tasks: list[str]) -> str:
            shown = ", ".join(tasks[:8]) + (", ..." if len(tasks) > 8 else "")
            return f" ({shown})" if tasks else ""

        out = [
            f"{self.folder}: {self.planned} cells: {self.done} done, {len(self.running)} running{ids(self.running)}, "
            f"{len(self.pending)} pending{ids(self.pending)}, {len(self.failed)} failed{ids(self.failed)}, "
            f"{self.not_submitted} not submitted",
        ]
        if self.statuses:
            out.append("rows by status: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items())))
        if self.busy:
            out.append(f"not collected now: {self.busy}")
        elif self.merged_now:
            out.append(f"collected {self.merged_now} new rows into {self.folder / RESULTS_FILE}")
        return out


def planned_from_config(config: dict[str, Any]) -> list[PlannedCell]:
    """The cells of a benchmark run, from its ``meta.json`` config (the suite's fields plus the sweep's)."""
    from efficient_attn.harness.suite import Suite, parse_suite

    names = {f.name for f in dataclasses.fields(Suite)} - {"name"}
    suite = parse_suite({k: v for k, v in config.items() if k in names}, name=config.get("name", "run"))
    return plan_cells(suite, config["device"], include_peers=bool(config.get("include_peers")))


def _backend(records: list[Any], folder: Path) -> Backend | None:
    executors = {r.executor for r in records}
    if "slurm" in executors:
        return SlurmBackend.for_queries(folder / JOBS_DIR)
    if "local" in executors:
        return LocalBackend.for_queries()
    return None


def run_status(path: Path, *, collect_now: bool = True) -> RunStatus:
    """Where the cells of the run in ``path`` are; with ``collect_now`` (and the lock free) collect first.

    Raises:
        ValueError: ``path`` is not a benchmark run folder (no ``meta.json``, or not a benchmark config).
    """
    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise ValueError(f"{path} is not a run folder: it has no {META_FILE}")
    try:
        config = json.loads(meta_path.read_text())["config"]
        planned = {p.cell.key(): p for p in planned_from_config(config)}
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{meta_path} does not describe a benchmark run ({type(error).__name__}: {error})") from None
    ledger = Ledger(path)
    backend = _backend(ledger.records(), path)
    busy, look = None, None
    if collect_now:
        from efficient_attn.harness.sweep import open_run_folder

        try:
            folder = open_run_folder(path, config)
        except RunFolderBusyError:
            holder = lock_holder(path) or {}
            busy = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} is writing this run"
        else:
            try:
                look = collect(folder, backend, planned)
            finally:
                folder.close()
    if look is None:
        look = _look_only(path, ledger, backend, planned)
    rows = [r for r in read_rows(path / RESULTS_FILE) if tuple(r[c] for c in CONFIG_COLUMNS) in planned]
    statuses: dict[str, int] = {}
    for row in rows:
        statuses[row["status"]] = statuses.get(row["status"], 0) + 1
    return RunStatus(folder=path, planned=len(planned), done=look.done, failed=look.failed, running=look.running,
                     pending=look.pending, not_submitted=look.not_submitted, statuses=statuses,
                     merged_now=len(look.new_rows), busy=busy)


def _look_only(path: Path, ledger: Ledger, backend: Backend | None,
               planned: dict[tuple[str, ...], PlannedCell]) -> Collected:
    """What :func:`collect` would count, reading only (another process holds the lock)."""
    rows = {tuple(r[c] for c in CONFIG_COLUMNS): r for r in read_rows(path / RESULTS_FILE)}
    latest = ledger.latest()
    look = Collected()
    open_records = [r for k, r in latest.items() if k in planned and (k not in rows or is_placeholder(rows[k]))]
    states = backend.states(open_records) if backend is not None and open_records else {}
    live = set()
    for record in open_records:
        state = states.get(record.task_id)
        if state is not None and state.live:
            (look.running if state.state == "RUNNING" else look.pending).append(record.task_id)
            live.add(record.key)
    for key in planned:
        row = rows.get(key)
        if row is None:
            if key not in latest:
                look.not_submitted += 1
        elif is_placeholder(row):
            if key not in live:
                look.failed.append(placeholder_task(row) or "?")
        else:
            look.done += 1
    return look
