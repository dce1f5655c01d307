"""Packed variable-length batches: ``attend(..., document_ids=...)`` attends each document exactly as if it were alone.

For every variant and every backend that accepts ``document_ids``: the packed output and q/k/v gradients equal each
document run alone (float64), causal and not, with documents shorter than one block, a document of length 1, lengths
that are not block multiples and a padding tail. FlexAttention (float32, forward only on CPU) composes a document
mask for the translation-invariant patterns and refuses the others; bad ``document_ids`` are ``ValueError``s.
"""

from __future__ import annotations

import pytest
import torch

import efficient_attn as ea
from variant_cases import build_small, kv_heads_for

#: Row 0: documents of 1, 5, 13 and 19 tokens (bigbird's block is 8, window's 5, longformer's 4); row 1: 20 and 14
#: tokens, then a 4-token padding tail as its own document.
LENGTHS = [[1, 5, 13, 19], [20, 14, 4]]
SEQ = 38


def packed_inputs(heads=4, kv_heads=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, SEQ, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, kv_heads, SEQ, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    ids = torch.tensor([sum(([i] * n for i, n in enumerate(row)), []) for row in LENGTHS])
    kpm = torch.ones(2, SEQ, dtype=torch.bool)
    kpm[1, -4:] = False
    return q, k, v, ids, kpm


def each_alone(attn, q, k, v, kpm):
    """The output of every document attended alone, put back in packed order."""
    rows = []
    for b, row in enumerate(LENGTHS):
        parts, start = [], 0
        for n in row:
            s = slice(start, start + n)
            parts.append(attn.attend(q[b:b + 1, :, s], k[b:b + 1, :, s], v[b:b + 1, :, s],
                                     key_padding_mask=kpm[b:b + 1, s]))
            start += n
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows)


def packing_cases():
    for key in ea.list_attentions():
        cls = ea.get_spec(key).module_cls
        if not cls.supports_packing:
            continue
        for backend in cls.packing_backends or ea.get_spec(key).backends:
            if backend not in ("flex", "xformers"):  # flex: below (float32); xformers: CUDA only
                yield pytest.param(key, backend, id=f"{key}-{backend}")


@pytest.mark.parametrize("key, backend", list(packing_cases()))
@pytest.mark.parametrize("causal", [False, True])
def test_packed_equals_each_document_alone(key, backend, causal):
    if causal and not ea.get_spec(key).supports_causal:
        pytest.skip(f"{key} is not causal")
    kv_heads = kv_heads_for(key, 2)
    attn = build_small(key, causal=causal, backend=backend, num_kv_heads=kv_heads).eval()
    q, k, v, ids, kpm = packed_inputs(kv_heads=kv_heads)
    out = attn.attend(q, k, v, key_padding_mask=kpm, document_ids=ids)
    assert attn.last_backend == backend
    ref = each_alone(attn, q, k, v, kpm)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-8)
    assert (out[1, :, -4:] == 0).all()  # the padding tail has no real key
    grad = torch.randn_like(out)
    for name, g, r in zip("qkv", torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-8, msg=f"gradient of {name}")


@pytest.mark.parametrize("key", ["window", "full"])
def test_packing_differs_from_the_unpacked_row_so_the_check_can_fail(key):
    attn = build_small(key, backend="naive", num_kv_heads=2)
    q, k, v, ids, kpm = packed_inputs()
    assert not torch.allclose(attn.attend(q, k, v, kpm, document_ids=ids), attn.attend(q, k, v, kpm))


def test_blocked_cost_follows_the_documents(monkeypatch):
    """The torch backend runs once per distinct document length, never on the packed length."""
    attn = build_small("window", backend="torch")
    seen = []
    real = attn._attend_torch
    monkeypatch.setattr(attn, "_attend_torch", lambda q, k, v, m: seen.append(tuple(q.shape[::2])) or real(q, k, v, m))
    q, k, v, ids, kpm = packed_inputs(kv_heads=4)
    attn.attend(q, k, v, kpm, document_ids=ids)
    # (batch of the call, length): one call per distinct document length, documents of one length share it
    assert sorted(seen) == [(1, 1), (1, 4), (1, 5), (1, 13), (1, 14), (1, 19), (1, 20)]
    seen.clear()
    same = torch.tensor([[0] * 19 + [1] * 19, [0] * 19 + [1] * 19])
    attn.attend(q, k, v, document_ids=same)
    assert seen == [(4, 19)]


def test_rope_forward_restarts_positions_at_each_document():
    attn = build_small("window", rope=True, backend="torch", causal=True)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 12, 32, generator=gen, dtype=torch.float64)
    ids = torch.tensor([[0] * 5 + [1] * 7])
    packed = attn(x, document_ids=ids)
    alone = torch.cat([attn(x[:, :5]), attn(x[:, 5:])], dim=1)
    torch.testing.assert_close(packed, alone, atol=1e-10, rtol=1e-8)


def test_a_redrawing_variant_draws_once_per_packed_call():
    attn = build_small("bigbird", redraw=True, backend="torch").train()
    q, k, v, ids, kpm = packed_inputs(kv_heads=4)
    attn.attend(q, k, v, kpm, document_ids=ids)
    assert attn.pattern.draw == 1


def test_flex_packs_window_with_a_document_mask():
    """float32, forward only: one compile; equals each document alone on the torch backend."""
    flex = build_small("window", backend="flex", num_kv_heads=2).float().eval()
    torch_backend = build_small("window", backend="torch", num_kv_heads=2).float().eval()
    q, k, v, ids, kpm = (t.detach().float() if t.dtype == torch.float64 else t for t in packed_inputs())
    with torch.no_grad():
        out = flex.attend(q, k, v, key_padding_mask=kpm, document_ids=ids)
        ref = each_alone(torch_backend, q, k, v, kpm)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("key", ["longformer", "bigbird"])
def test_flex_refuses_patterns_anchored_at_the_row_start(key):
    attn = build_small(key, backend="flex").float()
    q, k, v, ids, kpm = (t.detach().float() if t.dtype == torch.float64 else t for t in packed_inputs(kv_heads=4))
    with pytest.raises(ValueError, match=rf"backend 'flex' of attention '{key}' does not support packed.*torch"):
        with torch.no_grad():
            attn.attend(q, k, v, document_ids=ids)


def test_auto_packs_with_a_backend_that_can():
    attn = build_small("longformer")
    q, k, v, ids, kpm = packed_inputs(kv_heads=4)
    attn.attend(q, k, v, kpm, document_ids=ids)
    assert attn.last_backend == "torch"


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.zeros(2, 37, dtype=torch.long), r"shape \(batch, seq\) = \(2, 38\).*got shape \(2, 37\)"),
        (torch.zeros(38, dtype=torch.long), r"got shape \(38,\)"),
        (torch.zeros(2, 38), "got dtype torch.float32"),
        (torch.zeros(2, 38, dtype=torch.bool), "got dtype torch.bool"),
        (torch.tensor([[0] * 20 + [1] * 10 + [0] * 8] * 2), r"non-decreasing.*row 0 at position 30 \(1 -> 0\)"),
        ([0] * 38, "got list"),
    ],
)
def test_bad_document_ids_say_what_is_expected(bad, match):
    attn = build_small("window", backend="torch")
    q, k, v, _, _ = packed_inputs(kv_heads=4)
    with pytest.raises(ValueError, match=match):
        attn.attend(q, k, v, document_ids=bad)
