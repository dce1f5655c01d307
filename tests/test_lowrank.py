"""Low-rank and kernel approximations: linformer, performer, nystrom (issue 4).

They are approximations (``spec.exact`` is False), so besides the contract they are checked against the float64
full-attention reference where they must be exact (Linformer with identity projections, Nyström with one landmark per
token up to the pseudo-inverse residual), and for an error that shrinks as their rank parameter grows.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import efficient_attn as ea
from efficient_attn.attention.nystrom import iterative_pinv
from efficient_attn.attention.performer import orthogonal_gaussian_features
from efficient_attn.measure.storage import StorageTracker
from helpers import random_padding, random_qkv, reference_attention

LOWRANK = ["linformer", "performer", "nystrom"]
SMALL_MODEL = dict(vocab_size=50, dim=32, depth=2, num_heads=4, max_len=128)


def build(key, *, dim=32, num_heads=4, max_len=128, **params):
    if key == "linformer":
        params.setdefault("max_len", max_len)
    return ea.build_attention(key, dim=dim, num_heads=num_heads, **params)


def full_reference(q, k, v, key_padding_mask=None):
    n = q.shape[-2]
    allowed = torch.ones(1, 1, n, n, dtype=torch.bool)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    return reference_attention(q, k, v, allowed)


def relative_error(out, ref):
    return ((out - ref).norm() / ref.norm()).item()


def smooth_qkv(batch, heads, seq, head_dim, *, seed):
    """q, k, v that vary smoothly along the sequence (piecewise-linear through 8 knots, plus 10% noise): neighbouring
    tokens look alike, as in real inputs, so segment means summarise their segment."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(3):
        knots = torch.randn(batch * heads, head_dim, 8, generator=gen, dtype=torch.float64)
        x = F.interpolate(knots, size=seq, mode="linear", align_corners=True)
        x = x.reshape(batch, heads, head_dim, seq).transpose(-1, -2)
        out.append(x + 0.1 * torch.randn(batch, heads, seq, head_dim, generator=gen, dtype=torch.float64))
    return tuple(out)


# ------------------------------------------------------------------------------------------------ registry, shapes
def test_registered_as_approximations_with_the_torch_backend():
    for key in LOWRANK:
        spec = ea.get_spec(key)
        assert spec.exact is False and spec.backends == ("torch",)
        assert spec.paper and "arXiv:" in spec.paper
    assert ea.get_spec("linformer").max_len_field == "max_len"
    assert not ea.get_spec("linformer").supports_causal and not ea.get_spec("nystrom").supports_causal
    assert ea.get_spec("performer").supports_causal


@pytest.mark.parametrize("key", LOWRANK)
@pytest.mark.parametrize("seq", [1, 37, 64, 100])
def test_shapes_and_padded_length(key, seq):
    attn = build(key, num_landmarks=16) if key == "nystrom" else build(key)
    q, k, v = random_qkv(2, 4, seq, 8, dtype=torch.float32)
    with torch.no_grad():
        out = attn.attend(q, k, v)
        y = attn(torch.randn(2, seq, 32))
    assert out.shape == q.shape and y.shape == (2, seq, 32)
    assert torch.isfinite(out).all() and torch.isfinite(y).all()
    assert attn.last_backend == "torch"
    expected = math.ceil(seq / 16) * 16 if key == "nystrom" else seq
    assert attn.last_padded_len == expected


@pytest.mark.parametrize("chunk_size, seq, padded", [(16, 37, 48), (16, 48, 48), (64, 5, 64)])
def test_causal_performer_pads_to_whole_chunks_and_says_so(chunk_size, seq, padded):
    attn = build("performer", causal=True, chunk_size=chunk_size)
    q, k, v = random_qkv(1, 4, seq, 8, dtype=torch.float32)
    with torch.no_grad():
        assert attn.attend(q, k, v).shape == q.shape
    assert attn.last_padded_len == padded


