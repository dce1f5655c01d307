"""linear, retention and moba: every form and backend against independent float64 references.

linear / retention: the parallel (``naive``), chunked (``torch``) and recurrent forms agree to 1e-10 with gradients,
for several chunk sizes, causal and not; both equal formulas written out here from the papers; the recurrent step API
replays ``attend``. moba: the blocked backend equals the dense reference over its own selection (outputs and
gradients), the selection equals a per-block brute force, is causal and clamps; top_k = all blocks is full
attention. Every causal backend is prefix-consistent and no non-naive backend builds an n x n tensor.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import efficient_attn as ea
from efficient_attn.attention import linear_forms
from efficient_attn.attention.retention import default_gammas
from efficient_attn.measure.storage import StorageTracker
from helpers import random_padding, random_qkv, reference_attention

TOL = dict(atol=1e-10, rtol=1e-10)


def build(key, *, causal=False, backend="auto", heads=4, dim=None, **params):
    return ea.build_attention(key, dim=dim or 8 * heads, num_heads=heads, causal=causal, backend=backend,
                              **params).double()


def run(attn, q, k, v, kpm=None, grad_seed=0):
    """Output and gradients of a fixed random projection of it (each call from the same leaves)."""
    out = attn.attend(q, k, v, key_padding_mask=kpm)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=out.dtype)
    return (out, *torch.autograd.grad((out * weight).sum(), (q, k, v)))


def assert_all_close(got, want, **tol):
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g, w, **(tol or TOL), msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------------- independent references
def linear_reference(q, k, v, causal, kpm=None):
    """Katharopoulos et al. eq. 2 with phi = elu + 1, written as explicit kernel weights."""
    phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1
    sim = phi_q @ phi_k.transpose(-1, -2)  # (b, h, n, n)
    if causal:
        sim = sim.tril()
    if kpm is not None:
        sim = sim * kpm[:, None, None, :]
    den = sim.sum(-1, keepdim=True)
    return torch.where(den > 0, sim @ v / torch.where(den > 0, den, 1), 0.0)


def retention_reference(q, k, v, gammas, causal, normalize=True, kpm=None):
    """RetNet eq. 5 and section 3.1's three normalisation steps, straight from the text."""
    n, d = q.shape[-2], q.shape[-1]
    idx = torch.arange(n, dtype=torch.float64)
    dist = idx[:, None] - idx[None, :]
    decay = torch.tensor(gammas, dtype=torch.float64)[:, None, None] ** dist.abs()  # (h, n, n)
    if causal:
        decay = decay * (dist >= 0)
    if kpm is not None:
        decay = decay * kpm[:, None, None, :]  # (b, h, n, n)
    scores = q @ k.transpose(-1, -2)
    if not normalize:
        return (scores * decay) @ v
    row = decay.sum(-1, keepdim=True)
    decay = decay / torch.where(row > 0, row, 1).sqrt()
    r = scores / math.sqrt(d) * decay
    return r / r.sum(-1, keepdim=True).abs().clamp_min(1) @ v


# --------------------------------------------------------------------------------------- linear / retention
FORMS = [("linear", {}), ("retention", {}), ("retention", {"normalize": False}),
         ("retention", {"gammas": (1.0, 0.9, 0.5, 0.05)})]


@pytest.mark.parametrize("key, params", FORMS, ids=["linear", "retention", "retention-raw", "retention-gammas"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64])
def test_parallel_chunked_recurrent_forms_agree(key, params, causal, chunk_size):
    q, k, v = random_qkv(2, 4, 37, 8, seed=chunk_size)
    kpm = random_padding(2, 37, seed=3)
    results = {b: run(build(key, causal=causal, backend=b, chunk_size=chunk_size, **params), q, k, v, kpm)
               for b in ("naive", "torch", "recurrent")}
    assert_all_close(results["torch"], results["naive"])
    assert_all_close(results["recurrent"], results["naive"])


