"""Prefix consistency: a causal variant's output at t depends on tokens 0..t only, not on how many tokens follow.

For every causal-capable variant and every backend that runs on CPU: attend over N tokens and over the first N/2; the
first N/2 outputs agree (float64 to 1e-10). Lengths that are not multiples of the block, chunk or window sizes are
included. Without this, incremental decoding could not equal the full forward.

``flex`` (float32-only and compiled per length on CPU: about a minute per case on 2 cores) is checked here for
BigBird only, as a slow case: it evaluates the same ``mask_mod`` as ``naive`` (``tests/test_flex.py`` checks that
flex equals the dense reference of the pattern for every pattern variant), so the ``naive`` cases carry the rest.
"""

from __future__ import annotations

import pytest
import torch

from decode_cases import CAUSAL_PARAMS, build_causal, causal_keys, cpu_backends


def test_every_causal_variant_has_prefix_parameters():
    assert set(causal_keys()) == set(CAUSAL_PARAMS), "add the new causal variant to tests/decode_cases.py"


CASES = [(key, backend) for key in CAUSAL_PARAMS for backend in cpu_backends(key, torch.float64)]


@pytest.mark.parametrize("n", [37, 48])
@pytest.mark.parametrize("key, backend", CASES)
def test_causal_output_does_not_depend_on_later_tokens(key, backend, n):
    check_prefix(key, backend, n, torch.float64, halves=(n // 2, n // 2 + 1))


@pytest.mark.slow
def test_bigbird_flex_output_does_not_depend_on_later_tokens():
    check_prefix("bigbird", "flex", 37, torch.float32, halves=(18,))


def check_prefix(key: str, backend: str, n: int, dtype: torch.dtype, halves: tuple[int, ...]) -> None:
    attn = build_causal(key, backend=backend).to(dtype)
    gen = torch.Generator().manual_seed(n)
    kv_heads = attn.config.num_kv_heads
    q = torch.randn(2, 4, n, 8, generator=gen, dtype=dtype)
    k, v = (torch.randn(2, kv_heads, n, 8, generator=gen, dtype=dtype) for _ in range(2))
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[1, :3] = False  # left padding in one row
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for half in halves:
        with torch.no_grad():
            whole = attn.attend(q, k, v, key_padding_mask=mask)
            prefix = attn.attend(q[:, :, :half], k[:, :, :half], v[:, :, :half], key_padding_mask=mask[:, :half])
        torch.testing.assert_close(prefix, whole[:, :, :half], rtol=tol, atol=tol,
                                   msg=lambda m: f"{key}/{backend} at N={n}, prefix {half}: {m}")


def test_bigbird_causal_plan_rows_do_not_depend_on_the_number_of_blocks():
    attn = build_causal("bigbird", num_random_blocks=3)
    short, long = attn.pattern.random_blocks(20), attn.pattern.random_blocks(57)
    assert torch.equal(long[:, :20], short)
    assert (long >= 0).any(), "the plan has random blocks"


def test_bigbird_plan_memory_is_linear_in_blocks_at_a_million_tokens():
    """Issue 19 item 1: the plan (and the block cover) cost O(blocks * (window + random + global)), not blocks^2."""
    from efficient_attn.measure.storage import StorageTracker

    from helpers import build_for_test

    peaks = {}
    for n in (1 << 19, 1 << 20):
        attn = build_for_test("bigbird", causal=False, block_size=64)
        with StorageTracker() as tracker:
            attn.structure(n)
            attn.pattern.mask_mod(n)
        peaks[n] = tracker.peak_bytes
    blocks = (1 << 20) // 64
    heads, slots = 4, 3 + 2 + 3
    # a few int64 tensors of (heads, blocks, slots) at most: far below one dense (blocks, blocks) bool layout
    assert peaks[1 << 20] < 40 * heads * blocks * slots * 8
    assert peaks[1 << 20] < blocks * blocks / 10
    assert peaks[1 << 20] / peaks[1 << 19] == pytest.approx(2.0, rel=0.1), peaks