@pytest.mark.parametrize("key", LOWRANK)
def test_build_model_defaults(key):
    model = ea.build_model(key, task="classify", num_classes=3, **SMALL_MODEL)
    if key == "linformer":
        assert all(block.attn.config.max_len == 128 for block in model.blocks)
    tokens = torch.randint(0, 50, (2, 40))
    assert model(tokens).shape == (2, 3)


# ------------------------------------------------------------------------------------------------------- errors
def test_linformer_longer_than_max_len_is_an_error_naming_max_len():
    attn = build("linformer", max_len=16, k=8)
    q, k, v = random_qkv(1, 4, 17, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"sequence length 17 exceeds max_len=16 of linformer's projections"):
        attn.attend(q, k, v)
    with pytest.raises(ValueError, match=r"exceeds max_len=16"):
        attn(torch.randn(1, 17, 32))


def test_linformer_needs_max_len():
    with pytest.raises(TypeError, match="max_len"):
        ea.build_attention("linformer", dim=32, num_heads=4)


@pytest.mark.parametrize(
    "key, reason",
    [("linformer", "projects keys and values along the sequence"), ("nystrom", "landmarks are means over segments")],
)
def test_causal_refused_with_reason(key, reason):
    with pytest.raises(ValueError, match=rf"attention '{key}' cannot be causal: .*{reason}"):
        build(key, causal=True)
    with pytest.raises(ValueError, match=rf"'{key}' cannot be used with task='lm' \(causal\): .*{reason}"):
        ea.build_model(key, task="lm", **SMALL_MODEL)


@pytest.mark.parametrize(
    "key, params, message",
    [
        ("linformer", dict(k=0), r"k must be a positive int, got 0"),
        ("linformer", dict(k=-3), r"k must be a positive int, got -3"),
        ("linformer", dict(k=2.5), r"k must be a positive int, got 2.5"),
        ("linformer", dict(max_len=0), r"max_len must be a positive int, got 0"),
        ("linformer", dict(share_kv="yes"), r"share_kv must be a bool"),
        ("linformer", dict(headwise=1), r"headwise must be a bool"),
        ("performer", dict(num_features=0), r"num_features must be a positive int, got 0"),
        ("performer", dict(chunk_size=0), r"chunk_size must be a positive int, got 0"),
        ("performer", dict(seed=-1), r"seed must be a non-negative int, got -1"),
        ("performer", dict(redraw=0), r"redraw must be False or a positive int interval"),
        ("performer", dict(redraw=True), r"redraw must be False or a positive int interval"),
        ("nystrom", dict(num_landmarks=0), r"num_landmarks must be a positive int, got 0"),
        ("nystrom", dict(pinv_iterations=0), r"pinv_iterations must be a positive int, got 0"),
        ("performer", dict(dropout=0.1), r"dropout must be 0 for performer, got 0.1: FAVOR\+ never forms"),
        ("nystrom", dict(dropout=0.1), r"dropout must be 0 for nystrom, got 0.1: the Nystrom product never forms"),
    ],
)
def test_bad_values_are_errors_naming_the_parameter(key, params, message):
    with pytest.raises(ValueError, match=message):
        build(key, **params)


def test_misspelt_parameter_is_a_type_error():
    with pytest.raises(TypeError, match=r"'num_feature' \(did you mean 'num_features'\?\)"):
        build("performer", num_feature=32)


# ---------------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("headwise", [False, True])
@pytest.mark.parametrize("share_kv", [False, True])
def test_linformer_with_identity_projections_is_full_attention(headwise, share_kv):
    n = 40
    attn = build("linformer", k=n, max_len=n, headwise=headwise, share_kv=share_kv).double()
    with torch.no_grad():
        for proj in (attn.proj_k, attn.proj_v):
            if proj is not None:
                proj.copy_(torch.eye(n, dtype=torch.float64).expand_as(proj))
    q, k, v = random_qkv(2, 4, n, 8, seed=5)
    out = attn.attend(q, k, v)
    torch.testing.assert_close(out, full_reference(q, k, v), atol=1e-10, rtol=0)
    # with padding, padded keys and values are zeroed before the projection: exactly full attention in which padded
    # positions hold zero keys and values (they keep a share exp(0) of the softmax, since no projected row can be
    # masked in general)
    kpm = random_padding(2, n, seed=6)
    out = attn.attend(q, k, v, key_padding_mask=kpm)
    real = kpm[:, None, :, None]
    zeroed = full_reference(q, torch.where(real, k, 0.0), torch.where(real, v, 0.0))
    torch.testing.assert_close(out, zeroed, atol=1e-10, rtol=0)


