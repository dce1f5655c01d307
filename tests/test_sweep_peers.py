"""Peers in a sweep: the suite's level where the peer supports it, causal only with a causal mode, notes kept."""

import pytest

from efficient_attn.harness.cell import static_status
from efficient_attn.harness.plan import plan_cells
from efficient_attn.harness.runfolder import read_rows
from efficient_attn.harness.suite import parse_suite
from efficient_attn.harness.sweep import run_sweep

pytest.importorskip("local_attention", reason="peer package local-attention not installed (extra [peers])")


def peer_suite(level, causal=(False,), peers=None):
    return parse_suite(
        {
            "device": "cpu",
            "level": level,
            "modes": ["fwd"],
            "lengths": [64],
            "heads": 2,
            "head_dim": 8,
            "causal": list(causal),
            "min_run_time": 0.01,
            "variants": [{"key": "window", "backends": ["torch"], "params": {"window_size": 16}}],
            "peers": peers or [{"name": "local-attention", "params": {"window_size": 16}}],
        },
        name="peers-test",
    )


def peer_cells(suite):
    return [p for p in plan_cells(suite, "cpu", include_peers=True) if p.cell.is_peer]


def test_peer_cells_take_the_suite_level():
    assert {p.cell.level for p in peer_cells(peer_suite("core"))} == {"core"}
    assert {p.cell.level for p in peer_cells(peer_suite("layer"))} == {"layer"}


def test_peer_at_a_level_it_lacks_is_unsupported_with_reason():
    suite = peer_suite("core", peers=[{"name": "hf-longformer", "params": {"window_size": 16}}])
    status, note = static_status(peer_cells(suite)[0])
    assert status == "unsupported"
    assert "runs at level layer, not 'core'" in note


def test_causal_peer_needs_a_causal_mode():
    causal_local = peer_cells(peer_suite("core", causal=(True,)))[0]
    assert static_status(causal_local) is None  # local-attention has look_backward-only causal mode
    suite = peer_suite("layer", causal=(True,), peers=[{"name": "linformer", "params": {"k": 16}}])
    status, note = static_status(peer_cells(suite)[0])
    assert status == "unsupported" and "has no causal mode" in note


def test_core_level_peer_runs_beside_ours(tmp_path):
    run_sweep(peer_suite("core", causal=(False, True)), tmp_path, include_peers=True, progress=False)
    rows = read_rows(tmp_path / "results.csv")
    peers = [r for r in rows if r["is_peer"] == "true"]
    assert len(peers) == 2 and {r["status"] for r in rows} == {"ok"}, [(r["status"], r["note"]) for r in rows]
    assert {r["level"] for r in peers} == {"core"}
    assert all(int(r["padded_len"]) >= 64 for r in peers)
