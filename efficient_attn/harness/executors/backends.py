"""The schedulers behind the ``local``, ``slurm`` and ``debug`` executors, through submitit.

Each backend submits a task function (:func:`~efficient_attn.harness.executors.task.run_task` for benchmark cells)
for a list of requests (each with its ``cell`` dict and ``key``) and answers what state each submitted task is in
(:meth:`states`): live (pending, running, completing, requeued) or ended, with the scheduler's final state.

* :class:`SlurmBackend`: one job array (``map_array``) per submission; states from ``squeue`` (every state, array
  tasks expanded), then ``sacct`` for the tasks ``squeue`` no longer shows, then the task's log (Slurm writes
  ``CANCELLED``, ``DUE TO TIME LIMIT`` there) when there is no accounting.
* :class:`LocalBackend`: submitit's local executor, one subprocess per cell, at most ``max_parallel`` at a time (the
  rest wait in this process and are submitted as others end).
* :class:`DebugBackend`: submitit's debug executor, the tasks run in this process one per :meth:`poll`: the plumbing
  of the others without processes, for tests.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from efficient_attn.harness.executors import ExecutorOptions
from efficient_attn.harness.executors.ledger import TaskRecord

__all__ = ["LIVE_STATES", "Backend", "DebugBackend", "LocalBackend", "SlurmBackend", "TaskState", "make_backend"]

#: Slurm states of a task that may still write its shard
LIVE_STATES = frozenset({
    "PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING",
    "SUSPENDED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "QUEUED",
})


@dataclass(frozen=True)
class TaskState:
    """A task's state as the scheduler tells it: ``state`` (Slurm's word, e.g. ``RUNNING``, ``CANCELLED``,
    ``TIMEOUT``, ``OUT_OF_MEMORY``; ``UNKNOWN`` when nobody knows), where it ran, and whether it is still live."""

    state: str
    node: str = ""

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES


def _record(request: Any, executor: str, job_id: str, array_index: str, task_id: str) -> TaskRecord:
    return TaskRecord(task_id=task_id, job_id=job_id, array_index=array_index, executor=executor,
                      key=tuple(request.key), cell=request.cell, cap=getattr(request, "cap", None),
                      submitted=time.time())


class Backend:
    """What the driver needs from a scheduler."""

    name = "?"

    def submit(self, task: Callable[[Any], Any], requests: list[Any]) -> list[TaskRecord]:
        """Submit (or queue) ``task(request)`` for each request; returns the records of those submitted now."""
        raise NotImplementedError

    def poll(self) -> list[TaskRecord]:
        """Move work along (start queued local tasks, run a debug task); returns records of tasks started now."""
        return []

    def queued(self) -> int:
        """Tasks accepted but not yet handed to the scheduler."""
        return 0

    def states(self, records: list[TaskRecord]) -> dict[str, TaskState]:
        """State of each task, by ``task_id``."""
        raise NotImplementedError

    def cancel(self, records: list[TaskRecord]) -> None:
        """Cancel live tasks (Ctrl-C on a waiting submitter does not: the tasks go on, a rerun collects them)."""


# --------------------------------------------------------------------------------------------------------- slurm
def _run(command: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None


_LOG_STATES = (
    (re.compile(r"DUE TO TIME LIMIT"), "TIMEOUT"),
    (re.compile(r"DUE TO PREEMPTION"), "PREEMPTED"),
    (re.compile(r"DUE TO NODE FAILURE|NODE_FAIL"), "NODE_FAIL"),
    (re.compile(r"oom[-_]kill|Out Of Memory|OUT_OF_MEMORY", re.IGNORECASE), "OUT_OF_MEMORY"),
    (re.compile(r"CANCELLED AT"), "CANCELLED"),
)


class SlurmBackend(Backend):
    """A Slurm cluster through submitit's Slurm executor (``sbatch --array``)."""

    name = "slurm"

    @classmethod
    def for_queries(cls, jobs_dir: Path) -> "SlurmBackend":
        """A backend that only answers :meth:`states` (``effattn status``): no executor, no parameters."""
        backend = cls.__new__(cls)
        backend.jobs_dir = Path(jobs_dir)
        return backend

    def __init__(self, options: ExecutorOptions, jobs_dir: Path, *, device: str) -> None:
        import submitit

        if shutil.which("sbatch") is None:
            raise ValueError("--executor slurm needs Slurm's sbatch on PATH (is this a Slurm login node?); "
                             "scripts/slurm-local.sh start brings up a one-node Slurm here")
        self.jobs_dir = Path(jobs_dir)
        self.executor = submitit.SlurmExecutor(folder=str(self.jobs_dir / "%j"), python=sys.executable)
        gpus = options.gpus_per_job if options.gpus_per_job is not None else (1 if device == "cuda" else 0)
        params: dict[str, Any] = {
            "time": options.time_min,
            "cpus_per_task": options.cpus_per_job or options.threads or 1,
            "job_name": "effattn",
        }
        if gpus:
            params["gpus_per_node"] = gpus
        if options.partition:
            params["partition"] = options.partition
        if options.max_parallel:
            params["array_parallelism"] = options.max_parallel
        from efficient_attn.errors import check_parameter_names

        try:
            check_parameter_names(options.slurm_params, sorted(submitit.SlurmExecutor._valid_parameters()),
                                  "--slurm-param (submitit's Slurm executor)")
        except TypeError as error:
            raise ValueError(str(error)) from None
        params.update(options.slurm_params)
        self.executor.update_parameters(**params)

    def submit(self, task: Callable[[Any], Any], requests: list[Any]) -> list[TaskRecord]:
        if not requests:
            return []
        jobs = self.executor.map_array(task, requests)
        records = []
        for request, job in zip(requests, jobs):
            array_id, _, index = job.job_id.partition("_")
            records.append(_record(request, self.name, array_id, index, job.job_id))
        return records

    def states(self, records: list[TaskRecord]) -> dict[str, TaskState]:
        wanted = {r.task_id for r in records}
        if not wanted:
            return {}
        arrays = sorted({r.job_id for r in records})
        found: dict[str, TaskState] = {}
        out = _run(["squeue", "-h", "-r", "-t", "all", "-j", ",".join(arrays), "-o", "%i|%T|%N"])
        if out is None or (out.returncode != 0 and not out.stdout.strip() and "Invalid job id" not in out.stderr):
            # the controller does not answer: say nothing is known to have ended
            return {task: TaskState("UNREACHABLE_ASSUMED_LIVE") for task in wanted}
        for line in out.stdout.splitlines():
            task, _, rest = line.strip().partition("|")
            state, _, node = rest.partition("|")
            if task in wanted:
                found[task] = TaskState(state.split()[0] if state else "UNKNOWN", node)
        missing = wanted - set(found)
        if missing and shutil.which("sacct"):
            out = _run(["sacct", "-n", "-P", "-X", "-j", ",".join(sorted(missing)), "-o", "JobID,State,NodeList"])
            if out is not None and out.returncode == 0:
                for line in out.stdout.splitlines():
                    parts = line.strip().split("|")
                    if len(parts) >= 2 and parts[0] in missing:
                        found[parts[0]] = TaskState(parts[1].split()[0], parts[2] if len(parts) > 2 else "")
        for task in wanted - set(found):
            found[task] = TaskState(self._state_from_log(task))
        # a task squeue marks live keeps that; one it lists twice (requeued) is taken at its latest line
        return found

    def _state_from_log(self, task_id: str) -> str:
        for log in sorted((self.jobs_dir / task_id).glob("*_log.err")):
            text = log.read_text(errors="replace")[-20000:]
            for pattern, state in _LOG_STATES:
                if pattern.search(text):
                    return state
        return "UNKNOWN"

    def cancel(self, records: list[TaskRecord]) -> None:
        if records:
            _run(["scancel", *sorted({r.task_id for r in records})])


