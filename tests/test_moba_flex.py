"""MoBA's ``flex`` backend: compiled FlexAttention over a block mask built from the selection.

The output equals a float64 dense reference over :meth:`MobaAttention.dense_mask_for` (the same selection the
``naive`` oracle and the ``torch`` backend use) in float32 (FlexAttention has no float64 kernel on CPU), for one MoBA
block per flex block (block 128) and for grouped small blocks (block 32: four per flex block, the ``mask_mod`` reads
the selection); the block mask lists exactly the selected blocks; causal outputs ignore later tokens; what cannot
run (backward and float64 on CPU) is refused with flex's reasons. Every new shape compiles for 5-15 s on this CPU:
the tests share four compiled configurations (``SEQ`` tokens, batch 2, 4 heads of 8) and the rest are ``slow``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import efficient_attn as ea
from efficient_attn.attention.flex import ordered_to_dense
from efficient_attn.attention.moba import flex_block_size, moba_block_mask
from efficient_attn.errors import BackendUnavailableError
from efficient_attn.measure.storage import StorageTracker
from helpers import random_padding, random_qkv, reference_attention

SEQ = 300  # not a multiple of either block size, nor of FlexAttention's 128
TOL = dict(atol=1e-5, rtol=1e-4)


def build(*, causal: bool, block_size: int, top_k: int, kv_heads: int = 4, backend: str = "flex"):
    return ea.build_attention("moba", dim=32, num_heads=4, num_kv_heads=kv_heads, causal=causal, backend=backend,
                              block_size=block_size, top_k=top_k)


def inputs(kv_heads: int = 4, seed: int = 0):
    q = random_qkv(2, 4, SEQ, 8, seed=seed, dtype=torch.float32)[0].detach()
    k, v = (t.detach() for t in random_qkv(2, kv_heads, SEQ, 8, seed=seed + 1, dtype=torch.float32)[1:])
    return q, k, v


def padding() -> torch.Tensor:
    """Batch 0 all padding (every row empty: zeros, not NaN), batch 1 real up to 161 (inside a block)."""
    kpm = torch.ones(2, SEQ, dtype=torch.bool)
    kpm[0] = False
    kpm[1, 161:] = False
    return kpm


def oracle(attn, q, k, v, kpm=None) -> torch.Tensor:
    """float64 dense attention over the module's own selection, key padding and causal mask."""
    allowed = attn.dense_mask_for(q, k, kpm)
    if kpm is not None:
        allowed = allowed & kpm[:, None, None, :]
    groups = q.shape[1] // k.shape[1]
    return reference_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), allowed)


def run_flex(attn, q, k, v, kpm=None) -> torch.Tensor:
    with torch.no_grad():
        out = attn.attend(q, k, v, key_padding_mask=kpm)
    assert attn.last_backend == "flex"
    assert torch.isfinite(out).all()
    return out


# ------------------------------------------------------------------------------------------------- correctness
# four compiled configurations: (block_size, causal, padded, kv_heads)
CASES = [
    (128, True, False, 4),  # one MoBA block per flex block: causal own block partial, the others full
    (256, True, False, 4),  # two flex tiles per side (the same compiled kernel: flex sees 128-tiles only)
    (128, True, True, 4),  # ... with key padding (padded blocks partial, an all-padding batch row)
    (32, False, True, 4),  # four MoBA blocks per flex block, the mask_mod reads the selection; padding
    (32, True, False, 2),  # ... causal, grouped key/value heads (the selection is per query head)
]


@pytest.mark.parametrize("block_size, causal, padded, kv_heads", CASES)
def test_flex_equals_the_oracle_on_the_same_selection(block_size, causal, padded, kv_heads):
    q, k, v = inputs(kv_heads, seed=block_size)
    kpm = padding() if padded else None
    attn = build(causal=causal, block_size=block_size, top_k=2 if block_size == 128 else 3, kv_heads=kv_heads)
    out = run_flex(attn, q, k, v, kpm)
    torch.testing.assert_close(out.double(), oracle(attn, q, k, v, kpm), **TOL)
    torch.testing.assert_close(out, build(causal=causal, block_size=block_size, top_k=attn.config.top_k,
                                          kv_heads=kv_heads, backend="torch").attend(q, k, v, kpm), **TOL)
    if padded:
        assert (out[0] == 0).all()
    assert attn.last_padded_len == SEQ  # flex runs on the unpadded length


def test_causal_every_block_is_full_causal_attention():
    """top_k = all blocks (3 of 128 tokens): the selection is every earlier block, i.e. causal full attention
    (shares the first case's compiled kernel: with one MoBA block per flex block the mask_mod is the triangle)."""
    q, k, v = inputs(seed=7)
    idx = torch.arange(SEQ)
    out = run_flex(build(causal=True, block_size=128, top_k=3), q, k, v)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, idx[None, :] <= idx[:, None]), **TOL)


