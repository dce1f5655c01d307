"""``effattn compare NEW REF`` (issue 18's "no regression" check): cells matched on their configuration across schema
versions, within-run speed-ups and memory savings compared with a tolerance, status changes, exit codes. Synthetic
runs (:mod:`report_synthetic`) whose cost laws give every expected ratio; one test uses the committed reference run."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from report_synthetic import Series, linear, make_rows, quadratic, write_run  # noqa: E402

from efficient_attn.cli import main  # noqa: E402
from efficient_attn.commands.compare_cmd import tolerance as parse_tolerance  # noqa: E402
from efficient_attn.harness.schema import COLUMNS_BY_VERSION, META_FILE, RESULTS_FILE  # noqa: E402
from efficient_attn.report.analyses.compare import CLASSES, MATCH_COLUMNS, compare_runs  # noqa: E402

LENGTHS = [1024, 2048, 4096]
MODES = ("fwd", "fwd_bwd")
REFERENCE_RUN = Path(__file__).parent.parent / "reports" / "default-cpu"
NAIVE = quadratic(4.0e-5, 0.3)
SDPA = quadratic(1.5e-5, 0.2)
WINDOW = linear(2.2e-3, 0.4)


def suite(failures: dict | None = None) -> list[Series]:
    """full:naive, full:sdpa, window and linformer; ``failures`` goes to window."""
    return [
        Series("full", "naive", NAIVE, quadratic(16.0, 1e6)),
        Series("full", "sdpa", SDPA, linear(4000.0, 1e6)),
        Series("window", "torch", WINDOW, linear(3000.0, 2e6), params={"window_size": 256},
               failures=failures or {}),
        Series("linformer", "torch", linear(1.1e-3, 0.3), linear(2500.0, 1e6), params={"k": 256}),
    ]


def rows(failures: dict | None = None) -> pd.DataFrame:
    return make_rows(suite(failures), LENGTHS, MODES)


def at(frame: pd.DataFrame, variant: str, mode: str | None = None, seq_len: int | None = None) -> pd.Series:
    mask = frame["variant"] == variant
    if mode is not None:
        mask &= frame["mode"] == mode
    if seq_len is not None:
        mask &= frame["seq_len"] == seq_len
    return mask


def scaled(frame: pd.DataFrame, mask: pd.Series, column: str, factor: float) -> pd.DataFrame:
    frame = frame.copy()
    frame[column] = pd.to_numeric(frame[column], errors="coerce")
    frame.loc[mask, column] *= factor
    return frame


def write_pair(tmp_path: Path, new: pd.DataFrame, ref: pd.DataFrame | None = None) -> tuple[Path, Path]:
    return write_run(tmp_path / "new", new), write_run(tmp_path / "ref", rows() if ref is None else ref)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["compare", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def compare(new: Path, ref: Path, tolerance: float = 0.10, memory_tolerance: float = 0.02, **kw):
    return compare_runs(new, ref, tolerance=tolerance, memory_tolerance=memory_tolerance, **kw)


def ratio(result, variant: str, mode: str, seq_len: int, reference: str) -> pd.Series:
    cells = result.cells
    key = cells.loc[(cells["variant"] == variant) & (cells["mode"] == mode) & (cells["seq_len"] == seq_len), "_cell"]
    assert len(key) == 1
    found = result.ratios[(result.ratios["_cell"] == key.iloc[0]) & (result.ratios["reference"] == reference)]
    assert len(found) == 1
    return found.iloc[0]


# ---------------------------------------------------------------- matching


def test_identical_runs_match_every_cell_whatever_the_row_order_and_json_spelling(tmp_path):
    new = rows().sample(frac=1.0, random_state=3)  # another order
    new["params_json"] = [json.dumps(json.loads(p), separators=(",", ":")) for p in new["params_json"]]  # compact
    result = compare(*write_pair(tmp_path, new))
    counts = result.counts()
    assert counts["matched"] == len(new) == 4 * len(MODES) * len(LENGTHS)
    assert counts["only-in-new"] == counts["only-in-ref"] == 0
    assert sum(counts[c] for c in CLASSES) == counts["matched"]
    # every cell has a ratio against a reference (naive's own cells against sdpa and the other way round)
    assert counts["same"] == counts["matched"] and not result.regressed
    assert result.references == ["full:naive", "full:sdpa"]
    assert (result.cells["time_ratio"] == 1.0).all()
    assert "device" not in MATCH_COLUMNS and {"variant", "params_json", "backend_requested", "mode", "seq_len",
                                               "causal", "dtype", "batch_size", "num_kv_heads"} <= set(MATCH_COLUMNS)


@pytest.mark.parametrize("column,value", [("params_json", '{"window_size": 128}'), ("causal", True),
                                          ("dtype", "bfloat16"), ("batch_size", 2), ("backend_requested", "naive")])
def test_cells_that_differ_in_one_configuration_column_do_not_match(tmp_path, column, value):
    new = rows()
    window = at(new, "window")
    new[column] = new[column].astype(object)
    new.loc[window, column] = value
    result = compare(*write_pair(tmp_path, new))
    counts = result.counts()
    assert counts["only-in-new"] == counts["only-in-ref"] == int(window.sum())
    assert counts["matched"] == len(new) - int(window.sum())
    assert set(result.only_new["variant"]) == set(result.only_ref["variant"]) == {"window"}


def write_version(path: Path, frame: pd.DataFrame, version: int) -> Path:
    """A run folder as the harness of schema ``version`` wrote it: only that version's columns."""
    write_run(path, frame[list(COLUMNS_BY_VERSION[version])])
    meta = json.loads((path / META_FILE).read_text())
    meta["schema_version"] = version
    (path / META_FILE).write_text(json.dumps(meta))
    return path