# --------------------------------------------------------------------------------------------------------- local
def _pid_alive(pid: str) -> bool:
    return pid.isdigit() and os.path.exists(f"/proc/{pid}")


class LocalBackend(Backend):
    """Parallel subprocesses on this machine (submitit's local executor), at most ``max_parallel`` at a time."""

    name = "local"

    @classmethod
    def for_queries(cls) -> "LocalBackend":
        """A backend that only answers :meth:`states` of tasks started by another process (alive or not)."""
        backend = cls.__new__(cls)
        backend._jobs, backend._waiting = {}, []
        return backend

    def __init__(self, options: ExecutorOptions, jobs_dir: Path) -> None:
        import submitit

        self.executor = submitit.LocalExecutor(folder=str(Path(jobs_dir) / "%j"), python=sys.executable)
        self.executor.update_parameters(timeout_min=options.time_min)
        self.max_parallel = options.max_parallel or max(1, len(os.sched_getaffinity(0)))
        self._waiting: list[tuple[Callable[[Any], Any], Any]] = []
        self._jobs: dict[str, Any] = {}  # task id -> submitit job of this process

    def submit(self, task: Callable[[Any], Any], requests: list[Any]) -> list[TaskRecord]:
        self._waiting.extend((task, request) for request in requests)
        return self.poll()

    def queued(self) -> int:
        return len(self._waiting)

    def _running(self) -> int:
        return sum(1 for job in self._jobs.values() if job.state == "RUNNING")

    def poll(self) -> list[TaskRecord]:
        started = []
        free = self.max_parallel - self._running()
        while self._waiting and free > 0:
            task, request = self._waiting.pop(0)
            job = self.executor.submit(task, request)
            self._jobs[job.job_id] = job
            started.append(_record(request, self.name, job.job_id, "", job.job_id))
            free -= 1
        return started

    def states(self, records: list[TaskRecord]) -> dict[str, TaskState]:
        states = {}
        for record in records:
            job = self._jobs.get(record.task_id)
            if job is not None:
                state = job.state
                states[record.task_id] = TaskState("RUNNING" if state == "RUNNING" else
                                                   "COMPLETED" if state == "FINISHED" else "FAILED")
            else:  # started by an earlier submitter: alive while its process is
                states[record.task_id] = TaskState("RUNNING" if _pid_alive(record.job_id) else "UNKNOWN")
        return states

    def cancel(self, records: list[TaskRecord]) -> None:
        for record in records:
            job = self._jobs.get(record.task_id)
            if job is not None:
                job.cancel(check=False)


