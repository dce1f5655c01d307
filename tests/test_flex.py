"""The ``flex`` backend (compiled FlexAttention) against the float64 reference from each pattern's ``dense_mask``.

FlexAttention on CPU computes in float32 (no float64 kernel), so outputs are compared with ``atol=1e-5``. Every new
shape compiles (5-50 s on a busy 2-core CPU): the tests share a few fixed shapes, and the heaviest are ``slow``.
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import efficient_attn as ea
from efficient_attn.errors import BackendUnavailableError
from efficient_attn.attention.flex import FlexRunner, dense_to_ordered, ordered_to_dense
from efficient_attn.measure.storage import StorageTracker
from helpers import pattern_with_padding, random_padding, random_qkv, reference_attention

CPU = torch.device("cpu")
SEQ = 300  # not a multiple of FlexAttention's 128-row blocks
PATTERN_PARAMS = {
    "window": dict(window_size=40),
    "bigbird": dict(block_size=32, num_random_blocks=2, num_global_blocks=1),
    "longformer": dict(window_size=40, global_tokens=(0, 7, 150)),
}


def padding_with_empty_rows(batch: int, seq: int) -> torch.Tensor:
    """Batch 0 all padding (every row empty); batch 1 real up to 130 (late window rows see no real key)."""
    kpm = random_padding(batch, seq, seed=3)
    kpm[0] = False
    kpm[1] = torch.arange(seq) < 130
    return kpm


def max_allocation_bytes(fn) -> int:
    """Largest single CPU allocation made while ``fn()`` runs (allocator events, so compiled code is seen too)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)


def check_close(out: torch.Tensor, q, k, v, allowed: torch.Tensor) -> None:
    ref = reference_attention(q, k, v, allowed)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------- correctness
@pytest.mark.parametrize("padded", [False, True])
def test_full_causal_matches_reference(padded):
    attn = ea.build_attention("full", dim=32, num_heads=4, causal=True, backend="flex")
    q, k, v = random_qkv(3, 4, SEQ, 8, dtype=torch.float32, seed=1)
    kpm = padding_with_empty_rows(3, SEQ) if padded else None
    with torch.no_grad():
        out = attn.attend(q, k, v, key_padding_mask=kpm)
    assert attn.last_backend == "flex"
    check_close(out, q, k, v, pattern_with_padding(attn.dense_mask(SEQ), kpm))
    if padded:
        assert (out[0] == 0).all()  # a batch row with no real key gives zeros, not NaN


@pytest.mark.parametrize(
    "key, causal, padded",
    # non-causal unpadded window: test_auto compares it (through auto) with the blocked backend at 2048 tokens
    [("window", True, True), ("bigbird", False, False), ("longformer", False, True)],
)
def test_pattern_matches_reference(key, causal, padded):
    attn = ea.build_attention(key, dim=32, num_heads=4, causal=causal, backend="flex", **PATTERN_PARAMS[key])
    q, k, v = random_qkv(3, 4, SEQ, 8, dtype=torch.float32, seed=2)
    kpm = padding_with_empty_rows(3, SEQ) if padded else None
    with torch.no_grad():
        out = attn.attend(q, k, v, key_padding_mask=kpm)
    assert attn.last_backend == "flex"
    check_close(out, q, k, v, pattern_with_padding(attn.dense_mask(SEQ), kpm))
    if padded:
        assert (out[0] == 0).all()


def test_block_list_round_trip():
    dense = torch.rand(2, 5, 7, generator=torch.Generator().manual_seed(0)) < 0.4
    num, idx = dense_to_ordered(dense)
    assert num.dtype == idx.dtype == torch.int32
    assert torch.equal(ordered_to_dense(num, idx, 7), dense)


# ------------------------------------------------------------------------------------------- CPU limitations
def test_backward_reported_unsupported_on_cpu():
    attn = ea.build_attention("full", dim=32, num_heads=4, causal=True, backend="flex")
    reason = attn.unavailable_reason("flex", CPU, True)
    assert reason is not None and "forward-only" in reason and "NotImplementedError" in reason
    assert type(attn).unavailable_reason("flex", CPU, True) == reason  # also on the class (the harness asks it)
    assert attn.unavailable_reason("flex", CPU, False) is None
    q, k, v = random_qkv(1, 4, 16, 8, dtype=torch.float32)
    with pytest.raises(BackendUnavailableError, match="forward-only"):
        attn.attend(q, k, v)