@pytest.mark.parametrize("version", [1, 2, 3, 4])
@pytest.mark.parametrize("kv_written", [False, True], ids=["kv-empty", "kv-equal-heads"])
def test_an_older_schema_matches_schema_5(tmp_path, version, kv_written):
    new = rows()
    if kv_written:  # a v5 row may give num_kv_heads = num_heads where older ones have no such column
        new["num_kv_heads"] = new["num_heads"]
    ref = write_version(tmp_path / "ref", rows(), version)
    assert "num_kv_heads" not in pd.read_csv(ref / RESULTS_FILE).columns or version >= 3
    result = compare(write_run(tmp_path / "new", new), ref)
    assert result.counts()["matched"] == len(new)
    assert result.counts()["only-in-new"] == result.counts()["only-in-ref"] == 0
    assert not result.regressed


def test_v3_reference_and_v5_new_with_a_regression(tmp_path, capsys):
    ref = write_version(tmp_path / "ref", rows(), 3)
    new = write_run(tmp_path / "new", scaled(rows(), at(rows(), "window", "fwd", 2048), "time_ms", 2.0))
    code, out, _ = run_cli(capsys, new, ref)
    assert code == 1 and "| fwd | window:torch | 2K | full:naive |" in out


# ---------------------------------------------------------------- the verdict


