"""Encoder-decoder (cross) attention: queries from one sequence, keys and values from another of a different length.

``full`` equals the float64 dense softmax over the real encoder keys (every backend that runs on this machine; xformers
is checked mocked in tests/test_xformers.py); the low-rank variants meet their own exact limits (Linformer with
identity projections, Nystrom with one landmark per token) and Performer's error shrinks with its features. Pattern
variants refuse: their patterns are defined on one sequence. Grouped key/value heads and encoder padding throughout.
"""

from __future__ import annotations

import math

import pytest
import torch

import efficient_attn as ea
from helpers import random_padding, reference_attention
from variant_cases import build_small

Q_LEN, KV_LEN = 11, 23
CROSS = [k for k in ea.list_attentions() if ea.get_spec(k).module_cls.supports_cross_attention]


def cross_inputs(seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = (scale * torch.randn(2, 4, Q_LEN, 8, generator=gen, dtype=torch.float64)).requires_grad_()
    k, v = ((scale * torch.randn(2, 2, KV_LEN, 8, generator=gen, dtype=torch.float64)).requires_grad_()
            for _ in range(2))
    kpm = random_padding(2, KV_LEN, seed=seed + 1)
    return q, k, v, kpm


def dense_cross(q, k, v, kpm):
    """float64 softmax over the real encoder keys; k, v repeated to q's heads."""
    group = q.shape[1] // k.shape[1]
    allowed = kpm[:, None, None, :].expand(q.shape[0], 1, q.shape[2], k.shape[2])
    return reference_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), allowed)


def test_the_cross_capable_variants():
    assert set(CROSS) >= {"full", "linformer", "performer", "nystrom"}


@pytest.mark.parametrize("backend", [b for b in ea.get_spec("full").backends if b not in ("flex", "xformers")])
def test_full_cross_attention_equals_dense_softmax(backend):
    attn = build_small("full", backend=backend, num_kv_heads=2)
    q, k, v, kpm = cross_inputs()
    out = attn.attend(q, k, v, key_padding_mask=kpm)
    assert out.shape == q.shape and attn.last_backend == backend
    ref = dense_cross(q, k, v, kpm)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-8)
    grad = torch.randn_like(out)
    for name, g, r in zip("qkv", torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-8, msg=f"gradient of {name}")


def test_full_flex_refuses_cross_attention():
    attn = build_small("full", backend="flex").float()
    q, k, v, kpm = cross_inputs()
    with pytest.raises(ValueError, match="'flex' of attention 'full' runs self-attention only.*sdpa"):
        with torch.no_grad():
            attn.attend(q.float(), k.float().repeat_interleave(2, 1), v.float().repeat_interleave(2, 1))


