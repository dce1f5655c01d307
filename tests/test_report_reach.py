"""The long-suite report (issue 18 item 3): predicted beside measured memory, extrapolated times kept apart from
measured ones, max_len cuts shown as such, and a partial run read as partial. All on synthetic rows
(:mod:`report_synthetic`) whose cost laws give every expected number."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from report_synthetic import Series, linear, make_rows, quadratic, write_run  # noqa: E402

from efficient_attn.report import plots as plots_module  # noqa: E402
from efficient_attn.report.analyses.budget import budget_rows  # noqa: E402
from efficient_attn.report.analyses.overview import status_rows  # noqa: E402
from efficient_attn.report.analyses.reach import (  # noqa: E402
    extrapolation_rows,
    planned_cells,
    prediction_rows,
    unrun_cells,
)
from efficient_attn.report.build import build_report  # noqa: E402
from efficient_attn.report.format import format_bytes, format_ms  # noqa: E402
from efficient_attn.report.load import ABOVE_MAX_LEN, load_runs, shown_status  # noqa: E402
from efficient_attn.report.palette import series_palette  # noqa: E402
from efficient_attn.report.plots import STATUS_MARKERS  # noqa: E402

LENGTHS = [1024, 2048, 4096, 8192, 16384]
MAX_LEN_NOTE = "above this suite's max_len for fwd (8192)"  # what harness/cell.py writes (test_sweep checks the prefix)
BUDGET_NOTE = "predicted 19.3 GB > budget 8.0 GB"
SDPA_MS = 1.5e-5  # full:sdpa time = SDPA_MS * n**2 ms: an exact power law, so the extrapolation is exact
MEM_UNDER = 1.25  # window's measured peak / its prediction


def long_series() -> list[Series]:
    """full:sdpa cut by max_len at 16K forward; window measured everywhere (its prediction 1.25x low) except an
    over-budget fwd_bwd cell at 16K that keeps its prediction."""
    return [
        Series("full", "sdpa", quadratic(SDPA_MS), linear(4000.0),
               failures={("fwd", 16384): ("skipped_budget", MAX_LEN_NOTE)}),
        Series("window", "torch", linear(2e-3, 0.4), linear(3000.0), params={"window_size": 256},
               failures={("fwd_bwd", 16384): ("skipped_budget", BUDGET_NOTE)}),
    ]


def long_rows():
    rows = make_rows(long_series(), LENGTHS)
    rows["predicted_mem_bytes"] = rows["predicted_mem_bytes"].replace("", float("nan")).astype(float)
    window = rows["variant"] == "window"
    rows.loc[window, "predicted_mem_bytes"] /= MEM_UNDER
    cut = rows["note"] == MAX_LEN_NOTE
    rows.loc[cut, "predicted_mem_bytes"] = float("nan")  # the harness never traces a max_len cut
    return rows


def config(variants: list[dict]) -> dict:
    return {"config": {"name": "long", "device": "cpu", "budget_gb": None, "lengths": LENGTHS,
                       "modes": ["fwd", "fwd_bwd"], "seed": 0, "variants": variants}}


FULL_VARIANTS = [
    {"key": "full", "backends": ["sdpa"], "params": {}, "max_len": {"fwd": 8192}},
    {"key": "window", "backends": ["torch"], "params": {"window_size": 256}},
]


@pytest.fixture()
def long_run(tmp_path):
    return write_run(tmp_path / "long", long_rows(), extra=config(FULL_VARIANTS))


def test_shown_status_tells_a_max_len_cut_from_a_budget_skip():
    assert shown_status("skipped_budget", MAX_LEN_NOTE) == ABOVE_MAX_LEN
    assert shown_status("skipped_budget", BUDGET_NOTE) == "skipped_budget"
    assert shown_status("oom", MAX_LEN_NOTE) == "oom"
    assert shown_status("ok", "") == "ok"


def test_status_table_and_notes_say_above_max_len(long_run):
    frame, _ = load_runs([long_run])
    header, rows, notes = status_rows(frame)
    assert ABOVE_MAX_LEN in header and "skipped_budget" in header
    full = next(r for r in rows if r[1] == "full:sdpa")
    assert full[header.index(ABOVE_MAX_LEN)] == "1" and full[header.index("skipped_budget")] == "0"
    window = next(r for r in rows if r[1] == "window:torch")
    assert window[header.index("skipped_budget")] == "1" and window[header.index(ABOVE_MAX_LEN)] == "0"
    assert any("full:sdpa, fwd at 16K: **above_max_len**" in n for n in notes)


def test_plot_marks_a_max_len_cut_with_its_own_marker(long_run, tmp_path):
    frame, _ = load_runs([long_run])
    seen: list[tuple[float, str, str]] = []
    original = plots_module._mark

    def spy(ax, x, row_slot, marker, colour, top, hollow=False):
        seen.append((x, marker, colour))
        return original(ax, x, row_slot, marker, colour, top, hollow)

    plots_module._mark = spy
    try:
        plots_module._metric_figure(frame, "time_ms", "t", format_ms, "t", tmp_path / "t.png",
                                    series_palette(frame), ["long"], 40)
    finally:
        plots_module._mark = original
    palette = series_palette(frame)
    assert STATUS_MARKERS[ABOVE_MAX_LEN][0] != STATUS_MARKERS["skipped_budget"][0]
    assert (16384, STATUS_MARKERS[ABOVE_MAX_LEN][0], palette["full:sdpa"]) in seen
    assert (16384, STATUS_MARKERS["skipped_budget"][0], palette["window:torch"]) in seen
    assert (16384, STATUS_MARKERS["skipped_budget"][0], palette["full:sdpa"]) not in seen


def test_prediction_table_ratio_and_prediction_only_rows(long_run):
    frame, _ = load_runs([long_run])
    header, rows = prediction_rows(frame)
    at = {(r[1], r[2], r[3]): r for r in rows}
    ratio = header.index("measured / predicted")
    for n in ("1K", "2K", "4K", "8K", "16K"):
        assert at[("fwd", "window:torch", n)][ratio] == f"{MEM_UNDER:.2f}"
    for n in ("1K", "2K", "4K", "8K"):
        assert at[("fwd", "full:sdpa", n)][ratio] == "1.00"
    over = at[("fwd_bwd", "window:torch", "16K")]  # over budget: its prediction alone
    predicted = 3000.0 * 16384 * 3.0 / MEM_UNDER  # make_rows: fwd_bwd memory x3
    assert over[header.index("cell")] == "over budget"
    assert over[header.index("predicted peak")] == format_bytes(predicted)
    assert over[header.index("measured peak")] == "-" and over[ratio] == "-"
    # a max_len cut is never traced: neither number, so no row
    assert ("fwd", "full:sdpa", "16K") not in at


def test_extrapolated_time_from_the_fit_over_measured_lengths(long_run):
    frame, runs = load_runs([long_run])
    header, rows = extrapolation_rows(frame, runs)
    assert len(rows) == 2  # full:sdpa fwd at 16K (max_len) and window fwd_bwd at 16K (budget)
    sdpa = next(r for r in rows if r[2] == "full:sdpa")
    assert sdpa[1] == "fwd" and sdpa[3] == "16K" and sdpa[4] == "above max_len"
    assert sdpa[header.index("fit over")].startswith("1K..8K (4 pts")
    assert float(sdpa[header.index("time exponent")]) == pytest.approx(2.0, abs=0.005)
    expected = SDPA_MS * 16384**2
    assert sdpa[-1] == f"~{format_ms(expected)} (extrapolated, fit over 1K..8K)"
    window = next(r for r in rows if r[2] == "window:torch")
    assert window[4] == "over budget"


def test_extrapolated_numbers_stay_out_of_the_measured_tables(long_run):
    files = build_report([long_run], baseline="window:torch")
    text = files.markdown.read_text()
    extrapolated = format_ms(SDPA_MS * 16384**2)
    section = text.split("## Extrapolated times (not measured)")[1].split("\n## ")[0]
    assert extrapolated in section
    assert text.count(extrapolated) == 1  # nowhere else in the report
    assert "## Predicted beside measured memory" in text and "memory_predicted.png" in text
    assert any(p.kind == "memory_predicted" for p in files.plots)


def test_nothing_to_extrapolate_when_every_series_reaches_the_longest_length(tmp_path):
    rows = make_rows([Series("window", "torch", linear(2e-3, 0.4), linear(3000.0))], LENGTHS)
    run = write_run(tmp_path / "r", rows)
    frame, runs = load_runs([run])
    assert extrapolation_rows(frame, runs)[1] == []


def test_partial_run_reads_as_partial(tmp_path):
    """An interrupted run: window fwd stopped after 4K, full:sdpa never ran; the reach table says so and the
    planned cells are listed, max_len cuts apart."""
    rows = long_rows()
    keep = (rows["variant"] == "window") & ((rows["mode"] == "fwd_bwd") | (rows["seq_len"] <= 4096))
    run = write_run(tmp_path / "partial", rows[keep].reset_index(drop=True), extra=config(FULL_VARIANTS))
    frame, runs = load_runs([run])
    missing = unrun_cells(frame, runs[0])
    assert len(planned_cells(runs[0])) == 2 * 2 * len(LENGTHS)
    assert {(c.variant, c.mode, c.seq_len) for c in missing if c.variant == "window"} == {
        ("window", "fwd", 8192), ("window", "fwd", 16384)}
    capped = [c for c in missing if c.above_max_len]
    assert [(c.variant, c.mode, c.seq_len) for c in capped] == [("full", "fwd", 16384)]
    header, table = budget_rows(frame, runs)
    reach = {(r[1], r[2]): r[header.index("measured (longest ok)")] for r in table}
    assert reach[("fwd", "window:torch")] == "4K (run stopped before 8K: not measured)"
    assert reach[("fwd_bwd", "window:torch")] == "8K"  # 16K was over budget: no note
    text = build_report([run], baseline="window:torch").markdown.read_text()
    assert "- partial, window:torch, fwd at 8K, 16K" in text
    assert "- partial, full:sdpa, fwd at 1K, 2K, 4K, 8K (and above max_len: 16K)" in text


def test_complete_run_reach_notes(long_run):
    frame, runs = load_runs([long_run])
    assert unrun_cells(frame, runs[0]) == []
    header, table = budget_rows(frame, runs)
    reach = {(r[1], r[2]): r[header.index("measured (longest ok)")] for r in table}
    assert reach[("fwd", "window:torch")] == "16K (longest tried)"
    assert reach[("fwd", "full:sdpa")] == "8K (the suite's max_len)"
    text = build_report([long_run], baseline="window:torch").markdown.read_text()
    assert "Planned by the suite but not run" not in text


def test_prediction_plot_one_figure_per_condition(tmp_path):
    """Two batch sizes are two conditions: one predicted-vs-measured figure each, never one line through both."""
    import pandas as pd

    from efficient_attn.report.prediction_plot import make_prediction_plots

    one = long_rows()
    sixteen = one.copy()
    sixteen["batch_size"] = 16
    run = write_run(tmp_path / "two", pd.concat([one, sixteen], ignore_index=True))
    frame, _ = load_runs([run])
    plots = make_prediction_plots(frame, tmp_path / "out")
    assert sorted(p.path.name for p in plots) == ["memory_predicted__batch_1.png", "memory_predicted__batch_16.png"]
    assert all(p.path.stat().st_size > 1000 for p in plots)
