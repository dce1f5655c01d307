"""The sparse variants' backends equal an independent float64 reference built from their own dense_mask.

Outputs and gradients of q, k, v; causal and not; key padding (including fully padded rows); lengths that are and
are not block multiples; small blocks and windows so the patterns are genuinely sparse.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from efficient_attn.attention import blocked
from efficient_attn.attention.functional import default_scale
from helpers import build_for_test, pattern_with_padding, random_padding, random_qkv, reference_attention

SMALL = {
    "window": {"window_size": 5, "block_size": 4},
    "bigbird": {"block_size": 4, "num_random_blocks": 2, "num_global_blocks": 1, "num_window_blocks": 3},
    "longformer": {"window_size": 4, "global_tokens": (2, 21)},
}


def check_against_reference(attn, q, k, v, kpm, atol=1e-9, rtol=1e-7):
    seq = q.shape[-2]
    allowed = pattern_with_padding(attn.dense_mask(seq), kpm)
    ref = reference_attention(q, k, v, allowed)
    out = attn.attend(q, k, v, key_padding_mask=kpm)
    assert out.shape == q.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
    grad_out = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), grad_out.to(out.dtype))
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), r.double(), atol=atol, rtol=rtol, msg=f"gradient of {name}")
    return out


@pytest.mark.parametrize("key", sorted(SMALL))
@pytest.mark.parametrize("backend", ["naive", "torch"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("seq", [40, 43])
def test_matches_float64_reference(key, backend, causal, padded, seq):
    attn = build_for_test(key, dim=32, num_heads=4, causal=causal, backend=backend, **SMALL[key]).double()
    q, k, v = random_qkv(2, 4, seq, 8, seed=seq + causal)
    kpm = random_padding(2, seq, seed=seq, empty_row=True) if padded else None
    out = check_against_reference(attn, q, k, v, kpm)
    assert attn.last_backend == backend
    if backend == "torch":
        assert attn.last_padded_len == -(-seq // attn.block_size) * attn.block_size
    else:
        assert attn.last_padded_len == seq
    if padded:
        assert (out[0] == 0).all(), "a query with no allowed key gives zeros"


@pytest.mark.parametrize("key", sorted(SMALL))
@pytest.mark.parametrize("causal", [False, True])
def test_float32_fused_chunks_match_reference(key, causal):
    """The float32 CPU path runs the fused flash kernels per chunk; compare at float32 tolerance."""
    attn = build_for_test(key, dim=32, num_heads=4, causal=causal, **SMALL[key])
    q, k, v = random_qkv(2, 4, 45, 8, seed=3, dtype=torch.float32)
    kpm = random_padding(2, 45, seed=5)
    check_against_reference(attn, q, k, v, kpm, atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("key", sorted(SMALL))
def test_matmul_chunk_path_matches_reference(key, monkeypatch):
    """The path used off-CPU (exact matmuls per chunk, no fused kernel), exercised here on CPU."""
    monkeypatch.setattr(blocked, "_use_cpu_flash", lambda q: False)
    attn = build_for_test(key, dim=32, num_heads=4, causal=True, **SMALL[key]).double()
    q, k, v = random_qkv(2, 4, 42, 8, seed=11)
    check_against_reference(attn, q, k, v, random_padding(2, 42, seed=2, empty_row=True))


@pytest.mark.parametrize("key", sorted(SMALL))
def test_autograd_chunk_path_matches_reference(key):
    """The dropout path (chunks through F.scaled_dot_product_attention and autograd) with dropout 0."""
    attn = build_for_test(key, dim=32, num_heads=4, **SMALL[key]).double()
    seq = 44
    q, k, v = random_qkv(1, 4, seq, 8, seed=4)
    kpm = random_padding(1, seq, seed=9)
    plan = attn._plan(seq, q.device)
    out = blocked.sparse_attention_autograd(q, k, v, plan, kpm, default_scale(8))
    ref = reference_attention(q, k, v, pattern_with_padding(attn.dense_mask(seq), kpm))
    torch.testing.assert_close(out, ref, atol=1e-9, rtol=1e-7)
    grad_out = torch.randn_like(ref)
    for g, r in zip(torch.autograd.grad(out, (q, k, v), grad_out), torch.autograd.grad(ref, (q, k, v), grad_out)):
        torch.testing.assert_close(g, r, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("key", sorted(SMALL))
def test_dropout_in_training_changes_output_and_stays_finite(key):
    attn = build_for_test(key, dim=32, num_heads=4, dropout=0.5, **SMALL[key]).double()
    q, k, v = random_qkv(1, 4, 40, 8, seed=1)
    attn.eval()
    eval_out = attn.attend(q, k, v)
    ref = reference_attention(q, k, v, pattern_with_padding(attn.dense_mask(40), None))
    torch.testing.assert_close(eval_out, ref, atol=1e-9, rtol=1e-7)
    attn.train()
    torch.manual_seed(0)
    train_out = attn.attend(q, k, v)
    assert not torch.allclose(train_out, eval_out)
    grads = torch.autograd.grad(train_out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("causal", [False, True])
def test_bigbird_shorter_than_its_global_blocks_is_all_global_rows(causal):
    attn = build_for_test("bigbird", dim=32, num_heads=4, causal=causal, block_size=8).double()  # 2 global blocks
    assert attn.structure(13).num_query_blocks == 0
    q, k, v = random_qkv(2, 4, 13, 8, seed=6)
    check_against_reference(attn, q, k, v, random_padding(2, 13, seed=1, empty_row=True))


def test_fully_padded_batch_gives_zero_output_and_zero_gradients():
    for key in SMALL:
        attn = build_for_test(key, dim=32, num_heads=4, causal=True, **SMALL[key]).double()
        q, k, v = random_qkv(2, 4, 30, 8, seed=2)
        kpm = torch.ones(2, 30, dtype=torch.bool)
        kpm[1] = False
        out = attn.attend(q, k, v, key_padding_mask=kpm)
        assert (out[1] == 0).all()
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        for g in grads:
            assert torch.isfinite(g).all() and (g[1] == 0).all()


def test_module_forward_matches_between_backends():
    for key in SMALL:
        torch.manual_seed(0)
        a = build_for_test(key, dim=32, num_heads=4, backend="torch", **SMALL[key]).double()
        b = build_for_test(key, dim=32, num_heads=4, backend="naive", **SMALL[key]).double()
        b.load_state_dict(a.state_dict())
        x = torch.randn(2, 37, 32, dtype=torch.float64)
        kpm = random_padding(2, 37, seed=3)
        torch.testing.assert_close(a(x, key_padding_mask=kpm), b(x, key_padding_mask=kpm), atol=1e-10, rtol=1e-8)


KEY_PARAMS = st.one_of(
    st.builds(lambda w, b: ("window", {"window_size": w, "block_size": b}), st.integers(1, 8), st.integers(2, 12)),
    st.builds(
        lambda b, r, g, w, seed: ("bigbird", {"block_size": b, "num_random_blocks": r, "num_global_blocks": g,
                                               "num_window_blocks": w, "seed": seed}),
        st.integers(2, 8), st.integers(0, 3), st.integers(0, 2), st.sampled_from([1, 3, 5]), st.integers(0, 5),
    ),
    st.builds(lambda w, g: ("longformer", {"window_size": w, "global_tokens": g}), st.integers(1, 8),
              st.integers(0, 3)),
)


@given(
    key_params=KEY_PARAMS,
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    seq=st.integers(1, 70),
    head_dim=st.sampled_from([4, 8]),
    causal=st.booleans(),
    padded=st.booleans(),
    backend=st.sampled_from(["torch", "naive"]),
)
def test_hypothesis_shapes_and_parameters(key_params, batch, heads, seq, head_dim, causal, padded, backend):
    key, params = key_params
    if key == "longformer":
        params = {**params, "global_tokens": min(params["global_tokens"], seq)}
    attn = build_for_test(key, dim=heads * head_dim, num_heads=heads, causal=causal, backend=backend,
                          **params).double()
    q, k, v = random_qkv(batch, heads, seq, head_dim, seed=seq)
    kpm = random_padding(batch, seq, seed=seq + 1) if padded else None
    check_against_reference(attn, q, k, v, kpm)


@pytest.mark.parametrize("key", sorted(SMALL))
@pytest.mark.parametrize("fused", [True, False])
def test_small_call_limits_split_work_without_changing_results(key, fused, monkeypatch):
    """Global rows' backward in key slices and few query blocks per call (the limits used at long lengths)."""
    monkeypatch.setattr(blocked, "GLOBAL_KEYS_PER_BACKWARD", 8)
    monkeypatch.setattr(blocked, "GLOBAL_ROWS_PER_CALL", 3)
    monkeypatch.setattr(blocked, "GATHERED_ROWS_PER_CALL", 64)
    monkeypatch.setattr(blocked, "KEY_ROWS_PER_CALL", 64)  # no single call for the short input
    if not fused:
        monkeypatch.setattr(blocked, "_use_cpu_flash", lambda q: False)
    attn = build_for_test(key, dim=32, num_heads=4, causal=True, **SMALL[key]).double()
    q, k, v = random_qkv(2, 4, 46, 8, seed=8)
    check_against_reference(attn, q, k, v, random_padding(2, 46, seed=4, empty_row=True))
