"""The decode report (issue 13) on synthetic rows with known laws: exponents, the prefill/decode split, full decode
against the bandwidth bound, ours against the transformers peer, and the plots."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from efficient_attn.harness.schema import ALL_COLUMNS
from efficient_attn.report.analyses.decode import bandwidth_rows, decode_exponent_rows, peer_rows, split_rows
from efficient_attn.report.build import build_report
from efficient_attn.report.load import load_runs
from tests.report_synthetic import write_run

HEADS, HEAD_DIM = 4, 64
CONTEXTS = [1024, 4096, 16384, 65536]
BANDWIDTH = 8e9
#: full's step is this many times its bandwidth bound; the peer this many times slower than ours
OVER_BOUND, PEER_SLOWER = 1.6, 1.5


def kv_bytes(batch: int, n: int) -> float:
    return 2 * batch * HEADS * n * HEAD_DIM * 4


def step_ms(variant: str, batch: int, n: int) -> float:
    if variant == "full":
        return OVER_BOUND * 1e3 * kv_bytes(batch, n) / BANDWIDTH
    return {"window": 0.2, "performer": 0.3}[variant] * batch


def cache_bytes(variant: str, batch: int, n: int) -> float:
    return kv_bytes(batch, n) if variant == "full" else {"window": kv_bytes(batch, 257), "performer": 5e5 * batch}[variant]


def row(variant: str, mode: str, batch: int, n: int, *, peer: bool = False, params: dict | None = None,
        time_ms: float, cache: float) -> dict:
    values = {c: "" for c in ALL_COLUMNS}
    values.update(
        variant=variant, params_json=json.dumps(params or {}, sort_keys=True), backend_requested="peer" if peer else
        "auto", level="layer", mode=mode, causal=True, device="cpu", dtype="float32", batch_size=batch, seq_len=n,
        num_heads=HEADS, head_dim=HEAD_DIM, is_peer=peer, backend="peer" if peer else ("decode" if mode == "decode"
        else "sdpa"), status="ok", time_ms=time_ms, time_iqr_ms=time_ms * 0.05, cache_bytes=cache,
        peak_mem_bytes=1e5, tokens_per_s=(batch if mode == "decode" else batch * n) / (time_ms / 1e3),
        new_tokens=batch if mode == "decode" else batch * n,
        bandwidth_bytes_per_s=BANDWIDTH if mode == "decode" else "",
    )
    return values


def synthetic_rows() -> pd.DataFrame:
    rows = []
    for batch in (1, 16):
        for variant in ("full", "window", "performer"):
            params = {"window_size": 256} if variant == "window" else {}
            for n in CONTEXTS:
                rows.append(row(variant, "decode", batch, n, params=params, time_ms=step_ms(variant, batch, n),
                                cache=cache_bytes(variant, batch, n)))
                if n <= 4096:  # prefill: 1 µs per prompt token and sequence
                    rows.append(row(variant, "prefill", batch, n, params=params, time_ms=1e-3 * batch * n,
                                    cache=cache_bytes(variant, batch, n)))
            for n in CONTEXTS:
                if variant in ("full", "window"):
                    peer_params = {} if variant == "full" else {"window_size": 256}
                    rows.append(row("hf-llama-decode", "decode", batch, n, peer=True, params=peer_params,
                                    time_ms=PEER_SLOWER * step_ms(variant, batch, n),
                                    cache=cache_bytes(variant, batch, n)))
    return pd.DataFrame(rows, columns=list(ALL_COLUMNS))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("decode") / "decode-cpu", synthetic_rows())


@pytest.fixture(scope="module")
def frame(run_dir):
    return load_runs([run_dir])[0]


def test_decode_exponents(frame):
    header, rows = decode_exponent_rows(frame)
    table = {(r[1], r[2]): r for r in rows}
    full = next(r for (series, batch), r in table.items() if series.startswith("full") and batch == "1")
    window = next(r for (series, batch), r in table.items() if series.startswith("window") and batch == "16")
    assert full[4].startswith("1.00 ") and full[5].startswith("1.00 ")
    assert window[4].startswith("0.00 ") and window[5].startswith("0.00 ")
    assert full[3] == "1K-64K"


def test_full_decode_against_the_bandwidth_bound(frame):
    header, rows = bandwidth_rows(frame, min_context=16384)
    assert header[-1] == "measured / bound"
    ours = [r for r in rows if "(peer)" not in r[1]]
    peers = [r for r in rows if "(peer)" in r[1]]
    assert len(ours) == 2 * 2 and len(peers) == 2 * 2  # 16K and 64K, batch 1 and 16; the sliding twin is not full
    assert {r[-1] for r in ours} == {f"{OVER_BOUND:.2f}x"}
    assert {r[-1] for r in peers} == {f"{OVER_BOUND * PEER_SLOWER:.2f}x"}


def test_ours_against_the_peer(frame):
    header, rows = peer_rows(frame)
    assert len(rows) == 2 * 2 * len(CONTEXTS)  # full and window twins, two batches
    assert {r[7] for r in rows} == {f"{PEER_SLOWER:.2f}x"}
    assert {r[1].split(":")[0].split("[")[0] for r in rows} == {"full", "window"}


def test_prefill_decode_split(frame):
    header, rows = split_rows(frame)
    assert len(rows) == 3 * 2 * 2  # three variants, two batches, prompts 1K and 4K
    full_1k = next(r for r in rows if r[1] == "full" and r[2] == "1" and r[3] == "1K")
    # step per sequence / prefill per token = step_ms / 1 µs
    assert full_1k[-1] == f"{step_ms('full', 1, 1024) / 1e-3:.2f}x"


def test_the_report_has_a_decode_section_and_plots(run_dir, tmp_path):
    files = build_report([run_dir], tmp_path)
    kinds = {p.kind for p in files.plots}
    assert {"decode_latency", "decode_cache", "decode_batch"} <= kinds
    assert all(p.path.exists() and p.path.stat().st_size > 5000 for p in files.plots)
    text = files.markdown.read_text()
    for heading in ("## Decode", "### Decode scaling with the context", "### Prefill / decode split",
                    "### Full decode against the memory-bandwidth bound", "### Ours against the transformers"):
        assert heading in text
