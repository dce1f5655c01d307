"""The run folder every tidy table goes through: generic columns and keys, fsync'ed rows, torn-line repair, config
checks on resume (whole or in part), session totals."""

import json

import pytest

from efficient_attn.harness.runfolder import ConfigMismatchError, RunFolder, csv_line, read_rows

COLUMNS = ("task", "seed", "status", "value")
KEYS = ("task", "seed")


def folder(path, config=None, **options):
    return RunFolder(path, config if config is not None else {"steps": 3, "seeds": 2}, columns=COLUMNS,
                     key_columns=KEYS, schema_version=7, environment={"host": "test"}, **options)


def row(task, seed, value="1.5"):
    return {"task": task, "seed": str(seed), "status": "ok", "value": value}


def test_rows_survive_reopening_and_a_key_is_written_once(tmp_path):
    first = folder(tmp_path)
    first.append(row("recall", 0))
    first.append(row("recall", 1, value="2"))
    with pytest.raises(ValueError, match="must not be written twice"):
        first.append(row("recall", 0))
    with pytest.raises(ValueError, match=r"missing \['value'\]"):
        first.append({"task": "x", "seed": "0", "status": "ok"})
    again = folder(tmp_path)
    assert list(again.finished) == [("recall", "0"), ("recall", "1")]
    assert again.rows() == [row("recall", 0), row("recall", 1, value="2")] == read_rows(tmp_path / "results.csv")
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["schema_version"] == 7 and meta["environment"] == {"host": "test"} and meta["wall_s"] == 0.0


def test_a_torn_last_line_is_cut_and_its_row_written_again(tmp_path):
    table = folder(tmp_path)
    table.append(row("recall", 0))
    line = csv_line(row("recall", 1).values())
    with open(tmp_path / "results.csv", "a", encoding="utf-8", newline="") as handle:
        handle.write(line[: len(line) // 2])  # the process died while writing this row
    resumed = folder(tmp_path)
    assert list(resumed.finished) == [("recall", "0")]
    resumed.append(row("recall", 1))
    assert read_rows(tmp_path / "results.csv") == [row("recall", 0), row("recall", 1)]
    assert (tmp_path / "results.csv").read_bytes().count(b"\n") == 3  # header + 2 rows, nothing left of the tear


def test_another_config_is_refused_and_fixed_narrows_the_check(tmp_path):
    folder(tmp_path, {"steps": 3, "seeds": 2})
    with pytest.raises(ConfigMismatchError, match="different config.*seeds: 2 there, 3 now"):
        folder(tmp_path, {"steps": 3, "seeds": 3})
    # only "steps" must match: the run may grow, and meta.json keeps the latest config
    folder(tmp_path, {"steps": 3, "seeds": 3}, fixed=("steps",))
    assert json.loads((tmp_path / "meta.json").read_text())["config"] == {"steps": 3, "seeds": 3}
    with pytest.raises(ConfigMismatchError, match="steps: 3 there, 4 now"):
        folder(tmp_path, {"steps": 4, "seeds": 3}, fixed=("steps",))


def test_other_columns_are_refused(tmp_path):
    folder(tmp_path)
    with pytest.raises(ConfigMismatchError, match="has columns"):
        RunFolder(tmp_path, {"steps": 3, "seeds": 2}, columns=COLUMNS + ("extra",), key_columns=KEYS,
                  schema_version=7)
    with pytest.raises(ValueError, match="key columns"):
        RunFolder(tmp_path / "other", {}, columns=COLUMNS, key_columns=("nope",), schema_version=7)


def test_sessions_are_recorded_and_totalled(tmp_path):
    table = folder(tmp_path, totals=("wall_s", "timed_window_s"))
    table.end_session(started="a", wall_s=1.25, cells_run=2, timed_window_s=0.5, budget_bytes=10)
    table.end_session(started="b", wall_s=2.0, cells_run=0, interrupted=True, timed_window_s=0.25)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["wall_s"] == 3.25 and meta["timed_window_s"] == 0.75 and meta["budget_bytes"] == 10
    assert [s["interrupted"] for s in meta["sessions"]] == [False, True]
    assert "budget_bytes" not in meta["sessions"][1]  # only what a session was given
