"""Against a real Slurm (the one the environment reaches, or a one-node Slurm started by the ``slurm`` fixture in
conftest.py through scripts/slurm-local.sh): submitit submits a job array there and gets every task's result back."""

from __future__ import annotations

import operator
import os

import submitit


def test_map_array_returns_every_result_in_order(slurm, tmp_path):
    executor = submitit.AutoExecutor(folder=tmp_path / "jobs", cluster="slurm")
    executor.update_parameters(timeout_min=5, slurm_partition=slurm.partition, cpus_per_task=1,
                               slurm_array_parallelism=4)
    bases, exponents = [2, 3, 5, 7, 11], [10, 3, 2, 1, 0]
    jobs = executor.map_array(operator.pow, bases, exponents)
    # one array: every task shares the array's job id and has its own index
    array_ids = {job.job_id.split("_")[0] for job in jobs}
    assert len(array_ids) == 1
    assert [job.job_id.split("_")[1] for job in jobs] == [str(i) for i in range(len(bases))]
    assert [job.result() for job in jobs] == [b**e for b, e in zip(bases, exponents)]


def test_array_tasks_see_their_own_slurm_index(slurm, tmp_path):
    executor = submitit.AutoExecutor(folder=tmp_path / "jobs", cluster="slurm")
    executor.update_parameters(timeout_min=5, slurm_partition=slurm.partition, cpus_per_task=1)
    jobs = executor.map_array(os.getenv, ["SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_ID"])
    assert [job.result() for job in jobs] == ["0", "1", "2"]