def test_linformer_uses_the_first_rows_of_its_projections():
    # n < max_len: exactly the computation of a linformer whose projections are the first n rows
    long = build("linformer", k=8, max_len=64).double()
    short = build("linformer", k=8, max_len=24).double()
    with torch.no_grad():
        short.proj_k.copy_(long.proj_k[:24])
        short.proj_v.copy_(long.proj_v[:24])
    q, k, v = random_qkv(1, 4, 24, 8, seed=1)
    torch.testing.assert_close(long.attend(q, k, v), short.attend(q, k, v), atol=1e-12, rtol=0)


@pytest.mark.parametrize("seq", [32, 21])  # 21 < 32 landmarks: empty landmark segments must act as absent
def test_nystrom_with_one_landmark_per_token_is_full_attention_up_to_the_pinv_residual(seq):
    """With one token per segment the landmarks are the tokens, all three kernels equal S = softmax(QK^T/sqrt d), and
    out - full = (S Z - I) S V with Z the iterative pseudo-inverse. So per (batch, head)
    ||out - full||_F <= ||S Z - I||_2 ||S V||_F: the tolerance is the pinv residual, computed here from S itself.
    With 40 iterations the residual is below 1e-9 (the iteration converges at least cubically once ||I - S Z|| < 1),
    so the output is full attention to ~1e-9; with the default 6 iterations the same bound holds, with a larger
    residual."""
    q, k, v = random_qkv(2, 4, seq, 8, seed=11)
    q, k, v = (t.detach() * 0.5 for t in (q, k, v))
    ref = full_reference(q, k, v)
    s = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)  # (b, h, n, n)
    eye = torch.eye(seq, dtype=torch.float64)
    for iterations in (6, 40):
        attn = build("nystrom", num_landmarks=32, pinv_iterations=iterations).double()
        with torch.no_grad():
            out = attn.attend(q, k, v)
        residual = torch.linalg.matrix_norm(s @ iterative_pinv(s, iterations) - eye, ord=2)  # (b, h)
        bound = residual * torch.linalg.matrix_norm(ref)  # ||S V||_F = ||ref||_F
        error = torch.linalg.matrix_norm(out - ref)
        assert (error <= bound * (1 + 1e-6) + 1e-13).all(), (error, bound)
        if iterations == 40:
            assert residual.max() < 1e-9
            torch.testing.assert_close(out, ref, atol=1e-9, rtol=0)


def test_iterative_pinv_converges_to_the_pseudo_inverse():
    gen = torch.Generator().manual_seed(0)
    a = torch.softmax(torch.randn(3, 16, 16, generator=gen, dtype=torch.float64), dim=-1)
    torch.testing.assert_close(iterative_pinv(a, 40), torch.linalg.pinv(a), atol=1e-8, rtol=1e-8)
    # zero rows and columns (absent landmarks) stay zero: pinv of a block diagonal with a zero block
    padded = F.pad(a, (0, 4, 0, 4))
    z = iterative_pinv(padded, 40)
    assert (z[:, 16:] == 0).all() and (z[:, :, 16:] == 0).all()
    torch.testing.assert_close(z[:, :16, :16], torch.linalg.pinv(a), atol=1e-8, rtol=1e-8)


