"""Executors without a cluster: the shard merge of the run folder (duplicated, torn, foreign shards; a merge cut
short; placeholders replaced), the ``debug`` executor (submitit's, in this process) against the inline sweep, the
``local`` executor's parallel subprocesses, tasks that ended without a result, older results schemas, CLI options."""

import dataclasses
import json
import os
import socket

import pytest

from efficient_attn import cli
from efficient_attn.harness.executors import ExecutorOptions, parse_slurm_params
from efficient_attn.harness.executors.driver import ENDED_NOTE, is_placeholder, run_sweep_parallel
from efficient_attn.harness.executors.ledger import Ledger, TaskRecord
from efficient_attn.harness.plan import plan_cells
from efficient_attn.harness.runfolder import SHARDS_DIR, RunFolder, config_id, read_rows, write_shard
from efficient_attn.harness.schema import ALL_COLUMNS, COLUMNS_BY_VERSION, CONFIG_COLUMNS, RUN_COLUMNS, SCHEMA_VERSION
from efficient_attn.harness.sweep import open_run_folder, run_sweep
from efficient_attn.harness.suite import parse_suite

COLUMNS = ("task", "seed", "status", "note", "value")
KEYS = ("task", "seed")
CONFIG = {"steps": 3}


def table(path, config=CONFIG):
    return RunFolder(path, config, columns=COLUMNS, key_columns=KEYS, schema_version=1, environment={})


def row(seed, value="1", status="ok", note=""):
    return {"task": "recall", "seed": str(seed), "status": status, "note": note, "value": value}


def shard(folder, r, name, config=CONFIG, columns=COLUMNS):
    return write_shard(folder, r, config=config_id(config), columns=columns, name=name)


def test_each_shard_becomes_one_row_and_duplicates_never_a_second(tmp_path):
    folder = table(tmp_path)
    shard(tmp_path, row(0), "a")
    shard(tmp_path, row(1, value="2"), "b")
    shard(tmp_path, row(0, value="9"), "c-again")  # the same cell measured twice (a requeued task)
    merged = folder.merge_shards()
    assert [r["seed"] for r in merged.merged] == ["0", "1"] and len(merged.duplicates) == 1
    assert read_rows(tmp_path / "results.csv") == [row(0), row(1, value="2")]
    assert sorted(os.listdir(tmp_path / SHARDS_DIR / "merged")) == ["a.json", "b.json"]
    assert os.listdir(tmp_path / SHARDS_DIR / "duplicate") == ["c-again.json"]
    # merging again (or after a reopen) finds nothing new and writes nothing twice
    assert folder.merge_shards().merged == []
    folder.close()
    assert table(tmp_path).merge_shards().merged == []
    assert len(read_rows(tmp_path / "results.csv")) == 2


def test_a_merge_cut_short_after_the_append_is_finished_by_the_next(tmp_path):
    folder = table(tmp_path)
    path = shard(tmp_path, row(0), "a")
    folder.append(row(0))  # the merge appended the row and died before moving the shard
    folder.close()
    again = table(tmp_path)
    result = again.merge_shards()
    assert result.merged == [] and result.duplicates == [path]
    assert read_rows(tmp_path / "results.csv") == [row(0)]


