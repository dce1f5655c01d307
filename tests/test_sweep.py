"""Sweeps in-process: rows, resume after a kill, failing and OOM cells, budgets, unsupported cells, config checks."""

import csv
import json
from unittest import mock

import pytest
import torch

from efficient_attn.attention.full import FullAttention
from efficient_attn.harness import cell as harness_cell
from efficient_attn.harness import schema
from efficient_attn.harness import sweep
from efficient_attn.harness.cell import Timing, run_cell, static_status
from efficient_attn.harness.plan import Cell, PlannedCell, plan_cells
from efficient_attn.harness.runfolder import ConfigMismatchError, read_rows
from efficient_attn.harness.schema import CONFIG_COLUMNS, NUMERIC_COLUMNS
from efficient_attn.harness.suite import parse_suite
from efficient_attn.harness.sweep import dry_run, open_run_folder, run_sweep

LENGTHS = [32, 64, 128]


def tiny_suite(**changes):
    data = {
        "device": "cpu",
        "modes": ["fwd"],
        "lengths": LENGTHS,
        "heads": 2,
        "head_dim": 8,
        "min_run_time": 0.01,
        "variants": [{"key": "full", "backends": ["naive", "sdpa"]}],
    }
    data.update(changes)
    return parse_suite(data, name="tiny")


def keys(rows):
    return [tuple(r[c] for c in CONFIG_COLUMNS) for r in rows]


def test_rows_are_complete_and_consistent(tmp_path):
    result = run_sweep(tiny_suite(), tmp_path, progress=False)
    rows = read_rows(tmp_path / "results.csv")
    assert len(rows) == 6 and result.cells_run == 6
    assert {r["status"] for r in rows} == {"ok"}
    for r in rows:
        n, h, d = int(r["seq_len"]), 2, 8
        assert r["backend"] == r["backend_requested"]
        assert int(r["flops_useful"]) == 4 * h * n * n * d
        assert int(r["flops_computed"]) == 4 * h * n * n * d  # naive bmm and the fused kernel agree in forward
        assert int(r["peak_mem_bytes"]) == int(r["predicted_mem_bytes"]) > 0
        assert float(r["time_ms"]) > 0 and int(r["timed_runs"]) >= 5
        assert float(r["tokens_per_s"]) == pytest.approx(n / (float(r["time_ms"]) / 1e3), rel=1e-3)
        assert int(r["padded_len"]) == n
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["config"]["lengths"] == LENGTHS and meta["config"]["seed"] == 0
    assert meta["wall_s"] > meta["timed_window_s"] > 0
    assert meta["sessions"][0]["cells_run"] == 6
    for field in ("torch", "python", "cpu_model", "torch_threads", "git_commit", "device_name", "libraries"):
        assert field in meta["environment"]


def test_resume_after_a_kill_neither_duplicates_nor_loses(tmp_path):
    suite = tiny_suite()
    real_run_cell = sweep.run_cell
    calls = []

    def killed_at_third(planned, **kwargs):
        calls.append(planned.cell.key())
        if len(calls) == 3:
            raise KeyboardInterrupt  # as Ctrl-C (or a kill) would stop it in the middle of a cell
        return real_run_cell(planned, **kwargs)

    with mock.patch.object(sweep, "run_cell", killed_at_third), pytest.raises(KeyboardInterrupt):
        run_sweep(suite, tmp_path, progress=False)
    first = read_rows(tmp_path / "results.csv")
    assert len(first) == 2
    # a kill while writing leaves half a line: it must be dropped and its cell rerun
    with open(tmp_path / "results.csv", "a", encoding="utf-8") as handle:
        handle.write("full,{},sdpa,core,fwd,false,cpu,float32,1,32,2")
    result = run_sweep(suite, tmp_path, progress=False)
    rows = read_rows(tmp_path / "results.csv")
    expected = [p.cell.key() for p in plan_cells(suite, "cpu")]
    assert sorted(keys(rows)) == sorted(expected)  # nothing missing, nothing twice
    assert rows[:2] == first  # finished cells were not rerun
    assert result.cells_run == 4 and result.cells_skipped_resumed == 2
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert [s["interrupted"] for s in meta["sessions"]] == [True, False]
    # a third run has nothing left to do
    assert run_sweep(suite, tmp_path, progress=False).cells_run == 0


