"""The decode cache contract: ``new_cache``, then ``attend(q, k, v, cache=...)`` with a prefill chunk of any length and
single tokens, equals the causal full-sequence result at those positions (float64 to 1e-10, float32 to 1e-5), for
every causal variant; module level with RoPE positions continuing from the cache; what each cache holds (bytes,
grouped heads); and the refusals (overflow, foreign cache, dtype, device, batch, non-causal, non-decodable)."""

from __future__ import annotations

import pytest
import torch

import efficient_attn as ea
from decode_cases import CAUSAL_PARAMS, build_causal
from helpers import build_for_test

KEYS = list(CAUSAL_PARAMS)


def kv_heads(key: str) -> int:
    return 2 if ea.get_spec(key).module_cls.supports_gqa else 4


def inputs(key: str, n: int, dtype=torch.float64, batch: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, 4, n, 8, generator=gen, dtype=dtype)
    k, v = (torch.randn(batch, kv_heads(key), n, 8, generator=gen, dtype=dtype) for _ in range(2))
    return q, k, v


def decode_in_pieces(attn, q, k, v, mask, pieces, max_len=None):
    cache = attn.new_cache(q.shape[0], dtype=q.dtype, max_len=max_len)
    outs, start = [], 0
    for size in pieces:
        stop = start + size
        part = None if mask is None else mask[:, start:stop]
        outs.append(attn.attend(q[:, :, start:stop], k[:, :, start:stop], v[:, :, start:stop],
                                key_padding_mask=part, cache=cache))
        start = stop
    assert cache.length == start
    return torch.cat(outs, dim=-2), cache


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("key", KEYS)
def test_prefill_then_tokens_equal_the_full_causal_result(key, padded):
    n = 27
    attn = build_causal(key, num_kv_heads=kv_heads(key))
    q, k, v = inputs(key, n)
    mask = None
    if padded:
        mask = torch.ones(2, n, dtype=torch.bool)
        mask[1, :5] = False  # left padding
    with torch.no_grad():
        full = attn.attend(q, k, v, key_padding_mask=mask)
        pieces = [9, 4] + [1] * (n - 13)  # a prefill, a chunk into a non-empty cache, then single tokens
        out, cache = decode_in_pieces(attn, q, k, v, mask, pieces)
    torch.testing.assert_close(out, full, rtol=1e-10, atol=1e-10)
    assert cache.nbytes == sum(t.numel() * t.element_size() for t in cache.tensors()) > 0


@pytest.mark.parametrize("key", KEYS)
def test_float32_decode_within_1e_5(key):
    n = 21
    attn = build_causal(key, num_kv_heads=kv_heads(key)).float()
    q, k, v = inputs(key, n, torch.float32, seed=1)
    with torch.no_grad():
        full = attn.attend(q, k, v)
        out, _ = decode_in_pieces(attn, q, k, v, None, [6] + [1] * (n - 6))
    torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key", ["full", "window", "bigbird", "longformer", "moba"])
def test_every_cpu_backend_prefills_the_cache(key):
    n = 19
    from decode_cases import cpu_backends

    for backend in cpu_backends(key, torch.float64):
        attn = build_causal(key, backend=backend, num_kv_heads=kv_heads(key))
        q, k, v = inputs(key, n, seed=2)
        with torch.no_grad():
            full = attn.attend(q, k, v)
            out, _ = decode_in_pieces(attn, q, k, v, None, [10] + [1] * 9)
        torch.testing.assert_close(out, full, rtol=1e-10, atol=1e-10, msg=lambda m: f"{backend}: {m}")


def test_full_static_cache_equals_the_growing_one_and_is_preallocated():
    attn = build_causal("full", num_kv_heads=2)
    q, k, v = inputs("full", 20)
    with torch.no_grad():
        grown, g_cache = decode_in_pieces(attn, q, k, v, None, [7] + [1] * 13)
        static, s_cache = decode_in_pieces(attn, q, k, v, None, [7] + [1] * 13, max_len=32)
    torch.testing.assert_close(static, grown, rtol=0, atol=1e-12)
    assert s_cache.keys.shape == (2, 2, 32, 8), "static: max_len slots of num_kv_heads heads from the start"
    assert g_cache.keys.shape[1] == 2 and g_cache.keys.shape[2] >= 20


@pytest.mark.parametrize("key, holds_context", [("window", False), ("longformer", False), ("performer", False),
                                                ("linear", False), ("retention", False), ("full", True)])
def test_cache_bytes_constant_or_growing_in_the_context(key, holds_context):
    attn = build_causal(key, num_kv_heads=kv_heads(key))
    sizes = {}
    for n in (40, 160):
        q, k, v = inputs(key, n)
        cache = attn.new_cache(2, dtype=torch.float64)
        with torch.no_grad():
            attn.attend(q, k, v, cache=cache)
        sizes[n] = cache.nbytes
    if holds_context:
        assert sizes[160] >= 3 * sizes[40]
    else:
        assert sizes[160] == sizes[40]


