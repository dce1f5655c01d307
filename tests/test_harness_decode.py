"""The harness's inference modes (issue 13): ``prefill`` and ``decode`` cells, schema 4's columns, the random cache
fill, unsupported cells, the decode suites, the transformers decode peer and the copy bandwidth."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from efficient_attn.harness import decoding, schema
from efficient_attn.harness.cell import Timing, run_cell, static_status
from efficient_attn.harness.plan import Cell, PlannedCell, plan_cells
from efficient_attn.harness.predict import predict_cell
from efficient_attn.harness.runfolder import RunFolder, csv_line
from efficient_attn.harness.suite import load_suite
from efficient_attn.harness.sweep import sweep_config
from efficient_attn.harness.workloads import build_workload
from efficient_attn.measure.bandwidth import copy_bandwidth, copy_bandwidth_cached
from efficient_attn.measure.timing import time_steps
from efficient_attn.registry import build_attention

STEPS = 4
TIMING = Timing(min_run_time=0.01, slow_call_s=0.5, slow_repeats=1, decode_steps=STEPS)
PARAMS = {"full": {}, "window": {"window_size": 8}, "longformer": {"window_size": 8, "global_tokens": 2},
          "bigbird": {"block_size": 8, "num_random_blocks": 1, "num_global_blocks": 1, "num_window_blocks": 3},
          "performer": {"num_features": 16}}


def cell(variant: str, mode: str = "decode", *, n: int = 64, b: int = 2, level: str = "core", causal: bool = True,
         backend: str = "auto", peer: bool = False, params: dict | None = None) -> Cell:
    params = PARAMS.get(variant, {}) if params is None else params
    return Cell(variant, json.dumps(params, sort_keys=True, separators=(",", ":")), backend, level, mode, causal,
                "cpu", "float32", b, n, 2, 8, peer)


@pytest.fixture(autouse=True)
def small_bandwidth_probe(monkeypatch):
    """A 1 GiB copy per test would be slow; the measurement itself is tested below."""
    monkeypatch.setattr(decoding, "copy_bandwidth_cached", lambda device: 1.25e9)


# --------------------------------------------------------------------------------------------------- schema 4
def test_schema_4_adds_the_inference_columns_and_keeps_version_3_readable(tmp_path):
    new = ("cache_bytes", "new_tokens", "bandwidth_bytes_per_s")
    assert schema.SCHEMA_VERSION >= 4 and all(c in schema.COLUMNS_BY_VERSION[4] for c in new)
    assert not any(c in schema.COLUMNS_BY_VERSION[3] for c in new)
    assert all(c not in schema.COLUMNS_BY_VERSION[v] for v in (1, 2, 3) for c in new)
    assert "num_kv_heads" in schema.COLUMNS_BY_VERSION[3] and schema.COLUMNS_BY_VERSION[schema.SCHEMA_VERSION] == schema.ALL_COLUMNS
    old_columns = schema.COLUMNS_BY_VERSION[3]
    row = {c: "" for c in old_columns}
    row.update(variant="full", params_json="{}", backend_requested="sdpa", level="core", mode="fwd", causal="false",
               device="cpu", dtype="float32", batch_size="1", seq_len="64", num_heads="4", head_dim="8",
               is_peer="false", backend="sdpa", status="ok", time_ms="1.5")
    (tmp_path / schema.RESULTS_FILE).write_text(csv_line(old_columns) + csv_line(row[c] for c in old_columns))
    meta = {"schema_version": 3, "config": {"suite": "x"}, "environment": {}, "sessions": [], "wall_s": 0.0}
    (tmp_path / schema.META_FILE).write_text(json.dumps(meta))
    older = tuple(cols for v, cols in schema.COLUMNS_BY_VERSION.items() if v < schema.SCHEMA_VERSION)
    folder = RunFolder(tmp_path, {"suite": "x"}, columns=schema.ALL_COLUMNS, key_columns=schema.CONFIG_COLUMNS,
                       schema_version=schema.SCHEMA_VERSION, environment={}, older_columns=older)
    folder.close()
    with open(tmp_path / schema.RESULTS_FILE, newline="") as handle:
        (upgraded,) = list(csv.DictReader(handle))
    assert list(upgraded) == list(schema.ALL_COLUMNS)
    assert upgraded["time_ms"] == "1.5" and all(upgraded[c] == "" for c in new)
    assert json.loads((tmp_path / schema.META_FILE).read_text())["schema_version_was"] == 3


# --------------------------------------------------------------------------------------------------- rows
def _kv_cache_bytes(b: int, h: int, capacity: int, d: int) -> int:
    """keys + values float32 + the bool ``real`` per slot."""
    return 2 * b * h * capacity * d * 4 + b * capacity


@pytest.mark.parametrize("level", ["core", "layer"])
def test_full_decode_row(level):
    c = cell("full", level=level, n=64, b=2)
    row, window = run_cell(PlannedCell(c), budget_bytes=None, timing=TIMING)
    assert row["status"] == "ok", row["note"]
    capacity = 64 + decoding.DECODE_WARMUP + STEPS + 2  # static cache: room for every step, made once
    assert int(row["cache_bytes"]) == _kv_cache_bytes(2, 2, capacity, 8)
    assert row["new_tokens"] == "2" and row["timed_runs"] == str(STEPS) and row["backend"] == "decode"
    assert float(row["tokens_per_s"]) == pytest.approx(2 / (float(row["time_ms"]) / 1e3), rel=1e-5)  # values are written to 6 significant digits
    assert float(row["bandwidth_bytes_per_s"]) == 1.25e9 and window > 0
    assert "median of 4 steps" in row["note"]
    # the prediction of the same step (fake tensors) is what the instrumented step measured
    assert int(row["predicted_mem_bytes"]) == int(row["peak_mem_bytes"])


def test_prefill_row_reports_the_cache_it_filled():
    c = cell("full", "prefill", n=48, b=2)
    row, _ = run_cell(PlannedCell(c), budget_bytes=None, timing=TIMING)
    assert row["status"] == "ok", row["note"]
    assert int(row["cache_bytes"]) == _kv_cache_bytes(2, 2, 48, 8)  # a growing cache holds exactly the prompt
    assert row["new_tokens"] == str(2 * 48) and row["bandwidth_bytes_per_s"] == ""
    assert float(row["tokens_per_s"]) == pytest.approx(96 / (float(row["time_ms"]) / 1e3), rel=1e-5)  # values are written to 6 significant digits


@pytest.mark.parametrize("variant", ["window", "performer", "longformer"])
def test_bounded_caches_do_not_grow_with_the_context(variant):
    sizes = []
    for n in (32, 128):
        row, _ = run_cell(PlannedCell(cell(variant, n=n)), budget_bytes=None, timing=TIMING)
        assert row["status"] == "ok", row["note"]
        sizes.append(int(row["cache_bytes"]))
    assert sizes[0] == sizes[1]


def test_decode_state_is_setup_in_the_prediction():
    c = cell("full", n=256, b=1)
    prediction = predict_cell(c)
    assert prediction.setup_bytes >= _kv_cache_bytes(1, 2, 256 + decoding.DECODE_WARMUP + 32 + 2, 8)
    assert prediction.first_call_bytes < prediction.setup_bytes // 10  # a step is small next to its cache


# --------------------------------------------------------------------------------------------------- the fill
@pytest.mark.parametrize("variant", ["full", "window", "longformer", "bigbird"])
def test_the_random_fill_is_a_real_context(variant, monkeypatch):
    """After filling to n (chunk 16, so the chunk repeats), a step equals causal attention over the n filled tokens
    plus the new one: the cache holds exactly those keys and values in their positions."""
    monkeypatch.setattr(decoding, "FILL_CHUNK", 16)
    torch.manual_seed(0)
    c = Cell(variant, json.dumps(PARAMS[variant]), "auto", "core", "decode", True, "cpu", "float64", 1, 40, 2, 8)
    attn = build_attention(variant, dim=16, num_heads=2, causal=True, **PARAMS[variant]).double()
    cache = attn.new_cache(1, dtype=torch.float64, max_len=64)
    decoding.fill_random(attn, cache, c, 40, seed=3, device=torch.device("cpu"), dtype=torch.float64)
    assert cache.length == 40
    generator = torch.Generator().manual_seed(3)
    q0, k0, v0 = (torch.randn(1, 2, 16, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    q1, k1, v1 = decoding.decode_step_inputs(c, seed=3, device=torch.device("cpu"), dtype=torch.float64)
    step = attn.attend(q1, k1, v1, cache=cache)
    ks, vs = (torch.cat([t, t, t[:, :, :8], new], dim=2) for t, new in ((k0, k1), (v0, v1)))
    qs = torch.cat([q0, q0, q0[:, :, :8], q1], dim=2)
    reference = attn.attend(qs, ks, vs)[:, :, -1:]
    torch.testing.assert_close(step, reference, rtol=1e-10, atol=1e-10)


def test_a_state_cache_is_set_to_the_context_length():
    c = cell("performer", n=10_000, b=1)
    attn = build_attention("performer", dim=16, num_heads=2, causal=True, num_features=16)
    cache = attn.new_cache(1, max_len=10_100)
    decoding.fill_random(attn, cache, c, 10_000, seed=0, device=torch.device("cpu"), dtype=torch.float32)
    assert cache.length == 10_000 and cache.nbytes == attn.new_cache(1).nbytes


# ----------------------------------------------------------------------------------------------- unsupported
@pytest.mark.parametrize(
    "c, expected",
    [
        (cell("linformer"), "linformer cannot decode incrementally"),
        (cell("nystrom", "prefill"), "nystrom cannot decode incrementally"),
        (cell("full", causal=False), "needs causal attention"),
        (cell("full", level="model"), "run at level core or layer"),
        (cell("full", backend="sdpa"), "not a backend"),
        (cell("linformer", "decode", level="layer", peer=True, params={}), "runs modes fwd, fwd_bwd, train_step"),
        (cell("hf-llama-decode", "prefill", level="layer", peer=True, params={}), "runs modes decode"),
    ],
)
def test_cells_that_cannot_decode_are_unsupported_with_the_reason(c, expected):
    status, note = static_status(PlannedCell(c))
    assert status == "unsupported" and expected in note
    row, _ = run_cell(PlannedCell(c), budget_bytes=None, timing=TIMING)
    assert row["status"] == "unsupported" and expected in row["note"] and row["time_ms"] == ""


def test_prefill_needs_no_gradient():
    work = build_workload(cell("window", "prefill", n=32))
    work.run()
    assert work.cache_bytes() > 0 and not any(p.requires_grad and p.grad is not None for p in work.module.parameters())


# ------------------------------------------------------------------------------------------------- the suites
def test_the_decode_suites():
    cpu = load_suite("decode")
    assert cpu.level == "layer" and cpu.modes == ("prefill", "decode") and cpu.threads == 1
    assert cpu.lengths[0] == 1024 and cpu.lengths[-1] == 65536 and cpu.batch_sizes == (1, 16)
    assert {v.key for v in cpu.variants} == {"full", "window", "longformer", "bigbird", "performer"}
    assert [p.params for p in cpu.peers] == [{}, {"window_size": 256}]
    planned = plan_cells(cpu, "cpu", include_peers=True)
    statuses = {}
    for p in planned:
        check = static_status(p)
        statuses[check[0] if check else "run"] = statuses.get(check[0] if check else "run", 0) + 1
    assert statuses == {"run": 5 * 2 * (7 + 2) + 2 * 2 * 7, "skipped_budget": 5 * 2 * 5, "unsupported": 2 * 2 * 7}
    gpu = load_suite("gpu_decode")
    assert gpu.device == "cuda" and gpu.dtypes == ("bfloat16",) and gpu.lengths[-1] == 524288


def test_suite_defaults_stay_out_of_the_stored_config():
    """Runs stored before decode_steps and threads existed still resume: their defaults are not in the config."""
    config = sweep_config(load_suite("quick"), device="cpu", include_peers=False, isolate=False, budget_gb=None, seed=0)
    assert "decode_steps" not in config and "threads" not in config
    config = sweep_config(load_suite("decode"), device="cpu", include_peers=False, isolate=False, budget_gb=None, seed=0)
    assert config["decode_steps"] == 16 and config["threads"] == 1


# --------------------------------------------------------------------------------------------------- the peer
def _peer(window):
    from efficient_attn.peers import build_peer

    params = {} if window is None else {"window_size": window}
    return build_peer("hf-llama-decode", dim=16, num_heads=2, seq_len=64, params=params).double().eval()


def test_the_transformers_peer_decodes_like_its_own_full_forward():
    """Steps after a prefill through the peer's cache equal the layer's forward over the whole sequence (causal
    sdpa, RoPE at the right positions): the peer's step is transformers' decode, nothing else."""
    pytest.importorskip("transformers")
    peer = _peer(None)
    x = torch.randn(1, 12, 16, dtype=torch.float64)
    positions = torch.arange(12)[None]
    with torch.no_grad():
        whole, _ = peer.attn(x, position_embeddings=peer.model.rotary_emb(x, positions), attention_mask=None)
        cache = peer.new_cache(1)
        peer.attn(x[:, :9], position_embeddings=peer.model.rotary_emb(x, positions[:, :9]), attention_mask=None,
                  cache=cache)
        steps = torch.cat([peer(x[:, t : t + 1], cache=cache) for t in range(9, 12)], dim=1)
    torch.testing.assert_close(steps, whole[:, 9:], rtol=1e-10, atol=1e-10)
    assert peer.cache_nbytes(cache) == 2 * 1 * 2 * 12 * 8 * 8  # keys + values of 12 tokens, float64


def test_the_sliding_peer_keeps_a_window_and_the_row_counts_it():
    pytest.importorskip("transformers")
    peer = _peer(8)
    assert peer.model.config.sliding_window == 9
    c = cell("hf-llama-decode", level="layer", peer=True, params={"window_size": 8}, n=100, b=2)
    row, _ = run_cell(PlannedCell(c), budget_bytes=None, timing=TIMING)
    assert row["status"] == "ok" and row["backend"] == "peer", row["note"]
    assert int(row["cache_bytes"]) == 2 * 2 * 2 * 8 * 8 * 4  # the last 8 keys and values, float32
    full = cell("hf-llama-decode", level="layer", peer=True, params={}, n=100, b=2)
    row, _ = run_cell(PlannedCell(full), budget_bytes=None, timing=TIMING)
    assert int(row["cache_bytes"]) == 2 * 2 * 2 * (100 + decoding.DECODE_WARMUP + STEPS) * 8 * 4


# ------------------------------------------------------------------------------------------ measuring tools
def test_time_steps_makes_exactly_warmup_plus_steps_calls():
    calls = []
    result = time_steps(lambda: calls.append(1), device="cpu", steps=5, warmup=3, first_call_s=0.001)
    assert len(calls) == 2 + 5 and result.runs == 5 and result.method == "steps"
    with pytest.raises(ValueError, match="steps must be >= 1"):
        time_steps(lambda: None, device="cpu", steps=0)


def test_copy_bandwidth_counts_bytes_read_and_written():
    bandwidth = copy_bandwidth("cpu", nbytes=1 << 22, repeats=3)
    assert math.isfinite(bandwidth) and bandwidth > 1e7
    assert copy_bandwidth_cached("cpu", nbytes=1 << 20) == copy_bandwidth_cached("cpu", nbytes=1 << 20)
    with pytest.raises(ValueError, match="nbytes must be >= 4"):
        copy_bandwidth("cpu", nbytes=0)