def test_linformer_with_identity_projections_is_cross_attention_over_zeroed_padding():
    attn = build_small("linformer", k=KV_LEN, max_len=KV_LEN, num_kv_heads=2, headwise=True)
    with torch.no_grad():
        for proj in (attn.proj_k, attn.proj_v):
            proj.copy_(torch.eye(KV_LEN, dtype=torch.float64).expand_as(proj))
    q, k, v, kpm = cross_inputs(seed=2)
    out = attn.attend(q, k, v, key_padding_mask=kpm)
    # padded keys and values are zeroed before the projection (see LinformerAttention): exactly dense attention in
    # which padded positions hold zero keys and values
    real = kpm[:, None, :, None]
    zeroed = dense_cross(q, torch.where(real, k, 0.0), torch.where(real, v, 0.0), torch.ones_like(kpm))
    torch.testing.assert_close(out, zeroed, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(attn.attend(q, k, v), dense_cross(q, k, v, torch.ones_like(kpm)), atol=1e-10, rtol=0)


def test_nystrom_with_one_landmark_per_token_is_cross_attention():
    """Landmarks = tokens on both sides: S(Q, K~) pinv(S(Q~, K~)) S(Q~, K) V = S pinv(S) S V = S V for the
    rectangular S over the real keys (the iterative pinv converges for it; 40 iterations)."""
    attn = build_small("nystrom", num_landmarks=32, pinv_iterations=40, num_kv_heads=2)
    q, k, v, kpm = cross_inputs(seed=3, scale=0.5)
    with torch.no_grad():
        out = attn.attend(q, k, v, key_padding_mask=kpm, cross=True)
    torch.testing.assert_close(out, dense_cross(q, k, v, kpm).detach(), atol=1e-8, rtol=0)


def test_nystrom_cross_does_not_mask_queries_with_the_encoder_padding():
    """Self-attention drops padded positions from the query landmarks too (they are the same tokens); cross-attention
    takes every decoder query: with equal lengths only ``cross=True`` tells them apart."""
    attn = build_small("nystrom", num_landmarks=4)
    gen = torch.Generator().manual_seed(9)
    q, k, v = (0.5 * torch.randn(1, 4, 16, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    kpm = torch.arange(16)[None] < 10
    with torch.no_grad():
        cross = attn.attend(q, k, v, key_padding_mask=kpm, cross=True)
        self_attention = attn.attend(q, k, v, key_padding_mask=kpm)
        changed_q = q.clone()
        changed_q[:, :, 12:] += 1.0  # decoder queries 12..15 form a whole landmark segment
        self_changed = attn.attend(changed_q, k, v, key_padding_mask=kpm)
        cross_changed = attn.attend(changed_q, k, v, key_padding_mask=kpm, cross=True)
    assert not torch.allclose(cross, self_attention)
    # self-attention: queries at padded positions do not enter any landmark, so real rows 0..9 are unchanged
    torch.testing.assert_close(self_changed[:, :, :10], self_attention[:, :, :10])
    # cross-attention: every decoder query is real and enters its landmark, so every row can change
    assert not torch.allclose(cross_changed[:, :, :10], cross[:, :, :10])


def test_performer_cross_error_shrinks_with_features_and_ignores_padded_keys():
    q, k, v, kpm = (t.detach() if t.dtype != torch.bool else t for t in cross_inputs(seed=4, scale=0.5))
    ref = dense_cross(q, k, v, kpm)
    errors = []
    for m in (16, 512):
        per_seed = []
        for seed in range(2):
            attn = build_small("performer", num_features=m, seed=seed, num_kv_heads=2)
            with torch.no_grad():
                per_seed.append((attn.attend(q, k, v, key_padding_mask=kpm) - ref).norm() / ref.norm())
        errors.append(sum(per_seed) / 2)
    assert errors[1] < 0.5 * errors[0], errors  # Monte Carlo: ~1/sqrt(32) for 32x the features
    attn = build_small("performer", num_kv_heads=2)
    changed_k, changed_v = k.clone(), v.clone()
    changed_k[~kpm[:, None, :].expand_as(k[..., 0])] = 7.0
    changed_v[~kpm[:, None, :].expand_as(v[..., 0])] = -3.0
    with torch.no_grad():
        torch.testing.assert_close(attn.attend(q, changed_k, changed_v, kpm), attn.attend(q, k, v, kpm))


@pytest.mark.parametrize("key", [k for k in ea.list_attentions() if k not in CROSS])
def test_pattern_variants_refuse_cross_attention(key):
    attn = build_small(key)
    q, k, v, kpm = cross_inputs()
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    with pytest.raises(ValueError, match=rf"attention '{key}' does not support cross-attention.*full"):
        attn.attend(q, k, v)


def test_causal_cross_attention_is_refused():
    attn = build_small("full", causal=True)
    q, k, v, _ = cross_inputs()
    with pytest.raises(ValueError, match="causal=True needs one sequence"):
        attn.attend(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))


@pytest.mark.parametrize("key", CROSS)
def test_forward_with_context_projects_keys_from_the_encoder(key):
    attn = build_small(key, num_kv_heads=2, **({"max_len": 64} if key == "linformer" else {}))
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, Q_LEN, 32, generator=gen, dtype=torch.float64)
    ctx = torch.randn(2, KV_LEN, 32, generator=gen, dtype=torch.float64)
    kpm = random_padding(2, KV_LEN, seed=6)
    y = attn(x, key_padding_mask=kpm, context=ctx)
    assert y.shape == x.shape and torch.isfinite(y).all()
    # the same as projecting by hand and calling attend
    q, kv = attn.qkv(x)[..., :32], attn.qkv(ctx)[..., 32:]
    q = q.view(2, Q_LEN, 4, 8).transpose(1, 2)
    k, v = kv.view(2, KV_LEN, 2, 2, 8).permute(2, 0, 3, 1, 4)
    o = attn.attend(q, k, v, key_padding_mask=kpm, cross=True)
    torch.testing.assert_close(y, attn.out(o.transpose(1, 2).reshape(2, Q_LEN, 32)), atol=1e-12, rtol=0)
    assert not math.isnan(float(y.sum()))
