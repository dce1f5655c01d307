"""The attention contract, checked for every registered key and every backend that runs on this machine.

Parametrised over ``list_attentions()``: a variant registered by a later change is tested here automatically.
Exact variants (``spec.exact``) must equal an independent float64 reference built from their own ``dense_mask``.
"""

import pytest
import torch

import efficient_attn as ea
from efficient_attn.errors import BackendUnavailableError
from helpers import build_for_test, pattern_with_padding, random_padding, random_qkv, reference_attention

KEYS = ea.list_attentions()
CPU = torch.device("cpu")


def backend_cases():
    for key in KEYS:
        for backend in ea.get_spec(key).backends:
            yield pytest.param(key, backend, id=f"{key}-{backend}")


def causal_options(key):
    return [False, True] if ea.get_spec(key).supports_causal else [False]


@pytest.mark.parametrize("key", KEYS)
def test_forward_shape_and_finite(key):
    attn = build_for_test(key, dim=32, num_heads=4)
    x = torch.randn(2, 40, 32)
    y = attn(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    kpm = random_padding(2, 40, seed=1)
    y = attn(x, key_padding_mask=kpm)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert attn.last_backend in ea.get_spec(key).backends


@pytest.mark.parametrize("key", KEYS)
def test_extra_repr_shows_config(key):
    attn = build_for_test(key)
    text = repr(attn)
    for name in attn.config.to_dict():
        assert f"{name}=" in text


@pytest.mark.parametrize("key, backend", list(backend_cases()))
def test_backend_forward_shape_or_reports_unavailable(key, backend):
    attn = build_for_test(key, backend=backend)
    q, k, v = random_qkv(1, 4, 24, 8, dtype=torch.float32)
    reason = attn.unavailable_reason(backend, CPU, False, q.dtype)
    if reason is not None:
        with pytest.raises(BackendUnavailableError, match=reason[:20]):
            with torch.no_grad():
                attn.attend(q, k, v)
        return
    with torch.no_grad():
        out = attn.attend(q, k, v)
    assert out.shape == q.shape and attn.last_backend == backend


@pytest.mark.parametrize("key, backend", [c for c in backend_cases() if ea.get_spec(c.values[0]).exact])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("seq", [37, 80])
def test_exact_variant_matches_reference(key, backend, causal, padded, seq):
    if causal and not ea.get_spec(key).supports_causal:
        pytest.skip(f"{key} is not causal")
    attn = build_for_test(key, causal=causal, backend=backend).double()
    q, k, v = random_qkv(2, 4, seq, 8, seed=seq)
    kpm = random_padding(2, seq, seed=seq + 1) if padded else None
    reason = attn.unavailable_reason(backend, CPU, False, q.dtype)
    if reason is not None:
        # flex has no float64 kernel and xformers no CPU kernel: tests/test_flex.py checks flex against the same
        # float64 reference in float32; tests/test_xformers.py checks xformers' masks and its CUDA path (mocked)
        pytest.skip(f"{backend} cannot run this float64 CPU case: {reason}")
    allowed = pattern_with_padding(attn.dense_mask(seq), kpm)
    ref = reference_attention(q, k, v, allowed)
    backward_reason = attn.unavailable_reason(backend, CPU, True, q.dtype)
    if backward_reason is not None:
        # forward-only backend: backward must be reported unsupported, not silently wrong
        with pytest.raises(BackendUnavailableError):
            attn.attend(q, k, v, key_padding_mask=kpm)
        with torch.no_grad():
            out = attn.attend(q, k, v, key_padding_mask=kpm)
        torch.testing.assert_close(out, ref.detach(), atol=1e-9, rtol=1e-7)
        return
    out = attn.attend(q, k, v, key_padding_mask=kpm)
    torch.testing.assert_close(out, ref, atol=1e-9, rtol=1e-7)
    grad_out = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    for name, g, r in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-9, rtol=1e-7, msg=f"gradient of {name}")


@pytest.mark.parametrize("key", [k for k in KEYS if ea.get_spec(k).supports_causal])
def test_causal_variants_ignore_the_future(key):
    attn = build_for_test(key, causal=True).double().eval()
    q, k, v = random_qkv(1, 4, 50, 8, seed=7)
    t = 20
    with torch.no_grad():
        out = attn.attend(q, k, v)
        k2, v2, q2 = k.clone(), v.clone(), q.clone()
        k2[:, :, t + 1 :] += 3.0
        v2[:, :, t + 1 :] -= 2.0
        q2[:, :, t + 1 :] *= -1.0
        out2 = attn.attend(q2, k2, v2)
    torch.testing.assert_close(out[:, :, : t + 1], out2[:, :, : t + 1], atol=1e-10, rtol=0)
    assert not torch.allclose(out[:, :, t + 1 :], out2[:, :, t + 1 :])


@pytest.mark.parametrize("key", [k for k in KEYS if not ea.get_spec(k).supports_causal])
def test_non_causal_variants_refuse_causal_with_reason(key):
    with pytest.raises(ValueError, match=rf"attention '{key}' cannot be causal: \w+"):
        build_for_test(key, causal=True)


@pytest.mark.parametrize("key", KEYS)
def test_declared_capabilities_match_behaviour(key):
    """What ``effattn list`` shows (attention.base.capabilities) is what the variant does."""
    from efficient_attn.attention.base import capabilities

    caps = capabilities(ea.get_spec(key).module_cls)
    if caps["gqa"]:
        assert build_for_test(key, num_kv_heads=1).config.num_kv_heads == 1
    else:
        with pytest.raises(ValueError, match="grouped key/value heads"):
            build_for_test(key, num_kv_heads=1)
    if not caps["alibi"]:
        with pytest.raises(ValueError, match="alibi is not supported"):
            build_for_test(key, alibi=True)
    attn = build_for_test(key).double().eval()
    q, k, v = (t.detach() for t in random_qkv(1, 4, 12, 8))
    k2, v2 = (t.detach() for t in random_qkv(1, 4, 7, 8, seed=1)[1:])
    with torch.no_grad():
        if caps["cross"]:
            assert attn.attend(q, k2, v2).shape == q.shape
        else:
            with pytest.raises(ValueError, match="does not support cross-attention"):
                attn.attend(q, k2, v2)
        ids = torch.tensor([[0] * 5 + [1] * 7])
        if caps["packing"]:
            assert attn.attend(q, k, v, document_ids=ids).shape == q.shape
        else:
            with pytest.raises(ValueError, match="packed"):
                attn.attend(q, k, v, document_ids=ids)


def test_effattn_list_shows_the_capabilities(capsys):
    from efficient_attn import cli

    assert cli.main(["list"]) == 0
    header, _, *rows = capsys.readouterr().out.splitlines()
    for column in ("gqa", "alibi", "packing", "cross"):
        assert column in header.split()
    full = next(r for r in rows if r.startswith("full "))
    assert "naive,torch,flex" in full  # full's ALiBi backends
