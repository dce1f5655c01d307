"""Level ``hf`` in the harness: a transformers LlamaModel cell of our ``full`` and of transformers' own ``sdpa``
through the sweep, its rows (``transformers_version``, ``attn_implementation``), what is unsupported there, where the
``transformers-*`` peers are refused, and that older run folders still read. Tiny shapes (4 heads x 8, 16-32
tokens, one layer), float32, CPU."""

from __future__ import annotations

import csv
import importlib.metadata
import json
from pathlib import Path

import pytest

from efficient_attn.harness import schema
from efficient_attn.harness.cell import HF_NOT_PREDICTED, make_row, precheck, static_status
from efficient_attn.harness.plan import Cell, PlannedCell, plan_cells
from efficient_attn.harness.runfolder import RunFolder, csv_line
from efficient_attn.harness.suite import SuiteError, load_suite, parse_suite
from efficient_attn.harness.sweep import open_run_folder, run_sweep
from efficient_attn.registry import build_attention

BENCH = Path(__file__).resolve().parents[1] / "bench"
HEADS, HEAD_DIM, DEPTH = 4, 8, 1


def hf_suite(**changes) -> dict:
    data = dict(level="hf", device="cpu", modes=["fwd", "fwd_bwd", "decode"], lengths=[16, 32], heads=HEADS,
                head_dim=HEAD_DIM, depth=DEPTH, causal=[True], min_run_time=0.01, slow_call_s=0.5, slow_repeats=1,
                variants=[{"key": "full", "backends": ["auto"]}], peers=[{"name": "transformers-sdpa"}])
    data.update(changes)
    return data


def hf_cell(variant: str = "full", mode: str = "fwd", **changes) -> Cell:
    fields = dict(variant=variant, params_json="{}", backend_requested="peer" if variant.startswith("transformers-")
                  else "auto", level="hf", mode=mode, causal=True, device="cpu", dtype="float32", batch_size=1,
                  seq_len=16, num_heads=HEADS, head_dim=HEAD_DIM, is_peer=variant.startswith("transformers-"))
    fields.update(changes)
    return Cell(**fields)


def test_hf_cells_run_through_the_sweep_and_record_what_ran(tmp_path):
    pytest.importorskip("transformers")
    version = importlib.metadata.version("transformers")
    suite = parse_suite(hf_suite(), name="hf_tiny")
    result = run_sweep(suite, tmp_path, device="cpu", include_peers=True, progress=False)
    rows = {(r["variant"], r["mode"], int(r["seq_len"])): r for r in result.rows}
    assert len(rows) == 2 * 3 * 2
    per_layer = build_attention("full", dim=HEADS * HEAD_DIM, num_heads=HEADS, causal=True)
    for n in (16, 32):
        for mode, factor in (("fwd", 1), ("fwd_bwd", 3)):
            ours, theirs = rows["full", mode, n], rows["transformers-sdpa", mode, n]
            assert ours["status"] == theirs["status"] == "ok", (ours["note"], theirs["note"])
            assert ours["transformers_version"] == theirs["transformers_version"] == version
            assert ours["attn_implementation"] == "efficient_attn:full" and theirs["attn_implementation"] == "sdpa"
            assert ours["backend"] not in ("", "peer", "auto") and theirs["backend"] == "peer"
            assert float(ours["time_ms"]) > 0 and float(theirs["time_ms"]) > 0
            assert float(ours["peak_mem_bytes"]) > 0 and float(theirs["peak_mem_bytes"]) > 0
            # the attention modules of this cell only (the registration shares modules across lengths): one a layer
            assert int(float(ours["flops_useful"])) == DEPTH * factor * int(per_layer.useful_flops(1, n))
            for row in (ours, theirs):  # measured, not predicted, and not refused for it
                assert row["predicted_mem_bytes"] == "" and HF_NOT_PREDICTED in row["note"]
        for variant in ("full", "transformers-sdpa"):
            decode = rows[variant, "decode", n]
            assert decode["status"] == "unsupported" and "level core or layer, not 'hf'" in decode["note"]
            assert decode["attn_implementation"] and decode["transformers_version"] == version
    with open(tmp_path / schema.RESULTS_FILE, newline="") as handle:
        assert tuple(next(csv.reader(handle))) == schema.ALL_COLUMNS


def test_rows_of_other_levels_leave_the_hf_columns_empty():
    row = make_row(Cell("full", "{}", "sdpa", "core", "fwd", False, "cpu", "float32", 1, 16, HEADS, HEAD_DIM),
                   status="ok", time_ms=1.0)
    assert row["transformers_version"] == row["attn_implementation"] == ""
    assert "transformers_version" not in schema.NUMERIC_COLUMNS and "attn_implementation" in schema.TEXT_COLUMNS


@pytest.mark.parametrize(
    "cell, expected",
    [
        (hf_cell(mode="decode"), "decode cells run at level core or layer, not 'hf'"),
        (hf_cell(mode="prefill"), "prefill cells run at level core or layer, not 'hf'"),
        (hf_cell(causal=False), "causal decoder"),
        (hf_cell("transformers-flex_attention", mode="fwd_bwd"), "no backward on CPU"),
        (hf_cell("hf-bigbird", is_peer=True, backend_requested="peer"), "does not run at level 'hf'"),
        (hf_cell("linformer"), "cannot be causal"),
        (hf_cell("transformers-sdpa", level="layer"), "runs at level 'hf' only, not 'layer'"),  # e.g. --level layer
    ],
)
def test_what_level_hf_cannot_run_is_unsupported_with_the_reason(cell, expected):
    status, note = static_status(PlannedCell(cell))
    assert status == "unsupported" and expected in note


