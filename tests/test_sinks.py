"""Window attention with sink tokens (StreamingLLM, Xiao et al. 2023, arXiv:2309.17453; issue 17).

Sinks are keys only: every query also sees keys ``j < s`` (causal: ``j <= i``). Checked against a float64 dense
reference built here from the rule itself (not from the library's mask), causal and not, with padding and grouped
heads; ``sink_tokens=0`` is today's window exactly; sinks >= the sequence clamp (every token a sink); incremental
decoding through the sinks + rolling buffer cache equals the causal forward; bad values are refused.
"""

import pytest
import torch

from decode_cases import build_causal
from helpers import build_for_test, random_padding, random_qkv, reference_attention
from test_decode import decode_in_pieces, inputs
from test_sparse import check_against_reference


def sink_rule(n: int, window: int, sinks: int, causal: bool) -> torch.Tensor:
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    near = (i - j >= 0) & (i - j <= window) if causal else (i - j).abs() <= window
    sink = (j < sinks) & (j <= i) if causal else j < sinks
    return near | sink


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("window", "block", "sinks", "seq"), [(4, 4, 2, 37), (3, 8, 5, 40), (5, 2, 1, 23),
                                                                (4, 4, 50, 30)])
@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_sinks_match_the_rule_and_the_reference(causal, window, block, sinks, seq, backend):
    attn = build_for_test("window", dim=32, num_heads=4, causal=causal, backend=backend, window_size=window,
                          block_size=block, sink_tokens=sinks).double()
    assert torch.equal(attn.dense_mask(seq), sink_rule(seq, window, sinks, causal))
    q, k, v = random_qkv(2, 4, seq, 8, seed=seq)
    check_against_reference(attn, q, k, v, random_padding(2, seq, seed=1, empty_row=True))
    q, k, v = random_qkv(1, 4, seq, 8, seed=seq + 1)
    check_against_reference(attn, q, k, v, None)


def test_sinks_with_grouped_heads_match_the_reference():
    attn = build_for_test("window", dim=32, num_heads=4, num_kv_heads=2, causal=True, backend="torch",
                          window_size=4, block_size=4, sink_tokens=3).double()
    q, _, _ = random_qkv(1, 4, 33, 8, seed=2)
    _, k, v = random_qkv(1, 2, 33, 8, seed=3)
    out = attn.attend(q, k, v)
    ref = reference_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), sink_rule(33, 4, 3, True))
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("causal", [False, True])
def test_zero_sinks_is_the_plain_window(causal):
    plain = build_for_test("window", dim=32, num_heads=4, causal=causal, window_size=5, block_size=4).double()
    zero = build_for_test("window", dim=32, num_heads=4, causal=causal, window_size=5, block_size=4,
                          sink_tokens=0).double()
    q, k, v = random_qkv(2, 4, 29, 8, seed=5)
    assert torch.equal(plain.attend(q, k, v), zero.attend(q, k, v))
    assert zero.structure(29).extra_keys.numel() == 0


@pytest.mark.parametrize("padded", [False, True])
def test_decode_with_sinks_equals_the_causal_forward(padded):
    n = 27
    attn = build_causal("window", num_kv_heads=2, sink_tokens=3)
    q, k, v = inputs("window", n)
    mask = None
    if padded:
        mask = torch.ones(2, n, dtype=torch.bool)
        mask[1, :5] = False
    with torch.no_grad():
        full = attn.attend(q, k, v, key_padding_mask=mask)
        out, cache = decode_in_pieces(attn, q, k, v, mask, [2, 9] + [1] * (n - 11))
    torch.testing.assert_close(out, full, rtol=1e-10, atol=1e-10)
    # bounded: the sinks plus a ring of window + 1, whatever the context
    assert cache.nbytes == sum(t.numel() * t.element_size() for t in cache.tensors())


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_bad_sink_tokens_are_refused(bad):
    with pytest.raises(ValueError, match="sink_tokens"):
        build_for_test("window", dim=32, num_heads=4, window_size=4, sink_tokens=bad)


def test_sinks_refuse_a_backend_that_cannot_show_them():
    attn = build_for_test("window", dim=32, num_heads=4, window_size=4, sink_tokens=2)
    q, k, v = random_qkv(1, 4, 16, 8)
    with pytest.raises(ValueError, match="sink"):
        attn._attend_xformers(q, k, v, None)
    assert not attn.pattern_is_translation_invariant
