"""The harness's grouped-query cells: the ``num_kv_heads`` column (schema 3), the ``kv_heads`` suite key,
``unsupported`` cells for variants without grouped heads, and version-1 run folders still read and resumed."""

from __future__ import annotations

import csv
import json

import pytest

from efficient_attn.harness import schema
from efficient_attn.harness.cell import static_status
from efficient_attn.harness.plan import Cell, PlannedCell, plan_cells
from efficient_attn.harness.runfolder import RunFolder, csv_line
from efficient_attn.harness.suite import SuiteError, load_suite, parse_suite
from efficient_attn.harness.workloads import build_workload


def test_schema_3_adds_num_kv_heads():
    assert schema.SCHEMA_VERSION >= 3
    assert schema.CONFIG_COLUMNS_V3[-1] == "num_kv_heads" and "num_kv_heads" in schema.CONFIG_COLUMNS
    assert all("num_kv_heads" not in schema.COLUMNS_BY_VERSION[v] for v in (1, 2))
    assert all("num_kv_heads" in schema.COLUMNS_BY_VERSION[v] for v in range(3, schema.SCHEMA_VERSION + 1))


OLDER = tuple(columns for version, columns in schema.COLUMNS_BY_VERSION.items() if version < schema.SCHEMA_VERSION)


def test_gqa_suite_plans_every_kv_head_count():
    suite = load_suite("gqa")
    assert suite.heads == 8 and suite.kv_heads == (8, 2, 1)
    cells = [p.cell for p in plan_cells(suite, "cpu")]
    assert {c.num_kv_heads for c in cells} == {8, 2, 1}
    assert len(cells) == len(suite.variants) * 3 * len(suite.modes) * len(suite.lengths)


def test_kv_heads_must_divide_heads():
    base = {"lengths": [64], "heads": 4, "variants": [{"key": "full"}]}
    assert parse_suite(base, "x").kv_heads == ()
    with pytest.raises(SuiteError, match="kv_heads 3 does not divide heads=4; valid values: 1, 2, 4"):
        parse_suite({**base, "kv_heads": [4, 3]}, "x")


def test_core_workload_has_grouped_kv():
    cell = Cell("window", '{"window_size":8}', "torch", "core", "fwd_bwd", False, "cpu", "float32", 1, 32, 4, 8,
                False, 2)
    work = build_workload(cell)
    work.run()
    (attn,) = work.attentions
    assert attn.config.num_kv_heads == 2 and attn.last_backend == "torch"
    model_cell = Cell("full", "{}", "sdpa", "model", "fwd", True, "cpu", "float32", 1, 16, 4, 8, False, 1)
    work = build_workload(model_cell, depth=1, vocab_size=32)
    work.run()
    assert all(a.config.num_kv_heads == 1 for a in work.attentions)


def test_a_variant_without_grouped_heads_is_unsupported_before_it_runs():
    import efficient_attn as ea

    lacking = [k for k in ea.list_attentions() if not ea.get_spec(k).module_cls.supports_gqa]
    for key in lacking:
        cell = Cell(key, "{}", "auto", "core", "fwd", False, "cpu", "float32", 1, 64, 4, 8, False, 2)
        status, note = static_status(PlannedCell(cell))
        assert status == "unsupported" and "grouped key/value heads" in note
    mha = Cell("full", "{}", "auto", "core", "fwd", False, "cpu", "float32", 1, 64, 4, 8, False, 4)
    assert static_status(PlannedCell(mha)) is None


def test_a_version_1_folder_is_resumed_with_the_new_column_empty(tmp_path):
    old_columns = schema.COLUMNS_BY_VERSION[1]
    row = {c: "" for c in old_columns}
    row.update(variant="full", params_json="{}", backend_requested="sdpa", level="core", mode="fwd",
               causal="false", device="cpu", dtype="float32", batch_size="1", seq_len="64", num_heads="4",
               head_dim="8", is_peer="false", backend="sdpa", status="ok", time_ms="1.5")
    (tmp_path / schema.RESULTS_FILE).write_text(csv_line(old_columns) + csv_line(row[c] for c in old_columns))
    meta = {"schema_version": 1, "config": {"suite": "x"}, "environment": {}, "sessions": [], "wall_s": 0.0}
    (tmp_path / schema.META_FILE).write_text(json.dumps(meta))
    folder = RunFolder(tmp_path, {"suite": "x"}, columns=schema.ALL_COLUMNS, key_columns=schema.CONFIG_COLUMNS,
                       schema_version=schema.SCHEMA_VERSION, environment={}, older_columns=OLDER)
    folder.close()
    cell = Cell("full", "{}", "sdpa", "core", "fwd", False, "cpu", "float32", 1, 64, 4, 8)
    assert cell.key() in folder.finished  # an MHA cell of the new version is the old row: not run again
    with open(tmp_path / schema.RESULTS_FILE, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == list(schema.ALL_COLUMNS) and rows[0]["num_kv_heads"] == "" and rows[0]["time_ms"] == "1.5"
    assert json.loads((tmp_path / schema.META_FILE).read_text())["schema_version"] == schema.SCHEMA_VERSION


def test_columns_of_no_schema_version_are_still_refused(tmp_path):
    from efficient_attn.harness.runfolder import ConfigMismatchError

    old_columns = tuple(c for c in schema.ALL_COLUMNS if c != "note")  # no version had these columns
    (tmp_path / schema.RESULTS_FILE).write_text(csv_line(old_columns))
    meta = {"schema_version": 3, "config": {"suite": "x"}, "environment": {}, "sessions": [], "wall_s": 0.0}
    (tmp_path / schema.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ConfigMismatchError, match="has columns"):
        RunFolder(tmp_path, {"suite": "x"}, columns=schema.ALL_COLUMNS, key_columns=schema.CONFIG_COLUMNS,
                  schema_version=schema.SCHEMA_VERSION, environment={}, older_columns=OLDER)


def test_the_report_reads_a_version_1_table(tmp_path):
    from efficient_attn.report.load import load_runs

    old_columns = schema.COLUMNS_BY_VERSION[1]
    row = {c: "" for c in old_columns}
    row.update(variant="full", params_json="{}", backend_requested="sdpa", level="core", mode="fwd",
               causal="false", device="cpu", dtype="float32", batch_size="1", seq_len="64", num_heads="4",
               head_dim="8", is_peer="false", backend="sdpa", status="ok", time_ms="1.5")
    (tmp_path / schema.RESULTS_FILE).write_text(csv_line(old_columns) + csv_line(row[c] for c in old_columns))
    frame, _ = load_runs([tmp_path])
    assert len(frame) == 1 and frame["num_kv_heads"].isna().all() and frame["time_ms"].iloc[0] == 1.5
