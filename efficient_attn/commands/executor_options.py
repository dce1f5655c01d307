"""The executor options shared by ``effattn bench`` and ``effattn quality``: where the cells run
(:mod:`efficient_attn.harness.executors`). Building the parser imports nothing of the harness: ``--executor`` is
checked by :class:`~efficient_attn.harness.executors.ExecutorOptions` when the command runs.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from efficient_attn.commands.options import nonnegative_int, positive_int

if TYPE_CHECKING:
    from efficient_attn.harness.executors import ExecutorOptions

__all__ = ["add_executor_options", "executor_from_args"]


def add_executor_options(parser: argparse.ArgumentParser, *, threads: bool = True) -> None:
    """Where the cells run: ``--executor`` and its options (see :mod:`efficient_attn.harness.executors`);
    ``threads=False`` for a command that has its own ``--threads`` (``effattn quality``)."""
    group = parser.add_argument_group("executor (where the cells run)")
    # checked by ExecutorOptions (its names live with the executors, which building the parser must not import)
    group.add_argument("--executor", default="inline",
                       help="inline: one after the other in this process (default); local: parallel subprocesses "
                            "here; slurm: one Slurm job array, a cell per task")
    if threads:
        group.add_argument("--threads", type=positive_int, help="torch threads per cell (default: inline keeps the "
                           "current count, local shares the CPUs among --max-parallel, slurm uses each task's CPUs)")
    group.add_argument("--max-parallel", type=positive_int, help="cells at once (local; default: one per CPU) or the "
                       "job array's concurrency limit (slurm; default: none)")
    group.add_argument("--slurm-partition", help="partition (default: the cluster's default)")
    group.add_argument("--slurm-time", type=positive_int, default=60,
                       help="time limit per task in minutes (default 60)")
    group.add_argument("--slurm-gpus-per-job", type=nonnegative_int,
                       help="GPUs per task (default: 1 for a CUDA sweep, else 0)")
    group.add_argument("--slurm-cpus-per-job", type=positive_int, help="CPUs per task (default: --threads, else 1)")
    group.add_argument("--slurm-param", action="append", default=[], metavar="KEY=VALUE",
                       help="any other parameter of submitit's Slurm executor, e.g. mem=16G, constraint=a100, "
                            "account=proj (VALUE is JSON when it parses); repeatable")
    group.add_argument("--detach", action="store_true", help="submit and return (slurm); collect later with "
                       "`effattn status RUN` or the same command again")


def executor_from_args(args: argparse.Namespace) -> ExecutorOptions:
    """The :class:`~efficient_attn.harness.executors.ExecutorOptions` of the command line.

    Raises:
        ValueError: a bad value (which option, what is allowed).
    """
    from efficient_attn.harness.executors import ExecutorOptions, parse_slurm_params

    return ExecutorOptions(
        name=args.executor, threads=args.threads, max_parallel=args.max_parallel, partition=args.slurm_partition,
        time_min=args.slurm_time, gpus_per_job=args.slurm_gpus_per_job, cpus_per_job=args.slurm_cpus_per_job,
        slurm_params=parse_slurm_params(args.slurm_param), detach=args.detach,
    )