def test_window_cache_is_a_ring_of_window_plus_one_with_exact_bytes():
    attn = build_causal("window", num_kv_heads=2)  # window 5
    cache = attn.new_cache(3, dtype=torch.float64)
    slots = 6
    expected = 2 * 3 * 2 * slots * 8 * 8 + 3 * slots * 1 + slots * 8  # k, v float64; real bool; positions int64
    assert cache.nbytes == expected
    assert cache.keys.shape == (3, 2, slots, 8)


def test_module_level_decode_continues_rope_positions():
    attn = build_for_test("window", causal=True, window_size=4, rope=True, num_kv_heads=2).double().eval()
    x = torch.randn(2, 15, 32, dtype=torch.float64)
    with torch.no_grad():
        full = attn(x)
        cache = attn.new_cache(2, dtype=torch.float64)
        outs = [attn(x[:, :6], cache=cache)] + [attn(x[:, t : t + 1], cache=cache) for t in range(6, 15)]
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-10, atol=1e-10)
    # explicit positions: the same as the default continuation
    with torch.no_grad():
        cache = attn.new_cache(2, dtype=torch.float64)
        attn(x[:, :6], cache=cache, positions=torch.arange(6).expand(2, 6))
        step = attn(x[:, 6:7], cache=cache, positions=torch.full((2, 1), 6))
    torch.testing.assert_close(step, full[:, 6:7], rtol=1e-10, atol=1e-10)


def test_alibi_decode_equals_the_full_result():
    for key in ("full", "window", "bigbird", "longformer"):
        attn = build_causal(key, alibi=True, num_kv_heads=kv_heads(key))
        q, k, v = inputs(key, 18)
        with torch.no_grad():
            full = attn.attend(q, k, v)
            out, _ = decode_in_pieces(attn, q, k, v, None, [5] + [1] * 13)
        torch.testing.assert_close(out, full, rtol=1e-10, atol=1e-10, msg=lambda m: f"{key}: {m}")


# ----------------------------------------------------------------------------------------------- refusals
def test_a_step_past_a_static_cache_is_refused():
    attn = build_causal("full", num_kv_heads=2)
    q, k, v = inputs("full", 5)
    cache = attn.new_cache(2, dtype=torch.float64, max_len=4)
    with pytest.raises(ValueError, match=r"cache overflow: it holds 0 of max_len=4 tokens and cannot take 5"):
        attn.attend(q, k, v, cache=cache)


def test_a_cache_of_another_module_dtype_device_or_batch_is_refused():
    attn, other = build_causal("window", num_kv_heads=2), build_causal("window", num_kv_heads=2)
    q, k, v = inputs("window", 3)
    with pytest.raises(ValueError, match="made by another module"):
        attn.attend(q, k, v, cache=other.new_cache(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="cache dtype is torch.float32"):
        attn.attend(q, k, v, cache=attn.new_cache(2, dtype=torch.float32))
    with pytest.raises(ValueError, match="cache is on meta"):
        attn.attend(q, k, v, cache=attn.new_cache(2, dtype=torch.float64, device="meta"))
    with pytest.raises(ValueError, match="cache was made for batch 3, got a batch of 2"):
        attn.attend(q, k, v, cache=attn.new_cache(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="cache must come from new_cache"):
        attn.attend(q, k, v, cache={"k": k})


def test_decode_on_a_non_causal_module_is_refused():
    attn = build_for_test("full", causal=False)
    with pytest.raises(ValueError, match="decoding needs causal attention: this 'full' module has causal=False"):
        attn.new_cache(1)


@pytest.mark.parametrize("key", ["linformer", "nystrom"])
def test_non_causal_variants_cannot_decode_with_the_reason(key):
    attn = build_for_test(key)
    with pytest.raises(ValueError, match=f"attention '{key}' cannot decode incrementally: "):
        attn.new_cache(1)
    assert ea.get_spec(key).module_cls.decode_unsupported_reason


def test_longformer_global_index_beyond_its_window_is_refused():
    attn = build_for_test("longformer", causal=True, window_size=2, global_tokens=(0, 6))
    with pytest.raises(ValueError, match="cannot decode with global token 6"):
        attn.new_cache(1)


def test_bad_padding_mask_with_a_cache_is_refused():
    attn = build_causal("full", num_kv_heads=2)
    q, k, v = inputs("full", 3)
    with pytest.raises(ValueError, match=r"key_padding_mask is bool \(batch, new tokens\) = \(2, 3\)"):
        attn.attend(q, k, v, key_padding_mask=torch.ones(2, 4, dtype=torch.bool), cache=attn.new_cache(2))


@pytest.mark.parametrize("key", KEYS)
def test_fill_cache_leaves_what_a_prefill_leaves(key):
    attn = build_causal(key, num_kv_heads=kv_heads(key))
    q, k, v = inputs(key, 14)
    with torch.no_grad():
        full = attn.attend(q, k, v)
        cache = attn.new_cache(2, dtype=torch.float64)
        attn.fill_cache(cache, q[:, :, :12], k[:, :, :12], v[:, :, :12])
        out = attn.attend(q[:, :, 12:], k[:, :, 12:], v[:, :, 12:], cache=cache)
    torch.testing.assert_close(out, full[:, :, 12:], rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="fill_cache fills an empty cache; this one holds 14 tokens"):
        attn.fill_cache(cache, q, k, v)