# --------------------------------------------------------------------------------------------------------- debug
class DebugBackend(Backend):
    """submitit's debug executor: each task runs in this process, one per :meth:`poll` (tests of the plumbing)."""

    name = "debug"

    def __init__(self, options: ExecutorOptions, jobs_dir: Path) -> None:
        import submitit

        self.executor = submitit.DebugExecutor(folder=str(jobs_dir))
        self._jobs: dict[str, Any] = {}

    def submit(self, task: Callable[[Any], Any], requests: list[Any]) -> list[TaskRecord]:
        records = []
        for request in requests:
            job = self.executor.submit(task, request)
            self._jobs[job.job_id] = job
            records.append(_record(request, self.name, job.job_id, "", job.job_id))
        return records

    def poll(self) -> list[TaskRecord]:
        for job in self._jobs.values():
            if job.state == "QUEUED":
                job.result()
                break
        return []

    def states(self, records: list[TaskRecord]) -> dict[str, TaskState]:
        states = {}
        for record in records:
            job = self._jobs.get(record.task_id)
            state = "UNKNOWN" if job is None else {"DONE": "COMPLETED", "QUEUED": "PENDING"}.get(job.state, job.state)
            states[record.task_id] = TaskState(state)
        return states


def make_backend(options: ExecutorOptions, jobs_dir: Path, *, device: str) -> Backend:
    """The backend of ``options.name`` (``local``, ``slurm`` or ``debug``)."""
    if options.name == "slurm":
        return SlurmBackend(options, jobs_dir, device=device)
    if options.name == "local":
        return LocalBackend(options, jobs_dir)
    if options.name == "debug":
        return DebugBackend(options, jobs_dir)
    raise ValueError(f"executor {options.name!r} has no backend (inline runs in the sweep itself)")