# ---------------------------------------------------------------------------------- performer against references
def favor_reference(features, q, k, v, key_padding_mask=None, *, causal):
    """Unstabilised FAVOR+ in float64 with explicit prefix sums: one (m, d) state per position, O(n m d)."""
    d = q.shape[-1]
    w = features.double()
    x, y = q / d**0.25, k / d**0.25
    phi_q = torch.exp(x @ w.T - (x * x).sum(-1, keepdim=True) / 2)  # (b, h, n, m)
    phi_k = torch.exp(y @ w.T - (y * y).sum(-1, keepdim=True) / 2)  # (b, h, n, m)
    if key_padding_mask is not None:
        phi_k = phi_k * key_padding_mask[:, None, :, None]
    outer = torch.einsum("bhnm,bhnd->bhnmd", phi_k, v)  # (b, h, n, m, d)
    if causal:
        state, k_sum = outer.cumsum(dim=2), phi_k.cumsum(dim=2)  # prefix sums over positions
    else:
        state, k_sum = outer.sum(dim=2, keepdim=True), phi_k.sum(dim=2, keepdim=True)
    num = torch.einsum("bhnm,bhnmd->bhnd", phi_q, state)
    den = (phi_q * k_sum).sum(-1, keepdim=True)
    return torch.where(den > 0, num / den, torch.zeros_like(num))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 5, 16, 50, 64])  # 5 and 16 do not divide 50; 64 > n
def test_performer_equals_unchunked_prefix_sums(causal, chunk_size):
    attn = build("performer", causal=causal, chunk_size=chunk_size, num_features=24).double()
    q, k, v = random_qkv(2, 4, 50, 8, seed=3)
    kpm = random_padding(2, 50, seed=4)
    for mask in (None, kpm):
        out = attn.attend(q, k, v, key_padding_mask=mask)
        ref = favor_reference(attn.features, q, k, v, mask, causal=causal)
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-9, rtol=1e-8)


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 64])
@pytest.mark.parametrize("t", [0, 15, 16, 30])  # before, at and after chunk boundaries
def test_performer_causal_ignores_the_future(chunk_size, t):
    attn = build("performer", causal=True, chunk_size=chunk_size, num_features=32).double()
    q, k, v = (x.detach() for x in random_qkv(1, 4, 40, 8, seed=7))
    with torch.no_grad():
        out = attn.attend(q, k, v)
        k2, v2 = k.clone(), v.clone()
        k2[:, :, t + 1 :] += torch.randn_like(k2[:, :, t + 1 :])
        v2[:, :, t + 1 :] -= 2.0
        out2 = attn.attend(q, k2, v2)
    torch.testing.assert_close(out[:, :, : t + 1], out2[:, :, : t + 1], atol=1e-10, rtol=0)
    assert not torch.allclose(out[:, :, t + 1 :], out2[:, :, t + 1 :])


def test_performer_is_stable_for_large_inputs():
    # unstabilised exp(w . x) overflows float32 here (|w . x| ~ 100s); the maxima keep every feature <= 1
    attn = build("performer", num_features=64)
    q, k, v = (40 * x.detach() for x in random_qkv(1, 4, 64, 8, seed=2, dtype=torch.float32))
    for causal_attn in (attn, build("performer", num_features=64, causal=True)):
        with torch.no_grad():
            out = causal_attn.attend(q, k, v)
        assert torch.isfinite(out).all()
        assert out.abs().max() <= v.abs().max() * (1 + 1e-5)  # a convex combination of values


# --------------------------------------------------------------------------------------------- features, seeds
def test_orthogonal_features_are_orthogonal_blocks_with_chi_norms():
    w = orthogonal_gaussian_features(40, 16, seed=0)  # 2 full blocks of 16 and 8 rows of a third
    assert w.shape == (40, 16)
    directions = w / w.norm(dim=-1, keepdim=True)
    for block in (directions[:16], directions[16:32], directions[32:]):
        gram = block @ block.T
        torch.testing.assert_close(gram, torch.eye(len(block), dtype=torch.float64), atol=1e-12, rtol=0)
    norms = w.norm(dim=-1)
    assert norms.std() > 0.1  # chi-distributed, not constant
    # chi_16 has mean ~ sqrt(15.5): the mean of 2000 norms is within a few standard errors
    many = orthogonal_gaussian_features(2000, 16, seed=1).norm(dim=-1)
    assert abs(many.mean().item() - math.sqrt(15.5)) < 0.1


