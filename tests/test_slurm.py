"""Against a real Slurm (the one the environment reaches, or a one-node Slurm started by the ``slurm`` fixture in
conftest.py through scripts/slurm-local.sh): submitit's job arrays there, and ``effattn bench --executor slurm``:
12 cells as one array give the inline run's cells, keys and statuses; a task cancelled with scancel is recorded
with its Slurm state and resubmitted by a rerun; a submitter killed with SIGKILL is collected by its rerun, every
cell exactly once."""

from __future__ import annotations

import json
import operator
import signal
import subprocess
import sys
import time

import submitit

from efficient_attn import cli
from efficient_attn.harness.executors.driver import is_placeholder
from efficient_attn.harness.executors.ledger import Ledger
from efficient_attn.harness.runfolder import read_rows
from efficient_attn.harness.schema import CONFIG_COLUMNS


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


# --------------------------------------------------------------------------------- effattn bench --executor slurm
# 12 fast cells: full attention (naive, sdpa) x fwd, fwd_bwd x 3 lengths
CELLS_12 = ["quick", "--lengths", "32,64,128", "--min-run-time", "0.01", "--no-progress"]


def bench_cmd(out, cells, *options):
    return [sys.executable, "-m", "efficient_attn.cli", "bench", *cells, "--out", str(out), *options]


def slurm_options(slurm):
    return ["--executor", "slurm", "--slurm-partition", slurm.partition, "--slurm-time", "5"]


def by_key(rows):
    keyed = {}
    for row in rows:
        key = tuple(row[c] for c in CONFIG_COLUMNS)
        assert key not in keyed, f"cell {key} has two rows"
        keyed[key] = row
    return keyed


def wait_for_records(out, count, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = Ledger(out).records()
        if len(records) >= count:
            return records
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"the submitter recorded no {count} tasks in {timeout} s")


def wait_for_state(task_id, state, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", task_id.split("_")[0], "-o", "%i %T"],
                             capture_output=True, text=True).stdout.split()
        if task_id in out and out[out.index(task_id) + 1] == state:
            return
        time.sleep(0.05)
    raise AssertionError(f"task {task_id} not {state} within {timeout} s")


def test_a_job_array_sweep_matches_inline_and_a_cancelled_task_is_recorded_then_resubmitted(slurm, tmp_path, capsys):
    assert cli.main(["bench", *CELLS_12, "--out", str(tmp_path / "inline")]) == 0
    inline = by_key(read_rows(tmp_path / "inline" / "results.csv"))
    assert len(inline) == 12
    out = tmp_path / "slurm"
    command = bench_cmd(out, CELLS_12, *slurm_options(slurm), "--max-parallel", "6")
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    records = wait_for_records(out, 12, proc)
    assert len({r.job_id for r in records}) == 1 and [r.array_index for r in records] == [str(i) for i in range(12)]
    # cancel the first task once it runs (while Python and torch start, seconds before its cell is measured)
    victim = records[0]
    wait_for_state(victim.task_id, "RUNNING")
    subprocess.run(["scancel", victim.task_id], check=True)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 1, err  # a cell ended in error: the cancelled one
    rows = by_key(read_rows(out / "results.csv"))
    assert set(rows) == set(inline)
    cancelled = rows[victim.key]
    assert cancelled["status"] == "error" and "CANCELLED" in cancelled["note"] and is_placeholder(cancelled)
    assert (cancelled["job_id"], cancelled["array_index"]) == (victim.job_id, "0")
    others = {k: r for k, r in rows.items() if k != victim.key}
    assert {k: r["status"] for k, r in others.items()} == {k: inline[k]["status"] for k in others}
    assert {(r["job_id"], r["host"] != "") for r in others.values()} == {(victim.job_id, True)}
    assert sorted(int(r["array_index"]) for r in others.values()) == list(range(1, 12))
    # status tells the same from the run folder and Slurm
    assert cli.main(["status", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "11 done" in printed and f"1 failed ({victim.task_id})" in printed and "0 not submitted" in printed
    # the rerun (in this process) resubmits exactly the cancelled cell; its new row replaces the placeholder
    assert cli.main(command[3:]) == 0
    rows = by_key(read_rows(out / "results.csv"))
    assert {k: r["status"] for k, r in rows.items()} == {k: r["status"] for k, r in inline.items()}
    records = Ledger(out).records()
    assert len(records) == 13 and records[-1].key == victim.key and records[-1].job_id != victim.job_id
    assert rows[victim.key]["job_id"] == records[-1].job_id
    sessions = json.loads((out / "meta.json").read_text())["sessions"]
    assert [s["executor"]["name"] for s in sessions] == ["slurm", "slurm"]
    assert sessions[0]["executor"]["max_parallel"] == 6 and sessions[0]["executor"]["partition"] == slurm.partition


def test_a_submitter_killed_mid_sweep_is_collected_by_the_rerun_exactly_once(slurm, tmp_path):
    cells = ["quick", "--lengths", "32,64", "--modes", "fwd", "--min-run-time", "0.01", "--no-progress"]  # 4 cells
    out = tmp_path / "run"
    command = bench_cmd(out, cells, *slurm_options(slurm))
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = wait_for_records(out, 4, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(read_rows(out / "results.csv")) < 4  # killed before it collected everything
    # a detached rerun collects what has finished and submits nothing: the other tasks are live
    assert cli.main([*command[3:], "--detach"]) == 0
    assert len(Ledger(out).records()) == 4
    assert cli.main(command[3:]) == 0  # the rerun, in this process: waits for the live tasks and collects them
    rows = by_key(read_rows(out / "results.csv"))
    assert len(rows) == 4 and {r["status"] for r in rows.values()} == {"ok"}
    # nothing was submitted again: every row comes from the first array
    assert len(Ledger(out).records()) == 4
    assert {(r["job_id"], r["array_index"]) for r in rows.values()} == {(r.job_id, r.array_index) for r in records}