def test_hf_cells_are_measured_not_predicted_and_never_refused_for_it():
    for cell in (hf_cell(), hf_cell("transformers-sdpa", mode="fwd_bwd")):
        check = precheck(PlannedCell(cell), budget_bytes=1)  # a budget nothing fits: still runs
        assert check.status is None and check.prediction is None and check.note == HF_NOT_PREDICTED


def test_transformers_peers_run_at_level_hf_only_and_hf_takes_no_other_peer():
    with pytest.raises(SuiteError, match=r"peers\[0\]\.name: peer 'transformers-sdpa' .* runs at level 'hf' only, "
                                         r"not at this suite's level 'layer'"):
        parse_suite(hf_suite(level="layer", modes=["fwd"]), name="x", where="x.toml")
    with pytest.raises(SuiteError, match=r"at level 'hf' the peers are transformers' own implementations "
                                         r"\(transformers-sdpa, .*did you mean 'transformers-sdpa'"):
        parse_suite(hf_suite(peers=[{"name": "transformers-spda"}]), name="x", where="x.toml")
    with pytest.raises(SuiteError, match=r"at level 'hf' the peers are"):
        parse_suite(hf_suite(peers=[{"name": "hf-bigbird"}]), name="x", where="x.toml")


def test_every_bench_suite_loads_and_hf_llama_plans_its_cells():
    for path in sorted(BENCH.glob("*.toml")):
        load_suite(path)
    assert not (BENCH / "pending").exists()
    suite = load_suite("hf_llama")
    cells = [p.cell for p in plan_cells(suite, "cpu", include_peers=True)]
    variants = {"full", "window", "transformers-sdpa", "transformers-eager", "transformers-flex_attention"}
    assert {c.variant for c in cells} == variants and len(cells) == len(variants) * 2 * 5
    assert all(c.level == "hf" and c.causal and c.dim == 256 for c in cells)
    unsupported = [c for c in cells if static_status(PlannedCell(c)) is not None]
    assert {(c.variant, c.mode) for c in unsupported} == {("transformers-flex_attention", "fwd_bwd")}


def _write_folder(path: Path, columns: tuple[str, ...], version: int) -> dict:
    row = {c: "" for c in columns}
    row.update(variant="full", params_json="{}", backend_requested="sdpa", level="core", mode="fwd", causal="false",
               device="cpu", dtype="float32", batch_size="1", seq_len="64", num_heads="4", head_dim="8",
               is_peer="false", backend="sdpa", status="ok", time_ms="1.5")
    (path / schema.RESULTS_FILE).write_text(csv_line(columns) + csv_line(row[c] for c in columns))
    config = {"suite": "x"}
    meta = {"schema_version": version, "config": config, "environment": {}, "sessions": [], "wall_s": 0.0}
    (path / schema.META_FILE).write_text(json.dumps(meta))
    return config


def _upgraded(path: Path) -> dict[str, str]:
    with open(path / schema.RESULTS_FILE, newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    assert list(row) == list(schema.ALL_COLUMNS)
    assert row["time_ms"] == "1.5" and row["transformers_version"] == row["attn_implementation"] == ""
    return row


def test_a_v3_run_folder_still_resumes_and_reports(tmp_path):
    from efficient_attn.report.load import load_run

    assert schema.COLUMNS_BY_VERSION[schema.SCHEMA_VERSION] == schema.ALL_COLUMNS
    assert all("attn_implementation" not in schema.COLUMNS_BY_VERSION[v] for v in (1, 2, 3))
    config = _write_folder(tmp_path, schema.COLUMNS_BY_VERSION[3], 3)
    assert load_run(tmp_path).results["time_ms"].tolist() == [1.5]  # the report reads it as it is
    open_run_folder(tmp_path, config).close()  # a resume upgrades it
    _upgraded(tmp_path)
    assert load_run(tmp_path).results["time_ms"].tolist() == [1.5]


def test_a_v4_folder_without_the_hf_columns_upgrades_through_the_sweep(tmp_path):
    """Schema 5 added the two hf columns: a v4 folder (reports/decode-cpu) resumes through the sweep's run folder."""
    assert schema.SCHEMA_VERSION >= 5 and schema.COLUMNS_BY_VERSION[4] in schema.OLDER_COLUMNS
    assert schema.COLUMNS_BY_VERSION[4] == tuple(c for c in schema.ALL_COLUMNS if c not in schema.HF_COLUMNS)
    config = _write_folder(tmp_path, schema.COLUMNS_BY_VERSION[4], 4)
    open_run_folder(tmp_path, config).close()
    _upgraded(tmp_path)


def test_a_workload_holds_the_attention_modules_of_its_own_cell_only():
    """One registration keeps a module per layer and dtype (shared by its models): a cell reports its own."""
    pytest.importorskip("transformers")
    from efficient_attn.harness import hf_workload
    from efficient_attn.harness.workloads import build_workload

    other = build_workload(hf_cell(dtype="bfloat16"), depth=2)
    other.run()
    work = build_workload(hf_cell(), depth=2)
    assert work.attentions == [] and work.useful_flops is None  # built on the first call
    work.run()
    assert len(hf_workload.attention_modules_for(hf_cell())) >= 4  # both cells' modules in the registration
    assert len(work.attentions) == 2 and work.last_backend is not None
    assert work.useful_flops == 2 * int(work.attentions[0].useful_flops(1, 16))
    assert build_workload(hf_cell("transformers-sdpa"), depth=2).attentions == []


def test_the_predictor_refuses_an_hf_cell_clearly():
    from efficient_attn.harness.predict import predict_cell

    with pytest.raises(ValueError, match="level 'hf' is measured, not predicted"):
        predict_cell(hf_cell())