def test_a_failing_cell_is_recorded_and_the_sweep_goes_on(tmp_path):
    real = harness_cell.measure_cell

    def flaky(cell, **kwargs):
        if cell.backend_requested == "sdpa" and cell.seq_len == 64:
            raise RuntimeError("boom: injected failure\nsecond line")
        return real(cell, **kwargs)

    with mock.patch.object(harness_cell, "measure_cell", flaky):
        result = run_sweep(tiny_suite(), tmp_path, progress=False)
    by_status = {(r["backend_requested"], r["seq_len"]): r for r in result.rows}
    bad = by_status[("sdpa", "64")]
    assert bad["status"] == "error" and bad["note"].startswith("RuntimeError: boom: injected failure")
    assert "second line" not in bad["note"]
    assert all(bad[c] == "" for c in NUMERIC_COLUMNS if c != "predicted_mem_bytes")
    assert [r["status"] for r in result.rows].count("ok") == 5
    assert by_status[("sdpa", "128")]["status"] == "ok"  # an error does not skip longer lengths


def test_oom_marks_longer_lengths_skipped_and_survives_resume(tmp_path):
    real = harness_cell.measure_cell

    def oom_at_64(cell, **kwargs):
        if cell.backend_requested == "naive" and cell.seq_len >= 64:
            raise torch.OutOfMemoryError("injected: out of memory")
        return real(cell, **kwargs)

    suite = tiny_suite(lengths=[32, 64, 128, 256])
    with mock.patch.object(harness_cell, "measure_cell", side_effect=oom_at_64) as patched:
        result = run_sweep(suite, tmp_path, progress=False)
    status = {(r["backend_requested"], int(r["seq_len"])): r for r in result.rows}
    assert status[("naive", 32)]["status"] == "ok"
    assert status[("naive", 64)]["status"] == "oom"
    assert status[("naive", 128)]["status"] == status[("naive", 256)]["status"] == "skipped_after_oom"
    assert "64" in status[("naive", 128)]["note"]
    assert all(status[("sdpa", n)]["status"] == "ok" for n in (32, 64, 128, 256))
    measured = [c.args[0] for c in patched.call_args_list]
    assert not any(c.backend_requested == "naive" and c.seq_len > 64 for c in measured)  # never tried
    # resume after dropping the last naive rows: the OOM is remembered, they are skipped again
    rows = read_rows(tmp_path / "results.csv")
    kept = [r for r in rows if not (r["backend_requested"] == "naive" and int(r["seq_len"]) > 64)]
    with open(tmp_path / "results.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    again = run_sweep(suite, tmp_path, progress=False)
    assert again.cells_run == 2
    assert {r["status"] for r in again.rows if r["backend_requested"] == "naive" and int(r["seq_len"]) > 64} == {
        "skipped_after_oom"
    }


def test_cuda_oom_is_caught_and_the_cache_emptied():
    cell = Cell("full", "{}", "sdpa", "core", "fwd", False, "cuda", "float32", 1, 64, 2, 8)
    empty_cache = mock.Mock()
    with mock.patch.object(harness_cell, "measure_cell", side_effect=torch.OutOfMemoryError("CUDA out of memory")), \
            mock.patch.object(torch.cuda, "empty_cache", empty_cache):
        row, window = run_cell(PlannedCell(cell), budget_bytes=None, timing=Timing())
    assert row["status"] == "oom" and "CUDA out of memory" in row["note"]
    assert row["device"] == "cuda" and row["time_ms"] == "" and window == 0.0
    empty_cache.assert_called()


def test_budget_skips_cells_predicted_not_to_fit(tmp_path):
    result = run_sweep(tiny_suite(lengths=[32, 4096]), tmp_path, budget_gb=40 * 2**20 / 2**30, progress=False)
    status = {(r["backend_requested"], int(r["seq_len"])): r for r in result.rows}
    big = status[("naive", 4096)]  # two (2, 4096, 4096) float32 tensors: 256 MiB
    assert big["status"] == "skipped_budget"
    assert "predicted" in big["note"] and "budget" in big["note"]
    assert int(big["predicted_mem_bytes"]) >= 2 * 4096 * 4096 * 4
    assert big["time_ms"] == "" and big["peak_mem_bytes"] == ""
    assert status[("sdpa", 4096)]["status"] == "ok"  # the fused kernel fits
    assert status[("naive", 32)]["status"] == "ok"


def test_suite_length_caps_and_unsupported_cells(tmp_path):
    suite = tiny_suite(
        modes=["fwd", "fwd_bwd"],
        causal=[True],
        lengths=[32, 64],
        variants=[
            {"key": "full", "backends": ["naive"], "max_len": {"fwd_bwd": 32}},
            {"key": "linformer", "backends": ["torch"], "params": {"k": 16}},
        ],
    )
    result = run_sweep(suite, tmp_path, progress=False)
    status = {(r["variant"], r["mode"], int(r["seq_len"])): r for r in result.rows}
    assert status[("full", "fwd_bwd", 32)]["status"] == "ok"
    capped = status[("full", "fwd_bwd", 64)]
    assert capped["status"] == "skipped_budget" and capped["note"].startswith(schema.MAX_LEN_NOTE)  # the report keys on it
    for n in (32, 64):
        row = status[("linformer", "fwd", n)]
        assert row["status"] == "unsupported" and "causal" in row["note"]
        assert all(row[c] == "" for c in NUMERIC_COLUMNS)


def test_backend_unavailable_is_unsupported_with_the_reason(tmp_path):
    def reason(cls, backend, device, needs_grad, dtype=None):
        return "needs a GPU (injected)" if backend == "sdpa" and needs_grad else None

    with mock.patch.object(FullAttention, "unavailable_reason", classmethod(reason)):
        result = run_sweep(tiny_suite(modes=["fwd", "fwd_bwd"], lengths=[32]), tmp_path, progress=False)
    status = {(r["backend_requested"], r["mode"]): r for r in result.rows}
    assert status[("sdpa", "fwd_bwd")]["status"] == "unsupported"
    assert "needs a GPU (injected)" in status[("sdpa", "fwd_bwd")]["note"]
    assert status[("sdpa", "fwd")]["status"] == status[("naive", "fwd_bwd")]["status"] == "ok"


def test_a_different_config_for_the_same_folder_is_an_error(tmp_path):
    run_sweep(tiny_suite(lengths=[32]), tmp_path, progress=False)
    with pytest.raises(ConfigMismatchError, match="different config.*lengths"):
        run_sweep(tiny_suite(lengths=[32, 64]), tmp_path, progress=False)
    with pytest.raises(ConfigMismatchError, match="different config"):
        open_run_folder(tmp_path, {"something": "else"})


def test_dry_run_runs_nothing_and_writes_nothing(tmp_path):
    out = tmp_path / "never"
    with mock.patch.object(harness_cell, "measure_cell", side_effect=AssertionError("dry run measured a cell")):
        plan = dry_run(tiny_suite(lengths=[32, 4096]), out_dir=out, budget_gb=40 * 2**20 / 2**30)
    assert not out.exists()
    status = {(p.cell.backend_requested, p.cell.seq_len): (pred, st) for p, pred, st, _ in plan}
    assert status[("naive", 4096)][1] == "skipped_budget" and status[("naive", 4096)][0] >= 2 * 4096 * 4096 * 4
    assert status[("sdpa", 32)][1] == "run" and status[("sdpa", 32)][0] > 0


def test_peers_are_cells_only_when_asked():
    suite = tiny_suite(peers=[{"name": "linformer", "params": {"k": 16}}], causal=[False, True], level="layer")
    assert not any(p.cell.is_peer for p in plan_cells(suite, "cpu"))
    peers = [p for p in plan_cells(suite, "cpu", include_peers=True) if p.cell.is_peer]
    assert len(peers) == len(LENGTHS) * 2 and all(p.cell.level == "layer" for p in peers)
    causal = next(p for p in peers if p.cell.causal)
    assert static_status(causal) == ("unsupported", "peer 'linformer' has no causal mode")


@pytest.mark.slow
def test_isolated_cell_reports_peak_rss(tmp_path):
    suite = tiny_suite(variants=[{"key": "full", "backends": ["naive"]}], lengths=[1024])
    result = run_sweep(suite, tmp_path, isolate=True, progress=False)
    (row,) = result.rows
    assert row["status"] == "ok", row["note"]
    # the (2, 1024, 1024) float32 scores and softmax: 16 MiB of tensors; RSS sees at least one of them
    assert int(row["peak_rss_bytes"]) >= 8 * 2**20
    assert int(row["peak_mem_bytes"]) == int(row["predicted_mem_bytes"])
