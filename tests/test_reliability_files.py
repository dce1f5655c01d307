"""Issue 19 item 5: run-folder files that are damaged, missing or not ours: each named, with what to do, and never
a silent mix of configurations; ``report`` refuses damaged rows and duplicated cells with their lines."""

import json

import pytest

from efficient_attn import cli
from efficient_attn.harness.runfolder import ConfigMismatchError, RunFolder, csv_line, read_rows
from efficient_attn.report.load import load_run

COLUMNS = ("variant", "seq_len", "status", "note")
KEYS = ("variant", "seq_len")


def folder(path, config=None):
    return RunFolder(path, config or {"device": "cpu", "lengths": [1, 2]}, columns=COLUMNS, key_columns=KEYS,
                     schema_version=1, environment={})


def row(n, status="ok"):
    return {"variant": "full", "seq_len": str(n), "status": status, "note": ""}


def test_a_damaged_row_in_the_middle_is_moved_aside_and_its_cell_runs_again(tmp_path, capsys):
    run = folder(tmp_path)
    run.append(row(1))
    with open(run.csv_path, "a") as handle:
        handle.write("full,2,ok,half a note,extra,fields\n")
    run.append(row(3))
    reopened = folder(tmp_path)
    assert sorted(reopened.finished) == [("full", "1"), ("full", "3")]
    err = capsys.readouterr().err
    assert "line(s) 3 damaged" in err and "results.damaged.csv" in err
    assert (tmp_path / "results.damaged.csv").read_text().splitlines() == ["full,2,ok,half a note,extra,fields"]
    assert [r["seq_len"] for r in read_rows(run.csv_path)] == ["1", "3"]
    reopened.append(row(2))  # the cell runs again and is written once
    assert len(folder(tmp_path).finished) == 3


def test_report_refuses_a_damaged_row_with_its_line_and_what_to_do(tmp_path):
    (tmp_path / "results.csv").write_text("variant,mode,seq_len,status\nfull,fwd,64,ok\nfull,fwd,128,ok,x\n")
    with pytest.raises(ValueError, match=r"line 3 is a damaged row \(5 fields, the header has 4\): resume the run"):
        load_run(tmp_path)


def test_report_refuses_duplicated_cells_naming_their_lines(tmp_path, capsys):
    text = "variant,mode,seq_len,status\nfull,fwd,64,ok\nfull,fwd,128,ok\nfull,fwd,64,ok\n"
    (tmp_path / "results.csv").write_text(text)
    with pytest.raises(ValueError, match=r"1 cell\(s\) appear more than once, e.g. lines 2, 4 \(variant=full"):
        load_run(tmp_path)
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "more than once" in capsys.readouterr().err


@pytest.mark.parametrize("content,expected", [("{not json", "is not valid JSON"), ("[1, 2]", "is not a run record"),
                                              ('{"config": 3}', "is not a run record")])
def test_a_meta_json_that_is_not_a_run_record_is_named_with_the_fix(tmp_path, capsys, content, expected):
    folder(tmp_path)
    (tmp_path / "meta.json").write_text(content)
    with pytest.raises(ConfigMismatchError, match=expected) as info:
        folder(tmp_path)
    assert str(tmp_path / "meta.json") in str(info.value) and "choose another --out" in str(info.value)
    # the commands say it in one line, before measuring anything
    argv = ["bench", "quick", "--out", str(tmp_path), "--lengths", "32", "--backends", "sdpa", "--no-progress"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("effattn bench: error:") and expected in err[-1]
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and ("meta.json" in err or content.startswith('{"config"'))


def test_rows_whose_meta_json_was_deleted_are_not_resumed_with_another_config(tmp_path):
    run = folder(tmp_path, {"device": "cpu", "lengths": [1]})
    run.append(row(1))
    (tmp_path / "meta.json").unlink()
    with pytest.raises(ConfigMismatchError, match=r"1 row\(s\) in results.csv but no meta.json"):
        folder(tmp_path, {"device": "cpu", "lengths": [1, 2]})
    assert read_rows(run.csv_path) == [row(1)]


def test_a_folder_with_a_header_only_and_no_meta_is_started_afresh(tmp_path):
    (tmp_path / "results.csv").write_text(csv_line(COLUMNS))
    assert folder(tmp_path).finished == {}
    assert json.loads((tmp_path / "meta.json").read_text())["config"]["device"] == "cpu"


def test_quality_results_with_a_torn_last_line_or_zero_bytes(tmp_path):
    from efficient_attn.quality.suite import RESULT_COLUMNS, QualitySuite, open_run_folder

    suite = QualitySuite(tasks=["recall"], variants=["full"], lengths=[64])
    run = open_run_folder(tmp_path, suite)
    good = {c: "" for c in RESULT_COLUMNS} | {"task": "recall", "variant": "full", "params_json": "{}",
                                              "seq_len": "64", "seed": "0", "num_heads": "4", "status": "ok"}
    run.append(good)
    with open(run.csv_path, "a") as handle:
        handle.write("recall,full,{},64,1,4,64,2,8,150,o")  # killed while writing the next row
    reopened = open_run_folder(tmp_path, suite)
    assert list(reopened.finished) == [run.key(good)]  # the partial row is not counted as done
    reopened.append(good | {"seed": "1"})
    assert [r["seed"] for r in read_rows(run.csv_path)] == ["0", "1"]  # nothing glued onto it
    run.csv_path.write_bytes(b"")
    empty = open_run_folder(tmp_path, suite)
    empty.append(good)
    assert run.csv_path.read_text().splitlines()[0] == ",".join(RESULT_COLUMNS)