def test_chunked_form_carries_its_state_across_groups(monkeypatch):
    """Several groups of chunks (the state carried from group to group), with decay and without."""
    monkeypatch.setattr(linear_forms, "GROUP_POSITIONS", 8)
    q, k, v = random_qkv(1, 4, 45, 8, seed=5)
    for key in ("linear", "retention"):
        for causal in (False, True):
            naive = run(build(key, causal=causal, backend="naive"), q, k, v)
            torch_ = run(build(key, causal=causal, backend="torch", chunk_size=4), q, k, v)
            assert_all_close(torch_, naive)


@pytest.mark.parametrize("causal", [False, True])
def test_linear_equals_the_paper_formula(causal):
    q, k, v = random_qkv(2, 4, 30, 8, seed=1)
    kpm = random_padding(2, 30, seed=2, empty_row=True)
    ref = linear_reference(q, k, v, causal, kpm)
    for backend in ("naive", "torch"):
        out = build("linear", causal=causal, backend=backend, chunk_size=7).attend(q, k, v, key_padding_mask=kpm)
        torch.testing.assert_close(out, ref, **TOL)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_retention_equals_the_paper_formula(causal, normalize):
    q, k, v = random_qkv(2, 4, 30, 8, seed=4)
    kpm = random_padding(2, 30, seed=5, empty_row=True)
    ref = retention_reference(q, k, v, default_gammas(4), causal, normalize, kpm)
    for backend in ("naive", "torch", "recurrent"):
        attn = build("retention", causal=causal, backend=backend, normalize=normalize, chunk_size=8)
        torch.testing.assert_close(attn.attend(q, k, v, key_padding_mask=kpm), ref, **TOL)


def test_retention_default_decays_are_retnets():
    attn = build("retention", heads=4)
    torch.testing.assert_close(attn.gammas, torch.tensor([1 - 2**-5, 1 - 2**-6, 1 - 2**-7, 1 - 2**-8],
                                                         dtype=torch.float64))


@pytest.mark.parametrize("backend", ["naive", "torch", "recurrent"])
def test_retention_without_decay_or_normalisation_is_identity_feature_linear_attention(backend):
    q, k, v = random_qkv(2, 4, 33, 8, seed=6)
    attn = build("retention", causal=True, backend=backend, gammas=(1.0,) * 4, normalize=False, chunk_size=8)
    linear_identity = (q @ k.transpose(-1, -2)).tril() @ v  # sum_{j <= i} (q_i . k_j) v_j
    assert_all_close(run(attn, q, k, v), (linear_identity, *torch.autograd.grad(
        (linear_identity * torch.randn(linear_identity.shape, generator=torch.Generator().manual_seed(0),
                                       dtype=torch.float64)).sum(), (q, k, v))))


@pytest.mark.parametrize("key", ["linear", "retention"])
def test_recurrent_step_replays_attend_and_is_pure(key):
    q, k, v = random_qkv(2, 4, 21, 8, seed=8)
    kpm = random_padding(2, 21, seed=9)
    attn = build(key, causal=True)
    want = attn.attend(q, k, v, key_padding_mask=kpm)
    state = attn.initial_state(2, dtype=torch.float64)
    outs = []
    for t in range(21):
        before = [s.clone() for s in (state if isinstance(state, tuple) else (state,))]
        out_t, new = attn.recurrent_step(state, q[:, :, t], k[:, :, t], v[:, :, t], real_t=kpm[:, t])
        for s, b in zip(state if isinstance(state, tuple) else (state,), before):
            assert torch.equal(s, b)  # the input state is untouched
        outs.append(out_t)
        state = new
    torch.testing.assert_close(torch.stack(outs, dim=-2), want, **TOL)