def test_a_slower_cell_is_flagged_with_the_ratios_the_laws_give(tmp_path, capsys):
    cell = at(rows(), "window", "fwd", 4096)
    new_rows = scaled(scaled(rows(), cell, "time_ms", 1.5), cell, "time_iqr_ms", 1.5)
    new, ref = write_pair(tmp_path, new_rows)
    result = compare(new, ref)
    for reference, law in (("full:naive", NAIVE), ("full:sdpa", SDPA)):
        r = ratio(result, "window", "fwd", 4096, reference)
        assert r["speedup_ref"] == pytest.approx(law(4096) / WINDOW(4096), rel=1e-12)
        assert r["speedup_new"] == pytest.approx(law(4096) / (1.5 * WINDOW(4096)), rel=1e-12)
        assert r["speed_change"] == pytest.approx(1 / 1.5 - 1, rel=1e-12) and r["speed_verdict"] == "worse"
    header, table = result.speed_regressions()
    assert [row[:4] for row in table] == [["fwd", "window:torch", "4K", "full:naive"],
                                          ["fwd", "window:torch", "4K", "full:sdpa"]]
    assert table[0][header.index("change")] == "-33.3%" and table[0][header.index("time NEW/REF")] == "1.50x"
    assert table[0][-1] == "4% / 4%"  # report_synthetic's IQR above 1K: 4% of the time
    assert result.counts()["worse"] == 1 and result.regressed
    code, out, _ = run_cli(capsys, new, ref)
    assert code == 1
    assert "## Speed-ups that got worse" in out and "| fwd | window:torch | 4K | full:naive |" in out
    assert out.strip().splitlines()[-1].startswith("summary: matched 24,") and "worse 1" in out
    assert out.strip().endswith("REGRESSED")


def test_a_faster_cell_is_better_and_not_flagged(tmp_path, capsys):
    new, ref = write_pair(tmp_path, scaled(rows(), at(rows(), "window", "fwd_bwd", 2048), "time_ms", 0.5))
    result = compare(new, ref)
    assert ratio(result, "window", "fwd_bwd", 2048, "full:sdpa")["speed_change"] == pytest.approx(1.0)
    assert result.counts()["better"] == 1 and result.counts()["worse"] == 0
    assert result.speed_regressions()[1] == []
    code, out, _ = run_cli(capsys, new, ref)
    assert code == 0 and "No speed-up got worse" in out and out.strip().endswith("no regression")


@pytest.mark.parametrize("slowdown,tol,expected", [
    (1 / 0.90, "10%", "same"),    # worse by exactly the tolerance: not "more than"
    (1 / 0.89, "10%", "worse"),   # 11% worse
    (1 / 0.89, "0.12", "same"),   # within a wider tolerance
    (1 / 0.91, "10%", "same"),    # 9% worse
    (0.90, "10%", "better"),      # 11% better
    (1.0, "0", "same"),           # unchanged at tolerance 0
    (1 / 0.999, "0", "worse"),    # any loss at tolerance 0
])
def test_tolerance_edge(tmp_path, capsys, slowdown, tol, expected):
    new, ref = write_pair(tmp_path, scaled(rows(), at(rows(), "window", "fwd", 4096), "time_ms", slowdown))
    code, out, _ = run_cli(capsys, new, ref, "--tolerance", tol)
    result = compare(new, ref, tolerance=parse_tolerance(tol))
    assert {ratio(result, "window", "fwd", 4096, r)["speed_verdict"] for r in result.references} == {expected}
    assert code == (1 if expected == "worse" else 0)


def test_tolerance_accepts_a_fraction_or_a_percentage():
    assert parse_tolerance("10%") == pytest.approx(0.10) and parse_tolerance("0.1") == 0.1
    assert parse_tolerance("0") == 0.0 and parse_tolerance("2.5%") == pytest.approx(0.025)


def test_memory_saving_that_got_worse_is_flagged_beyond_its_tolerance(tmp_path, capsys):
    window_fwd = at(rows(), "window", "fwd", 2048)
    new, ref = write_pair(tmp_path, scaled(rows(), window_fwd, "peak_mem_bytes", 1.10))
    result = compare(new, ref)
    r = ratio(result, "window", "fwd", 2048, "full:naive")
    assert r["memory_change"] == pytest.approx(1 / 1.10 - 1) and r["memory_verdict"] == "worse"
    assert r["speed_verdict"] == "same"
    header, table = result.memory_regressions()
    assert table[0][:4] == ["fwd", "window:torch", "2K", "full:naive"]
    assert table[0][header.index("peak NEW/REF")] == "1.10x"
    assert run_cli(capsys, new, ref)[0] == 1
    assert run_cli(capsys, new, ref, "--memory-tolerance", "15%")[0] == 0
    small, _ = write_pair(tmp_path / "small", scaled(rows(), window_fwd, "peak_mem_bytes", 1.01))
    assert run_cli(capsys, small, ref)[0] == 0  # 1% is within the default 2%


