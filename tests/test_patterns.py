"""Structure of the sparse patterns (window, bigbird, longformer), independent of any backend.

Small blocks and windows throughout, so the patterns are genuinely sparse at the lengths tested.
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import efficient_attn as ea
from efficient_attn.attention.patterns import EMPTY, chunk_mask, global_query_lookup, global_rows_mask
from helpers import build_for_test

CASES = [
    ("window", {"window_size": 5, "block_size": 4}),
    ("window", {"window_size": 3, "block_size": 8}),
    ("window", {"window_size": 6}),
    ("window", {"window_size": 3, "block_size": 4, "sink_tokens": 2}),
    ("window", {"window_size": 2, "block_size": 3, "sink_tokens": 7}),
    ("bigbird", {"block_size": 4, "num_random_blocks": 2, "num_global_blocks": 1, "num_window_blocks": 3}),
    ("bigbird", {"block_size": 3, "num_random_blocks": 1, "num_global_blocks": 2, "num_window_blocks": 5}),
    ("longformer", {"window_size": 4, "global_tokens": 2}),
    ("longformer", {"window_size": 3, "global_tokens": (5, 17, 29)}),
]
IDS = [f"{key}-{'-'.join(f'{k}{v}' for k, v in p.items())}" for key, p in CASES]


def build(key, params, causal=False, **extra):
    return build_for_test(key, dim=16, num_heads=4, causal=causal, **params, **extra)


def reconstruct_from_structure(attn, seq):
    """Dense (hp, n_pad, n_pad) mask assembled only from what the blocked backend evaluates."""
    pattern = attn.pattern
    structure = attn.structure(seq)
    mod = attn.mask_mod(seq)
    is_global = global_query_lookup(structure, None)
    n_pad, bs = structure.padded_len, structure.block_size
    out = torch.zeros(pattern.mask_heads, n_pad, n_pad, dtype=torch.bool)
    for r in range(structure.num_query_blocks):
        tokens, allowed = pattern.chunk_mask(structure, mod, is_global, r, r + 1)
        allowed = allowed.expand(pattern.mask_heads, 1, bs, tokens.shape[-1])[:, 0]
        q0 = (structure.first_query_block + r) * bs
        for h in range(pattern.mask_heads):
            tok = tokens[min(h, tokens.shape[0] - 1), 0]
            for qi in range(bs):
                cols = tok[allowed[h, qi] & (tok >= 0)]
                assert not out[h, q0 + qi, cols].any(), "a key is gathered twice for one query"
                out[h, q0 + qi, cols] = True
    rows = structure.global_queries
    if rows.numel():
        out[:, rows] = global_rows_mask(pattern, mod, rows, torch.arange(n_pad))
    return out[:, :seq, :seq]


@pytest.mark.parametrize("key, params", CASES, ids=IDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq", [31, 48])
def test_block_cover_computes_exactly_the_dense_mask(key, params, causal, seq):
    attn = build(key, params, causal)
    dense = attn.dense_mask(seq)
    dense = dense if dense.dim() == 3 else dense[None]
    torch.testing.assert_close(reconstruct_from_structure(attn, seq), dense)
    assert attn.num_pairs(seq) == int(dense.sum())
    assert attn.num_pairs_total(seq) == int(dense.expand(4, seq, seq).sum())
    assert attn.useful_flops(2, seq) == 4 * 2 * attn.num_pairs_total(seq) * 4


@pytest.mark.parametrize("key, params", CASES, ids=IDS)
@pytest.mark.parametrize("causal", [False, True])
def test_fast_chunk_mask_equals_generic_mask_mod(key, params, causal):
    attn = build(key, params, causal)
    for seq in (31, 40):
        structure = attn.structure(seq)
        mod = attn.mask_mod(seq)
        is_global = global_query_lookup(structure, None)
        for start in range(structure.num_query_blocks):
            stop = min(start + 3, structure.num_query_blocks)
            tok_ref, ref = chunk_mask(structure, mod, is_global, start, stop)
            tok, fast = attn.pattern.chunk_mask(structure, mod, is_global, start, stop)
            assert torch.equal(tok, tok_ref)
            assert torch.equal(fast.expand_as(ref), ref)


@pytest.mark.parametrize("key, params", CASES, ids=IDS)
@pytest.mark.parametrize("causal", [False, True])
def test_mask_mod_on_scalar_indices_equals_dense_mask(key, params, causal):
    """FlexAttention calls mask_mod with 0-d index tensors: it must agree with dense_mask entry by entry."""
    attn = build(key, params, causal)
    seq = 33
    dense = attn.dense_mask(seq)
    dense = dense if dense.dim() == 3 else dense[None].expand(4, seq, seq)
    mod = attn.mask_mod(seq)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        h, i, j = (int(torch.randint(0, m, (), generator=gen)) for m in (4, seq, seq))
        got = mod(torch.tensor(0), torch.tensor(h if attn.pattern.per_head else 0), torch.tensor(i), torch.tensor(j))
        assert bool(got) == bool(dense[h, i, j]), (h, i, j)


@given(
    window=st.integers(1, 9),
    block=st.integers(1, 12),
    seq=st.integers(1, 60),
    causal=st.booleans(),
)
def test_window_mask_is_the_band(window, block, seq, causal):
    attn = build_for_test("window", dim=8, num_heads=2, window_size=window, block_size=block, causal=causal)
    i = torch.arange(seq)[:, None]
    j = torch.arange(seq)[None, :]
    expected = ((i - j) >= 0) & ((i - j) <= window) if causal else (i - j).abs() <= window
    assert torch.equal(attn.dense_mask(seq), expected)
    assert attn.num_pairs(seq) == int(expected.sum())


def test_window_band_is_shift_invariant_away_from_edges():
    attn = build_for_test("window", dim=8, num_heads=2, window_size=5, block_size=4)
    seq, w = 64, 5
    mask = attn.dense_mask(seq)
    for i in range(w, seq - w - 1):
        assert torch.equal(mask[i + 1, 1:], mask[i, :-1])
        assert int(mask[i].sum()) == 2 * w + 1


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("glob", [3, (0, 9, 30)])
def test_longformer_global_rows_and_columns_are_full(causal, glob):
    attn = build_for_test("longformer", dim=8, num_heads=2, window_size=2, global_tokens=glob, causal=causal)
    seq = 40
    mask = attn.dense_mask(seq)
    idx = list(range(glob)) if isinstance(glob, int) else list(glob)
    visible = torch.ones(seq, seq, dtype=torch.bool)
    if causal:
        visible = torch.tril(visible)
    for g in idx:
        assert torch.equal(mask[g], visible[g])
        assert torch.equal(mask[:, g], visible[:, g])
    others = [t for t in range(seq) if t not in idx]
    sub = mask[others][:, others]
    i = torch.tensor(others)[:, None]
    j = torch.tensor(others)[None, :]
    band = ((i - j) >= 0) & ((i - j) <= 2) if causal else (i - j).abs() <= 2
    assert torch.equal(sub, band)


def test_longformer_global_index_out_of_range_is_a_call_time_error():
    attn = build_for_test("longformer", dim=8, num_heads=2, window_size=4, global_tokens=(1, 50))
    attn.dense_mask(60)
    with pytest.raises(ValueError, match=r"global_tokens index 50 .*seq_len=40"):
        attn.attend(*(torch.randn(1, 2, 40, 4) for _ in range(3)))
    # a count caps at the length: a sequence (or packed document) shorter than the count is all global tokens
    short = build_for_test("longformer", dim=8, num_heads=2, window_size=4, global_tokens=5)
    assert short.dense_mask(3).all()
    assert short.pattern.global_indices(3).tolist() == [0, 1, 2]


def bigbird(causal=False, **params):
    defaults = {"block_size": 4, "num_random_blocks": 2, "num_global_blocks": 1, "num_window_blocks": 3}
    defaults.update(params)
    return build_for_test("bigbird", dim=16, num_heads=4, causal=causal, **defaults)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq", [64, 70])
def test_bigbird_rows_have_window_global_and_the_stated_random_blocks(causal, seq):
    attn = bigbird(causal)
    bs, r, g, half = 4, 2, 1, 1
    nb = math.ceil(seq / bs)
    layout = attn.layout(seq)
    assert layout.shape == (4, nb, nb)
    effective = attn.effective_random_blocks(seq)
    for h in range(4):
        for qb in range(nb):
            row = layout[h, qb]
            if qb < g:
                assert row.all() and effective[h, qb] == 0
                continue
            window = [b for b in range(qb - half, qb + (0 if causal else half) + 1) if 0 <= b < nb]
            glob = list(range(g))
            assert row[window].all() and row[glob].all()
            candidates = [b for b in range(nb) if b not in window and b not in glob and (not causal or b < qb)]
            chosen = [b for b in range(nb) if row[b] and b not in window and b not in glob]
            assert set(chosen) <= set(candidates), "random blocks must exclude window and global blocks"
            assert len(chosen) == min(r, len(candidates)) == int(effective[h, qb])
    assert bool((layout[:, :, :g]).all()), "global columns are full"
    # the token mask is the layout, masked causally and to the true length
    dense = attn.dense_mask(seq)
    expanded = layout.repeat_interleave(bs, 1).repeat_interleave(bs, 2)[:, :seq, :seq]
    if causal:
        expanded = expanded & torch.tril(torch.ones(seq, seq, dtype=torch.bool))
    assert torch.equal(dense, expanded)


def test_bigbird_rows_with_few_candidates_take_them_all():
    attn = bigbird(num_random_blocks=5)
    seq = 32  # 8 blocks: block 0 global; edge rows have 5 candidates, inner rows 4 (fewer than 5 asked)
    effective = attn.effective_random_blocks(seq)
    assert torch.equal(effective, torch.tensor([0, 5, 4, 4, 4, 4, 4, 5]).expand(4, 8))
    causal = bigbird(causal=True, num_random_blocks=5)
    eff = causal.effective_random_blocks(seq)
    # causal row qb has candidates 1..qb-2 (not global 0, not window qb-1, qb)
    expected = torch.tensor([0] + [min(5, max(0, qb - 2)) for qb in range(1, 8)])
    assert torch.equal(eff, expected.expand(4, 8))


def test_bigbird_seed_determines_the_plan():
    seq = 80
    a, b, c = bigbird(seed=3), bigbird(seed=3), bigbird(seed=4)
    assert torch.equal(a.dense_mask(seq), b.dense_mask(seq))
    assert not torch.equal(a.dense_mask(seq), c.dense_mask(seq))
    mask = a.dense_mask(seq)
    assert mask.shape == (4, seq, seq)
    assert not all(torch.equal(mask[0], mask[h]) for h in range(1, 4)), "heads draw their own random blocks"


def test_bigbird_plan_is_the_same_across_calls_and_in_train_and_eval():
    attn = bigbird().double()
    q, k, v = (torch.randn(1, 4, 48, 4, dtype=torch.float64) for _ in range(3))
    before = attn.dense_mask(48)
    attn.train()
    out_train = attn.attend(q, k, v)
    attn.eval()
    out_eval = attn.attend(q, k, v)
    torch.testing.assert_close(out_train, out_eval, rtol=0, atol=0)
    assert torch.equal(attn.dense_mask(48), before)


def test_bigbird_redraw_draws_a_new_plan_in_training_only():
    attn = bigbird(redraw=True).double()
    q, k, v = (torch.randn(1, 4, 64, 4, dtype=torch.float64) for _ in range(3))
    first = attn.dense_mask(64)
    attn.eval()
    attn.attend(q, k, v)
    assert torch.equal(attn.dense_mask(64), first)
    attn.train()
    attn.attend(q, k, v)
    second = attn.dense_mask(64)
    assert not torch.equal(second, first)
    attn.eval()
    assert torch.equal(attn.dense_mask(64), second), "dense_mask shows the plan in effect"


@pytest.mark.parametrize(
    "key, params, match",
    [
        ("window", {"window_size": 0}, "window_size must be a positive int"),
        ("window", {"window_size": 4, "block_size": 0}, "block_size must be a positive int"),
        ("bigbird", {"num_window_blocks": 2}, "num_window_blocks must be an odd int >= 1"),
        ("bigbird", {"num_window_blocks": 0}, "num_window_blocks must be an odd int >= 1"),
        ("bigbird", {"num_random_blocks": -1}, "num_random_blocks must be an int >= 0"),
        ("bigbird", {"block_size": 0}, "block_size must be a positive int"),
        ("bigbird", {"redraw": 1}, "redraw must be a bool"),
        ("longformer", {"global_tokens": -1}, "global_tokens must be a count >= 0"),
        ("longformer", {"global_tokens": (1, 1)}, "global_tokens indices must be distinct"),
        ("longformer", {"global_tokens": (1, -2)}, "global_tokens indices must be ints >= 0"),
        ("longformer", {"global_tokens": "cls"}, "global_tokens must be an int count or a tuple"),
    ],
)
def test_bad_parameters_name_the_parameter_and_what_is_allowed(key, params, match):
    with pytest.raises(ValueError, match=match):
        build_for_test(key, dim=8, num_heads=2, **params)


def test_registry_specs():
    for key, complexity, multiple in (("window", "O(n*w)", 64), ("longformer", "O(n*(w+g))", 64),
                                      ("bigbird", "O(n*b*(w+r+g))", 64)):
        spec = ea.get_spec(key)
        assert spec.complexity == complexity and spec.length_multiple == multiple
        assert {"naive", "torch"} <= set(spec.backends) and spec.exact
        attn = build_for_test(key)
        assert attn.block_size == multiple
        assert attn.resolve_backend(torch.device("cpu"), True) == "torch", "the blocked backend trains on CPU"


def test_structure_marks_unused_slots_and_covered_globals_empty():
    attn = build_for_test("longformer", dim=8, num_heads=2, window_size=4, global_tokens=(1, 30))
    structure = attn.structure(40)
    tokens = structure.key_tokens(0, structure.num_query_blocks)  # (1, 10, 3 * 4 + 2)
    assert tokens.shape == (1, 10, 14)
    assert (tokens[0, 0, :4] == EMPTY).all()  # block -1 does not exist
    assert tokens[0, 0, -2] == EMPTY and tokens[0, 5, -2] == 1  # global 1 is inside blocks 0..1 of row 0
    assert tokens[0, 7, -1] == EMPTY and tokens[0, 0, -1] == 30