# ------------------------------------------------------------------------------------------------------ moba
def selection_reference(q, k, block_size, top_k, causal, kpm=None):
    """Per query block, by hand: the representative query, mean real keys, ranked candidates (a set per block)."""
    b, h, n, _ = q.shape
    nb = math.ceil(n / block_size)
    real = torch.ones(b, n, dtype=torch.bool) if kpm is None else kpm
    result = {}
    for bi in range(b):
        for hi in range(h):
            for r in range(nb):
                if causal:
                    lo, hi_pos = max(0, r * block_size - block_size + 1), r * block_size + 1
                else:
                    lo, hi_pos = r * block_size, min(n, (r + 1) * block_size)
                rep = q[bi, hi, lo:hi_pos].mean(0)
                scored = []
                for j in range(r if causal else nb):
                    keys = [t for t in range(j * block_size, min(n, (j + 1) * block_size)) if real[bi, t]]
                    if j == r or not keys:
                        continue
                    scored.append((float(rep @ k[bi, hi, keys].mean(0)), j))
                best = sorted(scored, reverse=True)[: top_k - 1]
                result[bi, hi, r] = {r} | {j for _, j in best}
    return result


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("top_k", [1, 2, 3, 9])
def test_moba_selection_matches_brute_force_and_is_causal(causal, padded, top_k):
    q, k, _ = random_qkv(2, 3, 45, 8, seed=top_k)
    kpm = random_padding(2, 45, seed=11) if padded else None
    attn = build("moba", causal=causal, heads=3, block_size=6, top_k=top_k)
    sel = attn.selected_blocks(q, k, kpm)
    assert sel.shape == (2, 3, 8, top_k) and sel.dtype == torch.long
    ref = selection_reference(q.detach(), k.detach(), 6, top_k, causal, kpm)
    r = torch.arange(8)[None, None, :, None]
    assert torch.equal(sel[..., 0], r[..., 0].expand(2, 3, 8))  # own block first
    if causal:
        assert bool((sel <= r).all())  # never a block after the query's own
    for (bi, hi, qb), blocks in ref.items():
        got = [int(x) for x in sel[bi, hi, qb] if x >= 0]
        assert len(got) == len(set(got)) and set(got) == blocks, (bi, hi, qb)
    if causal and not padded:
        # clamping: query block r has min(top_k - 1, r) earlier blocks, the rest of the slots unused
        used = (sel[..., 1:] >= 0).sum(-1)
        assert torch.equal(used, torch.arange(8).clamp(max=top_k - 1).expand(2, 3, 8))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("seq, block_size, top_k", [(40, 8, 2), (37, 5, 3), (64, 16, 1), (23, 4, 8)])