def test_seeds_reproduce_and_differ():
    a, b, c = (build("performer", seed=s, num_features=32) for s in (3, 3, 4))
    torch.testing.assert_close(a.features, b.features, atol=0, rtol=0)
    assert not torch.allclose(a.features, c.features)
    q, k, v = random_qkv(1, 4, 20, 8, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(a.attend(q, k, v), b.attend(q, k, v), atol=0, rtol=0)
        assert not torch.allclose(a.attend(q, k, v), c.attend(q, k, v))


def test_redraw_every_n_training_calls_and_never_in_eval():
    attn = build("performer", num_features=16, redraw=2)
    twin = build("performer", num_features=16, redraw=2)
    fixed = build("performer", num_features=16)
    q, k, v = random_qkv(1, 4, 10, 8, dtype=torch.float32)
    seen = [attn.features.clone()]
    with torch.no_grad():
        for _ in range(5):
            attn.attend(q, k, v)
            twin.attend(q, k, v)
            fixed.attend(q, k, v)
            seen.append(attn.features.clone())
    # calls 1-2 use draw 0, calls 3-4 draw 1, call 5 draw 2
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[1], seen[2])
    assert not torch.equal(seen[2], seen[3]) and torch.equal(seen[3], seen[4])
    assert not torch.equal(seen[4], seen[5])
    assert int(attn.draw) == 2
    torch.testing.assert_close(attn.features, twin.features, atol=0, rtol=0)  # redraws are seeded too
    assert torch.equal(fixed.features, seen[0])
    attn.eval()
    with torch.no_grad():
        for _ in range(4):
            attn.attend(q, k, v)
    assert torch.equal(attn.features, seen[5])
    # the state dict carries the current draw
    restored = build("performer", num_features=16, redraw=2)
    restored.load_state_dict(attn.state_dict())
    assert torch.equal(restored.features, attn.features) and int(restored.draw) == 2


# ---------------------------------------------------------------------------------- approximation quality trend
def mean_error(make, values, inputs, seeds=(0, 1, 2)):
    errors = []
    for value in values:
        per_seed = []
        for seed in seeds:
            q, k, v = inputs(seed)
            attn = make(value, seed).double()
            with torch.no_grad():
                per_seed.append(relative_error(attn.attend(q, k, v), full_reference(q, k, v)))
        errors.append(sum(per_seed) / len(per_seed))
    return errors


def test_performer_error_shrinks_with_num_features():
    def inputs(seed):
        return tuple(0.5 * x.detach() for x in random_qkv(2, 2, 96, 16, seed=100 + seed))

    errors = mean_error(
        lambda m, seed: build("performer", dim=32, num_heads=2, num_features=m, seed=seed), [16, 64, 256, 1024], inputs
    )
    # Monte Carlo: error ~ 1/sqrt(m), i.e. x0.5 per 4x features; measured ratios are 0.55-0.65
    for smaller, larger in zip(errors, errors[1:]):
        assert larger < 0.8 * smaller, errors


def test_nystrom_error_shrinks_with_num_landmarks():
    errors = mean_error(
        lambda m, seed: build("nystrom", dim=32, num_heads=2, num_landmarks=m),
        [4, 8, 16],
        lambda seed: smooth_qkv(2, 2, 128, 16, seed=seed),
    )
    for smaller, larger in zip(errors, errors[1:]):
        assert larger < 0.8 * smaller, errors


