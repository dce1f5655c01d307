"""`full` attention, both backends, against an independent float64 reference: outputs and gradients."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import efficient_attn as ea
from helpers import pattern_with_padding, random_padding, random_qkv, reference_attention


def check_against_reference(attn, q, k, v, key_padding_mask, atol=1e-9):
    seq = q.shape[-2]
    allowed = pattern_with_padding(attn.dense_mask(seq), key_padding_mask)
    out = attn.attend(q, k, v, key_padding_mask=key_padding_mask)
    ref = reference_attention(q, k, v, allowed)
    torch.testing.assert_close(out, ref, atol=atol, rtol=1e-7)
    grad_out = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert torch.isfinite(g).all(), f"non-finite gradient for {name}"
        torch.testing.assert_close(g, r, atol=atol, rtol=1e-7, msg=f"gradient of {name}")


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_full_matches_reference(backend, causal, padded):
    attn = ea.build_attention("full", dim=32, num_heads=2, causal=causal, backend=backend).double()
    q, k, v = random_qkv(3, 2, 13, 16, seed=1)
    kpm = random_padding(3, 13, seed=2) if padded else None
    check_against_reference(attn, q, k, v, kpm)
    assert attn.last_backend == backend


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
@pytest.mark.parametrize("causal", [False, True])
def test_fully_padded_rows_give_zeros_not_nan(backend, causal):
    attn = ea.build_attention("full", dim=16, num_heads=2, causal=causal, backend=backend).double()
    q, k, v = random_qkv(2, 2, 9, 8, seed=3)
    kpm = random_padding(2, 9, seed=4, empty_row=True)
    out = attn.attend(q, k, v, key_padding_mask=kpm)
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all()
    check_against_reference(attn, q, k, v, kpm)


def test_causal_padding_with_leading_pad_gives_zero_rows():
    # left padding: early queries in a causal model see no real key at all
    attn = ea.build_attention("full", dim=16, num_heads=2, causal=True, backend="sdpa").double()
    q, k, v = random_qkv(1, 2, 6, 8, seed=5)
    kpm = torch.tensor([[False, False, True, True, True, True]])
    out = attn.attend(q, k, v, key_padding_mask=kpm)
    assert (out[:, :, :2] == 0).all() and (out[:, :, 2:] != 0).any()
    check_against_reference(attn, q, k, v, kpm)


def test_auto_resolves_to_sdpa_and_is_recorded():
    attn = ea.build_attention("full", dim=16, num_heads=2)
    q, k, v = random_qkv(1, 2, 5, 8, dtype=torch.float32)
    attn.attend(q, k, v)
    assert attn.last_backend == "sdpa"


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
def test_attention_dropout_active_in_train_only(backend):
    attn = ea.build_attention("full", dim=16, num_heads=2, dropout=0.5, backend=backend)
    q, k, v = random_qkv(1, 2, 32, 8, dtype=torch.float32)
    attn.eval()
    a, b = attn.attend(q, k, v), attn.attend(q, k, v)
    torch.testing.assert_close(a, b)
    attn.train()
    torch.manual_seed(0)
    c = attn.attend(q, k, v)
    assert not torch.allclose(a, c)


@given(
    batch=st.integers(1, 3),
    heads=st.integers(1, 3),
    seq=st.integers(1, 24),
    head_dim=st.sampled_from([1, 4, 8]),
    causal=st.booleans(),
    padded=st.booleans(),
    backend=st.sampled_from(["naive", "sdpa"]),
)
def test_full_property_over_shapes(batch, heads, seq, head_dim, causal, padded, backend):
    attn = ea.build_attention("full", dim=heads * head_dim, num_heads=heads, causal=causal, backend=backend).double()
    q, k, v = random_qkv(batch, heads, seq, head_dim, seed=seq)
    kpm = random_padding(batch, seq, seed=batch) if padded else None
    check_against_reference(attn, q, k, v, kpm)


def test_attend_rejects_bad_shapes_and_masks():
    attn = ea.build_attention("full", dim=16, num_heads=2)
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match=r"k, v of one shape \(batch, kv_heads, kv_len, head_dim\)"):
        attn.attend(q, q[:, :, :4], q)
    with pytest.raises(ValueError, match="expects 2 query heads"):
        attn.attend(torch.randn(1, 3, 5, 8), torch.randn(1, 3, 5, 8), torch.randn(1, 3, 5, 8))
    with pytest.raises(ValueError, match="key_padding_mask must be bool"):
        attn.attend(q, q, q, key_padding_mask=torch.ones(1, 5))
    with pytest.raises(ValueError, match=r"expected x of shape \(batch, seq, 16\)"):
        attn(torch.randn(2, 5, 8))