# ---------------------------------------------------------------- status changes


def test_a_cell_that_stopped_running_is_a_regression(tmp_path, capsys):
    oom = {("fwd_bwd", 4096): ("oom", "out of memory")}
    new, ref = write_pair(tmp_path, rows(failures=oom))
    result = compare(new, ref)
    assert result.counts()["failed-in-one"] == 1 and result.regressed
    header, table = result.status_changes()
    assert table == [["fwd_bwd", "window:torch", "4K", "ok", "oom", "regression: ran in REF, not in NEW"]]
    code, out, _ = run_cli(capsys, new, ref)
    assert code == 1 and "| ok -> oom |" in out


def test_a_cell_that_now_runs_is_an_improvement(tmp_path, capsys):
    error = {("fwd", 2048): ("error", "RuntimeError: synthetic")}
    new, ref = write_pair(tmp_path, rows(), rows(failures=error))
    result = compare(new, ref)
    assert result.counts()["failed-in-one"] == 1 and not result.regressed
    assert result.status_changes()[1][0][3:] == ["error", "ok", "improvement: runs in NEW, did not in REF"]
    assert run_cli(capsys, new, ref)[0] == 0


def test_a_cell_failing_in_both_is_not_a_regression(tmp_path, capsys):
    new, ref = write_pair(tmp_path, rows(failures={("fwd", 4096): ("oom", "x")}),
                          rows(failures={("fwd", 4096): ("skipped_budget", "predicted above the budget")}))
    result = compare(new, ref)
    assert result.counts()["both-failed"] == 1 and not result.regressed
    assert result.status_changes()[1][0][3:] == ["skipped_budget", "oom", "did not run in either"]


def test_a_baseline_missing_from_one_run_is_a_warning_and_its_cells_are_listed(tmp_path, capsys):
    new_rows = rows()
    new, ref = write_pair(tmp_path, new_rows[~at(new_rows, "full") | (new_rows["backend_requested"] != "naive")])
    result = compare(new, ref)
    assert result.references == ["full:sdpa"]
    assert any("full:naive is not in NEW" in w for w in result.warnings)
    assert result.counts()["only-in-ref"] == len(LENGTHS) * len(MODES) and not result.regressed
    code, out, err = run_cli(capsys, new, ref)
    assert code == 0 and "warning: the reference full:naive is not in NEW" in err
    assert "| REF | fwd | full:naive | 1K | ok |" in out


# ---------------------------------------------------------------- within-run ratios, never absolute times


def test_a_uniformly_slower_machine_is_no_regression(tmp_path, capsys):
    new, ref = write_pair(tmp_path, scaled(rows(), rows()["status"] == "ok", "time_ms", 3.0))
    result = compare(new, ref)
    assert result.cells["time_ratio"].tolist() == pytest.approx([3.0] * len(result.cells)) and not result.regressed
    assert result.counts()["same"] == result.counts()["matched"]
    code, out, _ = run_cli(capsys, new, ref)
    assert code == 0 and "| 3.00x | same |" in out and "informational" in out


def test_a_cell_that_lost_against_its_run_is_flagged_though_its_absolute_time_improved(tmp_path, capsys):
    frame = rows()
    faster = scaled(frame, frame["variant"] != "window", "time_ms", 0.5)  # everything else twice as fast
    faster = scaled(faster, at(faster, "window"), "time_ms", 0.9)        # window only 10% faster
    new, ref = write_pair(tmp_path, faster)
    result = compare(new, ref)
    window = result.cells[result.cells["variant"] == "window"]
    assert (window["time_ratio"] < 1).all() and (window["cls"] == "worse").all()
    assert (result.cells.loc[result.cells["variant"] != "window", "cls"] == "same").all()
    assert run_cli(capsys, new, ref)[0] == 1