def test_moba_blocked_equals_reference_on_its_selection(causal, padded, seq, block_size, top_k):
    q, k, v = random_qkv(2, 4, seq, 8, seed=seq)
    kpm = random_padding(2, seq, seed=seq + 1, empty_row=True) if padded else None
    attn = build("moba", causal=causal, backend="torch", block_size=block_size, top_k=top_k)
    allowed = attn.dense_mask_for(q, k, kpm) & (True if kpm is None else kpm[:, None, None, :])
    ref = reference_attention(q, k, v, allowed)
    weight = torch.randn(ref.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    want = (ref, *torch.autograd.grad((ref * weight).sum(), (q, k, v)))
    assert_all_close(run(attn, q, k, v, kpm), want, atol=1e-10, rtol=1e-8)
    assert_all_close(run(build("moba", causal=causal, backend="naive", block_size=block_size, top_k=top_k),
                         q, k, v, kpm), want, atol=1e-10, rtol=1e-8)
    assert attn.last_padded_len == math.ceil(seq / block_size) * block_size


@pytest.mark.parametrize("batch, seq", [(1, 48), (1, 44), (2, 48)])
def test_moba_causal_split_path_equals_reference(batch, seq):
    """Causal rows with every slot used run as two mask-free calls merged by log-sum-exp (written straight into the
    output for batch 1); partial lengths take the masked path."""
    q, k, v = random_qkv(batch, 4, seq, 8, seed=seq + batch)
    attn = build("moba", causal=True, backend="torch", block_size=8, top_k=3)
    ref = reference_attention(q, k, v, attn.dense_mask_for(q, k))
    weight = torch.randn(ref.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    want = (ref, *torch.autograd.grad((ref * weight).sum(), (q, k, v)))
    assert_all_close(run(attn, q, k, v), want, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_moba_with_every_block_is_full_attention(causal, backend):
    q, k, v = random_qkv(1, 4, 50, 8, seed=2)
    idx = torch.arange(50)
    full = reference_attention(q, k, v, (idx[None, :] <= idx[:, None]) if causal else torch.ones(50, 50).bool())
    attn = build("moba", causal=causal, backend=backend, block_size=8, top_k=7)  # 7 blocks
    torch.testing.assert_close(attn.attend(q, k, v), full, **TOL)


def test_moba_selection_is_constant_for_autograd():
    q, k, v = random_qkv(1, 2, 32, 4, seed=3)
    attn = build("moba", heads=2, causal=True, block_size=4, top_k=2)
    assert not attn.selected_blocks(q, k).requires_grad
    assert not attn.dense_mask_for(q, k).requires_grad


@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_moba_ignores_the_future_inside_a_block(backend):
    """Changing queries, keys and values after t leaves outputs <= t unchanged, t in the middle of a block (a
    selection from the block's mean query would fail this)."""
    q, k, v = random_qkv(1, 4, 64, 8, seed=4)
    attn = build("moba", causal=True, backend=backend, block_size=8, top_k=2)
    t = 21
    q2, k2, v2 = (x.detach().clone() for x in (q, k, v))
    q2[:, :, t + 1:] *= -3.0
    k2[:, :, t + 1:] += 2.0
    v2[:, :, t + 1:] -= 1.0
    with torch.no_grad():
        out, out2 = attn.attend(q, k, v), attn.attend(q2, k2, v2)
    torch.testing.assert_close(out[:, :, : t + 1], out2[:, :, : t + 1], atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------- shared contracts
CAUSAL_CASES = [(key, backend, params) for key, params in (("linear", {"chunk_size": 8}),
                                                         ("retention", {"chunk_size": 8}),
                                                         ("moba", {"block_size": 8, "top_k": 2}))
                for backend in ea.get_spec(key).backends
                # float64 cases: flex has none on CPU (its float32 prefix case is in test_moba_flex.py)
                if ea.get_spec(key).module_cls.unavailable_reason(backend, "cpu", False, torch.float64) is None]


@pytest.mark.parametrize("key, backend, params", CAUSAL_CASES, ids=[f"{c[0]}-{c[1]}" for c in CAUSAL_CASES])
def test_causal_backends_are_prefix_consistent(key, backend, params):
    q, k, v = (t.detach() for t in random_qkv(2, 4, 74, 8, seed=12))
    kpm = random_padding(2, 74, seed=1)
    attn = build(key, causal=True, backend=backend, **params)
    with torch.no_grad():
        whole = attn.attend(q, k, v, key_padding_mask=kpm)
        half = attn.attend(q[:, :, :37], k[:, :, :37], v[:, :, :37], key_padding_mask=kpm[:, :37])
    torch.testing.assert_close(whole[:, :, :37], half, atol=1e-12, rtol=0)


@pytest.mark.parametrize("key, params, message", [
    ("retention", {"gammas": (0.0, 0.5, 0.5, 0.5)}, r"gammas\[0\] must be a decay in \(0, 1\]"),
    ("retention", {"gammas": (0.5, 1.5, 0.5, 0.5)}, r"gammas\[1\] must be a decay in \(0, 1\]"),
    ("retention", {"gammas": (0.5, 0.5, 0.5, -0.1)}, r"gammas\[3\]"),
    ("retention", {"gammas": (0.5, True, 0.5, 0.5)}, r"gammas\[1\]"),
    ("retention", {"gammas": (0.5, 0.5)}, r"num_heads=4 decays"),
    ("retention", {"chunk_size": 0}, r"chunk_size"),
    ("retention", {"normalize": "yes"}, r"normalize must be a bool"),
    ("retention", {"dropout": 0.1}, r"dropout must be 0 for retention"),
    ("linear", {"chunk_size": -2}, r"chunk_size"),
    ("linear", {"dropout": 0.1}, r"dropout must be 0 for linear"),
    ("moba", {"top_k": 0}, r"top_k"),
    ("moba", {"top_k": -1}, r"top_k"),
    ("moba", {"block_size": 0}, r"block_size"),
    ("moba", {"dropout": 0.1}, r"dropout must be 0 for moba"),
])
def test_bad_parameters_are_clear_errors(key, params, message):
    with pytest.raises(ValueError, match=message):
        ea.build_attention(key, dim=32, num_heads=4, **params)


def test_misspelt_parameter_names_the_nearest():
    with pytest.raises(TypeError, match="top_k"):
        ea.build_attention("moba", dim=32, num_heads=4, topk=3)


MEMORY_CASES = [("linear", True, {"chunk_size": 64}), ("linear", False, {}),
                ("retention", True, {"chunk_size": 64}), ("retention", False, {"chunk_size": 64}),
                ("moba", True, {"block_size": 64, "top_k": 3}), ("moba", False, {"block_size": 64, "top_k": 3})]


def peak_and_largest(key, backend, seq, causal, params, mode="fwd_bwd"):
    attn = ea.build_attention(key, dim=32, num_heads=2, causal=causal, backend=backend, **params)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, seq, 16, generator=gen, requires_grad=mode == "fwd_bwd") for _ in range(3))
    with StorageTracker() as tracker:
        if mode == "fwd":
            with torch.no_grad():
                attn.attend(q, k, v)
        else:
            attn.attend(q, k, v).sum().backward()
    return tracker.peak_bytes, tracker.largest_output.numel


@pytest.mark.parametrize("key, causal, params", MEMORY_CASES, ids=[f"{c[0]}-{c[1]}" for c in MEMORY_CASES])
def test_torch_backends_build_no_n_by_n_tensor(key, causal, params):
    short, long = 512, 2048
    peak_short, _ = peak_and_largest(key, "torch", short, causal, params)
    peak_long, largest = peak_and_largest(key, "torch", long, causal, params)
    assert peak_long < 5 * peak_short, f"peak grew {peak_long / peak_short:.1f}x for a 4x longer input"
    assert largest < long * long // 8, f"an op output of {largest} elements (n^2/8 = {long * long // 8})"


def test_naive_backends_do_build_n_by_n_so_the_check_can_fail():
    for key, causal, params in MEMORY_CASES[::2]:
        _, largest = peak_and_largest(key, "naive", 512, causal, params, mode="fwd")
        assert largest >= 512 * 512


@settings(max_examples=20, deadline=None)
@given(
    key=st.sampled_from(["linear", "retention", "moba"]),
    batch=st.integers(1, 2), heads=st.integers(1, 3), seq=st.integers(1, 40), head_dim=st.integers(1, 8),
    size=st.integers(1, 9), top_k=st.integers(1, 5), causal=st.booleans(), padded=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_backends_agree_on_random_shapes(key, batch, heads, seq, head_dim, size, top_k, causal, padded, seed):
    params = {"block_size": size, "top_k": top_k} if key == "moba" else {"chunk_size": size}
    q, k, v = random_qkv(batch, heads, seq, head_dim, seed=seed)
    kpm = random_padding(batch, seq, seed=seed + 1) if padded else None
    dim = heads * head_dim
    naive = run(build(key, causal=causal, backend="naive", heads=heads, dim=dim, **params), q, k, v, kpm)
    got = run(build(key, causal=causal, backend="torch", heads=heads, dim=dim, **params), q, k, v, kpm)
    assert_all_close(got, naive, atol=1e-10, rtol=1e-8)