@pytest.mark.slow
def test_noncausal_every_block_is_full_attention():
    """Non-causal, unpadded, top_k = all blocks: every listed block is full and no mask_mod runs."""
    q, k, v = inputs(seed=8)
    attn = build(causal=False, block_size=128, top_k=3)
    block_mask = moba_block_mask(attn.selected_blocks(q, k), SEQ, block_size=128, causal=False)
    assert int(block_mask.kv_num_blocks.sum()) == 0 and bool((block_mask.full_kv_num_blocks == 3).all())
    out = run_flex(attn, q, k, v)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, torch.ones(SEQ, SEQ, dtype=torch.bool)),
                               **TOL)


@pytest.mark.parametrize("block_size, kv_heads", [(128, 4), (32, 2)])
def test_causal_output_ignores_later_tokens(block_size, kv_heads):
    """Changing q, k, v after t (inside a block) leaves outputs 0..t unchanged (the later blocks' selections change
    too); shares the compiled causal configurations above."""
    q, k, v = inputs(kv_heads, seed=block_size)
    attn = build(causal=True, block_size=block_size, top_k=2 if block_size == 128 else 3, kv_heads=kv_heads)
    t = 150
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    q2[:, :, t + 1:] *= -3.0
    k2[:, :, t + 1:] += 2.0
    v2[:, :, t + 1:] -= 1.0
    assert not torch.equal(attn.selected_blocks(q, k), attn.selected_blocks(q2, k2))  # the later selection moved
    out, out2 = run_flex(attn, q, k, v), run_flex(attn, q2, k2, v2)
    torch.testing.assert_close(out[:, :, : t + 1], out2[:, :, : t + 1], atol=1e-6, rtol=0)
    assert not torch.allclose(out[:, :, t + 1:], out2[:, :, t + 1:])


