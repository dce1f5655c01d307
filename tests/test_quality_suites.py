"""The quality suites under bench/quality and the MQAR report: the quick suite end to end through the CLI, the
curve and heads-sweep plans, the schema-1 upgrade, and the report's curve/heads numbers on synthetic rows."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pandas as pd
import pytest

from efficient_attn.cli import main
from efficient_attn.quality import report as qreport
from efficient_attn.quality.suite import (
    HEAD_COLUMNS,
    RESULT_COLUMNS,
    V1_COLUMNS,
    load_suite,
    open_run_folder,
    plan_cells,
    unsupported_reason,
)

BENCH = Path(__file__).resolve().parents[1] / "bench" / "quality"


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_quick_suite_end_to_end_through_the_cli(tmp_path: Path) -> None:
    out = tmp_path / "quick"
    assert main(["quality", "--suite", str(BENCH / "quick.toml"), "--out", str(out), "--no-progress",
                 "--threads", "1"]) == 0
    rows = _rows(out / "results.csv")
    suite = load_suite(BENCH / "quick.toml")
    assert len(rows) == len(plan_cells(suite)) == 7
    by_status = {r["variant"]: r["status"] for r in rows}
    assert by_status["linformer"] == "unsupported"
    linformer = next(r for r in rows if r["variant"] == "linformer")
    assert "cannot be causal" in linformer["note"] and linformer["accuracy"] == ""
    assert all(r["status"] == "ok" for r in rows if r["variant"] != "linformer")
    # the curve's knob values and the pairs sweep land in the key columns
    assert {json.loads(r["params_json"]).get("window_size") for r in rows if r["variant"] == "window"} == {2, 4, 8}
    assert {json.loads(r["task_params_json"])["num_pairs"] for r in rows} == {1, 2}
    # the heads sweep records its head metrics; cells outside it leave them empty
    sweep = [r for r in rows if r["variant"] == "full" and json.loads(r["task_params_json"])["num_pairs"] == 2]
    assert {r["num_heads"] for r in sweep} == {"1", "2"}
    assert all(r["max_drop"] != "" and r["important_heads"] != "" for r in sweep)
    assert next(r for r in sweep if r["num_heads"] == "2")["output_cosine"] != ""
    assert all(r[c] == "" for r in rows if r["variant"] == "window" for c in HEAD_COLUMNS)
    # trained full against causal full attention: exactly zero (the reference has the model's causality)
    trained = [r for r in _rows(out / "errors.csv") if r["source"] == "trained" and r["variant"] == "full"]
    assert trained and all(float(r["rel_error"]) == 0.0 for r in trained)
    text = (out / "report.md").read_text()
    assert "## State-size curves" in text and "## How many heads help?" in text and "cannot be causal" in text
    for name in ("state_size_curves.png", "pairs_curve.png", "heads.png", "errors.png"):
        assert (out / name).stat().st_size > 1000, name


def test_mqar_curves_and_heads_suites_plan_what_they_promise() -> None:
    curves = load_suite(BENCH / "mqar_curves.toml")
    cells = plan_cells(curves)
    windows = {json.loads(c.params_json)["window_size"] for c in cells
               if c.variant == "window" and json.loads(c.task_params_json)["num_pairs"] == 4}
    assert {4, 8, 16, 32} <= windows
    assert {c.variant for c in cells} >= {"full", "window", "performer", "bigbird", "longformer"}
    pairs = {json.loads(c.task_params_json)["num_pairs"] for c in cells if c.variant == "window"
             and json.loads(c.params_json) == {"window_size": 16}}
    assert len(pairs) >= 3
    assert all(len({c.seed for c in cells if (c.variant, c.params_json, c.task_params_json) == key}) >= 3
               for key in {(c.variant, c.params_json, c.task_params_json) for c in cells})
    assert {unsupported_reason("mqar", v) is not None for v in ("linformer", "nystrom")} == {True}
    heads = load_suite(BENCH / "heads.toml")
    sweep = heads.heads_sweep
    assert sweep is not None and sweep.num_heads == [1, 2, 4, 8, 16] and sweep.seeds >= 3 and sweep.head_metrics
    assert len(plan_cells(heads)) == 5 * sweep.seeds  # the grid's 1-head cells are the sweep's own


def test_suite_rejects_bad_curves_and_task_params(tmp_path: Path) -> None:
    base = (BENCH / "quick.toml").read_text()
    cases = [
        (base.replace("num_pairs = 2, num_keys", "num_pears = 2, num_keys"), "num_pears"),
        (base.replace('variant = "window"\nvalues = [2, 8]', 'variant = "windw"\nvalues = [2, 8]'), "windw"),
        (base.replace('param = "num_pairs"\nwhere = "task"', 'param = "num_pairs"\nwhere = "tsk"'), "where"),
        (base.replace('variant = "window"\nvalues = [2, 8]', 'variant = "window"\nvalues = []'), "non-empty"),
        (base.replace('values = [2, 8]', 'values = [2, 8]\nvalus = [1]'), "valus"),
    ]
    for index, (text, match) in enumerate(cases):
        path = tmp_path / f"bad{index}.toml"
        path.write_text(text)
        with pytest.raises((ValueError, KeyError, TypeError), match=match):
            load_suite(path)


def test_a_schema_1_table_is_upgraded_on_resume(tmp_path: Path) -> None:
    path = tmp_path / "v1.toml"
    path.write_text('tasks = ["recall"]\nvariants = ["full"]\nlengths = [32]\n[train]\ndim = 16\nnum_heads = 2\n')
    suite = load_suite(path)
    out = tmp_path / "old"
    open_run_folder(out, suite).close()
    # what a schema-1 run left: its columns, and a config without task params or curves
    meta = json.loads((out / "meta.json").read_text())
    meta["schema_version"] = 1
    del meta["config"]["task_params"], meta["config"]["curves"]
    (out / "meta.json").write_text(json.dumps(meta))
    old_row = {c: "" for c in V1_COLUMNS}
    old_row.update(task="recall", variant="full", params_json="{}", seq_len="32", seed="0", num_heads="2",
                   status="ok", accuracy="0.5")
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=V1_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerow(old_row)
    folder = open_run_folder(out, suite)
    try:
        rows = folder.rows()
        assert all(c.key() in folder.finished for c in plan_cells(suite))  # the old row is this cell: not rerun
    finally:
        folder.close()
    assert len(rows) == 1 and rows[0]["task_params_json"] == "{}" and rows[0]["accuracy"] == "0.5"
    assert list(_rows(out / "results.csv")[0]) == list(RESULT_COLUMNS)
    assert json.loads((out / "meta.json").read_text())["schema_version"] == 2


# ------------------------------------------------------------------------------------- report on synthetic rows
def _synthetic_run(tmp_path: Path, head_accuracy: dict[int, list[float]], cosines: dict[int, float]) -> Path:
    """A run folder of mqar_curves + a heads sweep with made-up accuracies (no training)."""
    text = (BENCH / "mqar_curves.toml").read_text() + (
        '\n[heads_sweep]\nvariant = "full"\ntask = "mqar"\nseq_len = 64\nnum_heads = [1, 2, 4, 8]\nseeds = 3\n'
        "head_metrics = true\n")
    path = tmp_path / "s.toml"
    path.write_text(text)
    suite = load_suite(path)
    out = tmp_path / "run"
    folder = open_run_folder(out, suite)
    window_acc = {4: 0.08, 8: 0.14, 16: 0.5, 32: 0.9, 64: 1.0}
    try:
        for cell in plan_cells(suite):
            params = json.loads(cell.params_json)
            pairs = json.loads(cell.task_params_json)["num_pairs"]
            row = {c: "" for c in RESULT_COLUMNS}
            row.update({k: str(v) for k, v in cell.__dict__.items()})
            row.update(dim="64", depth="2", batch_size="64", steps_budget="1000", status="ok",
                       majority_accuracy="0.07", steps_per_s="10", peak_mem_bytes="1000000", train_s="60",
                       train_cpu_s="55")
            if reason := unsupported_reason(cell.task, cell.variant):
                row.update(status="unsupported", note=reason, majority_accuracy="")
            elif cell.variant == "full" and cell.num_heads != 1 or (cell.variant == "full" and pairs == 4):
                acc = head_accuracy[cell.num_heads][cell.seed]
                row.update(accuracy=str(acc), output_cosine=str(cosines.get(cell.num_heads, "")) if
                           cell.num_heads > 1 else "", map_cosine="0.5" if cell.num_heads > 1 else "",
                           important_heads=str(min(cell.num_heads, 2)), max_drop="0.3")
            elif cell.variant == "window" and pairs == 4:
                row.update(accuracy=str(window_acc[params["window_size"]] + 0.01 * cell.seed))
            else:
                row.update(accuracy=str(1.0 / pairs))
            folder.append(row)
    finally:
        folder.close()
    return out


def test_report_curves_and_heads_from_synthetic_rows(tmp_path: Path) -> None:
    heads = {1: [1.0, 0.98, 0.99], 2: [0.5, 0.6, 0.7], 4: [0.8, 0.8, 0.8], 8: [0.805, 0.8, 0.8]}
    cosines = {2: 0.2, 4: 0.5, 8: 0.9}
    out = _synthetic_run(tmp_path, heads, cosines)
    text = qreport.write_report(out).read_text()
    suite = qreport._load_suite(out)
    knobs, pairs = qreport.curve_tables(pd.read_csv(out / "results.csv"), suite)
    window = knobs[knobs["variant"] == "window"].set_index("value")
    assert window.loc[4, "n"] == 3 and math.isclose(window.loc[4, "mean"], 0.09)
    assert math.isclose(window.loc[16, "std"], 0.01)
    assert window.loc[32, "accuracies"] == [0.9, 0.91, 0.92]
    assert set(pairs["value"]) == {1, 2, 8} and set(pairs["label"]) == {'window {"window_size": 16}', "full"}
    # full's mean at the default (the ceiling) is the mean of the three seeds
    assert "ceiling: 99.0 ± 1.0% over 3 seeds" in text
    assert "- window: 9.0% at window_size = 4 (90.0 points below full), 101.0% at 64." in text
    # heads: 1 head is best, nothing larger gains a point: the stall is at 1
    table = qreport.heads_table(pd.read_csv(out / "results.csv"), suite)
    assert list(table["num_heads"]) == [1, 2, 4, 8]
    assert qreport.stall_point(table) == 1
    assert "from **1 head**" in text and "| 8 | 80.2 ± 0.3 |" in text
    for name in ("state_size_curves.png", "pairs_curve.png", "heads.png"):
        assert (out / name).stat().st_size > 1000
    # MQAR counts (full 99.0 ± 1.0 vs majority 7): the LRA chart is drawn
    assert "| mqar | 64 | 99.0 | 1.0 | 7.0 |  | yes |" in text and (out / "lra_chart.png").exists()


def test_stall_point_and_similarity_verdict() -> None:
    rising = pd.DataFrame({"num_heads": [1, 2, 4, 8, 16], "acc_mean": [0.5, 0.7, 0.9, 0.905, 0.9],
                           "acc_std": [0.0] * 5, "output_cosine": [math.nan, 0.1, 0.4, 0.8, 0.9],
                           "map_cosine": [math.nan, 0.2, 0.5, 0.8, 0.9], "important_heads": [1, 2, 3, 2, 1],
                           "max_drop": [0.5, 0.3, 0.1, 0.02, 0.01], "accuracies": [[0.5]] * 5, "n": [3] * 5})
    assert qreport.stall_point(rising) == 4
    text = qreport.heads_paragraph(rising)
    # gains after 2, 4, 8 heads: +0.2, +0.005, -0.005 against similarity 0.1, 0.4, 0.8: strongly negative
    assert "from **4 heads**" in text and "cosine of 0.40" in text and "does predict the stall" in text
    flat = rising.assign(acc_mean=[0.9, 0.5, 0.6, 0.7, 0.8])  # keeps improving to 16: the stall is the last count
    assert qreport.stall_point(flat) == 1  # 1 head is never beaten by more than a point


def test_a_task_with_a_noisy_full_does_not_count() -> None:
    rows = pd.DataFrame({"task": ["listops"] * 3, "seq_len": [256] * 3, "variant": ["full"] * 3,
                         "status": ["ok"] * 3, "seed": [0, 1, 2], "accuracy": [0.9, 0.6, 0.75],
                         "majority_accuracy": [0.3] * 3})
    assert qreport.task_validity(rows)[("listops", 256)][0] is False  # margin 45 points, std 15: out
    steady = rows.assign(accuracy=[0.75, 0.76, 0.74])
    assert qreport.task_validity(steady)[("listops", 256)][0] is True
