"""Executors: where a sweep's cells run.

* ``inline`` (the default): one after the other in this process (or one fresh subprocess each with ``--isolate``),
  each row appended to ``results.csv`` as its cell ends (:func:`efficient_attn.harness.sweep.run_sweep`).
* ``local``: parallel subprocesses on this machine through submitit's local executor, at most ``max_parallel`` at a
  time, ``threads`` torch threads each (default: the CPUs shared out among them). For a sweep of slow cells on a
  many-core machine; cells share the machine, so their timings interfere as much as the thread counts allow.
* ``slurm``: the whole sweep as one Slurm job array through submitit (``map_array``), one cell per task, each alone
  on its allocation (its CPUs set the thread count, one GPU on a GPU sweep); the array's concurrency limit is
  ``max_parallel``. For sweeps that outgrow one machine.

``local`` and ``slurm`` tasks write their rows to shards in the run folder; the submitting process merges them into
``results.csv`` as they finish (:mod:`efficient_attn.harness.executors.driver`). :class:`ExecutorOptions` is what
the command line chose; it is recorded with each session in ``meta.json`` (outside the config key).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from efficient_attn.errors import did_you_mean, require_positive_int

__all__ = ["EXECUTORS", "ExecutorOptions", "parse_slurm_params"]

#: executor names accepted by ``--executor`` (``debug`` runs the tasks in this process through submitit's debug
#: executor: the plumbing of ``local`` and ``slurm`` without processes, for tests)
EXECUTORS: tuple[str, ...] = ("inline", "local", "slurm")
_ALL_EXECUTORS = EXECUTORS + ("debug",)


@dataclass(frozen=True)
class ExecutorOptions:
    """How a sweep runs its cells (see the module docstring).

    Attributes:
        name: ``inline``, ``local``, ``slurm`` (or ``debug``).
        threads: torch threads per cell (None: inline keeps this process's; local shares the CPUs out among
            ``max_parallel``; slurm uses the task's CPUs).
        max_parallel: cells running at once (local), the array's concurrency limit (slurm; None: no limit).
        partition: Slurm partition (None: the cluster's default).
        time_min: Slurm time limit per task, minutes; also the local executor's timeout.
        gpus_per_job: GPUs per task (None: 1 for a CUDA sweep, else 0).
        cpus_per_job: CPUs per task (None: ``threads``, else 1).
        slurm_params: anything else submitit's Slurm executor accepts (``mem``, ``constraint``, ``account``, ...).
        detach: submit and return (slurm only); a later ``effattn bench --out RUN`` or ``effattn status RUN``
            collects.
        poll_s: seconds between looks at the shards and the scheduler.
    """

    name: str = "inline"
    threads: int | None = None
    max_parallel: int | None = None
    partition: str | None = None
    time_min: int = 60
    gpus_per_job: int | None = None
    cpus_per_job: int | None = None
    slurm_params: dict[str, Any] = field(default_factory=dict)
    detach: bool = False
    poll_s: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in _ALL_EXECUTORS:
            raise ValueError(f"--executor must be one of {', '.join(EXECUTORS)}; got {self.name!r}"
                             f"{did_you_mean(self.name, EXECUTORS)}")
        for name in ("threads", "max_parallel", "cpus_per_job"):
            value = getattr(self, name)
            if value is not None:
                require_positive_int(f"--{name.replace('_', '-')}", value)
        require_positive_int("--slurm-time", self.time_min)
        if self.gpus_per_job is not None and (not isinstance(self.gpus_per_job, int) or self.gpus_per_job < 0):
            raise ValueError(f"--slurm-gpus-per-job must be an integer >= 0; got {self.gpus_per_job!r}")
        if self.detach and self.name != "slurm":
            raise ValueError("--detach needs --executor slurm (inline and local cells run under this process, "
                             "which starts local tasks as others end)")

    @property
    def parallel(self) -> bool:
        """Whether cells run outside this process (and come back as shards)."""
        return self.name != "inline"

    def describe(self) -> dict[str, Any]:
        """What ``meta.json`` records for the session (JSON-serialisable)."""
        record = dataclasses.asdict(self)
        record.pop("poll_s")
        if self.name in ("inline", "local", "debug"):
            for name in ("partition", "gpus_per_job", "cpus_per_job", "slurm_params"):
                record.pop(name)
        return json.loads(json.dumps(record))


def parse_slurm_params(items: list[str]) -> dict[str, Any]:
    """``--slurm-param KEY=VALUE`` items -> a dict (VALUE is JSON when it parses, else the string).

    Raises:
        ValueError: an item without ``=`` or with an empty key.
    """
    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--slurm-param expects KEY=VALUE (e.g. mem=16G); got {item!r}")
        try:
            params[key.strip()] = json.loads(value)
        except ValueError:
            params[key.strip()] = value
    return params