@pytest.mark.slow
def test_causal_output_is_prefix_consistent_with_padding():
    """The first 150 tokens alone (with their padding) give the same outputs as inside the 300: the output at t
    does not depend on how many tokens follow (one more compiled length). float32 stand-in for the float64 prefix
    test of tests/test_families.py, which flex cannot run."""
    q, k, v = inputs(kv_heads=2, seed=9)
    kpm = random_padding(2, SEQ, seed=1)
    attn = build(causal=True, block_size=32, top_k=3, kv_heads=2)
    whole = run_flex(attn, q, k, v, kpm)
    half = run_flex(attn, q[:, :, :150], k[:, :, :150], v[:, :, :150], kpm[:, :150])
    torch.testing.assert_close(whole[:, :, :150], half, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------- block mask
def listed(counts: torch.Tensor, indices: torch.Tensor, num_kv_blocks: int) -> torch.Tensor:
    return ordered_to_dense(counts, indices, num_kv_blocks)


@pytest.mark.parametrize("block_size", [128, 256])  # one flex tile per MoBA block, two tiles per side
@pytest.mark.parametrize("causal", [False, True])
def test_block_mask_lists_exactly_the_selected_blocks(block_size, causal):
    q, k, _ = inputs(seed=3)
    attn = build(causal=causal, block_size=block_size, top_k=2)
    sel = attn.selected_blocks(q, k)
    bm = moba_block_mask(sel, SEQ, block_size=block_size, causal=causal)
    assert bm.BLOCK_SIZE == (128, 128) and bm.kv_indices.shape == (2, 4, 3, 3)
    partial = listed(bm.kv_num_blocks, bm.kv_indices, 3)
    full = listed(bm.full_kv_num_blocks, bm.full_kv_indices, 3)
    s = block_size // 128
    want_partial, want_full = torch.zeros(2, 2, 4, 3, 3, dtype=torch.bool)
    for (b, h, r, slot), block in zip(torch.cartesian_prod(*map(torch.arange, sel.shape)).tolist(), sel.flatten()):
        for i in range(s):
            for j in range(s):
                row, col = r * s + i, int(block) * s + j
                if block < 0 or row >= 3 or col >= 3 or (causal and slot == 0 and j > i):
                    continue  # unused slot, past the end, the own block above the diagonal
                (want_partial if causal and slot == 0 and j == i else want_full)[b, h, row, col] = True
    assert torch.equal(partial, want_partial) and torch.equal(full, want_full)


@pytest.mark.parametrize("block_size", [128, 256, 32])
@pytest.mark.parametrize("causal", [False, True])
def test_block_mask_tiles_are_the_dense_patterns_tiles(block_size, causal):
    """With key padding (an all-padding batch row, a row real up to 161): a tile is listed iff it holds an allowed
    pair of ``dense_mask_for`` AND the padding (a test-only n x n); split blocks list it as full iff every pair in
    range is allowed, grouped blocks list it as partial."""
    q, k, _ = inputs(kv_heads=2, seed=4)
    kpm = padding()
    attn = build(causal=causal, block_size=block_size, top_k=3, kv_heads=2)
    bm = moba_block_mask(attn.selected_blocks(q, k, kpm), SEQ, block_size=block_size, causal=causal,
                         key_padding_mask=kpm)
    allowed = attn.dense_mask_for(q, k, kpm) & kpm[:, None, None, :]
    tiles = lambda x, fill: F.pad(x, (0, 384 - SEQ, 0, 384 - SEQ), value=fill).view(2, 4, 3, 128, 3, 128)
    some, every = tiles(allowed, False).any(-1).any(-2), tiles(allowed, True).all(-1).all(-2)
    partial = listed(bm.kv_num_blocks, bm.kv_indices, 3)
    if block_size == 32:
        assert bm.full_kv_num_blocks is None and torch.equal(partial, some)
    else:
        full = listed(bm.full_kv_num_blocks, bm.full_kv_indices, 3)
        assert torch.equal(full, every) and torch.equal(partial, some & ~every)
    assert not partial[0].any()  # the all-padding batch row lists nothing


def test_flex_block_size_rule():
    """128-row tiles for multiples of 128 (split), the smallest multiple >= 128 below it (grouped), else the block."""
    assert [flex_block_size(b) for b in (512, 256, 128, 64, 32, 48, 100, 200)] == [128, 128, 128, 128, 128, 144,
                                                                                    200, 200]


@pytest.mark.parametrize("causal", [False, True])
def test_block_mask_groups_small_blocks_by_the_selection(causal):
    """Block 32: flex block R (128 tokens) lists the flex blocks holding any block its four MoBA query blocks
    selected, all partial, and no block mask entry outside them."""
    q, k, _ = inputs(seed=5)
    attn = build(causal=causal, block_size=32, top_k=3)
    sel = attn.selected_blocks(q, k)  # (2, 4, 10, 3)
    bm = moba_block_mask(sel, SEQ, block_size=32, causal=causal)
    assert bm.full_kv_num_blocks is None and bm.kv_indices.shape == (2, 4, 3, 3)
    got = listed(bm.kv_num_blocks, bm.kv_indices, 3)
    want = torch.zeros(2, 4, 3, 3, dtype=torch.bool)
    for b in range(2):
        for h in range(4):
            for r in range(10):
                for block in sel[b, h, r].tolist():
                    if block >= 0:
                        want[b, h, r // 4, block // 4] = True
    assert torch.equal(got, want)
    if causal:
        assert not got.triu(1).any()  # never a flex block after the query's own


def test_block_mask_token_level_equals_the_dense_selection():
    """The grouped block mask's mask_mod, evaluated on every pair (a test-only n x n), is exactly dense_mask_for."""
    q, k, _ = inputs(kv_heads=2, seed=6)
    kpm = padding()
    attn = build(causal=True, block_size=32, top_k=3, kv_heads=2)
    bm = moba_block_mask(attn.selected_blocks(q, k, kpm), SEQ, block_size=32, causal=True, key_padding_mask=kpm)
    b, h, i, j = (torch.arange(n).view(*([1] * d), n, *([1] * (3 - d))) for d, n in enumerate((2, 4, SEQ, SEQ)))
    predicate = bm.mask_mod(b, h, i, j)
    tiles = listed(bm.kv_num_blocks, bm.kv_indices, 3)  # pairs outside the listed tiles are never computed
    covered = tiles.repeat_interleave(128, -2).repeat_interleave(128, -1)[..., :SEQ, :SEQ]
    assert torch.equal(predicate & covered, attn.dense_mask_for(q, k, kpm) & kpm[:, None, None, :])


# --------------------------------------------------------------------------------------------------- refusals
def test_backward_and_float64_refused_with_flex_reasons():
    cls = ea.get_spec("moba").module_cls
    assert "forward-only" in cls.unavailable_reason("flex", "cpu", True)
    assert "float64" in cls.unavailable_reason("flex", "cpu", False, torch.float64)
    assert cls.unavailable_reason("flex", "cpu", False, torch.float32) is None
    assert cls.unavailable_reason("torch", "cpu", True, torch.float64) is None
    attn = build(causal=True, block_size=128, top_k=2)
    q, k, v = random_qkv(1, 4, 16, 8, dtype=torch.float32)
    with pytest.raises(BackendUnavailableError, match="backend 'flex' of attention 'moba'.*forward-only"):
        attn.attend(q, k, v)
    with torch.no_grad(), pytest.raises(BackendUnavailableError, match="float32, float16 and bfloat16"):
        attn.double().attend(*(t.double() for t in (q, k, v)))
    assert "flex" in ea.get_spec("moba").backends


def test_dispatch_modes_are_refused_instead_of_running_eager_flex():
    attn = build(causal=True, block_size=128, top_k=2)
    q, k, v = inputs()
    with torch.no_grad(), StorageTracker(), pytest.raises(BackendUnavailableError, match="dispatch mode"):
        attn.attend(q, k, v)


@pytest.mark.slow
def test_no_n_by_n_tensor_for_selection_mask_and_forward():
    n = 2048
    attn = build(causal=True, block_size=128, top_k=3)
    q, k, v = (torch.randn(1, 4, n, 16, generator=torch.Generator().manual_seed(s)) for s in range(3))
    with torch.no_grad():
        attn.attend(q, k, v)  # compile outside the measured call
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            attn.attend(q, k, v)
        largest = max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)
        assert largest < n * n // 8 * 4  # an n x n float32 (or bool) tensor would be >= n^2 bytes
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            attn.dense_mask_for(q, k)  # the same probe sees a dense mask: the check can fail
    assert max(e.cpu_memory_usage for e in prof.events()) >= n * n