# ---------------------------------------------------------------- bad input, warnings, the committed run


def test_bad_input_is_one_line_and_status_2(tmp_path, capsys):
    new, ref = write_pair(tmp_path, rows())
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        ([tmp_path / "missing", ref], "NEW_RUN", "does not exist"),
        ([new, tmp_path / "missing"], "REF_RUN", "does not exist"),
        ([new, empty], "REF_RUN", "not a run folder"),
        ([new, ref / RESULTS_FILE / "x"], "REF_RUN", "does not exist"),
        ([new, ref, "--tolerance", "10"], "--tolerance", "10%"),
        ([new, ref, "--tolerance=-5%"], "--tolerance", "'-5%'"),
        ([new, ref, "--memory-tolerance", "nan"], "--memory-tolerance", "finite"),
        ([new, ref, "--baseline", "full:flash"], "full:flash", "available: full:naive, full:sdpa"),
        ([new, ref, "--baseline", "full"], "VARIANT:BACKEND", "baseline"),
    ]
    for argv, named, says in cases:
        code, out, err = run_cli(capsys, *argv)
        assert code == 2 and out == "", (argv, code, out)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert err.startswith("effattn compare: error:") and named in err and says in err, err


def test_runs_without_a_cell_in_common_are_refused(tmp_path, capsys):
    new = write_run(tmp_path / "new", make_rows(suite(), [512], MODES))
    ref = write_run(tmp_path / "ref", rows())
    code, out, err = run_cli(capsys, new, ref)
    assert code == 2 and out == "" and "nothing to compare" in err and len(err.strip().splitlines()) == 1


def test_runs_of_different_suites_and_devices_warn_and_still_compare(tmp_path, capsys):
    new = write_run(tmp_path / "new", rows(), extra={"config": {"name": "quick", "device": "cuda"}})
    ref = write_run(tmp_path / "ref", rows())
    code, out, err = run_cli(capsys, new, ref)
    assert code == 0
    assert "warning: the runs differ in suite: NEW quick, REF default" in err
    assert "warning: the runs differ in device: NEW cuda, REF cpu" in err
    assert "**Warnings:**" in out and "matched 24" in out


def test_the_committed_reference_run_against_itself_and_a_doctored_copy(tmp_path, capsys):
    code, out, _ = run_cli(capsys, REFERENCE_RUN, REFERENCE_RUN)
    assert code == 0 and "worse 0" in out and "only-in-new 0, only-in-ref 0" in out
    copy = tmp_path / "after"
    copy.mkdir()
    shutil.copy(REFERENCE_RUN / META_FILE, copy / META_FILE)
    frame = pd.read_csv(REFERENCE_RUN / RESULTS_FILE, dtype={"params_json": str})
    slower = (frame["variant"] == "window") & (frame["mode"] == "fwd") & (frame["seq_len"] == 16384)
    frame.loc[slower, "time_ms"] *= 2
    frame.to_csv(copy / RESULTS_FILE, index=False)
    result = compare(copy, REFERENCE_RUN)
    assert result.counts()["matched"] == len(frame) and result.counts()["worse"] == 1
    flagged = result.speed_regressions()[1]
    assert {tuple(row[:3]) for row in flagged} == {("fwd", "window:torch", "16K")}
    assert "full:sdpa" in {row[3] for row in flagged}
    assert run_cli(capsys, copy, REFERENCE_RUN)[0] == 1


def test_two_rows_that_become_one_cell_once_old_columns_are_filled_are_refused(tmp_path, capsys):
    ref_rows = rows()
    twin = ref_rows[at(ref_rows, "window", "fwd", 1024)].copy()
    twin["num_kv_heads"] = twin["num_heads"]  # the same cell as its empty-num_kv_heads twin
    new, ref = write_pair(tmp_path, rows(), pd.concat([ref_rows, twin], ignore_index=True))
    code, out, err = run_cli(capsys, new, ref)
    assert code == 2 and "same cell" in err and "num_kv_heads" in err and str(ref) in err
