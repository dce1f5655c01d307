"""Packed documents in the harness (issue 12): the ``documents`` suite key, the packed / padded / alone cells, their
schema columns, unsupported cells, and the report's side-by-side table."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from efficient_attn.harness import schema
from efficient_attn.harness.cell import Timing, run_cell, static_status
from efficient_attn.harness.plan import PACKINGS, Cell, PlannedCell, plan_cells
from efficient_attn.harness.suite import SuiteError, document_lengths, load_suite, parse_suite
from efficient_attn.harness.workloads import build_workload
from efficient_attn.report.analyses.packing import packing_rows

DOCS = "40,7,1,24"
TIMING = Timing(min_run_time=0.01, slow_call_s=0.5, slow_repeats=1)


def cell(variant: str, packing: str, *, backend: str = "auto", level: str = "core", mode: str = "fwd",
         params: dict | None = None, peer: bool = False) -> Cell:
    return Cell(variant, json.dumps(params or {}), backend, level, mode, True, "cpu", "float32", 1, 72, 2, 8, peer,
                None, packing, DOCS)


def test_schema_4_records_the_documents():
    assert schema.CONFIG_COLUMNS[-2:] == ("packing", "documents")
    assert all(c not in schema.COLUMNS_BY_VERSION[3] for c in ("packing", "documents"))
    assert Cell("full", "{}", "auto", "core", "fwd", True, "cpu", "float32", 1, 8, 2, 8).key()[-2:] == ("", "")


def test_the_documents_key():
    base = {"variants": [{"key": "full"}], "documents": [256, 1024, 64]}
    suite = parse_suite(base, "x")
    assert suite.documents == (256, 1024, 64) and suite.lengths == (1344,) and suite.batch_sizes == (1,)
    drawn = document_lengths({"count": 16, "min": 256, "max": 4096, "seed": 0, "multiple": 64}, "d")
    assert drawn == document_lengths({"count": 16, "min": 256, "max": 4096, "seed": 0, "multiple": 64}, "d")
    assert len(drawn) == 16 and all(256 <= n <= 4096 and n % 64 == 0 for n in drawn) and len(set(drawn)) > 4
    assert drawn != document_lengths({"count": 16, "min": 256, "max": 4096, "seed": 1, "multiple": 64}, "d")
    with pytest.raises(SuiteError, match="a suite with documents has no 'lengths'"):
        parse_suite({**base, "lengths": [64]}, "x")
    with pytest.raises(SuiteError, match="unknown key 'cout'"):
        parse_suite({**base, "documents": {"cout": 3, "min": 1, "max": 2}}, "x")
    with pytest.raises(SuiteError, match="min=9 is above max=2"):
        parse_suite({**base, "documents": {"count": 3, "min": 9, "max": 2}}, "x")


def test_a_packed_suite_plans_three_ways_per_variant():
    suite = load_suite("packed")
    cells = [p.cell for p in plan_cells(suite, "cpu")]
    assert len(cells) == len(suite.variants) * len(PACKINGS)
    assert {c.packing for c in cells} == set(PACKINGS)
    assert all(c.seq_len == sum(suite.documents) and c.batch_size == 1 for c in cells)
    assert all(c.document_lengths == suite.documents for c in cells) and len(suite.documents) == 16


@pytest.mark.parametrize("variant, params", [("full", {}), ("window", {"window_size": 4}),
                                             ("performer", {"num_features": 8})])
def test_the_three_ways_run_and_count_the_same_useful_work(variant, params):
    """Packed, padded and alone each run; their useful FLOPs are the documents' own (the library's packing tests
    prove the outputs equal each document alone)."""
    torch.manual_seed(0)
    outs = {}
    for packing in PACKINGS:
        work = build_workload(cell(variant, packing, params=params))
        outs[packing] = work
        work.run()
    # the useful work is the documents' own, whichever way they ran
    assert len({w.useful_flops for w in outs.values()}) == 1
    assert "padded: 4 rows of 40 tokens" in outs["padded"].note


def test_rows_and_notes():
    rows = {p: run_cell(PlannedCell(cell("window", p, params={"window_size": 4})), budget_bytes=None,
                        timing=TIMING)[0] for p in PACKINGS}
    assert all(r["status"] == "ok" for r in rows.values()), [r["note"] for r in rows.values()]
    assert {r["packing"] for r in rows.values()} == set(PACKINGS) and {r["documents"] for r in rows.values()} == {DOCS}
    assert "alone: 4 calls" in rows["alone"]["note"] and "88 of 160 padding" in rows["padded"]["note"]


@pytest.mark.parametrize(
    "c, expected",
    [
        (cell("bigbird", "packed", backend="flex"), "packs documents with backend torch or naive"),
        (cell("full", "packed", level="model"), "level core or layer"),
        (cell("full", "packed", mode="decode"), "no decode cells"),
        (cell("local-attention", "padded", level="layer", peer=True), "not a peer"),
    ],
)
def test_cells_that_cannot_pack_are_unsupported(c, expected):
    status, note = static_status(PlannedCell(c))
    assert status == "unsupported" and expected in note


def test_the_report_puts_the_three_side_by_side():
    base = {"run": "r", "series": "full:sdpa", "mode": "fwd", "causal": True, "documents": "100,300", "status": "ok"}
    frame = pd.DataFrame([
        {**base, "packing": "packed", "time_ms": 11.0, "peak_mem_bytes": 1e6},
        {**base, "packing": "padded", "time_ms": 30.0, "peak_mem_bytes": 3e6},
        {**base, "packing": "alone", "time_ms": 10.0, "peak_mem_bytes": 8e5},
        {**base, "packing": "", "time_ms": 1.0, "peak_mem_bytes": 1.0, "documents": ""},
    ])
    header, rows = packing_rows(frame)
    (row,) = rows
    assert row[3] == "2 (400 tokens, 100-300)" and row[7] == "1.10x" and row[8] == "3.00x"


@pytest.mark.parametrize("level", ["core", "layer"])
def test_a_packed_cell_is_predicted(level):
    """The memory predictor runs packed cells on fake tensors: the document ids stay real (a packed attend reads
    the boundaries), and the prediction is the measured first call's bytes."""
    from efficient_attn.harness.predict import predict_cell
    from efficient_attn.measure.storage import StorageTracker

    c = cell("full", "packed", backend="torch", level=level)
    predicted = predict_cell(c)
    assert predicted.total_bytes > 0
    work = build_workload(c)
    with StorageTracker() as tracker:
        work.run()
    assert predicted.first_call_bytes == tracker.peak_bytes