def test_linformer_error_shrinks_with_k_for_mean_pooling_projections():
    """Mean pooling is one of the projections the Linformer paper names (section 4); with it, K' and V' are segment
    means, k = n is exactly full attention, and the error falls as k grows. (The default random initialisation is a
    starting point for training, not an approximation of full attention.)"""
    n = 128

    def make(k, seed):
        attn = build("linformer", dim=32, num_heads=2, k=k, max_len=n).double()
        pool = torch.zeros(n, k, dtype=torch.float64)
        pool[torch.arange(n), torch.arange(n) // (n // k)] = k / n
        with torch.no_grad():
            attn.proj_k.copy_(pool)
            attn.proj_v.copy_(pool)
        return attn

    errors = mean_error(make, [4, 16, 64, 128], lambda seed: smooth_qkv(2, 2, n, 16, seed=seed))
    for smaller, larger in zip(errors, errors[1:]):
        assert larger < 0.6 * smaller, errors
    assert errors[-1] < 1e-12


# --------------------------------------------------------------------------------------------- gradients, padding
@pytest.mark.parametrize(
    "key, params",
    [
        ("linformer", {}),
        ("linformer", dict(share_kv=True, headwise=True)),
        ("performer", {}),
        ("performer", dict(causal=True, chunk_size=8)),
        ("nystrom", dict(num_landmarks=8)),
    ],
)
def test_gradients_reach_every_parameter(key, params):
    attn = build(key, max_len=64, **params)
    x = torch.randn(2, 30, 32, requires_grad=True)
    kpm = random_padding(2, 30, seed=1)
    kpm[:, 0] = True
    attn(x, key_padding_mask=kpm).square().sum().backward()
    for name, p in attn.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    if key == "linformer":  # rows past the sequence get no gradient: they were not used
        assert (attn.proj_k.grad[..., 30:, :] == 0).all()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "key, params",
    [
        ("linformer", {}),
        ("linformer", dict(share_kv=True, headwise=True)),
        ("performer", {}),
        ("performer", dict(causal=True, chunk_size=8)),
        ("nystrom", dict(num_landmarks=8)),
        ("nystrom", dict(num_landmarks=64)),
    ],
)
def test_padded_tokens_do_not_change_real_outputs(key, params):
    attn = build(key, max_len=64, **params).double()
    q, k, v = (x.detach() for x in random_qkv(2, 4, 45, 8, seed=9))
    kpm = random_padding(2, 45, seed=10)
    kpm[:, 0] = True
    kpm[1, 20:23] = False  # a hole in the middle too
    pad = ~kpm[:, None, :, None]
    noise = random_qkv(2, 4, 45, 8, seed=11)
    with torch.no_grad():
        out = attn.attend(q, k, v, key_padding_mask=kpm)
        q2, k2, v2 = (torch.where(pad, 5 * n.detach(), x) for x, n in zip((q, k, v), noise))
        out2 = attn.attend(q2, k2, v2, key_padding_mask=kpm)
    real = kpm[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[real], out2[real], atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("key", LOWRANK)
def test_rows_without_a_real_key_are_zero_not_nan(key):
    attn = build(key, num_landmarks=8) if key == "nystrom" else build(key)
    attn = attn.double()
    q, k, v = random_qkv(2, 4, 20, 8, seed=2)
    kpm = random_padding(2, 20, seed=3, empty_row=True)
    out = attn.attend(q, k, v, key_padding_mask=kpm)
    assert torch.isfinite(out).all() and (out[0] == 0).all() and (out[1] != 0).any()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_causal_performer_leading_padding_gives_zero_rows():
    attn = build("performer", causal=True, chunk_size=4).double()
    q, k, v = random_qkv(1, 4, 10, 8, seed=5)
    kpm = torch.arange(10)[None] >= 6  # first 6 tokens are padding: queries 0..5 see no real key
    out = attn.attend(q, k, v, key_padding_mask=kpm)
    assert (out[:, :, :6] == 0).all() and torch.isfinite(out).all() and (out[:, :, 6:] != 0).any()


# -------------------------------------------------------------------------------------------------- FLOPs, memory
@pytest.mark.parametrize(
    "key, params, seq",
    [
        ("linformer", dict(k=16), 40),
        ("linformer", dict(k=16, headwise=True), 40),
        ("performer", dict(num_features=24), 40),
        ("performer", dict(num_features=24, causal=True, chunk_size=16), 40),
        ("performer", dict(num_features=24, causal=True, chunk_size=8), 40),
        ("nystrom", dict(num_landmarks=8, pinv_iterations=3), 40),
    ],
)
def test_useful_flops_counts_the_matmuls_the_core_runs(key, params, seq):
    attn = build(key, **params)
    q, k, v = random_qkv(2, 4, seq, 8, dtype=torch.float32)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        attn.attend(q, k, v)
    assert attn.useful_flops(2, seq) == counter.get_total_flops()


def peak_bytes(attn, seq, heads=2, head_dim=16):
    q, k, v = random_qkv(1, heads, seq, head_dim, dtype=torch.float32)
    q, k, v = (x.detach() for x in (q, k, v))
    with torch.no_grad():
        attn.attend(q, k, v)  # first call outside: lazily built helpers are not the cost being measured
        with StorageTracker() as tracker:
            attn.attend(q, k, v)
    return tracker.peak_bytes


@pytest.mark.parametrize(
    "key, params",
    [
        ("performer", dict(num_features=64)),
        ("performer", dict(num_features=64, causal=True)),
        ("nystrom", dict(num_landmarks=32)),
        ("linformer", dict(k=32, max_len=4096)),
    ],
)
def test_peak_memory_grows_linearly(key, params):
    attn = build(key, num_heads=2, **params)
    small, large = peak_bytes(attn, 1024), peak_bytes(attn, 4096)
    assert large < 5 * small, (small, large)


def test_chunked_causal_performer_holds_far_less_than_per_position_prefix_sums():
    # chunk_size=1 is the unchunked algorithm: one (m, d) prefix-sum state per position, O(n m d)
    unchunked = peak_bytes(build("performer", num_heads=2, num_features=64, causal=True, chunk_size=1), 1024)
    chunked = peak_bytes(build("performer", num_heads=2, num_features=64, causal=True, chunk_size=64), 1024)
    per_position_state = 2 * 1024 * 64 * 16 * 4  # heads * n * m * d * float32 bytes
    assert unchunked >= per_position_state
    assert chunked * 8 < unchunked, (chunked, unchunked)


def test_linformer_peak_memory_is_far_below_full_attention():
    full = peak_bytes(build("full", num_heads=2, backend="naive"), 2048)
    linformer = peak_bytes(build("linformer", num_heads=2, k=64, max_len=2048), 2048)
    assert linformer * 20 < full, (linformer, full)


@pytest.mark.parametrize(
    "key, params",
    [
        ("linformer", {}),
        ("performer", {}),
        ("performer", dict(causal=True, chunk_size=3)),  # groups of 6 positions: the state is carried 7 times
        ("performer", dict(causal=True, chunk_size=8)),  # chunk larger than the block: groups of one chunk
        ("nystrom", dict(num_landmarks=8)),
    ],
)
def test_blocks_compute_the_same_as_one_block(key, params, monkeypatch):
    module, name = {
        "linformer": (ea.attention.linformer, "QUERY_BLOCK"),
        "performer": (ea.attention.performer, "BLOCK"),  # keys (with a running maximum) and queries
        "nystrom": (ea.attention.nystrom, "QUERY_BLOCK"),
    }[key]
    attn = build(key, **params).double()
    q, k, v = random_qkv(2, 4, 45, 8, seed=12)
    kpm = random_padding(2, 45, seed=13)
    kpm[1] = kpm[1].flip(0)  # left padding: the first blocks of keys have no real key
    assert not kpm[1, :7].any()
    whole = attn.attend(q, k, v, key_padding_mask=kpm)
    whole_grads = torch.autograd.grad(whole.square().sum(), (q, k, v))
    monkeypatch.setattr(module, name, 7)  # 45 = 6 blocks of 7 + 3
    blocked = attn.attend(q, k, v, key_padding_mask=kpm)
    torch.testing.assert_close(blocked, whole, atol=1e-12, rtol=1e-10)
    for g, r in zip(torch.autograd.grad(blocked.square().sum(), (q, k, v)), whole_grads):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-10)
