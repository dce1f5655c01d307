"""The ``hf`` benchmark level (:mod:`efficient_attn.harness.hf_workload`): a transformers LlamaModel whose attention is
ours or transformers' own, built from a cell. Tiny shapes (hidden 32, 16 tokens), float32."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import efficient_attn as ea
from efficient_attn.harness import hf_workload
from efficient_attn.harness.plan import Cell

transformers = pytest.importorskip("transformers")

from efficient_attn.integrations.hf_models import build_hf_llama  # noqa: E402

BENCH = Path(__file__).resolve().parents[1] / "bench"
SUITE = BENCH / "hf_llama.toml"


def cell(variant: str, params: str = "{}", *, mode: str = "fwd_bwd", causal: bool = True, kv: int | None = 2,
         backend: str = "auto", seq: int = 16, batch: int = 2) -> Cell:
    return Cell(variant=variant, params_json=params, backend_requested=backend, level="hf", mode=mode, causal=causal,
                device="cpu", dtype="float32", batch_size=batch, seq_len=seq, num_heads=4, head_dim=8,
                is_peer=variant in hf_workload.TRANSFORMERS_PEERS, num_kv_heads=kv)


def forward_and_grads(c: Cell, seed: int = 0):
    model, forward, leaves = hf_workload.build_hf_parts(c, device="cpu", dtype=torch.float32, seed=seed)
    model.train()  # the harness runs every module in train mode
    out = forward()
    out.sum().backward()
    return model, out.detach(), [leaf.grad for leaf in leaves]


def test_the_model_has_the_cells_shape():
    model, forward, leaves = hf_workload.build_hf_parts(cell("full"), device="cpu", dtype=torch.float32)
    cfg = model.config
    assert type(model).__name__ == "LlamaModel"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 32, 4, 2)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.max_position_embeddings) == (128, 256, 16)
    assert cfg._attn_implementation == "efficient_attn:full"
    assert forward().shape == (2, 16, 32)
    assert leaves and len(leaves) == len(list(model.parameters()))


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_our_full_equals_transformers_sdpa_forward_and_backward(mode):
    # Same seed, same weights and tokens: the two cells differ only in their attention.
    _, ours, ours_grads = forward_and_grads(cell("full", mode=mode))
    _, ref, ref_grads = forward_and_grads(cell("transformers-sdpa", mode=mode))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    for got, expected in zip(ours_grads, ref_grads):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_transformers_eager_is_a_peer_of_the_same_model():
    _, eager, _ = forward_and_grads(cell("transformers-eager"))
    _, sdpa, _ = forward_and_grads(cell("transformers-sdpa"))
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=1e-5)


def test_our_window_equals_mistrals_sliding_window_with_its_params():
    # window_size=3 (|i - j| <= 3, causal: 4 keys) is transformers' sliding_window=4, on the shared builder's weights.
    c = cell("window", '{"window_size": 3}', mode="fwd")
    model, forward, _ = hf_workload.build_hf_parts(c, device="cpu", dtype=torch.float32)
    assert model.config._attn_implementation == "efficient_attn:window(window_size=3)"
    mistral = build_hf_llama(**hf_workload.model_shape(c), sliding_window=4, max_positions=16)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(forward(), mistral(tokens, use_cache=False).last_hidden_state, atol=1e-5, rtol=1e-5)
        plain = build_hf_llama(**hf_workload.model_shape(c), max_positions=16)
        assert not torch.allclose(forward(), plain(tokens).last_hidden_state, atol=1e-3)  # the window matters


def test_backend_and_params_reach_our_registration():
    c = cell("window", '{"window_size": 3}', backend="naive", mode="fwd")
    model, forward, _ = hf_workload.build_hf_parts(c, device="cpu", dtype=torch.float32)
    name = hf_workload.implementation_name(c)
    assert name == "efficient_attn:window(backend='naive',window_size=3)"
    with torch.no_grad():
        forward()
    built = hf_workload.attention_modules_for(c)
    assert built and {m.last_backend for m in built} == {"naive"}
    assert hf_workload.attention_modules_for(cell("transformers-sdpa")) == []


def test_row_info_names_the_version_and_the_implementation():
    info = hf_workload.hf_row_info(cell("transformers-flex_attention", mode="fwd"))
    assert info == {"transformers_version": transformers.__version__, "attn_implementation": "flex_attention"}
    assert hf_workload.hf_row_info(cell("full"))["attn_implementation"] == "efficient_attn:full"


def test_cells_the_level_cannot_run_are_refused_with_the_reason():
    reason = hf_workload.hf_unsupported_reason
    assert reason(cell("full")) is None and reason(cell("transformers-sdpa")) is None
    assert "causal = [true]" in reason(cell("full", causal=False))
    assert "no backward on CPU" in reason(cell("transformers-flex_attention"))
    assert reason(cell("transformers-flex_attention", mode="fwd")) is None
    assert "takes no params" in reason(cell("transformers-sdpa", '{"window_size": 3}'))
    other = Cell(**{**cell("full").to_dict(), "variant": "hf-bigbird", "is_peer": True})
    assert "transformers-sdpa" in reason(other)
    with pytest.raises(ValueError, match="causal decoder"):
        hf_workload.build_hf_parts(cell("full", causal=False), device="cpu", dtype=torch.float32)
    with pytest.raises(KeyError, match="did you mean 'window'"):
        hf_workload.build_hf_parts(cell("windw"), device="cpu", dtype=torch.float32)
    with pytest.raises(TypeError, match="did you mean 'window_size'"):
        hf_workload.build_hf_parts(cell("window", '{"window_sz": 3}'), device="cpu", dtype=torch.float32)


def test_importing_the_level_does_not_import_transformers():
    code = "import sys, efficient_attn.harness.hf_workload; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_hf_llama_suite_names_the_issues_shape_and_runnable_entries():
    data = tomllib.loads(SUITE.read_text())
    assert data["level"] == "hf" and data["causal"] == [True] and data["depth"] == 2
    assert (data["heads"], data["heads"] * data["head_dim"]) == (4, 256)
    assert data["lengths"] == [1024, 2048, 4096, 8192, 16384]
    assert {p["name"] for p in data["peers"]} == set(hf_workload.TRANSFORMERS_PEERS)
    for entry in data["variants"]:
        assert ea.get_spec(entry["key"]).supports_causal
        ea.build_config(entry["key"], dim=256, num_heads=4, causal=True, **entry["params"])
    window = next(e for e in data["variants"] if e["key"] == "window")
    assert window["params"] == {"window_size": 256}