def test_float64_reported_unsupported_on_cpu():
    attn = ea.build_attention("full", dim=32, num_heads=4, backend="flex").double()
    assert "float64" in attn.unavailable_reason("flex", CPU, False, torch.float64)
    assert type(attn).unavailable_reason("flex", CPU, False, torch.float32) is None
    q, k, v = random_qkv(1, 4, 16, 8)
    with torch.no_grad(), pytest.raises(BackendUnavailableError, match="float32, float16 and bfloat16"):
        attn.attend(q, k, v)


def test_attention_dropout_is_refused_not_ignored():
    attn = ea.build_attention("full", dim=32, num_heads=4, backend="flex", dropout=0.1).train()
    q, k, v = random_qkv(1, 4, 16, 8, dtype=torch.float32)
    with torch.no_grad(), pytest.raises(ValueError, match="no attention dropout"):
        attn.attend(q, k, v)


def test_dispatch_modes_are_refused_instead_of_running_eager_flex():
    # Under a TorchDispatchMode dynamo does not compile, and eager FlexAttention would build the n x n scores.
    attn = ea.build_attention("full", dim=32, num_heads=4, causal=True, backend="flex")
    q, k, v = random_qkv(1, 4, 16, 8, dtype=torch.float32)
    with torch.no_grad(), StorageTracker(), pytest.raises(BackendUnavailableError, match="dispatch mode"):
        attn.attend(q, k, v)


# ----------------------------------------------------------------------------------------------- cache, memory
def test_block_mask_cache_hits_and_no_recompile():
    from torch._dynamo.utils import counters

    attn = ea.build_attention("full", dim=32, num_heads=4, causal=True, backend="flex")
    q, k, v = random_qkv(3, 4, SEQ, 8, dtype=torch.float32, seed=4)
    runner = attn._flex
    with torch.no_grad():
        first = attn.attend(q, k, v)
        assert (runner.misses, runner.hits) == (1, 0)
        graphs = counters["stats"]["unique_graphs"]
        second = attn.attend(q, k, v)
    assert (runner.misses, runner.hits) == (1, 1)
    assert counters["stats"]["unique_graphs"] == graphs  # nothing was compiled again
    assert torch.equal(first, second)
    assert runner.block_mask(SEQ, CPU) is runner.block_mask(SEQ, CPU)


@pytest.mark.slow
def test_no_n_by_n_tensor_for_mask_building_and_forward():
    n = 2048
    attn = ea.build_attention("window", dim=64, num_heads=4, backend="flex", window_size=64)
    q, k, v = random_qkv(1, 4, n, 16, dtype=torch.float32, seed=5)
    attn._flex.warmup(batch=1, heads=4, seq_len=n, head_dim=16)  # compile outside the measured call
    fresh = FlexRunner(attn.pattern.mask_mod, mask_heads=1)  # its block mask is built inside the measured call
    with torch.no_grad():
        largest = max_allocation_bytes(lambda: fresh(q, k, v))
    assert fresh.misses == 1
    assert largest < n * n // 8 * 4  # bytes; an n x n float32 (or int64) tensor would be 4-8 * n^2
    # the same probe sees a dense mask build: the check can fail
    with torch.no_grad():
        dense = max_allocation_bytes(lambda: attn.dense_mask(n))
    assert dense >= n * n


def test_bigbird_redraw_never_reuses_a_stale_block_mask():
    attn = ea.build_attention("bigbird", dim=32, num_heads=4, backend="flex", redraw=True, **PATTERN_PARAMS["bigbird"])
    attn.train()
    q, k, v = random_qkv(3, 4, SEQ, 8, dtype=torch.float32, seed=2)
    with torch.no_grad():
        attn.attend(q, k, v)  # draw 1
        out = attn.attend(q, k, v)  # draw 2: a new plan, so a new block mask
    assert attn._flex.misses == 2 and attn.pattern.draw == 2
    check_close(out, q, k, v, pattern_with_padding(attn.dense_mask(SEQ), None))