def test_torn_foreign_and_unplanned_shards_are_refused_with_the_reason(tmp_path):
    folder = table(tmp_path)
    whole = shard(tmp_path, row(0), "whole").read_text()
    (tmp_path / SHARDS_DIR / "torn.json").write_text(whole[: len(whole) // 2])
    shard(tmp_path, row(1), "other-config", config={"steps": 4})
    shard(tmp_path, {**row(2), "extra": "x"}, "other-columns", columns=COLUMNS + ("extra",))
    shard(tmp_path, row(3), "unplanned")
    result = folder.merge_shards(allowed={("recall", "0"), ("recall", "1"), ("recall", "2")})
    assert [r["seed"] for r in result.merged] == ["0"]
    why = {p.name: reason for p, reason in result.rejected.items()}
    assert why["torn.json"].startswith("not a whole shard")
    assert why["other-config.json"].startswith("it belongs to another configuration")
    assert why["other-columns.json"] == "its columns are not this run's"
    assert why["unplanned.json"] == "its cell is not one of this run's cells"
    assert read_rows(tmp_path / "results.csv") == [row(0)]
    rejected = tmp_path / SHARDS_DIR / "rejected"
    assert (rejected / "torn.json.why").read_text().startswith("not a whole shard")
    assert not list((tmp_path / SHARDS_DIR).glob("*.json"))  # looked at once, moved aside


def test_a_placeholder_is_replaced_atomically_by_a_later_shard(tmp_path):
    folder = table(tmp_path)
    folder.append(row(0, value="", status="error", note=f"{ENDED_NOTE} slurm state CANCELLED"))
    folder.append(row(1))
    shard(tmp_path, row(0, value="5"), "late")
    result = folder.merge_shards(replaceable=is_placeholder)
    assert [r["value"] for r in result.merged] == ["5"]
    assert read_rows(tmp_path / "results.csv") == [row(0, value="5"), row(1)]
    assert not list(tmp_path.glob("*.tmp"))
    # a real row is never replaced
    shard(tmp_path, row(1, value="7"), "dup")
    assert folder.merge_shards(replaceable=is_placeholder).merged == []
    assert read_rows(tmp_path / "results.csv")[1] == row(1)


def test_a_results_table_of_an_older_schema_is_read_and_upgraded(tmp_path):
    old_columns = list(COLUMNS_BY_VERSION[1])  # schema 1: no run columns, no num_kv_heads
    values = {c: "" for c in old_columns} | {"variant": "full", "seq_len": "64", "status": "ok", "time_ms": "1.5"}
    lines = [",".join(old_columns), ",".join(values[c] for c in old_columns)]
    (tmp_path / "results.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "meta.json").write_text(json.dumps({"schema_version": 1, "config": {"a": 1}, "sessions": []}))
    folder = open_run_folder(tmp_path, {"a": 1})
    [only] = folder.rows()
    assert only["time_ms"] == "1.5" and all(only[c] == "" for c in RUN_COLUMNS + ("num_kv_heads",))
    assert tuple(read_rows(tmp_path / "results.csv")[0]) == ALL_COLUMNS
    assert json.loads((tmp_path / "meta.json").read_text())["schema_version"] == SCHEMA_VERSION


# ------------------------------------------------------------------------------------------------ the sweep
def tiny_suite(lengths=(32, 64), modes=("fwd",)):
    return parse_suite({
        "device": "cpu", "modes": list(modes), "lengths": list(lengths), "heads": 2, "head_dim": 8,
        "min_run_time": 0.01, "variants": [{"key": "full", "backends": ["naive", "sdpa"]},
                                           {"key": "window", "backends": ["naive"], "params": {"window_size": 16}}],
    }, name="tiny")


def keyed(rows):
    return {tuple(r[c] for c in CONFIG_COLUMNS): r for r in rows}


def test_the_debug_executor_gives_the_inline_cells_keys_and_statuses(tmp_path):
    suite = tiny_suite()
    inline = run_sweep(suite, tmp_path / "inline", progress=False)
    debug = run_sweep_parallel(suite, tmp_path / "debug", ExecutorOptions("debug", poll_s=0.01), progress=False)
    a, b = keyed(inline.rows), keyed(debug.rows)
    assert len(inline.rows) == len(debug.rows) == len(plan_cells(suite, "cpu")) and set(a) == set(b)
    assert {k: r["status"] for k, r in a.items()} == {k: r["status"] for k, r in b.items()}
    assert {r["host"] for r in inline.rows + debug.rows} == {socket.gethostname()}
    assert debug.cells_run == len(debug.rows) and debug.unfinished == 0
    sessions = json.loads((tmp_path / "debug" / "meta.json").read_text())["sessions"]
    assert sessions[0]["executor"]["name"] == "debug"
    assert "executor" not in json.loads((tmp_path / "debug" / "meta.json").read_text())["config"]
    assert len(os.listdir(tmp_path / "debug" / SHARDS_DIR / "merged")) == len(debug.rows)
    assert len(Ledger(tmp_path / "debug").records()) == len(debug.rows)


def test_a_run_started_inline_is_finished_by_an_executor(tmp_path):
    suite = tiny_suite(lengths=(32,))
    run_sweep(suite, tmp_path, progress=False)
    lines = (tmp_path / "results.csv").read_text().splitlines(keepends=True)
    (tmp_path / "results.csv").write_text("".join(lines[:-1]))  # the inline run was interrupted before its last cell
    again = run_sweep_parallel(suite, tmp_path, ExecutorOptions("debug", poll_s=0.01), progress=False)
    assert again.cells_run == 1 and len(read_rows(tmp_path / "results.csv")) == len(lines) - 1
    executors = [s["executor"]["name"] for s in json.loads((tmp_path / "meta.json").read_text())["sessions"]]
    assert executors == ["inline", "debug"]


def test_a_task_that_ended_without_a_result_gets_a_row_and_a_rerun_resubmits_it(tmp_path):
    suite = tiny_suite(lengths=(32,))
    first = run_sweep_parallel(suite, tmp_path, ExecutorOptions("debug", poll_s=0.01), progress=False)
    victim = first.rows[0]
    key = tuple(victim[c] for c in CONFIG_COLUMNS)
    # pretend the cell's task was killed before it wrote anything: its row gone, a dead task the latest attempt
    folder = RunFolder(tmp_path, json.loads((tmp_path / "meta.json").read_text())["config"], columns=ALL_COLUMNS,
                       key_columns=CONFIG_COLUMNS, schema_version=SCHEMA_VERSION)
    del folder.finished[key]
    folder._rewrite()
    folder.close()
    [record] = [r for r in Ledger(tmp_path).records() if r.key == key]
    Ledger(tmp_path).append([TaskRecord(**{**vars(record), "task_id": "gone_3", "job_id": "gone",
                                           "array_index": "3"})])
    rerun = run_sweep_parallel(suite, tmp_path, ExecutorOptions("debug", poll_s=0.01), progress=False)
    rows = keyed(read_rows(tmp_path / "results.csv"))
    assert len(rows) == len(first.rows) and rows[key]["status"] == "ok"  # resubmitted and measured again
    assert rerun.cells_run == 2  # the placeholder for the dead task, then the new measurement replacing it
    merged = [json.loads(p.read_text())["row"] for p in (tmp_path / SHARDS_DIR / "merged").glob("*.json")]
    assert sum(1 for r in merged if tuple(r[c] for c in CONFIG_COLUMNS) == key) == 2


def test_a_dead_task_is_recorded_with_its_state_in_the_note(tmp_path):
    from efficient_attn.harness.executors.backends import TaskState
    from efficient_attn.harness.executors.driver import collect

    suite = tiny_suite(lengths=(32,))
    planned = {p.cell.key(): p for p in plan_cells(suite, "cpu")}
    folder = RunFolder(tmp_path, {"x": 1}, columns=ALL_COLUMNS, key_columns=CONFIG_COLUMNS,
                       schema_version=SCHEMA_VERSION, environment={})
    p = next(iter(planned.values()))
    Ledger(tmp_path).append([TaskRecord("7_2", "7", "2", "slurm", p.cell.key(), p.cell.to_dict(), None, 0.0)])

    class Killed:
        def states(self, records):
            return {r.task_id: TaskState("OUT_OF_MEMORY", "node9") for r in records}

    seen: set[str] = set()
    assert collect(folder, Killed(), planned, ended_once=seen).new_rows == []  # once: its shard may be on its way
    [placeholder] = collect(folder, Killed(), planned, ended_once=seen).new_rows
    assert placeholder["status"] == "oom" and "state OUT_OF_MEMORY (task 7_2 on node9)" in placeholder["note"]
    assert (placeholder["host"], placeholder["job_id"], placeholder["array_index"]) == ("node9", "7", "2")
    assert is_placeholder(placeholder)


@pytest.mark.slow
def test_the_local_executor_runs_cells_as_parallel_subprocesses(tmp_path):
    from efficient_attn.harness.executors.status import run_status

    suite = tiny_suite(lengths=(32,))  # 3 cells, 2 at a time
    options = ExecutorOptions("local", max_parallel=2, threads=1, poll_s=0.2)
    result = run_sweep_parallel(suite, tmp_path, options, progress=False)
    assert sorted(r["status"] for r in result.rows) == ["ok"] * 3 and result.unfinished == 0
    assert len({r["job_id"] for r in result.rows}) == 3 and all(r["job_id"].isdigit() for r in result.rows)
    spans = [json.loads(p.read_text())["extra"] for p in (tmp_path / SHARDS_DIR / "merged").glob("*.json")]
    assert {s["threads"] for s in spans} == {1}
    first_two, third = sorted((s["started"], s["ended"]) for s in spans)[:2], sorted(s["started"] for s in spans)[2]
    assert third >= min(end for _, end in first_two)  # never more than two at once
    status = run_status(tmp_path)
    assert (status.done, status.running, status.pending, status.failed, status.not_submitted) == (3, [], [], [], 0)


# ----------------------------------------------------------------------------------------------- the CLI
@pytest.mark.parametrize("options, message", [
    (["--executor", "slurm", "--slurm-param", "memory=4G"], "'memory' (did you mean 'mem'?)"),
    (["--executor", "slurm", "--slurm-param", "mem"], "--slurm-param expects KEY=VALUE"),
    (["--detach"], "--detach needs --executor slurm"),
    (["--executor", "local", "--detach"], "--detach needs --executor slurm"),
    (["--executor", "slrum"], "did you mean 'slurm'?"),
    (["--executor", "local", "--max-parallel", "0"], "argument --max-parallel: expected a positive integer"),
    (["--threads", "-1"], "argument --threads: expected a positive integer"),
])
def test_bad_executor_options_are_one_line_errors(tmp_path, capsys, options, message, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/" + name)  # as if Slurm were installed
    rc = cli.main(["bench", "quick", "--lengths", "32", "--out", str(tmp_path / "x"), "--no-progress", *options])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and message in err[-1]


def test_slurm_params_parse_json_values():
    assert parse_slurm_params(["mem=16G", "exclusive=true", "nodes=2"]) == {"mem": "16G", "exclusive": True,
                                                                              "nodes": 2}


# ----------------------------------------------------------------------------------------- the quality suite
QUALITY_SUITE = """
tasks = ["recall"]
variants = ["full", "window"]
lengths = [32]
seeds = 2
error_lengths = [32]
[train]
dim = 16
depth = 1
num_heads = 2
batch_size = 4
steps = 2
warmup_steps = 1
eval_size = 8
[params]
window = { window_size = 4 }
"""


def test_quality_cells_through_an_executor_match_the_inline_run(tmp_path):
    from efficient_attn.quality.suite import KEY_COLUMNS, load_suite, plan_cells, run_suite

    (tmp_path / "q.toml").write_text(QUALITY_SUITE)
    suite = load_suite(tmp_path / "q.toml")
    inline = read_rows(run_suite(suite, tmp_path / "inline", progress=False))
    parallel = read_rows(run_suite(suite, tmp_path / "debug", progress=False,
                                   executor=ExecutorOptions("debug", poll_s=0.01)))

    def by_key(rows):
        return {tuple(r[c] for c in KEY_COLUMNS): r["status"] for r in rows}

    assert by_key(inline) == by_key(parallel) and len(parallel) == len(plan_cells(suite)) == 4
    assert set(by_key(parallel).values()) == {"ok"}
    assert (tmp_path / "debug" / "models").is_dir()  # the seed-0 models, saved by the tasks for the metrics
    sessions = json.loads((tmp_path / "debug" / "meta.json").read_text())["sessions"]
    assert sessions[-1]["executor"]["name"] == "debug"


def test_a_quality_task_that_ended_without_a_result_is_an_error_row_and_rerun(tmp_path):
    from efficient_attn.harness.executors.backends import TaskState
    from efficient_attn.harness.executors.driver import CellKind, collect
    from efficient_attn.quality.suite import (
        placeholder_row, load_suite, open_run_folder, plan_cells, run_cell_task, run_suite,
    )

    (tmp_path / "q.toml").write_text(QUALITY_SUITE)
    suite = load_suite(tmp_path / "q.toml")
    cell = plan_cells(suite)[0]
    folder = open_run_folder(tmp_path / "run", suite)
    Ledger(folder.path).append([TaskRecord("9_1", "9", "1", "slurm", cell.key(), dataclasses.asdict(cell), None, 0)])

    class Dead:
        def states(self, records):
            return {r.task_id: TaskState("OUT_OF_MEMORY") for r in records}

    [row] = collect(folder, Dead(), [cell.key()], kind=CellKind(run_cell_task, placeholder_row)).new_rows
    assert row["status"] == "error"  # quality rows have no oom status; the state is in the note
    assert "state OUT_OF_MEMORY (task 9_1)" in row["note"] and is_placeholder(row)
    folder.close()
    run_suite(suite, tmp_path / "run", progress=False, executor=ExecutorOptions("debug", poll_s=0.01))
    rows = {tuple(r[c] for c in ("task", "variant", "seed")): r for r in read_rows(tmp_path / "run" / "results.csv")}
    assert len(rows) == 4 and rows[(cell.task, cell.variant, str(cell.seed))]["status"] == "ok"
